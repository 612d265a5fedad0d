"""The first hour: a spaceflights-like project with a local-path catalog gets its cloud env from
`init --cloud-env cloud`, compiles with --strict, and runs step by step, each step in an empty
copy of the project (as on separate machines), writing what a plain `kedro run` writes, under
the storage root."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from integration.conftest import (
    KVX,
    StepRun,
    kedro_in_process,
    make_project,
    make_spaceflights_project,
    run_step,
    step_env,
)

pytestmark = pytest.mark.slow


def kvx(project: Path, *args: str, timeout: float = 600) -> StepRun:
    result = subprocess.run([*KVX, *args], cwd=project, env=step_env(), capture_output=True, text=True,
                            timeout=timeout)
    return StepRun(result.returncode, result.stdout, result.stderr)


def warnings_of(run: StepRun) -> list[str]:
    return [r["message"] for r in run.records if r.get("severity") == "WARNING"]


def only_version(directory: Path) -> Path:
    [version] = directory.iterdir()
    return version / directory.name


@pytest.mark.kedro
def test_the_cloud_env_runs_on_separate_machines_as_kedro_run(tmp_path: Path) -> None:
    project = make_spaceflights_project(tmp_path / "laptop", "spaceflights_first_hour")
    baseline = tmp_path / "baseline"
    shutil.copytree(project, baseline)
    kedro_in_process(baseline, "run", "base")

    compiled_base = kvx(project, "compile", "--env", "base", "-o", str(tmp_path / "base.json"))
    assert compiled_base.returncode == 0, compiled_base.stderr[-3000:]
    local_warnings = [w for w in warnings_of(compiled_base) if "local path" in w]
    assert local_warnings and all("`kvx-runtime init --cloud-env cloud`" in w for w in local_warnings)

    init = kvx(project, "init", "--cloud-env", "cloud")
    assert init.returncode == 0, init.stderr[-3000:]
    assert "conf/base/vertexai.yml" not in init.stdout  # only the overlay: no config file asked for
    assert "data/01_raw/ -> gs://kvx-e2e/spaceflights/data/01_raw/  (companies.csv, reviews.csv, shuttles.csv)" \
        in init.stdout
    assert init.stdout.rstrip().endswith("Next: kvx-runtime compile --env cloud --strict")

    # On the configured Cloud Storage root: nothing crosses steps on a local disk any more.
    strict = kvx(project, "compile", "--env", "cloud", "--strict", "-o", str(tmp_path / "cloud.json"))
    assert strict.returncode == 0, strict.stderr[-3000:]

    # On a test root: the raw inputs are missing until copied there, which compile names.
    root = tmp_path / "storage-root"
    spec = tmp_path / "cloud-local.json"
    missing = kvx(project, "compile", "--env", "cloud", "--strict", "--storage-root", str(root), "-o", str(spec))
    assert missing.returncode == 2
    assert f"pipeline input 'shuttles' is read from {root}/data/01_raw/shuttles.csv, which does not exist" in \
        "\n".join(warnings_of(missing))
    assert not spec.exists()
    shutil.copytree(project / "data" / "01_raw", root / "data" / "01_raw")  # what init said to copy
    compiled = kvx(project, "compile", "--env", "cloud", "--strict", "--storage-root", str(root), "-o", str(spec))
    assert compiled.returncode == 0, compiled.stderr[-3000:]

    ran = kvx(project, "run-local", str(spec), "--fresh-copies", "--storage-root", str(root), "--job-name", "sf-1",
              "--max-parallel", "2")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    copies = project / ".kvx" / "runs" / "sf-1" / "copies"
    assert len(list(copies.iterdir())) == 7  # one copy per step
    # Every step wrote to the storage root, none to its own disk nor the laptop's.
    assert not [p for p in copies.glob("*/data/*") if p.name != "01_raw"]
    assert sorted(p.name for p in (project / "data").iterdir()) == ["01_raw"]

    for name in ("02_intermediate/preprocessed_companies.parquet", "02_intermediate/preprocessed_shuttles.parquet",
                 "03_primary/model_input_table.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(root / "data" / name),
                                      pd.read_parquet(baseline / "data" / name), obj=name)
    for name in ("08_reporting/metrics.json", "08_reporting/shuttle_summary.csv"):
        assert (root / "data" / name).read_text() == (baseline / "data" / name).read_text(), name
    assert json.loads((root / "data" / "08_reporting" / "metrics.json").read_text())["rows"] == 15
    # The model stays versioned: one version, the run's, holding what kedro run's holds.
    ours = pickle.loads(only_version(root / "data" / "06_models" / "regressor.pickle").read_bytes())
    theirs = pickle.loads(only_version(baseline / "data" / "06_models" / "regressor.pickle").read_bytes())
    assert ours["coefficients"].tolist() == theirs["coefficients"].tolist()


def test_a_step_without_a_storage_root_refuses_the_placeholder(tmp_path: Path) -> None:
    """Never a silent local fallback: without --storage-root or run_config.root a step whose
    catalog uses ${storage_root} stops with exit 2 naming what to set."""
    project = make_project(
        tmp_path, "noroot_step",
        "def make():\n    return 'x'\n",
        "from kedro.pipeline import Pipeline, node\nfrom noroot_step.nodes import make\n\n"
        "def register_pipelines():\n    return {'__default__': Pipeline([node(make, None, 'out', name='make')])}\n",
        catalog="out:\n  type: text.TextDataset\n  filepath: ${storage_root}/data/out.txt\n",
    )
    failed = run_step(project, "--node", "make", "--env", "base")
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "${storage_root}" in failed.last_message and "KEDRO_CONFIG_STORAGE_ROOT" in failed.last_message
    assert not (project / "data").exists()

    root = tmp_path / "root"
    done = run_step(project, "--node", "make", "--env", "base", "--storage-root", str(root))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (root / "data" / "out.txt").read_text() == "x"
