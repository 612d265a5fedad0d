"""The main job: compile the example project's pipeline, then run the compiled spec locally.

``kvx-runtime compile`` turns the Kedro pipeline into a Vertex AI pipeline spec;
``kvx-runtime run-local`` executes that same spec here, each step a separate
``kvx-runtime exec-node`` process exactly as Vertex AI would start it. It is compiled for the
laptop's ``local`` environment, which gives the embedded defaults: intermediates on a storage
root under the project (``.kvx/storage``) and a local MLflow (``.kvx/mlflow.db``) holding the
pipeline's one run, started by the ``mlflow-start-run`` step and ended by the exit handler.
(Without ``--env`` steps use ``base``, which project images contain; ``conf/local`` stays on
the laptop.) ``${commit_id}`` is the checkout's commit, as CI would set it (``local`` outside
a git checkout). Prints where everything is.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent / "example_project"
KVX = [sys.executable, "-m", "kvx_runtime"]


def main() -> int:
    spec = PROJECT / ".kvx" / "pipeline.json"
    print(f"1/2 Compiling {PROJECT.name} to {spec}", flush=True)
    compiled = subprocess.run(
        [*KVX, "compile", "--env", "local", "--output", str(spec),
         "--params", "data_science.model_options.test_size:float,reporting.top_n:int"],
        cwd=PROJECT, env=_env(), capture_output=True, text=True,
    )
    if compiled.returncode != 0:
        print(compiled.stderr[-4000:], file=sys.stderr)
        return compiled.returncode
    print(compiled.stdout.strip())
    print("2/2 Running the compiled spec locally", flush=True)
    ran = subprocess.run([*KVX, "run-local", str(spec), "--max-parallel", "2"], cwd=PROJECT, env=_env())
    if ran.returncode != 0:
        return ran.returncode
    runs = sorted((PROJECT / ".kvx" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    status = json.loads((runs[-1] / "status.json").read_text())
    reports = PROJECT / "data" / "08_reporting" / status["run_id"]
    print(f"\nOutputs of run {status['run_id']}: {reports}")
    for path in sorted(reports.iterdir()):
        print(f"  {path.name}")
    print(f"Report:\n\n{next(reports.glob('report_*.md')).read_text()}")
    print(f"Intermediates: {PROJECT / '.kvx' / 'storage' / 'kedro-vertexai-temp' / status['job_name']}")
    print(f"Step logs:     {runs[-1] / 'logs'}")
    print(f"MLflow run:    {mlflow_summary(status['job_name'])}")
    print(f"               browse it with: mlflow ui --backend-store-uri sqlite:///{PROJECT / '.kvx' / 'mlflow.db'}")
    return 0


def mlflow_summary(job_name: str) -> str:
    """The pipeline's one run in the embedded MLflow: status, metrics, artifacts."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        return "MLflow is not installed"
    from kvx_runtime.mlflow import NODE_SECONDS_PREFIX

    client = MlflowClient(tracking_uri=f"sqlite:///{PROJECT / '.kvx' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("spaceflights-kvx")
    if experiment is None:
        return "no experiment (MLflow was off)"
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.vertexai_job_name = '{job_name}'")
    if len(runs) != 1:
        return f"{len(runs)} runs for this job (expected exactly one)"
    run = runs[0]
    timed = sum(1 for key in run.data.metrics if key.startswith(NODE_SECONDS_PREFIX))
    metrics = ", ".join(f"{k}={v:g}" for k, v in sorted(run.data.metrics.items())
                        if not k.startswith(NODE_SECONDS_PREFIX))
    metrics += f" (and {timed} nodes' seconds, {NODE_SECONDS_PREFIX}*)" if timed else ""
    artifacts = ", ".join(a.path for a in client.list_artifacts(run.info.run_id))
    return f"{run.info.run_name} {run.info.status}; metrics: {metrics}; artifacts: {artifacts}"


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "KVX_LOG_FORMAT": os.environ.get("KVX_LOG_FORMAT", "text"),
            "KEDRO_CONFIG_COMMIT_ID": os.environ.get("KEDRO_CONFIG_COMMIT_ID") or _commit_id()}


def _commit_id() -> str:
    """What CI sets ``KEDRO_CONFIG_COMMIT_ID`` to (docs/configuration.md): the checkout's commit,
    "local" outside a checkout, so the example's ``${commit_id|dirty}`` names what ran."""
    found = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=PROJECT, capture_output=True,
                           text=True, check=False) if shutil.which("git") else None
    return found.stdout.strip() if found is not None and found.returncode == 0 else "local"


if __name__ == "__main__":
    sys.exit(main())
