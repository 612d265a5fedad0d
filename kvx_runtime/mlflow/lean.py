"""A step attached to the pipeline's run without importing MLflow.

In a step attached to the pipeline's run (the run is given), kedro-mlflow's hooks do little:
they tag the run with the pipeline's run parameters (:func:`~kvx_runtime.mlflow.kedro_mlflow_rules.
pipeline_run_tags`: the first steps write them, the others nothing) and log each node's
parameters (``params:...`` and ``parameters`` inputs, flattened as ``mlflow.yml`` says, names
made valid, too long ones failed, truncated or tagged by ``long_params_strategy``). Importing
``mlflow`` and kedro-mlflow for that costs a step more than the rest of its start-up; here the
same writes go through MLflow's REST API (:mod:`.rest_client`), with the same secret guard.

A step takes this way only where it cannot tell the difference (:func:`lean_settings`): the
run is given (``--mlflow-run-id``), the tracking server is ``http(s)://`` with no
authentication but MLflow's environment variables and kvx-runtime's request header provider,
none of the step's datasets is kedro-mlflow's, its pipeline is not a kedro-mlflow
``PipelineML``, and nothing imported MLflow already. Otherwise (and with
``KVX_MLFLOW_CLIENT=mlflow``) it attaches through MLflow's client with kedro-mlflow's hooks
(:func:`.pipeline_run.attach_step`).

Node code may still ``import mlflow``: the moment it does, the pipeline's run becomes MLflow's
active run in the process, with the experiment, tracking URI, secret guard and auth of the
other way (:meth:`LeanRun.hand_over_to_mlflow`), and it is kept active before each node as
kedro-mlflow would (a node that left a run of its own open does not take the next node's
logging).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from kvx_runtime import settings
from kvx_runtime.errors import ConfigError, InfrastructureError
from kvx_runtime.log import get_logger, redact
from kvx_runtime.mlflow.pipeline_run import (
    HTTP_DEFAULTS,
    RunInStep,
    drop_from_active_runs,
    infrastructure_error,
    project_context,
    without_url_credentials,
)
from kvx_runtime.mlflow.rest_client import MlflowRestClient, MlflowRestError
from kvx_runtime.mlflow.secret_guard import logged_value, param_kept, tag_kept

if TYPE_CHECKING:
    from kvx_runtime.lazy_imports import AfterImport
    from kvx_runtime.project import KedroProject

__all__ = ["LONG_PARAM_LENGTH", "KedroMlflowsStepWork", "LeanRun", "LeanSettings", "attach_lean",
           "flatten_params", "lean_settings", "sanitized_param_name"]

log = get_logger(__name__)

#: The longest param value MLflow takes (``mlflow.utils.validation.MAX_PARAM_VAL_LENGTH``; a
#: test keeps the two equal).
LONG_PARAM_LENGTH = 6000
#: kvx-runtime's own header provider (``pyproject.toml``): the only one a lean step speaks for.
_OWN_HEADER_PROVIDERS = frozenset({"kvx-runtime", "kvx_runtime"})
_LONG_PARAMS_STRATEGIES = ("fail", "truncate", "tag")
#: kedro-mlflow's rule for a valid MLflow param name (from MLflow's validation), off Windows.
_VALID_PARAM_NAME = re.compile(r"^[/\w.\- :]*$")
_INVALID_PARAM_CHARACTER = re.compile(r"[^/\w.\- :]")


@dataclass(frozen=True)
class LeanSettings:
    """What a lean step reads of kedro-mlflow's ``mlflow.yml``."""

    tracking_uri: str
    #: ``server.mlflow_registry_uri`` (a URI with a scheme), for node code that imports MLflow.
    registry_uri: str | None = None
    #: ``server.credentials``' entry: environment variables the step exports (never shown).
    exported: Mapping[str, str] = field(default_factory=dict, repr=False)
    flatten: bool = False
    recursive: bool = True
    sep: str = "."
    long_params_strategy: str = "fail"
    disabled_pipelines: tuple[str, ...] = ()


def lean_settings(project: KedroProject, runtime_params: dict[str, Any] | None, *, mlflow_run_id: str | None,
                  step_datasets: Iterable[str], pipeline: Any) -> LeanSettings | None:
    """The step's lean settings, or None where it needs MLflow's client (the reason logged)."""
    reason, found = _why_not_lean(project, runtime_params, mlflow_run_id, step_datasets, pipeline)
    if found is None:
        log.debug("the step talks to MLflow through MLflow's client", reason=reason)
    return found


#: MLflow variables asking for what only MLflow's client does (auth plugins, AWS SigV4 signing,
#: workspaces, system metrics): a step with one of them set attaches through it.
_MLFLOWS_OWN = ("MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_AWS_SIGV4", "MLFLOW_WORKSPACE",
                "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")


def _why_not_lean(project: KedroProject, runtime_params: dict[str, Any] | None, mlflow_run_id: str | None,
                  step_datasets: Iterable[str], pipeline: Any) -> tuple[str, LeanSettings | None]:
    if settings.MLFLOW_CLIENT.get() == "mlflow":
        return f"{settings.MLFLOW_CLIENT.name}=mlflow", None
    if not mlflow_run_id:
        return "the run is found by its job name", None
    if "mlflow" in sys.modules or type(pipeline).__module__.startswith("kedro_mlflow"):
        return "MLflow is imported already (the project's code imports it)", None
    context = project_context(project, runtime_params)
    found = _read_mlflow_yml(context)
    if isinstance(found, str):
        return found, None
    # The environment as the step will have it: with mlflow.yml's server.credentials exported.
    environment = {**os.environ, **found.exported}
    own = [name for name in _MLFLOWS_OWN if environment.get(name, "").strip().lower() not in ("", "false", "0")]
    if own:
        return f"MLflow's client is asked for ({', '.join(own)})", None
    if Path("~/.mlflow/credentials").expanduser().is_file():
        return "MLflow's credentials file is there (~/.mlflow/credentials)", None
    others = _other_header_providers()
    if others:
        return f"MLflow request header providers of other packages are installed ({', '.join(others)})", None
    datasets = _kedro_mlflows_datasets(project, runtime_params, step_datasets)
    if datasets:
        return f"the step's datasets include kedro-mlflow's ({', '.join(datasets)})", None
    return "", found


def _read_mlflow_yml(context: Any) -> LeanSettings | str:
    from kedro.config import MissingConfigException

    try:
        raw = context.config_loader["mlflow"] or {}
    except MissingConfigException:
        raw = {}
    except Exception:  # what MLflow's client way reports, with kedro-mlflow's own words
        return "mlflow.yml cannot be read here"
    server, tracking = raw.get("server") or {}, raw.get("tracking") or {}
    if not isinstance(server, Mapping) or not isinstance(tracking, Mapping):
        return "mlflow.yml is not as kedro-mlflow reads it"
    if (server.get("request_header_provider") or {}).get("type"):
        return "mlflow.yml names a request header provider"
    credentials = server.get("credentials")
    exported = _credentials_entry(context, str(credentials)) if credentials else {}
    uri = server.get("mlflow_tracking_uri") or exported.get("MLFLOW_TRACKING_URI") \
        or os.environ.get("MLFLOW_TRACKING_URI") or ""
    parsed = urlparse(str(uri))
    if parsed.scheme not in ("http", "https") or "@" in parsed.netloc:
        return "the tracking URI is not a plain http(s) server"
    registry = server.get("mlflow_registry_uri")
    if registry and not re.match(r"^[a-z][a-z0-9+.-]+:", str(registry)):
        return "mlflow.yml's registry URI is a path (kedro-mlflow makes it the project's)"
    params, disable = tracking.get("params") or {}, tracking.get("disable_tracking") or {}
    dict_params = params.get("dict_params") or {} if isinstance(params, Mapping) else None
    if not (isinstance(params, Mapping) and isinstance(dict_params, Mapping) and isinstance(disable, Mapping)):
        raise ConfigError("mlflow.yml: tracking.params, its dict_params and tracking.disable_tracking are mappings")
    pipelines, strategy = disable.get("pipelines") or [], params.get("long_params_strategy", "fail")
    flatten, recursive = dict_params.get("flatten", False), dict_params.get("recursive", True)
    if not (isinstance(flatten, bool) and isinstance(recursive, bool) and isinstance(pipelines, list)
            and strategy in _LONG_PARAMS_STRATEGIES and isinstance(dict_params.get("sep", "."), str)):
        raise ConfigError("mlflow.yml: tracking.params or tracking.disable_tracking is not as kedro-mlflow takes it",
                          hint="dict_params.flatten/recursive are booleans, long_params_strategy one of "
                               f"{', '.join(_LONG_PARAMS_STRATEGIES)}, disable_tracking.pipelines a list")
    return LeanSettings(tracking_uri=str(uri), registry_uri=str(registry) if registry else None,
                        exported=exported, flatten=flatten, recursive=recursive,
                        sep=str(dict_params.get("sep", ".")), long_params_strategy=str(strategy),
                        disabled_pipelines=tuple(map(str, pipelines)))


def _credentials_entry(context: Any, name: str) -> dict[str, str]:
    """kedro-mlflow's ``server.credentials``: that entry of credentials.yml, exported by the step."""
    entry = context._get_config_credentials().get(name, {})
    return {str(key): str(value) for key, value in (entry or {}).items()}


def _other_header_providers() -> list[str]:
    from importlib.metadata import entry_points

    return sorted({entry.name for entry in entry_points(group="mlflow.request_header_provider")}
                  - _OWN_HEADER_PROVIDERS)


def _kedro_mlflows_datasets(project: KedroProject, runtime_params: dict[str, Any] | None,
                            step_datasets: Iterable[str]) -> list[str]:
    """The step's datasets (and dataset factories, which may match them) of kedro-mlflow's types."""
    from kvx_runtime.mlflow.kedro_mlflow_rules import is_kedro_mlflow_type
    from kvx_runtime.project import catalog_config

    wanted = set(step_datasets)
    found = []
    for name, entry in catalog_config(project, runtime_params).items():
        kind = str(entry.get("type", "")) if isinstance(entry, Mapping) else ""
        if is_kedro_mlflow_type(kind) and (name in wanted or "{" in name):
            found.append(name)
    return sorted(found)


def attach_lean(project: KedroProject, lean: LeanSettings, runtime_params: dict[str, Any] | None,
                mlflow_run_id: str) -> LeanRun | None:
    """Read the pipeline's run (one request) and make it the step's; None when the server does
    not answer and ``run_config.mlflow.required`` is false (the step runs untracked)."""
    from kvx_runtime.auth import install_request_header_provider, uninstall_request_header_provider

    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.update(lean.exported)
    context = project_context(project, runtime_params)
    install_request_header_provider(project.plugin_config.run_config.mlflow, context)
    client = MlflowRestClient(lean.tracking_uri)
    try:
        run = _read_run(client, mlflow_run_id)
    except InfrastructureError as exc:
        if project.plugin_config.run_config.mlflow.required:
            raise
        log.warning("MLflow is not available; this step runs untracked (run_config.mlflow.required is false)",
                    error=str(exc))
        uninstall_request_header_provider()
        return None
    info = run.get("info") or {}
    experiment_id = str(info.get("experiment_id", ""))
    # What kedro-mlflow's setup and the attach would leave for MLflow, were it imported later.
    os.environ["MLFLOW_TRACKING_URI"] = lean.tracking_uri
    if lean.registry_uri:
        os.environ["MLFLOW_REGISTRY_URI"] = lean.registry_uri
    if experiment_id:
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    tags = {str(tag.get("key")): str(tag.get("value", "")) for tag in (run.get("data") or {}).get("tags") or ()}
    attached = LeanRun(client=client, run_id=mlflow_run_id, run=run, settings=lean, tags=tags)
    from kvx_runtime.lazy_imports import after_import

    attached.waiting_for_mlflow = after_import("mlflow", attached.hand_over_to_mlflow)
    log.info("attached to the pipeline's MLflow run", mlflow_run_id=mlflow_run_id, experiment_id=experiment_id,
             client="rest")
    return attached


def _read_run(client: MlflowRestClient, run_id: str) -> dict[str, Any]:
    try:
        run = client.get_run(run_id)
    except MlflowRestError as exc:
        raise infrastructure_error(f"resume MLflow run {run_id}", client.tracking_uri, exc) from exc
    if (run.get("info") or {}).get("lifecycle_stage") == "deleted":
        raise infrastructure_error(f"resume MLflow run {run_id}", client.tracking_uri,
                                    Exception(f"run {run_id} is in the deleted state"))
    return run


@dataclass
class LeanRun(RunInStep):
    """The pipeline's run, written to over MLflow's REST API."""

    client: MlflowRestClient
    run_id: str
    #: The run as the step found it (``runs/get``), for MLflow's active-run stack.
    run: dict[str, Any]
    settings: LeanSettings
    tags: dict[str, str] = field(default_factory=dict)
    node_seconds: dict[str, float] = field(default_factory=dict)
    last_node: str | None = None
    waiting_for_mlflow: AfterImport | None = None
    #: MLflow's ``ActiveRun`` of the run, once node code imported MLflow.
    _active: Any = None
    #: MLflow's own default of a thread's active-run stack, while the run is every thread's default.
    _stack_factory: Any = None

    def _log_batch(self, *, metrics: Mapping[str, float] | None = None, tags: Mapping[str, str] | None = None,
                   params: Mapping[str, str] | None = None) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[{"key": k, "value": v, "timestamp": now, "step": 0} for k, v in (metrics or {}).items()],
            params=[{"key": k, "value": v} for k, v in (params or {}).items()],
            tags=[{"key": k, "value": logged_value(v)} for k, v in (tags or {}).items()])

    def _set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, logged_value(value))

    def session_hooks(self, *, run_id: str) -> Any:
        return KedroMlflowsStepWork(self, run_id=run_id)

    def log_node_params(self, params: Mapping[str, Any]) -> None:
        """A node's params as kedro-mlflow logs them (:meth:`KedroMlflowsStepWork.before_node_run`),
        through the secret guard, in one request."""
        logged: dict[str, str] = {}
        tagged: dict[str, str] = {}
        for name, value in params.items():
            text = str(value)
            if len(text) <= LONG_PARAM_LENGTH:
                if param_kept(name):
                    _add_param(logged, name, logged_value(value), self.run_id)
            elif self.settings.long_params_strategy == "fail":
                raise ValueError(
                    f"Parameter '{name}' length is {len(text)}, while mlflow forces it to be lower than "
                    f"'{LONG_PARAM_LENGTH}'. If you want to bypass it, try to change 'long_params_strategy' to "
                    "'tag' or 'truncate' in the 'mlflow.yml'configuration file.")
            elif self.settings.long_params_strategy == "tag":
                log.warning(f"Parameter '{name}' (value length {len(text)}) is set as a tag.")
                if tag_kept(name):
                    tagged[name] = logged_value(value)
            else:
                log.warning(f"Parameter '{name}' (value length {len(text)}) is truncated to its "
                            f"{LONG_PARAM_LENGTH} first characters.")
                if param_kept(name):
                    _add_param(logged, name, logged_value(text[:LONG_PARAM_LENGTH]), self.run_id)
        if logged or tagged:
            self._log_batch(params=logged, tags=tagged)

    # -- MLflow imported by the step's code ----------------------------------------------------

    def hand_over_to_mlflow(self, module: Any) -> None:
        """``import mlflow`` in the step (in any thread): the run becomes MLflow's active run, as
        the other way attaches it (auth, secret guard, experiment), in this thread and in every
        thread that has no run yet (the step's own, where a library imported MLflow in a thread
        of its own). Where that fails, ``MLFLOW_RUN_ID`` leads MLflow's fluent API to the run
        (resuming it: detaching still takes it off the active runs)."""
        try:
            from kvx_runtime.log import adopt_library_loggers
            from kvx_runtime.mlflow.concurrent_tags import install_concurrent_tag_retry
            from kvx_runtime.mlflow.secret_guard import install_secret_guard

            adopt_library_loggers()
            install_concurrent_tag_retry()
            install_secret_guard()
            from mlflow.tracking import fluent

            self._active = _active_run_of(self.run)
            stacks = fluent._active_run_stack
            self._stack_factory = stacks.default_factory
            stacks.default_factory = lambda: [self._active]  # threads with no stack yet start with the run
            self.keep_on_top()
            if hasattr(fluent, "_active_experiment_id"):
                setattr(fluent, "_active_experiment_id", str(self.run["info"]["experiment_id"]))  # noqa: B010
        except Exception as exc:  # pragma: no cover - MLflow internals changed
            os.environ["MLFLOW_RUN_ID"] = self.run_id
            log.warning("the step's code imported MLflow, and the pipeline's run could not be made its active run: "
                        "MLFLOW_RUN_ID names it instead (MLflow resumes it at its first use)",
                        error=without_url_credentials(str(exc))[:200])
            self._active = None

    def keep_on_top(self) -> None:
        """After ``import mlflow``: the run is the process's active one before each node (the
        top of MLflow's stack), where a node left a run of its own open, as kedro-mlflow's
        per-node ``start_run(nested=True)`` would have it."""
        if self._active is None or self.is_on_top():
            return
        from mlflow.tracking import fluent

        stack_holder = getattr(fluent, "_active_run_stack", None)
        if stack_holder is not None:
            stack_holder.get().append(self._active)

    def _leave(self) -> None:
        if self.waiting_for_mlflow is not None:
            self.waiting_for_mlflow.cancel()
        if "mlflow" in sys.modules:
            if self._stack_factory is not None:
                from mlflow.tracking import fluent

                fluent._active_run_stack.default_factory = self._stack_factory
            drop_from_active_runs(self.run_id)


def _add_param(logged: dict[str, str], name: str, value: str, run_id: str) -> None:
    """One value per param and run, as MLflow keeps it (a batch may not name a key twice)."""
    if name in logged and logged[name] != value:
        raise MlflowRestError(f"INVALID_PARAMETER_VALUE: Changing param values is not allowed. Param with "
                              f"key='{name}' was already logged with value='{logged[name]}' for run ID='{run_id}'. "
                              f"Attempted logging new value '{value}'.", status=400,
                              error_code="INVALID_PARAMETER_VALUE")
    logged[name] = value


def _active_run_of(run: Mapping[str, Any]) -> Any:
    """MLflow's ``ActiveRun`` of a run read over REST (JSON as the API returns it)."""
    from google.protobuf.json_format import ParseDict
    from mlflow.entities import Run
    from mlflow.protos.service_pb2 import Run as RunProto
    from mlflow.tracking.fluent import ActiveRun

    return ActiveRun(Run.from_proto(ParseDict(dict(run), RunProto(), ignore_unknown_fields=True)))


def flatten_params(params: Mapping[str, Any], *, recursive: bool = True, sep: str = ".") -> dict[str, Any]:
    """kedro-mlflow's ``dict_params.flatten`` (``_flatten_dict``; a test keeps the two equal)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            inner = flatten_params(value, recursive=recursive, sep=sep) if recursive else value
            flat.update({f"{key}{sep}{k}": v for k, v in inner.items()})
        else:
            flat[f"{key}"] = value
    return flat


def sanitized_param_name(name: str) -> str:
    """kedro-mlflow's ``sanitize_param_name``: characters MLflow refuses become ``_``."""
    if _VALID_PARAM_NAME.match(name):
        return name
    sanitized = _INVALID_PARAM_CHARACTER.sub("_", name)
    log.warning(f"'{name}' is not a valid name for a mlflow paramter. It is renamed as '{sanitized}'")
    return sanitized


class KedroMlflowsStepWork:
    """kedro-mlflow's hooks' work in a step attached to the pipeline's run, done over REST:
    registered on the step's session in place of kedro-mlflow's hooks."""

    def __init__(self, attached: LeanRun, *, run_id: str) -> None:
        from kedro.framework.hooks import hook_impl

        self.attached = attached
        self.run_id = run_id
        self.enabled = True
        hook_impl(KedroMlflowsStepWork.before_pipeline_run)
        hook_impl(KedroMlflowsStepWork.before_node_run)

    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        from kvx_runtime.mlflow.kedro_mlflow_rules import pipeline_run_tags, run_pipeline_names

        names = run_pipeline_names(run_params)
        self.enabled = not all(name in self.attached.settings.disabled_pipelines for name in names)
        if not self.enabled:
            log.info("kedro-mlflow logging is deactivated for this pipeline in the configuration. "
                     "This includes DataSets and parameters.")
            return
        tags = {str(key): redact(str(value)) for key, value in run_params.items() if value}
        tags["kedro_command"] = ""  # replaced by the pipeline's own
        self.attached.add_missing_tags(pipeline_run_tags(tags, run_params, self.run_id))

    def before_node_run(self, inputs: dict[str, Any]) -> None:
        self.attached.keep_on_top()
        if not self.enabled:
            return
        params = {name[len("params:"):]: value for name, value in inputs.items() if name.startswith("params:")}
        if "parameters" in inputs:
            params["parameters"] = inputs["parameters"]
        lean = self.attached.settings
        if lean.flatten:
            params = flatten_params(params, recursive=lean.recursive, sep=lean.sep)
        self.attached.log_node_params({sanitized_param_name(name): value for name, value in params.items()})
