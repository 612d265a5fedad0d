"""The step contract: one exec-node invocation (written by the compiler, printed as the replay
line, read back by ``status``), the run identity and the job directory's owner record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvx_runtime.errors import ConfigError, ExitCode, InputDataError, UsageError
from kvx_runtime.step import ExecNodeInvocation, InvocationError, StepRequest
from kvx_runtime.step.identity import (
    OWNER_RECORD,
    JobDirectory,
    RunIdentity,
    claim_job_directory,
    job_directory_name,
    read_owner,
    resolve_identity,
)
from kvx_runtime.step.invocation import _FLAGS
from kvx_runtime.step.orchestrator import KubeflowPipelines, current
from kvx_runtime.step.serving import check_serve_steps, parse_serve_step, serve_step_arg
from kvx_runtime.storage.store import BlobStore

#: exec-node options that are not part of a step's invocation: where the project is, which
#: differs between the image and a laptop.
NOT_IN_INVOCATION = {"--project-path", "--help"}


def test_the_invocation_writes_exactly_the_flags_exec_node_takes() -> None:
    from kvx_runtime.cli import exec_node

    options = {opt for param in exec_node.params for opt in param.opts if opt.startswith("--")}
    written = {flag for flag, _, _ in _FLAGS}
    assert written <= options, written - options
    assert options - written <= NOT_IN_INVOCATION, options - written - NOT_IN_INVOCATION


def test_flags_are_written_in_the_compiled_order_and_empty_ones_left_out() -> None:
    invocation = ExecNodeInvocation(nodes=("a", "b"), env="base", run_id="r1", job_name="job", pipeline="etl",
                                    storage_root="gs://b/p", save_version="", job_create_time="2026-12-01T00:00:00Z",
                                    load_versions=("x=2026-11-30T00.00.00.000Z",), code="gs://b/c.tar#sha256=ab",
                                    mlflow_run_id=None, params=("k=v w", "n:int=3"))
    assert invocation.argv() == [
        "kvx-runtime", "exec-node", "--node", "a", "--node", "b", "--pipeline", "etl", "--env", "base",
        "--run-id", "r1", "--job-name", "job", "--storage-root", "gs://b/p",
        "--job-create-time", "2026-12-01T00:00:00Z", "--load-version", "x=2026-11-30T00.00.00.000Z",
        "--code", "gs://b/c.tar#sha256=ab", "--param", "k=v w", "--param", "n:int=3"]
    assert "'k=v w'" in invocation.command_line()
    assert ExecNodeInvocation(nodes=("a",)).args() == ["--node", "a"]  # the default pipeline is not written


def test_what_is_written_reads_back_the_same() -> None:
    invocation = ExecNodeInvocation(nodes=("a",), env="base", run_id="{{$.x}}", job_name="j", storage_root="/r",
                                    save_version="20261201", mlflow_run_id="m", params=("a.b=1",),
                                    load_versions=("d=v", "e=w"))
    assert ExecNodeInvocation.parse(invocation.argv()) == invocation
    assert ExecNodeInvocation.parse(invocation.args()) == invocation
    serving = invocation.with_values(nodes=("a", "b,c"), cache="on",
                                     serve_steps=(serve_step_arg(["a"]), serve_step_arg(["b,c"])))
    assert serving.args()[-6:] == ["--cache", "on", "--serve-step", '["a"]', "--serve-step", '["b,c"]']
    assert ExecNodeInvocation.parse(serving.argv()) == serving
    assert [parse_serve_step(text) for text in serving.serve_steps] == [("a",), ("b,c",)]


@pytest.mark.parametrize("text", ["a,b", "[]", '["a", 1]', '{"a": 1}'])
def test_a_serve_step_that_is_not_a_list_of_node_names_is_refused(text: str) -> None:
    with pytest.raises(UsageError, match="is not a JSON list of node names") as raised:
        parse_serve_step(text)
    assert raised.value.exit_code == 2


@pytest.mark.parametrize("steps", [[("a",)], [("a",), ("a", "b")], [("a",), ("b",), ("c",)]])
def test_serve_steps_must_cover_the_nodes_exactly_once(steps: list[tuple[str, ...]]) -> None:
    with pytest.raises(UsageError, match="must name every --node exactly once"):
        check_serve_steps(StepRequest(nodes=["a", "b"], serve_steps=tuple(steps)))
    check_serve_steps(StepRequest(nodes=["a", "b"], serve_steps=(("b",), ("a",))))


@pytest.mark.parametrize(("argv", "problem"), [
    (["kvx-runtime", "exec-node", "--env", "base"], "no --node"),
    (["--node", "a", "--bogus", "x"], "not an exec-node flag"),
    (["--node", "a", "--env"], "has no value"),
    (["--node", "a", "--env", "base", "--env", "local"], "given twice"),
])
def test_anything_else_is_refused_on_reading(argv: list[str], problem: str) -> None:
    with pytest.raises(InvocationError, match=problem):
        ExecNodeInvocation.parse(argv)


def test_the_replay_line_is_the_step_as_it_really_ran() -> None:
    request = StepRequest(nodes=["n1"], pipeline="etl", raw_params=["lr=0.1"], load_versions={"b": "v2", "a": "v1"},
                          code="gs://b/code.tar#sha256=00")
    line = request.replay(run_id="uuid-1", job_name="job-uuid-1", env="cloud", storage_root="gs://b/root",
                          save_version="2026-12-01T00.00.00.000Z").command_line()
    assert line == ("kvx-runtime exec-node --node n1 --pipeline etl --env cloud --run-id uuid-1 --job-name job-uuid-1 "
                    "--storage-root gs://b/root --save-version 2026-12-01T00.00.00.000Z --load-version a=v1 "
                    "--load-version b=v2 --code 'gs://b/code.tar#sha256=00' --param lr=0.1")


def test_identity_comes_from_flags_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KEDRO_CONFIG_RUN_ID", "KEDRO_CONFIG_JOB_NAME", "KFP_POD_NAME", "KVX_ORCHESTRATOR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UsageError, match="no run id"):
        resolve_identity(None, "job")
    assert resolve_identity(None, None, missing="invent").run_id.startswith("local-")
    assert resolve_identity(None, "by-hand", missing="invent") == RunIdentity("by-hand", "by-hand")
    monkeypatch.setenv("KEDRO_CONFIG_RUN_ID", "env-run")
    assert resolve_identity(None, None) == RunIdentity("env-run", "env-run")
    assert resolve_identity("flag-run", "job") == RunIdentity("flag-run", "job")
    assert job_directory_name(None, "job") == "job"  # the run id from the environment; names as given here


def test_mlflow_end_without_a_run_id_keeps_the_job_name(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KEDRO_CONFIG_RUN_ID", "KEDRO_CONFIG_JOB_NAME", "KVX_ORCHESTRATOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KFP_POD_NAME", "pod")
    assert job_directory_name(None, "display") == "display"
    assert job_directory_name("uuid", "display") == "display-uuid"
    assert job_directory_name(None, None) is None


def test_the_orchestrator_is_named_or_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KFP_POD_NAME", raising=False)
    monkeypatch.setenv("KVX_ORCHESTRATOR", "Kubeflow")
    assert isinstance(current(), KubeflowPipelines)
    assert current().run_tags("u1") == {"kubeflow_run_id": "u1"}
    monkeypatch.setenv("KVX_ORCHESTRATOR", "mesos")
    with pytest.raises(ConfigError, match="KVX_ORCHESTRATOR='mesos': unknown orchestrator") as caught:
        current()
    assert caught.value.exit_code == ExitCode.USAGE and "vertex, kubeflow, airflow, local" in str(caught.value.hint)


def test_under_airflow_a_runs_job_directory_is_the_dag_id_and_its_run_id(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every run of a DAG passes the DAG id as its job name; Airflow's run ids carry ':' and '+'.
    monkeypatch.setenv("KVX_ORCHESTRATOR", "airflow")
    identity = resolve_identity("manual__2026-01-02T03:04:05.678+00:00", "spaceflights")
    assert identity.job_name == "spaceflights-manual__2026-01-02T03-04-05.678-00-00"
    assert resolve_identity("scheduled__2026-01-03T00:00:00+00:00", "spaceflights").job_name != identity.job_name
    assert resolve_identity(identity.run_id, identity.job_name).job_name == identity.job_name  # given back as is
    assert current().run_tags("r1") == {"airflow_run_id": "r1"}


def test_the_first_run_owns_the_job_directory_and_a_second_is_refused(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    claim_job_directory(BlobStore(root, "shared"), RunIdentity("run-a", "shared"))
    claim_job_directory(BlobStore(root, "shared"), RunIdentity("run-a", "shared"))  # a later step of the run
    with pytest.raises(UsageError) as caught:
        claim_job_directory(BlobStore(root, "shared"), RunIdentity("run-b", "shared"))
    assert "belongs to run run-a, not to this run (run-b)" in caught.value.message
    assert caught.value.exit_code == ExitCode.USAGE
    assert read_owner(BlobStore(root, "shared")) == "run-a"
    assert read_owner(BlobStore(root, "never-used")) is None


def test_an_unreadable_owner_record_is_named(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path), "job")
    record = Path(store.job_url) / OWNER_RECORD
    record.parent.mkdir(parents=True)
    record.write_text("{not json")
    with pytest.raises(InputDataError, match=f"owner record {record} is unreadable"):
        claim_job_directory(store, RunIdentity("run", "job"))
    record.write_text(json.dumps({"run_id": "run"}))
    claim_job_directory(store, RunIdentity("run", "job"))


def test_the_job_directory_is_opened_and_claimed_only_when_used(tmp_path: Path) -> None:
    directory = JobDirectory(str(tmp_path), RunIdentity("run", "job"))
    assert not (tmp_path / "kedro-vertexai-temp").exists()
    store = directory.store("the step exchanges data")
    assert store is directory.store("again") and read_owner(store) == "run"
    with pytest.raises(ConfigError, match="the step exchanges data but no storage root is set"):
        JobDirectory(None, RunIdentity("run", "job")).store("the step exchanges data")
