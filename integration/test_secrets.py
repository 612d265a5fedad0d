"""Secrets never reach a log, an output or a file other than their target, at any log level.

A project with static credentials (one from the environment through ``${oc.env:...}``) used by
a catalog dataset, a dynamic config provider writing a token, compiled, run with run-local and
replayed at ``KVX_LOG_LEVEL=DEBUG``; then a provider whose exception quotes a secret.
"""

from __future__ import annotations

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
    replay = run_step(project, "--node", "count", "--run-id", "x", "--job-name", "sec", env=env)
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
