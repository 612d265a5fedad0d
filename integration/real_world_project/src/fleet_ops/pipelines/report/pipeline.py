from kedro.pipeline import Node, Pipeline

from .nodes import build_report


def create_pipeline() -> Pipeline:
    return Pipeline([
        Node(build_report, ["candidate.metrics", "company_line_count"], "report", name="build_report"),
    ])
