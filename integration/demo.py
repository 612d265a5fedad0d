"""The main job: run the example project's pipeline step by step through kvx-runtime.

Every node runs as its own ``kvx-runtime exec-node`` process, in dependency order, exactly as
a Vertex AI step would call it; intermediates go to a local storage root under the project
(``.kvx/storage``). Prints where the outputs are.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent / "example_project"


def node_order(project: Path, pipeline: str = "__default__") -> list[str]:
    from kedro.framework.project import pipelines
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    return [node.name for node in pipelines[pipeline].nodes]


def main() -> int:
    run_id = time.strftime("demo-%Y%m%d-%H%M%S")
    storage_root = PROJECT / ".kvx" / "storage"
    env = {**os.environ, "KVX_LOG_FORMAT": os.environ.get("KVX_LOG_FORMAT", "text")}
    kvx = [sys.executable, "-m", "kvx_runtime"]
    nodes = node_order(PROJECT)
    print(f"Running {len(nodes)} steps of {PROJECT.name}, run id {run_id}", flush=True)
    for index, node in enumerate(nodes, 1):
        started = time.perf_counter()
        command = [*kvx, "exec-node", "--node", node, "--run-id", run_id,
                   "--storage-root", str(storage_root), "--env", "base"]
        result = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
        print(f"[{index:2d}/{len(nodes)}] {node:<50} {status} {seconds:5.1f}s", flush=True)
        if result.returncode != 0:
            print(result.stderr[-4000:], file=sys.stderr)
            return result.returncode
    reports = PROJECT / "data" / "08_reporting" / run_id
    print(f"\nDone. Outputs: {reports}")
    for path in sorted(reports.iterdir()):
        print(f"  {path.name}")
    print(f"Intermediates: {storage_root / 'kedro-vertexai-temp' / run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
