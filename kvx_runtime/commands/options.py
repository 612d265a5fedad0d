"""Click options shared by several commands, each written once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

__all__ = ["cloud_env_options", "env_option", "fail_fast_option", "load_version_option", "pipeline_options",
           "project_path_option", "submit_options", "wait_options"]

project_path_option = click.option(
    "--project-path", type=click.Path(file_okay=False, exists=True), default=None,
    help="Kedro project directory (default: the working directory).",
)
load_version_option = click.option(
    "--load-version", "load_versions", multiple=True, metavar="DATASET=VERSION",
    help="Load this version of a versioned dataset (wins over the run's own version). Repeatable.",
)
fail_fast_option = click.option(
    "--fail-fast", is_flag=True,
    help="After a failure start no new step (default: the spec's kvx_failure_policy, fail_slow: "
    "independent steps finish, as on Vertex AI).",
)
env_option = click.option(
    "-e", "--env", default=None,
    help="Kedro config environment (default: KEDRO_ENV, then the project's default_run_env unless "
    "it is 'local', then base).",
)


def _apply(options: list[Callable[[Any], Any]], function: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(options):
        function = option(function)
    return function


def pipeline_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """What says which pipeline to compile, and how (:class:`~.project.PipelineOptions`)."""
    return _apply([
        click.option("-p", "--pipeline", default="__default__", show_default=True, help="Registered pipeline."),
        click.option("-i", "--image", default=None, help="Image of the steps (default: run_config.image)."),
        click.option("--params", "params", multiple=True, metavar="NAME:TYPE[,NAME:TYPE]",
                     help="Kedro parameters exposed as pipeline parameters (types: str, int, float, bool, "
                     "list, dict)."),
        load_version_option,
        click.option("--code-upload/--no-code-upload", default=None,
                     help="Package the workspace's code and configuration for the steps to run, so that a "
                     "code change needs no image rebuild (default: run_config.code_upload)."),
        click.option("--cache", type=click.Choice(["on", "off"]), default=None,
                     help="The step cache in every step (docs/cache.md): a step whose key an earlier run recorded "
                     "takes that run's outputs instead of running; run-local and run-once leave such steps out "
                     "before starting (default: run_config.cache.enabled, off)."),
    ], function)


def submit_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """What a run sent to the pipeline service takes besides its pipeline (run-once, schedule)."""
    return _apply([
        click.option("--param", "values", multiple=True, metavar="KEY=VALUE",
                     help="Any Kedro parameter for this run, typed from its Kedro value. Repeatable."),
        click.option("--storage-root", default=None, help="Storage root of the run (default: run_config.root)."),
        click.option("--template", default=None, metavar="TAG",
                     help="Run the spec uploaded with this tag to run_config.template_repository "
                     "(upload-pipeline) instead of sending the spec itself."),
    ], function)


def wait_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """``--wait/--no-wait`` and ``--timeout``: watching a submitted run to its end."""
    return _apply([
        click.option("--wait/--no-wait", default=None,
                     help="Watch the run until it ends: exit 0 if it succeeded, 1 if not (default: "
                     "run_config.wait_for_completion, false)."),
        click.option("--timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
                     help="With --wait: stop waiting after this long (the run goes on)."),
    ], function)


def init_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """What every target's ``init`` takes beside its own arguments: the project, --force,
    --with-dockerfile, --with-github-actions and the cloud env."""
    return _apply([
        project_path_option,
        click.option("--force", is_flag=True, help="Overwrite existing files."),
        click.option("--with-dockerfile", is_flag=True,
                     help="Also write a Dockerfile (FROM the kvx-runtime image) and .dockerignore."),
        click.option("--with-github-actions", is_flag=True,
                     help="Also write .github/workflows/: every push builds the image and runs the pipeline once, "
                     "the main branch uploads and schedules it, pull requests compile --strict (docs/ci-cd.md). "
                     "With an existing config file, the arguments may be left out."),
        click.option("--github-auth", type=click.Choice(["workload-identity", "key"]), default="workload-identity",
                     show_default=True,
                     help="How the workflows authenticate to Google Cloud: Workload Identity Federation, or a "
                     "service-account key in the GCP_SA_KEY secret (weaker: a long-lived credential)."),
        cloud_env_options,
    ], function)


def cloud_env_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Every target's ``init``: a Kedro env putting the catalog's local datasets under the storage root."""
    return _apply([
        click.option("--cloud-env", "cloud_env", metavar="NAME", default=None,
                     help="Also write conf/NAME/catalog.yml: every catalog dataset of the base env on a local path, "
                     "under the run's storage root (${storage_root}). With an existing config file, only this."),
        click.option("--per-run", is_flag=True,
                     help="With --cloud-env: what the pipelines write goes under <root>/<run id>/ (their inputs "
                     "stay shared)."),
    ], function)
