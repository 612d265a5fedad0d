"""Compiler building blocks: names, grouping, resources, retry mapping, reference checks."""

from __future__ import annotations

import copy

import pytest
from kedro.pipeline import Node, Pipeline

from kvx_runtime.compiler.checks import check_references, is_local_path
from kvx_runtime.compiler.names import check_label, parameter_name, sanitize, unique_task_names
from kvx_runtime.compiler.resources import (
    ACCELERATOR_KEY,
    StepResources,
    check_group_agrees,
    group_resources,
    node_resources,
    node_retry,
    node_selectors,
)
from kvx_runtime.compiler.spec import PipelineParameter, SpecBuilder, Step, retry_policy
from kvx_runtime.config import parse_plugin_config
from kvx_runtime.errors import ConfigError
from kvx_runtime.grouping import (
    IdentityNodeGrouper,
    TagNodeGrouper,
    build_grouper,
    group_dependencies,
    order_groups,
)

# Grouping and checks over Kedro pipelines.
pytestmark = pytest.mark.kedro


def f(*args):
    return args[0] if args else 1


# --- names -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("data_science.train_model_node", "data-science-train-model-node"),
        ("Train Model!", "train-model"),
        ("123abc", "n-123abc"),
        ("__x__", "x"),
        ("...", "n"),
    ],
)
def test_sanitize(name: str, expected: str) -> None:
    assert sanitize(name) == expected


def test_long_names_are_cut_with_a_hash_and_stay_distinct() -> None:
    a, b = "x" * 100 + "_first", "x" * 100 + "_second"
    assert len(sanitize(a)) <= 63 and sanitize(a) != sanitize(b)


def test_task_names_are_unique_and_stable() -> None:
    names = ["a.b", "a_b", "a-b", "mlflow_start_run", "A.B"]
    first = unique_task_names(names)
    assert first == unique_task_names(names)
    assert first == {"a.b": "a-b", "a_b": "a-b-2", "a-b": "a-b-3",
                     "mlflow_start_run": "mlflow-start-run-2", "A.B": "a-b-4"}


def test_parameter_names() -> None:
    assert parameter_name("data_science.model_options.test_size") == "data_science__model_options__test_size"
    with pytest.raises(ConfigError):
        parameter_name("9lives")


def test_label_rules() -> None:
    check_label("team", "ml-ops_1")
    with pytest.raises(ConfigError, match="label key"):
        check_label("Team", "x")
    with pytest.raises(ConfigError, match="label value"):
        check_label("team", "ML Ops")


# --- grouping ----------------------------------------------------------------------------

PIPE = Pipeline([
    Node(f, "raw", "a", name="load", tags=["group.prep"]),
    Node(f, "a", "b", name="clean", tags=["group.prep"]),
    Node(f, "b", "model", name="train", tags=["gpu"]),
    Node(f, "model", "report", name="report"),
    Node(f, "b", "stats", name="stats", tags=["group.prep"]),
])


def test_identity_grouping_has_one_step_per_node() -> None:
    groups = IdentityNodeGrouper().group(PIPE)
    assert [g.nodes for g in groups] == [(n.name,) for n in PIPE.nodes]
    needs = group_dependencies(PIPE, groups)
    assert needs["train"] == {"clean"} and needs["report"] == {"train"}


def test_tag_grouping_merges_tagged_nodes_in_pipeline_order() -> None:
    groups = TagNodeGrouper().group(PIPE)
    by_name = {g.name: g for g in groups}
    assert by_name["prep"].nodes == ("load", "clean", "stats")
    assert set(by_name) == {"prep", "train", "report"}
    needs = group_dependencies(PIPE, groups)
    assert needs == {"prep": set(), "train": {"prep"}, "report": {"train"}}
    assert order_groups(needs) == ["prep", "train", "report"]


def test_grouping_that_creates_a_cycle_is_refused() -> None:
    pipe = Pipeline([
        Node(f, "raw", "a", name="first", tags=["group.g"]),
        Node(f, "a", "b", name="middle"),
        Node(f, "b", "c", name="last", tags=["group.g"]),
    ])
    groups = TagNodeGrouper().group(pipe)
    with pytest.raises(ConfigError, match="cycle between steps"):
        order_groups(group_dependencies(pipe, groups))


def test_node_with_two_group_tags_is_refused() -> None:
    pipe = Pipeline([Node(f, "raw", "a", name="n", tags=["group.x", "group.y"])])
    with pytest.raises(ConfigError, match="several group tags"):
        TagNodeGrouper().group(pipe)


def test_family_class_paths_and_custom_prefix() -> None:
    grouper = build_grouper("kedro_vertexai.grouping.TagNodeGrouper", {"tag_prefix": "step:"})
    assert isinstance(grouper, TagNodeGrouper) and grouper.tag_prefix == "step:"
    with pytest.raises(ConfigError, match="not a subclass"):
        build_grouper("builtins.dict", {})


# --- resources, selectors, retries -------------------------------------------------------

RUN = parse_plugin_config({"run_config": {
    "resources": {"__default__": {"cpu": "500m", "memory": "1Gi"}, "gpu": {"cpu": 4, "gpu": 1},
                  "train": {"memory": "16Gi"}},
    "node_selectors": {"gpu": {"cloud.google.com/gke-accelerator": "NVIDIA_TESLA_T4"}},
    "retries": {"__default__": {"max_retry_count": 1}, "train": {"max_retry_count": 3, "backoff_duration": 30}},
}}).run_config


def test_node_beats_tag_beats_default() -> None:
    assert node_resources(RUN.resources, "train", ["gpu"]) == {"cpu": "4", "memory": "16Gi", "gpu": 1}
    assert node_resources(RUN.resources, "report", []) == {"cpu": "500m", "memory": "1Gi"}
    assert node_selectors(RUN.node_selectors, "train", ["gpu"]) == {
        "cloud.google.com/gke-accelerator": "NVIDIA_TESLA_T4"}
    assert node_retry(RUN.retries, "train", ["gpu"]).max_retry_count == 3
    assert node_retry(RUN.retries, "report", []).max_retry_count == 1


def test_resource_spec_conversion_matches_kfp() -> None:
    spec = group_resources(
        [{"cpu": "500m", "memory": "1024Mi"}, {"cpu": "2", "memory": "1Gi", "gpu": 2}],
        [{"cloud.google.com/gke-accelerator": "NVIDIA_L4"}],
    ).to_spec()
    assert spec["cpuLimit"] == 2.0 and spec["resourceCpuLimit"] == "2"
    assert spec["memoryLimit"] == pytest.approx(1.073741824)
    assert spec["accelerator"] == {"count": "2", "resourceCount": "2", "type": "NVIDIA_L4",
                                   "resourceType": "NVIDIA_L4"}
    assert group_resources([{"cpu": "500m"}], []).to_spec()["cpuLimit"] == 0.5


def test_retry_policy_mapping() -> None:
    assert retry_policy(RUN.retries["train"]) == {
        "backoffDuration": "30s", "backoffFactor": 2.0, "backoffMaxDuration": "3600s", "maxRetryCount": 3}
    assert retry_policy(None) is None


def test_local_path_detection() -> None:
    assert is_local_path("data/08_reporting/x.csv") and is_local_path("/tmp/x.csv")
    assert not is_local_path("gs://b/x.csv") and not is_local_path("/gcs/bucket/x.csv")
    assert is_local_path("file:///tmp/shared/x.parquet") and not is_local_path("file:///gcs/bucket/x.csv")


# --- reference checks --------------------------------------------------------------------

def small_spec() -> dict:
    builder = SpecBuilder(name="p", description=None, image="img", storage_root="gs://b",
                          parameters=[PipelineParameter("a.b", "a__b", "int", 3)], mlflow=False,
                          has_exit_handler=False)
    step = Step(task="one", display_name="one", command=["kvx-runtime", "exec-node"],
                args=["--param", "a.b:int={{$.inputs.parameters['a__b']}}"],
                inputs={"a__b": "NUMBER_INTEGER", "kvx_storage_root": "STRING"})
    two = Step(task="two", display_name="two", command=["x"], args=[], depends_on=["one"])
    return builder.build([step, two], None, [])


def test_a_built_spec_has_no_dangling_references() -> None:
    check_references(small_spec())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s["root"]["dag"]["tasks"]["two"].__setitem__("dependentTasks", ["zero"]), "dependentTasks 'zero'"),
        (lambda s: s["root"]["dag"]["tasks"]["one"]["componentRef"].__setitem__("name", "comp-x"),
         "componentRef 'comp-x'"),
        (lambda s: s["components"]["comp-one"].__setitem__("executorLabel", "exec-x"), "executorLabel 'exec-x'"),
        (lambda s: s["deploymentSpec"]["executors"]["exec-one"]["container"]["args"].append(
            "{{$.inputs.parameters['nope']}}"), "placeholder input 'nope'"),
        (lambda s: s["root"]["dag"]["tasks"]["one"]["inputs"]["parameters"]["a__b"].__setitem__(
            "componentInputParameter", "zz"), "reads 'zz'"),
        (lambda s: s["root"]["dag"]["tasks"]["one"]["inputs"]["parameters"].pop("a__b"),
         "required inputs not given: a__b"),
    ],
)
def test_dangling_references_are_reported(mutate, message: str) -> None:
    spec = copy.deepcopy(small_spec())
    mutate(spec)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_references(spec)


@pytest.mark.parametrize("name", ["status", "mlflow_run_id", "kvx_storage_root", "kvx_job_uuid", "kvx.anything"])
def test_a_kedro_parameter_never_takes_an_input_name_of_kvx_runtimes_own(name: str) -> None:
    with pytest.raises(ConfigError, match="is an input of kvx-runtime's own") as refused:
        parameter_name(name)
    assert "rename the Kedro parameter" in (refused.value.hint or "")
    assert parameter_name("statuses") == "statuses" and parameter_name("my_kvx_root") == "my_kvx_root"


def test_memory_takes_kubernetes_units_only() -> None:
    def resources(memory: str) -> object:
        return parse_plugin_config({"run_config": {"image": "i", "resources": {"__default__": {"memory": memory}}}})

    config = resources("2000000k")
    assert config.run_config.resources["__default__"].memory == "2000000k"  # type: ignore[attr-defined]
    assert StepResources(memory="2000000k").to_spec()["memoryLimit"] == 2.0
    with pytest.raises(ConfigError, match="Kubernetes writes kilobytes k, kibibytes Ki"):
        resources("2000000K")


def test_an_explicit_zero_gpu_asks_for_no_accelerator_whatever_the_selectors_name() -> None:
    t4 = {ACCELERATOR_KEY: "NVIDIA_TESLA_T4"}
    none = group_resources([{"gpu": 0, "cpu": "1"}], [t4])
    assert none.gpu is None and none.accelerator is None and "accelerator" not in none.to_spec()
    assert none.node_selector("nvidia.com/gpu") == {} and "nvidia.com/gpu" not in none.requests("nvidia.com/gpu")
    one = group_resources([{"cpu": "1"}], [t4])  # an accelerator named, no count: one
    assert one.to_spec()["accelerator"]["count"] == "1"
    mixed = group_resources([{"gpu": 0}, {"gpu": 2}], [t4, t4])
    assert mixed.gpu == 2 and mixed.accelerator == "NVIDIA_TESLA_T4"


def test_the_nodes_of_a_step_agree_on_their_node_selectors() -> None:
    check_group_agrees("s", ["a", "b"], [{"pool": "x"}, {}])  # one says, the other does not care
    with pytest.raises(ConfigError, match=r"disagree on cloud.google.com/gke-accelerator \(A100: a; T4: b, c\)"):
        check_group_agrees("s", ["a", "b", "c"], [{ACCELERATOR_KEY: "A100"}, {ACCELERATOR_KEY: "T4"},
                                                  {ACCELERATOR_KEY: "T4"}])
    with pytest.raises(ConfigError, match="disagree on pool"):
        check_group_agrees("s", ["a", "b"], [{"pool": "x"}, {"pool": "y"}])


def test_gpus_without_an_accelerator_type_are_warned(caplog: pytest.LogCaptureFixture) -> None:
    from kvx_runtime.compiler.checks import warn_gpus_without_accelerator

    assert warn_gpus_without_accelerator({"a": 1, "b": 2, "c": 0}, {"b": "NVIDIA_TESLA_T4"}) == ["a"]
    assert warn_gpus_without_accelerator({"a": 0}, {}) == []
