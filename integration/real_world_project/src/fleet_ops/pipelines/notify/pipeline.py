"""The exit pipeline (run_config.on_exit_pipeline): runs after the others, whatever happened."""

from kedro.pipeline import Node, Pipeline

from .nodes import notify


def create_pipeline() -> Pipeline:
    return Pipeline([Node(notify, ["params:kvx_final_status", "candidate.metrics"], "notice", name="notify")])
