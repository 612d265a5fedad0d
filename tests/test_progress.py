"""run-local's progress display: the live table on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io
import re

from kvx_runtime.local_runner.progress import Progress, TerminalProgress, make_progress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal, as a developer's shell is (rich then draws live)."""

    def isatty(self) -> bool:
        return True


def run_events(progress: Progress) -> None:
    with progress:
        progress.started_task("prepare", 1)
        progress.finished_task("prepare", "done", 1.25)
        progress.started_task("train", 1)
        progress.retrying_task("train", 0.5, 3)
        progress.started_task("train", 2)
        progress.finished_task("train", "failed", 2.5, "exit 1")
        progress.skipped_task("report", "an upstream step failed")


def test_terminal_gets_a_live_table_with_every_step_and_its_final_state() -> None:
    stream = FakeTerminal()
    progress = make_progress(["prepare", "train", "report"], stream)
    assert isinstance(progress, TerminalProgress)
    run_events(progress)
    text = ANSI.sub("", stream.getvalue())
    final = text[text.rindex("kvx-runtime run-local:") :]  # the last redraw
    assert final.startswith("kvx-runtime run-local: 1 done, 1 failed, 1 skipped")
    rows = {line.split("│")[1].strip(): line for line in final.splitlines() if line.count("│") >= 3}
    assert "done" in rows["prepare"] and "1.2s" in rows["prepare"]
    assert "failed" in rows["train"] and "2.5s" in rows["train"]
    assert "skipped" in rows["report"]
    assert "started" not in text  # events show in the table, not as lines


def test_pipes_and_files_get_one_plain_line_per_event() -> None:
    stream = io.StringIO()
    progress = make_progress(["prepare", "train", "report"], stream)
    assert type(progress) is Progress
    run_events(progress)
    lines = [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()]
    assert lines == [
        "started   prepare",
        "done      prepare 1.2s",
        "started   train",
        "retrying  train in 0.5s (exit 3)",
        "started   train (attempt 2)",
        "failed    train 2.5s exit 1",
        "skipped   report (an upstream step failed)",
    ]
    assert "\x1b[" not in stream.getvalue()
