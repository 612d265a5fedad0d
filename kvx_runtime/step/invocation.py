"""The ``exec-node`` invocation: the one builder of a step's command line.

The compiler writes it into every step of a spec (with the orchestrator's placeholders as
values), a failing step prints it as its replay line (with the values it ran with), and
``status`` rebuilds it from a run's resolved spec. One table of flags serves writing and
reading, so the three can never disagree; ``tests/test_step_contract.py`` checks the table
against the ``exec-node`` command's own options.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

__all__ = ["PROGRAM", "ExecNodeInvocation", "InvocationError", "identity_args"]

#: The console script every step runs.
PROGRAM = "kvx-runtime"
EXEC_NODE = "exec-node"

#: (flag, field, repeated) in the order the flags are written. A single-valued flag whose
#: value is None or empty is left out: an empty ``--save-version`` means "not given".
_FLAGS: tuple[tuple[str, str, bool], ...] = (
    ("--node", "nodes", True),
    ("--pipeline", "pipeline", False),
    ("--env", "env", False),
    ("--run-id", "run_id", False),
    ("--job-name", "job_name", False),
    ("--storage-root", "storage_root", False),
    ("--save-version", "save_version", False),
    ("--job-create-time", "job_create_time", False),
    ("--load-version", "load_versions", True),
    ("--code", "code", False),
    ("--mlflow-run-id", "mlflow_run_id", False),
    ("--param", "params", True),
    ("--cache", "cache", False),
    ("--serve-step", "serve_steps", True),
)
_FIELD_OF = {flag: (name, repeated) for flag, name, repeated in _FLAGS}
DEFAULT_PIPELINE = "__default__"


class InvocationError(ValueError):
    """An argv that is not an ``exec-node`` invocation this version writes."""


def identity_args(env: str, run_id: str, job_name: str) -> list[str]:
    """``--env --run-id --job-name``: how every step command (``exec-node``, ``mlflow-start``,
    ``mlflow-end``) is told which run it belongs to."""
    return ["--env", env, "--run-id", run_id, "--job-name", job_name]


@dataclass(frozen=True)
class ExecNodeInvocation:
    """What one ``exec-node`` call is asked to do, as flags. Values are text: literal values,
    or the orchestrator's placeholders in a compiled spec."""

    nodes: tuple[str, ...]
    env: str | None = None
    run_id: str | None = None
    job_name: str | None = None
    pipeline: str = DEFAULT_PIPELINE
    storage_root: str | None = None
    #: The run's save version; empty or None: not given (the job's creation time decides).
    save_version: str | None = None
    job_create_time: str | None = None
    #: ``DATASET=VERSION`` items, in the order written.
    load_versions: tuple[str, ...] = ()
    code: str | None = None
    mlflow_run_id: str | None = None
    #: ``KEY[:KIND]=VALUE`` items, as given.
    params: tuple[str, ...] = field(default=())
    #: ``on``/``off``: the step cache; None: the project's run_config.cache.enabled.
    cache: str | None = None
    #: Steps the planner found in the step cache, each as ``NODE,NODE``: this invocation serves
    #: them (and runs any that can no longer be served) instead of running ``nodes`` as one step.
    serve_steps: tuple[str, ...] = ()

    @staticmethod
    def load_version_items(versions: Mapping[str, str]) -> tuple[str, ...]:
        """``{dataset: version}`` as ``--load-version`` items (sorted: specs stay stable)."""
        return tuple(f"{dataset}={version}" for dataset, version in sorted(versions.items()))

    def args(self) -> list[str]:
        """The flags, without the program and command."""
        argv: list[str] = []
        for flag, name, repeated in _FLAGS:
            value = getattr(self, name)
            if repeated:
                for item in value:
                    argv += [flag, item]
            elif name == "pipeline":
                if value != DEFAULT_PIPELINE:
                    argv += [flag, value]
            elif value:
                argv += [flag, value]
        return argv

    def argv(self) -> list[str]:
        """The whole command: ``kvx-runtime exec-node`` and the flags."""
        return [PROGRAM, EXEC_NODE, *self.args()]

    def command_line(self) -> str:
        """One line a shell runs as is (the replay line)."""
        return shlex.join(self.argv())

    def shown(self) -> ExecNodeInvocation:
        """This invocation as it may be printed (a replay line): secret-named parameters masked
        (:func:`kvx_runtime.params.items_shown`), before any quoting could split a value."""
        from kvx_runtime.params import items_shown

        return replace(self, params=items_shown(self.params))

    def with_values(self, **changes: object) -> ExecNodeInvocation:
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def parse(cls, argv: Sequence[str]) -> ExecNodeInvocation:
        """Read what :meth:`argv` (or :meth:`args`) wrote; refuses anything else."""
        items = list(argv)
        if items[:2] == [PROGRAM, EXEC_NODE]:
            items = items[2:]
        elif items[:1] == [EXEC_NODE]:
            items = items[1:]
        values: dict[str, object] = {}
        repeated_values: dict[str, list[str]] = {}
        index = 0
        while index < len(items):
            flag = items[index]
            if flag not in _FIELD_OF:
                raise InvocationError(f"not an exec-node flag: {flag!r}")
            if index + 1 >= len(items):
                raise InvocationError(f"{flag} has no value")
            name, repeated = _FIELD_OF[flag]
            value = items[index + 1]
            if repeated:
                repeated_values.setdefault(name, []).append(value)
            elif name in values:
                raise InvocationError(f"{flag} given twice")
            else:
                values[name] = value
            index += 2
        for name, listed in repeated_values.items():
            values[name] = tuple(listed)
        if not values.get("nodes"):
            raise InvocationError("no --node")
        known = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in values.items() if name in known})  # type: ignore[arg-type]
