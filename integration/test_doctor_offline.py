"""``kvx-runtime doctor`` without a network, as on a laptop offline or in a closed container:
a ``gs://`` root whose credentials google-auth looks for on a metadata server that refuses
every connection. One line per check, the verdict, and nothing after (how long it takes is
measured by ``bench/run.py --only doctor``, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from integration.conftest import step_env

pytestmark = pytest.mark.slow

CHECKS = ["runtime", "project", "config", "storage", "mlflow", "auth", "code"]


def offline_env(tmp_path: Path) -> dict[str, str]:
    """No emulator, no credentials file, a metadata server on a closed port of 127.0.0.1."""
    closed = f"127.0.0.1:{free_port()}"
    env = step_env(GCE_METADATA_HOST=closed, GCE_METADATA_IP=closed, CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
                   HOME=str(tmp_path))
    for key in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"):
        env.pop(key, None)
    return env


def test_doctor_offline_prints_its_table_and_its_verdict_last(example_project: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "kvx_runtime", "doctor", "--env", "base",
                             "--storage-root", "gs://kvx-offline/pipelines"], cwd=example_project,
                            env=offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines] == CHECKS, result.stdout + result.stderr
    by_name = {line.split()[1]: line for line in lines}
    assert [line.split()[1] for line in lines if line.startswith("FAIL")] == ["storage"], result.stdout
    assert "KVX_DOCTOR_TIMEOUT" in by_name["storage"] or "unreachable" in by_name["storage"]
    # kedro-mlflow's own set-up writes conf/local/mlflow.yml: off for steps of env base, and said so.
    mlflow = by_name["mlflow"]
    assert mlflow.startswith("ok") and "conf/local/mlflow.yml" in mlflow, mlflow
    assert "--env local" in mlflow and "conf/base" in mlflow and "not configured" not in mlflow
    assert result.returncode == 3
    # The table's last line ends stdout; stderr holds the verdict alone: no library's warning
    # (google-auth's metadata-server retries go on in a thread the doctor gave up on).
    assert lines[-1] == by_name["code"] and result.stdout.endswith("\n")
    verdict = [json.loads(line) for line in result.stderr.splitlines()]
    assert len(verdict) == 1, result.stderr
    assert verdict[0]["severity"] == "ERROR" and "doctor failed" in verdict[0]["message"]
    assert verdict[0]["exit_code"] == 3


def test_doctor_reports_mlflow_configured_for_the_steps_env_as_not_skipped(example_project: Path,
                                                                          tmp_path: Path) -> None:
    """With ``--env local`` the steps read conf/local/mlflow.yml: the MLflow check connects
    (and, offline, fails on its own line) instead of pointing at another env."""
    (example_project / "conf" / "local" / "mlflow.yml").write_text(
        f"server:\n  mlflow_tracking_uri: http://127.0.0.1:{free_port()}\n")
    result = subprocess.run([sys.executable, "-m", "kvx_runtime", "doctor", "--env", "local",
                             "--storage-root", str(tmp_path / "store")], cwd=example_project,
                            env=offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines] == CHECKS, result.stdout + result.stderr
    mlflow = next(line for line in lines if line.split()[1] == "mlflow")
    assert mlflow.startswith("FAIL") and "conf/local" not in mlflow, mlflow
    assert result.returncode == 3
    assert len(result.stderr.splitlines()) == 1, result.stderr
