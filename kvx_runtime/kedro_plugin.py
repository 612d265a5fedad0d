"""``kedro vertexai ...`` and ``kedro kubeflow ...``: the plugin commands, registered through
``kedro.project_commands``.

The same click commands as ``kvx-runtime compile / run-local / init / ...`` (defined once in
:mod:`kvx_runtime.commands`), a group per target of the registry (its ``kedro_group``) that
takes ``-e/--env`` as the kedro-vertexai family does.
"""

from __future__ import annotations

import click

from kvx_runtime.commands import kedro_group
from kvx_runtime.targets.registry import TARGETS


@click.group(name="kvx-runtime")
def commands() -> None:
    """kvx-runtime commands."""


for _target in TARGETS.values():
    commands.add_command(kedro_group(_target))
