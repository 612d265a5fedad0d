"""One MLflow run per pipeline, shared by every step.

- ``mlflow-start`` creates the run (name = job name, tags ``vertexai_run_id`` and
  ``vertexai_job_name``) in the experiment of kedro-mlflow's ``mlflow.yml``;
- each step attaches to it *before* its Kedro session starts: kedro-mlflow then finds an
  active run, logs params, metrics, artifacts and its datasets into it, and (by its own
  design) neither renames nor ends a run that was already active. After the step the run is
  detached without being terminated, so it stays RUNNING between steps;
- the step records ``kvx.last_node`` (and ``kvx.failed_node`` on failure);
- ``mlflow-end`` sets FINISHED / FAILED / KILLED from the pipeline's final status.

Talking to the server goes through kedro-mlflow's own setup (tracking URI, credentials from
``server.credentials``, experiment creation) plus the request header provider configured
in ``vertexai.yml`` (see :mod:`kvx_runtime.auth`). Failures after MLflow's HTTP retries are
:class:`~kvx_runtime.errors.InfrastructureError` (exit 3), unless
``run_config.mlflow.required: false``, which turns them into a warning and an untracked step.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvx_runtime import settings
from kvx_runtime.errors import ConfigError, InfrastructureError, KvxError, UsageError
from kvx_runtime.log import get_logger

if TYPE_CHECKING:
    from kvx_runtime.project import KedroProject

__all__ = [
    "HTTP_DEFAULTS",
    "AttachedRun",
    "RunInStep",
    "attach_step",
    "drop_from_active_runs",
    "earlier_node_seconds",
    "end_pipeline_run",
    "infrastructure_error",
    "mlflow_available",
    "mlflow_enabled",
    "project_context",
    "start_pipeline_run",
    "unread_mlflow_files",
    "without_url_credentials",
]

log = get_logger(__name__)

TAG_RUN_ID = "vertexai_run_id"
TAG_JOB_NAME = "vertexai_job_name"
TAG_LAST_NODE = "kvx.last_node"
TAG_FAILED_NODE = "kvx.failed_node"
TAG_FINAL_STATE = "kvx.final_state"
TAG_ERROR = "kvx.error"
#: A token of the process that creates the run: a retried create finds the run by it.
TAG_CREATE_TOKEN = "kvx.create_token"
#: Each node's seconds, a metric ``kvx.node_seconds.<node>`` of the pipeline's run: what the
#: ``auto`` grouper weighs when it compiles the pipeline again.
NODE_SECONDS_PREFIX = "kvx.node_seconds."
#: The names MLflow accepts as metric keys (a node named otherwise is not recorded).
_METRIC_KEY = re.compile(r"^[\w\-./ :]+$")

#: Vertex AI / KFP final states -> MLflow run statuses.
FINAL_STATES = {
    "SUCCEEDED": "FINISHED",
    "FAILED": "FAILED",
    "CANCELLED": "KILLED",
    "CANCELING": "KILLED",
    "CANCELLING": "KILLED",
    "SKIPPED": "KILLED",
}
#: MLflow's HTTP retry settings for steps: about 30 s of retries, not MLflow's default minutes.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def mlflow_available() -> bool:
    return importlib.util.find_spec("kedro_mlflow") is not None and importlib.util.find_spec("mlflow") is not None


def mlflow_enabled(project: KedroProject) -> bool:
    """kedro-mlflow is installed and the project configures it (an ``mlflow*`` config file)."""
    from kvx_runtime.project import has_config

    if not has_config(project, "mlflow*"):
        return False
    if not mlflow_available():
        log.info("the project has mlflow.yml but kedro-mlflow is not installed: MLflow tracking is off")
        return False
    return True


def unread_mlflow_files(project: KedroProject) -> list[Path]:
    """kedro-mlflow config files in environments the steps do not read (``kedro mlflow init``
    writes ``conf/local/mlflow.yml``, while steps read ``base`` and their own env): with
    only those, tracking is silently off."""
    from kvx_runtime.config.files import conf_files

    read = {project.base_env, project.env}
    return [Path(path) for path in conf_files(project.conf_source, "*/mlflow*") if Path(path).parent.name not in read]


def without_url_credentials(text: str) -> str:
    """Drop credentials embedded in URLs (``https://user:pass@host``) from messages."""
    return _USERINFO.sub("", text)


def infrastructure_error(action: str, uri: str | None, exc: BaseException) -> KvxError:
    from kvx_runtime.auth import unauthenticated_because

    text = without_url_credentials(" ".join(str(exc).split()))[:400]
    where = f" at {without_url_credentials(uri)}" if uri else ""
    if re.search(r"\b401\b|UNAUTHENTICATED|Unauthorized|credentials", text, re.IGNORECASE):
        explained = unauthenticated_because(f"could not {action}: MLflow{where}")
        if explained is not None:
            return explained
        reason = ("the tracking server refused the request as unauthenticated (401): configure "
                  "run_config.mlflow.request_header_provider_params or MLFLOW_TRACKING_* credentials")
    elif re.search(r"\b403\b|PERMISSION_DENIED|Forbidden", text, re.IGNORECASE):
        reason = "the tracking server refused the request (403: permission denied)"
    elif re.search(r"Max retries|Connection refused|ConnectionError|timed out|NameResolution", text):
        reason = "the tracking server is unreachable"
    else:
        reason = text
    return InfrastructureError(f"could not {action}: MLflow{where}: {reason}")


@dataclass
class MlflowConnection:
    """A configured MLflow client for the project's tracking server and experiment."""

    client: Any
    tracking_uri: str
    experiment_id: str
    experiment_name: str
    config: Any  # kedro-mlflow's KedroMlflowConfig


def project_context(project: KedroProject, runtime_params: dict[str, Any] | None) -> Any:
    """A KedroContext (config loader, credentials) without a session: no hooks run."""
    from kedro.framework.context import KedroContext
    from kedro.framework.hooks import _create_hook_manager

    from kvx_runtime.project import make_config_loader

    loader = make_config_loader(project, runtime_params)
    loader.config_patterns.setdefault("mlflow", ["mlflow*", "mlflow*/**", "**/mlflow*"])
    return KedroContext(
        package_name=project.package_name,
        project_path=project.path,
        config_loader=loader,
        hook_manager=_create_hook_manager(),
        env=project.env,
        runtime_params=runtime_params,  # type: ignore[arg-type]  # attrs' converter types it as _T
    )


def connect(project: KedroProject, runtime_params: dict[str, Any] | None = None, *,
            run_known: bool = False) -> MlflowConnection:
    """Set up MLflow for this process as kedro-mlflow would, plus our auth headers.

    ``run_known``: the caller resumes a run it names, whose experiment is the run's, so
    kedro-mlflow's look-up of the configured experiment (three requests, creating it when
    missing) is skipped; the connection's ``experiment_id`` is empty until
    :func:`_adopt_experiment_of`."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    from kedro.config import MissingConfigException
    from kedro_mlflow.config.kedro_mlflow_config import KedroMlflowConfig
    from pydantic import ValidationError

    from kvx_runtime.auth import install_request_header_provider
    from kvx_runtime.log import adopt_library_loggers
    from kvx_runtime.mlflow.concurrent_tags import install_concurrent_tag_retry
    from kvx_runtime.mlflow.secret_guard import install_secret_guard

    adopt_library_loggers()  # importing mlflow installed its own console handler
    install_concurrent_tag_retry()
    install_secret_guard()
    context = project_context(project, runtime_params)
    try:
        raw = context.config_loader["mlflow"]
    except MissingConfigException:
        raw = {}
    except ConfigError:
        raise
    except Exception as exc:  # OmegaConf / YAML errors in the user's file
        text = str(exc).strip().splitlines()
        raise ConfigError(f"mlflow.yml cannot be read: {type(exc).__name__}: "
                          f"{text[0] if text else ''}") from None
    try:
        config = (_config_class_without_experiment_lookup() if run_known else KedroMlflowConfig).model_validate({**raw})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"mlflow.yml: {problems}") from None
    if config.tracking.experiment.name is None:
        config.tracking.experiment.name = project.package_name
    install_request_header_provider(project.plugin_config.run_config.mlflow, context)
    uri = config.server.mlflow_tracking_uri
    _ensure_sqlite_directory(uri)
    try:
        config.setup(context)
    except (KeyError, ConfigError):
        raise
    except Exception as exc:
        raise infrastructure_error("connect", uri, exc) from exc
    experiment = None if run_known else config.tracking.experiment._experiment
    return MlflowConnection(
        client=config.server._mlflow_client,
        tracking_uri=str(config.server.mlflow_tracking_uri),
        experiment_id=str(experiment.experiment_id) if experiment is not None else "",
        experiment_name=str(config.tracking.experiment.name),
        config=config,
    )


@functools.cache
def _config_class_without_experiment_lookup() -> Any:
    from kedro_mlflow.config.kedro_mlflow_config import KedroMlflowConfig

    class ConfigForAKnownRun(KedroMlflowConfig):
        def _set_experiment(self) -> None:
            """The run's experiment is set as the run resumes (:func:`_adopt_experiment_of`)."""

    return ConfigForAKnownRun


def _adopt_experiment_of(run: Any, connection: MlflowConnection) -> None:
    """Make the resumed run's experiment the process's, as ``mlflow.set_experiment`` leaves it
    (the active experiment, and ``MLFLOW_EXPERIMENT_ID`` for subprocesses) without its
    request: MLflow puts the runs a node starts (``start_run(nested=True)``) in the active
    experiment, before any ``MLFLOW_EXPERIMENT_NAME`` of the environment."""
    from mlflow.tracking import fluent

    connection.experiment_id = str(run.info.experiment_id)
    if hasattr(fluent, "_active_experiment_id"):
        setattr(fluent, "_active_experiment_id", connection.experiment_id)  # noqa: B010 (typed None there)
        os.environ["MLFLOW_EXPERIMENT_ID"] = connection.experiment_id
    else:  # pragma: no cover - MLflow internals changed: the public way, one request
        import mlflow

        mlflow.set_experiment(experiment_id=connection.experiment_id)


def _ensure_sqlite_directory(uri: str | None) -> None:
    """An embedded ``sqlite:///`` store needs its directory; SQLite only creates the file."""
    if not uri or not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):])
    if not path.is_absolute():
        path = Path.cwd() / path
    path.parent.mkdir(parents=True, exist_ok=True)


def _call(connection: MlflowConnection, action: str, function: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return function(*args, **kwargs)
    except Exception as exc:
        raise infrastructure_error(action, connection.tracking_uri, exc) from exc


def find_run(connection: MlflowConnection, job_name: str) -> str | None:
    """The newest run of the experiment tagged with this job name."""
    safe = job_name.replace("'", "\\'")
    runs = _call(
        connection, "search MLflow runs", connection.client.search_runs,
        experiment_ids=[connection.experiment_id],
        filter_string=f"tags.{TAG_JOB_NAME} = '{safe}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


#: How many of the experiment's newest runs :func:`earlier_node_seconds` reads.
DURATION_RUNS_READ = 5
#: A compile waits at most this long (per request, no retries) for the durations.
_DURATION_TIMEOUT_SECONDS = "5"


def earlier_node_seconds(project: KedroProject, runs: int = DURATION_RUNS_READ) -> dict[str, float]:
    """node -> seconds in the newest of the experiment's runs that recorded it (each step
    writes ``kvx.node_seconds.<node>`` as it detaches): cloud timings for a compile. Empty,
    with a warning, when MLflow does not answer at once: the compile goes on without them."""
    from kvx_runtime.settings import environment_variable

    try:
        with environment_variable("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"), \
                environment_variable("MLFLOW_HTTP_REQUEST_TIMEOUT", _DURATION_TIMEOUT_SECONDS):
            connection = connect(project)
            found = connection.client.search_runs(
                experiment_ids=[connection.experiment_id], order_by=["attributes.start_time DESC"],
                max_results=runs)
    except Exception as exc:
        log.warning("node durations of earlier runs were not read from MLflow",
                    error=without_url_credentials(str(exc)).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        return {}
    durations: dict[str, float] = {}
    for run in found:
        for key, value in run.data.metrics.items():
            if key.startswith(NODE_SECONDS_PREFIX) and value >= 0:
                durations.setdefault(key[len(NODE_SECONDS_PREFIX):], float(value))
    return durations


@contextmanager
def _no_http_retries() -> Iterator[None]:
    """MLflow retries every method, POST included; a create whose answer was lost would then
    create a second run. Around a create we retry ourselves, looking before creating again."""
    from kvx_runtime.settings import environment_variable

    with environment_variable("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"):
        yield


def _retryable(exc: BaseException) -> bool:
    text = str(exc)
    return bool(re.search(r"Max retries exceeded|Connection (refused|aborted|reset)|RemoteDisconnected|"
                          r"Read timed out|status code (429|5\d\d)|TEMPORARILY_UNAVAILABLE|"
                          r"RESOURCE_EXHAUSTED", text))


def _create_run(connection: MlflowConnection, run_id: str, job_name: str,
                tags: Mapping[str, str] | None = None) -> str:
    """Create the run idempotently: it carries a token of ours, and a retry first looks for a
    run with that token (the server may have created it and lost the answer)."""
    import uuid

    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

    token = uuid.uuid4().hex
    tags = {**(tags or {}), TAG_RUN_ID: run_id, TAG_JOB_NAME: job_name, TAG_CREATE_TOKEN: token}
    client = connection.client

    def attempt() -> str:
        found = client.search_runs(experiment_ids=[connection.experiment_id],
                                   filter_string=f"tags.`{TAG_CREATE_TOKEN}` = '{token}'", max_results=1)
        if found:
            return str(found[0].info.run_id)
        with _no_http_retries():
            run = client.create_run(experiment_id=connection.experiment_id, run_name=job_name, tags=tags)
        return str(run.info.run_id)

    retrying = Retrying(stop=stop_after_attempt(settings.MLFLOW_CREATE_ATTEMPTS.get()),
                        wait=wait_random_exponential(multiplier=0.5, max=10),
                        retry=retry_if_exception(_retryable), reraise=True)
    try:
        return retrying(attempt)
    except Exception as exc:
        raise infrastructure_error("create the MLflow run", connection.tracking_uri, exc) from exc


def start_pipeline_run(
    project: KedroProject, run_id: str, job_name: str, *, tags: Mapping[str, str] | None = None
) -> tuple[str, MlflowConnection]:
    """Create the pipeline's run (with the orchestrator's ``tags``), or return the existing
    one (a retried start step)."""
    connection = connect(project)
    existing = find_run(connection, job_name)
    if existing is not None:
        log.info("MLflow run for this job already exists", mlflow_run_id=existing)
        return existing, connection
    mlflow_run_id = _create_run(connection, run_id, job_name, tags)
    log.info("MLflow run started", mlflow_run_id=mlflow_run_id, experiment=connection.experiment_name,
             tracking_uri=without_url_credentials(connection.tracking_uri))
    return mlflow_run_id, connection


def _resolve_run(connection: MlflowConnection, mlflow_run_id: str | None, job_name: str | None) -> str:
    if mlflow_run_id:
        return mlflow_run_id
    if job_name:
        found = find_run(connection, job_name)
        if found:
            return found
        raise UsageError(f"no MLflow run tagged {TAG_JOB_NAME}={job_name} in experiment "
                         f"'{connection.experiment_name}'",
                         hint="did mlflow-start run for this job?")
    raise UsageError("pass --mlflow-run-id or --job-name")


def parse_final_status(text: str) -> tuple[str, str | None]:
    """(state, error message) from the final status Vertex passes to an exit handler."""
    try:
        status = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--final-status is not JSON: {exc}") from None
    if not isinstance(status, dict) or not isinstance(status.get("state"), str):
        raise UsageError('--final-status must be a JSON object with a "state"')
    error = status.get("error") or {}
    message = error.get("message") if isinstance(error, dict) else str(error)
    return status["state"].upper(), (str(message) if message else None)


def end_pipeline_run(
    project: KedroProject, final_status: str, *, mlflow_run_id: str | None = None, job_name: str | None = None
) -> tuple[str, str]:
    """Terminate the pipeline's run from the final status; returns (run id, MLflow status)."""
    state, message = parse_final_status(final_status)
    status = FINAL_STATES.get(state)
    if status is None:
        log.warning("unknown pipeline state, recording the run as FAILED", state=state)
        status = "FAILED"
    connection = connect(project)
    run_id = _resolve_run(connection, mlflow_run_id, job_name)
    client = connection.client
    _call(connection, "tag the MLflow run", client.set_tag, run_id, TAG_FINAL_STATE, state)
    if message:
        _call(connection, "tag the MLflow run", client.set_tag, run_id, TAG_ERROR, message[:5000])
    _call(connection, "end the MLflow run", client.set_terminated, run_id, status)
    log.info("MLflow run ended", mlflow_run_id=run_id, status=status, state=state)
    return run_id, status


class RunInStep(ABC):
    """The pipeline's run as a step that attached to it writes to it: through MLflow's client
    (:class:`AttachedRun`) or its REST API (:class:`kvx_runtime.mlflow.lean.LeanRun`)."""

    run_id: str
    #: Seconds of the nodes this step ran and the last of them (the run's ``kvx.last_node``),
    #: written together as the step detaches: one request, not one per node.
    node_seconds: dict[str, float]
    last_node: str | None
    #: The run's tags as the step found them (and as it added to them).
    tags: dict[str, str]

    @abstractmethod
    def _log_batch(self, *, metrics: Mapping[str, float] | None = None, tags: Mapping[str, str] | None = None) -> None:
        """Write metrics (now, step 0) and tags in one request."""

    @abstractmethod
    def _set_tag(self, key: str, value: str) -> None:
        """Write one tag."""

    @abstractmethod
    def _leave(self) -> None:
        """Stop being the process's active run, leaving the run as the pipeline has it."""

    def session_hooks(self, *, run_id: str) -> Any:
        """Kedro hooks the step's session registers for this way of writing (None: none);
        ``run_id`` is the pipeline's."""
        return None

    def is_on_top(self) -> bool:
        """Whether the run is the process's active run (MLflow logs there), and not a run an
        earlier node of the step started and left open."""
        import sys

        if "mlflow" not in sys.modules:
            return False
        import mlflow

        active = mlflow.active_run()
        return active is not None and active.info.run_id == self.run_id

    def node_finished(self, node: str, seconds: float) -> None:
        """Record a node's seconds; it is the run's ``kvx.last_node`` once the step detaches."""
        self.node_seconds[node] = seconds
        self.last_node = node

    def _write_finished_nodes(self) -> None:
        """Best effort, like a tag: the durations help a later compile and the tag a reader of
        the run, neither is the step's result. A batch: MLflow retries its tag upserts, where
        a single tag write loses a race with a parallel step (:mod:`.concurrent_tags`)."""
        metrics = {NODE_SECONDS_PREFIX + node: round(seconds, 3) for node, seconds in self.node_seconds.items()
                   if _METRIC_KEY.match(NODE_SECONDS_PREFIX + node)}
        tags = {TAG_LAST_NODE: self.last_node} if self.last_node is not None else {}
        if not (metrics or tags):
            return
        try:
            self._log_batch(metrics=metrics, tags=tags)
        except Exception as exc:
            log.warning("could not record the finished nodes in the MLflow run",
                        error=without_url_credentials(str(exc))[:200])

    def add_missing_tags(self, tags: Mapping[str, str]) -> None:
        """Write those of ``tags`` the run does not carry yet, in one request (none when it
        carries them all): the first steps tag the run, none overwrites (the on-exit step runs
        another pipeline, whose ``kedro_command`` is not the run's). Best effort, like :meth:`tag`."""
        missing = {key: value for key, value in tags.items() if key not in self.tags}
        if not missing:
            return
        try:
            self._log_batch(tags=missing)
        except Exception as exc:
            log.warning("could not tag the MLflow run", tags=sorted(missing),
                        error=without_url_credentials(str(exc))[:200])
            return
        self.tags.update(missing)

    def tag(self, key: str, value: str) -> None:
        """Best effort: a tag that cannot be written is a warning, not a failed node."""
        try:
            self._set_tag(key, value)
        except Exception as exc:
            log.warning("could not tag the MLflow run", tag=key, error=without_url_credentials(str(exc))[:200])

    def detach(self) -> None:
        """Record the finished nodes and leave the run as the pipeline has it (MLflow would
        otherwise end it as FINISHED when the process exits). A step being stopped records
        nothing: the requests (with their retries) could outlast the orchestrator's grace period,
        and the step would be killed before saying it was stopped."""
        from kvx_runtime.lifecycle import stopping

        if stopping():
            log.info("the step is stopping: its finished nodes are not recorded in the MLflow run",
                     nodes=sorted(self.node_seconds))
        else:
            self._write_finished_nodes()
        self._leave()


def drop_from_active_runs(run_id: str) -> bool:
    """Take ``run_id`` off MLflow's active-run stack of this thread without ending it; False
    where MLflow's internals are not as expected."""
    from mlflow.tracking import fluent

    stack_holder = getattr(fluent, "_active_run_stack", None)
    try:
        stack = stack_holder.get() if stack_holder is not None else None
    except Exception:  # pragma: no cover - MLflow internals changed
        stack = None
    if not isinstance(stack, list):
        return False
    stack[:] = [run for run in stack if run.info.run_id != run_id]
    return True


@dataclass
class AttachedRun(RunInStep):
    """The pipeline's run, active in this process while the step runs, written to through
    MLflow's client."""

    connection: MlflowConnection
    run_id: str
    node_seconds: dict[str, float] = field(default_factory=dict)
    last_node: str | None = None
    #: Attaching set the run RUNNING (MLflow's own ``start_run``, where the run could not be
    #: made active as it is): detaching puts back a final status ``mlflow-end`` recorded.
    resumed_as_running: bool = False
    tags: dict[str, str] = field(default_factory=dict)

    def _log_batch(self, *, metrics: Mapping[str, float] | None = None, tags: Mapping[str, str] | None = None) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.connection.client.log_batch(self.run_id,
                                         metrics=[Metric(k, v, now, 0) for k, v in (metrics or {}).items()],
                                         tags=[RunTag(k, v) for k, v in (tags or {}).items()])

    def _set_tag(self, key: str, value: str) -> None:
        self.connection.client.set_tag(self.run_id, key, value)

    def _leave(self) -> None:
        if not drop_from_active_runs(self.run_id):  # pragma: no cover - other MLflow versions
            import mlflow

            mlflow.end_run(status="RUNNING")  # ended as RUNNING: the status is kept
        if self.resumed_as_running:
            self._keep_final_status()

    def _keep_final_status(self) -> None:
        """Attaching resumes the run (RUNNING). If ``mlflow-end`` already ended it (the exit
        pipeline's step may run after it, or a step is replayed later), put back the final
        status it recorded, so the order of the final steps does not matter."""
        client = self.connection.client
        try:
            run = client.get_run(self.run_id)
            state = run.data.tags.get(TAG_FINAL_STATE)
            if state is None or run.info.status != "RUNNING":
                return
            status = FINAL_STATES.get(state, "FAILED")
            client.set_terminated(self.run_id, status)
        except Exception as exc:
            log.warning("could not check the MLflow run's final status", error=without_url_credentials(str(exc))[:200])
            return
        log.info("the pipeline's MLflow run had already ended; its final status is kept",
                 mlflow_run_id=self.run_id, status=status)


def attach_step(
    project: KedroProject,
    runtime_params: dict[str, Any] | None,
    run_id: str,
    job_name: str,
    mlflow_run_id: str | None,
) -> AttachedRun | None:
    """Make the pipeline's run the active MLflow run of this process.

    Returns None when MLflow cannot be reached and ``run_config.mlflow.required`` is false
    (the step then runs untracked).
    """
    required = project.plugin_config.run_config.mlflow.required
    try:
        connection = connect(project, runtime_params, run_known=mlflow_run_id is not None)
        resolved = mlflow_run_id or find_run(connection, job_name)
        if resolved is None:
            log.info("no MLflow run for this job yet: creating it (no mlflow-start step ran)")
            resolved = _create_run(connection, run_id, job_name)
        try:
            resumed, resumed_as_running = _make_active(connection, resolved)
        except Exception as exc:
            raise infrastructure_error(f"resume MLflow run {resolved}", connection.tracking_uri, exc) from exc
        if not connection.experiment_id:
            _adopt_experiment_of(resumed, connection)
    except InfrastructureError as exc:
        if required:
            raise
        log.warning("MLflow is not available; this step runs untracked (run_config.mlflow.required is false)",
                    error=str(exc))
        from kvx_runtime.auth import uninstall_request_header_provider

        uninstall_request_header_provider()
        return None
    log.info("attached to the pipeline's MLflow run", mlflow_run_id=resolved, experiment_id=connection.experiment_id)
    return AttachedRun(connection=connection, run_id=resolved, resumed_as_running=resumed_as_running,
                       tags=dict(resumed.data.tags))


def _make_active(connection: MlflowConnection, run_id: str) -> tuple[Any, bool]:
    """Make ``run_id`` the process's active run as it is: one request (reading it), where
    MLflow's ``start_run(run_id=...)`` takes three (it reads the run, sets it RUNNING, reads it
    again), 50-150 ms each on a remote server, and changes a status that is ``mlflow-end``'s.
    Returns (the active run, whether it was set RUNNING): MLflow's own way where its internals
    are not as expected, or where it would start system metrics monitoring for the run."""
    import mlflow
    from mlflow.tracking import fluent

    stack_holder = getattr(fluent, "_active_run_stack", None)
    active_run = getattr(fluent, "ActiveRun", None)
    metrics_variable = getattr(getattr(mlflow, "environment_variables", None),
                               "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", None)
    if stack_holder is None or active_run is None or metrics_variable is None or metrics_variable.get():
        return mlflow.start_run(run_id=run_id), True
    run = connection.client.get_run(run_id)
    if run.info.lifecycle_stage == "deleted":
        raise mlflow.exceptions.MlflowException(f"run {run_id} is in the deleted state")
    stack = stack_holder.get()
    stack.append(active_run(run))
    return stack[-1], False
