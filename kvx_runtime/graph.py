"""Graph facts of a Kedro pipeline, asked of Kedro rather than re-derived.

Two names are one dataset when Kedro says so: ``model_input@spark`` and ``model_input@pandas``
are the same data (transcoding), so a node that writes one and a node that reads the other
depend on each other. Everything that decides where data goes or which step waits for which
(step planning, grouping, blob names, compile checks, the exit pipeline) goes through
:func:`dataset_identity` and Kedro's own ``Pipeline.node_dependencies``.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvx_runtime.errors import ConfigError, UsageError

__all__ = [
    "StepPlan",
    "dataset_identity",
    "is_parameter",
    "missing_step_dependencies",
    "plan_step",
    "step_dependencies",
]

_PARAMS_PREFIX = "params:"


def dataset_identity(name: str) -> str:
    """The dataset ``name`` stands for, with Kedro's transcoding (``name@format``) resolved."""
    from kedro.pipeline.transcoding import _strip_transcoding

    return str(_strip_transcoding(name))


def is_parameter(name: str) -> bool:
    return name == "parameters" or name.startswith(_PARAMS_PREFIX)


@dataclass(frozen=True)
class StepPlan:
    """The datasets at the boundary of a step, before the catalog decides which are blobs.

    Dataset names are the nodes' own (with any ``@format``); whether two names meet is
    decided by their :func:`dataset_identity`.
    """

    pipeline: str
    nodes: tuple[str, ...]
    #: Inputs of the group produced outside it (or by nobody), excluding parameters.
    inputs: tuple[str, ...]
    #: Outputs of the group that nodes outside it consume.
    crossing_outputs: tuple[str, ...]
    #: Outputs nobody in the pipeline consumes.
    final_outputs: tuple[str, ...]
    #: Crossing outputs that nodes inside the group also consume (kept in memory too).
    shared_outputs: frozenset[str]
    #: dataset identity -> name of the node that produces it in the pipeline.
    producers: Mapping[str, str]

    def produced_in_pipeline(self, name: str) -> bool:
        return dataset_identity(name) in self.producers


def _unknown_node_error(unknown: Iterable[str], known: Sequence[str], pipeline: str) -> UsageError:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        # Namespaced pipelines: "train_model" should find "data_science.train_model".
        close += [k for k in known if k.endswith("." + name) and k not in close]
        parts.append(f"'{name}'" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    return UsageError(
        f"pipeline '{pipeline}' has no node {', '.join(parts)}",
        hint=f"it has {len(known)} nodes; `kedro registry describe --name {pipeline}` lists them",
    )


def plan_step(
    pipeline: Any,
    pipeline_name: str,
    node_names: Sequence[str],
    consumed_elsewhere: Collection[str] = (),
) -> StepPlan:
    """Find the datasets that cross the boundary of the group ``node_names`` in ``pipeline``.

    ``consumed_elsewhere`` names datasets that a later step outside ``pipeline`` reads (the
    exit handler's ``on_exit_pipeline``): outputs among them cross the boundary too.
    """
    known = [node.name for node in pipeline.nodes]
    unknown = [name for name in node_names if name not in set(known)]
    if unknown:
        raise _unknown_node_error(unknown, known, pipeline_name)
    selected = set(node_names)
    group = [node for node in pipeline.nodes if node.name in selected]
    others = [node for node in pipeline.nodes if node.name not in selected]

    producers = {dataset_identity(output): node.name for node in pipeline.nodes for output in node.outputs}
    produced_inside = {dataset_identity(output) for node in group for output in node.outputs}
    consumed_inside = {dataset_identity(name) for node in group for name in node.inputs}
    consumed_outside = {dataset_identity(name) for node in others for name in node.inputs}
    consumed_outside |= {dataset_identity(name) for name in consumed_elsewhere}

    inputs = {
        name
        for node in group
        for name in node.inputs
        if dataset_identity(name) not in produced_inside and not is_parameter(name)
    }
    outputs = {output for node in group for output in node.outputs}
    crossing = {name for name in outputs if dataset_identity(name) in consumed_outside}
    final = {
        name
        for name in outputs
        if dataset_identity(name) not in consumed_outside and dataset_identity(name) not in consumed_inside
    }
    return StepPlan(
        pipeline=pipeline_name,
        nodes=tuple(node.name for node in group),
        inputs=tuple(sorted(inputs)),
        crossing_outputs=tuple(sorted(crossing)),
        final_outputs=tuple(sorted(final)),
        shared_outputs=frozenset(name for name in crossing if dataset_identity(name) in consumed_inside),
        producers=producers,
    )


def step_dependencies(pipeline: Any, step_of: Mapping[str, str]) -> dict[str, set[str]]:
    """step -> the steps it needs, from Kedro's ``node_dependencies`` (``step_of``: node -> step).

    Every node must belong to a step; a step never needs itself.
    """
    missing = [node.name for node in pipeline.nodes if node.name not in step_of]
    if missing:
        raise ConfigError(f"grouping left nodes without a step: {', '.join(missing)}")
    needs: dict[str, set[str]] = {step: set() for step in dict.fromkeys(step_of.values())}
    for child, parents in pipeline.node_dependencies.items():
        for parent in parents:
            if step_of[parent.name] != step_of[child.name]:
                needs[step_of[child.name]].add(step_of[parent.name])
    return needs


def _ancestors(needs: Mapping[str, Collection[str]]) -> dict[str, set[str]]:
    """step -> every step it (transitively) waits for."""
    closure: dict[str, set[str]] = {}

    def visit(step: str) -> None:
        found: set[str] = set()
        stack = list(needs.get(step, ()))
        while stack:
            current = stack.pop()
            if current in found:
                continue
            found.add(current)
            known = closure.get(current)
            if known is not None:
                # Closed already: all of its ancestors at once, none of them walked again
                # (walking them made a chain of n steps cost n^3).
                found |= known
            else:
                stack.extend(needs.get(current, ()))
        closure[step] = found

    for step in needs:
        visit(step)
    return closure


def missing_step_dependencies(
    pipeline: Any, step_of: Mapping[str, str], needs: Mapping[str, Collection[str]]
) -> list[tuple[str, str]]:
    """Edges (child node, parent node) of Kedro's ``node_dependencies`` that the step graph
    ``needs`` (step -> steps it directly waits for) does not enforce, even transitively."""
    ancestors = _ancestors(needs)
    missing = []
    for child, parents in pipeline.node_dependencies.items():
        child_step = step_of.get(child.name)
        waits_for = ancestors.get(child_step, set()) if child_step is not None else set()
        for parent in parents:
            parent_step = step_of.get(parent.name)
            if parent_step is None or (parent_step != child_step and parent_step not in waits_for):
                missing.append((child.name, parent.name))
    return sorted(missing)
