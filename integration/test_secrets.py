"""Secrets never reach a log, an output or a file other than their target, at any log level.

A project with static credentials (one from the environment through ``${oc.env:...}``) used by
a catalog dataset, a dynamic config provider writing a token, compiled, run with run-local and
replayed at ``KVX_LOG_LEVEL=DEBUG``; then a provider whose exception quotes a secret.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from integration.conftest import KVX, make_project, run_step, step_env

pytestmark = pytest.mark.slow

STATIC = "pw-SECRET-static-8d1f2c"
FROM_ENV = "env-SECRET-5a7c91"
DYNAMIC = "tok-SECRET-dynamic-31b9e4"
IN_PARAMS = "param-SECRET-77aa03"
SECRETS = (STATIC, FROM_ENV, DYNAMIC, IN_PARAMS)

NODES = """
def clean(table):
    return table.dropna()

def count(table):
    return len(table)
"""
PIPELINE = """
from kedro.pipeline import Node, Pipeline
from secproj.nodes import clean, count

def register_pipelines():
    return {"__default__": Pipeline([Node(clean, "raw", "cleaned", name="clean"),
                                     Node(count, "cleaned", "rows", name="count")])}
"""
CATALOG = """
raw:
  type: pandas.CSVDataset
  filepath: data/raw.csv
  credentials: warehouse
rows:
  type: json.JSONDataset
  filepath: data/rows.json
"""
PROVIDERS = """
from kvx_runtime.dynamic_config import DynamicConfigProvider


class TokenProvider(DynamicConfigProvider):
    target_config_file = "credentials.yml"

    def generate_config(self):
        return {"gcp": {"token": "%s"}}


class RejectingProvider(DynamicConfigProvider):
    target_config_file = "credentials.yml"

    def generate_config(self):
        raise ValueError(f"the vault rejected token {self.params['token']}")
""" % DYNAMIC


def _project(tmp_path: Path, provider: str, params: dict | None = None) -> Path:
    vertexai = {"run_config": {"image": "img", "root": str(tmp_path / "storage"),
                               "dynamic_config_providers": [{"cls": f"secproj.providers.{provider}",
                                                             "params": params or {}}]}}
    project = make_project(tmp_path, "secproj", NODES, PIPELINE, catalog=CATALOG, vertexai=yaml.safe_dump(vertexai))
    (project / "src" / "secproj" / "providers.py").write_text(PROVIDERS)
    (project / "conf" / "base" / "credentials.yml").write_text(textwrap.dedent(f"""
        warehouse:
          username: svc-user
          password: {STATIC}
        api:
          key: ${{oc.env:SECRET_API_KEY}}
    """))
    (project / "data").mkdir()
    (project / "data" / "raw.csv").write_text("a,b\n1,2\n3,\n")
    return project


def _hits(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


@pytest.mark.kedro
def test_no_secret_anywhere_at_debug(tmp_path: Path) -> None:
    project = _project(tmp_path, "TokenProvider")
    env = step_env(KVX_LOG_LEVEL="DEBUG", SECRET_API_KEY=FROM_ENV)
    outputs = []
    compiled = subprocess.run([*KVX, "compile", "-o", str(tmp_path / "p.json")], cwd=project, env=env,
                              capture_output=True, text=True, timeout=300)
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    outputs += [compiled.stdout, compiled.stderr]
    ran = subprocess.run([*KVX, "run-local", str(tmp_path / "p.json"), "--job-name", "sec",
                          "--storage-root", str(tmp_path / "storage")], cwd=project,
                         env=env, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    outputs += [ran.stdout, ran.stderr]
    # A replay of the run's step (its run id, as the job directory's owner record holds it).
    owner = json.loads((tmp_path / "storage" / "kedro-vertexai-temp" / "sec" / "owner.json").read_text())
    replay = run_step(project, "--node", "count", "--run-id", owner["run_id"], "--job-name", "sec", env=env)
    assert replay.returncode == 0, replay.stderr[-2000:]
    outputs += [replay.stdout, replay.stderr]
    assert any('"severity": "DEBUG"' in text for text in outputs)  # DEBUG really was on

    # The dynamic token reached its target, and only there.
    written = yaml.safe_load((project / "conf" / "base" / "credentials.yml").read_text())
    assert written["gcp"]["token"] == DYNAMIC
    assert [hit for text in outputs for hit in _hits(text)] == []
    leaked_files = [str(path) for path in (tmp_path).rglob("*")
                    if path.is_file() and path.name not in {"credentials.yml", "providers.py"}
                    and _hits(path.read_text(errors="replace"))]
    assert leaked_files == []


def test_a_providers_error_quoting_a_secret_is_redacted(tmp_path: Path) -> None:
    project = _project(tmp_path, "RejectingProvider", {"token": IN_PARAMS})
    result = run_step(project, "--node", "clean", env=step_env(KVX_LOG_LEVEL="DEBUG", SECRET_API_KEY=FROM_ENV))
    assert result.returncode == 2
    assert "the vault rejected token [redacted]" in result.last_message
    assert _hits(result.stdout + result.stderr) == []


# --- a secret passed as a parameter never reaches the MLflow run ------------------------------

PARAM_SECRET = "sk-live-SECRET-9f8e7d6c"
PARAM_NODES = """
def call(api_key, options):
    return len(api_key) + options["n"]

def everything(parameters):
    return sorted(parameters)
"""
FILE_SECRET = "from-the-params-file-9Q"
PARAM_PIPELINE = """
from kedro.pipeline import Node, Pipeline
from secparam.nodes import call, everything

def register_pipelines():
    return {"__default__": Pipeline([Node(call, ["params:api_key", "params:options"], "size", name="call"),
                                     Node(everything, "parameters", "names", name="everything")])}
"""


@pytest.mark.kedro
def test_a_secret_parameter_is_nowhere_in_the_mlflow_run(tmp_path: Path, mlflow_server) -> None:
    """kedro-mlflow logs the parameters a node takes (``params:api_key``, the whole ``parameters``)
    and tags the run with the session's runtime params; kvx tags the run too. None of it may
    carry the value of ``--param api_key=...``; the other parameters are still logged."""
    from integration.test_mlflow import end, start

    project = make_project(
        tmp_path, "secparam", PARAM_NODES, PARAM_PIPELINE,
        vertexai=yaml.safe_dump({"run_config": {"image": "img", "root": str(tmp_path / "storage"),
                                                "mlflow": {"required": True}}}))
    # A secret-named value inside a parameter from parameters.yml: logged whole as one param
    # (kedro-mlflow's flatten: false), masked inside it.
    (project / "conf" / "base" / "parameters.yml").write_text(
        f"api_key: set-at-run-time\noptions:\n  n: 2\n  db_password: {FILE_SECRET}\n")
    (project / "conf" / "base" / "mlflow.yml").write_text(textwrap.dedent("""
        server:
          mlflow_tracking_uri: ${mlflow_tracking_uri}
        tracking:
          experiment:
            name: secparam
    """))
    env = step_env(KEDRO_CONFIG_MLFLOW_TRACKING_URI=mlflow_server.url)
    job = "secret-param-job"
    run_id = start(project, env, job, tmp_path)
    outputs = []
    for node in ("call", "everything"):
        result = run_step(project, "--node", node, "--run-id", f"{job}-uuid", "--job-name", job,
                          "--mlflow-run-id", run_id, "--param", f"api_key={PARAM_SECRET}", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stderr + result.stdout)
        assert any("not logged to MLflow" in message for message in result.messages())
    assert end(project, env, job, "SUCCEEDED").returncode == 0

    client = mlflow_server.client()
    run = client.get_run(run_id)
    assert "api_key" not in run.data.params
    assert run.data.params["options"] == "{'n': 2, 'db_password': '[redacted]'}"  # the rest is still logged
    assert "parameters" in run.data.params and "[redacted]" in run.data.params["parameters"]
    written = [*run.data.params.items(), *run.data.tags.items(), *map(str, run.data.metrics.items())]
    artifacts = tmp_path / "artifacts"
    client.download_artifacts(run_id, "", str(artifacts)) if client.list_artifacts(run_id) else None
    for path in artifacts.rglob("*") if artifacts.exists() else []:
        if path.is_file():
            written.append(path.read_text(errors="replace"))
    assert written and not [item for item in written if PARAM_SECRET in str(item) or FILE_SECRET in str(item)]
    assert not [text for text in outputs if PARAM_SECRET in text]  # nor in any log line
