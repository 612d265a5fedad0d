"""Planning: a Kedro pipeline and the project's configuration, as loaded by :mod:`.loading`,
turned into a :class:`~.plan.PipelinePlan`. No I/O here (beyond the warnings it logs) and
nothing of any target's format."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvx_runtime.compiler.checks import (
    warn_gpus_without_accelerator,
    warn_local_datasets,
    warn_missing_inputs,
    warn_uncopyable_crossings,
    warn_unknown_selectors,
)
from kvx_runtime.compiler.names import parameter_name, project_pipeline_name, unique_task_names
from kvx_runtime.compiler.plan import (
    CACHE_SERVE_STEP,
    MLFLOW_END_STEP,
    MLFLOW_START_STEP,
    ON_EXIT_STEP,
    CodeUpload,
    ParameterRef,
    PipelineParameter,
    PipelinePlan,
    PlannedStep,
    StepKind,
    Symbol,
)
from kvx_runtime.compiler.resources import (
    ACCELERATOR_KEY,
    check_group_agrees,
    group_resources,
    node_resources,
    node_retry,
    node_selectors,
)
from kvx_runtime.config.validation import unknown_keys
from kvx_runtime.errors import ConfigError, UsageError
from kvx_runtime.graph import dataset_identity
from kvx_runtime.grouping import (
    GroupingContext,
    NodeGrouper,
    StepGroup,
    group_dependencies,
    modelled_wall_seconds,
    order_groups,
)
from kvx_runtime.log import get_logger
from kvx_runtime.params import KINDS, fits, is_missing, kind_of, lookup, type_param
from kvx_runtime.step.invocation import DEFAULT_PIPELINE, EXEC_NODE, ExecNodeInvocation, identity_args
from kvx_runtime.storage.store import S3_ENDPOINT_ENV, S3_REGION_ENV
from kvx_runtime.targets.registry import VERTEX_SHARED_MOUNTS

if TYPE_CHECKING:
    from kvx_runtime.project import KedroProject

__all__ = ["CompileRequest", "ProjectFacts", "ResumedRun", "StepGraph", "plan_pipeline", "plan_steps"]

log = get_logger(__name__)

#: The exit pipeline's nodes may take ``params:kvx_final_status``: the body's outcome.
FINAL_STATUS_PARAMETER = "kvx_final_status"


@dataclass(frozen=True)
class ResumedRun:
    """The run a resumed run continues (``resume JOB``): its steps write where it wrote, as the
    same run (its identity, save version and storage root, literally), and leave out the steps
    it finished."""

    run_id: str
    job_name: str
    storage_root: str
    #: The run's save version as its steps were given it (empty: the job's creation time decides).
    save_version: str
    job_create_time: str
    #: The steps it finished (:func:`kvx_runtime.cache.key.step_identity`): left out.
    done_steps: frozenset[str] = frozenset()


@dataclass
class CompileRequest:
    project_path: str | Path | None = None
    env: str | None = None
    pipeline: str = DEFAULT_PIPELINE
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
    #: The Kubernetes resource name the target asks GPUs by, the accelerator type becoming a
    #: node selector (KFP: nvidia.com/gpu); None: by accelerator type (Vertex AI).
    gpu_resource_name: str | None = None
    #: How the user reaches the target's ``init`` (warnings suggest its ``--cloud-env``).
    init_command: str = "kvx-runtime init"
    #: ``on``/``off``: the step cache in every step (``exec-node --cache``); None: each step's
    #: run_config.cache.enabled.
    cache: str | None = None
    #: Steps (:func:`kvx_runtime.cache.key.step_identity`) a planner found in the step cache: left
    #: out, and served by one ``cache-serve`` step instead (each with every step upstream of it).
    served_steps: frozenset[str] = frozenset()
    #: The failed run this one resumes (None: a new run).
    resume: ResumedRun | None = None
    #: What a step of the target spends before its node starts (the fusing groupers weigh it).
    step_start_seconds: float = 60.0
    #: The project as the command opened it already (``project_path`` in ``env``): compiled as
    #: it is, not opened again. None: opened from ``project_path`` and ``env``.
    project: KedroProject | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ProjectFacts:
    """What planning needs from the project, loaded once (:func:`.loading.load_project_facts`)."""

    project_path: Path
    package_name: str
    conf_root: Path
    env: str
    run: Any  # run_config (kvx_runtime.config.RunConfig)
    image: str
    storage_root: str
    pipeline: Any  # the Kedro pipeline, as a step loads it
    kedro_params: dict[str, Any]
    grouper: NodeGrouper
    #: Catalog name -> file path, for the datasets some node writes.
    dataset_paths: dict[str, str]
    #: ``run_config.on_exit_pipeline``'s nodes, in its order (empty: none).
    exit_nodes: tuple[str, ...]
    mlflow: bool
    #: Variables passed from the compiling machine into every step.
    forwarded_env: dict[str, str]
    #: Config environments the steps use that their image leaves out.
    envs_not_in_image: tuple[str, ...]
    #: kedro-mlflow files in environments the steps do not read (when none they read has one).
    unread_mlflow_files: tuple[str, ...] = ()
    #: Catalog entries held in memory uncopied (``copy_mode: assign``): objects that cannot cross steps.
    memory_datasets_assigned: frozenset[str] = frozenset()
    #: Datasets nodes write that the catalog keeps nowhere lasting (not declared, or a
    #: MemoryDataset): between steps they are blobs in the run's job directory (by identity).
    blob_outputs: frozenset[str] = frozenset()
    #: Pipeline inputs the catalog reads from under a storage root on this machine, not there:
    #: catalog name -> path.
    missing_inputs: dict[str, str] = field(default_factory=dict)
    #: Pipeline inputs the catalog reads from under a cloud storage root (not looked for).
    remote_inputs: dict[str, str] = field(default_factory=dict)
    #: node -> seconds it took in an earlier run, for a grouper that weighs durations.
    node_durations: dict[str, float] = field(default_factory=dict)
    #: Unknown keys of the config file outside ``run_config`` (those inside are the planner's).
    unknown_top_level_keys: tuple[str, ...] = ()
    #: Node names and tags of the project's other pipelines that ``run_config``'s resources,
    #: node_selectors or retries name (not a typo: a per-pipeline compile leaves them unused).
    named_elsewhere: frozenset[str] = frozenset()
    #: ``run_config.on_exit_pipeline``'s pipeline (its nodes' tags and inputs), None without one.
    exit_pipeline: Any = None


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


def plan_steps(pipeline: Any, grouper: NodeGrouper, context: GroupingContext | None = None) -> StepGraph:
    """Group ``pipeline``'s nodes into steps ordered by Kedro's node dependencies."""
    groups = grouper.groups(pipeline, context or GroupingContext())
    needs = group_dependencies(pipeline, groups)
    return StepGraph(
        groups={group.name: group for group in groups},
        # Stable task names: assigned in the pipeline's order, not the sort order.
        task_of=unique_task_names(group.name for group in groups),
        needs=needs,
        order=order_groups(needs),
    )


def plan_pipeline(request: CompileRequest, facts: ProjectFacts) -> PipelinePlan:
    """The plan of ``request`` for the project described by ``facts``."""
    context = grouping_context(request, facts)
    graph = plan_steps(facts.pipeline, facts.grouper, context)
    _report_fusion(facts, graph, context)
    warnings = _warnings(request, facts, graph)
    parameters, values = _run_values(request.values, _pipeline_parameters(request.params, facts.kedro_params),
                                     facts.kedro_params)
    env = _step_env(facts.forwarded_env, facts.run)
    exec_node = _exec_node_invocation(request, facts, parameters)
    run = facts.run
    from kvx_runtime.cache.key import step_identity

    done = _done_groups(graph, request.resume)
    finished_nodes = tuple(node for name in sorted(done) for node in graph.groups[name].nodes)
    return PipelinePlan(
        name=project_pipeline_name(facts.package_name, request.pipeline),
        description=run.description, image=facts.image, storage_root=facts.storage_root,
        failure_policy=run.failure_policy,
        steps=_body_steps(graph, exec_node, facts, env, request.served_steps, request.resume),
        exit_steps=_exit_steps(exec_node, facts, env, request.resume),
        parameters=tuple(parameters), values=values, warnings=tuple(warnings), kubernetes=run.kubernetes,
        code_upload=_code_upload(request, facts),
        finished_nodes=finished_nodes,
        finished_steps=tuple(sorted(step_identity(graph.groups[name].nodes) for name in done)),
        remote_inputs=_inputs_still_read(facts, finished_nodes),
        kept_blobs=_kept_blobs(graph, facts, done),
    )


def _kept_blobs(graph: StepGraph, facts: ProjectFacts, done: set[str]) -> dict[str, str]:
    """The blobs steps of this run read that steps a resumed run finished wrote: dataset
    identity -> the writing step (:func:`kvx_runtime.cache.key.step_identity`)."""
    if not done:
        return {}
    from kvx_runtime.cache.key import step_identity

    group_of = {node: name for name, group in graph.groups.items() for node in group.nodes}
    writer = {dataset_identity(out): group_of[node.name] for node in facts.pipeline.nodes for out in node.outputs}
    # The nodes of the steps that run, and those of the on-exit step, which always runs.
    readers = [node for node in facts.pipeline.nodes if group_of[node.name] not in done]
    if facts.exit_pipeline is not None:
        readers += list(facts.exit_pipeline.nodes)
    kept: dict[str, str] = {}
    for node in readers:
        for name in node.inputs:
            identity = dataset_identity(name)
            if identity in facts.blob_outputs and writer.get(identity) in done:
                kept[identity] = step_identity(graph.groups[writer[identity]].nodes)
    return kept


def _inputs_still_read(facts: ProjectFacts, finished_nodes: tuple[str, ...]) -> dict[str, str]:
    """``facts.remote_inputs`` that a node of this run reads (not only nodes a resumed run finished)."""
    finished = set(finished_nodes)
    read = {name for node in facts.pipeline.nodes if node.name not in finished for name in node.inputs}
    return {name: path for name, path in facts.remote_inputs.items() if name in read}


# --- grouping ----------------------------------------------------------------------------


def grouping_context(request: CompileRequest, facts: ProjectFacts) -> GroupingContext:
    """What the grouper may weigh: which nodes may share a step (a fused step asks for the
    largest cpu and memory of its nodes, but one retry policy, one set of node selectors and
    accelerator, GPU or not, cacheable or not), the target's step start-up, earlier durations."""
    run = facts.run
    traits = {}
    for node in facts.pipeline.nodes:
        retry = node_retry(run.retries, node.name, node.tags)
        traits[node.name] = (
            tuple(sorted(node_selectors(run.node_selectors, node.name, node.tags).items())),
            bool(node_resources(run.resources, node.name, node.tags).get("gpu")),
            retry.model_dump_json() if retry is not None else None,
            run.cache.no_cache_tag in node.tags,
        )
    return GroupingContext(traits=traits, step_start_seconds=request.step_start_seconds,
                           durations=facts.node_durations)


def _report_fusion(facts: ProjectFacts, graph: StepGraph, context: GroupingContext) -> None:
    """Said when the grouping fused nodes: steps and modelled cloud wall time, before and after."""
    nodes = len(facts.pipeline.nodes)
    if len(graph.groups) == nodes:
        return
    singles = [StepGroup(node.name, (node.name,)) for node in facts.pipeline.nodes]
    start, durations = context.step_start_seconds, context.durations
    before = modelled_wall_seconds(singles, group_dependencies(facts.pipeline, singles), durations, start)
    after = modelled_wall_seconds(list(graph.groups.values()), graph.needs, durations, start)
    log.info(f"{nodes} nodes grouped into {len(graph.groups)} steps by {facts.run.grouping.cls}: modelled cloud "
             f"wall time {before:.0f} s -> {after:.0f} s ({start:.0f} s per step start-up"
             + (", node durations of earlier runs)" if durations else ", node durations unknown)"),
             nodes=nodes, steps=len(graph.groups))


# --- steps -------------------------------------------------------------------------------


def _identity(env: str, resume: ResumedRun | None) -> list[str]:
    if resume is not None:
        return identity_args(env, resume.run_id, resume.job_name)
    return identity_args(env, Symbol.RUN_ID.marker, Symbol.JOB_NAME.marker)


def _exec_node_invocation(request: CompileRequest, facts: ProjectFacts,
                          parameters: Sequence[PipelineParameter]) -> ExecNodeInvocation:
    """What every node step is asked, less its nodes and the MLflow run (a resumed run's
    identity, root and version literally: its steps are the run it resumes)."""
    resume = request.resume
    return ExecNodeInvocation(
        nodes=(),
        pipeline=request.pipeline,
        env=facts.env,
        run_id=resume.run_id if resume else Symbol.RUN_ID.marker,
        job_name=resume.job_name if resume else Symbol.JOB_NAME.marker,
        storage_root=resume.storage_root if resume else Symbol.STORAGE_ROOT.marker,
        # Every step of a run saves (and reads back) versioned datasets at one version: the run's.
        save_version=resume.save_version if resume else Symbol.SAVE_VERSION.marker,
        job_create_time=resume.job_create_time if resume else Symbol.JOB_CREATE_TIME.marker,
        load_versions=ExecNodeInvocation.load_version_items(request.load_versions),
        params=tuple(f"{p.kedro_name}:{p.type}={ParameterRef(p.name).marker}" for p in parameters),
        cache=request.cache,
    )


def _body_steps(graph: StepGraph, exec_node: ExecNodeInvocation, facts: ProjectFacts,
                env: Mapping[str, str], served_steps: frozenset[str] = frozenset(),
                resume: ResumedRun | None = None) -> tuple[PlannedStep, ...]:
    """The MLflow start step (with MLflow), then one step per group of nodes, in dependency
    order; the groups in ``served_steps`` replaced by one step that serves them, those a
    resumed run finished left out."""
    tags_of = {node.name: node.tags for node in facts.pipeline.nodes}
    served = _served_groups(graph, served_steps)
    done = _done_groups(graph, resume)
    steps = [_node_step(graph, group, exec_node, tags_of, facts, env, served, done) for group in graph.order
             if group not in served and group not in done]
    if served:
        steps.insert(0, _cache_serve_step(graph, served, exec_node, facts, env))
    if facts.mlflow:
        steps.insert(0, PlannedStep(
            name=MLFLOW_START_STEP, kind=StepKind.MLFLOW_START, command="mlflow-start",
            flags=(*_identity(facts.env, resume), "--output", Symbol.MLFLOW_RUN_ID_OUTPUT.marker), env=env,
        ))
    return tuple(steps)


def _served_groups(graph: StepGraph, served_steps: frozenset[str]) -> list[str]:
    """The groups in ``served_steps`` whose every upstream group is too (a served step never
    waits for one that runs: if it cannot be served after all, it runs in the serving step),
    in dependency order."""
    if not served_steps:
        return []
    from kvx_runtime.cache.key import step_identity

    served: list[str] = []
    for name in graph.order:
        if step_identity(graph.groups[name].nodes) in served_steps and graph.needs[name] <= set(served):
            served.append(name)
    return served


def _done_groups(graph: StepGraph, resume: ResumedRun | None) -> set[str]:
    """The groups the resumed run finished whose every upstream group it finished too (what is
    downstream of a step that runs again runs again: it would read the new outputs)."""
    if resume is None or not resume.done_steps:
        return set()
    from kvx_runtime.cache.key import step_identity

    done: set[str] = set()
    for name in graph.order:
        if step_identity(graph.groups[name].nodes) in resume.done_steps and graph.needs[name] <= done:
            done.add(name)
    return done


def _cache_serve_step(graph: StepGraph, served: Sequence[str], exec_node: ExecNodeInvocation,
                      facts: ProjectFacts, env: Mapping[str, str]) -> PlannedStep:
    """The step that serves ``served``; it has the largest resources of their nodes, since it
    runs any of them it can no longer serve."""
    from kvx_runtime.step.serving import serve_step_arg

    nodes = [node for name in served for node in graph.groups[name].nodes]
    tags_of = {node.name: node.tags for node in facts.pipeline.nodes}
    run = facts.run
    return PlannedStep(
        name=CACHE_SERVE_STEP, kind=StepKind.NODES, command=EXEC_NODE,
        invocation=exec_node.with_values(
            nodes=tuple(nodes), cache="on",
            serve_steps=tuple(serve_step_arg(graph.groups[name].nodes) for name in served),
            mlflow_run_id=Symbol.MLFLOW_RUN_ID.marker if facts.mlflow else None),
        after=(MLFLOW_START_STEP,) if facts.mlflow else (),
        resources=group_resources([node_resources(run.resources, n, tags_of[n]) for n in nodes],
                                  [node_selectors(run.node_selectors, n, tags_of[n]) for n in nodes]),
        env=env,
    )


def _node_step(graph: StepGraph, group_name: str, exec_node: ExecNodeInvocation,
               tags_of: Mapping[str, Any], facts: ProjectFacts, env: Mapping[str, str],
               served: Sequence[str] = (), done: set[str] | frozenset[str] = frozenset()) -> PlannedStep:
    group = graph.groups[group_name]
    run = facts.run
    per_node = [node_resources(run.resources, n, tags_of[n]) for n in group.nodes]
    selectors = [node_selectors(run.node_selectors, n, tags_of[n]) for n in group.nodes]
    check_group_agrees(graph.task_of[group_name], group.nodes, selectors)
    retries = [r for r in (node_retry(run.retries, n, tags_of[n]) for n in group.nodes) if r]
    after = list(dict.fromkeys(CACHE_SERVE_STEP if g in served else graph.task_of[g]
                               for g in sorted(graph.needs[group_name]) if g not in done))
    if facts.mlflow:
        after.append(MLFLOW_START_STEP)  # the node steps log to the MLflow run it opens
    return PlannedStep(
        name=graph.task_of[group_name], kind=StepKind.NODES, command=EXEC_NODE,
        invocation=exec_node.with_values(
            nodes=group.nodes, mlflow_run_id=Symbol.MLFLOW_RUN_ID.marker if facts.mlflow else None),
        after=tuple(after),
        resources=group_resources(per_node, selectors),
        retry=max(retries, key=lambda r: r.max_retry_count, default=None),
        env=env,
    )


def _exit_steps(exec_node: ExecNodeInvocation, facts: ProjectFacts,
                env: Mapping[str, str], resume: ResumedRun | None = None) -> tuple[PlannedStep, ...]:
    """The MLflow end step (with MLflow) and the exit pipeline's step (when configured)."""
    steps: list[PlannedStep] = []
    if facts.mlflow:
        steps.append(PlannedStep(
            name=MLFLOW_END_STEP, kind=StepKind.MLFLOW_END, command="mlflow-end",
            flags=(*_identity(facts.env, resume), "--final-status", Symbol.FINAL_STATUS.marker), env=env,
        ))
    if facts.exit_nodes:
        # The exit pipeline's nodes get their resources, node selectors and retries like any.
        run = facts.run
        tags_of = {node.name: node.tags for node in facts.exit_pipeline.nodes} if facts.exit_pipeline else {}
        nodes = facts.exit_nodes
        selectors = [node_selectors(run.node_selectors, n, tags_of.get(n, ())) for n in nodes]
        check_group_agrees(ON_EXIT_STEP, nodes, selectors)
        retries = [r for r in (node_retry(run.retries, n, tags_of.get(n, ())) for n in nodes) if r]
        steps.append(PlannedStep(
            name=ON_EXIT_STEP, kind=StepKind.ON_EXIT, command=EXEC_NODE, env=env,
            invocation=exec_node.with_values(
                nodes=nodes, pipeline=run.on_exit_pipeline,
                params=(*exec_node.params, f"{FINAL_STATUS_PARAMETER}:dict={Symbol.FINAL_STATUS.marker}"),
            ),
            resources=group_resources([node_resources(run.resources, n, tags_of.get(n, ())) for n in nodes],
                                      selectors),
            retry=max(retries, key=lambda r: r.max_retry_count, default=None),
        ))
    return tuple(steps)


def _code_upload(request: CompileRequest, facts: ProjectFacts) -> CodeUpload | None:
    asked = facts.run.code_upload if request.code_upload is None else request.code_upload
    return CodeUpload(facts.project_path, facts.package_name, facts.conf_root) if asked else None


def _step_env(forwarded: Mapping[str, str], run: Any) -> dict[str, str]:
    """The environment of every step: forwarded variables, run_config.env, S3 and host aliases."""
    env = dict(forwarded)
    env.update(run.env)
    # Steps need the S3 endpoint before they read the project's config: to fetch a code archive.
    env.update({name: value for name, value in ((S3_ENDPOINT_ENV, run.s3.endpoint_url),
                                                 (S3_REGION_ENV, run.s3.region)) if value})
    if run.network.host_aliases:
        env["KVX_HOST_ALIASES"] = ";".join(
            f"{alias.ip}={','.join(alias.hostnames)}" for alias in run.network.host_aliases
        )
    return env


def _warnings(request: CompileRequest, facts: ProjectFacts, graph: StepGraph) -> list[str]:
    """What the pipeline and its configuration look wrong in (logged as found)."""
    pipeline, run = facts.pipeline, facts.run
    node_names = {node.name for node in pipeline.nodes} | facts.named_elsewhere
    tags = {tag for node in pipeline.nodes for tag in node.tags} | facts.named_elsewhere
    warnings: list[str] = []
    for section, table in (("resources", run.resources), ("node_selectors", run.node_selectors),
                           ("retries", run.retries)):
        warnings += [f"run_config.{section}.{k}" for k in warn_unknown_selectors(section, table, node_names, tags)]
    producers = {dataset_identity(out): node.name for node in pipeline.nodes for out in node.outputs}
    consumers: dict[str, list[str]] = {}
    for node in pipeline.nodes:
        for dataset in node.inputs:
            consumers.setdefault(dataset_identity(dataset), []).append(node.name)
    step_of = {node: group.name for group in graph.groups.values() for node in group.nodes}
    for node in facts.exit_pipeline.nodes if facts.exit_pipeline is not None else ():
        reader = f"{node.name} (on exit)"  # a node of both pipelines runs in each
        step_of[reader] = ON_EXIT_STEP
        for dataset in node.inputs:
            consumers.setdefault(dataset_identity(dataset), []).append(reader)
    warnings += warn_local_datasets(facts.dataset_paths, producers, consumers, step_of, request.shared_mounts,
                                    storage_root=facts.storage_root, init_command=request.init_command)
    warnings += [f"input {name} missing" for name in warn_missing_inputs(facts.missing_inputs, facts.storage_root)]
    warnings += [f"env {env} not in image" for env in facts.envs_not_in_image]
    warnings += [f"MLflow configured in {path}, not read by the steps" for path in facts.unread_mlflow_files]
    # Logged when the config is read; here so that --strict refuses a typo that silently does nothing.
    warnings += [f"unknown key {key}" for key in (*facts.unknown_top_level_keys, *unknown_keys(facts.run,
                                                                                              "run_config."))]
    warnings += warn_uncopyable_crossings(facts.memory_datasets_assigned, producers, consumers, step_of)
    if request.gpu_resource_name is None:  # GPUs asked for by accelerator type (Vertex AI)
        gpus = {node.name: node_resources(run.resources, node.name, node.tags).get("gpu") or 0
                for node in pipeline.nodes}
        accelerators = {node.name: node_selectors(run.node_selectors, node.name, node.tags).get(ACCELERATOR_KEY)
                        for node in pipeline.nodes}
        warnings += [f"GPUs of {node} without an accelerator type"
                     for node in warn_gpus_without_accelerator(gpus, accelerators)]
        labelled = sorted(node.name for node in pipeline.nodes
                          if set(node_selectors(run.node_selectors, node.name, node.tags)) - {ACCELERATOR_KEY})
        if labelled:
            log.warning("Vertex AI places steps by machine type and accelerator only: the other node_selectors "
                        "labels of these nodes are not applied", nodes=labelled,
                        hint="keep only cloud.google.com/gke-accelerator for Vertex AI (Kubeflow and Airflow "
                             "pods apply every label)")
            warnings += [f"node labels of {node} not applied on Vertex AI" for node in labelled]
    return warnings


# --- pipeline parameters -------------------------------------------------------------------


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
