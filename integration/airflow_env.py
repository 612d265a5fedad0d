"""Real Airflow 3 for the tests: a virtualenv of its own (``.venv-airflow``, what ``make
airflow-venv`` builds), found or built once per session with uv, and a script run by its python.

Airflow lives apart from Kedro's venv: today both resolve together, but Airflow pins much of
its stack (SQLAlchemy, pydantic, protobuf, kubernetes) release by release, and a Composer
worker has no Kedro either. The DAG files kvx-runtime writes import nothing of kvx-runtime,
which this separation also checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
AIRFLOW_VENV = Path(os.environ.get("KVX_TEST_AIRFLOW_VENV", REPO / ".venv-airflow"))
REQUIREMENTS = ("apache-airflow>=3.3,<4", "apache-airflow-providers-cncf-kubernetes>=10,<11")
#: A kube config pointing at nothing: the provider builds pods without a cluster, but not without a config.
DUMMY_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: none, user: {token: not-a-token}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
"""


@dataclass(frozen=True)
class AirflowEnv:
    python: Path
    home: Path
    #: Seconds building the venv took (0 when it was there already).
    build_seconds: float

    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("AIRFLOW", "KVX_", "KEDRO"))}
        env.update(AIRFLOW_HOME=str(self.home), KUBECONFIG=str(self.home / "kubeconfig"),
                   AIRFLOW__CORE__LOAD_EXAMPLES="false", AIRFLOW__CORE__UNIT_TEST_MODE="true")
        return env

    def run_json(self, script: str, *args: str, timeout: float = 300) -> Any:
        """Run ``script`` (Python) with Airflow's python; it prints one JSON document last."""
        done = subprocess.run([str(self.python), "-c", script, *args], env=self.env(), capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"Airflow script failed ({done.returncode}): {done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def _airflow_ready(python: Path) -> bool:
    if not python.exists():
        return False
    check = subprocess.run([str(python), "-c", "import airflow.sdk, airflow.providers.cncf.kubernetes"],
                           capture_output=True, timeout=120)
    return check.returncode == 0


def find_or_build(home: Path) -> AirflowEnv | str:
    """The Airflow venv (built with uv if missing), or why it cannot be had. One builder at a
    time (pytest-xdist's workers each ask): the others wait for it and find it built."""
    import fcntl

    AIRFLOW_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(AIRFLOW_VENV.parent / f"{AIRFLOW_VENV.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _find_or_build(home)


def _find_or_build(home: Path) -> AirflowEnv | str:
    python = AIRFLOW_VENV / "bin" / "python"
    started = time.monotonic()
    built = 0.0
    if not _airflow_ready(python):
        uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
        if not Path(uv).exists():
            return "uv is not installed: it builds .venv-airflow (make airflow-venv)"
        try:
            subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(AIRFLOW_VENV)], check=True,
                           capture_output=True, timeout=120)
            subprocess.run([uv, "pip", "install", "-q", "--python", str(python), *REQUIREMENTS], check=True,
                           capture_output=True, timeout=900)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            output = getattr(exc, "stderr", b"") or b""
            return f"cannot build {AIRFLOW_VENV} with uv: {output.decode(errors='replace')[-300:]}"
        built = time.monotonic() - started
        if not _airflow_ready(python):
            return f"{AIRFLOW_VENV} was built but does not import airflow.sdk and the Kubernetes provider"
    home.mkdir(parents=True, exist_ok=True)
    (home / "kubeconfig").write_text(DUMMY_KUBECONFIG)
    return AirflowEnv(python=python, home=home, build_seconds=built)


if __name__ == "__main__":  # make airflow-venv
    import tempfile

    found = find_or_build(Path(tempfile.mkdtemp(prefix="kvx-airflow-home-")))
    if isinstance(found, str):
        sys.exit(found)
    print(f"Airflow in {AIRFLOW_VENV} ({found.build_seconds:.0f} s to build)")
