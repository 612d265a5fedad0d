"""kedro-mlflow's rules that kvx-runtime applies without importing kedro-mlflow (importing it
imports MLflow): which catalog types are its datasets, the pipelines a session ran, and the tags
it gives a run of the whole pipeline. Used by the step's hooks (:mod:`kvx_runtime.step`) and by
a step that talks to MLflow over REST (:mod:`kvx_runtime.mlflow.lean`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["SESSION_KEYS", "STEP_SHARE", "is_kedro_mlflow_type", "pipeline_kedro_command", "pipeline_run_tags",
           "run_pipeline_names"]

#: The run parameters (``KedroSession.run``'s ``run_params``) that kedro-mlflow tags the run
#: with and that describe one step's share of the pipeline, not the pipeline: the nodes a step
#: runs, its Kedro session (``run_id``, Kedro 1.0's ``session_id``: the pipeline's run id
#: instead) and its runner (an object's repr, with its address).
STEP_SHARE = frozenset({"node_names", "from_nodes", "to_nodes", "from_inputs", "to_outputs", "tags", "namespaces",
                        "only_missing_outputs", "runner"})
SESSION_KEYS = ("run_id", "session_id")


def pipeline_run_tags(step_tags: Mapping[str, str], run_params: Mapping[str, Any], run_id: str) -> dict[str, str]:
    """The tags kedro-mlflow gives a run of the whole pipeline (``kedro run --pipeline=...``),
    from those it gave a step's run: without the step's share of the pipeline, the pipeline's
    run id for the session's, and the pipeline's ``kedro_command``."""
    tags = {key: value for key, value in step_tags.items() if key not in STEP_SHARE}
    for key in SESSION_KEYS:
        if key in tags:
            tags[key] = run_id
    if "kedro_command" in tags:
        tags["kedro_command"] = pipeline_kedro_command(run_params)
    return tags

def run_pipeline_names(run_params: Mapping[str, Any]) -> list[str]:
    """The pipelines a session ran: ``pipeline_names`` (Kedro >= 1.1), ``pipeline_name`` (a string,
    Kedro 1.0), else ``__default__``."""
    names = run_params.get("pipeline_names") or run_params.get("pipeline_name") or ["__default__"]
    return [names] if isinstance(names, str) else list(names)

def pipeline_kedro_command(run_params: Mapping[str, Any]) -> str:
    """``kedro run`` of the pipeline, in kedro-mlflow's ``kedro_command`` format."""
    command = ["kedro", "run", "--pipeline=" + ",".join(run_pipeline_names(run_params))]
    if run_params.get("load_versions"):
        command.append("--load-version=" + ",".join(f"{k}:{v}" for k, v in run_params["load_versions"].items()))
    return " ".join(command)


def is_kedro_mlflow_type(dataset_type: str) -> bool:
    """Does a catalog ``type`` name one of kedro-mlflow's datasets (``kedro_mlflow.io...``, or
    ``Mlflow*Dataset`` as its catalog entries are written)? Told from the name, never imported."""
    return dataset_type.startswith("kedro_mlflow.") or dataset_type.rsplit(".", 1)[-1].startswith("Mlflow")
