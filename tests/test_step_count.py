"""compile and run-local say how many steps a spec runs in the same words."""

from __future__ import annotations

from kvx_runtime.compiler.kfp_reader import describe_steps, step_names
from kvx_runtime.compiler.plan import MLFLOW_END_STEP, MLFLOW_START_STEP


def test_node_and_mlflow_steps_are_counted_apart() -> None:
    assert describe_steps(["a", "b", MLFLOW_START_STEP, MLFLOW_END_STEP]) == "2 node steps + 2 MLflow steps"
    assert describe_steps(["a"]) == "1 node steps"


def test_step_names_include_the_exit_handlers_tasks() -> None:
    spec = {
        "components": {"comp-exit-handler-1": {"dag": {"tasks": {"train": {"componentRef": {"name": "comp-train"}}}}},
                       "comp-train": {"executorLabel": "exec-train"},
                       "comp-mlflow-start-run": {"executorLabel": "exec-mlflow-start-run"},
                       "comp-mlflow-end-run": {"executorLabel": "exec-mlflow-end-run"}},
        "root": {"dag": {"tasks": {
            MLFLOW_START_STEP: {"componentRef": {"name": "comp-mlflow-start-run"}},
            "exit-handler-1": {"componentRef": {"name": "comp-exit-handler-1"}},
            MLFLOW_END_STEP: {"componentRef": {"name": "comp-mlflow-end-run"}},
        }}},
    }
    assert sorted(step_names(spec)) == sorted([MLFLOW_START_STEP, "train", MLFLOW_END_STEP])
    assert describe_steps(step_names(spec)) == "1 node steps + 2 MLflow steps"
