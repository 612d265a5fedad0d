"""A namespaced model: candidate.model (versioned, from a dataset factory) and its metrics,
evaluated from the versioned scaler and model that two other steps wrote."""

from kedro.pipeline import Node, Pipeline

from .nodes import evaluate_model, train_model


def create_pipeline() -> Pipeline:
    return Pipeline(
        [
            Node(train_model, ["features", "scaler", "params:alpha"], "model", name="train_model"),
            Node(evaluate_model, ["features", "scaler", "model"], "metrics", name="evaluate_model"),
        ],
        namespace="candidate",
        inputs={"features", "scaler"},
        parameters={"params:alpha"},
    )
