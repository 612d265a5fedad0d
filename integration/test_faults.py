"""The fault-injection suite (bounded form, run by CI): steps survive a hostile network.

The example pipeline runs step by step against the GCS emulator behind a seeded fault proxy
(429, 503, resets, delays, answers lost after the server acted) that also carries the upload
sessions. Every step must succeed on its first attempt (retries happen inside the step), its
outputs must equal a clean run's, and every blob must read back intact. The figures go to the
benchmark JSON through ``KVX_FAULT_RESULTS`` (see bench/ and docs/reliability.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from integration.conftest import kedro_in_process, run_step, step_env
from integration.faults import FaultPlan, FaultProxy
from integration.test_exec_node import EXPECTED_BLOBS, reports
from kvx_runtime.storage.store import BlobStore

pytestmark = pytest.mark.slow

FAULT_RATE = float(os.environ.get("KVX_FAULT_RATE", "0.2"))
# Seeds 2 and 4 lose answers to upload requests (the case that used to fail good writes).
SEEDS = [int(seed) for seed in os.environ.get("KVX_FAULT_SEEDS", "2,4").split(",")]


@pytest.mark.parametrize("seed", SEEDS)
def test_every_step_succeeds_first_time_through_injected_gcs_faults(
    example_project: Path, node_order, gcs_emulator, seed: int
) -> None:
    kedro_in_process(example_project, "run", "base", env=step_env(KEDRO_CONFIG_RUN_ID="clean"))
    proxy = FaultProxy(gcs_emulator.port, FaultPlan(rate=FAULT_RATE, seed=seed, delay=0.3)).start()
    root = f"gs://{gcs_emulator.bucket}/faults-{seed}"
    env = step_env(STORAGE_EMULATOR_HOST=proxy.url, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
                   KVX_STORAGE_RETRY_WAIT="0.2")
    first_attempt_failures = []
    try:
        for node in node_order:
            result = run_step(example_project, "--node", node, "--run-id", f"faults-{seed}", "--storage-root", root,
                              "--env", "base", env=env, timeout=600)
            if result.returncode != 0:
                first_attempt_failures.append(f"{node}: exit {result.returncode}: {result.last_message[:300]}")
    finally:
        proxy.stop()
    summary = {"seed": seed, "rate": FAULT_RATE, "steps": len(node_order), "requests": proxy.requests,
               "injected": dict(proxy.injected), "first_attempt_failures": len(first_attempt_failures)}
    _record(summary)
    assert first_attempt_failures == [], first_attempt_failures
    assert sum(proxy.injected.values()) > 0  # faults really were injected

    # Outputs equal a clean run's; every blob is intact (read through the emulator directly).
    assert reports(example_project, f"faults-{seed}") == reports(example_project, "clean")
    store = BlobStore(f"gs://{gcs_emulator.bucket}/faults-{seed}", f"faults-{seed}")
    for blob in EXPECTED_BLOBS:
        store.load(blob)


def _record(summary: dict) -> None:
    target = os.environ.get("KVX_FAULT_RESULTS")
    if target:
        with Path(target).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(summary) + "\n")
