"""``kedro vertexai ...``: the plugin commands, registered through ``kedro.project_commands``.

They share their implementation with ``kvx-runtime compile / run-local / init``; the only
difference is the ``-e/--env`` option of the group, as in the kedro-vertexai family.
"""

from __future__ import annotations

import click

from kvx_runtime.cli import _run, do_compile, do_init, do_run_local, fail_fast_option
from kvx_runtime.log import configure_logging


@click.group(name="kvx-runtime")
def commands() -> None:
    """kvx-runtime commands."""


@commands.group(name="vertexai")
@click.option("-e", "--env", default=None, help="Environment to use.")
@click.pass_context
def vertexai(ctx: click.Context, env: str | None) -> None:
    """Compile and run Kedro pipelines for Vertex AI / Kubeflow Pipelines (kvx-runtime)."""
    configure_logging()
    ctx.obj = {"env": env}


@vertexai.command("compile")
@click.option("-p", "--pipeline", default="__default__", show_default=True, help="Pipeline to compile.")
@click.option("-i", "--image", default=None, help="Image of the steps (default: run_config.image).")
@click.option("--storage-root", default=None, help="Default storage root (default: run_config.root).")
@click.option("--params", "params", multiple=True, metavar="NAME:TYPE[,NAME:TYPE]",
              help="Kedro parameters exposed as pipeline parameters.")
@click.option("-o", "--output", default="pipeline.json", show_default=True,
              help="Output file: JSON, or YAML for .yaml/.yml.")
@click.pass_context
def compile_(ctx: click.Context, pipeline: str, image: str | None, storage_root: str | None,
             params: tuple[str, ...], output: str) -> None:
    """Translate the Kedro pipeline into a Vertex AI pipeline spec."""
    _run("kedro vertexai compile",
         lambda: do_compile(None, ctx.obj["env"], pipeline, image, storage_root, params, output))


@vertexai.command("run-local")
@click.option("-p", "--pipeline", default="__default__", show_default=True, help="Pipeline to run.")
@click.option("--params", "params", multiple=True, metavar="NAME:TYPE[,NAME:TYPE]",
              help="Kedro parameters exposed as pipeline parameters.")
@click.option("--param", "overrides", multiple=True, metavar="NAME=VALUE",
              help="Override a pipeline parameter for this run.")
@click.option("--storage-root", default=None, help="Storage root (default: <project>/.kvx/storage).")
@click.option("--max-parallel", default=4, show_default=True, type=click.IntRange(min=1))
@fail_fast_option
@click.pass_context
def run_local_(ctx: click.Context, pipeline: str, params: tuple[str, ...], overrides: tuple[str, ...],
               storage_root: str | None, max_parallel: int, fail_fast: bool) -> None:
    """Compile the pipeline, then run the compiled spec here, step by step."""

    def action() -> None:
        import os

        root = storage_root or os.path.join(os.getcwd(), ".kvx", "storage")
        # The image does not matter locally: steps run in this environment.
        spec = do_compile(None, ctx.obj["env"], pipeline, "local", root, params, ".kvx/pipeline.json")
        do_run_local(spec, None, overrides, root, max_parallel, None, fail_fast)

    _run("kedro vertexai run-local", action)


@vertexai.command("init")
@click.argument("project_id")
@click.argument("region")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.option("--with-dockerfile", is_flag=True, help="Also write a Dockerfile and .dockerignore.")
def init_(project_id: str, region: str, force: bool, with_dockerfile: bool) -> None:
    """Write a commented conf/base/vertexai.yml for PROJECT_ID and REGION."""
    _run("kedro vertexai init", lambda: do_init(None, project_id, region, force, with_dockerfile))
