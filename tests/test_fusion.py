"""The fusing groupers (chain, auto): what they fuse, what they never do (a cycle, a node in
two steps, incompatible nodes together, a longer modelled wall time than allowed), where their
durations come from, and how bad configuration is refused."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kvx_runtime.errors import ConfigError
from kvx_runtime.graph import missing_step_dependencies
from kvx_runtime.grouping import (
    AutoNodeGrouper,
    ChainNodeGrouper,
    GroupingContext,
    IdentityNodeGrouper,
    build_grouper,
    group_dependencies,
    modelled_wall_seconds,
    order_groups,
)
from kvx_runtime.grouping.timings import earlier_node_durations

pytestmark = pytest.mark.kedro


def _identity(value):
    return value


def pipeline_of(edges: dict[str, list[str]]):
    """A pipeline whose node ``n`` writes ``n`` and reads the outputs of ``edges[n]``."""
    from kedro.pipeline import Pipeline, node

    def function(count: int):
        return (lambda *values: values[0] if values else 0) if count else (lambda: 0)

    return Pipeline([node(function(len(inputs)), inputs=inputs or None, outputs=name, name=name)
                     for name, inputs in edges.items()])


def nodes_of(groups) -> list[tuple[str, ...]]:
    return [group.nodes for group in groups]


def wall(pipeline, groups, durations, start=60.0) -> float:
    return modelled_wall_seconds(groups, group_dependencies(pipeline, groups), durations, start)


def test_a_chain_becomes_one_step_in_the_pipelines_order() -> None:
    pipeline = pipeline_of({"a": [], "b": ["a"], "c": ["b"]})
    groups = ChainNodeGrouper().groups(pipeline, GroupingContext())
    assert nodes_of(groups) == [("a", "b", "c")]
    assert groups[0].name == "a and 2 more"


def test_a_diamond_keeps_its_parallel_branches() -> None:
    pipeline = pipeline_of({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]})
    assert sorted(nodes_of(ChainNodeGrouper().groups(pipeline, GroupingContext()))) == [
        ("a",), ("b",), ("c",), ("d",)]


def test_an_edge_implied_by_a_longer_path_does_not_stop_a_chain() -> None:
    # a -> c is implied by a -> b -> c: after the transitive reduction a, b, c are a chain.
    pipeline = pipeline_of({"a": [], "b": ["a"], "c": ["a", "b"]})
    assert nodes_of(ChainNodeGrouper().groups(pipeline, GroupingContext())) == [("a", "b", "c")]


def test_incompatible_nodes_are_not_fused() -> None:
    pipeline = pipeline_of({"a": [], "b": ["a"], "c": ["b"]})
    context = GroupingContext(traits={"a": "cpu", "b": "gpu", "c": "gpu"})
    assert nodes_of(ChainNodeGrouper().groups(pipeline, context)) == [("a",), ("b", "c")]
    durations = {"a": 1.0, "b": 1.0, "c": 1.0}
    auto = AutoNodeGrouper().groups(pipeline, GroupingContext(traits=context.traits, durations=durations))
    assert nodes_of(auto) == [("a",), ("b", "c")]


def test_auto_without_durations_is_the_chain_rule() -> None:
    pipeline = pipeline_of({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": ["d"]})
    chain = ChainNodeGrouper().groups(pipeline, GroupingContext())
    assert nodes_of(AutoNodeGrouper().groups(pipeline, GroupingContext())) == nodes_of(chain)
    # Durations for some nodes only: nothing is known about the others, so still the chains.
    partial = GroupingContext(durations={"a": 1.0, "b": 1.0})
    assert nodes_of(AutoNodeGrouper().groups(pipeline, partial)) == nodes_of(chain)


def test_auto_fuses_short_branches_and_keeps_long_ones_apart() -> None:
    pipeline = pipeline_of({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]})
    short = {"a": 1.0, "b": 2.0, "c": 2.0, "d": 1.0}
    fused = AutoNodeGrouper().groups(pipeline, GroupingContext(durations=short))
    assert nodes_of(fused) == [("a", "b", "c", "d")]
    assert wall(pipeline, fused, short) == 66 < wall(pipeline, IdentityNodeGrouper().group(pipeline), short)
    long = {"a": 1.0, "b": 600.0, "c": 600.0, "d": 1.0}
    kept = AutoNodeGrouper().groups(pipeline, GroupingContext(durations=long))
    assert not any({"b", "c"} <= set(group.nodes) for group in kept)  # they still run side by side
    assert len(kept) == 4  # joining a or d to a branch would hold the other branch up
    assert wall(pipeline, kept, long) <= wall(pipeline, IdentityNodeGrouper().group(pipeline), long)


def test_auto_params_override_the_target_and_earlier_runs() -> None:
    pipeline = pipeline_of({"a": [], "b": [], "c": ["a", "b"]})
    measured = GroupingContext(durations={"a": 100.0, "b": 100.0, "c": 1.0}, step_start_seconds=5)
    # 5 s start-ups: fusing the two 100 s roots would cost 95 s of wall time.
    assert len(AutoNodeGrouper().groups(pipeline, measured)) == 3
    # Told that a step starts in 300 s, fusing everything saves the most.
    assert len(AutoNodeGrouper(step_start_seconds=300).groups(pipeline, measured)) == 1
    # Given durations win over measured ones; earlier runs can be ignored.
    assert len(AutoNodeGrouper(durations={"a": 0.1, "b": 0.1}).groups(pipeline, measured)) == 1
    assert len(AutoNodeGrouper(step_start_seconds=300, use_earlier_runs=False).groups(pipeline, measured)) == 3


@pytest.mark.parametrize("seed", range(40))
def test_fusion_never_breaks_the_pipeline(seed: int) -> None:
    """Property over random DAGs and traits: every node in one step, no cycle, every Kedro
    dependency enforced, fused nodes compatible, chains never lengthen the modelled wall time
    and auto never lengthens the chains' by more than its tolerance."""
    rng = random.Random(seed)
    names = [f"n{index}" for index in range(rng.randint(2, 30))]
    edges = {name: rng.sample(names[:index], k=min(index, rng.randint(0, 3))) for index, name in enumerate(names)}
    pipeline = pipeline_of(edges)
    traits = {name: rng.choice(["x", "x", "x", "gpu"]) for name in names}
    durations = {name: rng.choice([0.5, 5.0, 60.0, 900.0]) for name in names}
    context = GroupingContext(traits=traits, durations=durations, step_start_seconds=rng.choice([5, 60]))
    start = context.step_start_seconds
    walls = {}
    for grouper in (IdentityNodeGrouper(), ChainNodeGrouper(), AutoNodeGrouper()):
        groups = grouper.groups(pipeline, context)
        listed = [node for group in groups for node in group.nodes]
        assert sorted(listed) == sorted(names) and len(listed) == len(set(listed))
        needs = group_dependencies(pipeline, groups)
        order_groups(needs)  # no cycle (a ConfigError otherwise)
        step_of = {node: group.name for group in groups for node in group.nodes}
        assert missing_step_dependencies(pipeline, step_of, needs) == []
        assert all(len({traits[node] for node in group.nodes}) == 1 for group in groups)
        walls[type(grouper).__name__] = modelled_wall_seconds(groups, needs, durations, start)
    assert walls["ChainNodeGrouper"] <= walls["IdentityNodeGrouper"] + 1e-9
    assert walls["AutoNodeGrouper"] <= walls["ChainNodeGrouper"] + start / 10 + 1e-9


def test_a_thousand_nodes_group_quickly_enough_to_plan() -> None:
    """Not a timing assertion (make bench measures): the search's size limit keeps a 1,000-node
    pipeline with known durations to the chains' rule, rather than a quadratic search."""
    names = [f"n{index}" for index in range(1000)]
    edges = {name: ([names[index - 1]] if index % 10 else []) + ([names[index - 5]] if index % 10 >= 5 else [])
             for index, name in enumerate(names)}
    pipeline = pipeline_of(edges)
    durations = dict.fromkeys(names, 1.0)
    chain = ChainNodeGrouper().groups(pipeline, GroupingContext())
    assert nodes_of(AutoNodeGrouper().groups(pipeline, GroupingContext(durations=durations))) == nodes_of(chain)


def test_short_names_and_bad_params_are_configuration_errors() -> None:
    assert isinstance(build_grouper("chain", {}), ChainNodeGrouper)
    assert isinstance(build_grouper("auto", {"step_start_seconds": 30}), AutoNodeGrouper)
    with pytest.raises(ConfigError, match="step_start_seconds: 'soon' is not a number of seconds"):
        build_grouper("auto", {"step_start_seconds": "soon"})
    with pytest.raises(ConfigError, match="durations: 'a' not a number of seconds"):
        build_grouper("auto", {"durations": {"a": -1}})
    for cls in ("chain", "auto"):  # a misspelt parameter is not silently ignored
        with pytest.raises(ConfigError, match="run_config.grouping.params: .*'step_start_second'"):
            build_grouper(cls, {"step_start_second": 1})
    with pytest.raises(ConfigError, match="run_config.grouping.cls"):
        build_grouper("chains", {})


def test_durations_come_from_the_newest_run_local_logs(tmp_path: Path) -> None:
    import os

    def job(name: str, lines: list[object], mtime: float) -> None:
        logs = tmp_path / ".kvx" / "runs" / name / "logs"
        logs.mkdir(parents=True)
        text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
        (logs / "step.log").write_text(text + "\n")
        os.utime(logs, (mtime, mtime))

    job("old", [{"message": "node finished", "node": "a", "seconds": 9.0},
                {"message": "node finished", "node": "b", "seconds": 4.0}], 1_000)
    job("new", ["--- attempt 1: kvx-runtime exec-node --node a", "not json node finished",
                {"message": "node finished", "node": "a", "seconds": 1.5},
                {"message": "node finished", "node": "c", "seconds": "fast"},
                {"message": "node started", "node": "d", "seconds": 3}], 2_000)
    assert earlier_node_durations(tmp_path) == {"a": 1.5, "b": 4.0}
    assert earlier_node_durations(tmp_path / "elsewhere") == {}
