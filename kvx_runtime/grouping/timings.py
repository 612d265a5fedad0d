"""Node durations of earlier runs, for the groupers that weigh them (``auto``).

Each step logs ``node finished`` with the node's seconds as every node ends; the project's
run-local runs keep those logs (``.kvx/runs/<job>/logs/<step>.log``). The newest runs count
first. They are this machine's timings: the compiler puts the MLflow runs' over them where
MLflow is configured (:func:`kvx_runtime.mlflow.earlier_node_seconds`: the steps' own, cloud
ones included), and ``run_config.grouping.params.durations`` over both.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvx_runtime.config import LOCAL_STATE_DIR
from kvx_runtime.log import NODE_FINISHED

__all__ = ["earlier_node_durations"]

#: How many of the newest run-local jobs are read.
RUNS_READ = 5


def earlier_node_durations(project_path: Path, runs: int = RUNS_READ) -> dict[str, float]:
    """node -> seconds it took in the newest of the project's run-local jobs that ran it."""
    runs_dir = Path(project_path) / LOCAL_STATE_DIR / "runs"
    try:
        jobs = sorted((logs for logs in runs_dir.glob("*/logs") if logs.is_dir()),
                      key=lambda logs: logs.stat().st_mtime, reverse=True)[:runs]
    except OSError:
        return {}
    durations: dict[str, float] = {}
    for logs in jobs:
        found: dict[str, float] = {}
        for log_file in sorted(logs.glob("*.log")):
            try:
                with log_file.open(errors="replace") as lines:
                    for line in lines:
                        if NODE_FINISHED in line:
                            _read_line(line, found)
            except OSError:
                continue  # a log being rotated or removed: the others still count
        for node, seconds in found.items():
            durations.setdefault(node, seconds)
    return durations


def _read_line(line: str, found: dict[str, float]) -> None:
    try:
        record = json.loads(line)
    except ValueError:
        return
    if not isinstance(record, dict) or record.get("message") != NODE_FINISHED:
        return
    node, seconds = record.get("node"), record.get("seconds")
    if isinstance(node, str) and isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds >= 0:
        found[node] = float(seconds)  # a retried node: its last attempt
