"""The project commands, each defined once, for every front-end and target.

``kvx-runtime <command>``, ``kvx-runtime kfp <command>``, ``kedro vertexai <command>`` and
``kedro kubeflow <command>`` are the same click commands: :mod:`.groups` gives each target of
the registry (:mod:`kvx_runtime.targets.registry`) its group of them. Each command is a
:class:`~.command.KvxCommand` (the exit-code contract, applied once) whose callback turns its
options into a request dataclass for a plain body function: :mod:`.project` (compile,
run-local, what every init shares), :mod:`.service` (the commands that talk to the target),
:mod:`.maintenance` (doctor, gc), each target's own ``init`` (:mod:`.vertex_init`,
:mod:`.kubeflow_init`); :mod:`.options` holds the shared options.
"""

from kvx_runtime.commands.command import Invocation, KvxCommand, StepCommand, group_context, invocation
from kvx_runtime.commands.groups import SHARED_COMMANDS, commands_for, kedro_group, kvx_group
from kvx_runtime.commands.options import env_option, fail_fast_option, load_version_option, project_path_option

__all__ = [
    "SHARED_COMMANDS",
    "Invocation",
    "KvxCommand",
    "StepCommand",
    "commands_for",
    "env_option",
    "fail_fast_option",
    "group_context",
    "invocation",
    "kedro_group",
    "kvx_group",
    "load_version_option",
    "project_path_option",
]
