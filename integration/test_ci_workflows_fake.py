"""The push and main-branch jobs of the workflows `init --with-github-actions` writes, their
shell steps run here as GitHub's runner would (bash -eo pipefail, $GITHUB_ENV carried from step
to step, $GITHUB_STEP_SUMMARY collected) against the fake Vertex AI API. What only GitHub can
run (checkout, the auth action, setup-gcloud, the docker build and push) is left out: the fake
Google token endpoint stands in for the auth action's credentials."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from integration.conftest import step_env
from integration.fake_vertex import FakeVertex
from kvx_runtime.cli import cli

pytestmark = pytest.mark.slow

PROJECT_ID, REGION = "kvx-example-project", "europe-west1"
SHA = "0123456789abcdef0123456789abcdef01234567"
#: Steps that need GitHub's runner or a Docker daemon and registry.
NOT_HERE = {"Install the project"}


@pytest.fixture
def vertex(fake_google):
    fake = FakeVertex(fake_google, project=PROJECT_ID, region=REGION).start()
    yield fake
    fake.stop()


def run_job(root: Path, job: dict[str, Any], env: dict[str, str], tmp_path: Path) -> str:
    """Run ``job``'s run: steps in order; returns its step summary."""
    runner = tmp_path / "runner"
    runner.mkdir(parents=True, exist_ok=True)
    summary, github_env = runner / "summary.md", runner / "env"
    summary.write_text("")
    github_env.write_text("")
    for step in job["steps"]:
        if "run" not in step or step.get("name") in NOT_HERE:
            continue
        carried = dict(line.split("=", 1) for line in github_env.read_text().splitlines() if "=" in line)
        step_environment = {**env, **carried, "GITHUB_ENV": str(github_env), "GITHUB_STEP_SUMMARY": str(summary),
                            "RUNNER_TEMP": str(runner)}
        result = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd=root,
                                env=step_environment, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{step.get('name')}: {result.stdout[-1000:]}{result.stderr[-2000:]}"
    return summary.read_text()


def test_the_push_and_main_branch_jobs_run_upload_and_schedule_on_vertex(example_project: Path, vertex: FakeVertex,
                                                                           fake_google, tmp_path: Path) -> None:
    from integration.test_mlflow import _service_account_key

    root = example_project
    config = root / "conf" / "base" / "vertexai.yml"
    config.write_text(config.read_text().replace("run_config:\n", (
        "run_config:\n"
        f"  template_repository: {vertex.url}/kfp/{PROJECT_ID}/pipelines\n"
        "  schedules:\n    default_schedule:\n      cron_expression: '0 3 * * *'\n"), 1))
    for arguments in (["--with-github-actions"], ["--cloud-env", "cloud"]):
        result = CliRunner().invoke(cli, ["init", "--project-path", str(root), *arguments])
        assert result.exit_code == 0, result.output
    (root / "conf" / "local" / "mlflow.yml").unlink()  # compile --strict: MLflow config the steps would not read
    workflow = yaml.safe_load((root / ".github" / "workflows" / "kvx-pipeline.yml").read_text())

    adc = _service_account_key(tmp_path / "adc.json", f"{fake_google.url}/token",
                               "deployer@kvx-test.iam.gserviceaccount.com")
    # The workflow's env block as GitHub would evaluate it for a push of SHA to main, no variables set.
    evaluated = {"IMAGE_REPOSITORY": "europe-docker.pkg.dev/kvx-example-project/images/spaceflights-kvx",
                 "KEDRO_CONFIG_COMMIT_ID": SHA, "CODE_UPLOAD": "false", "ON_MAIN_BRANCH": "true",
                 "PYTHON_VERSION": "3.11"}
    assert set(evaluated) == set(workflow["env"])
    env = step_env(**evaluated, GITHUB_SHA=SHA, KEDRO_ENV="cloud", KVX_VERTEX_ENDPOINT=vertex.url,
                   GOOGLE_APPLICATION_CREDENTIALS=str(adc), KVX_VERTEX_RETRY_WAIT="0.05")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"

    run_summary = run_job(root, workflow["jobs"]["run-once"], env, tmp_path / "run-once")
    [job] = vertex.jobs.values()
    assert f"{evaluated['IMAGE_REPOSITORY']}:{SHA}" in str(job["pipelineSpec"])
    assert f"### Run of {SHA[:7]} on Vertex AI" in run_summary
    assert "Console: <https://console.cloud.google.com/vertex-ai/" in run_summary

    deploy_summary = run_job(root, workflow["jobs"]["deploy"], env, tmp_path / "deploy")
    assert {tag for _, tag in vertex.templates} >= {SHA, "latest"}
    [schedule] = vertex.schedules.values()
    assert schedule["cron"].endswith("0 3 * * *")
    assert f"### {SHA[:7]} deployed to Vertex AI" in deploy_summary and "Uploaded as" in deploy_summary
    assert "Console: <https://console.cloud.google.com/vertex-ai/pipelines/runs?project=" in deploy_summary
