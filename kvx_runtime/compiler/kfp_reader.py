"""Reading a compiled KFP pipeline spec: its tasks flattened, as an orchestrator runs them.

run-local executes the tasks, the compiler's checks read the dependencies of the spec just
rendered, and ``status`` rebuilds a failed step's command. Vertex AI's semantics that matter
here: nested DAG components (the exit handler) are flattened, a dependency on a DAG task
means "on every task inside it", inputs come from pipeline parameters, constants, other
tasks' output parameters or a final status, and ``{{$...}}`` placeholders in the command are
substituted before the container starts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvx_runtime.compiler.plan import MLFLOW_END_STEP, MLFLOW_START_STEP
from kvx_runtime.errors import UsageError
from kvx_runtime.params import convert, kind_of_spec_type, quoted

_PLACEHOLDER = re.compile(r"\{\{\$\.([^}]*)(\}?\}?)")  # "{{$." up to its first "}": see substitute()
_INPUT = re.compile(r"^inputs\.parameters\['([^']+)'\]$")
_OUTPUT = re.compile(r"^outputs\.parameters\['([^']+)'\]\.output_file$")


@dataclass
class Source:
    """Where one input parameter of a task comes from."""

    kind: str  # "value" | "output" | "final_status"
    value: Any = None
    producer: str | None = None
    key: str | None = None


@dataclass
class SpecTask:
    name: str
    display_name: str
    container: dict[str, Any]
    input_types: dict[str, str]
    output_names: list[str]
    inputs: dict[str, Source]
    depends_on: set[str] = field(default_factory=set)
    run_after_failure: bool = False
    retry: dict[str, Any] | None = None


@dataclass
class SpecGraph:
    tasks: dict[str, SpecTask]
    #: DAG task name -> the tasks inside it (for final statuses).
    groups: dict[str, set[str]]
    parameters: dict[str, tuple[str, Any]]  # name -> (type, value)


def _typed(kind: str, value: Any) -> Any:
    if kind == "NUMBER_INTEGER" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def render(kind: str, value: Any) -> str:
    """A parameter value as the container sees it: strings as is, everything else as JSON."""
    value = _typed(kind, value)
    if isinstance(value, str):
        return value
    return json.dumps(value)


def spec_pipeline_name(spec: Mapping[str, Any]) -> str:
    """The pipeline's name a spec carries (``pipelineInfo.name``)."""
    return str(spec.get("pipelineInfo", {}).get("name", "pipeline"))


def step_names(spec: Mapping[str, Any]) -> list[str]:
    """The tasks of a compiled spec that run a container, those inside the exit handler too."""
    names: list[str] = []

    def walk(dag: Mapping[str, Any]) -> None:
        for name, task in dag.get("tasks", {}).items():
            component = spec["components"].get(task.get("componentRef", {}).get("name"), {})
            if "dag" in component:
                walk(component["dag"])
            else:
                names.append(name)

    walk(spec["root"].get("dag", {}))
    return names


def describe_steps(names: Iterable[str]) -> str:
    """How many steps a pipeline runs, as compile and run-local both say it: "10 node steps +
    2 MLflow steps" (MLflow's start and end are steps of their own, running no node)."""
    listed = list(names)
    mlflow = sum(name in (MLFLOW_START_STEP, MLFLOW_END_STEP) for name in listed)
    nodes = f"{len(listed) - mlflow} node steps"
    return f"{nodes} + {mlflow} MLflow steps" if mlflow else nodes


def build_graph(spec: Mapping[str, Any], overrides: Mapping[str, Any]) -> SpecGraph:
    components = spec["components"]
    executors = spec["deploymentSpec"]["executors"]
    root = spec["root"]
    definitions = root.get("inputDefinitions", {}).get("parameters", {})
    unknown = sorted(set(overrides) - set(definitions))
    if unknown:
        raise UsageError(
            f"unknown pipeline parameter(s): {', '.join(unknown)}",
            hint=f"this pipeline has: {', '.join(sorted(definitions)) or 'none'}",
        )
    parameters: dict[str, tuple[str, Any]] = {}
    for name, definition in definitions.items():
        kind = definition.get("parameterType", "STRING")
        if name in overrides:
            parameters[name] = (kind, coerce(name, kind, overrides[name]))
        elif "defaultValue" in definition:
            parameters[name] = (kind, _typed(kind, definition["defaultValue"]))
        elif not definition.get("isOptional"):
            raise UsageError(f"pipeline parameter '{name}' has no default: pass --param {name}=...")
    tasks: dict[str, SpecTask] = {}
    groups: dict[str, set[str]] = {}
    scope = {name: Source("value", value) for name, (_, value) in parameters.items()}
    _flatten(root["dag"], scope, components, executors, tasks, groups, set())
    # A dependency on a DAG task means every task inside it.
    for task in tasks.values():
        expanded: set[str] = set()
        for dependency in task.depends_on:
            expanded |= groups.get(dependency, {dependency})
        task.depends_on = expanded
    return SpecGraph(tasks=tasks, groups=groups, parameters=parameters)


def _flatten(
    dag: Mapping[str, Any],
    scope: Mapping[str, Source],
    components: Mapping[str, Any],
    executors: Mapping[str, Any],
    tasks: dict[str, SpecTask],
    groups: dict[str, set[str]],
    outer_dependencies: set[str],
) -> set[str]:
    created: set[str] = set()
    for name, task in dag.get("tasks", {}).items():
        component = components[task["componentRef"]["name"]]
        inputs: dict[str, Source] = {}
        for parameter, source in task.get("inputs", {}).get("parameters", {}).items():
            inputs[parameter] = _source(source, scope)
        depends = set(task.get("dependentTasks", [])) | outer_dependencies
        if "dag" in component:
            members = _flatten(component["dag"], inputs, components, executors, tasks, groups, depends)
            groups[name] = members
            created |= members
            continue
        executor = executors[component["executorLabel"]]
        if name in tasks:
            raise UsageError(f"task name '{name}' appears twice in the spec; cannot run it locally")
        declared = component.get("inputDefinitions", {}).get("parameters", {})
        tasks[name] = SpecTask(
            name=name,
            display_name=task.get("taskInfo", {}).get("name", name),
            container=executor["container"],
            input_types={k: v.get("parameterType", "STRING") for k, v in declared.items()},
            output_names=list(component.get("outputDefinitions", {}).get("parameters", {})),
            inputs=inputs,
            depends_on=depends,
            run_after_failure=task.get("triggerPolicy", {}).get("strategy") == "ALL_UPSTREAM_TASKS_COMPLETED",
            retry=task.get("retryPolicy"),
        )
        created.add(name)
    return created


def _source(source: Mapping[str, Any], scope: Mapping[str, Source]) -> Source:
    if "runtimeValue" in source:
        return Source("value", source["runtimeValue"].get("constant"))
    if "componentInputParameter" in source:
        upstream = source["componentInputParameter"]
        if upstream not in scope:
            raise UsageError(f"spec input '{upstream}' is not defined where it is used")
        return scope[upstream]
    if "taskOutputParameter" in source:
        ref = source["taskOutputParameter"]
        return Source("output", producer=ref["producerTask"], key=ref["outputParameterKey"])
    if "taskFinalStatus" in source:
        return Source("final_status", producer=source["taskFinalStatus"]["producerTask"])
    raise UsageError(f"unsupported input source in spec: {sorted(source)}")


def coerce(name: str, kind: str, value: Any) -> Any:
    """A --param override (text) typed as the spec declares it (kvx_runtime.params' table)."""
    if not isinstance(value, str):
        return value
    try:
        typed_as = kind_of_spec_type(kind)
    except KeyError:
        raise UsageError(f"--param {name}: a {kind} parameter cannot be given on the command line") from None
    try:
        return convert(typed_as, value)
    except ValueError as exc:
        raise UsageError(f"--param {name}: {quoted(value)} is not a valid {kind} ({exc})") from None


def substitute(text: str, values: Mapping[str, str]) -> str:
    """Replace every ``{{$.x}}`` placeholder; an unknown one is an error, never left in."""

    def replace(match: re.Match[str]) -> str:
        key = match.group(1)
        if not key or match.group(2) != "}}":
            # Not a placeholder, and none starts inside it (all would stop at the same "}"): it
            # is skipped whole, in linear time ("[^}]+}}" rescanned it from each "{{$.").
            return match.group(0)
        if key not in values:
            raise UsageError(f"placeholder {{{{$.{key}}}}} has no value in a local run")
        return values[key]

    return _PLACEHOLDER.sub(replace, text)


def input_key(name: str) -> str:
    return f"inputs.parameters['{name}']"


def output_key(name: str) -> str:
    return f"outputs.parameters['{name}'].output_file"
