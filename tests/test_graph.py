"""Kedro's graph semantics: transcoded names are one dataset, dependencies come from Kedro,
and the compiler refuses a spec that does not order every Kedro dependency."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from kedro.pipeline import Node, Pipeline

from kvx_runtime.compiler import check_node_dependencies
from kvx_runtime.compiler.checks import warn_local_datasets
from kvx_runtime.compiler.spec import SpecBuilder, Step
from kvx_runtime.errors import ConfigError
from kvx_runtime.graph import dataset_identity, missing_step_dependencies, plan_step, step_dependencies
from kvx_runtime.grouping import IdentityNodeGrouper, TagNodeGrouper, group_dependencies

HERE = Path(__file__).resolve().parent


def f(*args):
    return args[0] if args else 1


# spark writes the table, pandas reads it back: one dataset, two catalog entries.
TRANSCODED = Pipeline([
    Node(f, "raw", "model_input@spark", name="build"),
    Node(f, "model_input@pandas", "model", name="train"),
    Node(f, ["model", "model_input@pandas"], "report", name="report"),
])


@pytest.mark.kedro
def test_identity_is_kedros() -> None:
    assert dataset_identity("model_input@pandas") == dataset_identity("model_input@spark") == "model_input"
    assert dataset_identity("ns.table") == "ns.table"


@pytest.mark.kedro
def test_transcoded_names_depend_on_each_other() -> None:
    groups = IdentityNodeGrouper().group(TRANSCODED)
    needs = group_dependencies(TRANSCODED, groups)
    assert needs == {"build": set(), "train": {"build"}, "report": {"train", "build"}}


@pytest.mark.kedro
def test_step_plan_of_transcoded_datasets() -> None:
    writer = plan_step(TRANSCODED, "__default__", ["build"])
    assert writer.crossing_outputs == ("model_input@spark",)
    assert writer.final_outputs == ()
    reader = plan_step(TRANSCODED, "__default__", ["train"])
    assert reader.inputs == ("model_input@pandas",)
    assert reader.produced_in_pipeline("model_input@pandas")
    assert reader.producers["model_input"] == "build"
    # Inside one group the pair never leaves memory/the catalog: no input, no crossing output.
    both = plan_step(TRANSCODED, "__default__", ["build", "train", "report"])
    assert both.inputs == ("raw",) and both.crossing_outputs == () and both.final_outputs == ("report",)
    shared = plan_step(TRANSCODED, "__default__", ["build", "train"])
    assert shared.shared_outputs == frozenset({"model_input@spark"})


@pytest.mark.kedro
def test_exit_pipeline_reading_a_transcoded_name_makes_the_output_cross() -> None:
    plan = plan_step(TRANSCODED, "__default__", ["report"], consumed_elsewhere={"report@text"})
    assert plan.crossing_outputs == ("report",) and plan.final_outputs == ()


@pytest.mark.kedro
def test_missing_dependencies_are_found_transitively() -> None:
    step_of = {"build": "a", "train": "b", "report": "c"}
    assert missing_step_dependencies(TRANSCODED, step_of, {"a": set(), "b": {"a"}, "c": {"b"}}) == []
    assert missing_step_dependencies(TRANSCODED, step_of, {"a": set(), "b": set(), "c": {"b"}}) == [
        ("report", "build"), ("train", "build")]
    assert step_dependencies(TRANSCODED, step_of) == {"a": set(), "b": {"a"}, "c": {"a", "b"}}


def _spec_for(pipeline: Pipeline, needs: dict[str, set[str]]) -> dict:
    steps = [Step(task=name, display_name=name, command=["kvx-runtime", "exec-node"], args=["--node", name],
                  depends_on=sorted(deps)) for name, deps in needs.items()]
    builder = SpecBuilder(name="p", description=None, image="img", parameters=[], storage_root="gs://b",
                          mlflow=False, has_exit_handler=False)
    return builder.build(steps, None, [])


@pytest.mark.kedro
def test_compiler_check_refuses_a_spec_missing_a_dependency() -> None:
    needs = group_dependencies(TRANSCODED, IdentityNodeGrouper().group(TRANSCODED))
    spec = _spec_for(TRANSCODED, needs)
    steps = {name: (name,) for name in needs}
    check_node_dependencies(TRANSCODED, steps, spec)  # the real dependencies pass
    broken = copy.deepcopy(spec)
    broken["root"]["dag"]["tasks"]["train"].pop("dependentTasks")
    with pytest.raises(ConfigError, match=r"'train' \(step train\) reads what 'build' \(step build\) writes"):
        check_node_dependencies(TRANSCODED, steps, broken)


@pytest.mark.kedro
def test_tag_groups_follow_transcoded_dependencies() -> None:
    pipeline = Pipeline([
        Node(f, "a", "x@spark", name="first", tags=["group.one"]),
        Node(f, "x@pandas", "y", name="second"),
        Node(f, "y", "z", name="third", tags=["group.one"]),
    ])
    groups = TagNodeGrouper().group(pipeline)
    needs = group_dependencies(pipeline, groups)
    # one -> second -> one: a cycle Kedro's dependencies reveal only through x@spark/x@pandas.
    assert needs == {"one": {"second"}, "second": {"one"}}


@pytest.mark.kedro
def test_local_path_warning_covers_a_transcoded_pair(caplog) -> None:
    flagged = warn_local_datasets(
        {"model_input@spark": "data/mi.parquet", "model_input@pandas": "data/mi.parquet"},
        producers={"model_input": "build"},
        consumers={"model_input": ["train"]},
        step_of={"build": "build", "train": "train"},
    )
    assert flagged == ["model_input"]


@pytest.mark.kedro
def test_gcs_fuse_paths_are_shared_only_where_the_target_mounts_them(caplog) -> None:
    """Vertex AI mounts Cloud Storage at /gcs/ on every step; a Kubeflow pod has no such mount."""
    shared = {"dataset_paths": {"features": "/gcs/bucket/features.parquet"}, "producers": {"features": "build"},
              "consumers": {"features": ["train"]}, "step_of": {"build": "build", "train": "train"}}
    assert warn_local_datasets(**shared) == []
    assert warn_local_datasets(**shared, shared_mounts=()) == ["features"]
    assert "Kubeflow pods do not have" in caplog.text


GRAPH_REGISTRY = """
import json
from pathlib import Path
from kedro.pipeline import Node, Pipeline


def step(*args):
    return args


def register_pipelines():
    described = json.loads((Path(__file__).resolve().parents[2] / "graph.json").read_text())
    nodes = [Node(step, n["inputs"] or None, n["outputs"], name=n["name"], namespace=n["namespace"],
                  tags=n["tags"]) for n in described]
    return {"__default__": Pipeline(nodes)}
"""


@pytest.mark.slow
def test_every_kedro_dependency_is_a_step_dependency_in_random_pipelines(tmp_path: Path) -> None:
    """Property: over random DAGs with transcoded names, namespaces and tag groups, the
    compiled spec orders every edge of Kedro's node_dependencies (or compile refuses a
    grouping whose steps form a cycle, and only then)."""
    project = tmp_path / "graphproj"
    package = project / "src" / "graphproj"
    package.mkdir(parents=True)
    (project / "conf" / "base").mkdir(parents=True)
    (project / "pyproject.toml").write_text(textwrap.dedent("""
        [project]
        name = "graphproj"
        version = "0.1"
        [tool.kedro]
        package_name = "graphproj"
        project_name = "graphproj"
        kedro_init_version = "1.0.0"
        source_dir = "src"
    """))
    (package / "__init__.py").write_text("")
    (package / "settings.py").write_text("")
    (package / "pipeline_registry.py").write_text(GRAPH_REGISTRY)
    (project / "conf" / "base" / "parameters.yml").write_text("alpha: 1\n")
    # The pipelines' free inputs, as kedro run (and compile) want them: in the catalog.
    (project / "conf" / "base" / "catalog.yml").write_text("".join(
        f"raw_{n}:\n  type: pickle.PickleDataset\n  filepath: data/raw_{n}.pkl\n" for n in range(4)))
    result = subprocess.run(
        [sys.executable, str(HERE / "graph_properties.py"), str(project), "20261124", "300"],
        cwd=project, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "KVX_LOG_LEVEL": "ERROR", "KEDRO_DISABLE_TELEMETRY": "true"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["violations"] == []
    assert summary["examples"] >= 200  # most examples compile (the rest are refused cycles)
    assert summary["transcoded_edges"] > 50  # the property was exercised on transcoded names
    assert summary["fused"] > 50  # and on the chain and auto groupers (which never refuse a cycle)


def test_paths_under_the_runs_storage_root_are_shared_and_the_warning_suggests_a_cloud_env(caplog) -> None:
    """run-local's root is a local folder every step sees: what the cloud env puts there is shared."""
    crossing = {"producers": {"model": "train"}, "consumers": {"model": ["score"]},
                "step_of": {"train": "train", "score": "score"}, "shared_mounts": ()}
    under = {"model": "/home/me/proj/.kvx/storage/data/06_models/model.pkl"}
    assert warn_local_datasets(under, **crossing, storage_root="/home/me/proj/.kvx/storage") == []
    # A sibling folder whose name starts like the root's is not under it.
    beside = {"model": "/home/me/proj/.kvx/storage-old/model.pkl"}
    assert warn_local_datasets(beside, **crossing, storage_root="/home/me/proj/.kvx/storage") == ["model"]
    assert warn_local_datasets(under, **crossing, init_command="kedro kubeflow init") == ["model"]
    assert "`kedro kubeflow init --cloud-env cloud` writes a Kedro env" in caplog.text


def test_missing_inputs_under_the_root_are_named_with_the_projects_copy(caplog) -> None:
    from kvx_runtime.compiler.checks import warn_missing_inputs

    missing = {"shuttles": "file:///tmp/root/data/01_raw/shuttles.csv"}
    assert warn_missing_inputs(missing, "file:///tmp/root") == ["shuttles"]
    assert ("pipeline input 'shuttles' is read from file:///tmp/root/data/01_raw/shuttles.csv, which does not "
            "exist: copy it there before the run (the project's own copy is usually data/01_raw/shuttles.csv)"
            in caplog.text)
