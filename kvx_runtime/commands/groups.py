"""Which commands each target's group has: the shared project commands, less what the target
leaves out (its options hidden from help), plus its own ``init`` and the commands it replaces;
and the groups themselves."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import click

from kvx_runtime.commands.command import group_context
from kvx_runtime.commands.maintenance import doctor_command, gc_command
from kvx_runtime.commands.plan import plan_command
from kvx_runtime.commands.project import compile_command, run_local_command
from kvx_runtime.commands.resume import resume_command
from kvx_runtime.commands.service import (
    cancel_command,
    list_pipelines_command,
    run_once_command,
    schedule_command,
    status_command,
    ui_command,
    upload_pipeline_command,
)
from kvx_runtime.targets.registry import TargetInfo, load_object

__all__ = ["SHARED_COMMANDS", "commands_for", "kedro_group", "kvx_group"]

#: Every target's group has these (less its ``unsupported_commands``), defined once.
SHARED_COMMANDS: tuple[click.Command, ...] = (
    compile_command,
    run_local_command,
    run_once_command,
    schedule_command,
    list_pipelines_command,
    status_command,
    cancel_command,
    ui_command,
    upload_pipeline_command,
    doctor_command,
    gc_command,
    plan_command,
    resume_command,
)


def _hiding(command: click.Command, options: frozenset[str]) -> click.Command:
    """``command``, or a copy of it with ``options`` hidden from its help (still parsed, so the
    target refuses them with its own line rather than click's "no such option")."""
    if not any(parameter.name in options for parameter in command.params):
        return command

    def hidden(parameter: click.Parameter) -> click.Parameter:
        parameter = copy.copy(parameter)
        parameter.hidden = True  # type: ignore[attr-defined]
        return parameter

    clone = copy.copy(command)
    clone.params = [hidden(p) if p.name in options else p for p in command.params]
    return clone


@functools.cache
def commands_for(target: TargetInfo) -> tuple[click.Command, ...]:
    """The commands of ``target``'s group (the same objects for every front-end's group)."""
    own: list[click.Command] = [
        load_object(path, what=f"the {target.name} target's commands", install_hint=target.install_hint)
        for path in (*target.own_commands, target.init_command)
    ]
    replaced = {command.name for command in own} | target.unsupported_commands
    shared = (command for command in SHARED_COMMANDS if command.name not in replaced)
    return (*(_hiding(command, target.unsupported_options) for command in shared), *own)


def kvx_group(target: TargetInfo) -> click.Group:
    """``kvx-runtime <target's command group>``: its commands (``kvx-runtime kfp ...``)."""
    if target.command_group is None:
        raise ValueError(f"the {target.name} target's commands are kvx-runtime's own, not a group's")

    def callback() -> None:
        click.get_current_context().obj = group_context(target)

    return _group(target, target.command_group, target.command_group_help, callback, [])


def kedro_group(target: TargetInfo) -> click.Group:
    """``kedro <target's kedro group>``: its commands under a ``-e/--env`` for all of them, as
    the kedro-vertexai family's groups take it (``kedro vertexai ...``, ``kedro kubeflow ...``)."""
    from kvx_runtime.log import configure_logging

    def callback(env: str | None) -> None:
        configure_logging()  # Kedro's CLI configured its own
        click.get_current_context().obj = group_context(target, env)

    env_option = click.Option(["-e", "--env"], default=None, help="Kedro config environment of every command below.")
    return _group(target, target.kedro_group, target.kedro_group_help, callback, [env_option])


def _group(target: TargetInfo, name: str, help_text: str, callback: Callable[..., None],
           params: list[click.Parameter]) -> click.Group:
    group = click.Group(name, callback=callback, params=params, help=help_text)
    for command in commands_for(target):
        group.add_command(command)
    return group
