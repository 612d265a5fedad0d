"""The pipeline plan (target-neutral, markers for the orchestrator's values), the code upload as
a phase of its own, and the KFP renderer's reading of the plan. Whole specs are compared with
golden ones in integration/test_golden_specs.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kedro.pipeline import Node, Pipeline

from kvx_runtime.compiler.kfp_render import render_kfp
from kvx_runtime.compiler.plan import ParameterRef, StepKind, Symbol, fill, references
from kvx_runtime.compiler.planner import CompileRequest, ProjectFacts, ResumedRun, plan_pipeline
from kvx_runtime.compiler.upload import upload_code
from kvx_runtime.config import parse_plugin_config
from kvx_runtime.grouping import IdentityNodeGrouper
from kvx_runtime.step.invocation import ExecNodeInvocation


def f(*args: Any) -> Any:
    return args[0] if args else 1


PIPELINE = Pipeline([
    Node(f, None, "raw", name="make"),
    Node(f, ["raw", "params:model.alpha"], "model", name="train"),
    Node(f, "raw", "summary", name="summarize"),
])


def facts(*, mlflow: bool = True, exit_nodes: tuple[str, ...] = ("notify",), **run_config: Any) -> ProjectFacts:
    run = parse_plugin_config({"run_config": {"image": "img", "root": "gs://b/p",
                                              "on_exit_pipeline": "notify" if exit_nodes else None,
                                              **run_config}}).run_config
    return ProjectFacts(
        project_path=Path("/project"), package_name="demo", conf_root=Path("/project/conf"), env="base",
        run=run, image="img", storage_root="gs://b/p", pipeline=PIPELINE,
        kedro_params={"model": {"alpha": 0.5}}, grouper=IdentityNodeGrouper(), dataset_paths={},
        exit_nodes=exit_nodes, mlflow=mlflow, forwarded_env={"KEDRO_CONFIG_COMMIT_ID": "abc"},
        envs_not_in_image=(),
    )


def test_markers_are_read_back_and_an_unknown_one_is_refused() -> None:
    text = f"model.alpha:float={ParameterRef('model__alpha').marker} at {Symbol.RUN_ID.marker}"
    assert references(text) == [ParameterRef("model__alpha"), Symbol.RUN_ID]
    assert fill(text, lambda reference: reference.name if isinstance(reference, ParameterRef) else "R") == \
        "model.alpha:float=model__alpha at R"
    with pytest.raises(ValueError, match="unknown marker '<kvx:no_such_value>'"):
        references("<kvx:no_such_value>")


def test_the_plan_holds_steps_and_markers_and_nothing_of_kfp() -> None:
    plan = plan_pipeline(CompileRequest(params=["model.alpha:float"], values={"model.alpha": "0.75"}), facts())
    assert [(step.name, step.kind) for step in plan.steps] == [
        ("mlflow-start-run", StepKind.MLFLOW_START), ("make", StepKind.NODES), ("summarize", StepKind.NODES),
        ("train", StepKind.NODES)]
    assert [step.kind for step in plan.exit_steps] == [StepKind.MLFLOW_END, StepKind.ON_EXIT]
    assert list(plan.nodes_of_step.items()) == [("make", ("make",)), ("summarize", ("summarize",)),
                                                ("train", ("train",))]
    assert dict(plan.values) == {"model__alpha": 0.75}
    train = plan.steps[3]
    assert set(train.after) == {"make", "mlflow-start-run"}
    assert train.invocation == ExecNodeInvocation(
        nodes=("train",), env="base", run_id="<kvx:run_id>", job_name="<kvx:job_name>",
        storage_root="<kvx:storage_root>", save_version="<kvx:save_version>",
        job_create_time="<kvx:job_create_time>", mlflow_run_id="<kvx:mlflow_run_id>",
        params=("model.alpha:float=<kvx:param:model__alpha>",))
    on_exit = plan.exit_steps[1]
    assert on_exit.nodes == ("notify",) and on_exit.invocation is not None
    assert on_exit.invocation.pipeline == "notify" and on_exit.invocation.mlflow_run_id is None
    assert on_exit.invocation.params[-1] == "kvx_final_status:dict=<kvx:final_status>"
    every_arg = [arg for step in (*plan.steps, *plan.exit_steps) for arg in step.args()]
    assert not any("{{" in arg or "$." in arg for arg in every_arg)
    assert plan.steps[0].args() == ["--env", "base", "--run-id", "<kvx:run_id>", "--job-name", "<kvx:job_name>",
                                    "--output", "<kvx:mlflow_run_id_output>"]


def test_served_steps_are_one_cache_serve_step_that_the_steps_downstream_wait_for() -> None:
    plan = plan_pipeline(CompileRequest(cache="on", served_steps=frozenset({"make", "summarize"})),
                         facts(resources={"__default__": {"cpu": "1", "memory": "1Gi"},
                                          "summarize": {"memory": "8Gi"}, "train": {"cpu": "8"}}))
    assert [step.name for step in plan.steps] == ["mlflow-start-run", "cache-serve", "train"]
    serve, train = plan.steps[1], plan.steps[2]
    assert serve.invocation is not None and serve.invocation.nodes == ("make", "summarize")
    assert serve.invocation.serve_steps == ('["make"]', '["summarize"]') and serve.invocation.cache == "on"
    assert serve.after == ("mlflow-start-run",)
    # It runs any step it can no longer serve: the largest resources of the steps it serves.
    assert serve.resources is not None and (serve.resources.cpu, serve.resources.memory) == ("1", "8Gi")
    assert set(train.after) == {"cache-serve", "mlflow-start-run"}
    assert train.invocation is not None and train.invocation.cache == "on"
    # A hit whose upstream step runs is not served: it would wait for that step.
    plan = plan_pipeline(CompileRequest(served_steps=frozenset({"train", "summarize"})), facts())
    assert [step.name for step in plan.steps] == ["mlflow-start-run", "make", "summarize", "train"]


def test_a_resumed_run_is_the_same_run_and_leaves_out_what_it_finished() -> None:
    resume = ResumedRun(run_id="uuid-1", job_name="job-1", storage_root="gs://b/p", save_version="",
                        job_create_time="2026-12-01T00:00:00.000000Z", done_steps=frozenset({"make"}))
    plan = plan_pipeline(CompileRequest(resume=resume), facts())
    assert [step.name for step in plan.steps] == ["mlflow-start-run", "summarize", "train"]
    assert plan.finished_nodes == ("make",)
    assert plan.steps[0].args()[:6] == ["--env", "base", "--run-id", "uuid-1", "--job-name", "job-1"]
    train = plan.steps[2]
    assert train.after == ("mlflow-start-run",)  # make finished: nothing to wait for
    assert train.invocation is not None
    assert (train.invocation.run_id, train.invocation.job_name, train.invocation.storage_root,
            train.invocation.save_version, train.invocation.job_create_time) == \
        ("uuid-1", "job-1", "gs://b/p", "", "2026-12-01T00:00:00.000000Z")
    assert plan.exit_steps[0].args()[:6] == ["--env", "base", "--run-id", "uuid-1", "--job-name", "job-1"]
    render_kfp(plan, None)  # literal values render as they are


def test_a_resumed_plan_names_the_blobs_it_reads_from_finished_steps_and_only_the_steps_it_leaves_out() -> None:
    """A writes x (transcoded) and y, B reads x, C reads y and B's b, the exit step reads x."""
    pipeline = Pipeline([Node(f, None, ["x@pandas", "y"], name="A"), Node(f, "x@spark", "b", name="B"),
                         Node(f, ["y", "b"], "c", name="C")])
    exit_pipeline = Pipeline([Node(f, "x@pandas", None, name="notify")])
    planned = ProjectFacts(**{**facts().__dict__, "pipeline": pipeline, "exit_pipeline": exit_pipeline,
                              "blob_outputs": frozenset({"x", "y", "b", "c"})})

    def resumed(*done: str) -> Any:
        return plan_pipeline(CompileRequest(resume=ResumedRun(
            run_id="u", job_name="j", storage_root="gs://b/p", save_version="", job_create_time="",
            done_steps=frozenset(done))), planned)

    plan = resumed("A", "B")
    # C reads y (A's) and b (B's); the on-exit step, which always runs, reads x (A's).
    assert dict(plan.kept_blobs) == {"x": "A", "y": "A", "b": "B"}
    assert plan.finished_steps == ("A", "B")
    # Without A (its y is gone), B runs again too: only what is left out is finished.
    plan = resumed("B")
    assert [step.name for step in plan.steps if step.name != "mlflow-start-run"] == ["a", "b", "c"]
    assert plan.finished_steps == () and dict(plan.kept_blobs) == {}


def test_kfp_renders_each_marker_as_the_input_or_output_it_names() -> None:
    plan = plan_pipeline(CompileRequest(params=["model.alpha:float"]), facts())
    spec = render_kfp(plan).spec
    executors = spec["deploymentSpec"]["executors"]
    train = ExecNodeInvocation.parse(executors["exec-train"]["container"]["args"])
    assert train.run_id == "{{$.inputs.parameters['kvx_job_uuid']}}"
    assert train.mlflow_run_id == "{{$.inputs.parameters['mlflow_run_id']}}"
    assert train.params == ("model.alpha:float={{$.inputs.parameters['model__alpha']}}",)
    inner = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert list(inner) == ["mlflow-start-run", "make", "summarize", "train"]
    assert inner["train"]["inputs"]["parameters"]["mlflow_run_id"] == {"taskOutputParameter": {
        "outputParameterKey": "mlflow_run_id", "producerTask": "mlflow-start-run"}}
    assert set(spec["components"]["comp-train"]["inputDefinitions"]["parameters"]) == {
        "kvx_job_uuid", "kvx_job_name", "kvx_job_create_time", "kvx_storage_root", "kvx_save_version",
        "mlflow_run_id", "model__alpha"}
    assert spec["components"]["comp-mlflow-start-run"]["outputDefinitions"] == {
        "parameters": {"mlflow_run_id": {"parameterType": "STRING"}}}
    assert "{{$.outputs.parameters['mlflow_run_id'].output_file}}" in \
        executors["exec-mlflow-start-run"]["container"]["args"]
    end = spec["root"]["dag"]["tasks"]["mlflow-end-run"]
    assert end["dependentTasks"] == ["exit-handler-1"]
    assert end["inputs"]["parameters"]["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}


def test_the_code_upload_is_a_phase_between_plan_and_render(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvx_runtime import code_upload

    plan = plan_pipeline(CompileRequest(code_upload=True), facts())
    assert plan.code_upload is not None and plan.code_upload.package_name == "demo"
    with pytest.raises(ValueError, match="not uploaded yet"):
        render_kfp(plan)
    archive = SimpleNamespace(digest="d" * 64, files=("a",), data=b"x")
    monkeypatch.setattr(code_upload, "build_archive", lambda project, package, conf: archive)
    monkeypatch.setattr(code_upload, "upload_archive", lambda built, root: f"{root}/kvx-code/a.tar.gz#sha256=d")
    uploaded = upload_code(plan)
    assert uploaded.code_upload is None
    codes = {step.name: step.invocation.code if step.invocation else None
             for step in (*uploaded.steps, *uploaded.exit_steps)}
    assert codes == {"mlflow-start-run": None, "make": "gs://b/p/kvx-code/a.tar.gz#sha256=d",
                     "train": "gs://b/p/kvx-code/a.tar.gz#sha256=d", "summarize": "gs://b/p/kvx-code/a.tar.gz#sha256=d",
                     "mlflow-end-run": None, "on-exit": "gs://b/p/kvx-code/a.tar.gz#sha256=d"}
    assert upload_code(plan_pipeline(CompileRequest(), facts())).code_upload is None  # nothing asked: unchanged
    render_kfp(uploaded)


def test_a_request_for_one_env_with_a_project_opened_in_another_is_refused() -> None:
    from kvx_runtime.compiler.loading import load_project_facts

    opened = SimpleNamespace(env="local")  # what open_project gave for another env
    with pytest.raises(ValueError, match="env 'cloud' with a project opened in 'local'"):
        load_project_facts(CompileRequest(env="cloud", project=opened))  # type: ignore[arg-type]


def test_the_exit_pipelines_step_gets_its_nodes_resources_selectors_and_retries() -> None:
    exit_pipeline = Pipeline([Node(f, "summary", "sent", name="notify", tags=["slow"])])
    planned = facts(resources={"__default__": {"cpu": "500m", "memory": "1Gi"}, "slow": {"memory": "4Gi"}},
                    node_selectors={"notify": {"pool": "cheap"}},
                    retries={"__default__": {"max_retry_count": 2, "backoff_duration": "10s"}})
    planned = ProjectFacts(**{**planned.__dict__, "exit_pipeline": exit_pipeline})
    on_exit = plan_pipeline(CompileRequest(), planned).exit_steps[1]
    assert on_exit.kind == StepKind.ON_EXIT and on_exit.resources is not None
    assert (on_exit.resources.cpu, on_exit.resources.memory) == ("500m", "4Gi")
    assert on_exit.resources.node_labels == (("pool", "cheap"),)
    assert on_exit.retry is not None and on_exit.retry.max_retry_count == 2


def test_kubeflow_pods_get_every_node_label_and_vertex_ai_is_told_it_has_none() -> None:
    planned = facts(node_selectors={"make": {"pool": "highmem"},
                                    "train": {"pool": "gpu", "cloud.google.com/gke-accelerator": "NVIDIA_TESLA_T4"}})
    kfp = render_kfp(plan_pipeline(CompileRequest(), planned), "nvidia.com/gpu")
    assert kfp.platform_spec is not None
    executors = kfp.platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-make"]["nodeSelector"] == {"labels": {"pool": "highmem"}}
    gpu_labels = {"pool": "gpu", "cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}
    assert executors["exec-train"]["nodeSelector"] == {"labels": gpu_labels}
    vertex = plan_pipeline(CompileRequest(), planned)
    assert "node labels of make not applied on Vertex AI" in vertex.warnings
    assert "node labels of train not applied on Vertex AI" in vertex.warnings
    assert render_kfp(vertex).platform_spec is None
