"""The schema of ``vertexai.yml`` (and of a kedro-kubeflow project's ``kubeflow.yml``): typed
sections, their defaults and the rules of single values (cpu and memory amounts, durations,
Kubernetes names).

The sections follow the kedro-vertexai family (seed 003, section 2.2) so that existing
``vertexai.yml`` files work unchanged. How a whole file is checked against them (key paths,
leniency for keys a command does not need, unknown keys) is :mod:`kvx_runtime.config.validation`.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "DynamicConfigProviderSpec",
    "GroupingConfig",
    "HostAlias",
    "KubernetesConfig",
    "MLflowConfig",
    "NetworkConfig",
    "PluginConfig",
    "ResourceSpec",
    "RetrySpec",
    "RunConfig",
    "S3Config",
    "ScheduleConfig",
    "SecretAsEnv",
    "canonical_duration",
    "is_kubernetes_name",
    "is_kubernetes_namespace",
]

_CPU = re.compile(r"^\d+(\.\d+)?m?$")
#: Kubernetes quantities: decimal k, M, G... (a lowercase k) and binary Ki, Mi, Gi...
_MEMORY = re.compile(r"^\d+(\.\d+)?(E|P|T|G|M|k|Ei|Pi|Ti|Gi|Mi|Ki)?$")
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
            kilo = " (Kubernetes writes kilobytes k, kibibytes Ki)" if text.endswith("K") else ""
            raise ValueError(f"{value!r} is not a memory amount{kilo} (examples: '512Mi', '4Gi', '2G')")
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


class CacheConfig(_Section):
    """``run_config.cache``: the step cache (docs/cache.md). Off unless enabled here or asked
    for per run (``--cache on``)."""

    enabled: bool = False
    #: Any text: changing it makes every step miss once (a manual bust).
    salt: str = ""
    #: Nodes with this tag never hit.
    no_cache_tag: str = "no-cache"
    #: Plan an unchanged project without importing its pipelines' code (the pipeline memo,
    #: :mod:`kvx_runtime.cache.pipeline_memo`): off for a registry that builds pipelines from
    #: anything but the project's files and environment variables.
    remember_pipelines: bool = True


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


def checked_secret_name(value: str) -> str:
    """A config's Kubernetes secret name, refused (ValueError, for a validator) unless valid."""
    if not is_kubernetes_name(value):
        raise ValueError(f"{value!r} is not a Kubernetes secret name")
    return value


def checked_namespace(value: str | None) -> str | None:
    """A config's namespace key, refused (ValueError, for a validator) unless a namespace name."""
    if value is not None and not is_kubernetes_namespace(value):
        raise ValueError(f"{value!r} is not a Kubernetes namespace name (lowercase letters, digits, '-')")
    return value


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
        return checked_secret_name(value)

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
    cache: CacheConfig = Field(default_factory=CacheConfig)
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
    #: Kubeflow Pipelines: display name of run-once runs (kedro-kubeflow's key).
    run_name: str | None = None
    #: Kubeflow Pipelines: run-once waits for the run to end unless --no-wait (kedro-kubeflow's key).
    wait_for_completion: bool = False

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        return checked_namespace(value)


class PluginConfig(_Section):
    """The whole ``vertexai.yml`` (or a kedro-kubeflow project's ``kubeflow.yml``)."""

    project_id: str | None = None
    region: str | None = None
    #: Kubeflow Pipelines: the API's base URL, e.g. https://kubeflow.example.com/pipeline.
    host: str | None = None
    run_config: RunConfig = Field(default_factory=RunConfig)
