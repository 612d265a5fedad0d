"""Failure cases: an output that raises when pickled, and a catalog input that is missing."""

from kedro.pipeline import Node, Pipeline

from .nodes import describe, make_handle, use_handle


def create_pipeline() -> Pipeline:
    return Pipeline([
        Node(make_handle, "company_table@pandas", "live_handle", name="make_handle"),
        Node(use_handle, "live_handle", "handle_summary", name="use_handle"),
        Node(describe, "missing_input", "missing_summary", name="describe_missing"),
    ])
