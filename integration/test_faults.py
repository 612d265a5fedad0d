"""The fault-injection suite (bounded form: ``make test-faults``, run by CI): steps survive a
hostile network.

The example pipeline runs step by step against the GCS emulator behind a seeded fault proxy
(429, 503, resets, delays, answers lost after the server acted) that also carries the upload
sessions. Every step must succeed on its first attempt (retries happen inside the step), its
outputs must equal a clean run's, and every blob must read back intact. The figures go to the
benchmark JSON through ``KVX_FAULT_RESULTS`` (see bench/ and docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from integration.conftest import (
    KVX,
    make_slow_pickling_project,
    reports,
    run_step,
    signal_after_node_started,
    step_env,
)
from integration.faults import FaultPlan, FaultProxy
from integration.test_exec_node import EXPECTED_BLOBS
from kvx_runtime.storage.store import BlobStore

pytestmark = [pytest.mark.slow, pytest.mark.faults]

FAULT_RATE = float(os.environ.get("KVX_FAULT_RATE", "0.2"))
# Seeds 2 and 4 lose answers to upload requests (the case that used to fail good writes).
SEEDS = [int(seed) for seed in os.environ.get("KVX_FAULT_SEEDS", "2,4").split(",")]


@pytest.mark.parametrize("seed", SEEDS)
def test_every_step_succeeds_first_time_through_injected_gcs_faults(
    example_project: Path, node_order, kedro_run_reports, gcs_emulator, seed: int
) -> None:
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
    assert reports(example_project, f"faults-{seed}") == kedro_run_reports
    store = BlobStore(f"gs://{gcs_emulator.bucket}/faults-{seed}", f"faults-{seed}")
    for blob in EXPECTED_BLOBS:
        store.load(blob)


def test_every_step_succeeds_first_time_through_injected_s3_faults(
    example_project: Path, node_order, kedro_run_reports, s3_server
) -> None:
    """The same on an s3:// root (moto behind the proxy): botocore's retries, then ours, under
    throttling, resets, delays and PUTs whose answer is lost after moto stored the object."""
    seed = SEEDS[0]
    proxy = FaultProxy(s3_server.port, FaultPlan(rate=FAULT_RATE, seed=seed, delay=0.3)).start()
    root = f"s3://{s3_server.bucket}/faults-s3-{seed}"
    env = step_env(**{**s3_server.env, "AWS_ENDPOINT_URL": proxy.url}, KVX_STORAGE_RETRY_WAIT="0.2")
    first_attempt_failures = []
    try:
        for node in node_order:
            result = run_step(example_project, "--node", node, "--run-id", f"faults-s3-{seed}", "--storage-root",
                              root, "--env", "base", env=env, timeout=600)
            if result.returncode != 0:
                first_attempt_failures.append(f"{node}: exit {result.returncode}: {result.last_message[:300]}")
    finally:
        proxy.stop()
    assert first_attempt_failures == [], first_attempt_failures
    assert sum(proxy.injected.values()) > 0 and proxy.injected["lost"] > 0, proxy.injected
    assert reports(example_project, f"faults-s3-{seed}") == kedro_run_reports
    store = BlobStore(root, f"faults-s3-{seed}")  # read from moto directly (the test's AWS_ENDPOINT_URL)
    for blob in EXPECTED_BLOBS:
        store.load(blob)


def test_the_pipelines_mlflow_run_survives_faults_on_both_servers(
    example_project: Path, node_order, kedro_run_reports, gcs_emulator, mlflow_server
) -> None:
    """Storage and tracking behind fault proxies at once: the example project's laptop env
    logs metrics and an artifact to the pipeline's one MLflow run."""
    from integration.test_mlflow import end, start

    seed = SEEDS[0]
    clean = json.loads(kedro_run_reports["metrics.json"])
    storage = FaultProxy(gcs_emulator.port, FaultPlan(rate=FAULT_RATE, seed=seed, delay=0.3)).start()
    tracking = FaultProxy(mlflow_server.port, FaultPlan(rate=FAULT_RATE, seed=seed + 1000, delay=0.3)).start()
    job = f"faults-ml-{seed}"
    env = step_env(STORAGE_EMULATOR_HOST=storage.url, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
                   KVX_STORAGE_RETRY_WAIT="0.2", KEDRO_CONFIG_MLFLOW_TRACKING_URI=tracking.url, KEDRO_ENV="local")
    failures = []
    try:
        run_id = start(example_project, env, job, example_project)
        for node in node_order:
            result = run_step(example_project, "--node", node, "--run-id", job, "--job-name", job,
                              "--storage-root", f"gs://{gcs_emulator.bucket}/{job}", "--mlflow-run-id", run_id,
                              env=env, timeout=600)
            if result.returncode != 0:
                failures.append(f"{node}: exit {result.returncode}: {result.last_message[:300]}")
        ended = end(example_project, env, job, "SUCCEEDED")
        assert ended.returncode == 0, ended.stderr[-2000:]
    finally:
        storage.stop()
        tracking.stop()
    _record({"seed": seed, "rate": FAULT_RATE, "steps": len(node_order) + 2, "mlflow": True,
             "requests": storage.requests + tracking.requests,
             "injected": dict(storage.injected + tracking.injected), "first_attempt_failures": len(failures)})
    assert failures == [], failures
    assert sum(tracking.injected.values()) > 0
    client = mlflow_server.client()
    runs = client.search_runs([client.get_experiment_by_name("spaceflights-kvx").experiment_id],
                              filter_string=f"tags.vertexai_job_name = '{job}'")
    assert [run.info.run_id for run in runs] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for name, value in clean.items():  # the metrics equal the clean run's
        assert run.data.metrics[f"metrics.{name}"] == pytest.approx(value["value"] if isinstance(value, dict)
                                                                   else value)


def test_storage_down_for_good_ends_within_the_give_up_budget(example_project: Path, gcs_emulator) -> None:
    """Every request answered 503: exit 3 within the budget plus one request, in one line with
    the attempts and the elapsed time (it took 208 s with gcsfs's and our retries stacked)."""
    import re

    budget = 12.0
    proxy = FaultProxy(gcs_emulator.port, FaultPlan(always=[(lambda method, path: True, "503")])).start()
    env = step_env(STORAGE_EMULATOR_HOST=proxy.url, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
                   KVX_STORAGE_RETRY_BUDGET=str(budget), KVX_STORAGE_RETRY_WAIT="0.5")
    try:
        result = run_step(example_project, "--node", "data_processing.preprocess_companies_node", "--run-id",
                          "down", "--storage-root", f"gs://{gcs_emulator.bucket}/down", env=env, timeout=300)
    finally:
        proxy.stop()
    assert result.returncode == 3, result.stderr[-3000:]
    match = re.search(r"^could not .+ after (\d+) attempts? in ([\d.]+) s.*: .*injected fault, 503",
                      result.last_message.removeprefix("exec-node failed: "))
    assert match, result.last_message
    attempts, elapsed = int(match.group(1)), float(match.group(2))
    assert attempts >= 1 and elapsed <= budget + 10.0, result.last_message  # + one request at most
    assert proxy.injected["503"] > attempts  # gcsfs retried requests inside the attempts too
    _record({"storage_down": True, "budget": budget, "attempts": attempts, "seconds": elapsed,
             "requests": proxy.requests})


def test_a_read_cut_off_mid_body_is_retried_and_the_step_succeeds(example_project: Path, gcs_emulator) -> None:
    """A connection reset in the middle of a blob's body (aiohttp reports it with code 400, once
    mistaken for a permanent error): retried, and the step succeeds."""
    root = f"gs://{gcs_emulator.bucket}/cut"
    env = step_env(GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    producer = run_step(example_project, "--node", "data_processing.preprocess_shuttles_node", "--run-id", "cut",
                        "--storage-root", root, env=env)
    assert producer.returncode == 0, producer.stderr[-3000:]

    def blob_read(method: str, path: str) -> bool:
        return method == "GET" and "preprocessed_shuttles.bin" in path and "alt=media" in path

    proxy = FaultProxy(gcs_emulator.port, FaultPlan(rules=[(blob_read, "truncate"), (blob_read, "truncate")])).start()
    try:
        consumer = run_step(example_project, "--node", "reporting.summarize_shuttles_node", "--run-id", "cut",
                            "--storage-root", root, env={**env, "STORAGE_EMULATOR_HOST": proxy.url})
    finally:
        proxy.stop()
    assert consumer.returncode == 0, consumer.stderr[-3000:]
    assert proxy.injected["truncate"] == 2


def _record(summary: dict) -> None:
    target = os.environ.get("KVX_FAULT_RESULTS")
    if target:
        with Path(target).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(summary) + "\n")


# --- stop signals at random points of large writes ----------------------------------------

SIGNAL_TRIALS = int(os.environ.get("KVX_SIGNAL_TRIALS", "2"))


def stratified(rng: random.Random, trial: int, trials: int, low: float, high: float) -> float:
    """A seeded moment in the ``trial``-th of ``trials`` equal slices of [low, high]: every slice
    of the window gets a trial, which few independent draws do not promise."""
    return low + (trial + rng.random()) * (high - low) / trials


@pytest.mark.parametrize("where", ["local", "gs"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_stop_signals_mid_write_leave_no_partial_blob(tmp_path: Path, gcs_emulator, where: str, signum: int) -> None:
    project = make_slow_pickling_project(tmp_path, "sigtrials")
    rng = random.Random(f"{where}-{signum}")
    proxy = None
    if where == "gs":
        # Every request slowed down: signals land inside upload requests too.
        proxy = FaultProxy(gcs_emulator.port, FaultPlan(rate=1.0, kinds=("delay",), delay=0.3)).start()
        root = f"gs://{gcs_emulator.bucket}/signals-{signum}"
        env = step_env(STORAGE_EMULATOR_HOST=proxy.url, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
                       KVX_STORAGE_BLOCK_SIZE=str(256 * 1024))
    else:
        root = str(tmp_path / "storage")
        env = step_env()
    outcomes = []
    try:
        for trial in range(SIGNAL_TRIALS):
            job = f"trial-{trial}"
            process = subprocess.Popen(
                [*KVX, "exec-node", "--node", "make", "--run-id", job, "--storage-root", root],
                cwd=project, env=env, stderr=subprocess.PIPE, text=True)
            rest = signal_after_node_started(process, signum, event="node finished",
                                             delay=stratified(rng, trial, SIGNAL_TRIALS, 0.05, 3.0))
            outcomes.append(process.returncode)
            if signum == signal.SIGTERM:
                assert process.returncode == 143, rest[-2000:]
                assert "stopped by SIGTERM" in rest.splitlines()[-1]
            else:
                assert process.returncode == -signal.SIGKILL
            # Never a blob under its final name; the next step of the job finds none and
            # (locally) removes what the dead writer left.
            reader = run_step(project, "--node", "count", "--run-id", job, "--storage-root", root, env=env)
            assert reader.returncode == 2 and "does not exist" in reader.last_message, reader.last_message
            if where == "local":
                assert [p.name for p in (Path(root) / "kedro-vertexai-temp" / job).iterdir()] == ["owner.json"]
            else:
                fs = gcs_emulator.filesystem()
                prefix = f"{gcs_emulator.bucket}/signals-{signum}/kedro-vertexai-temp/{job}"
                assert not fs.exists(f"{prefix}/payload.bin")
    finally:
        if proxy is not None:
            proxy.stop()
    _record({"signal_trials": where, "signal": int(signum), "trials": len(outcomes), "exit_codes": outcomes,
             "partial_blobs": 0, "leftover_temp_files": 0})


# --- SIGTERM at any moment of a step's life ------------------------------------------------

SIGTERM_TRIALS = int(os.environ.get("KVX_SIGTERM_TRIALS", "10"))


def test_sigterm_at_any_moment_from_start_to_the_end_of_a_save_exits_143(tmp_path: Path) -> None:
    """Start-up, imports, the project, the node, the save and the end: wherever SIGTERM lands,
    the step exits 143 (never killed by the signal itself, never 0 or 1) and leaves no partial
    blob. Steps start as run-local starts them: with the stop signals held across exec, which
    closes the interpreter's own start-up window (see kvx_runtime.lifecycle)."""
    from kvx_runtime.lifecycle import held_across_exec

    project = make_slow_pickling_project(tmp_path, "sigany", megabytes=1, objects=150, pause=0.01)
    root = tmp_path / "storage"
    env = step_env()

    def start(job: str) -> subprocess.Popen:
        with held_across_exec():
            return subprocess.Popen([*KVX, "exec-node", "--node", "make", "--run-id", job, "--storage-root",
                                     str(root)], cwd=project, env=env, stderr=subprocess.PIPE, text=True)

    def saved_after(job: str) -> float:
        """An undisturbed run: seconds from its start to its blob written."""
        started = time.monotonic()
        process = start(job)
        saved_at = None
        for line in process.stderr:
            if '"blob written"' in line:
                saved_at = time.monotonic() - started
        assert process.wait() == 0 and saved_at is not None
        return saved_at

    # The window ends at the save of the fastest undisturbed run (the first one also compiles
    # bytecode): a later step must not finish before its signal, which would then stop nothing.
    saved_at = min(saved_after("timeline-1"), saved_after("timeline-2"))
    rng = random.Random(19)
    outcomes = []
    trial = 0
    while len(outcomes) < SIGTERM_TRIALS:
        trial += 1
        job = f"any-{trial}"
        delay = stratified(rng, len(outcomes), SIGTERM_TRIALS, 0.0, saved_at)
        process = start(job)
        time.sleep(delay)
        if process.poll() is not None:  # done before its signal (a fast run): not a trial
            assert process.returncode == 0 and trial < 2 * SIGTERM_TRIALS, process.stderr.read()[-2000:]
            # The machine got faster (parallel tests ended): the window ends before this run's end.
            saved_at = min(saved_at, delay)
            continue
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        if process.returncode == 0 and '"step finished"' in stderr and "SIGTERM" not in stderr:
            # It ended between the poll and the signal (a signal to a process already exiting
            # changes nothing; one the process received would end it 143, even at its very end):
            # not a trial either, and the window ends before this run's end.
            assert trial < 2 * SIGTERM_TRIALS, stderr[-2000:]
            saved_at = min(saved_at, delay)
            continue
        outcomes.append((round(delay, 3), process.returncode))
        assert process.returncode == 143, (delay, stderr[-2000:])
        assert "stopped by SIGTERM" in stderr.strip().splitlines()[-1], stderr[-2000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        job_dir = root / "kedro-vertexai-temp" / job
        blob = job_dir / "payload.bin"
        if blob.exists():  # the signal came after the save: the blob is whole
            assert len(BlobStore(str(root), job).load("payload")[0]) == 1024 * 1024
        leftovers = [p.name for p in job_dir.iterdir() if p.name.endswith(".tmp")] if job_dir.exists() else []
        assert leftovers == [], leftovers
    _record({"sigterm_any_moment": True, "trials": len(outcomes), "window_seconds": round(saved_at, 3),
             "exit_codes": sorted({code for _, code in outcomes})})
