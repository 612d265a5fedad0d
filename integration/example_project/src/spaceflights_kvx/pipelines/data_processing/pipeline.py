from kedro.pipeline import Node, Pipeline

from .nodes import create_model_input_table, preprocess_companies, preprocess_shuttles


def create_pipeline(**kwargs) -> Pipeline:
    nodes = [
        Node(preprocess_companies, "companies", "preprocessed_companies",
             name="preprocess_companies_node"),
        Node(preprocess_shuttles, "shuttles", "preprocessed_shuttles",
             name="preprocess_shuttles_node"),
        Node(create_model_input_table,
             ["preprocessed_shuttles", "preprocessed_companies", "reviews"],
             "model_input_table", name="create_model_input_table_node"),
    ]
    return Pipeline(
        nodes,
        namespace="data_processing",
        inputs={"companies", "shuttles", "reviews"},
        outputs={"model_input_table", "preprocessed_shuttles"},
    )
