"""The command class of every kvx-runtime command, and what a command knows of where it runs.

:class:`KvxCommand` runs a command's callback under the exit-code contract
(:func:`kvx_runtime.process.run_command`), so that a body is a plain function that raises and
every exception is mapped to its exit code in one place. :class:`Invocation` is what a body
needs of the click context: the project, the config environment (the command's ``--env``, else
the ``kedro vertexai -e`` group's), the target of the command's group and how the user reaches
the group's other commands.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import click

from kvx_runtime.process import run_command
from kvx_runtime.targets.registry import TargetInfo, default_target, get_target

__all__ = ["Invocation", "KvxCommand", "StepCommand", "group_context", "invocation"]

#: What the groups keep in ``ctx.obj`` for the commands below them.
_TARGET_KEY, _ENV_KEY = "target", "env"


class KvxCommand(click.Command):
    """A command whose callback runs under the exit-code contract: the one place where its
    exceptions become exit codes and one log line (``<command path> failed: ...``)."""

    def failure_label(self, ctx: click.Context) -> str:
        """How the command's last log line names it."""
        return ctx.command_path

    def invoke(self, ctx: click.Context) -> Any:
        invoke = super().invoke
        run_command(self.failure_label(ctx), lambda: invoke(ctx))


class StepCommand(KvxCommand):
    """A command that runs inside a pipeline step (``exec-node``, ``mlflow-start``...): its
    lines name it alone (``exec-node failed: ...``), as the orchestrator's task error shows it."""

    def failure_label(self, ctx: click.Context) -> str:
        return self.name or ctx.info_name or "kvx-runtime"


def group_context(target: TargetInfo, env: str | None = None) -> dict[str, Any]:
    """The ``ctx.obj`` a target's group sets for its commands (``env``: the group's ``-e``)."""
    return {_TARGET_KEY: target.name, _ENV_KEY: env}


@dataclass(frozen=True)
class Invocation:
    """Where a command runs: the project, its config environment, the target of the command's
    group and the group's command path (``kvx-runtime kfp``)."""

    project_path: str | None = None
    env: str | None = None
    target: TargetInfo = field(default_factory=default_target)
    group: str = "kvx-runtime"

    def sibling(self, name: str) -> str:
        """How the user types another command of the same group (``kvx-runtime kfp status``)."""
        return f"{self.group} {name}"

    def in_env(self, env: str) -> Invocation:
        """This invocation in the environment the project was opened in (the compiled steps are
        told to use it: the resolved one, not None)."""
        return replace(self, env=env)


def invocation(ctx: click.Context, project_path: str | None, env: str | None) -> Invocation:
    """The command's :class:`Invocation`, from its own options and its group's context."""
    group = ctx.find_object(dict) or {}
    target = group.get(_TARGET_KEY)
    return Invocation(
        project_path=project_path,
        env=env or group.get(_ENV_KEY),
        target=get_target(str(target)) if target else default_target(),
        group=ctx.parent.command_path if ctx.parent is not None else "kvx-runtime",
    )
