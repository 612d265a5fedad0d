"""exec-node end to end: the example pipeline node by node, each node its own process, must
give exactly what one in-process `kedro run` gives; on a local root and on the GCS emulator."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from integration.conftest import reports, run_step, step_env

pytestmark = pytest.mark.slow

# Datasets the catalog does not keep that cross a step boundary: exactly these become blobs.
EXPECTED_BLOBS = {
    "data_processing.preprocessed_companies",
    "preprocessed_shuttles",
    "model_input_table",  # declared, but as a MemoryDataset
    "data_science.X_train",
    "data_science.X_test",
    "data_science.y_train",
    "data_science.y_test",
    "data_science.scaler",
    "feature_means",
    "regressor",
    # reporting.importance_table and shuttle_summary_table match the "reporting.{name}_table"
    # dataset factory: declared, so not blobs.
}


def run_pipeline_stepwise(project: Path, order: list[str], root: str, run_id: str, env=None) -> list:
    runs = []
    for node in order:
        result = run_step(project, "--node", node, "--run-id", run_id, "--storage-root", root,
                          "--env", "base", env=env)
        assert result.returncode == 0, f"{node} failed:\n{result.stderr[-3000:]}"
        runs.append(result)
    return runs


def test_stepwise_on_local_root_matches_kedro_run(example_project: Path, node_order, kedro_run_reports,
                                                  tmp_path) -> None:
    root = tmp_path / "storage"
    runs = run_pipeline_stepwise(example_project, node_order, str(root), "stepwise")

    assert reports(example_project, "stepwise") == kedro_run_reports
    listed = {p.name for p in (root / "kedro-vertexai-temp" / "stepwise").iterdir()}
    assert {name.removesuffix(".bin") for name in listed - {"owner.json"}} == EXPECTED_BLOBS
    assert "owner.json" in listed  # the run that owns the job directory

    by_node = dict(zip(node_order, runs, strict=True))
    # Every line carries the step context.
    for record in by_node["data_science.train_model_node"].records:
        assert record["run_id"] == "stepwise" and record["job_name"] == "stepwise"
        assert record["node"] == "data_science.train_model_node"
    written = [r for r in by_node["data_science.fit_scaler_node"].records if r["message"] == "blob written"]
    assert {r["dataset"] for r in written} == {"data_science.scaler", "feature_means"}
    assert all(r["bytes"] > 0 and r["seconds"] >= 0 for r in written)
    # An output nobody consumes and the catalog does not define: one warning names it.
    warnings = [r for r in by_node["reporting.feature_importance_node"].records
                if r["severity"] == "WARNING" and "not stored" in r["message"]]
    assert len(warnings) == 1 and warnings[0]["datasets"] == ["reporting.importance"]


def test_stepwise_on_gcs_emulator_matches_kedro_run(example_project: Path, node_order, kedro_run_reports,
                                                    gcs_emulator) -> None:
    root = f"gs://{gcs_emulator.bucket}/e2e"
    env = step_env(**gcs_emulator.env)
    # The job name comes from the environment here, as in the seeds' containers.
    env["KEDRO_CONFIG_JOB_NAME"] = "gcs-job"
    run_pipeline_stepwise(example_project, node_order, root, "gcs-run", env=env)

    assert reports(example_project, "gcs-run") == kedro_run_reports
    fs = gcs_emulator.filesystem()
    listed = fs.ls(f"{gcs_emulator.bucket}/e2e/kedro-vertexai-temp/gcs-job")
    names = {Path(p).name for p in listed}
    assert {name.removesuffix(".bin") for name in names - {"owner.json"}} == EXPECTED_BLOBS and "owner.json" in names


@pytest.mark.kedro
def test_group_runs_in_one_process_and_stores_only_what_leaves(example_project: Path, tmp_path) -> None:
    root = str(tmp_path / "storage")
    for node in ["data_processing.preprocess_companies_node", "data_processing.preprocess_shuttles_node",
                 "data_processing.create_model_input_table_node"]:
        assert run_step(example_project, "--node", node, "--run-id", "g", "--storage-root", root,
                        "--env", "base").returncode == 0
    group = ["data_science.split_data_node", "data_science.fit_scaler_node", "data_science.train_model_node"]
    args = [arg for node in group for arg in ("--node", node)]
    result = run_step(example_project, *args, "--run-id", "g", "--storage-root", root, "--env", "base")
    assert result.returncode == 0, result.stderr[-3000:]

    written = {r["dataset"] for r in result.records if r["message"] == "blob written"}
    # X_train and y_train never leave the group; the scaler is used inside and outside it.
    assert written == {"data_science.X_test", "data_science.y_test", "data_science.scaler",
                       "feature_means", "regressor"}
    read = {r["dataset"] for r in result.records if r["message"] == "blob read"}
    assert read == {"model_input_table"}
    started = [r["node"] for r in result.records if r["message"] == "node started"]
    assert started == group


def test_params_override_nested_parameters(example_project: Path, tmp_path) -> None:
    root = str(tmp_path / "storage")
    common = ["--run-id", "p", "--storage-root", root, "--env", "base"]
    for node in ["data_processing.preprocess_companies_node", "data_processing.preprocess_shuttles_node",
                 "data_processing.create_model_input_table_node"]:
        assert run_step(example_project, "--node", node, *common).returncode == 0
    result = run_step(example_project, "--node", "data_science.split_data_node", *common,
                      "--param", "data_science.model_options.test_size=0.5")
    assert result.returncode == 0, result.stderr[-2000:]
    from kvx_runtime.storage.store import BlobStore

    store = BlobStore(root, "p")
    x_train, x_test = store.load("data_science.X_train"), store.load("data_science.X_test")
    assert len(x_test) == len(x_train)  # test_size 0.5 replaced 0.2; the rest of the dict kept


@pytest.mark.kedro
def test_dynamic_config_provider_writes_credentials_before_kedro_reads_them(example_project: Path, tmp_path) -> None:
    package = example_project / "src" / "spaceflights_kvx"
    (package / "kvx_test_provider.py").write_text(
        "from kvx_runtime.dynamic_config import DynamicConfigProvider\n"
        "class TokenProvider(DynamicConfigProvider):\n"
        "    target_config_file = 'credentials.yml'\n"
        "    def generate_config(self):\n"
        "        return {'service': {'token': self.params['token'], 'region': self.config.region}}\n"
    )
    (example_project / "conf" / "local" / "credentials.yml").write_text("other: {user: me}\n")
    vertexai = example_project / "conf" / "base" / "vertexai.yml"
    config = yaml.safe_load(vertexai.read_text())
    config["run_config"]["dynamic_config_providers"] = [
        {"cls": "spaceflights_kvx.kvx_test_provider.TokenProvider", "params": {"token": "tok-1"}}
    ]
    vertexai.write_text(yaml.safe_dump(config))
    result = run_step(example_project, "--node", "data_processing.preprocess_companies_node",
                      "--run-id", "d", "--storage-root", str(tmp_path), "--env", "local")
    assert result.returncode == 0, result.stderr[-2000:]
    credentials = example_project / "conf" / "local" / "credentials.yml"
    assert yaml.safe_load(credentials.read_text()) == {
        "other": {"user": "me"}, "service": {"token": "tok-1", "region": "europe-west1"}}
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert "tok-1" not in result.stderr


def test_the_node_meets_the_collector_as_under_kedro_run(example_project: Path, tmp_path) -> None:
    """Start-up runs with fewer collections (kvx_runtime.collector); the node's own code with the
    interpreter's default thresholds, and what start-up built frozen out of its collections."""
    import gc
    import json

    nodes = example_project / "src" / "spaceflights_kvx" / "pipelines" / "data_processing" / "nodes.py"
    probe = ('    import gc, json, pathlib\n'
             '    pathlib.Path("gc-state.json").write_text(json.dumps({"threshold": gc.get_threshold(), '
             '"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}))\n')
    head = "def preprocess_companies(companies: pd.DataFrame) -> pd.DataFrame:\n"
    nodes.write_text(nodes.read_text().replace(head, head + probe))
    result = run_step(example_project, "--node", "data_processing.preprocess_companies_node", "--run-id", "gc",
                      "--storage-root", str(tmp_path / "storage"), "--env", "base")
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((example_project / "gc-state.json").read_text())
    assert tuple(state["threshold"]) == gc.get_threshold()  # this interpreter's defaults (pytest keeps them)
    # Kedro, pandas and the project's modules are frozen; the node's own objects are not.
    assert state["frozen"] > 100_000 and state["tracked"] < state["frozen"]
