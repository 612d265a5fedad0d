"""Random pipelines compiled through the real compiler (run by test_graph_properties.py).

Usage: ``python graph_properties.py PROJECT_DIR SEED COUNT``. Every example rewrites the
project's ``graph.json`` (read by its pipeline registry) and ``vertexai.yml``, compiles it
in this process with :func:`compile_pipeline`, and checks the spec against Kedro's own
``node_dependencies``: every edge must be a (transitive) dependency between the steps that
hold the two nodes. Prints one JSON line: examples run, cycles refused, violations found.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

FORMATS = ("pandas", "spark", "csv", "text")
NAMESPACES = (None, "prep", "science.models")


def random_graph(rng: random.Random) -> tuple[list[dict[str, Any]], bool]:
    """Nodes (as JSON) and whether they carry tag groups."""
    count = rng.randint(2, 22)
    grouped = rng.random() < 0.5
    produced: list[tuple[str, bool]] = []  # (dataset identity, transcoded?)
    nodes: list[dict[str, Any]] = []
    for index in range(count):
        namespace = rng.choice(NAMESPACES)
        inputs: list[str] = []
        for identity, transcoded in rng.sample(produced, k=min(len(produced), rng.randint(0, 3))):
            inputs.append(f"{identity}@{rng.choice(FORMATS)}" if transcoded else identity)
        if rng.random() < 0.3:
            inputs.append(f"raw_{rng.randint(0, 3)}")
        if rng.random() < 0.2:
            inputs.append("params:alpha")
        outputs = []
        for slot in range(rng.randint(1, 2)):
            identity = f"{namespace + '.' if namespace else ''}d{index}_{slot}"
            transcoded = rng.random() < 0.4
            produced.append((identity, transcoded))
            outputs.append(f"{identity}@{rng.choice(FORMATS)}" if transcoded else identity)
        tags = [f"group.g{rng.randint(0, 3)}"] if grouped and rng.random() < 0.6 else []
        tags += ["train"] if rng.random() < 0.2 else []
        nodes.append({"name": f"n{index}", "namespace": namespace, "inputs": sorted(set(inputs)),
                      "outputs": outputs, "tags": tags})
    return nodes, grouped


def spec_ancestors(spec: dict[str, Any]) -> dict[str, set[str]]:
    """task -> every task it waits for, read from the spec as an orchestrator reads it
    (written independently of the compiler's own check)."""
    direct: dict[str, set[str]] = {}
    members: dict[str, set[str]] = {}

    def walk(dag: dict[str, Any], outer: set[str]) -> set[str]:
        created: set[str] = set()
        for name, task in dag.get("tasks", {}).items():
            component = spec["components"][task["componentRef"]["name"]]
            needs = set(task.get("dependentTasks", [])) | outer
            if "dag" in component:
                members[name] = walk(component["dag"], needs)
                created |= members[name]
            else:
                direct[name] = needs
                created.add(name)
        return created

    walk(spec["root"]["dag"], set())
    expanded = {task: {m for d in deps for m in members.get(d, {d})} for task, deps in direct.items()}
    closure: dict[str, set[str]] = {}
    for task in expanded:
        seen: set[str] = set()
        stack = list(expanded[task])
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(expanded.get(current, ()))
        closure[task] = seen
    return closure


def has_group_cycle(nodes: list[dict[str, Any]], pipeline: Any) -> bool:
    group_of = {}
    for node in pipeline.nodes:
        tags = sorted(t for t in node.tags if t.startswith("group."))
        group_of[node.name] = tags[0] if tags else node.name
    edges: dict[str, set[str]] = {}
    for child, parents in pipeline.node_dependencies.items():
        for parent in parents:
            if group_of[parent.name] != group_of[child.name]:
                edges.setdefault(group_of[child.name], set()).add(group_of[parent.name])
    import graphlib

    try:
        list(graphlib.TopologicalSorter(edges).static_order())
        return False
    except graphlib.CycleError:
        return True


def main(project: Path, seed: int, count: int) -> dict[str, Any]:
    from kedro.framework.project import pipelines

    from kvx_runtime.compiler import CompileRequest, compile_pipeline
    from kvx_runtime.errors import ConfigError

    rng = random.Random(seed)
    result: dict[str, Any] = {"examples": 0, "cycles_refused": 0, "violations": [], "transcoded_edges": 0,
                              "fused": 0}
    for example in range(count):
        nodes, grouped = random_graph(rng)
        (project / "graph.json").write_text(json.dumps(nodes))
        grouping = "  grouping: {cls: kvx_runtime.grouping.TagNodeGrouper}\n" if grouped else ""
        fused = not grouped and rng.random() < 0.6  # chain or auto: never a cycle
        if fused and rng.random() < 0.5:
            grouping = "  grouping: {cls: chain}\n"
        elif fused:
            names = [f"{node['namespace']}.{node['name']}" if node["namespace"] else node["name"] for node in nodes]
            params = {"step_start_seconds": rng.choice([5, 60, 300]),
                      "durations": {name: rng.choice([0.1, 5, 60, 600]) for name in names}}
            grouping = f"  grouping: {{cls: auto, params: {json.dumps(params)}}}\n"
        result["fused"] += int(fused)
        (project / "conf" / "base" / "vertexai.yml").write_text(
            f"run_config:\n  image: img\n  root: bucket/x\n{grouping}")
        try:
            compiled = compile_pipeline(CompileRequest(project_path=project, env="base"))
        except ConfigError as exc:
            kedro_pipeline = pipelines["__default__"]
            if "cycle" in str(exc) and grouped and has_group_cycle(nodes, kedro_pipeline):
                result["cycles_refused"] += 1
                continue
            result["violations"].append({"example": example, "error": str(exc)})
            continue
        kedro_pipeline = pipelines["__default__"]
        task_of = {node: task for task, group in compiled.steps.items() for node in group}
        ancestors = spec_ancestors(compiled.spec)
        for child, parents in kedro_pipeline.node_dependencies.items():
            for parent in parents:
                transcoded = any("@" in name for name in child.inputs)
                result["transcoded_edges"] += int(transcoded)
                child_task, parent_task = task_of[child.name], task_of[parent.name]
                if child_task != parent_task and parent_task not in ancestors[child_task]:
                    result["violations"].append({"example": example, "child": child.name, "parent": parent.name})
        result["examples"] += 1
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))
