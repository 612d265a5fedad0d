"""Which datasets cross a step's boundary, and which of them the catalog keeps."""

from __future__ import annotations

import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Node, Pipeline

from kvx_runtime.errors import UsageError
from kvx_runtime.graph import plan_step
from kvx_runtime.step.hooks import is_declared

# Step plans over Kedro's pipelines and catalogs.
pytestmark = pytest.mark.kedro


def identity(x):
    return x


def pair(x):
    return x, x


PIPELINE = Pipeline(
    [
        Node(identity, "raw", "clean", name="clean_node"),
        Node(pair, ["clean"], ["features", "unused_copy"], name="features_node"),
        Node(identity, "features", "model", name="train_node"),
        Node(identity, "model", "report", name="report_node"),
        Node(lambda m, p: m, ["model", "params:threshold"], "scores", name="score_node"),
    ]
)


def test_single_node_inputs_and_crossing_outputs() -> None:
    plan = plan_step(PIPELINE, "__default__", ["features_node"])
    assert plan.inputs == ("clean",)
    assert plan.crossing_outputs == ("features",)
    assert plan.final_outputs == ("unused_copy",)
    assert plan.producers["clean"] == "clean_node"


def test_parameters_are_never_intermediates() -> None:
    plan = plan_step(PIPELINE, "__default__", ["score_node"])
    assert plan.inputs == ("model",)


def test_group_keeps_internal_data_in_memory() -> None:
    plan = plan_step(PIPELINE, "__default__", ["features_node", "train_node"])
    assert plan.inputs == ("clean",)
    # "features" goes from features_node to train_node only: it never leaves the group.
    assert plan.crossing_outputs == ("model",)
    assert plan.shared_outputs == frozenset()


def test_output_used_inside_and_outside_the_group_is_shared() -> None:
    plan = plan_step(PIPELINE, "__default__", ["train_node", "report_node"])
    assert plan.crossing_outputs == ("model",)  # score_node, outside, needs it too
    assert plan.shared_outputs == frozenset({"model"})
    assert plan.final_outputs == ("report",)


def test_unknown_node_suggests_close_names() -> None:
    with pytest.raises(UsageError) as caught:
        plan_step(PIPELINE, "__default__", ["train_nod"])
    assert "'train_nod'" in str(caught.value) and "'train_node'" in str(caught.value)


def test_unknown_node_finds_namespaced_names() -> None:
    namespaced = Pipeline([Node(identity, "a", "b", name="fit")], namespace="data_science")
    with pytest.raises(UsageError, match="did you mean 'data_science.fit'"):
        plan_step(namespaced, "__default__", ["fit"])


def test_catalog_declarations() -> None:
    catalog = DataCatalog.from_config(
        {
            "declared_csv": {"type": "pandas.CSVDataset", "filepath": "x.csv"},
            "declared_memory": {"type": "MemoryDataset"},
            "{name}_table": {"type": "pandas.CSVDataset", "filepath": "{name}.csv"},
        }
    )
    catalog["params:threshold"] = MemoryDataset(0.5)
    assert is_declared(catalog, "declared_csv")
    assert is_declared(catalog, "scores_table")  # matched by a dataset factory
    assert not is_declared(catalog, "declared_memory")  # memory does not cross containers
    assert not is_declared(catalog, "anything_else")


def test_outputs_the_exit_pipeline_reads_cross_the_boundary() -> None:
    # "report" is final in the main pipeline; the exit handler's pipeline reads it.
    plan = plan_step(PIPELINE, "__default__", ["report_node"], consumed_elsewhere={"report", "params:x"})
    assert plan.crossing_outputs == ("report",)
    assert plan.final_outputs == ()
    assert plan_step(PIPELINE, "__default__", ["report_node"]).final_outputs == ("report",)


def test_declared_types_are_read_without_importing_the_datasets() -> None:
    """kedro_datasets.pandas imports every pandas dataset (SQLAlchemy...): naming a type from
    the catalog's configuration must not pay for that. A fresh process: this one imported it."""
    import json
    import subprocess
    import sys

    script = (
        "import json, sys\n"
        "from kedro.io import DataCatalog, MemoryDataset\n"
        "from kvx_runtime.step.hooks import declared_type, is_declared, type_name\n"
        "catalog = DataCatalog.from_config({'csv': {'type': 'pandas.CSVDataset', 'filepath': 'x.csv'},\n"
        "    'metric': {'type': 'kedro_mlflow.io.metrics.MlflowMetricDataset'},\n"
        "    '{name}_table': {'type': 'pandas.ParquetDataset', 'filepath': '{name}.pq'}})\n"
        "catalog['params:x'] = MemoryDataset(1)\n"
        "found = {'csv': declared_type(catalog, 'csv'), 'pattern': type_name(catalog, 'scores_table'),\n"
        "    'metric': type_name(catalog, 'metric'), 'params': type_name(catalog, 'params:x'),\n"
        "    'missing': declared_type(catalog, 'nothing'), 'declared': is_declared(catalog, 'scores_table'),\n"
        "    'imported': [m for m in ('kedro_datasets.pandas', 'kedro_mlflow', 'sqlalchemy') if m in sys.modules]}\n"
        "print(json.dumps(found))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "csv": "pandas.CSVDataset", "pattern": "ParquetDataset", "metric": "MlflowMetricDataset",
        "params": "MemoryDataset", "missing": None, "declared": True, "imported": []}
