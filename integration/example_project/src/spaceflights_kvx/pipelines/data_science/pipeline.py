from kedro.pipeline import Node, Pipeline

from .nodes import evaluate_model, fit_scaler, split_data, train_model


def create_pipeline(**kwargs) -> Pipeline:
    nodes = [
        # Several outputs from one node.
        Node(split_data, ["model_input_table", "params:model_options"],
             ["X_train", "X_test", "y_train", "y_test"], name="split_data_node"),
        # A closure and a numpy array cross to the next steps.
        Node(fit_scaler, ["X_train", "params:model_options"], ["scaler", "feature_means"],
             name="fit_scaler_node"),
        Node(train_model, ["X_train", "y_train", "scaler"], "regressor", name="train_model_node"),
        Node(evaluate_model, ["regressor", "scaler", "X_test", "y_test"], "metrics",
             name="evaluate_model_node"),
    ]
    return Pipeline(
        nodes,
        namespace="data_science",
        inputs={"model_input_table"},
        outputs={"regressor", "feature_means", "metrics"},
        parameters={"params:model_options": "params:data_science.model_options"},
    )
