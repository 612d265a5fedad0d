"""run-once, schedule, list-pipelines, status, cancel and ui against a fake Vertex AI API that
validates every request body with Google's published discovery document (fake_vertex.py), with
Application Default Credentials from a service-account key whose token_uri is 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from integration.conftest import KVX, step_env
from integration.fake_vertex import FakeVertex, Invalid, discovery, validate

pytestmark = pytest.mark.slow

PROJECT_ID, REGION = "kvx-example-project", "europe-west1"


@pytest.fixture
def vertex(fake_google):
    fake = FakeVertex(fake_google, project=PROJECT_ID, region=REGION).start()
    yield fake
    fake.stop()


@pytest.fixture
def adc(tmp_path, fake_google) -> Path:
    from integration.test_mlflow import _service_account_key

    return _service_account_key(tmp_path / "adc.json", f"{fake_google.url}/token",
                                "deployer@kvx-test.iam.gserviceaccount.com")


def final_record(stderr: str) -> dict:
    """The command's last line of its own (a library thread may log after it)."""
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [record for record in records if record.get("logger", "").startswith("kvx_runtime")][-1]


def kvx(project: Path, vertex: FakeVertex, adc: Path, *args: str, timeout: float = 300, **extra: str):
    env = step_env(KVX_VERTEX_ENDPOINT=vertex.url, GOOGLE_APPLICATION_CREDENTIALS=str(adc), KVX_WATCH_INTERVAL="0.05",
                   KVX_VERTEX_RETRY_WAIT="0.05", KVX_LOG_FORMAT="json", **extra)
    return subprocess.run([*KVX, *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout)


def test_discovery_validation_is_what_google_does() -> None:
    job = discovery()["schemas"]["GoogleCloudAiplatformV1PipelineJob"]
    validate({"displayName": "x", "runtimeConfig": {"parameterValues": {"a": 1}}}, job, "pipeline_job")
    with pytest.raises(Invalid, match='Unknown name "runtime_config"'):
        validate({"runtime_config": {}}, job, "pipeline_job")
    with pytest.raises(Invalid, match="TYPE_STRING"):
        validate({"displayName": 3}, job, "pipeline_job")
    with pytest.raises(Invalid, match="failurePolicy"):
        validate({"runtimeConfig": {"failurePolicy": "SOMETIMES"}}, job, "pipeline_job")


def test_run_once_wait_succeeds_with_a_valid_job(example_project: Path, vertex: FakeVertex, adc: Path) -> None:
    result = kvx(example_project, vertex, adc, "run-once", "--wait", "--param", "reporting.top_n=5",
                 "--param", "data_science.model_options.test_size=0.3")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    [job] = vertex.jobs.values()
    job_id = job["name"].rsplit("/", 1)[-1]
    assert job_id.startswith("spaceflights-kvx-") and len(job_id) == len("spaceflights-kvx-") + 14
    runtime = job["runtimeConfig"]
    assert runtime["failurePolicy"] == "PIPELINE_FAILURE_POLICY_FAIL_SLOW"
    assert runtime["gcsOutputDirectory"] == "gs://kvx-example-bucket/pipelines"
    assert runtime["parameterValues"] == {"reporting__top_n": 5, "data_science__model_options__test_size": 0.3}
    assert job["labels"]["kvx-pipeline"] == "spaceflights-kvx" and "kvx-version" in job["labels"]
    inputs = job["pipelineSpec"]["root"]["inputDefinitions"]["parameters"]
    assert inputs["reporting__top_n"]["parameterType"] == "NUMBER_INTEGER"  # typed from the Kedro value
    out = result.stdout
    assert f"Submitted {job['name']}" in out
    assert f"console.cloud.google.com/vertex-ai/locations/{REGION}/pipelines/runs/{job_id}" in out
    assert "RUNNING    data-processing-preprocess-companies-node" in out
    assert "SUCCEEDED  data-processing-preprocess-companies-node" in out
    assert f"{job_id}: SUCCEEDED" in out


def test_run_once_wait_diagnoses_a_failed_task(example_project: Path, vertex: FakeVertex, adc: Path,
                                               gcs_emulator) -> None:
    storage = gcs_emulator.filesystem()
    if not storage.exists("kvx-example-bucket"):
        storage.mkdir("kvx-example-bucket")  # the example's run_config.root, where steps record their run id
    vertex.fail_tasks = {"data-science-train-model-node"}
    result = kvx(example_project, vertex, adc, "run-once", "--wait", **gcs_emulator.env)
    assert result.returncode == 1, result.stderr[-3000:]
    out = result.stdout
    assert "task data-science-train-model-node FAILED: The replica workerpool0-0 exited" in out
    assert f"ran as:  projects/{PROJECT_ID}/locations/{REGION}/customJobs/" in out
    assert "logs:    https://console.cloud.google.com/logs/query;query=resource.type%3D%22ml_job%22" in out
    replay = next(line for line in out.splitlines() if line.startswith("  replay:  "))
    [job] = vertex.jobs.values()
    job_id = job["name"].rsplit("/", 1)[-1]
    assert replay.startswith("  replay:  kvx-runtime exec-node --node data_science.train_model_node --env base")
    assert f"--job-name {job_id}" in replay and "--storage-root gs://kvx-example-bucket/pipelines" in replay
    assert "--job-create-time 20" in replay and "--save-version" not in replay and "{{$" not in replay
    # The fake runs no step, so none recorded the run id it got: the replay says its own may differ.
    assert "no step recorded the one it ran with" in out
    final = final_record(result.stderr)
    assert final["message"].startswith(f"kvx-runtime run-once failed: pipeline run {job_id} FAILED")

    # status says the same afterwards, from the job alone, with the run id the steps recorded
    # (Vertex AI's pipeline_job_uuid, which its API does not return).
    storage.pipe_file(f"kvx-example-bucket/pipelines/kedro-vertexai-temp/{job_id}/owner.json",
                      json.dumps({"format": 1, "run_id": "4815162342", "job_name": job_id}).encode())
    status = kvx(example_project, vertex, adc, "status", job_id, **gcs_emulator.env)
    assert status.returncode == 1
    assert "FAILED     data-science-train-model-node" in status.stdout
    replay = next(line for line in status.stdout.splitlines() if line.startswith("  replay:  "))
    assert replay.startswith("  replay:  kvx-runtime exec-node") and "--run-id 4815162342 " in replay
    assert "no step recorded" not in status.stdout


def test_run_once_refuses_a_run_whose_inputs_are_not_in_the_storage_root(example_project: Path, vertex: FakeVertex,
                                                                        adc: Path, gcs_emulator) -> None:
    # The cloud layout: raw inputs read from the storage root, where compiling does not look.
    catalog = example_project / "conf" / "base" / "catalog.yml"
    catalog.write_text(catalog.read_text()
                       .replace("filepath: data/01_raw/companies.csv",
                                "filepath: ${storage_root}/data/01_raw/companies.csv")
                       # Another file in each run, which a step before it may write: not looked for.
                       .replace("filepath: data/01_raw/reviews.csv",
                                "filepath: ${storage_root}/runs/${run_id}/reviews.csv"))
    # A root of its own: the emulator lives as long as the test session.
    root = f"{gcs_emulator.bucket}/{example_project.parent.name}"
    config = example_project / "conf" / "base" / "vertexai.yml"
    config.write_text(config.read_text().replace("root: kvx-example-bucket/pipelines", f"root: {root}"))
    refused = kvx(example_project, vertex, adc, "run-once", "--no-wait", **gcs_emulator.env)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert final_record(refused.stderr)["message"] == (
        f"kvx-runtime run-once failed: pipeline input not in the storage root: 'companies' at "
        f"gs://{root}/data/01_raw/companies.csv; the step reading it would fail, so nothing "
        "was submitted (copy the project's files there first (`kvx-runtime init --cloud-env` lists what to copy "
        "where))")
    assert vertex.jobs == {}
    # A schedule is set all the same (the file may be copied before its first run), with a warning.
    scheduled = kvx(example_project, vertex, adc, "schedule", "--cron", "0 6 * * *", **gcs_emulator.env)
    assert scheduled.returncode == 0, scheduled.stderr[-3000:]
    assert (f"pipeline input 'companies' is not at gs://{root}/data/01_raw/companies.csv: "
            "scheduled runs fail until it is copied there") in scheduled.stderr

    gcs_emulator.filesystem().pipe_file(f"{root}/data/01_raw/companies.csv",
                                        (example_project / "data" / "01_raw" / "companies.csv").read_bytes())
    submitted = kvx(example_project, vertex, adc, "run-once", "--no-wait", **gcs_emulator.env)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert len(vertex.jobs) == 1


def test_schedule_twice_is_one_schedule_with_the_second_cron(example_project: Path, vertex: FakeVertex,
                                                             adc: Path) -> None:
    first = kvx(example_project, vertex, adc, "schedule", "--cron", "0 6 * * *", "--timezone", "Europe/Warsaw")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "created: TZ=Europe/Warsaw 0 6 * * *" in first.stdout
    second = kvx(example_project, vertex, adc, "schedule", "--cron", "30 7 * * 1", "--max-run-count", "10")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "updated: 30 7 * * 1" in second.stdout
    [schedule] = vertex.schedules.values()
    assert schedule["cron"] == "30 7 * * 1" and schedule["maxRunCount"] == "10"
    assert schedule["createPipelineJobRequest"]["pipelineJob"]["runtimeConfig"]["failurePolicy"].endswith("FAIL_SLOW")
    assert ("PATCH", schedule["name"]) in [(m, p.removeprefix("/v1/")) for m, p in vertex.requests]
    paused = kvx(example_project, vertex, adc, "schedule", "--pause")
    assert paused.returncode == 0 and "PAUSED" in paused.stdout and schedule["state"] == "PAUSED"
    assert "pipeline compiled" not in paused.stderr  # found by name: nothing compiled
    resumed = kvx(example_project, vertex, adc, "schedule", "--resume")
    assert resumed.returncode == 0 and schedule["state"] == "ACTIVE"
    deleted = kvx(example_project, vertex, adc, "schedule", "--delete")
    assert deleted.returncode == 0 and vertex.schedules == {}


def test_schedule_updates_never_unset_what_vertex_keeps_and_a_lost_create_is_one_schedule(
        example_project: Path, vertex: FakeVertex, adc: Path) -> None:
    # Vertex AI defaults a schedule's startTime and refuses to unset a non-empty field: an
    # update's mask names only what it sets. Creation takes no request id: a create whose answer
    # was lost is found, not made again.
    vertex.lose_next_schedule_answer = True
    first = kvx(example_project, vertex, adc, "schedule", "--cron", "0 6 * * *", KVX_API_RETRY_WAIT="0.05")
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(vertex.schedules) == 1 and "creation was lost" in first.stderr
    [schedule] = vertex.schedules.values()
    ended = kvx(example_project, vertex, adc, "schedule", "--cron", "0 7 * * *", "--end-time", "2030-01-01T00:00:00Z",
                "--max-run-count", "5")
    assert ended.returncode == 0, ended.stderr[-3000:]
    assert schedule["endTime"] == "2030-01-01T00:00:00Z" and schedule["startTime"] == schedule["createTime"]
    plain = kvx(example_project, vertex, adc, "schedule", "--cron", "0 8 * * *")
    assert plain.returncode == 2 and schedule["cron"] == "0 7 * * *"
    assert "cannot unset" in plain.stderr and "schedule --delete" in plain.stderr and "Traceback" not in plain.stderr
    # Pausing or resuming what already is: done, as a retried request whose answer was lost finds it.
    for action, state in (("--pause", "PAUSED"), ("--pause", "PAUSED"), ("--resume", "ACTIVE"), ("--resume", "ACTIVE")):
        acted = kvx(example_project, vertex, adc, "schedule", action)
        assert acted.returncode == 0 and schedule["state"] == state, acted.stderr[-2000:]
    # A completed schedule (past its end or run count) starts nothing and cannot be updated: a new one.
    schedule["state"] = "COMPLETED"
    again = kvx(example_project, vertex, adc, "schedule", "--cron", "0 9 * * *")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(s["state"] for s in vertex.schedules.values()) == ["ACTIVE", "COMPLETED"]
    assert kvx(example_project, vertex, adc, "schedule", "--delete").returncode == 0
    assert [s["state"] for s in vertex.schedules.values()] == ["COMPLETED"]


def test_list_across_pages_cancel_and_ui(example_project: Path, vertex: FakeVertex, adc: Path) -> None:
    for _ in range(3):
        assert kvx(example_project, vertex, adc, "run-once").returncode == 0
        import time

        time.sleep(1.1)  # job ids carry the second
    listed = kvx(example_project, vertex, adc, "list-pipelines")
    assert listed.returncode == 0, listed.stderr[-2000:]
    rows = [line for line in listed.stdout.splitlines()[1:] if line.startswith("spaceflights-kvx-")]
    assert len(rows) == 3  # the fake pages by 2
    newest = rows[0].split()[0]
    cancelled = kvx(example_project, vertex, adc, "cancel", newest)
    assert cancelled.returncode == 0 and "Cancellation of" in cancelled.stdout
    status = kvx(example_project, vertex, adc, "status", newest)
    assert f"{newest}: CANCELLED" in status.stdout and status.returncode == 1
    ui = kvx(example_project, vertex, adc, "ui")
    assert ui.stdout.strip() == f"https://console.cloud.google.com/vertex-ai/pipelines/runs?project={PROJECT_ID}"
    missing = kvx(example_project, vertex, adc, "status", "no-such-job")
    assert missing.returncode == 2 and "Vertex AI: not found" in missing.stderr


def test_every_command_succeeds_through_429_and_503(example_project: Path, fake_google, adc: Path) -> None:
    fake = FakeVertex(fake_google, project=PROJECT_ID, region=REGION, fault_rate=0.2, seed=5).start()
    try:
        for args in (["run-once", "--wait"], ["schedule", "--cron", "0 1 * * *"], ["schedule", "--cron", "0 2 * * *"],
                     ["list-pipelines"]):
            result = kvx(example_project, fake, adc, *args)
            assert result.returncode == 0, f"{args}: {result.stderr[-2000:]}"
    finally:
        fake.stop()
    assert fake.faults > 0 and len(fake.schedules) == 1
    tokens = [t for t in fake_google.issued if t.startswith("ya29")]
    assert tokens and not any(token in result.stdout + result.stderr for token in tokens)


def test_credentials_from_the_metadata_server(example_project: Path, vertex: FakeVertex, fake_google) -> None:
    """On a Google machine (a Cloud Build step, a VM), ADC come from the metadata server."""
    host = fake_google.url.removeprefix("http://")
    env = step_env(KVX_VERTEX_ENDPOINT=vertex.url, GCE_METADATA_HOST=host, GCE_METADATA_IP=host,
                   KVX_VERTEX_RETRY_WAIT="0.05", CLOUDSDK_CONFIG=str(example_project / "no-gcloud"))
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    result = subprocess.run([*KVX, "run-once"], cwd=example_project, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(vertex.jobs) == 1


def test_upload_pipeline_then_run_the_template(example_project: Path, vertex: FakeVertex, adc: Path) -> None:
    config = example_project / "conf" / "base" / "vertexai.yml"
    repository = f"{vertex.url}/kfp/{PROJECT_ID}/pipelines"
    text = config.read_text().replace("run_config:\n", f"run_config:\n  template_repository: {repository}\n", 1)
    config.write_text(text)
    uploaded = kvx(example_project, vertex, adc, "upload-pipeline", "--tag", "nightly",
                   KEDRO_CONFIG_COMMIT_ID="abc123")
    assert uploaded.returncode == 0, uploaded.stderr[-2000:]
    assert f"Uploaded as {repository}/spaceflights-kvx/nightly" in uploaded.stdout
    assert {tag for _, tag in vertex.templates} >= {"nightly", "abc123", "latest"}
    ran = kvx(example_project, vertex, adc, "run-once", "--template", "abc123", "--wait")
    assert ran.returncode == 0, ran.stderr[-2000:]
    [job] = vertex.jobs.values()
    assert job["templateUri"] == f"{repository}/spaceflights-kvx/abc123" and "pipelineSpec" in job


def test_status_logs_fetches_the_failed_tasks_errors(example_project: Path, vertex: FakeVertex, adc: Path) -> None:
    vertex.fail_tasks = {"reporting-build-report-node"}
    assert kvx(example_project, vertex, adc, "run-once", "--wait").returncode == 1
    [job] = vertex.jobs.values()
    status = kvx(example_project, vertex, adc, "status", job["name"].rsplit("/", 1)[-1], "--logs",
                 KVX_LOGGING_ENDPOINT=vertex.url)
    assert status.returncode == 1
    assert "  log:     " in status.stdout
    assert "exec-node failed: node 'reporting-build-report-node' raised ValueError: injected failure" in status.stdout


def test_wait_timeout_stops_waiting_not_the_run(example_project: Path, vertex: FakeVertex, adc: Path) -> None:
    result = kvx(example_project, vertex, adc, "run-once", "--wait", "--timeout", "0")
    assert result.returncode == 3
    final = final_record(result.stderr)
    assert "is still PENDING after 0 s; it keeps running" in final["message"]
    assert "kvx-runtime status" in final["message"]
    [job] = vertex.jobs.values()
    assert job["state"] != "PIPELINE_STATE_CANCELLED"


def test_a_paused_run_stops_the_wait_not_the_run(example_project: Path, vertex: FakeVertex, adc: Path) -> None:
    vertex.pause_jobs = True
    try:
        result = kvx(example_project, vertex, adc, "run-once", "--wait")
    finally:
        vertex.pause_jobs = False
    assert result.returncode == 3, result.stderr[-2000:]
    final = final_record(result.stderr)
    assert "is PAUSED: it does not go on until it is resumed, so watching stopped" in final["message"]
    [job] = vertex.jobs.values()
    assert job["state"] == "PIPELINE_STATE_PAUSED"


def test_ctrl_c_stops_watching_not_the_run(example_project: Path, vertex: FakeVertex, adc: Path) -> None:
    import signal

    env = step_env(KVX_VERTEX_ENDPOINT=vertex.url, GOOGLE_APPLICATION_CREDENTIALS=str(adc), KVX_WATCH_INTERVAL="5",
                   KVX_LOG_FORMAT="json")
    process = subprocess.Popen([*KVX, "run-once", "--wait"], cwd=example_project, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("watching "):
            break
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Stopped watching; the run goes on. Cancel it with: kvx-runtime cancel spaceflights-kvx-" in out
    [job] = vertex.jobs.values()
    assert job["state"] not in {"PIPELINE_STATE_CANCELLING", "PIPELINE_STATE_CANCELLED"}


def test_a_lost_answer_to_the_jobs_creation_is_not_reported_as_refused(example_project: Path, vertex: FakeVertex,
                                                                         adc: Path) -> None:
    """The create is retried after its answer is lost; Vertex AI then answers 409 for the job the
    first try created. That job carries this submission's label: it is ours, not a failure."""
    vertex.lose_next_job_answer = True
    result = kvx(example_project, vertex, adc, "run-once")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    [job] = vertex.jobs.values()
    assert f"Submitted {job['name']}" in result.stdout
    assert "the answer to the job's creation was lost; the job exists" in result.stderr
    creates = [path for method, path in vertex.requests if method == "POST" and path.endswith("/pipelineJobs")]
    assert len(creates) == 2

    # No try left after the lost answer: the job is looked up rather than reported failed.
    vertex.lose_next_job_answer = True
    single = kvx(example_project, vertex, adc, "run-once", KVX_VERTEX_ATTEMPTS="1")
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-3000:]
    assert len(vertex.jobs) == 2 and "the job exists" in single.stderr


def test_a_job_id_taken_by_another_submission_is_refused(vertex: FakeVertex, fake_google) -> None:
    import requests

    from kvx_runtime.targets.base import RunRequest
    from kvx_runtime.targets.http import ApiError
    from kvx_runtime.targets.vertex import VertexTarget

    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {fake_google.access_token()}"
    target = VertexTarget(PROJECT_ID, REGION, session=session, endpoint=vertex.url, attempts=2)
    spec = {"pipelineInfo": {"name": "p"}, "root": {}, "schemaVersion": "2.1.0"}
    # Two submissions within one second get one job id.
    run = RunRequest(spec=spec, run_id="p-20261124101500", display_name="p")
    first = target.submit(run)
    with pytest.raises(ApiError, match="a pipeline job p-20261124101500 already exists \\(another submission's\\)"):
        target.submit(run)
    assert [j["name"] for j in vertex.jobs.values()] == [first.name]
