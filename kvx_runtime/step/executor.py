"""``exec-node``: one pipeline step, i.e. one Kedro node (or a group of nodes), in one process.

In order (the step contract in docs/exec-node.md), one function per phase:

1. identity: the run id and the job directory's name, exported as ``KEDRO_CONFIG_RUN_ID`` /
   ``_JOB_NAME`` (:mod:`kvx_runtime.step.identity`);
2. project: fetch the code archive if any, open the Kedro project and read ``vertexai.yml``
   (only what a step needs is strict), install the templating config loader; type the
   ``--param`` values from the project's Kedro parameters (a value that does not fit is exit 2);
3. dynamic config providers materialized into credentials;
4. storage: the storage root (exported as ``KEDRO_CONFIG_STORAGE_ROOT``: a cloud env's
   ``${storage_root}``), the job directory (its owner record checked on first use) and the run's
   save version;
5. plan: which datasets cross the step's boundary and are not in the catalog;
6. MLflow: attach to the pipeline's run (or keep kedro-mlflow out);
7. session: the node(s) run with Kedro's session, runner and the step hooks
   (:mod:`kvx_runtime.step.hooks`); the crossing datasets are blobs. A failure is classified
   by :mod:`kvx_runtime.step.failures`.

A cross-cutting phase that needs the step's resolved inputs (a step cache) goes between the
plan and the session.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from kvx_runtime.config import STEP_KEYS, resolve_storage_root
from kvx_runtime.config_loader import STORAGE_ROOT_PLACEHOLDER, env_var_name
from kvx_runtime.errors import ConfigError, KvxError, NodeError, UsageError
from kvx_runtime.graph import StepPlan, plan_step
from kvx_runtime.log import bind_step_context, get_logger
from kvx_runtime.settings import MLFLOW_RUN_ID
from kvx_runtime.step.caching import cache_wanted, prepare_caching
from kvx_runtime.step.failures import classify, first_line
from kvx_runtime.step.hooks import StepHooks
from kvx_runtime.step.identity import JobDirectory, RunIdentity, resolve_identity
from kvx_runtime.step.kedro_mlflow import adapt_kedro_mlflow_hooks
from kvx_runtime.step.request import StepRequest, StepResult
from kvx_runtime.versions import SAVE_VERSION_PARAMETER, resolve_save_version

if TYPE_CHECKING:
    from kvx_runtime.mlflow import RunInStep
    from kvx_runtime.project import KedroProject

__all__ = ["execute_step"]

log = get_logger(__name__)


def execute_step(request: StepRequest) -> StepResult:
    """Run one step. Raises :class:`KvxError` subclasses carrying the exit code."""
    started = time.perf_counter()
    if not request.nodes:
        raise UsageError("no node given", hint="pass --node NAME (repeat it for a group)")
    if request.serve_steps:
        from kvx_runtime.step.serving import check_serve_steps

        check_serve_steps(request)
    identity = _identify(request)
    project = _open_project(request)
    # Before anything is written or contacted: a --param that does not fit is the caller's error.
    request = replace(request, params=_typed_params(project, request))
    _materialize_dynamic_config(project)
    run = _run_storage(project, request, identity)
    if request.serve_steps:
        with _heartbeat(request, run):
            return _serve_planned(project, request, identity, run, started)
    plan = _plan(project, request)
    tracking = _attach_tracking(project, request, identity, plan)
    # From here the pipeline's MLflow run is this process's active run: whatever ends the step
    # detaches it first (else MLflow's exit handler would end the shared run FINISHED).
    try:
        if run.no_version:
            _check_runs_without_save_version(project, request, plan, run.no_version)
        load_versions = _load_versions(project, request, plan, run.save_version)
        hooks = StepHooks(plan, run.job_directory, tracking, run.save_version)
        log.info(
            "step starting",
            nodes=list(plan.nodes),
            pipeline=request.pipeline,
            env=project.env,
            project=str(project.path),
            save_version=run.save_version,
        )
        try:
            with _heartbeat(request, run):
                served = _run_session(project, request, plan, hooks, run, identity, load_versions)
        except KvxError:
            raise
        except (Exception, SystemExit) as exc:
            replay = request.replay(run_id=identity.run_id, job_name=identity.job_name, env=project.env,
                                    storage_root=run.job_directory.root, save_version=run.save_version)
            shown = replay.shown().command_line()
            if isinstance(exc, SystemExit):
                raise _exited(exc, hooks, shown) from None
            raise classify(exc, hooks, shown) from exc
    finally:
        if tracking is not None:
            tracking.detach()

    seconds = time.perf_counter() - started
    log.info("step finished", seconds=round(seconds, 3), stored=hooks.stored, loaded=hooks.loaded,
             **({"from_cache": True} if served else {}))
    return StepResult(
        run_id=identity.run_id,
        job_name=identity.job_name,
        nodes=plan.nodes,
        stored=tuple(hooks.stored),
        loaded=tuple(hooks.loaded),
        seconds=seconds,
    )


def _exited(exc: SystemExit, hooks: StepHooks, replay: str) -> NodeError:
    """``sys.exit()`` inside the session (a node, or a library it calls): the step failed,
    whatever the code (an exit 0 would tell the orchestrator the step succeeded, its outputs
    never saved; an exit 3 that it is worth a retry)."""
    where = f"node '{hooks.running_node}'" if hooks.running_node else "the step"
    return NodeError(f"{where} called sys.exit({exc.code!r}): a node returns its outputs or raises",
                     hint=f"replay: {replay}")


def _serve_planned(project: KedroProject, request: StepRequest, identity: RunIdentity, run: _RunStorage,
                   started: float) -> StepResult:
    """``--serve-step``: the steps a planner found in the step cache, served (or run) here."""
    from kvx_runtime.step.serving import serve_planned_steps

    log.info("serving steps from the step cache", steps=["+".join(nodes) for nodes in request.serve_steps],
             pipeline=request.pipeline, env=project.env)
    served, ran = serve_planned_steps(project, request, identity, run.job_directory, run.save_version)
    seconds = time.perf_counter() - started
    log.info("step finished", seconds=round(seconds, 3), served=served, ran=ran, from_cache=True)
    return StepResult(run_id=identity.run_id, job_name=identity.job_name, nodes=tuple(request.nodes), stored=(),
                      loaded=(), seconds=seconds)


def _identify(request: StepRequest) -> RunIdentity:
    """Phase 1: the run identity, exported (flags win over the environment) and bound to
    every log line; secret parameters registered for redaction before anything is logged."""
    identity = resolve_identity(request.run_id, request.job_name, missing="invent")
    identity.export()
    if request.mlflow_run_id:
        os.environ[MLFLOW_RUN_ID.name] = request.mlflow_run_id
    step_label = request.nodes[0] if len(request.nodes) == 1 else "+".join(request.nodes)
    bind_step_context(node=step_label, run_id=identity.run_id, job_name=identity.job_name)
    _keep_secret_params_secret(request)
    return identity


def _open_project(request: StepRequest) -> KedroProject:
    """Phase 2: the project (from the code archive when there is one); installs the
    templating config loader, which Kedro instantiates only in the session, i.e. after the
    dynamic config is written."""
    from kvx_runtime.project import open_project

    code_dir = manifest = None
    if request.code:
        from kvx_runtime.code_upload import fetch_code

        code_dir, manifest = fetch_code(request.code)
    project = open_project(request.project_path, request.env, needed=STEP_KEYS, code_dir=code_dir)
    if manifest is not None:
        from kvx_runtime.code_upload import check_drift

        check_drift(manifest, project)
    return project


def _materialize_dynamic_config(project: KedroProject) -> None:
    """Phase 3: dynamic config providers written into credentials, and registered."""
    from kvx_runtime.dynamic_config import materialize_dynamic_config

    if materialize_dynamic_config(project.plugin_config, project.conf_root, project.env):
        from kvx_runtime.project import register_credentials

        register_credentials(project)  # what the files now hold, merged


@dataclass(frozen=True)
class _RunStorage:
    job_directory: JobDirectory
    save_version: str | None
    #: Why the run has no save version (None: it has one).
    no_version: str | None


def _run_storage(project: KedroProject, request: StepRequest, identity: RunIdentity) -> _RunStorage:
    """Phase 4: the job directory under the storage root (only a step that exchanges
    intermediates needs a root: the step hooks say so when it does) and the run's version. The
    root is what ``${storage_root}`` means in the step's catalog (before the catalog is read)."""
    root = resolve_storage_root(request.storage_root, project.plugin_config.run_config.root, required=False)
    if root is not None:
        os.environ[env_var_name(STORAGE_ROOT_PLACEHOLDER)] = root
    job_directory = JobDirectory(root, identity)
    save_version, no_version = resolve_save_version(request.save_version, request.job_create_time)
    if no_version and root is not None:
        from kvx_runtime.versions import recorded_save_version

        log.info("no run version from the orchestrator: using the one recorded in the job directory",
                 reason=no_version)
        store = job_directory.store("the run's save version is recorded in the job directory")
        save_version, no_version = recorded_save_version(store, identity.run_id), None
    return _RunStorage(job_directory, save_version, no_version)


def _heartbeat(request: StepRequest, run: _RunStorage) -> contextlib.AbstractContextManager[Any]:
    """While the step runs, its activity recorded in the job directory (kvx_runtime.storage.activity):
    gc never takes a job with a long step running for finished. Nothing without a storage root."""
    if not run.job_directory.root:
        return contextlib.nullcontext()
    from kvx_runtime.storage.activity import Heartbeat

    return Heartbeat(run.job_directory.root, run.job_directory.identity.job_name, "+".join(request.nodes))


def _plan(project: KedroProject, request: StepRequest) -> StepPlan:
    """Phase 5: which datasets cross this step's boundary (the exit pipeline's inputs too)."""
    exit_inputs = _exit_pipeline_inputs(project, request.pipeline)
    pipeline = _load_step_pipeline(request.pipeline)
    return plan_step(pipeline, request.pipeline, request.nodes, exit_inputs)


def _attach_tracking(project: KedroProject, request: StepRequest, identity: RunIdentity,
                     plan: StepPlan) -> RunInStep | None:
    """Phase 6: the pipeline's MLflow run, attached before the session: over MLflow's REST API
    with kedro-mlflow's work done by the step (:mod:`kvx_runtime.mlflow.lean`), or through
    MLflow's client, kedro-mlflow then finding the run active and logging into it instead of
    starting and ending a run of its own; None when the step is not tracked, with
    kedro-mlflow's hooks kept out of the session."""
    from kedro.framework.project import settings

    from kvx_runtime.mlflow import mlflow_enabled
    from kvx_runtime.project import MLFLOW_PLUGINS, disable_plugin_hooks

    tracking: RunInStep | None = None
    lean = None
    if mlflow_enabled(project):
        from kvx_runtime.mlflow.lean import attach_lean, lean_settings

        pipeline = _load_step_pipeline(request.pipeline)
        lean = lean_settings(project, request.params, mlflow_run_id=request.mlflow_run_id,
                             step_datasets=_step_datasets(pipeline, plan.nodes), pipeline=pipeline)
        if lean is not None and request.mlflow_run_id:
            tracking = attach_lean(project, lean, request.params, request.mlflow_run_id)
        else:
            from kvx_runtime.mlflow import attach_step

            tracking = attach_step(project, request.params, identity.run_id, identity.job_name,
                                   request.mlflow_run_id)
    if tracking is None or lean is not None:
        # Without an mlflow.yml (or with MLflow unreachable and not required) kedro-mlflow
        # would start a run of its own, or fail; a lean step does its work itself.
        disable_plugin_hooks(settings, MLFLOW_PLUGINS)
    return tracking


def _step_datasets(pipeline: Any, nodes: Sequence[str]) -> set[str]:
    """Every dataset the step's nodes read or write."""
    wanted = set(nodes)
    return {name for node in pipeline.nodes if node.name in wanted for name in (*node.inputs, *node.outputs)}


def _check_runs_without_save_version(project: KedroProject, request: StepRequest, plan: StepPlan, why: str) -> None:
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


def _load_versions(project: KedroProject, request: StepRequest, plan: StepPlan,
                   save_version: str | None) -> dict[str, str]:
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
            f"the catalog configuration cannot be read: {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    versions = run_load_versions(config, produced, save_version, request.load_versions)
    if versions:
        log.info("versioned inputs load this run's version", load_versions=versions)
    return versions


def _exit_pipeline_inputs(project: KedroProject, pipeline_name: str) -> set[str]:
    """What the exit handler's pipeline reads, for the steps of the main pipeline to store."""
    from kvx_runtime.project_pipelines import load_pipeline

    exit_pipeline = project.plugin_config.run_config.on_exit_pipeline
    if not exit_pipeline or exit_pipeline == pipeline_name:
        return set()
    try:
        return set(load_pipeline(exit_pipeline).inputs())
    except KeyError:  # `compile` refuses this config; a step has nothing to add
        return set()


def _load_step_pipeline(name: str) -> Any:
    """The step's pipeline, loaded exactly as the session will load it to run the node(s)."""
    from kvx_runtime.project_pipelines import load_pipeline, registered_pipeline_names

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


def _kedro_parameters(project: KedroProject, runtime_params: dict[str, Any]) -> dict[str, Any]:
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
            f"the project's parameters (env {project.env}) cannot be read: {type(exc).__name__}: {first_line(exc)}"
        ) from exc


def _typed_params(project: KedroProject, request: StepRequest) -> dict[str, Any]:
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
    project: KedroProject,
    request: StepRequest,
    plan: StepPlan,
    hooks: StepHooks,
    run: _RunStorage,
    identity: RunIdentity,
    load_versions: dict[str, str],
) -> bool:
    """Phase 7 (with the step cache between the plan and the nodes when it is on): True when
    the step was served from the cache and its nodes did not run."""
    from kedro.framework.project import settings
    from kedro.framework.session import KedroSession
    from kedro.runner import SequentialRunner

    from kvx_runtime.project import entry_points_of_disabled_plugins_not_loaded

    with entry_points_of_disabled_plugins_not_loaded(settings):
        session = KedroSession.create(
            project.path, env=project.env, runtime_params=request.params or None,
            conf_source=project.conf_source,
        )
    adapt_kedro_mlflow_hooks(session._hook_manager, hooks.tracking, run_id=identity.run_id)
    tracking_hooks = hooks.tracking.session_hooks(run_id=identity.run_id) if hooks.tracking is not None else None
    if tracking_hooks is not None:
        session._hook_manager.register(tracking_hooks, name="kvx-runtime-tracking")
    if run.save_version:
        _pin_save_version(session, run.save_version)
    with session:
        caching = None
        if cache_wanted(project, request.cache):
            # Before the step's hooks: its blob datasets are not this context's catalog's.
            caching = prepare_caching(project, request, plan, session.load_context(), run.job_directory)
            if caching is not None and caching.serve():
                hooks.stored.extend(name for name in plan.crossing_outputs if name in caching.outputs)
                return True
        session._hook_manager.register(hooks, name="kvx-runtime-step")
        if caching is not None:
            session._hook_manager.register(caching.hooks(), name="kvx-runtime-step-cache")
        session.run(
            **_pipeline_argument(session, request.pipeline),
            node_names=list(plan.nodes),
            runner=SequentialRunner(),
            load_versions=load_versions or None,
        )
        if caching is not None:
            caching.record(identity)
    return False


def _pipeline_argument(session: Any, pipeline: str) -> dict[str, Any]:
    """``pipeline_names=[...]`` (Kedro >= 1.x, where ``pipeline_name`` is deprecated) or
    ``pipeline_name=...`` (Kedro 1.0)."""
    import inspect

    if "pipeline_names" in inspect.signature(session.run).parameters:
        return {"pipeline_names": [pipeline]}
    return {"pipeline_name": pipeline}
