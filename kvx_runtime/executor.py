"""``exec-node``: one pipeline step, i.e. one Kedro node (or a group of nodes), in one process.

In order (the step contract in docs/exec-node.md):

1. open the Kedro project, read ``vertexai.yml`` (only what a step needs is strict);
   type the ``--param`` values from the project's Kedro parameters (a value that does not fit
   its parameter is a usage error, exit 2);
2. resolve run id and job name and export them as ``KEDRO_CONFIG_RUN_ID`` / ``_JOB_NAME``;
3. materialize dynamic config providers;
4. install the templating config loader;
5. plan the step: which datasets cross its boundary and are not in the catalog;
6. run the node(s) with Kedro's session, runner and hooks; the crossing datasets are
   :class:`~kvx_runtime.storage.dataset.BlobDataset` s injected when the catalog is created.
"""

from __future__ import annotations

import difflib
import os
import re
import secrets
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvx_runtime.config import STEP_KEYS, resolve_storage_root
from kvx_runtime.config_loader import env_var_name
from kvx_runtime.errors import (
    CatalogDataError,
    ConfigError,
    InfrastructureError,
    KvxError,
    NodeError,
    UsageError,
    exception_chain,
    find_kvx_error,
)
from kvx_runtime.graph import StepPlan, dataset_identity, plan_step
from kvx_runtime.log import bind_step_context, get_logger
from kvx_runtime.orchestrator import unique_job_name
from kvx_runtime.settings import MLFLOW_RUN_ID
from kvx_runtime.versions import SAVE_VERSION_PARAMETER, resolve_save_version

__all__ = ["StepRequest", "StepResult", "execute_step", "is_declared"]

log = get_logger(__name__)

@dataclass
class StepRequest:
    """Everything ``exec-node`` was asked to do (flags already merged with the environment)."""

    nodes: Sequence[str]
    project_path: str | Path | None = None
    env: str | None = None
    pipeline: str = "__default__"
    run_id: str | None = None
    job_name: str | None = None
    storage_root: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    raw_params: Sequence[str] = ()
    mlflow_run_id: str | None = None
    #: The pipeline run's save version (Kedro format or an RFC 3339 time), see kvx_runtime.versions.
    save_version: str | None = None
    #: The job's creation time as the orchestrator filled it in: the save version without one.
    job_create_time: str | None = None
    #: Explicit load versions (dataset -> Kedro version); they win over the run's version.
    load_versions: dict[str, str] = field(default_factory=dict)
    #: A code archive to run instead of the image's code: ``<uri>#sha256=<digest>``.
    code: str | None = None


@dataclass
class StepResult:
    run_id: str
    job_name: str
    nodes: tuple[str, ...]
    stored: tuple[str, ...]
    loaded: tuple[str, ...]
    seconds: float


def _local_run_id() -> str:
    return time.strftime("local-%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def is_declared(catalog: Any, name: str) -> bool:
    """Does the catalog keep ``name`` somewhere that survives the step?

    Explicit entries and dataset factory patterns count; a (Shared)MemoryDataset does not,
    since memory does not cross containers; Kedro's default runtime pattern does not either.
    """
    dataset_type = catalog.get_type(name)
    if dataset_type is None:
        return False
    return not dataset_type.rsplit(".", 1)[-1].endswith("MemoryDataset")


class _StepHooks:
    """Kedro hooks registered on the step's session: blob injection and node logging."""

    def __init__(
        self,
        plan: StepPlan,
        storage_root: str | None,
        job_name: str,
        tracking: Any = None,
        save_version: str | None = None,
    ) -> None:
        self.plan = plan
        self.tracking = tracking
        self.storage_root = storage_root
        self.job_name = job_name
        self.save_version = save_version
        self.stored: list[str] = []
        self.loaded: list[str] = []
        self.pipeline_started = False
        self.failed_node: str | None = None
        self.node_error: BaseException | None = None
        #: The catalog operation under way: ("load" | "save", dataset name), else None.
        self.dataset_operation: tuple[str, str] | None = None
        self.catalog: Any = None
        self._started: dict[str, float] = {}
        from kedro.framework.hooks import hook_impl

        # pluggy discovers hook implementations through this marker.
        for name in (
            "after_catalog_created",
            "before_pipeline_run",
            "before_node_run",
            "after_node_run",
            "on_node_error",
            "before_dataset_loaded",
            "after_dataset_loaded",
            "before_dataset_saved",
            "after_dataset_saved",
        ):
            hook_impl(getattr(self, name).__func__)

    def before_dataset_loaded(self, dataset_name: str) -> None:
        self.dataset_operation = ("load", dataset_name)

    def after_dataset_loaded(self) -> None:
        self.dataset_operation = None

    def before_dataset_saved(self, dataset_name: str) -> None:
        self.dataset_operation = ("save", dataset_name)
        if self.save_version and self.catalog is not None:
            from kvx_runtime.versions import remove_earlier_attempt

            remove_earlier_attempt(self.catalog.get(dataset_name), dataset_name, self.save_version)

    def after_dataset_saved(self) -> None:
        self.dataset_operation = None

    def _store(self) -> Any:
        from kvx_runtime.storage.store import BlobStore

        if not self.storage_root:
            raise ConfigError(
                "this step exchanges intermediate data "
                f"({', '.join(self.plan.inputs + self.plan.crossing_outputs)}) but no storage "
                "root is set",
                hint="pass --storage-root or set run_config.root in vertexai.yml",
            )
        return BlobStore(self.storage_root, self.job_name)

    def _blob(self, name: str, store: Any) -> Any:
        from kvx_runtime.storage.dataset import BlobDataset

        # One blob per dataset: `x@spark` saved and `x@pandas` loaded are both the blob `x`.
        identity = dataset_identity(name)
        return BlobDataset(identity, store, producer=self.plan.producers.get(identity))

    def _mute_mlflow_datasets(self, catalog: Any) -> None:
        """Untracked step (MLflow unreachable with ``required: false``, or not configured):
        kedro-mlflow's datasets still save their local files but log nothing (kedro-mlflow's
        own switch), instead of failing for want of a run."""
        import importlib.util

        if importlib.util.find_spec("kedro_mlflow") is None:
            return
        names = [name for name in catalog.keys()  # noqa: SIM118 (a catalog, not a dict)
                 if str(catalog.get_type(name) or "").rsplit(".", 1)[-1].startswith("Mlflow")]
        if not names:
            return
        from kedro_mlflow.io.catalog.switch_catalog_logging import switch_catalog_logging

        switch_catalog_logging(catalog, False)
        log.warning("this step is not tracked: kedro-mlflow datasets log nothing to MLflow", datasets=names)

    def after_catalog_created(self, catalog: Any) -> None:
        self.catalog = catalog
        if self.tracking is None:
            self._mute_mlflow_datasets(catalog)
        store = None
        for name in self.plan.inputs:
            if is_declared(catalog, name):
                continue
            store = store or self._store()
            catalog[name] = self._blob(name, store)
            self.loaded.append(name)
        for name in self.plan.crossing_outputs:
            if is_declared(catalog, name):
                continue
            store = store or self._store()
            dataset: Any = self._blob(name, store)
            if name in self.plan.shared_outputs:
                from kedro.io import CachedDataset

                dataset = CachedDataset(dataset=dataset)
            catalog[name] = dataset
            self.stored.append(name)
        dropped = [name for name in self.plan.final_outputs if not is_declared(catalog, name)]
        if dropped:
            log.warning(
                "outputs that no node consumes and the catalog does not define are not stored",
                datasets=dropped,
                hint="declare them in catalog.yml to keep them",
            )
        log.info(
            "step plan",
            blob_inputs=self.loaded,
            blob_outputs=self.stored,
            storage_root=self.storage_root if (self.loaded or self.stored) else None,
        )

    def before_pipeline_run(self) -> None:
        self.pipeline_started = True

    def before_node_run(self, node: Any) -> None:
        bind_step_context(node=node.name)
        self._started[node.name] = time.perf_counter()
        log.info("node started", func=getattr(node, "func_name", None) or node._func_name)

    def after_node_run(self, node: Any) -> None:
        seconds = time.perf_counter() - self._started.get(node.name, time.perf_counter())
        log.info("node finished", seconds=round(seconds, 3))
        if self.tracking is not None:
            from kvx_runtime.mlflow import TAG_LAST_NODE

            self.tracking.tag(TAG_LAST_NODE, node.name)

    def on_node_error(self, error: BaseException, node: Any) -> None:
        self.failed_node = node.name
        self.node_error = error
        if self.tracking is not None:
            from kvx_runtime.mlflow import TAG_FAILED_NODE

            self.tracking.tag(TAG_FAILED_NODE, node.name)
        if find_kvx_error(error) is None:
            # The one place the user's traceback is printed.
            log.error(
                "node raised an exception",
                error=f"{type(error).__name__}: {error}",
                exc_info=(type(error), error, error.__traceback__),
            )


def replay_command(
    request: StepRequest,
    run_id: str,
    job_name: str,
    env: str,
    root: str | None,
    save_version: str | None = None,
) -> str:
    """A one-line command that re-runs this step elsewhere against the same storage root."""
    argv = ["kvx-runtime", "exec-node"]
    for name in request.nodes:
        argv += ["--node", name]
    if request.pipeline != "__default__":
        argv += ["--pipeline", request.pipeline]
    argv += ["--env", env, "--run-id", run_id, "--job-name", job_name]
    if root:
        argv += ["--storage-root", root]
    if save_version:
        argv += ["--save-version", save_version]
    for dataset, version in sorted(request.load_versions.items()):
        argv += ["--load-version", f"{dataset}={version}"]
    if request.code:
        argv += ["--code", request.code]
    for item in request.raw_params:
        argv += ["--param", item]
    return shlex.join(argv)


def _check_runs_without_save_version(project: Any, request: StepRequest, plan: StepPlan, why: str) -> None:
    """Without a run version, a versioned dataset passed between steps would be read as
    "latest", possibly another run's: refuse such a step; others run as `kedro run` would."""
    from kvx_runtime.project import catalog_config
    from kvx_runtime.versions import versioned_names

    between_steps = [name for name in plan.inputs if plan.produced_in_pipeline(name)] + list(plan.crossing_outputs)
    shared = versioned_names(catalog_config(project, request.params), between_steps) if between_steps else []
    if shared:
        raise UsageError(
            f"{why}, and this step passes versioned datasets to or from other steps ({', '.join(shared)}): "
            "without one version for the run it could read another run's",
            hint=f"set run_config.root (the job directory then records the run's version), the pipeline "
            f"parameter {SAVE_VERSION_PARAMETER} (`kvx-runtime kfp run-once` does), or pass --save-version",
        )
    log.warning("no run version for versioned datasets: this step's saves get their own version", reason=why)


def _load_versions(project: Any, request: StepRequest, plan: StepPlan, save_version: str | None) -> dict[str, str]:
    """Versions to load: inputs saved earlier in this run at the run's version, and the
    explicit ones (which win)."""
    produced = [name for name in plan.inputs if plan.produced_in_pipeline(name)]
    if not save_version or not produced:
        return dict(request.load_versions)
    from kvx_runtime.project import catalog_config
    from kvx_runtime.versions import run_load_versions

    try:
        config = catalog_config(project, request.params)
    except KvxError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"the catalog configuration cannot be read: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    versions = run_load_versions(config, produced, save_version, request.load_versions)
    if versions:
        log.info("versioned inputs load this run's version", load_versions=versions)
    return versions


def _exit_pipeline_inputs(project: Any, pipeline_name: str) -> set[str]:
    """What the exit handler's pipeline reads, for the steps of the main pipeline to store."""
    from kvx_runtime.project import load_pipeline

    exit_pipeline = project.plugin_config.run_config.on_exit_pipeline
    if not exit_pipeline or exit_pipeline == pipeline_name:
        return set()
    try:
        return set(load_pipeline(exit_pipeline).inputs())
    except KeyError:  # `compile` refuses this config; a step has nothing to add
        return set()


def _load_step_pipeline(name: str) -> Any:
    """The step's pipeline, loaded exactly as the session will load it to run the node(s)."""
    from kvx_runtime.project import load_pipeline, registered_pipeline_names

    try:
        return load_pipeline(name)
    except KeyError:
        known = registered_pipeline_names()
        close = difflib.get_close_matches(name, known, n=3)
        raise UsageError(
            f"no pipeline named '{name}'"
            + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""),
            hint=f"registered pipelines: {', '.join(known) or 'none'}",
        ) from None
    except Exception as exc:
        raise ConfigError(
            f"the project's pipelines cannot be loaded: {type(exc).__name__}: {exc}"
        ) from exc


def _kedro_parameters(project: Any, runtime_params: dict[str, Any]) -> dict[str, Any]:
    """The project's Kedro parameters for its env, without the runtime params merged in (as
    the session's config loader reads them; no session, no hooks, no validation)."""
    from kedro.config import MissingConfigException

    from kvx_runtime.project import make_config_loader

    def read(runtime: dict[str, Any] | None) -> dict[str, Any]:
        try:
            return dict(make_config_loader(project, runtime)["parameters"] or {})
        except MissingConfigException:
            return {}

    try:
        return read(None)
    except KvxError:
        raise
    except Exception:
        pass
    try:
        # `${runtime_params:x}` without a default needs the values: the check then sees them
        # merged in, i.e. checks less for those keys.
        return read(runtime_params)
    except KvxError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"the project's parameters (env {project.env}) cannot be read: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc


def _typed_params(project: Any, request: StepRequest) -> dict[str, Any]:
    """``--param`` values typed from the project's Kedro values (kvx_runtime.params.typed_params):
    a mapping replaced by a scalar, a dotted key through a scalar, a value that is not of its
    parameter's kind are usage errors here, not the node's TypeError later."""
    if not request.raw_params and not request.params:
        return request.params
    from kvx_runtime.params import check_shapes, typed_params

    kedro_params = _kedro_parameters(project, request.params)
    if not request.raw_params:  # built by a caller, already typed: the shapes are checked
        check_shapes(request.params, kedro_params)
        return request.params
    return typed_params(request.raw_params, kedro_params)


def _keep_secret_params_secret(request: StepRequest) -> None:
    """Parameters named like secrets (``--param api_key=...``): their values are redacted from
    every log line and kept out of MLflow (kvx_runtime.mlflow.secret_guard); said once."""
    from kvx_runtime.log import register_secrets
    from kvx_runtime.params import SECRET_HINT, secret_params_given

    found = secret_params_given(request.params, request.raw_params)
    if not found:
        return
    register_secrets(value for values in found.values() for value in values)
    log.warning("parameters named like secrets are redacted from the logs and not logged to MLflow",
                parameters=sorted(found),
                hint=SECRET_HINT)


def execute_step(request: StepRequest) -> StepResult:
    """Run one step. Raises :class:`KvxError` subclasses carrying the exit code."""
    started = time.perf_counter()
    if not request.nodes:
        raise UsageError("no node given", hint="pass --node NAME (repeat it for a group)")

    save_version, no_version = resolve_save_version(request.save_version, request.job_create_time)
    run_id = request.run_id or os.environ.get(env_var_name("run_id")) or _local_run_id()
    job_name = unique_job_name(request.job_name or os.environ.get(env_var_name("job_name")) or run_id, run_id)
    # The config loader and the user's own code read these; flags win over the environment.
    os.environ[env_var_name("run_id")] = run_id
    os.environ[env_var_name("job_name")] = job_name
    if request.mlflow_run_id:
        os.environ[MLFLOW_RUN_ID.name] = request.mlflow_run_id
    step_label = request.nodes[0] if len(request.nodes) == 1 else "+".join(request.nodes)
    bind_step_context(node=step_label, run_id=run_id, job_name=job_name)
    _keep_secret_params_secret(request)

    from kvx_runtime.project import disable_plugin_hooks, open_project

    code_dir = None
    if request.code:
        from kvx_runtime.code_upload import fetch_code

        code_dir, manifest = fetch_code(request.code)
    # Installs the templating config loader too; Kedro instantiates it only in the session,
    # i.e. after the dynamic config below is written.
    project = open_project(request.project_path, request.env, needed=STEP_KEYS, code_dir=code_dir)
    if code_dir is not None:
        from kvx_runtime.code_upload import check_drift

        check_drift(manifest, project)
    # Before anything is written or contacted: a --param that does not fit is the caller's error.
    request = replace(request, params=_typed_params(project, request))

    from kvx_runtime.dynamic_config import materialize_dynamic_config

    if materialize_dynamic_config(project.plugin_config, project.conf_root, project.env):
        from kvx_runtime.project import register_credentials

        register_credentials(project)  # what the files now hold, merged

    from kedro.framework.project import settings

    # Only a step that exchanges intermediates needs one (the step hooks say so when it does).
    storage_root = resolve_storage_root(request.storage_root, project.plugin_config.run_config.root, required=False)

    if no_version and storage_root is not None:
        from kvx_runtime.storage.store import BlobStore
        from kvx_runtime.versions import recorded_save_version

        log.info("no run version from the orchestrator: using the one recorded in the job directory",
                 reason=no_version)
        save_version, no_version = recorded_save_version(BlobStore(storage_root, job_name), run_id), None

    exit_inputs = _exit_pipeline_inputs(project, request.pipeline)
    pipeline = _load_step_pipeline(request.pipeline)
    plan = plan_step(pipeline, request.pipeline, request.nodes, exit_inputs)

    from kvx_runtime.mlflow import mlflow_enabled

    tracking = None
    if mlflow_enabled(project):
        from kvx_runtime.mlflow import attach_step

        # Before the session: kedro-mlflow then finds the pipeline's run already active and
        # logs into it instead of starting (and ending) a run of its own.
        tracking = attach_step(project, request.params, run_id, job_name, request.mlflow_run_id)
    if tracking is None:
        # Without an mlflow.yml (or with MLflow unreachable and not required) kedro-mlflow
        # would start a run of its own, or fail.
        disable_plugin_hooks(settings, ("kedro-mlflow", "kedro_mlflow"))

    if no_version:
        _check_runs_without_save_version(project, request, plan, no_version)
    load_versions = _load_versions(project, request, plan, save_version)
    hooks = _StepHooks(plan, storage_root, job_name, tracking, save_version)
    log.info(
        "step starting",
        nodes=list(plan.nodes),
        pipeline=request.pipeline,
        env=project.env,
        project=str(project.path),
        save_version=save_version,
    )
    try:
        _run_session(project, request, plan, hooks, settings, save_version, load_versions)
    except KvxError:
        raise
    except Exception as exc:
        replay = replay_command(request, run_id, job_name, project.env, storage_root, save_version)
        raise _step_error(exc, hooks, replay) from exc
    finally:
        if tracking is not None:
            tracking.detach()

    seconds = time.perf_counter() - started
    log.info("step finished", seconds=round(seconds, 3), stored=hooks.stored, loaded=hooks.loaded)
    return StepResult(
        run_id=run_id,
        job_name=job_name,
        nodes=plan.nodes,
        stored=tuple(hooks.stored),
        loaded=tuple(hooks.loaded),
        seconds=seconds,
    )


def _pin_save_version(session: Any, save_version: str) -> None:
    """Make ``session.run`` save versioned datasets with the pipeline run's version.

    Kedro saves with the session id; a session has no public way to set it, so the id in
    its store is replaced (checked by the end-to-end tests on every supported Kedro)."""
    store = getattr(session, "_store", None)
    if store is None or "session_id" not in store:
        raise ConfigError(
            "this Kedro version's session cannot take the pipeline run's save version",
            hint="versioned datasets need kvx-runtime's supported Kedro versions (see the README)",
        )
    store["session_id"] = save_version
    session.session_id = save_version


def _run_session(
    project: Any,
    request: StepRequest,
    plan: StepPlan,
    hooks: _StepHooks,
    settings: Any,
    save_version: str | None,
    load_versions: dict[str, str],
) -> None:
    from kedro.framework.session import KedroSession
    from kedro.runner import SequentialRunner

    from kvx_runtime.project import entry_points_of_disabled_plugins_not_loaded

    with entry_points_of_disabled_plugins_not_loaded(settings):
        session = KedroSession.create(
            project.path, env=project.env, runtime_params=request.params or None,
            conf_source=project.conf_source,
        )
    if save_version:
        _pin_save_version(session, save_version)
    with session:
        session._hook_manager.register(hooks, name="kvx-runtime-step")
        session.run(
            **_pipeline_argument(session, request.pipeline),
            node_names=list(plan.nodes),
            runner=SequentialRunner(),
            load_versions=load_versions or None,
        )


def _pipeline_argument(session: Any, pipeline: str) -> dict[str, Any]:
    """``pipeline_names=[...]`` (Kedro >= 1.x, where ``pipeline_name`` is deprecated) or
    ``pipeline_name=...`` (Kedro 1.0)."""
    import inspect

    if "pipeline_names" in inspect.signature(session.run).parameters:
        return {"pipeline_names": [pipeline]}
    return {"pipeline_name": pipeline}


def _step_error(exc: Exception, hooks: _StepHooks, replay: str) -> KvxError:
    """Classify what came out of Kedro: our own error, a setup problem, a catalog dataset
    that could not be read or written, or the user's node (table in docs/exec-node.md)."""
    ours = find_kvx_error(exc)
    if ours is not None:
        return ours
    mlflow = _mlflow_failure(exc, hooks, replay)
    if mlflow is not None:
        return mlflow
    if not hooks.pipeline_started:
        # Kedro failed while building the context or catalog: the project's config.
        return ConfigError(
            f"the Kedro project could not be set up for this step: "
            f"{type(exc).__name__}: {_first_line(exc)}"
        )
    if hooks.failed_node is not None:
        return NodeError(
            f"node '{hooks.failed_node}' raised {type(hooks.node_error).__name__}: "
            f"{_first_line(hooks.node_error)}",
            hint=f"replay: {replay}",
        )
    if hooks.dataset_operation is not None:
        return _catalog_error(exc, *hooks.dataset_operation, replay)
    return NodeError(
        f"the step failed: {type(exc).__name__}: {_first_line(exc)}", hint=f"replay: {replay}"
    )


_UNREACHABLE = re.compile(
    r"Max retries exceeded|Connection refused|Connection aborted|Connection reset|RemoteDisconnected|"
    r"Failed to establish a new connection|Read timed out|NameResolutionError"
)
# MLflow says "Param with key='lr' was already logged" (one param) or lists dicts with 'key': ... (batches).
_PARAM_KEYS = re.compile(r"key='([^']+)'|'key': '([^']+)'")


def _mlflow_failure(exc: Exception, hooks: _StepHooks, replay: str) -> KvxError | None:
    """MLflow's part of a failure: the tracking server lost mid-step (exit 3, whoever called
    MLflow: kedro-mlflow's hooks, its datasets, the node), or a parameter logged again with
    another value (exit 2: MLflow keeps one value per run)."""
    chain = exception_chain(exc)
    operation = hooks.dataset_operation
    mlflow_dataset = (operation is not None and hooks.catalog is not None
                      and str(hooks.catalog.get_type(operation[1]) or "").rsplit(".", 1)[-1].startswith("Mlflow"))
    if not mlflow_dataset and not any(type(item).__module__.startswith("mlflow") for item in chain):
        return None
    text = " ".join(str(item) for item in chain)
    if "Changing param values is not allowed" in text:
        keys = sorted({one or other for one, other in _PARAM_KEYS.findall(text)})
        return ConfigError(
            f"parameter{'s' if len(keys) != 1 else ''} {', '.join(keys) or '(unknown)'} already logged with "
            "another value in this pipeline's MLflow run: every step of one run must use the same "
            "parameter values",
            hint="a run with other values needs its own job (another --job-name, a new pipeline run)",
        )
    from kvx_runtime.storage.store import is_transient

    if any(is_transient(item) for item in chain) or _UNREACHABLE.search(text):
        root = chain[-1]
        return InfrastructureError(
            f"MLflow became unreachable during the step: {type(root).__name__}: {_first_line(root)[:300]}",
            hint=f"worth a retry: {replay}",
        )
    return None


def _catalog_error(exc: Exception, operation: str, dataset: str, replay: str) -> KvxError:
    """A catalog dataset failed to load or save: keep the innermost cause (the path, the
    permission), which Kedro's own wrapping message does not show."""
    from kvx_runtime.storage.store import is_transient

    chain = exception_chain(exc)
    root = chain[-1]
    verb = "loaded" if operation == "load" else "saved"
    message = f"catalog dataset '{dataset}' could not be {verb}: {type(root).__name__}: {_first_line(root)}"
    if any(is_transient(item) for item in chain):
        return InfrastructureError(message + " (a transient storage error)", hint=f"worth a retry: {replay}")
    fix = ("check that the file exists where the catalog says and that this step may read it"
           if operation == "load" else "check the catalog entry's path and that this step may write there")
    return CatalogDataError(message, hint=f"{fix}; replay: {replay}")


def _first_line(exc: BaseException | None) -> str:
    text = str(exc or "").strip()
    return text.splitlines()[0] if text else "(no message)"
