"""Real Airflow for the tests: virtualenvs of their own, found or built once per session with uv
(what ``make airflow-venv`` builds), and a script run by their python.

* ``.venv-airflow`` (``AIRFLOW``): Airflow 3, what kvx-runtime's DAG files and REST client target;
* ``.venv-airflow2`` (``AIRFLOW2``): Airflow 2.10, the last 2.x line (Cloud Composer 2), which the
  same DAG files are parsed with too.

Airflow lives apart from Kedro's venv: today both resolve together, but Airflow pins much of
its stack (SQLAlchemy, pydantic, protobuf, kubernetes) release by release, and a Composer
worker has no Kedro either. The DAG files kvx-runtime writes import nothing of kvx-runtime,
which this separation also checks.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class AirflowVenv:
    """One Airflow virtualenv: where it lives, what uv installs into it, with which Python."""

    #: What the messages call it.
    name: str
    path: Path
    requirements: tuple[str, ...]
    #: The modules a usable venv imports.
    imports: tuple[str, ...]
    #: uv's ``--python``: an interpreter or a version.
    python: str


#: google-auth: the GoogleOAuth2 authentication's macro mints ID tokens on the worker (Composer has it).
AIRFLOW = AirflowVenv(
    name="Airflow 3", path=Path(os.environ.get("KVX_TEST_AIRFLOW_VENV", REPO / ".venv-airflow")),
    requirements=("apache-airflow>=3.3,<4", "apache-airflow-providers-cncf-kubernetes>=10,<11", "google-auth>=2"),
    imports=("airflow.sdk", "airflow.providers.cncf.kubernetes", "google.auth"), python=sys.executable)
#: The provider's 10.11 and later need Airflow 2.11: 10.10 is the newest 10.x for 2.10 (named, or uv
#: may trade it for a newer cryptography). Airflow 2.10 runs on Python 3.8 to 3.12; 3.11 as on
#: Cloud Composer 2, whatever Python Kedro's venv runs.
AIRFLOW2 = AirflowVenv(
    name="Airflow 2.10", path=Path(os.environ.get("KVX_TEST_AIRFLOW2_VENV", REPO / ".venv-airflow2")),
    requirements=("apache-airflow>=2.10,<2.11", "apache-airflow-providers-cncf-kubernetes>=10.10,<10.11",
                  "google-auth>=2"),
    imports=("airflow.models.dagbag", "airflow.providers.cncf.kubernetes", "google.auth"), python="3.11")
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


@dataclass(frozen=True)
class DagRun:
    run_id: str
    state: str
    #: Task id -> its state in this run.
    tasks: dict[str, str]
    output: str


@dataclass(frozen=True)
class LocalAirflow:
    project: Path
    airflow: Path
    dag_file: Path
    env: dict[str, str]
    database: Path
    dag_id: str

    def test_run(self, conf: dict[str, object] | None = None) -> DagRun:
        """One ``airflow dags test`` run of the DAG, and what Airflow's database says of it."""
        with sqlite3.connect(self.database) as db:
            before = {row[0] for row in db.execute("SELECT run_id FROM dag_run WHERE dag_id = ?", (self.dag_id,))}
        args = [str(self.airflow), "dags", "test", self.dag_id, "-f", str(self.dag_file)]
        if conf:
            args += ["-c", json.dumps(conf)]
        done = subprocess.run(args, env=self.env, cwd=self.project, capture_output=True, text=True, timeout=600)
        output = done.stdout + done.stderr
        with sqlite3.connect(self.database) as db:
            runs = [row for row in db.execute("SELECT run_id, state FROM dag_run WHERE dag_id = ?", (self.dag_id,))
                    if row[0] not in before]
            assert len(runs) == 1, output[-4000:]
            [(run_id, state)] = runs
            tasks = dict(db.execute("SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?",
                                    (self.dag_id, run_id)).fetchall())
        return DagRun(run_id=run_id, state=state, tasks=tasks, output=output)


def local_airflow_for(found: AirflowEnv, project: Path, dag_file: Path, dag_id: str, **extra_env: str) -> LocalAirflow:
    """``airflow dags test`` of ``dag_file`` (an ``--operator local`` DAG of ``project``) in
    ``found``'s AIRFLOW_HOME (sqlite, migrated now), its tasks running `kvx-runtime` from the
    Kedro venv with this checkout's code; ``extra_env``: more of the worker's environment."""
    env = found.env()
    env.update(
        AIRFLOW__CORE__DAGS_FOLDER=str(dag_file.parent),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{found.home / 'airflow.db'}",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        KVX_LOG_FORMAT="json",
        **extra_env,
    )
    airflow = found.python.parent / "airflow"
    migrated = subprocess.run([str(airflow), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    if migrated.returncode != 0:
        raise AssertionError(f"airflow db migrate failed: {migrated.stderr[-3000:]}")
    return LocalAirflow(project=project, airflow=airflow, dag_file=dag_file, env=env,
                        database=found.home / "airflow.db", dag_id=dag_id)


def _airflow_ready(venv: AirflowVenv) -> bool:
    python = venv.path / "bin" / "python"
    if not python.exists():
        return False
    check = subprocess.run([str(python), "-c", f"import {', '.join(venv.imports)}"], capture_output=True,
                           timeout=120)
    return check.returncode == 0


def find_or_build(home: Path, venv: AirflowVenv = AIRFLOW) -> AirflowEnv | str:
    """``venv`` (built with uv if missing), or why it cannot be had. One builder at a time
    (pytest-xdist's workers each ask): the others wait for it and find it built."""
    import fcntl

    venv.path.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.path.parent / f"{venv.path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _find_or_build(home, venv)


def _find_or_build(home: Path, venv: AirflowVenv) -> AirflowEnv | str:
    python = venv.path / "bin" / "python"
    started = time.monotonic()
    built = 0.0
    if not _airflow_ready(venv):
        uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
        if not Path(uv).exists():
            return f"uv is not installed: it builds {venv.path.name} (make airflow-venv)"
        try:
            if not python.exists():  # else a venv missing a requirement: installed into
                subprocess.run([uv, "venv", "-q", "--python", venv.python, str(venv.path)], check=True,
                               capture_output=True, timeout=300)
            subprocess.run([uv, "pip", "install", "-q", "--python", str(python), *venv.requirements], check=True,
                           capture_output=True, timeout=900)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            output = getattr(exc, "stderr", b"") or b""
            return f"cannot build {venv.path} ({venv.name}) with uv: {output.decode(errors='replace')[-300:]}"
        built = time.monotonic() - started
        if not _airflow_ready(venv):
            return f"{venv.path} was built but does not import {', '.join(venv.imports)}"
    home.mkdir(parents=True, exist_ok=True)
    (home / "kubeconfig").write_text(DUMMY_KUBECONFIG)
    return AirflowEnv(python=python, home=home, build_seconds=built)


if __name__ == "__main__":  # make airflow-venv: both
    import tempfile

    for venv in (AIRFLOW, AIRFLOW2):
        found = find_or_build(Path(tempfile.mkdtemp(prefix="kvx-airflow-home-")), venv)
        if isinstance(found, str):
            sys.exit(found)
        print(f"{venv.name} in {venv.path} ({found.build_seconds:.0f} s to build)")
