"""Compiling a Kedro pipeline of a project into a pipeline spec: steps, their dependencies
(Kedro's own), their commands, resources and retries, the MLflow and exit-handler tasks."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvx_runtime.compiler.checks import (
    VERTEX_SHARED_MOUNTS,
    check_node_dependencies,
    check_references,
    warn_envs_not_in_image,
    warn_local_datasets,
    warn_unknown_selectors,
)
from kvx_runtime.compiler.names import check_label, parameter_name, pipeline_name, unique_task_names
from kvx_runtime.compiler.platform import kubernetes_platform_spec
from kvx_runtime.compiler.resources import (
    group_resources,
    node_resources,
    node_retry,
    node_selectors,
)
from kvx_runtime.compiler.spec import (
    FINAL_STATUS,
    JOB_CREATE_TIME,
    JOB_NAME,
    JOB_UUID,
    MLFLOW_RUN_ID,
    SAVE_VERSION_PARAMETER,
    STORAGE_ROOT_PARAMETER,
    PipelineParameter,
    SpecBuilder,
    Step,
    output_file,
    parameter_args,
    parameter_inputs,
    placeholder,
    retry_policy,
)
from kvx_runtime.config import resolve_storage_root
from kvx_runtime.errors import ConfigError, KvxError, UsageError
from kvx_runtime.graph import dataset_identity
from kvx_runtime.grouping import NodeGrouper, StepGroup, build_grouper, group_dependencies, order_groups
from kvx_runtime.log import get_logger
from kvx_runtime.params import KINDS, fits, is_missing, kind_of, lookup, type_param
from kvx_runtime.storage.store import S3_ENDPOINT_ENV, S3_REGION_ENV

__all__ = ["CompileRequest", "CompiledPipeline", "StepGraph", "compile_pipeline", "plan_steps", "read_spec",
           "write_spec"]

log = get_logger(__name__)

KVX = "kvx-runtime"
FINAL_STATUS_PARAMETER = "kvx_final_status"
#: Passed from the compiling machine into every step, so ${commit_id} means the same thing.
FORWARDED_ENV = ("KEDRO_CONFIG_COMMIT_ID", "KEDRO_CONFIG_BRANCH_NAME")


@dataclass
class CompileRequest:
    project_path: str | Path | None = None
    env: str | None = None
    pipeline: str = "__default__"
    image: str | None = None
    params: Sequence[str] = ()  # "kedro.name:type"
    storage_root: str | None = None
    load_versions: dict[str, str] = field(default_factory=dict)  # dataset -> Kedro version
    #: Values for this run ("kedro.name" -> text): each becomes a pipeline parameter (typed
    #: from its Kedro value, declared or not) and a value in ``CompiledPipeline.values``.
    values: dict[str, str] = field(default_factory=dict)
    #: Package the workspace's code and configuration and have the steps run it (None:
    #: run_config.code_upload decides).
    code_upload: bool | None = None
    #: Local paths every step of the target sees (Vertex AI's /gcs/ FUSE mount; none on Kubeflow).
    shared_mounts: tuple[str, ...] = VERTEX_SHARED_MOUNTS


@dataclass(frozen=True)
class StepGraph:
    """The steps of a pipeline: groups of nodes, their task names and dependencies."""

    groups: dict[str, StepGroup]  # group name -> group
    task_of: dict[str, str]  # group name -> task name
    needs: dict[str, set[str]]  # group name -> group names it waits for
    order: list[str]  # group names, topologically sorted

    @property
    def nodes_of_task(self) -> dict[str, tuple[str, ...]]:
        return {self.task_of[name]: self.groups[name].nodes for name in self.order}


def plan_steps(pipeline: Any, grouper: NodeGrouper) -> StepGraph:
    """Group ``pipeline``'s nodes into steps ordered by Kedro's node dependencies."""
    groups = grouper.group(pipeline)
    needs = group_dependencies(pipeline, groups)
    return StepGraph(
        groups={group.name: group for group in groups},
        # Stable task names: assigned in the pipeline's order, not the sort order.
        task_of=unique_task_names(group.name for group in groups),
        needs=needs,
        order=order_groups(needs),
    )


@dataclass
class CompiledPipeline:
    spec: dict[str, Any]
    steps: dict[str, tuple[str, ...]] = field(default_factory=dict)  # task -> node names
    warnings: list[str] = field(default_factory=list)
    #: Pipeline parameter values for one run (from ``CompileRequest.values``), typed.
    values: dict[str, Any] = field(default_factory=dict)
    #: ``run_config.kubernetes`` as a Kubernetes platform spec (KFP applies it), None if unset.
    platform_spec: dict[str, Any] | None = None


def _lookup(params: dict[str, Any], dotted: str) -> Any:
    value, blocked = lookup(params, dotted)
    if is_missing(value):
        where = f" ({blocked} is not a mapping)" if blocked else ""
        raise ConfigError(f"--params {dotted}: no such Kedro parameter{where}")
    return value


def _pipeline_parameters(declared: Sequence[str], kedro_params: dict[str, Any]) -> list[PipelineParameter]:
    parameters: list[PipelineParameter] = []
    seen: set[str] = set()
    for item in declared:
        for entry in filter(None, (e.strip() for e in item.split(","))):
            name, _, kind = entry.partition(":")
            kind = kind or "str"
            if kind not in KINDS:
                raise UsageError(f"--params {entry}: unknown type '{kind}' (use {', '.join(KINDS)})")
            default = _lookup(kedro_params, name)
            default = _coerce_default(name, kind, default)
            pipeline_param = parameter_name(name)
            if pipeline_param in seen:
                raise UsageError(f"--params {name}: given twice")
            seen.add(pipeline_param)
            parameters.append(PipelineParameter(name, pipeline_param, kind, default))
    return parameters


def _kind_of(value: Any) -> str:
    """The pipeline parameter type of a Kedro parameter's value (kvx_runtime.params' table)."""
    kind = kind_of(value)
    if kind is None:
        raise ConfigError(f"a Kedro parameter of type {type(value).__name__} cannot be a pipeline parameter")
    return kind


def _run_values(values: dict[str, str], declared: list[PipelineParameter],
                kedro_params: dict[str, Any]) -> tuple[list[PipelineParameter], dict[str, Any]]:
    """Pipeline parameters for ``values`` (added when not declared) and their values, typed
    as exec-node types them: from the Kedro value, or as declared."""
    parameters = list(declared)
    by_name = {p.kedro_name: p for p in parameters}
    typed: dict[str, Any] = {}
    for name, text in values.items():
        default = _lookup(kedro_params, name)
        parameter = by_name.get(name)
        declared_kind = parameter.type if parameter is not None else None
        if parameter is None:
            kind = _kind_of(default)
            parameter = PipelineParameter(name, parameter_name(name), kind, _coerce_default(name, kind, default))
            parameters.append(parameter)
            by_name[name] = parameter
        typed[parameter.name] = type_param(name, text, default, declared_kind)
    return parameters, typed


def _coerce_default(name: str, kind: str, value: Any) -> Any:
    """The Kedro default of a pipeline parameter of ``kind`` (an int for a float is a float)."""
    if not fits(kind, value):
        raise ConfigError(f"--params {name}:{kind}: the Kedro default {value!r} is not a {kind}")
    return float(value) if kind == "float" else value


def load_pipeline_as_steps_do(name: str, role: str) -> Any:
    """The registered pipeline ``name``, checked to be what a step gets when Kedro loads it
    alone (Kedro 1.x loads only the pipelines a run asks for: a pipeline that exists only
    when the whole registry is loaded would fail every step in the cloud)."""
    from kedro.framework.project import pipelines

    from kvx_runtime.project import load_pipeline, registered_pipeline_names

    try:
        known = registered_pipeline_names()
    except Exception as exc:
        raise ConfigError(f"the project's pipelines cannot be loaded: {type(exc).__name__}: {exc}") from exc
    if name not in known:
        raise UsageError(f"{role}: no pipeline named '{name}'", hint=f"registered: {', '.join(known) or 'none'}")
    whole = pipelines[name]
    try:
        alone = load_pipeline(name)
    except Exception as exc:
        raise ConfigError(
            f"{role} '{name}' exists when Kedro loads every pipeline but not when it loads "
            f"'{name}' alone, as a step does ({type(exc).__name__}: {exc})",
            hint=f"check that `kedro run --pipeline {name}` works; with find_pipelines() the "
            f"pipeline must live in a module named pipelines/{name}/",
        ) from None
    expected = sorted(node.name for node in whole.nodes)
    got = sorted(node.name for node in alone.nodes)
    if got != expected:
        differing = sorted(set(expected) ^ set(got))
        raise ConfigError(
            f"{role} '{name}' has other nodes when Kedro loads it alone, as a step does, than "
            f"when it loads every pipeline: {', '.join(differing[:5])}"
            + (f" and {len(differing) - 5} more" if len(differing) > 5 else ""),
            hint=f"compare `kedro run --pipeline {name}` with the registry",
        )
    return alone


def _load_kedro(project: Any, pipeline: str) -> tuple[Any, dict[str, Any], Any, dict[str, Any]]:
    """The pipeline, the resolved parameters, the catalog and the catalog config."""
    from kedro.framework.project import settings
    from kedro.framework.session import KedroSession

    from kvx_runtime.project import disable_plugin_hooks, entry_points_of_disabled_plugins_not_loaded

    # Compiling must not start MLflow runs or contact a tracking server.
    disable_plugin_hooks(settings, ("kedro-mlflow", "kedro_mlflow"))
    kedro_pipeline = load_pipeline_as_steps_do(pipeline, "the pipeline")
    try:
        with entry_points_of_disabled_plugins_not_loaded(settings):
            session = KedroSession.create(project.path, env=project.env)
        with session:
            context = session.load_context()
            catalog_config = context.config_loader["catalog"]
            return kedro_pipeline, context.params, context.catalog, catalog_config
    except KvxError:
        raise
    except Exception as exc:  # the user's catalog, parameters or settings
        text = " ".join(str(exc).split())
        raise ConfigError(
            f"the Kedro project's configuration (env {project.env}) cannot be loaded: "
            f"{type(exc).__name__}: {text[:500]}"
        ) from exc


def _dataset_paths(catalog: Any, catalog_config: dict[str, Any], names: set[str]) -> dict[str, str]:
    """Local or remote file path of every catalog dataset in ``names`` (None if none)."""
    paths: dict[str, str] = {}
    resolver = getattr(catalog, "config_resolver", None)
    for name in sorted(names):
        config = catalog_config.get(name)
        if config is None and resolver is not None and resolver.match_dataset_pattern(name):
            config = resolver.resolve_pattern(name)
        if isinstance(config, dict):
            path = config.get("filepath") or config.get("path")
            if isinstance(path, str):
                paths[name] = path
    return paths


def mlflow_configured(project: Any) -> bool:
    """MLflow steps are compiled in when kedro-mlflow is installed and configured."""
    from kvx_runtime.project import has_config

    return importlib.util.find_spec("kedro_mlflow") is not None and has_config(project, "mlflow*")


def compile_pipeline(request: CompileRequest) -> CompiledPipeline:
    from kvx_runtime.project import open_project

    project = open_project(request.project_path, request.env)
    run = project.plugin_config.run_config
    image = request.image or run.image
    if not image:
        raise ConfigError("no image to run the steps in", hint="pass --image or set run_config.image")
    storage_root = resolve_storage_root(request.storage_root, run.root, required=True)
    assert storage_root is not None
    for key, value in run.labels.items():
        check_label(key, value)

    kedro_pipeline, kedro_params, catalog, catalog_config = _load_kedro(project, request.pipeline)
    if not kedro_pipeline.nodes:
        raise ConfigError(f"pipeline '{request.pipeline}' has no nodes")
    graph = plan_steps(kedro_pipeline, build_grouper(run.grouping.cls, run.grouping.params))
    task_of = graph.task_of

    node_names = {node.name for node in kedro_pipeline.nodes}
    tags = {tag for node in kedro_pipeline.nodes for tag in node.tags}
    warnings: list[str] = []
    for section, table in (("resources", run.resources), ("node_selectors", run.node_selectors),
                           ("retries", run.retries)):
        warnings += [f"run_config.{section}.{k}" for k in warn_unknown_selectors(section, table, node_names, tags)]

    producers = {dataset_identity(out): node.name for node in kedro_pipeline.nodes for out in node.outputs}
    consumers: dict[str, list[str]] = {}
    for node in kedro_pipeline.nodes:
        for dataset in node.inputs:
            consumers.setdefault(dataset_identity(dataset), []).append(node.name)
    step_of = {node: group.name for group in graph.groups.values() for node in group.nodes}
    catalog_names = {name for node in kedro_pipeline.nodes for name in [*node.inputs, *node.outputs]}
    paths = _dataset_paths(catalog, catalog_config,
                           {name for name in catalog_names if dataset_identity(name) in producers})
    warnings += warn_local_datasets(paths, producers, consumers, step_of, request.shared_mounts)
    warnings += [f"env {env} not in image" for env in
                 warn_envs_not_in_image(project.path, project.conf_root, [project.base_env, project.env])]

    parameters, values = _run_values(request.values, _pipeline_parameters(request.params, kedro_params),
                                     kedro_params)
    mlflow = mlflow_configured(project)
    exit_pipeline = run.on_exit_pipeline
    env = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
    env.update(run.env)
    # Steps need the S3 endpoint before they read the project's config: to fetch a code archive.
    env.update({name: value for name, value in ((S3_ENDPOINT_ENV, run.s3.endpoint_url),
                                                 (S3_REGION_ENV, run.s3.region)) if value})
    if run.network.host_aliases:
        env["KVX_HOST_ALIASES"] = ";".join(
            f"{alias.ip}={','.join(alias.hostnames)}" for alias in run.network.host_aliases
        )

    common = ["--env", project.env, "--run-id", placeholder(JOB_UUID), "--job-name", placeholder(JOB_NAME)]
    job_inputs = {JOB_NAME: "STRING", JOB_UUID: "STRING"}
    # Every step of a run saves (and reads back) versioned datasets at one version: the run's.
    versions = ["--save-version", placeholder(SAVE_VERSION_PARAMETER),
                "--job-create-time", placeholder(JOB_CREATE_TIME),
                *(a for d, v in sorted(request.load_versions.items()) for a in ("--load-version", f"{d}={v}"))]
    if run.code_upload if request.code_upload is None else request.code_upload:
        from kvx_runtime.code_upload import build_archive, upload_archive

        archive = build_archive(project.path, project.package_name, project.conf_root)
        versions += ["--code", upload_archive(archive, storage_root)]
        log.info("code archive", sha256=archive.digest, files=len(archive.files), bytes=len(archive.data))
    node_steps: list[Step] = []
    steps_nodes: dict[str, tuple[str, ...]] = {}
    tags_of = {node.name: node.tags for node in kedro_pipeline.nodes}
    for group_name in graph.order:
        group: StepGroup = graph.groups[group_name]
        task = task_of[group_name]
        steps_nodes[task] = group.nodes
        per_node = [node_resources(run.resources, n, tags_of[n]) for n in group.nodes]
        selectors = [node_selectors(run.node_selectors, n, tags_of[n]) for n in group.nodes]
        retries = [r for r in (node_retry(run.retries, n, tags_of[n]) for n in group.nodes) if r]
        retry = max(retries, key=lambda r: r.max_retry_count, default=None)
        args = [arg for n in group.nodes for arg in ("--node", n)]
        if request.pipeline != "__default__":
            args += ["--pipeline", request.pipeline]
        args += [*common, "--storage-root", placeholder(STORAGE_ROOT_PARAMETER), *versions]
        inputs = {**parameter_inputs(parameters), **job_inputs, JOB_CREATE_TIME: "STRING"}
        depends = [task_of[g] for g in sorted(graph.needs[group_name])]
        if mlflow:
            args += ["--mlflow-run-id", placeholder(MLFLOW_RUN_ID)]
            inputs[MLFLOW_RUN_ID] = "STRING"
            depends.append("mlflow-start-run")
        args += parameter_args(parameters)
        node_steps.append(Step(
            task=task,
            display_name=task,
            command=[KVX, "exec-node"],
            args=args,
            inputs=inputs,
            depends_on=depends,
            resources=group_resources(per_node, selectors).to_spec(),
            retry=retry_policy(retry),
            env=env,
        ))

    start = None
    exit_steps: list[Step] = []
    if mlflow:
        start = Step(
            task="mlflow-start-run", display_name="mlflow-start-run",
            command=[KVX, "mlflow-start"],
            args=[*common, "--output", output_file(MLFLOW_RUN_ID)], inputs=dict(job_inputs),
            outputs={MLFLOW_RUN_ID: "STRING"}, env=env,
        )
        exit_steps.append(Step(
            task="mlflow-end-run", display_name="mlflow-end-run",
            command=[KVX, "mlflow-end"],
            args=[*common, "--final-status", placeholder(FINAL_STATUS)],
            inputs={FINAL_STATUS: "TASK_FINAL_STATUS", **job_inputs}, depends_on=["exit-handler-1"],
            final_status=True, env=env,
        ))
    if exit_pipeline:
        try:
            exit_nodes = [node.name for node in
                          load_pipeline_as_steps_do(exit_pipeline, "run_config.on_exit_pipeline").nodes]
        except UsageError as exc:
            raise ConfigError(exc.message, hint=exc.hint) from None
        exit_steps.append(Step(
            task="on-exit", display_name="on-exit",
            command=[KVX, "exec-node"],
            args=[*(a for n in exit_nodes for a in ("--node", n)), "--pipeline", exit_pipeline,
                  *common, "--storage-root", placeholder(STORAGE_ROOT_PARAMETER), *versions,
                  *parameter_args(parameters),
                  # The exit pipeline's nodes may take params:kvx_final_status.
                  "--param", f"{FINAL_STATUS_PARAMETER}:dict={placeholder(FINAL_STATUS)}"],
            inputs={**parameter_inputs(parameters), FINAL_STATUS: "TASK_FINAL_STATUS", **job_inputs,
                    JOB_CREATE_TIME: "STRING"},
            depends_on=["exit-handler-1"], final_status=True, env=env,
        ))

    name = pipeline_name(project.package_name if request.pipeline == "__default__"
                         else f"{project.package_name}-{request.pipeline}")
    builder = SpecBuilder(
        name=name, description=run.description, image=image, parameters=parameters,
        storage_root=storage_root, mlflow=mlflow, has_exit_handler=bool(exit_steps),
        failure_policy=run.failure_policy,
    )
    spec = builder.build(node_steps, start, exit_steps)
    check_references(spec)
    check_node_dependencies(kedro_pipeline, graph.nodes_of_task, spec)
    log.info("pipeline compiled", pipeline=name, steps=len(node_steps), mlflow=mlflow,
             parameters=[p.kedro_name for p in parameters])
    return CompiledPipeline(spec=spec, steps=steps_nodes, warnings=warnings, values=values,
                            platform_spec=kubernetes_platform_spec(spec, run.kubernetes))


def write_spec(spec: dict[str, Any], output: str | Path, platform: dict[str, Any] | None = None) -> Path:
    """Write JSON, or YAML when the file name ends in .yaml/.yml (with ``platform``, a Kubernetes
    platform spec, as its second document, as KFP reads an uploaded pipeline)."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in {".yaml", ".yml"}:
        import yaml

        text = yaml.safe_dump(spec, sort_keys=False, default_flow_style=False)
        if platform:
            text += "---\n" + yaml.safe_dump(platform, sort_keys=False, default_flow_style=False)
    elif platform:
        raise ValueError("a platform spec is written only as YAML")
    else:
        text = json.dumps(spec, indent=2) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


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
