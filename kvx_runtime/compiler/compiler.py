"""Compiling a Kedro pipeline of a project into a pipeline spec, in named phases: load the
project (:mod:`.loading`), plan (:mod:`.planner`), upload the code when asked (:mod:`.upload`),
render as a KFP spec (:mod:`.kfp_render`) and check that the spec orders Kedro's dependencies;
or render the plan as an Airflow DAG file (:mod:`.airflow_render`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvx_runtime.compiler.checks import check_node_dependencies, check_references
from kvx_runtime.compiler.kfp_render import render_kfp
from kvx_runtime.compiler.loading import load_project_facts
from kvx_runtime.compiler.names import pipeline_dag_id
from kvx_runtime.compiler.planner import CompileRequest, plan_pipeline
from kvx_runtime.compiler.upload import upload_code
from kvx_runtime.errors import ConfigError, UsageError
from kvx_runtime.log import get_logger

if TYPE_CHECKING:  # imported by compile_dag: the Airflow renderer and its config are no cost of a KFP compile
    from kvx_runtime.compiler.airflow_render import AirflowDag, Operator

__all__ = ["CompileRequest", "CompiledDag", "CompiledPipeline", "compile_dag", "compile_pipeline", "read_spec",
           "write_spec"]

log = get_logger(__name__)


@dataclass
class CompiledPipeline:
    spec: dict[str, Any]
    steps: dict[str, tuple[str, ...]] = field(default_factory=dict)  # task -> node names
    warnings: list[str] = field(default_factory=list)
    #: Pipeline parameter values for one run (from ``CompileRequest.values``), typed.
    values: dict[str, Any] = field(default_factory=dict)
    #: ``run_config.kubernetes`` as a Kubernetes platform spec (KFP applies it), None if unset.
    platform_spec: dict[str, Any] | None = None
    #: Nodes a resumed run finished, left out (see ``CompileRequest.resume``).
    finished_nodes: tuple[str, ...] = ()
    #: Pipeline inputs under a cloud storage root (``PipelinePlan.remote_inputs``).
    remote_inputs: dict[str, str] = field(default_factory=dict)
    #: The steps a resumed run finished that are left out (``PipelinePlan.finished_steps``).
    finished_steps: tuple[str, ...] = ()
    #: A resumed run's blobs its steps will read (``PipelinePlan.kept_blobs``).
    kept_blobs: dict[str, str] = field(default_factory=dict)


def compile_pipeline(request: CompileRequest) -> CompiledPipeline:
    """Plan ``request``, upload its code when asked, render it as a KFP spec and check it."""
    facts = load_project_facts(request)
    plan = upload_code(plan_pipeline(request, facts))
    kfp = render_kfp(plan, request.gpu_resource_name)
    check_node_dependencies(facts.pipeline, plan.nodes_of_step, kfp.spec, finished=plan.finished_nodes)
    log.info("pipeline compiled", pipeline=plan.name, steps=len(plan.node_steps), mlflow=plan.mlflow,
             parameters=[p.kedro_name for p in plan.parameters])
    return CompiledPipeline(spec=kfp.spec, steps=plan.nodes_of_step, warnings=list(plan.warnings),
                            values=dict(plan.values), platform_spec=kfp.platform_spec,
                            finished_nodes=plan.finished_nodes, remote_inputs=dict(plan.remote_inputs),
                            finished_steps=plan.finished_steps, kept_blobs=dict(plan.kept_blobs))


@dataclass
class CompiledDag:
    dag: AirflowDag
    steps: dict[str, tuple[str, ...]] = field(default_factory=dict)  # task -> node names
    warnings: list[str] = field(default_factory=list)
    #: DAG param values for one run (from ``CompileRequest.values``), typed: a run's ``conf``.
    values: dict[str, Any] = field(default_factory=dict)
    #: Pipeline inputs under a cloud storage root (``PipelinePlan.remote_inputs``).
    remote_inputs: dict[str, str] = field(default_factory=dict)




def compile_dag(request: CompileRequest, operator: Operator = "pods", project_dir: str | None = None,
                run_once: bool = False, overrides: Mapping[str, Any] | None = None,
                published_schedule: bool = False) -> CompiledDag:
    """Plan ``request``, upload its code when asked and render it as an Airflow DAG file
    (``project_dir``: where the project lives on the worker, for the local operator; default:
    the project's absolute path here). ``run_once``: the DAG of a one-off run, without a
    schedule (a scheduled DAG's one-off copy gets the id ``<dag_id>-run-once``, so publishing it
    never replaces or starts the schedule; ``published_schedule``: the DAG Airflow has is
    scheduled, by ``schedule --cron``, where the configuration says none). ``overrides``:
    run_config keys set for this DAG (``schedule --cron``), validated as the config is."""
    import kedro

    import kvx_runtime
    from kvx_runtime.compiler.airflow_render import DagSource, render_airflow
    from kvx_runtime.config import AirflowRunConfig
    from kvx_runtime.config.airflow import RUN_ONCE_SUFFIX, is_dag_id

    if operator == "local":  # every task runs on the one worker, in one project directory
        from kvx_runtime.targets.registry import ONE_MACHINE

        request = replace(request, shared_mounts=ONE_MACHINE)
    facts = load_project_facts(request)
    plan = upload_code(plan_pipeline(request, facts))
    # A project configured by vertexai.yml or kubeflow.yml alone gets the DAG's defaults.
    run = facts.run if isinstance(facts.run, AirflowRunConfig) else AirflowRunConfig.model_validate(
        facts.run.model_dump())
    if overrides:
        from pydantic import ValidationError

        try:
            run = AirflowRunConfig.model_validate({**run.model_dump(), **overrides})
        except ValidationError as exc:
            from kvx_runtime.config.validation import describe_validation_error

            raise ConfigError(f"the schedule given: {describe_validation_error(exc, 'run_config.')}",
                              hint="--cron takes a cron expression or an Airflow preset, --start-date a date "
                              "(2026-01-01) or a time with its offset") from None
    run = run.model_copy(update={"dag_id": pipeline_dag_id(run.dag_id, facts.package_name, request.pipeline)})
    if run_once and (run.schedule or published_schedule):
        run = run.model_copy(update={"schedule": None, "dag_id": f"{run.dag_id}{RUN_ONCE_SUFFIX}"})
    if run.dag_id and not is_dag_id(run.dag_id):
        raise ConfigError(f"DAG id {run.dag_id!r} is not one Airflow accepts (letters, digits, _ . -, at most 250 "
                          "characters)", hint="shorten run_config.dag_id (or the pipeline's name)")
    source = DagSource(package=facts.package_name, pipeline=request.pipeline, env=facts.env,
                       kvx_version=kvx_runtime.__version__, kedro_version=kedro.__version__)
    worker_dir = (project_dir or str(facts.project_path)) if operator == "local" else None
    dag = render_airflow(plan, run, source, operator=operator, project_dir=worker_dir)
    log.info("DAG compiled", dag_id=dag.dag_id, steps=len(plan.node_steps), mlflow=plan.mlflow, operator=operator)
    warnings = list(plan.warnings)
    if plan.failure_policy == "fail_fast":  # Airflow stops nothing on a failure; its fail_fast refuses exit tasks
        message = ("run_config.failure_policy fail_fast is not applied by the Airflow DAG: after a failed task "
                   "the tasks that do not depend on it still run (fail_slow)")
        log.warning(message)
        warnings.append(message)
    if operator == "local":
        warnings += _pod_settings_unused(run)
    return CompiledDag(dag=dag, steps=plan.nodes_of_step, warnings=warnings, values=dict(plan.values),
                       remote_inputs=dict(plan.remote_inputs))


def _pod_settings_unused(run: Any) -> list[str]:
    """With ``--operator local`` the tasks run on the Airflow worker, not in pods: the pod
    settings configured (``run``: an ``AirflowRunConfig``) are not applied (said, and refused by
    ``--strict``)."""
    defaults = type(run).model_fields
    unused = [f"run_config.{key}" for key in ("tolerations", "annotations", "secrets", "startup_timeout",
                                              "on_finish_action", "kubernetes_conn_id")
              if getattr(run, key) != defaults[key].get_default(call_default_factory=True)]
    unused += [f"run_config.{key}" for key in ("resources", "node_selectors") if getattr(run, key)]
    if run.kubernetes.secrets_as_env:
        unused.append("run_config.kubernetes.secrets_as_env")
    if not unused:
        return []
    log.warning("with --operator local the tasks run on the Airflow worker, not in pods: these settings are not "
                "applied", settings=unused, hint="compile with --operator pods, or leave them out")
    return [f"{key} not applied by --operator local" for key in unused]


def write_spec(spec: dict[str, Any], output: str | Path, platform: dict[str, Any] | None = None) -> Path:
    """Write JSON, or YAML when the file name ends in .yaml/.yml (with ``platform``, a Kubernetes
    platform spec, as its second document, as KFP reads an uploaded pipeline)."""
    from kvx_runtime.compiler.output import write_output

    if Path(output).suffix in {".yaml", ".yml"}:
        import yaml

        text = yaml.safe_dump(spec, sort_keys=False, default_flow_style=False)
        if platform:
            text += "---\n" + yaml.safe_dump(platform, sort_keys=False, default_flow_style=False)
    elif platform:
        raise ValueError("a platform spec is written only as YAML")
    else:
        text = json.dumps(spec, indent=2) + "\n"
    return write_output(output, text)


def read_spec(path: str | Path) -> dict[str, Any]:
    """Read a spec written by :func:`write_spec` (or by the kfp SDK)."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the pipeline spec {source}: {exc.strerror}") from None
    try:
        if source.suffix in {".yaml", ".yml"}:
            import yaml

            documents = [d for d in yaml.safe_load_all(text) if d is not None]
            spec = documents[0] if documents else None
        else:
            spec = json.loads(text)
    except Exception as exc:
        raise UsageError(f"{source} is not a valid pipeline spec: {exc}") from None
    if not isinstance(spec, dict) or "root" not in spec or "deploymentSpec" not in spec:
        raise UsageError(f"{source} is not a pipeline spec (no root or deploymentSpec)")
    check_references(spec)
    return spec
