"""Live progress of a local run: a compact table on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

STATES = ("waiting", "running", "retrying", "done", "failed", "skipped", "cancelled")


class Progress:
    """Plain lines, one per event (CI logs, pipes, files)."""

    def __init__(self, tasks: list[str], stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tasks = tasks
        self.state = dict.fromkeys(tasks, "waiting")
        self.seconds: dict[str, float] = {}
        self.started = time.monotonic()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def _line(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:7.1f}s] {text}", file=self.stream, flush=True)

    def started_task(self, task: str, attempt: int) -> None:
        self.state[task] = "running"
        suffix = f" (attempt {attempt})" if attempt > 1 else ""
        self._line(f"started   {task}{suffix}")

    def finished_task(self, task: str, state: str, seconds: float, detail: str = "") -> None:
        self.state[task] = state
        self.seconds[task] = seconds
        self._line(f"{state:<9} {task} {seconds:.1f}s{(' ' + detail) if detail else ''}")

    def retrying_task(self, task: str, wait: float, exit_code: int) -> None:
        self.state[task] = "retrying"
        self._line(f"retrying  {task} in {wait:.1f}s (exit {exit_code})")

    def skipped_task(self, task: str, reason: str) -> None:
        self.state[task] = "skipped"
        self._line(f"skipped   {task} ({reason})")

    def tick(self) -> None:
        """Called while waiting; the plain reporter has nothing to redraw."""


class TerminalProgress(Progress):
    """A table redrawn in place (rich, which Kedro already depends on)."""

    def __enter__(self) -> TerminalProgress:
        from rich.console import Console
        from rich.live import Live

        self._console = Console(file=self.stream)
        self._live = Live(self._render(), console=self._console, refresh_per_second=4, transient=False)
        self._live.__enter__()
        self._running_since: dict[str, float] = {}
        return self

    def __exit__(self, *exc: Any) -> None:
        self._live.update(self._render())
        self._live.__exit__(*exc)

    def _line(self, text: str) -> None:  # events show in the table instead
        return None

    def started_task(self, task: str, attempt: int) -> None:
        super().started_task(task, attempt)
        self._running_since[task] = time.monotonic()
        self.tick()

    def finished_task(self, task: str, state: str, seconds: float, detail: str = "") -> None:
        super().finished_task(task, state, seconds, detail)
        self._running_since.pop(task, None)
        self.tick()

    def tick(self) -> None:
        self._live.update(self._render())

    def _render(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        colours = {"done": "green", "failed": "red", "running": "cyan", "retrying": "yellow",
                   "skipped": "dim", "cancelled": "magenta", "waiting": "dim"}
        counts = {s: sum(1 for v in self.state.values() if v == s) for s in STATES}
        summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        table = Table(expand=False)
        table.add_column("step")
        table.add_column("state")
        table.add_column("time", justify="right")
        now = time.monotonic()
        for task in self.tasks:
            state = self.state[task]
            since = getattr(self, "_running_since", {}).get(task)
            seconds = self.seconds.get(task) if since is None else now - since
            table.add_row(task, f"[{colours[state]}]{state}[/]",
                          f"{seconds:.1f}s" if seconds is not None else "")
        # The summary on its own line: as the table's title it would wrap to the table's width.
        return Group(Text(f"kvx-runtime run-local: {summary}", no_wrap=True), table)


def make_progress(tasks: list[str], stream: TextIO | None = None) -> Progress:
    stream = stream or sys.stdout
    is_tty = hasattr(stream, "isatty") and stream.isatty()
    return TerminalProgress(tasks, stream) if is_tty else Progress(tasks, stream)
