"""The plugin family's groupers: one step per node (the default), one step per ``group.<name>`` tag."""

from __future__ import annotations

from typing import Any

from kvx_runtime.errors import ConfigError
from kvx_runtime.grouping.base import NodeGrouper, StepGroup

__all__ = ["IdentityNodeGrouper", "TagNodeGrouper"]


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
