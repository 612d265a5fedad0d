"""The step cache through ``run-local --cache on``, each step a real ``exec-node`` process: a
second run of an unchanged project runs no node and leaves the same outputs; a change reruns
exactly the steps it touches and those downstream; an output changed or gone since it was
recorded is a miss, never a stale hit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import KVX, make_cache_project, step_env

pytestmark = [pytest.mark.slow, pytest.mark.kedro]

STEPS = {"clean", "total", "tabulate"}


def run_local(project: Path, job: str, *extra: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """Run the pipeline; step name -> "served" (from the cache), "ran" or "no cache"."""
    made = subprocess.run([*KVX, "run-local", "--job-name", job, *extra], cwd=project, env=env or step_env(),
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]
    # Served before the run: never started (no log).
    outcome = {line.split()[3]: "served" for line in made.stdout.splitlines()
               if "(served from the step cache: run " in line}
    for log in (project / ".kvx" / "runs" / job / "logs").glob("*.log"):
        messages = [json.loads(line)["message"] for line in log.read_text().splitlines() if line.startswith("{")]
        if "step finished" not in messages:
            continue  # not a node step
        node = next(json.loads(line)["node"] for line in log.read_text().splitlines()
                    if line.startswith("{") and '"node"' in line)
        assert node not in outcome
        if "step served from the cache: its nodes do not run" in messages:  # by its own exec-node
            assert "node started" not in messages
            outcome[node] = "served by exec-node"
        else:
            assert "node started" in messages
            outcome[node] = "ran" if "step cached" in messages else "no cache"
    return outcome


def plan(project: Path, *extra: str) -> dict[str, str]:
    """``kvx-runtime plan``: step -> its verdict (HIT, or MISS and why)."""
    made = subprocess.run([*KVX, "plan", *extra], cwd=project, env=step_env(), capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0, made.stderr[-3000:]
    verdicts = {}
    for line in made.stdout.splitlines()[1:]:
        verdict, step, rest = line.split(None, 2)
        verdicts[step] = verdict if verdict == "HIT" else f"{verdict} {rest}"
    return verdicts


def table(project: Path) -> str:
    return (project / "data" / "table.csv").read_text()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_cache_project(tmp_path)


def test_an_unchanged_project_runs_no_node_the_second_time_and_a_change_reruns_what_it_touches(
        project: Path) -> None:
    assert run_local(project, "first", "--cache", "on") == dict.fromkeys(STEPS, "ran")
    first = table(project)
    assert first == "label,total\nTotal,12\n"

    assert plan(project) == {"clean": "HIT", "total": "HIT", "tabulate": "HIT"}
    assert run_local(project, "second", "--cache", "on") == dict.fromkeys(STEPS, "served")
    assert table(project) == first

    # A parameter only tabulate reads: tabulate reruns, the others are served; plan says so first.
    params = project / "conf" / "base" / "parameters.yml"
    params.write_text(params.read_text().replace("label: total", "label: sum"))
    assert plan(project) == {"clean": "HIT", "total": "HIT",
                             "tabulate": "MISS no entry for this key; changed: param:params:label"}
    # A run-time value of a parameter that clean reads: clean and everything after it.
    assert plan(project, "--param", "factor=3") == {
        "clean": "MISS no entry for this key; changed: param:params:factor",
        "total": "MISS no entry for this key; changed: input:cleaned",
        "tabulate": "MISS no entry for this key; changed: input:total, param:params:label"}
    assert run_local(project, "third", "--cache", "on") == {"clean": "served", "total": "served",
                                                            "tabulate": "ran"}
    assert table(project) == "label,total\nSum,12\n"

    # Run-time overrides leave the decision to each step's exec-node, which serves the hits itself.
    assert run_local(project, "overridden", "--cache", "on", "--param", "kvx_failure_policy=fail_fast") == {
        "clean": "served by exec-node", "total": "served by exec-node", "tabulate": "served by exec-node"}

    # Without the cache every node runs, and records nothing.
    assert run_local(project, "uncached", "--cache", "off") == dict.fromkeys(STEPS, "no cache")


def test_an_output_changed_or_gone_since_it_was_recorded_is_a_miss_never_a_stale_hit(project: Path) -> None:
    assert run_local(project, "first", "--cache", "on") == dict.fromkeys(STEPS, "ran")
    # The table is at a fixed path: another hand overwrites it.
    (project / "data" / "table.csv").write_text("label,total\nForged,0\n")
    # The first run's intermediates are gone (gc, a lifecycle rule).
    shutil.rmtree(project / ".kvx" / "storage" / "kedro-vertexai-temp" / "first")
    outcome = run_local(project, "second", "--cache", "on")
    assert outcome == dict.fromkeys(STEPS, "ran")
    assert table(project) == "label,total\nTotal,12\n"
    # Recorded again: the third run is served.
    assert run_local(project, "third", "--cache", "on") == dict.fromkeys(STEPS, "served")


# --- gc knows the cache --------------------------------------------------------------------

DAY = 86400
WEEK = str(7 * DAY)


def storage(project: Path) -> Path:
    return project / ".kvx" / "storage"


def gc(project: Path, *extra: str) -> list[str]:
    done = subprocess.run([*KVX, "gc", "--storage-root", str(storage(project)), "--older-than", WEEK, *extra],
                          cwd=project, env=step_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout.splitlines()


def age_blobs(project: Path, job: str, days: float) -> None:
    then = time.time() - days * DAY
    for path in (storage(project) / "kedro-vertexai-temp" / job).rglob("*"):
        os.utime(path, (then, then))


def age_entries(project: Path, days: float) -> None:
    """Every entry (and step record) as if recorded ``days`` ago."""
    created = (datetime.now(timezone.utc) - timedelta(days=days)).isoformat()
    for path in (storage(project) / "kvx-cache").rglob("*.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "created": created}))


def index(project: Path, kind: str) -> set[str]:
    return {path.stem for path in (storage(project) / "kvx-cache" / kind).glob("*.json")}


def test_gc_keeps_a_job_an_unexpired_entry_uses_and_deletes_it_with_its_entries_once_they_expire(
        project: Path) -> None:
    assert run_local(project, "first", "--cache", "on") == dict.fromkeys(STEPS, "ran")
    entries = index(project, "entries")
    assert len(entries) == 3 and index(project, "steps") == STEPS
    # The job wrote nothing for a month, but its entries were recorded a day ago: the cache
    # still reaches its blobs, so it stays.
    age_blobs(project, "first", 30)
    age_entries(project, 1)
    listed = gc(project)
    assert listed[:-1] == ["kept job first: newest blob 30.0 days old, but 2 unexpired cache entries use it"]
    assert "0 expired job(s), 0 cache entries" in listed[-1]
    assert gc(project, "--yes")[:-1] == listed[:-1]
    assert (storage(project) / "kedro-vertexai-temp" / "first").is_dir() and index(project, "entries") == entries
    assert run_local(project, "second", "--cache", "on") == dict.fromkeys(STEPS, "served")

    # A week and a day after they were recorded, the entries expire; the job goes with them.
    age_entries(project, 8)
    age_blobs(project, "second", 30)
    listed = gc(project)
    assert sorted(line.split(" (step ")[1] for line in listed if " cache entry " in line) == [
        f"{step}): expired: recorded 8.0 days ago" for step in sorted(STEPS)]
    assert sorted(line for line in listed if " step record " in line) == [
        f"would delete step record {step}.json: no entry left for it" for step in sorted(STEPS)]
    assert {line.split(":")[0] for line in listed if line.startswith("would delete job")} == {
        "would delete job first", "would delete job second"}
    assert "2 expired job(s), 3 cache entries" in listed[-1] and listed[-1].endswith("(dry run: pass --yes to delete)")
    assert index(project, "entries") == entries  # a dry run deletes nothing

    deleted = gc(project, "--yes")
    assert deleted[:-1] == [line.replace("would delete", "deleted", 1) for line in listed[:-1]]
    assert not index(project, "entries") and not index(project, "steps")
    assert not (storage(project) / "kedro-vertexai-temp" / "first").exists()
    assert gc(project)[:-1] == []  # nothing left to do
    # Nothing recorded any more: every step runs, and is recorded again.
    assert run_local(project, "third", "--cache", "on") == dict.fromkeys(STEPS, "ran")
    assert table(project) == "label,total\nTotal,12\n" and len(index(project, "entries")) == 3


def test_gc_deletes_entries_whose_blobs_are_gone_and_the_next_run_reruns_only_those_steps(project: Path) -> None:
    assert run_local(project, "first", "--cache", "on") == dict.fromkeys(STEPS, "ran")
    shutil.rmtree(storage(project) / "kedro-vertexai-temp" / "first")  # a bucket lifecycle rule
    listed = gc(project)
    assert sorted(line.split(" (step ")[1] for line in listed if " cache entry " in line) == [
        "clean): dangling: the blob cleaned of job first is gone",
        "total): dangling: the blob total of job first is gone"]
    assert "0 expired job(s), 2 cache entries" in listed[-1]
    gc(project, "--yes")
    # tabulate's entry references only the catalog's table, still what it wrote: it stays.
    assert index(project, "steps") == {"tabulate"} and len(index(project, "entries")) == 1
    assert run_local(project, "second", "--cache", "on") == {"clean": "ran", "total": "ran", "tabulate": "served"}
    assert table(project) == "label,total\nTotal,12\n"


def test_resume_runs_a_failed_job_again_as_the_same_run_keeping_the_steps_it_finished(project: Path) -> None:
    params = project / "conf" / "base" / "parameters.yml"
    params.write_text(params.read_text().replace("label: total", "label: FAIL"))
    failed = subprocess.run([*KVX, "run-local", "--job-name", "broken"], cwd=project, env=step_env(),
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-2000:]
    runs = project / ".kvx" / "runs" / "broken"
    first = json.loads((runs / "status.json").read_text())
    assert first["states"] == {"clean": "done", "total": "done", "tabulate": "failed"}
    clean_log = (runs / "logs" / "clean.log").read_text()

    params.write_text(params.read_text().replace("label: FAIL", "label: total"))
    resumed = subprocess.run([*KVX, "run-local", "--resume", "broken"], cwd=project, env=step_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "Resuming (2 steps done) 3 node steps" in resumed.stdout
    assert f"run id {first['run_id']}" in resumed.stdout
    assert (runs / "logs" / "clean.log").read_text() == clean_log  # not run again
    assert table(project) == "label,total\nTotal,12\n"  # tabulate read the first run's intermediates
    status = json.loads((runs / "status.json").read_text())
    assert status["states"] == dict.fromkeys(STEPS, "done") and status["run_id"] == first["run_id"]

    again = subprocess.run([*KVX, "run-local", "--resume", "broken"], cwd=project, env=step_env(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "job broken succeeded: nothing to resume" in again.stderr.splitlines()[-1]
    unknown = subprocess.run([*KVX, "run-local", "--resume", "nope"], cwd=project, env=step_env(),
                             capture_output=True, text=True, timeout=300)
    assert unknown.returncode == 2 and "no local run of job nope to resume" in unknown.stderr.splitlines()[-1]


def test_a_pinned_load_version_is_in_the_key_of_the_steps_served_before_the_run(project: Path) -> None:
    # A run pinning an older version of its input: each step's key names that version, so
    # nothing the newest version made is served.
    catalog = project / "conf" / "base" / "catalog.yml"
    catalog.write_text(catalog.read_text().replace("  filepath: data/raw.json\n",
                                                   "  filepath: data/raw.json\n  versioned: true\n"))
    (project / "data" / "raw.json").unlink()
    for version, numbers in (("2026-01-01T00.00.00.000Z", "[1, 2, 3]"), ("2026-02-01T00.00.00.000Z", "[10, 20]")):
        folder = project / "data" / "raw.json" / version
        folder.mkdir(parents=True)
        (folder / "raw.json").write_text(numbers)
    assert run_local(project, "newest", "--cache", "on") == dict.fromkeys(STEPS, "ran")
    assert table(project) == "label,total\nTotal,60\n"
    pinned = ("--load-version", "raw_numbers=2026-01-01T00.00.00.000Z")
    assert all(verdict.startswith("MISS") for verdict in plan(project, *pinned).values())  # plan says so first
    assert run_local(project, "pinned", "--cache", "on", *pinned) == dict.fromkeys(STEPS, "ran")
    assert table(project) == "label,total\nTotal,12\n"
    assert plan(project, *pinned) == dict.fromkeys(STEPS, "HIT")
    assert run_local(project, "pinned-again", "--cache", "on", *pinned) == dict.fromkeys(STEPS, "served")
    assert table(project) == "label,total\nTotal,12\n"


def test_an_entry_records_what_the_step_wrote_not_what_its_place_holds_when_the_step_ends(project: Path) -> None:
    # Another run writing the same catalog path while this step still runs (here: a project hook
    # as the step's pipeline ends, after the output was saved): the entry must not take that data
    # as this step's.
    src = project / "src" / "cachekey"
    (src / "rewrite_hooks.py").write_text(
        "from pathlib import Path\n\nfrom kedro.framework.hooks import hook_impl\n\n\n"
        "class Rewrite:\n    @hook_impl\n    def after_pipeline_run(self, pipeline):\n"
        "        if 'tabulate' in {node.name for node in pipeline.nodes}:\n"
        "            Path('data/table.csv').write_text('label,total\\nsomeone else,0\\n')\n")
    (src / "settings.py").write_text("from .rewrite_hooks import Rewrite\n\nHOOKS = (Rewrite(),)\n")
    assert run_local(project, "first", "--cache", "on") == dict.fromkeys(STEPS, "ran")
    # The place holds other data than the step wrote: a miss for tabulate, never that data served.
    again = run_local(project, "second", "--cache", "on")
    assert again["tabulate"] == "ran" and again["clean"] == again["total"] == "served"


def test_a_catalog_output_on_s3_reached_with_the_catalogs_own_credentials_is_cached_and_served(
        project: Path, s3_server_process: Any) -> None:
    # No ambient AWS credentials: only the catalog entry's reach the bucket, as the dataset saves.
    import uuid

    from conftest import S3_CREDENTIALS

    env = {key: value for key, value in step_env().items() if not key.startswith("AWS_")}
    env.update({"AWS_SHARED_CREDENTIALS_FILE": str(project / "none"), "AWS_CONFIG_FILE": str(project / "none"),
                "AWS_EC2_METADATA_DISABLED": "true"})
    key = f"{uuid.uuid4().hex}/table.csv"
    catalog = project / "conf" / "base" / "catalog.yml"
    catalog.write_text(catalog.read_text().replace(
        "  filepath: data/table.csv\n",
        f"  filepath: s3://{s3_server_process.bucket}/{key}\n  credentials: table_bucket\n"))
    (project / "conf" / "base" / "credentials.yml").write_text(json.dumps({"table_bucket": {
        "key": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": s3_server_process.url}}}))
    assert run_local(project, "first", "--cache", "on", env=env) == dict.fromkeys(STEPS, "ran")
    written = s3_server_process.client().get_object(Bucket=s3_server_process.bucket, Key=key)["Body"].read()
    assert run_local(project, "second", "--cache", "on", env=env) == dict.fromkeys(STEPS, "served")
    # Changed in the bucket since it was recorded: a miss for its step, never the entry served.
    s3_server_process.client().put_object(Bucket=s3_server_process.bucket, Key=key, Body=b"label,total\nx,0\n")
    again = run_local(project, "third", "--cache", "on", env=env)
    assert again == {"clean": "served", "total": "served", "tabulate": "ran"}
    assert s3_server_process.client().get_object(Bucket=s3_server_process.bucket, Key=key)["Body"].read() == written
    # The credentials are in no file the cache wrote.
    secret = S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    assert not [path for path in (project / ".kvx").rglob("*")
                if path.is_file() and secret.encode() in path.read_bytes()]


def test_a_step_whose_inputs_were_made_under_another_key_records_no_entry(project: Path) -> None:
    # Within one job, the raw input changes between the step that reads it and the next step
    # (data landing while a pipeline runs; or a resume after a code fix). The next step's key
    # counts its producer's key as computed now, not the one its input was made under: an entry
    # recorded then would serve the old total to any later run with the new raw input.
    from integration.conftest import run_step

    root = str(storage(project))
    steps = ("--run-id", "j1", "--job-name", "j1", "--cache", "on", "--storage-root", root)
    assert run_step(project, "--node", "clean", *steps).returncode == 0
    (project / "data" / "raw.json").write_text("[10, 20, 30]")
    made = run_step(project, "--node", "total", *steps)
    assert made.returncode == 0, made.stderr[-2000:]
    assert any("made under other keys" in message for message in made.messages())
    # A later run with the new input: nothing stale is served; the table is the new data's.
    again = run_local(project, "after", "--cache", "on")
    assert again == dict.fromkeys(STEPS, "ran")
    assert table(project) == "label,total\nTotal,120\n"
    # Its own entries are sound: the run after it is served whole, with the same table.
    assert run_local(project, "after-again", "--cache", "on") == dict.fromkeys(STEPS, "served")
    assert table(project) == "label,total\nTotal,120\n"
