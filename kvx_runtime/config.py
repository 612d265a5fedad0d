"""The plugin configuration (``conf/<env>/vertexai.yml``) as typed, validated objects.

The schema follows the kedro-vertexai family (seed 003, section 2.2) so that existing
``vertexai.yml`` files work unchanged. Validation rules:

- unknown keys produce one warning listing every one of them (with a close match if any);
- a wrong type or value is a :class:`~kvx_runtime.errors.ConfigError` naming the key path,
  e.g. ``run_config.resources.fit.cpu: ...`` (exit code 2);
- a command validates strictly only the keys it needs (``needed``): a step does not need
  ``image`` or ``resources``, so a problem there is a warning for a step and an error for
  the compiler.

Placeholders (``${commit_id}``, ``${globals:...}``) are resolved per value, so a placeholder
that cannot be resolved only matters if that value is needed.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvx_runtime.errors import ConfigError, KvxError
from kvx_runtime.log import get_logger

__all__ = [
    "DynamicConfigProviderSpec",
    "GroupingConfig",
    "HostAlias",
    "MLflowConfig",
    "NetworkConfig",
    "PluginConfig",
    "ResourceSpec",
    "RetrySpec",
    "RunConfig",
    "ScheduleConfig",
    "load_plugin_config",
    "parse_plugin_config",
]

log = get_logger(__name__)

CONFIG_KEY = "vertexai"
CONFIG_PATTERNS = ["vertexai*", "vertexai/**"]
_CONFIG_SUFFIXES = (".yml", ".yaml", ".json")
#: Read when no vertexai* file exists: projects coming from kedro-kubeflow.
KUBEFLOW_CONFIG_PATTERNS = ["kubeflow*", "kubeflow/**"]
_CPU = re.compile(r"^\d+(\.\d+)?m?$")
_MEMORY = re.compile(r"^\d+(\.\d+)?(E|P|T|G|M|K|Ei|Pi|Ti|Gi|Mi|Ki)?$")
_DURATION = re.compile(r"^\d+(\.\d+)?s$")
_DOTTED_NAME = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$")


class _Section(BaseModel):
    """Base of every config section: unknown keys are kept (for the warning), values checked."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)


class ResourceSpec(_Section):
    """Requests and limits for a node, a tag or ``__default__``."""

    cpu: str | None = None
    memory: str | None = None
    gpu: int | None = Field(default=None, ge=0)

    @field_validator("cpu", mode="before")
    @classmethod
    def _cpu(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError("must be a number of cores like 2, 0.5 or '500m'")
        text = str(value).strip()
        if not _CPU.match(text) or float(text.rstrip("m")) <= 0:
            raise ValueError(f"{value!r} is not a cpu amount (examples: 2, 0.5, '500m')")
        return text

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError("must be a memory amount like '512Mi', '4Gi' or '2G'")
        text = str(value).strip()
        if not _MEMORY.match(text):
            raise ValueError(f"{value!r} is not a memory amount (examples: '512Mi', '4Gi', '2G')")
        return text


class RetrySpec(_Section):
    """Retry policy of a step (mapped to the pipeline spec's ``retryPolicy``)."""

    max_retry_count: int = Field(default=0, ge=0, le=10)
    backoff_duration: str = "0s"
    backoff_factor: float = Field(default=2.0, ge=1.0)
    backoff_max_duration: str = "3600s"

    @field_validator("backoff_duration", "backoff_max_duration", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        text = f"{value}s" if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not isinstance(text, str) or not _DURATION.match(text):
            raise ValueError(f"{value!r} is not a duration in seconds (examples: 30, '30s')")
        return canonical_duration(text)


def canonical_duration(text: str) -> str:
    """A ``<seconds>s`` duration as protobuf's JSON writes it ("30s", "1.500s"): KFP stores a
    spec re-serialized, and a pipeline version is recognised by its spec (after a lost answer)."""
    from decimal import Decimal

    nanos = int((Decimal(text[:-1]) * 10**9).to_integral_value())
    whole, fraction = divmod(nanos, 10**9)
    if not fraction:
        return f"{whole}s"
    digits = f"{fraction:09d}"
    for kept in (3, 6):
        if digits[kept:] == "0" * (9 - kept):
            return f"{whole}.{digits[:kept]}s"
    return f"{whole}.{digits}s"


class DynamicConfigProviderSpec(_Section):
    """One ``run_config.dynamic_config_providers`` entry: a class and its constructor kwargs."""

    cls: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("cls")
    @classmethod
    def _dotted(cls, value: str) -> str:
        if not _DOTTED_NAME.match(value):
            raise ValueError(f"{value!r} is not a fully qualified class name (module.Class)")
        return value


class GroupingConfig(_Section):
    """How nodes are grouped into steps (used by the compiler)."""

    cls: str = "kvx_runtime.grouping.IdentityNodeGrouper"
    params: dict[str, Any] = Field(default_factory=dict)


class HostAlias(_Section):
    """An ``/etc/hosts`` entry that the container entrypoint adds."""

    ip: str
    hostnames: list[str] = Field(min_length=1)

    @field_validator("ip")
    @classmethod
    def _ip(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an IP address") from exc
        return value


class NetworkConfig(_Section):
    vpc: str | None = None
    host_aliases: list[HostAlias] = Field(default_factory=list)


class MLflowConfig(_Section):
    """``run_config.mlflow``: auth for the tracking server and whether MLflow is required."""

    request_header_provider_params: dict[str, Any] = Field(default_factory=dict)
    #: A ``RequestHeaderProviderWithKedroContext`` subclass; chosen from the params if unset.
    cls: str | None = None
    #: When False, an unreachable MLflow is a warning and the node runs untracked.
    required: bool = True


class S3Config(_Section):
    """``run_config.s3``: where an ``s3://`` storage root lives (MinIO on a self-hosted
    Kubeflow). The standard AWS variables win: ``AWS_ENDPOINT_URL`` (``_S3``) and
    ``AWS_REGION``/``AWS_DEFAULT_REGION``; credentials only ever come from the environment
    (or the pod's role), never from this file."""

    endpoint_url: str | None = None
    region: str | None = None

    @field_validator("endpoint_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
#: A secret's keys and environment variable names, as Kubernetes accepts them.
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")
_ENV_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_kubernetes_name(value: str) -> bool:
    """A Kubernetes object name (secret, service account): a DNS subdomain."""
    return len(value) <= 253 and bool(_DNS_SUBDOMAIN.fullmatch(value))


def is_kubernetes_namespace(value: str) -> bool:
    """A Kubernetes namespace name: a DNS label."""
    return bool(_DNS_LABEL.fullmatch(value))


class SecretAsEnv(_Section):
    """A Kubernetes secret of the run's namespace whose keys become environment variables of
    every step (``keys``: secret key -> variable), e.g. MinIO's access keys."""

    secret_name: str
    keys: dict[str, str] = Field(min_length=1)
    #: A missing secret (or key) leaves the variables unset instead of failing the pod.
    optional: bool = False

    @field_validator("secret_name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not is_kubernetes_name(value):
            raise ValueError(f"{value!r} is not a Kubernetes secret name")
        return value

    @field_validator("keys")
    @classmethod
    def _keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key, variable in value.items():
            if not _SECRET_KEY.fullmatch(key):
                raise ValueError(f"{key!r} is not a secret key")
            if not _ENV_VAR.fullmatch(variable):
                raise ValueError(f"{variable!r} is not an environment variable name")
        return value


class KubernetesConfig(_Section):
    """``run_config.kubernetes``: pod settings that only Kubeflow Pipelines applies (sent as the
    run's Kubernetes platform spec; Vertex AI steps get credentials from their service account)."""

    secrets_as_env: list[SecretAsEnv] = Field(default_factory=list)


class ScheduleConfig(_Section):
    """``run_config.schedules.<pipeline or default_schedule>``: a recurring run."""

    cron_expression: str | None = None
    timezone: str | None = None
    start_time: str | None = None  # RFC 3339
    end_time: str | None = None
    max_run_count: int | None = Field(default=None, ge=1)
    max_concurrent_run_count: int = Field(default=1, ge=1)
    allow_queueing: bool = False


class RunConfig(_Section):
    image: str | None = None
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    root: str | None = None
    experiment_name: str | None = None
    experiment_description: str | None = None
    scheduled_run_name: str | None = None
    description: str | None = None
    ttl: int = Field(default=604800, gt=0)
    on_exit_pipeline: str | None = None
    #: After a step fails: fail_slow (Vertex AI's default) lets independent steps finish,
    #: fail_fast starts nothing new. Carried by the spec (kvx_failure_policy) and the job.
    failure_policy: Literal["fail_slow", "fail_fast"] = "fail_slow"
    resources: dict[str, ResourceSpec] = Field(default_factory=dict)
    node_selectors: dict[str, dict[str, str]] = Field(default_factory=dict)
    retries: dict[str, RetrySpec] = Field(default_factory=dict)
    dynamic_config_providers: list[DynamicConfigProviderSpec] = Field(default_factory=list)
    grouping: GroupingConfig = Field(default_factory=GroupingConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    service_account: str | None = None
    #: Customer-managed encryption key of submitted jobs (the aiplatform SDK's name for it).
    encryption_spec_key_name: str | None = None
    schedules: dict[str, ScheduleConfig] = Field(default_factory=dict)
    #: An Artifact Registry KFP repository, https://{region}-kfp.pkg.dev/{project}/{repository}.
    template_repository: str | None = None
    #: Run the workspace's code without rebuilding the image (docs/code-upload.md).
    code_upload: bool = False
    #: When the archive's requirements differ from the image's: fail (default) or warn.
    code_upload_on_drift: Literal["fail", "warn"] = "fail"
    env: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    s3: S3Config = Field(default_factory=S3Config)
    #: Kubeflow Pipelines: Kubernetes secrets as step environment variables.
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    #: Kubeflow Pipelines: the user namespace (profile) of multi-user installations.
    namespace: str | None = None

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        if value is not None and not is_kubernetes_namespace(value):
            raise ValueError(f"{value!r} is not a Kubernetes namespace name (lowercase letters, digits, '-')")
        return value
    #: Kubeflow Pipelines: display name of run-once runs (kedro-kubeflow's key).
    run_name: str | None = None
    #: Kubeflow Pipelines: run-once waits for the run to end unless --no-wait (kedro-kubeflow's key).
    wait_for_completion: bool = False


class PluginConfig(_Section):
    """The whole ``vertexai.yml`` (or a kedro-kubeflow project's ``kubeflow.yml``)."""

    project_id: str | None = None
    region: str | None = None
    #: Kubeflow Pipelines: the API's base URL, e.g. https://kubeflow.example.com/pipeline.
    host: str | None = None
    run_config: RunConfig = Field(default_factory=RunConfig)


#: What a step (exec-node, mlflow-start/end) needs; everything else only warns there.
STEP_KEYS: tuple[str, ...] = (
    "run_config.root",
    "run_config.dynamic_config_providers",
    "run_config.mlflow",
    "run_config.s3",
)
#: Everything (compile, doctor).
ALL_KEYS: tuple[str, ...] = ("",)


@dataclass(frozen=True)
class _Unresolved:
    """A value whose placeholder could not be resolved; an error only where it is needed."""

    reason: str


@dataclass
class _Problems:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _path(loc: Iterable[Any]) -> str:
    return ".".join(str(part) for part in loc)


def _is_needed(path: str, needed: Iterable[str]) -> bool:
    return any(
        key == "" or path == key or path.startswith(key + ".") or key.startswith(path + ".")
        for key in needed
    )


def _known_fields(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _collect_unknown(model: BaseModel, prefix: str, found: list[str]) -> None:
    for key in model.model_extra or {}:
        path = f"{prefix}{key}"
        close = difflib.get_close_matches(str(key), _known_fields(type(model)), n=1)
        found.append(f"{path} (did you mean {prefix}{close[0]}?)" if close else path)
    for name in type(model).model_fields:
        value = getattr(model, name)
        _collect_unknown_in(value, f"{prefix}{name}.", found)


def _collect_unknown_in(value: Any, prefix: str, found: list[str]) -> None:
    if isinstance(value, BaseModel):
        _collect_unknown(value, prefix, found)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _collect_unknown_in(item, f"{prefix}{key}.", found)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _collect_unknown_in(item, f"{prefix}{index}.", found)


def _drop(raw: dict[str, Any], loc: tuple[Any, ...]) -> None:
    """Remove the top-most section of ``loc`` below ``run_config`` so defaults apply instead."""
    target: Any = raw
    keep = loc[:2] if loc and loc[0] == "run_config" else loc[:1]
    for part in keep[:-1]:
        target = target.get(part) if isinstance(target, dict) else None
        if target is None:
            return
    if isinstance(target, dict):
        target.pop(keep[-1], None)


def _replace_unresolved(value: Any, path: str, problems: dict[str, str]) -> Any:
    """Record unresolved placeholders by key path and return ``value`` without them."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if isinstance(item, _Unresolved):
                problems[child] = item.reason
            else:
                out[key] = _replace_unresolved(item, child, problems)
        return out
    if isinstance(value, list):
        items = []
        for index, item in enumerate(value):
            if isinstance(item, _Unresolved):
                problems[f"{path}.{index}"] = item.reason
            else:
                items.append(_replace_unresolved(item, f"{path}.{index}", problems))
        return items
    return value


def parse_plugin_config(
    raw: Mapping[str, Any] | None,
    *,
    needed: Iterable[str] = ALL_KEYS,
    source: str = "vertexai.yml",
) -> PluginConfig:
    """Validate a raw ``vertexai.yml`` mapping.

    Raises :class:`ConfigError` (one message listing every problem with its key path) for
    problems in ``needed`` keys; problems elsewhere are logged as one warning and the
    offending section falls back to its defaults.
    """
    needed = tuple(needed)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")

    unresolved: dict[str, str] = {}
    data = _replace_unresolved(dict(raw), "", unresolved)
    problems = _Problems()
    for path, reason in unresolved.items():
        target = problems.errors if _is_needed(path, needed) else problems.warnings
        target.append(f"{path}: {reason}")

    config: PluginConfig | None = None
    for _ in range(8):  # each round drops the sections that are not needed and failed
        try:
            config = PluginConfig.model_validate(data)
            break
        except ValidationError as exc:
            dropped = False
            for error in exc.errors(include_url=False):
                loc = tuple(error["loc"])
                message = f"{_path(loc)}: {_describe(error)}"
                if _is_needed(_path(loc), needed):
                    problems.errors.append(message)
                else:
                    problems.warnings.append(message)
                    _drop(data, loc)
                    dropped = True
            if problems.errors or not dropped:
                break
    if problems.errors:
        raise ConfigError(f"{source}: " + "; ".join(dict.fromkeys(problems.errors)))
    if config is None:  # pragma: no cover - only if dropping never converges
        raise ConfigError(f"{source}: " + "; ".join(problems.warnings))
    if problems.warnings:
        log.warning(
            "vertexai.yml values not needed by this command are invalid and were ignored",
            problems=list(dict.fromkeys(problems.warnings)),
            source=source,
        )
    unknown: list[str] = []
    _collect_unknown(config, "", unknown)
    if unknown:
        log.warning("unknown keys in vertexai.yml are ignored", keys=unknown, source=source)
    return config


def _describe(error: Mapping[str, Any]) -> str:
    kind = error.get("type", "")
    value = error.get("input")
    if kind == "missing":
        return "required key is missing"
    if kind in {"dict_type", "model_type", "model_attributes_type"}:
        return f"expected a mapping, got {type(value).__name__} {value!r}"
    if kind == "list_type":
        return f"expected a list, got {type(value).__name__} {value!r}"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error":
        return f"{message} (got {value!r})"
    return message


# --- reading vertexai.yml from a project -------------------------------------------------


def _resolve_leaves(node: Any) -> Any:
    """Resolve an OmegaConf tree value by value; failures become :class:`_Unresolved`."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(node, DictConfig):
        out: dict[str, Any] = {}
        for key in node:
            try:
                child = node._get_node(key)
                value = node[key] if not OmegaConf.is_config(child) else child
            except OmegaConfBaseException as exc:
                out[str(key)] = _Unresolved(_first_line(exc))
                continue
            out[str(key)] = _resolve_leaves(value)
        return out
    if isinstance(node, ListConfig):
        items: list[Any] = []
        for index in range(len(node)):
            try:
                items.append(_resolve_leaves(node[index]))
            except OmegaConfBaseException as exc:
                items.append(_Unresolved(_first_line(exc)))
        return items
    return node


def _first_line(exc: BaseException) -> str:
    from kvx_runtime.config_loader import explain_interpolation_error

    explained = explain_interpolation_error(exc)  # type: ignore[arg-type]
    if explained:
        return str(explained)
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


#: Deeper than any real configuration; deeper input is refused before anything recurses on it.
MAX_DEPTH = 64


def _depth(value: Any) -> int:
    """How deeply ``value`` nests mappings and lists (iteratively: no recursion limit)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        current, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        if isinstance(current, Mapping):
            stack.extend((item, level + 1) for item in current.values())
        elif isinstance(current, list):
            stack.extend((item, level + 1) for item in current)
    return deepest


def _parse_file(raw: bytes, path: str) -> Any:
    """One config file's text parsed, or a ConfigError saying what is wrong with it."""
    import yaml
    from omegaconf import OmegaConf

    from kvx_runtime.config_loader import render_templates

    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} is 0x{raw[exc.start]:02x})",
                          hint="save the file as UTF-8") from None
    if not text.strip():
        return None
    try:
        data = yaml.safe_load(text)  # depth first: OmegaConf recurses without a limit
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a configuration") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_first_line(exc)}") from None
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    if _depth(data) > MAX_DEPTH:
        raise ConfigError(f"{path}: nested more than {MAX_DEPTH} levels deep")
    try:
        return OmegaConf.create(render_templates(text, path))
    except KvxError:
        raise
    except Exception as exc:
        raise ConfigError(f"{path}: not valid YAML: {_first_line(exc)}") from None


def read_raw_plugin_config(
    conf_source: str | Path,
    env: str,
    *,
    base_env: str = "base",
    merge_strategy: str = "destructive",
) -> tuple[dict[str, Any], list[str]]:
    """Read and merge ``vertexai*`` files from ``<conf>/<base_env>`` and ``<conf>/<env>``
    (in an environment without ``vertexai*`` files, its ``kubeflow*`` files: a kedro-kubeflow
    project).

    Returns the merged mapping (values resolved one by one, see :func:`_resolve_leaves`) and
    the files read. ``merge_strategy`` is Kedro's: ``destructive`` (the env file replaces
    top-level keys, Kedro's default) or ``soft`` (deep merge).
    """
    import fsspec
    from omegaconf import OmegaConf

    fs, root = fsspec.core.url_to_fs(str(conf_source))
    layers: list[Any] = []
    files: list[str] = []
    envs = [base_env] if env == base_env else [base_env, env]
    for env_name in envs:
        env_dir = str(PurePosixPath(root) / env_name)
        # Per environment: its vertexai* files, else its kubeflow* files (a kedro-kubeflow
        # project), so that conf/base/kubeflow.yml and conf/local/vertexai.yml both count.
        found = {path for pattern in CONFIG_PATTERNS for path in fs.glob(f"{env_dir}/{pattern}")
                 if path.endswith(_CONFIG_SUFFIXES)}  # a stray vertexai.yml.bak chooses nothing
        ignored = {path for pattern in KUBEFLOW_CONFIG_PATTERNS for path in fs.glob(f"{env_dir}/{pattern}")
                   if path.endswith(_CONFIG_SUFFIXES)}
        if not found:
            found, ignored = ignored, set()
        elif ignored:
            log.warning("both vertexai and kubeflow config files in one environment: the kubeflow ones are "
                        "not read", environment=env_name, ignored=sorted(ignored))
        configs = []
        for path in sorted(found):
            if fs.isdir(path):
                continue
            loaded = _parse_file(fs.cat_file(path), path)
            if loaded is None:
                continue
            if not OmegaConf.is_dict(loaded):
                raise ConfigError(f"{path}: expected a mapping at the top level")
            configs.append(loaded)
            files.append(path)
        if configs:
            layers.append(_merge(configs, files))
    if not layers:
        return {}, files
    if merge_strategy == "soft" or len(layers) == 1:
        merged = _merge(layers, files)
    else:
        merged = OmegaConf.merge(layers[0])
        for key in layers[1]:
            merged[key] = layers[1]._get_node(key)
    return _resolve_leaves(merged), files


def _merge(configs: list[Any], files: list[str]) -> Any:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.merge(*configs)
    except Exception as exc:  # e.g. a mapping in one file, a list in another
        raise ConfigError(f"{', '.join(files)}: the files cannot be merged: {_first_line(exc)}") from None


def load_plugin_config(
    conf_source: str | Path,
    env: str,
    *,
    base_env: str = "base",
    merge_strategy: str = "destructive",
    needed: Iterable[str] = ALL_KEYS,
) -> PluginConfig:
    """Read, merge and validate ``vertexai.yml`` for ``env``. A missing file means defaults."""
    raw, files = read_raw_plugin_config(
        conf_source, env, base_env=base_env, merge_strategy=merge_strategy
    )
    source = ", ".join(files) if files else f"{conf_source}/{{{base_env},{env}}}/vertexai.yml"
    return parse_plugin_config(raw, needed=needed, source=source)


#: What a storage root may look like (said in every error about one).
STORAGE_ROOT_FORMS = "gs://bucket[/prefix], s3://bucket[/prefix], file:///absolute/path, or a local path"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
#: S3 (and MinIO) bucket names: 3-63 lowercase letters, digits, dots and hyphens.
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
#: Scheme -> (canonical scheme, bucket name rule, what such a bucket is called).
_BUCKET_RULES = {
    "gs": ("gs", _BUCKET, "a Cloud Storage"),
    "gcs": ("gs", _BUCKET, "a Cloud Storage"),
    "s3": ("s3", _S3_BUCKET, "an S3"),
    "s3a": ("s3", _S3_BUCKET, "an S3"),
}


#: Where a project's local runs keep their state (compiled spec, step logs, storage root).
LOCAL_STATE_DIR = ".kvx"


def local_storage_root(project: str | os.PathLike[str]) -> str:
    """The storage root of runs on this machine: ``<project>/.kvx/storage``."""
    return os.path.join(os.fspath(project), LOCAL_STATE_DIR, "storage")


def resolve_storage_root(flag: str | None, configured: str | None, *, required: bool,
                         default: str | None = None) -> str | None:
    """The storage root of a command, by one rule for every command.

    ``--storage-root`` when given (even empty: an error, never silently another root; a path
    without a scheme is local), else ``run_config.root`` (a bare ``bucket/prefix`` is
    ``gs://``), else ``default``. None of them: a ConfigError (exit 2) when ``required``.
    """
    if flag is not None:
        return normalize_storage_root(flag, bare_is_bucket=False)
    if configured:
        return normalize_storage_root(configured)
    if default is not None:
        return normalize_storage_root(default, bare_is_bucket=False)
    if required:
        raise ConfigError("no storage root is set",
                          hint=f"pass --storage-root or set run_config.root ({STORAGE_ROOT_FORMS})")
    return None


def normalize_storage_root(root: str, *, bare_is_bucket: bool = True) -> str:
    """The storage root as a URL or an absolute local path; anything else is a ConfigError.

    In ``run_config.root`` a bare ``bucket/prefix`` (the seed's style) means
    ``gs://bucket/prefix``; on the command line (``bare_is_bucket=False``) a path without a
    scheme is a local path. Accepted schemes: ``gs://`` (``gcs://``) and ``s3://`` (``s3a://``)
    with a valid bucket name and ``file://`` with an absolute path. In-process file systems
    (``memory://``) are refused: what a step writes there dies with its process.
    """
    import os

    text = root.strip()
    if not text:
        raise ConfigError("the storage root is empty", hint=f"use {STORAGE_ROOT_FORMS}")
    if "://" not in text:
        if text.startswith(("/", "./", "../", "~")) or not bare_is_bucket:
            return os.path.abspath(os.path.expanduser(text))
        text = "gs://" + text.strip("/")
    scheme, _, rest = text.partition("://")
    scheme = scheme.lower()
    shown = root if len(root) <= 80 else root[:77] + "..."
    bucket_rule = _BUCKET_RULES.get(scheme)
    if bucket_rule is not None:
        canonical, pattern, kind = bucket_rule
        bucket = rest.split("/", 1)[0]
        if not pattern.match(bucket) or ".." in bucket:
            raise ConfigError(
                f"storage root {shown!r}: {bucket!r} is not {kind} bucket name" if bucket
                else f"storage root {shown!r} names no bucket",
                hint=f"use {STORAGE_ROOT_FORMS}",
            )
        return f"{canonical}://{rest}".rstrip("/")
    if scheme == "file":
        if not rest.startswith("/") or not rest.strip("/"):
            raise ConfigError(f"storage root {shown!r}: a file:// root needs an absolute path (file:///dir)",
                              hint=f"use {STORAGE_ROOT_FORMS}")
        return f"file://{rest}".rstrip("/")
    if scheme == "memory":
        raise ConfigError(f"storage root {shown!r}: memory:// lives inside one process, and every step is "
                          "a process of its own: what one step writes, the next would never see",
                          hint=f"use {STORAGE_ROOT_FORMS}")
    raise ConfigError(f"storage root {shown!r}: unsupported scheme {scheme + '://' if scheme else '(none)'}",
                      hint=f"use {STORAGE_ROOT_FORMS}")
