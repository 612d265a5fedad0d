"""How Kedro nodes become pipeline steps: one step per node, or per group of nodes.

Configured in ``vertexai.yml``::

    run_config:
      grouping:
        cls: kvx_runtime.grouping.TagNodeGrouper
        params: {tag_prefix: "group."}

A grouper returns :class:`StepGroup` s; the compiler derives the dependencies between groups
from Kedro's own node dependencies and refuses groupings that create a cycle.
"""

from __future__ import annotations

import graphlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvx_runtime.errors import ConfigError

__all__ = [
    "IdentityNodeGrouper",
    "NodeGrouper",
    "StepGroup",
    "TagNodeGrouper",
    "build_grouper",
    "group_dependencies",
    "order_groups",
]

#: Class paths of the kedro-vertexai family, mapped to ours.
_ALIASES = {
    "kedro_vertexai.grouping.IdentityNodeGrouper": "kvx_runtime.grouping.IdentityNodeGrouper",
    "kedro_vertexai.grouping.TagNodeGrouper": "kvx_runtime.grouping.TagNodeGrouper",
}


@dataclass(frozen=True)
class StepGroup:
    """Nodes that run together in one step. ``name`` is the group's own name (before the
    compiler turns it into a task name); ``nodes`` keep the pipeline's topological order."""

    name: str
    nodes: tuple[str, ...]
    tags: frozenset[str] = frozenset()


class NodeGrouper(ABC):
    """Turns a Kedro pipeline into step groups. Subclass it to group differently."""

    def __init__(self, **params: Any) -> None:
        self.params = params

    @abstractmethod
    def group(self, pipeline: Any) -> list[StepGroup]:
        """Every node of ``pipeline`` in exactly one group."""


class IdentityNodeGrouper(NodeGrouper):
    """One step per node (the default)."""

    def group(self, pipeline: Any) -> list[StepGroup]:
        return [StepGroup(node.name, (node.name,), frozenset(node.tags)) for node in pipeline.nodes]


class TagNodeGrouper(NodeGrouper):
    """Nodes tagged ``<tag_prefix><name>`` (default ``group.``) share one step named ``<name>``;
    other nodes get a step each. A node with two group tags is a configuration error."""

    def __init__(self, tag_prefix: str = "group.", **params: Any) -> None:
        super().__init__(tag_prefix=tag_prefix, **params)
        self.tag_prefix = tag_prefix

    def group(self, pipeline: Any) -> list[StepGroup]:
        members: dict[str, list[Any]] = {}
        order: list[str] = []
        for node in pipeline.nodes:
            group_tags = sorted(t for t in node.tags if t.startswith(self.tag_prefix))
            if len(group_tags) > 1:
                raise ConfigError(
                    f"node '{node.name}' has several group tags ({', '.join(group_tags)}); "
                    "a node can be in one group only"
                )
            key = group_tags[0][len(self.tag_prefix) :] if group_tags else node.name
            if group_tags and not key:
                raise ConfigError(f"node '{node.name}': tag '{group_tags[0]}' names no group")
            if key not in members:
                members[key] = []
                order.append(key)
            members[key].append(node)
        return [
            StepGroup(
                key,
                tuple(n.name for n in members[key]),
                frozenset(t for n in members[key] for t in n.tags),
            )
            for key in order
        ]


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


def order_groups(needs: dict[str, set[str]]) -> list[str]:
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
