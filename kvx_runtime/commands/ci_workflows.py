"""``init --with-github-actions``: GitHub Actions workflows for the project's target, from the
templates ``github-pipeline.yml`` (every push: image, compile, run-once; the main branch: also
upload-pipeline and schedule) and ``github-checks.yml`` (pull requests: ``compile --strict``
and checks that need no cloud), and what to set up once for them (docs/ci-cd.md).

The templates hold GitHub's own ``${{ ... }}`` expressions, so they are filled by replacing a
few ``@@NAME@@`` placeholders, never by ``str.format``. A placeholder alone on its line stands
for a block of lines (or none); every other one for a value inside a line."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvx_runtime.targets.registry import TargetInfo
from kvx_runtime.templates import template_text

__all__ = [
    "GITHUB_AUTH_MODES",
    "REPOSITORY_VARIABLES",
    "WORKFLOW_FILES",
    "WorkflowPlan",
    "image_repository",
    "plan_workflows",
    "render_template",
]

#: GitHub repository variables the generated workflows read (``vars.*``): set in the
#: repository, never read by kvx-runtime from its own environment.
IMAGE_REPOSITORY_VARIABLE, CODE_UPLOAD_VARIABLE = "KVX_IMAGE_REPOSITORY", "KVX_CODE_UPLOAD"
REPOSITORY_VARIABLES = (IMAGE_REPOSITORY_VARIABLE, CODE_UPLOAD_VARIABLE)


#: Workflow file in .github/workflows/ -> its template.
WORKFLOW_FILES: Mapping[str, str] = {
    "kvx-pipeline.yml": "github-pipeline.yml",
    "kvx-checks.yml": "github-checks.yml",
}

#: ``--github-auth``: Workload Identity Federation (no stored credential), or a service-account
#: key in the ``GCP_SA_KEY`` secret (a long-lived credential: the weaker way).
GITHUB_AUTH_MODES: tuple[str, ...] = ("workload-identity", "key")

_PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")
#: An image repository safe to put inside a quoted GitHub expression and a shell word.
_IMAGE_REPOSITORY = re.compile(r"^[a-z0-9][a-z0-9._-]*(:[0-9]+)?(/[a-z0-9._-]+)+$")
_GITHUB_REMOTE = re.compile(r"github\.com[:/]([\w.-]+/[\w.-]+?)(?:\.git)?/?$")


@dataclass(frozen=True)
class _TargetWorkflow:
    """What differs between the targets' workflows."""

    title: str
    #: Where the workflows' compile step writes its output (its format follows the suffix).
    spec_file: str
    #: Job-level ``env:`` of the jobs that talk to the service: its credentials (secrets).
    service_env: tuple[str, ...] = ()
    #: Repository secrets the service's auth reads, as the setup lines list them.
    service_secrets: str = ""


_KUBEFLOW_ENV = (
    "# Kubeflow Pipelines auth (docs/kubeflow.md, \"Auth\"): KFP behind Google's IAP proxy, or",
    "# behind Dex with a static-password user. An unset secret is empty: that mode is off.",
    "IAP_CLIENT_ID: ${{ secrets.IAP_CLIENT_ID }}",
    "DEX_USERNAME: ${{ secrets.DEX_USERNAME }}",
    "DEX_PASSWORD: ${{ secrets.DEX_PASSWORD }}",
)
_AIRFLOW_ENV = (
    "# Airflow REST API auth (docs/airflow.md): a token, or a user and password. Neither set, a",
    "# Cloud Composer host takes the Google credentials of the auth step.",
    "KVX_AIRFLOW_TOKEN: ${{ secrets.KVX_AIRFLOW_TOKEN }}",
    "KVX_AIRFLOW_USERNAME: ${{ secrets.KVX_AIRFLOW_USERNAME }}",
    "KVX_AIRFLOW_PASSWORD: ${{ secrets.KVX_AIRFLOW_PASSWORD }}",
)

_TARGET_WORKFLOWS: Mapping[str, _TargetWorkflow] = {
    "vertex": _TargetWorkflow("Vertex AI", "pipeline.json"),
    "kubeflow": _TargetWorkflow("Kubeflow Pipelines", "pipeline.yaml", _KUBEFLOW_ENV,
                                "IAP_CLIENT_ID (KFP behind IAP), or DEX_USERNAME and DEX_PASSWORD (KFP behind Dex)"),
    "airflow": _TargetWorkflow("Airflow", "pipeline_dag.py", _AIRFLOW_ENV,
                               "KVX_AIRFLOW_TOKEN, or KVX_AIRFLOW_USERNAME and KVX_AIRFLOW_PASSWORD "
                               "(none for Cloud Composer)"),
}

# With Workload Identity Federation, KFP behind IAP wants an ID token for the proxy's client id,
# which the federated credentials cannot mint themselves: the auth action asks for one and the
# client sends it as a bearer token (KF_PIPELINES_TOKEN wins over IAP_CLIENT_ID).
_KUBEFLOW_IAP_STEPS = (
    "- name: Google ID token for Kubeflow's IAP proxy",
    "  id: iap",
    "  if: env.IAP_CLIENT_ID != ''",
    "  uses: google-github-actions/auth@v3",
    "  with:",
    "    workload_identity_provider: ${{ vars.GCP_WORKLOAD_IDENTITY_PROVIDER }}",
    "    service_account: ${{ vars.GCP_SERVICE_ACCOUNT }}",
    "    token_format: id_token",
    "    id_token_audience: ${{ env.IAP_CLIENT_ID }}",
    "    id_token_include_email: true",
    "- name: Send Kubeflow the ID token",
    "  if: steps.iap.outputs.id_token != ''",
    "  env:",
    "    ID_TOKEN: ${{ steps.iap.outputs.id_token }}",
    "  run: echo \"KF_PIPELINES_TOKEN=$ID_TOKEN\" >> \"$GITHUB_ENV\"",
)

_WORKLOAD_IDENTITY_WITH = (
    "workload_identity_provider: ${{ vars.GCP_WORKLOAD_IDENTITY_PROVIDER }}",
    "service_account: ${{ vars.GCP_SERVICE_ACCOUNT }}",
)
_KEY_WITH = (
    "# A service-account key in a secret: weaker than Workload Identity Federation (a",
    "# long-lived credential to guard and rotate), docs/ci-cd.md.",
    "credentials_json: ${{ secrets.GCP_SA_KEY }}",
)


@dataclass(frozen=True)
class WorkflowPlan:
    """The workflow files to write (path -> text) and what to set up once for them."""

    files: Mapping[Path, str]
    setup: str


def render_template(text: str, values: Mapping[str, str | tuple[str, ...]]) -> str:
    """``text`` with each ``@@NAME@@`` replaced: a placeholder alone on its line by the lines of
    a tuple value, at the placeholder's indentation (an empty tuple removes the line); any other
    by a string value. A placeholder without a value is a ValueError: never a half-filled file."""
    out: list[str] = []
    for line in text.splitlines(keepends=True):
        alone = _PLACEHOLDER.fullmatch(line.strip())
        if alone is not None:
            block = values.get(alone.group(1))
            if not isinstance(block, tuple):
                raise ValueError(f"no lines for the block placeholder {line.strip()}")
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(f"{indent}{item}\n" if item else "\n" for item in block)
            continue

        def value(match: re.Match[str]) -> str:
            filled = values.get(match.group(1))
            if not isinstance(filled, str):
                raise ValueError(f"no value for the placeholder {match.group(0)}")
            return filled

        out.append(_PLACEHOLDER.sub(value, line))
    return "".join(out)


def image_repository(image: str | None) -> str | None:
    """The repository of ``image`` (its tag or digest dropped) when it names a registry host
    (``<region>-docker.pkg.dev/...``, ``gcr.io/...``): what the workflows push to; else None."""
    if not image:
        return None
    repository = image.split("@", 1)[0]
    name, colon, tag = repository.rpartition(":")
    if colon and "/" not in tag:
        repository = name
    if "/" not in repository or not re.search(r"[.:]|^localhost$", repository.split("/", 1)[0]):
        return None
    return repository if _IMAGE_REPOSITORY.match(repository) else None


def plan_workflows(root: Path, target: TargetInfo, group: str, config_text: str | None, auth: str,
                   kedro_env: str | None = None) -> WorkflowPlan:
    """The workflows for ``target``'s project at ``root``, its values from ``config_text`` (the
    config file this init writes) or else the config file in the project's conf/base. No config file: a
    ConfigError (exit 2), since the workflows run the project's configured pipeline.

    The workflows run in ``kedro_env`` (the cloud env this init writes), else in the one cloud
    env ``init --cloud-env`` wrote before: without one, datasets that cross steps stay on the
    steps' local disks and ``compile --strict`` rightly fails."""
    from kvx_runtime.cloud_env import written_cloud_envs
    from kvx_runtime.errors import ConfigError, UsageError
    from kvx_runtime.project import conf_folder_of

    if auth not in GITHUB_AUTH_MODES:
        raise UsageError(f"--github-auth {auth!r} is not one of {', '.join(GITHUB_AUTH_MODES)}")
    folder = conf_folder_of(root)
    config = _project_config(root / folder, target, config_text)
    if config is None:
        raise ConfigError(f"no {folder}/base/{target.config_files[0]}: the workflows run the project's configured "
                          "pipeline, so nothing was written",
                          hint=f"pass the init arguments too ({group} init --help) to write it as well")
    workflow = _TARGET_WORKFLOWS[target.name]
    run_config = config.get("run_config") if isinstance(config.get("run_config"), dict) else {}
    image = run_config.get("image") if isinstance(run_config, dict) else None
    repository = image_repository(image if isinstance(image, str) else None)
    workload_identity = auth == "workload-identity"
    command = "kvx-runtime" + (f" {target.command_group}" if target.command_group else "")
    written = written_cloud_envs(root / folder)
    if kedro_env is None and len(written) == 1:
        kedro_env = written[0]
    values: dict[str, str | tuple[str, ...]] = {
        "INIT_COMMAND": f"{group} init",
        "TARGET_TITLE": workflow.title,
        "COMMAND": command,
        "SPEC_FILE": workflow.spec_file,
        "IMAGE_REPOSITORY": repository or "",
        "KEDRO_ENV": kedro_env or "",
        "ID_TOKEN_PERMISSION": (("  id-token: write  # Workload Identity Federation: GitHub's OIDC token",)
                                if workload_identity else ()),
        "GOOGLE_AUTH_WITH": _WORKLOAD_IDENTITY_WITH if workload_identity else _KEY_WITH,
        "SERVICE_JOB_ENV": ("env:", *(f"  {line}" for line in workflow.service_env)) if workflow.service_env else (),
        "SERVICE_AUTH_STEPS": _KUBEFLOW_IAP_STEPS if workload_identity and target.name == "kubeflow" else (),
    }
    directory = root / ".github" / "workflows"
    files = {directory / name: render_template(template_text(template), values)
             for name, template in WORKFLOW_FILES.items()}
    project_id = config.get("project_id") if isinstance(config.get("project_id"), str) else None
    setup = _setup_lines(workflow, auth, project_id, repository, _github_repository(root), root)
    setup += "\n" + _env_line(kedro_env, written, root / folder, group)
    return WorkflowPlan(files, setup)


def _project_config(conf: Path, target: TargetInfo, config_text: str | None) -> dict[str, Any] | None:
    """The target's config (its YAML as written, the values the workflows need are plain)."""
    import yaml

    path = conf / "base" / target.config_files[0]
    if config_text is None:
        existing = [conf / "base" / name for name in target.config_files if (conf / "base" / name).is_file()]
        if not existing:
            return None
        path = existing[0]
        config_text = path.read_text()
    try:
        loaded = yaml.safe_load(config_text)
    except yaml.YAMLError as exc:
        from kvx_runtime.errors import ConfigError

        raise ConfigError(f"{path} is not YAML: {exc}") from None
    return loaded if isinstance(loaded, dict) else {}


def _env_line(kedro_env: str | None, written: list[str], conf: Path, group: str) -> str:
    """Which Kedro env the workflows run in, and how to change it."""
    if kedro_env:
        return (f"The workflows run in the Kedro env '{kedro_env}' (KEDRO_ENV: the pipeline's env: section, the "
                "checks' compile step; the project's tests keep their own env).")
    from kvx_runtime.cloud_env import overlay_envs

    others = overlay_envs(conf)
    if written:
        why = f"several cloud envs, {', '.join(written)}: set the one cloud runs use"
    elif others:
        why = f"if {' or '.join(others)} is the env of cloud runs, set it"
    else:
        why = f"no cloud env yet: `{group} init --cloud-env cloud` writes one; set it"
    return (f"The workflows run in the project's default Kedro env ({why} as KEDRO_ENV in the workflows (the "
            "pipeline's env: section, the checks' compile step); until then compile --strict fails on any dataset "
            "that crosses steps on a local path).")


def _github_repository(root: Path) -> str | None:
    """``owner/name`` of the project's GitHub remote ``origin``, when it has one."""
    try:
        url = subprocess.run(["git", "-C", str(root), "remote", "get-url", "origin"], capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    match = _GITHUB_REMOTE.search(url)
    return match.group(1) if match else None


def _setup_lines(workflow: _TargetWorkflow, auth: str, project_id: str | None, repository: str | None,
                 github_repository: str | None, root: Path) -> str:
    """What to set in the repository (Settings > Secrets and variables > Actions), and the
    one-time Google Cloud commands for Workload Identity Federation."""
    project = project_id or "PROJECT_ID"
    repo = github_repository or "OWNER/REPO"
    account = f"kvx-deployer@{project}.iam.gserviceaccount.com"
    lines = ["Set in the GitHub repository (Settings > Secrets and variables > Actions):"]
    if auth == "workload-identity":
        lines += [
            "  variable GCP_WORKLOAD_IDENTITY_PROVIDER: projects/<project number>/locations/global/"
            "workloadIdentityPools/github/providers/github",
            f"  variable GCP_SERVICE_ACCOUNT: {account} (or your own deployer account)",
        ]
    else:
        lines.append("  secret GCP_SA_KEY: the JSON key of the deployer service account (weaker than Workload "
                     "Identity Federation: --github-auth workload-identity)")
    if workflow.service_secrets:
        lines.append(f"  secrets {workflow.service_secrets}")
    lines.append(f"  variable {IMAGE_REPOSITORY_VARIABLE}: " + (f"optional, default {repository} (run_config.image)"
                                                       if repository else
                                                       "<region>-docker.pkg.dev/<project>/<repository>/<image> "
                                                       "(run_config.image names no registry)"))
    lines.append(f"  variable {CODE_UPLOAD_VARIABLE}: optional, 'true': pushes outside the main branch run with "
                 "--code-upload and build no image")
    if not (root / "Dockerfile").exists():
        lines.append("The workflows build ./Dockerfile: init --with-dockerfile writes one.")
    if auth == "workload-identity":
        number = f"$(gcloud projects describe {project} --format='value(projectNumber)')"
        lines += [
            "Once, in Google Cloud (Workload Identity Federation; docs/ci-cd.md lists the roles the account needs):",
            f"  gcloud iam workload-identity-pools create github --project={project} --location=global "
            "--display-name='GitHub Actions'",
            f"  gcloud iam workload-identity-pools providers create-oidc github --project={project} "
            "--location=global --workload-identity-pool=github "
            "--issuer-uri=https://token.actions.githubusercontent.com "
            "--attribute-mapping=google.subject=assertion.sub,attribute.repository=assertion.repository "
            f"--attribute-condition=\"assertion.repository=='{repo}'\"",
            f"  gcloud iam service-accounts create kvx-deployer --project={project}",
            f"  gcloud iam service-accounts add-iam-policy-binding {account} --project={project} "
            "--role=roles/iam.workloadIdentityUser "
            f"--member=\"principalSet://iam.googleapis.com/projects/{number}/locations/global/"
            f"workloadIdentityPools/github/attribute.repository/{repo}\"",
            f"  gcloud iam workload-identity-pools providers describe github --project={project} --location=global "
            "--workload-identity-pool=github --format='value(name)'   # GCP_WORKLOAD_IDENTITY_PROVIDER",
        ]
    return "\n".join(lines)
