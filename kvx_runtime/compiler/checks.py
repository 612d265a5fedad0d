"""Checks of a compiled spec and of the pipeline before compiling it.

``check_references`` does what protobuf parsing cannot: every ``dependentTasks`` entry,
``componentRef``, ``executorLabel``, ``producerTask`` and input parameter must resolve, and
every ``{{$.inputs.parameters['x']}}`` placeholder must name a declared input. run-local
uses it too, so a hand-edited spec fails with a clear message instead of a KeyError.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kvx_runtime.compiler.kfp_reader import build_graph
from kvx_runtime.config.storage_root import is_on_this_machine, under_storage_root
from kvx_runtime.errors import ConfigError
from kvx_runtime.graph import dataset_identity, missing_step_dependencies
from kvx_runtime.log import get_logger
from kvx_runtime.targets.registry import VERTEX_SHARED_MOUNTS

log = get_logger(__name__)

_INPUT_PLACEHOLDER = re.compile(r"\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}")
_OUTPUT_PLACEHOLDER = re.compile(r"\{\{\$\.outputs\.parameters\['([^']+)'\]\.output_file\}\}")


def _dag_problems(
    where: str,
    dag: Mapping[str, Any],
    components: Mapping[str, Any],
    available_inputs: Mapping[str, Any],
) -> list[str]:
    problems: list[str] = []
    tasks = dag.get("tasks", {})
    for name, task in tasks.items():
        here = f"{where}.tasks.{name}"
        ref = task.get("componentRef", {}).get("name")
        component = components.get(ref)
        if component is None:
            problems.append(f"{here}: componentRef '{ref}' does not exist")
            continue
        for dependency in task.get("dependentTasks", []):
            if dependency not in tasks:
                problems.append(f"{here}: dependentTasks '{dependency}' is not a task of this dag")
        declared = component.get("inputDefinitions", {}).get("parameters", {})
        given = task.get("inputs", {}).get("parameters", {})
        for parameter, source in given.items():
            if parameter not in declared:
                problems.append(f"{here}: input '{parameter}' is not declared by {ref}")
            if "componentInputParameter" in source and source["componentInputParameter"] not in available_inputs:
                problems.append(
                    f"{here}: input '{parameter}' reads '{source['componentInputParameter']}', "
                    f"which {where} does not declare"
                )
            for key in ("taskOutputParameter", "taskFinalStatus"):
                producer = source.get(key, {}).get("producerTask")
                if key in source and producer not in tasks:
                    problems.append(f"{here}: input '{parameter}' comes from unknown task '{producer}'")
            if "taskOutputParameter" in source:
                producer_task = tasks.get(source["taskOutputParameter"].get("producerTask"), {})
                producer_component = components.get(producer_task.get("componentRef", {}).get("name"), {})
                outputs = producer_component.get("outputDefinitions", {}).get("parameters", {})
                key_name = source["taskOutputParameter"].get("outputParameterKey")
                if producer_task and key_name not in outputs:
                    problems.append(f"{here}: input '{parameter}' reads missing output '{key_name}'")
        missing = [p for p, d in declared.items() if p not in given and not d.get("isOptional")]
        if missing:
            problems.append(f"{here}: required inputs not given: {', '.join(sorted(missing))}")
        if "dag" in component:
            problems += _dag_problems(
                f"components.{ref}.dag", component["dag"], components, declared
            )
    return problems


def check_references(spec: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` listing every dangling reference in ``spec``."""
    problems: list[str] = []
    components = spec.get("components", {})
    executors = spec.get("deploymentSpec", {}).get("executors", {})
    for name, component in components.items():
        label = component.get("executorLabel")
        if label is None:
            if "dag" not in component:
                problems.append(f"components.{name}: neither an executorLabel nor a dag")
            continue
        executor = executors.get(label)
        if executor is None:
            problems.append(f"components.{name}: executorLabel '{label}' does not exist")
            continue
        declared_in = component.get("inputDefinitions", {}).get("parameters", {})
        declared_out = component.get("outputDefinitions", {}).get("parameters", {})
        container = executor.get("container", {})
        for arg in [*container.get("command", []), *container.get("args", [])]:
            for used in _INPUT_PLACEHOLDER.findall(str(arg)):
                if used not in declared_in:
                    problems.append(f"deploymentSpec.executors.{label}: placeholder input '{used}' is not declared")
            for used in _OUTPUT_PLACEHOLDER.findall(str(arg)):
                if used not in declared_out:
                    problems.append(f"deploymentSpec.executors.{label}: placeholder output '{used}' is not declared")
    root = spec.get("root", {})
    problems += _dag_problems(
        "root.dag", root.get("dag", {}), components, root.get("inputDefinitions", {}).get("parameters", {})
    )
    if problems:
        raise ConfigError("the pipeline spec has dangling references: " + "; ".join(problems))


def warn_unknown_selectors(
    section: str, keys: Iterable[str], node_names: set[str], tags: set[str]
) -> list[str]:
    """Entries of resources / node_selectors / retries that name no node and no tag."""
    unknown = sorted(k for k in keys if k != "__default__" and k not in node_names and k not in tags)
    if unknown:
        log.warning(
            f"run_config.{section} names nodes or tags that the pipeline does not have",
            entries=unknown,
        )
    return unknown


def is_local_path(filepath: str, shared_mounts: Sequence[str] = VERTEX_SHARED_MOUNTS) -> bool:
    """A path on the step machine's own disk (each step has its own disk), unless under one of
    ``shared_mounts``, a mount every step of the target sees (a Kubeflow pod has none)."""
    path = filepath.removeprefix("file://")
    return is_on_this_machine(path) and not path.startswith(tuple(shared_mounts))


def check_node_dependencies(pipeline: Any, steps: Mapping[str, Sequence[str]], spec: Mapping[str, Any],
                            finished: Collection[str] = ()) -> None:
    """Every edge of Kedro's ``node_dependencies`` must be a (transitive) dependency between
    the steps of ``spec`` (``steps``: task -> its nodes), as an orchestrator reads the spec;
    edges from ``finished`` nodes (a resumed run's: their outputs are there) excepted.

    A violation means a step could start before the data it reads is written (and read an
    earlier run's file): a :class:`ConfigError`, never a spec.
    """
    graph = build_graph(spec, {})
    step_of = {node: task for task, nodes in steps.items() for node in nodes}
    needs = {task: graph.tasks[task].depends_on if task in graph.tasks else set() for task in steps}
    missing = [(child, parent) for child, parent in missing_step_dependencies(pipeline, step_of, needs)
               if parent not in finished]
    if missing:
        shown = "; ".join(
            f"'{child}' (step {step_of.get(child)}) reads what '{parent}' (step {step_of.get(parent)}) writes"
            for child, parent in missing[:5]
        )
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ConfigError(
            f"the spec does not order {len(missing)} of Kedro's node dependencies: {shown}{more}; "
            "a step could read data before it is written, so no spec was written",
            hint="this is a bug in the node grouper or the compiler: please report it",
        )


def warn_local_datasets(
    dataset_paths: Mapping[str, str],
    producers: Mapping[str, str],
    consumers: Mapping[str, list[str]],
    step_of: Mapping[str, str],
    shared_mounts: Sequence[str] = VERTEX_SHARED_MOUNTS,
    *,
    storage_root: str | None = None,
    init_command: str = "kvx-runtime init",
) -> list[str]:
    """Catalog datasets on a local path that one step writes and another reads.

    ``dataset_paths`` is keyed by catalog name (``x@pandas``), ``producers`` and ``consumers``
    by dataset identity (``x``): a transcoded pair on one local file is one dataset. A path
    under the run's ``storage_root`` is shared by every step (a local root: run-local's).
    """
    flagged: list[str] = []
    for dataset, path in sorted(dataset_paths.items()):
        identity = dataset_identity(dataset)
        producer = producers.get(identity)
        if producer is None or not is_local_path(path, shared_mounts) or identity in flagged:
            continue
        if storage_root is not None and under_storage_root(path, storage_root):
            continue
        readers = [n for n in consumers.get(identity, []) if step_of.get(n) != step_of.get(producer)]
        if readers:
            flagged.append(identity)
            mount = ("/gcs/ is Vertex AI's Cloud Storage mount, which Kubeflow pods do not have; "
                     if any(path.startswith(m) for m in VERTEX_SHARED_MOUNTS) else "")
            log.warning(
                f"catalog dataset '{dataset}' is on a local path ({path}) that node '{producer}' "
                f"writes and node '{readers[0]}' reads in another step: each step has its own disk "
                f"(a Vertex AI machine, a Kubeflow pod), so the reader will not find it; {mount}use a "
                f"gs:// or s3:// path: `{init_command} --cloud-env cloud` writes a Kedro env that puts every "
                "local dataset under the storage root (then compile with --env cloud)",
                dataset=dataset,
                writer=producer,
                readers=readers,
            )
    return flagged


def warn_missing_inputs(missing: Mapping[str, str], storage_root: str) -> list[str]:
    """Pipeline inputs the catalog reads from under the (local) storage root that are not there:
    the first step reading one would fail. Returns their names (warned)."""
    prefix = len(storage_root.removeprefix("file://").rstrip("/")) + 1
    for name, path in sorted(missing.items()):
        relative = path.removeprefix("file://")[prefix:]
        log.warning(
            f"pipeline input '{name}' is read from {path}, which does not exist: copy it there before the "
            f"run (the project's own copy is usually {relative})",
            dataset=name,
        )
    return sorted(missing)


def warn_uncopyable_crossings(
    assigned: Iterable[str],
    producers: Mapping[str, str],
    consumers: Mapping[str, list[str]],
    step_of: Mapping[str, str],
) -> list[str]:
    """Datasets the catalog keeps in memory uncopied (``copy_mode: assign``, e.g. a Spark
    DataFrame) that one step writes and another reads: between steps they would be pickled,
    which such objects refuse at run time. Returns their names (warned)."""
    flagged: list[str] = []
    for dataset in sorted(assigned):
        producer = producers.get(dataset_identity(dataset))
        readers = [n for n in consumers.get(dataset_identity(dataset), [])
                   if producer is not None and step_of.get(n) != step_of.get(producer)]
        if not readers:
            continue
        flagged.append(dataset)
        log.warning(
            f"catalog dataset '{dataset}' is a MemoryDataset with copy_mode: assign (an object that cannot be "
            f"copied, such as a Spark DataFrame) that node '{producer}' writes and node '{readers[0]}' reads in "
            "another step: crossing steps pickles it, which such objects refuse",
            hint="persist it (e.g. spark.SparkDataset under the storage root), or run its producer and consumers "
            "in one step (run_config.grouping)",
        )
    return flagged


def warn_gpus_without_accelerator(gpus: Mapping[str, int], accelerators: Mapping[str, str | None]) -> list[str]:
    """Nodes asking for GPUs with no accelerator type, on a target that asks for GPUs by type
    (Vertex AI refuses a count without a type when the job is submitted). Returns them (warned)."""
    flagged = sorted(node for node, count in gpus.items() if count and not accelerators.get(node))
    if flagged:
        log.warning(
            f"nodes ask for GPUs without an accelerator type, which Vertex AI refuses: {', '.join(flagged)}",
            hint="name it in run_config.node_selectors (cloud.google.com/gke-accelerator: NVIDIA_TESLA_T4, for one)",
        )
    return flagged


def warn_envs_not_in_image(project_path: Path, conf_root: Path, envs: Iterable[str]) -> list[str]:
    """Config environments the steps use that the project's .dockerignore leaves out of the
    image (every file of ``conf/<env>`` excluded): steps would fail only once in the cloud."""
    from kvx_runtime.dockerignore import DockerIgnore

    ignore = DockerIgnore.of_project(project_path)
    if ignore is None:
        return []
    flagged: list[str] = []
    for env in dict.fromkeys(envs):
        directory = conf_root / env
        try:
            relative = directory.relative_to(project_path)
        except ValueError:  # configuration outside the build context
            continue
        files = [p.relative_to(project_path).as_posix() for p in directory.rglob("*") if p.is_file()]
        if files and all(ignore.excludes(name) for name in files):
            flagged.append(env)
            log.warning(
                f"steps will use config environment '{env}', but the project's .dockerignore leaves "
                f"{relative.as_posix()}/ out of the image: every step would fail in the cloud; compile "
                "with --env naming an environment the image contains",
                env=env,
            )
    return flagged
