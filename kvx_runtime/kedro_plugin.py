"""``kedro vertexai ...`` and ``kedro kubeflow ...``: the plugin commands, registered through
``kedro.project_commands``.

The same click commands as ``kvx-runtime compile / run-local / init / ...`` (defined once in
:mod:`kvx_runtime.commands`), under a group that takes ``-e/--env`` as the kedro-vertexai
family does.
"""

from __future__ import annotations

import click

from kvx_runtime.commands import KUBEFLOW, KUBEFLOW_COMMANDS, PROJECT_COMMANDS
from kvx_runtime.log import configure_logging


@click.group(name="kvx-runtime")
def commands() -> None:
    """kvx-runtime commands."""


@commands.group(name="vertexai")
@click.option("-e", "--env", default=None, help="Kedro config environment of every command below.")
@click.pass_context
def vertexai(ctx: click.Context, env: str | None) -> None:
    """Compile, run and watch Kedro pipelines on Vertex AI / Kubeflow Pipelines (kvx-runtime)."""
    configure_logging()
    ctx.obj = {"env": env}


for _command in PROJECT_COMMANDS:
    vertexai.add_command(_command)


@commands.group(name="kubeflow")
@click.option("-e", "--env", default=None, help="Kedro config environment of every command below.")
@click.pass_context
def kubeflow(ctx: click.Context, env: str | None) -> None:
    """Compile, run and watch Kedro pipelines on Kubeflow Pipelines (kvx-runtime)."""
    configure_logging()
    ctx.obj = {"env": env, "target": KUBEFLOW}


for _command in KUBEFLOW_COMMANDS:
    kubeflow.add_command(_command)
