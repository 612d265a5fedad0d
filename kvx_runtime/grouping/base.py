"""The grouper interface: :class:`NodeGrouper` turns a pipeline into :class:`StepGroup` s,
told what it may weigh by a :class:`GroupingContext`; and the rules every grouping obeys
(dependencies from Kedro's own, no cycle between steps)."""

from __future__ import annotations

import graphlib
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvx_runtime.errors import ConfigError

__all__ = [
    "GroupingContext",
    "NodeGrouper",
    "StepGroup",
    "build_grouper",
    "group_dependencies",
    "order_groups",
    "tags_and_names",
]

Step = TypeVar("Step", bound=Hashable)

#: Short names, and class paths of the kedro-vertexai family, mapped to ours.
_ALIASES = {
    "identity": "kvx_runtime.grouping.IdentityNodeGrouper",
    "tag": "kvx_runtime.grouping.TagNodeGrouper",
    "chain": "kvx_runtime.grouping.ChainNodeGrouper",
    "auto": "kvx_runtime.grouping.AutoNodeGrouper",
    "kedro_vertexai.grouping.IdentityNodeGrouper": "kvx_runtime.grouping.IdentityNodeGrouper",
    "kedro_vertexai.grouping.TagNodeGrouper": "kvx_runtime.grouping.TagNodeGrouper",
}

#: What a step costs before its node starts when the target does not say (Vertex AI's machine).
DEFAULT_STEP_START_SECONDS = 60.0


@dataclass(frozen=True)
class StepGroup:
    """Nodes that run together in one step. ``name`` is the group's own name (before the
    compiler turns it into a task name); ``nodes`` keep the pipeline's topological order."""

    name: str
    nodes: tuple[str, ...]
    tags: frozenset[str] = frozenset()


@dataclass(frozen=True)
class GroupingContext:
    """What the compiler tells a grouper about the project and the target (the fusing groupers
    weigh it; the others need none of it)."""

    #: node -> what must be equal for two nodes to share a step (their retry policy, node
    #: selectors and accelerator, whether they need a GPU, whether the step cache may serve
    #: them); a node missing here is compatible with every other.
    traits: Mapping[str, Hashable] = field(default_factory=dict)
    #: Seconds a step of the target spends before its node starts (machine, image, start-up).
    step_start_seconds: float = DEFAULT_STEP_START_SECONDS
    #: node -> seconds it took in an earlier run (:mod:`.timings`); nodes missing: unknown.
    durations: Mapping[str, float] = field(default_factory=dict)

    def compatible(self, first: str, second: str) -> bool:
        return self.traits.get(first) == self.traits.get(second)


class NodeGrouper(ABC):
    """Turns a Kedro pipeline into step groups. Subclass it to group differently: implement
    :meth:`group`; a grouper that weighs the project (resources, durations) overrides
    :meth:`groups`, which the compiler calls."""

    #: It weighs node durations of earlier runs: the compiler reads them for it.
    uses_durations = False

    def __init__(self, **params: Any) -> None:
        self.params = params

    @abstractmethod
    def group(self, pipeline: Any) -> list[StepGroup]:
        """Every node of ``pipeline`` in exactly one group."""

    def groups(self, pipeline: Any, context: GroupingContext) -> list[StepGroup]:
        """The compiler's call: :meth:`group`, the ``context`` unused unless overridden."""
        return self.group(pipeline)


def build_grouper(cls_path: str, params: dict[str, Any]) -> NodeGrouper:
    from kvx_runtime.dynamic_config import import_object

    cls = import_object(_ALIASES.get(cls_path, cls_path), what="run_config.grouping.cls")
    if not (isinstance(cls, type) and issubclass(cls, NodeGrouper)):
        raise ConfigError(
            f"run_config.grouping.cls: {cls_path} is not a subclass of kvx_runtime.grouping.NodeGrouper"
        )
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(f"run_config.grouping.params: {exc}") from None


def group_dependencies(pipeline: Any, groups: Sequence[StepGroup]) -> dict[str, set[str]]:
    """group name -> names of the groups it needs, from Kedro's ``node_dependencies`` (so a
    node reading ``x@pandas`` waits for the node writing ``x@spark``)."""
    from kvx_runtime.graph import step_dependencies

    return step_dependencies(pipeline, {node: group.name for group in groups for node in group.nodes})


def order_groups(needs: Mapping[Step, set[Step]]) -> list[Step]:
    """Topological order of groups; a cycle (possible after grouping) is a ConfigError."""
    sorter = graphlib.TopologicalSorter(needs)
    try:
        return list(sorter.static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1] if len(exc.args) > 1 else []
        raise ConfigError(
            "the node grouping creates a cycle between steps: "
            + " -> ".join(map(str, cycle))
            + "; regroup the nodes so that no group both feeds and needs another"
        ) from None


def tags_and_names(groups: Iterable[StepGroup]) -> tuple[set[str], set[str]]:
    """All node names and tags in ``groups`` (for checking config keys that name them)."""
    names = {node for group in groups for node in group.nodes}
    tags = {tag for group in groups for tag in group.tags}
    return names, tags
