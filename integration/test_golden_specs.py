"""The compiled specs of the example and real-world projects equal the golden ones byte for byte
(integration/golden/, written by integration/golden_specs.py: see its docstring to regenerate
them after an intended change)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from integration.conftest import step_env
from integration.golden_specs import CASES, GOLDEN, find_ruff, ruff_findings


def test_specs_equal_the_golden_ones_byte_for_byte(tmp_path: Path) -> None:
    if importlib.util.find_spec("kedro_mlflow") is None:  # the MLflow cases compile MLflow steps only with it
        pytest.skip("kedro-mlflow is not installed (kvx-runtime[mlflow])")
    # One process for every case: Kedro is imported once, and this process's Kedro state stays clean.
    made = subprocess.run([sys.executable, "-m", "integration.golden_specs", "--out", str(tmp_path)],
                          cwd=REPO, env=step_env(), capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    golden = sorted(path.name for path in GOLDEN.iterdir())
    assert sorted(path.name for path in tmp_path.iterdir()) == golden
    assert len(golden) == 2 * len(CASES)
    differing = [name for name in golden if (tmp_path / name).read_bytes() != (GOLDEN / name).read_bytes()]
    assert not differing, (
        f"compiled specs differ from integration/golden/: {', '.join(differing)} (compare with "
        f"`diff -r integration/golden {tmp_path}`; if the change is intended, run "
        "`python -m integration.golden_specs --write` and review the diff)"
    )


def test_golden_dag_files_are_formatted_and_their_imports_sorted_and_used() -> None:
    """The DAG files are meant to be read: ruff's formatter and its import and pyflakes rules
    (isort order, nothing unused or undefined) leave them as they are."""
    ruff = find_ruff()
    if ruff is None:
        pytest.skip("ruff is not installed")
    dags = sorted(str(path) for path in GOLDEN.glob("*.py"))
    assert len(dags) == sum(1 for case in CASES if case.airflow) > 0
    assert ruff_findings(ruff, dags) is None
