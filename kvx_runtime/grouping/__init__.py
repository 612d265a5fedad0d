"""How Kedro nodes become pipeline steps: one step per node, per tag group, or fused.

Configured in ``vertexai.yml`` (or the target's own file)::

    run_config:
      grouping:
        cls: auto            # or chain, tag, identity, or a class path of your own
        params: {step_start_seconds: 60}

A grouper returns :class:`StepGroup` s (:mod:`.base`); the compiler derives the dependencies
between groups from Kedro's own node dependencies and refuses groupings that create a cycle.
:mod:`.tags` holds the family's groupers (one step per node, per ``group.<name>`` tag),
:mod:`.fusion` the ones that fuse nodes to save step start-ups, :mod:`.timings` where the
durations of earlier runs come from.
"""

from kvx_runtime.grouping.base import (
    GroupingContext,
    NodeGrouper,
    StepGroup,
    build_grouper,
    group_dependencies,
    order_groups,
    tags_and_names,
)
from kvx_runtime.grouping.fusion import AutoNodeGrouper, ChainNodeGrouper, modelled_wall_seconds
from kvx_runtime.grouping.tags import IdentityNodeGrouper, TagNodeGrouper

__all__ = [
    "AutoNodeGrouper",
    "ChainNodeGrouper",
    "GroupingContext",
    "IdentityNodeGrouper",
    "NodeGrouper",
    "StepGroup",
    "TagNodeGrouper",
    "build_grouper",
    "group_dependencies",
    "modelled_wall_seconds",
    "order_groups",
    "tags_and_names",
]
