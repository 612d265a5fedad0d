"""Groupers that fuse nodes into fewer steps.

On a managed orchestrator every step pays a start-up before its node runs (Vertex AI: a
machine, about a minute; Kubeflow and Airflow: a pod), so a pipeline's wall time and cost are
often more start-ups than work. Fusing never changes outputs (a fused step runs its nodes in
one Kedro session, in the pipeline's order), only where intermediates live and how much runs
in parallel.

- :class:`ChainNodeGrouper` fuses chains: after a transitive reduction of the node graph, a
  node whose only successor has it as only predecessor shares that successor's step. Nothing
  that could run in parallel is serialised, so the modelled wall time never grows.
- :class:`AutoNodeGrouper` starts from the chains and, where every node's duration is known
  (an earlier run's, or given), goes on fusing steps while the modelled wall time (the
  critical path, each step counted as its start-up plus its nodes' durations) does not grow
  by more than a tolerance: a fan-out of short nodes becomes one step, two long branches stay
  apart. Without durations it is the chain grouper (a static rule that loses nothing).

Nodes fuse only when the :class:`~.base.GroupingContext` finds them compatible (same retry
policy, node selectors and accelerator, GPU or not, cacheable or not); the fused step asks for
the largest cpu and memory of its nodes (the compiler's rule for every group).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import Any

from kvx_runtime.errors import ConfigError
from kvx_runtime.grouping.base import GroupingContext, NodeGrouper, StepGroup, order_groups

__all__ = ["AutoNodeGrouper", "ChainNodeGrouper", "modelled_wall_seconds"]

#: Above this many steps after chain fusion, ``auto`` keeps the chains (its search would take
#: longer than the compile should).
_AUTO_SEARCH_LIMIT = 400


def _node_graph(pipeline: Any) -> tuple[list[str], dict[str, set[str]]]:
    """The pipeline's nodes in its (topological) order and each node's direct predecessors."""
    order = [node.name for node in pipeline.nodes]
    parents: dict[str, set[str]] = {name: set() for name in order}
    for child, found in pipeline.node_dependencies.items():
        parents[child.name] = {parent.name for parent in found}
    return order, parents


def _reduced(order: Sequence[str], parents: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """Each node's predecessors in the transitive reduction (an edge implied by a longer path
    is dropped), with ancestor sets as bit masks over the topological order."""
    index = {name: position for position, name in enumerate(order)}
    ancestors: dict[str, int] = {}
    reduced: dict[str, set[str]] = {}
    for name in order:
        above = 0  # every ancestor of some predecessor
        for parent in parents[name]:
            above |= ancestors[parent]
        reduced[name] = {parent for parent in parents[name] if not (above >> index[parent]) & 1}
        ancestors[name] = above | sum(1 << index[parent] for parent in parents[name])
    return reduced


def _fused_name(nodes: Sequence[str]) -> str:
    return nodes[0] if len(nodes) == 1 else f"{nodes[0]} and {len(nodes) - 1} more"


def _groups_of(members: Sequence[Sequence[str]], tags: Mapping[str, frozenset[str]]) -> list[StepGroup]:
    return [StepGroup(_fused_name(nodes), tuple(nodes), frozenset(tag for node in nodes for tag in tags[node]))
            for nodes in members]


def chains(pipeline: Any, context: GroupingContext) -> list[list[str]]:
    """The pipeline's nodes fused along chains of compatible nodes, in the pipeline's order."""
    order, parents = _node_graph(pipeline)
    reduced = _reduced(order, parents)
    successors: dict[str, int] = dict.fromkeys(order, 0)
    for name in order:
        for parent in reduced[name]:
            successors[parent] += 1
    chain_of: dict[str, int] = {}
    members: list[list[str]] = []
    for name in order:
        if len(reduced[name]) == 1:
            (parent,) = reduced[name]
            if successors[parent] == 1 and context.compatible(parent, name):
                chain_of[name] = chain_of[parent]
                members[chain_of[name]].append(name)
                continue
        chain_of[name] = len(members)
        members.append([name])
    return members


def modelled_wall_seconds(groups: Sequence[StepGroup], needs: Mapping[str, set[str]],
                          durations: Mapping[str, float], step_start_seconds: float) -> float:
    """The pipeline's modelled wall time: its critical path, each step counted as its start-up
    plus the durations of its nodes (an unknown duration counts 0)."""
    weight = {group.name: step_start_seconds + sum(durations.get(node, 0.0) for node in group.nodes)
              for group in groups}
    finish: dict[str, float] = {}
    for name in order_groups({name: set(needs.get(name, ())) for name in weight}):
        finish[name] = max((finish[parent] for parent in needs.get(name, ())), default=0.0) + weight[name]
    return max(finish.values(), default=0.0)


class ChainNodeGrouper(NodeGrouper):
    """Fuses chains of compatible nodes (no parallelism lost): ``run_config.grouping.cls: chain``."""

    def __init__(self) -> None:  # no parameters: a misspelt one is refused, not ignored
        super().__init__()

    def group(self, pipeline: Any) -> list[StepGroup]:
        return self.groups(pipeline, GroupingContext())

    def groups(self, pipeline: Any, context: GroupingContext) -> list[StepGroup]:
        return _groups_of(chains(pipeline, context), {node.name: frozenset(node.tags) for node in pipeline.nodes})


class AutoNodeGrouper(NodeGrouper):
    """Fuses chains, then, where node durations are known, whatever saves step start-ups without
    making the modelled wall time longer than ``max_delay_seconds`` (default: a tenth of a step's
    start-up) beyond the best found: ``run_config.grouping.cls: auto``.

    ``step_start_seconds``: a step's start-up (default: the target's; 60 s on Vertex AI);
    ``durations``: node -> seconds, over those of earlier runs (``use_earlier_runs``, default
    true: the project's run-local runs, :mod:`.timings`)."""

    uses_durations = True

    def __init__(self, step_start_seconds: float | None = None, max_delay_seconds: float | None = None,
                 durations: Mapping[str, float] | None = None, use_earlier_runs: bool = True) -> None:
        super().__init__(step_start_seconds=step_start_seconds, max_delay_seconds=max_delay_seconds,
                         durations=durations, use_earlier_runs=use_earlier_runs)
        for name, value in (("step_start_seconds", step_start_seconds), ("max_delay_seconds", max_delay_seconds)):
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
                raise ConfigError(f"run_config.grouping.params.{name}: {value!r} is not a number of seconds >= 0")
        given = dict(durations or {})
        bad = [name for name, value in given.items()
               if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0]
        if bad:
            raise ConfigError(f"run_config.grouping.params.durations: {', '.join(map(repr, bad))} "
                              "not a number of seconds >= 0")
        self.step_start_seconds = step_start_seconds
        self.max_delay_seconds = max_delay_seconds
        self.durations = {name: float(value) for name, value in given.items()}
        self.use_earlier_runs = use_earlier_runs

    def group(self, pipeline: Any) -> list[StepGroup]:
        return self.groups(pipeline, GroupingContext())

    def groups(self, pipeline: Any, context: GroupingContext) -> list[StepGroup]:
        tags = {node.name: frozenset(node.tags) for node in pipeline.nodes}
        members = chains(pipeline, context)
        durations = {**(context.durations if self.use_earlier_runs else {}), **self.durations}
        if len(members) > _AUTO_SEARCH_LIMIT or not all(node in durations for nodes in members for node in nodes):
            return _groups_of(members, tags)
        start = context.step_start_seconds if self.step_start_seconds is None else float(self.step_start_seconds)
        delay = start / 10 if self.max_delay_seconds is None else float(self.max_delay_seconds)
        order, parents = _node_graph(pipeline)
        search = _Search(members, order, parents, durations, start, context)
        return _groups_of(search.fuse(delay), tags)


class _Search:
    """Greedy fusion of steps: each round takes, of the compatible sets of steps that can be
    fused without a cycle (a step and its successor, two successors of one step, two first
    steps, a step with all its predecessors or all its successors), the one giving the
    shortest modelled wall time, while that stays within ``delay`` of the best seen."""

    def __init__(self, members: list[list[str]], order: Sequence[str], node_parents: Mapping[str, set[str]],
                 durations: Mapping[str, float], start: float, context: GroupingContext) -> None:
        self.rank = {node: index for index, node in enumerate(order)}
        step_of = {node: index for index, nodes in enumerate(members) for node in nodes}
        self.members = {index: list(nodes) for index, nodes in enumerate(members)}
        self.parents: dict[int, set[int]] = {index: set() for index in self.members}
        for child, found in node_parents.items():
            self.parents[step_of[child]] |= {step_of[parent] for parent in found} - {step_of[child]}
        self.work = {index: sum(durations[node] for node in nodes) for index, nodes in self.members.items()}
        self.trait = {index: context.traits.get(nodes[0]) for index, nodes in self.members.items()}
        self.start = start

    def _merged_parents(self, fused: frozenset[int]) -> dict[int, set[int]]:
        keep = min(fused)
        parents = {index: {keep if parent in fused else parent for parent in found} - {index}
                   for index, found in self.parents.items() if index not in fused}
        parents[keep] = {keep if parent in fused else parent for member in fused for parent in self.parents[member]}
        parents[keep] -= {keep}
        return parents

    def wall(self, fused: frozenset[int] = frozenset()) -> float:
        """The modelled wall time now, or with the steps ``fused`` as one."""
        parents, work = self.parents, self.work
        if fused:
            parents = self._merged_parents(fused)
            work = {index: seconds for index, seconds in work.items() if index not in fused}
            work[min(fused)] = sum(self.work[member] for member in fused)
        finish: dict[int, float] = {}
        for index in order_groups({index: set(found) for index, found in parents.items()}):
            finish[index] = max((finish[parent] for parent in parents[index]), default=0.0) + self.start + work[index]
        return max(finish.values(), default=0.0)

    def _candidates(self) -> list[frozenset[int]]:
        children: dict[int, set[int]] = {index: set() for index in self.members}
        for child, parents in self.parents.items():
            for parent in parents:
                children[parent].add(child)
        sets = {frozenset((parent, child)) for child, parents in self.parents.items() for parent in parents}
        sets |= {frozenset((index, *parents)) for index, parents in self.parents.items() if len(parents) > 1}
        sets |= {frozenset((index, *found)) for index, found in children.items() if len(found) > 1}
        for found in [*children.values(), [index for index, parents in self.parents.items() if not parents]]:
            ordered = sorted(found)
            sets |= {frozenset(pair) for pair in pairwise(ordered)}
        # Descendants as bit masks: steps fuse without a cycle unless a path leaves the set and
        # comes back into it.
        below: dict[int, int] = {}
        for index in reversed(order_groups({index: set(found) for index, found in self.parents.items()})):
            below[index] = 0
            for child in children[index]:
                below[index] |= below[child] | (1 << child)

        def legal(fused: frozenset[int]) -> bool:
            if len({self.trait[member] for member in fused}) != 1:
                return False
            inside = sum(1 << member for member in fused)
            return not any(below[child] & inside for member in fused for child in children[member] - fused)

        return sorted((fused for fused in sets if legal(fused)), key=sorted)

    def fuse(self, delay: float) -> list[list[str]]:
        best = self.wall()
        while len(self.members) > 1:
            scored = [(self.wall(fused), sorted(fused), fused) for fused in self._candidates()]
            if not scored:
                break
            wall, _, fused = min(scored, key=lambda item: (item[0], item[1]))
            if wall > best + delay:
                break
            keep = min(fused)
            self.parents = self._merged_parents(fused)
            self.members[keep] = sorted((node for member in fused for node in self.members.pop(member)),
                                        key=self.rank.__getitem__)
            self.work[keep] = sum(self.work.pop(member) for member in fused)
            for member in fused - {keep}:
                self.trait.pop(member)
            best = min(best, wall)
        return sorted(self.members.values(), key=lambda nodes: self.rank[nodes[0]])
