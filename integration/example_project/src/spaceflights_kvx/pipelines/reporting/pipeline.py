from kedro.pipeline import Node, Pipeline

from .nodes import build_report, feature_importance, summarize_shuttles


def create_pipeline(**kwargs) -> Pipeline:
    nodes = [
        Node(summarize_shuttles, "preprocessed_shuttles", "shuttle_summary_table",
             name="summarize_shuttles_node"),
        Node(feature_importance, ["regressor", "feature_means"],
             ["importance", "importance_table"], name="feature_importance_node"),
        Node(build_report,
             ["metrics", "importance_table", "shuttle_summary_table",
              "params:top_n", "params:title"],
             "report", name="build_report_node"),
    ]
    return Pipeline(
        nodes,
        namespace="reporting",
        inputs={"preprocessed_shuttles", "regressor", "feature_means",
                "metrics"},
        parameters={"params:top_n": "params:reporting.top_n",
                    "params:title": "params:reporting.title"},
    )
