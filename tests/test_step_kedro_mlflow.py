"""kedro-mlflow's hooks in a step: its after_catalog_created names its metric datasets after
their entries as under ``kedro run`` without building every other dataset of the catalog; the
tags its before_pipeline_run gives the run are the pipeline's (the requests: integration/test_mlflow.py).

Real pieces: Kedro's hook manager and DataCatalog, kedro-mlflow's own hook and datasets."""

from __future__ import annotations

import subprocess
import sys
import types
from typing import Any

import pytest

pytest.importorskip("kedro_mlflow")

from kedro.framework.hooks import _create_hook_manager
from kedro.io import DataCatalog
from kedro_mlflow.framework.hooks.mlflow_hook import MlflowHook
from kedro_mlflow.io.metrics import MlflowMetricDataset

from kvx_runtime.step.kedro_mlflow import narrow_kedro_mlflows_catalog_pass, pipeline_run_tags

pytestmark = pytest.mark.kedro

PROBE_MODULE = "kvx_probe_datasets"


class HouseMetric(MlflowMetricDataset):
    """A project's own subclass of kedro-mlflow's metric dataset, named without "Mlflow"."""


@pytest.fixture
def probe_module():
    """A project module holding the subclass, as a catalog names it (``module.Class``)."""
    module = types.ModuleType(PROBE_MODULE)
    module.HouseMetric = HouseMetric  # type: ignore[attr-defined]
    sys.modules[PROBE_MODULE] = module
    yield module
    del sys.modules[PROBE_MODULE]


def catalog_of(tmp_path) -> DataCatalog:
    return DataCatalog.from_config({
        "companies": {"type": "pandas.CSVDataset", "filepath": str(tmp_path / "companies.csv")},
        "shuttles": {"type": "kedro_datasets.pandas.CSVDataset", "filepath": str(tmp_path / "s.csv")},
        "notes": {"type": "text.TextDataset", "filepath": str(tmp_path / "notes.txt")},
        "kept": {"type": "MemoryDataset"},
        "score": {"type": "kedro_mlflow.io.metrics.MlflowMetricDataset"},
        "history": {"type": "kedro_mlflow.io.metrics.MlflowMetricHistoryDataset"},
        "house": {"type": f"{PROBE_MODULE}.HouseMetric"},
        "named": {"type": "kedro_mlflow.io.metrics.MlflowMetricDataset", "key": "chosen"},
    })


def call_hook(catalog: DataCatalog, *, narrowed: bool) -> None:
    manager = _create_hook_manager()
    manager.register(MlflowHook(), name="mlflow_hook")
    if narrowed:
        narrow_kedro_mlflows_catalog_pass(manager)
    manager.hook.after_catalog_created(catalog=catalog, conf_catalog={}, conf_creds={}, parameters={},
                                       save_version=None, load_versions={})


def built(catalog: DataCatalog) -> set[str]:
    return {name for name in catalog.keys() if name not in catalog._lazy_datasets}  # noqa: SIM118


@pytest.mark.usefixtures("probe_module")
def test_metric_datasets_are_named_after_their_entries_as_kedro_run_names_them(tmp_path) -> None:
    expected = {}
    for narrowed in (False, True):
        catalog = catalog_of(tmp_path)
        call_hook(catalog, narrowed=narrowed)
        keys = {name: catalog[name].key for name in ("score", "history", "house", "named")}
        expected.setdefault("keys", keys)
        assert keys == expected["keys"] == {"score": "score", "history": "history", "house": "house",
                                            "named": "chosen"}


@pytest.mark.usefixtures("probe_module")
def test_datasets_of_kedro_and_kedro_datasets_are_left_unbuilt(tmp_path) -> None:
    catalog = catalog_of(tmp_path)
    call_hook(catalog, narrowed=False)
    assert {"companies", "shuttles", "notes", "kept"} <= built(catalog)  # what kedro-mlflow alone does

    catalog = catalog_of(tmp_path)
    call_hook(catalog, narrowed=True)
    assert built(catalog) == {"score", "history", "house", "named"}
    assert set(catalog.keys()) == set(catalog_of(tmp_path).keys())  # nothing lost, only not built yet
    assert catalog["companies"]._filepath.name == "companies.csv"


@pytest.fixture
def project_package_named_like_kedro_datasets():
    """A project package ``api`` (kedro-datasets has a subpackage ``api`` too) holding the
    subclass: Kedro tries ``kedro_datasets.api.HouseMetric`` first, then the project's."""
    assert "api" not in sys.modules
    module = types.ModuleType("api")
    module.HouseMetric = HouseMetric  # type: ignore[attr-defined]
    sys.modules["api"] = module
    yield
    del sys.modules["api"]


@pytest.mark.usefixtures("project_package_named_like_kedro_datasets")
def test_a_project_package_named_like_a_kedro_datasets_one_is_told_apart(tmp_path) -> None:
    catalog = DataCatalog.from_config({
        "house": {"type": "api.HouseMetric"},
        "remote": {"type": "api.APIDataset", "url": "http://127.0.0.1:9/none"},
        "companies": {"type": "pandas.csv_dataset.CSVDataset", "filepath": str(tmp_path / "c.csv")},
    })
    call_hook(catalog, narrowed=True)
    assert built(catalog) == {"house"}
    assert catalog["house"].key == "house"  # as kedro run names it
    # Told from kedro-datasets' sources: the libraries of its datasets were not imported for it.
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from kvx_runtime.step.kedro_mlflow import _is_kedros_own as own; "
         "print(own('api.APIDataset'), own('api.HouseMetric'), own('pandas.csv_dataset.CSVDataset'), "
         "own('pandas.Nope'), 'requests' in sys.modules, 'sqlalchemy' in sys.modules)"],
        capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["True", "False", "True", "False", "False", "False"]


def test_a_dataset_whose_type_cannot_be_told_is_handed_to_kedro_mlflow(tmp_path) -> None:
    catalog = DataCatalog.from_config({"elsewhere": {"type": "kvx_no_such_package.Dataset"}})
    with pytest.raises(Exception, match="kvx_no_such_package"):  # as kedro-mlflow alone would
        call_hook(catalog, narrowed=True)


def test_other_plugins_hooks_are_left_as_they_are(tmp_path) -> None:
    seen: list[Any] = []

    class ProjectHooks:
        from kedro.framework.hooks import hook_impl

        @hook_impl
        def after_catalog_created(self, catalog: Any) -> None:
            seen.append(catalog)

    manager = _create_hook_manager()
    manager.register(ProjectHooks(), name="project")
    narrow_kedro_mlflows_catalog_pass(manager)
    catalog = catalog_of(tmp_path)
    manager.hook.after_catalog_created(catalog=catalog, conf_catalog={}, conf_creds={}, parameters={},
                                       save_version=None, load_versions={})
    assert seen == [catalog]


def test_the_runs_tags_are_the_pipelines_not_a_steps() -> None:
    step_tags = {"run_id": "2026-12-04T09.37.35.561Z", "project_path": "/home/kvx/project", "env": "cloud",
                 "kedro_version": "1.7.0", "node_names": "['train']", "pipeline_names": "['training']",
                 "runner": "<kedro.runner.sequential_runner.SequentialRunner object at 0x7f>",
                 "load_versions": "{'model': 'v1'}", "kedro_command": "kedro run --node=train --pipeline=training",
                 "future_key": "kept"}
    run_params = {"pipeline_names": ["training"], "node_names": ["train"], "load_versions": {"model": "v1"}}
    assert pipeline_run_tags(step_tags, run_params, "pipeline-run-7") == {
        "run_id": "pipeline-run-7", "project_path": "/home/kvx/project", "env": "cloud", "kedro_version": "1.7.0",
        "pipeline_names": "['training']", "load_versions": "{'model': 'v1'}", "future_key": "kept",
        "kedro_command": "kedro run --pipeline=training --load-version=model:v1",
    }
    # Kedro 1.0's names: session_id, pipeline_name (a string).
    old = pipeline_run_tags({"session_id": "s", "kedro_command": "kedro run --node=a"}, {"pipeline_name": "etl"}, "r")
    assert old == {"session_id": "r", "kedro_command": "kedro run --pipeline=etl"}


def test_a_step_adds_the_tags_the_run_lacks_and_overwrites_none() -> None:
    # The on-exit step runs another pipeline: its kedro_command is not the run's.
    from types import SimpleNamespace

    from kvx_runtime.mlflow.pipeline_run import AttachedRun

    written: list[dict[str, str]] = []
    client = SimpleNamespace(log_batch=lambda run_id, metrics=(), tags=(): written.append({t.key: t.value
                                                                                           for t in tags}))
    attached = AttachedRun(connection=SimpleNamespace(client=client), run_id="r",  # type: ignore[arg-type]
                           tags={"kedro_command": "kedro run --pipeline=__default__"})
    attached.add_missing_tags({"kedro_command": "kedro run --pipeline=cleanup", "env": "base"})
    attached.add_missing_tags({"kedro_command": "kedro run --pipeline=cleanup", "env": "base"})
    assert written == [{"env": "base"}]
    assert attached.tags["kedro_command"] == "kedro run --pipeline=__default__"
