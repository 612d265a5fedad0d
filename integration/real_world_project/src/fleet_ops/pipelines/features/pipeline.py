"""Features (an undeclared intermediate) and a versioned scaler."""

from kedro.pipeline import Node, Pipeline

from .nodes import build_features, fit_scaler


def create_pipeline() -> Pipeline:
    return Pipeline([
        Node(build_features, ["company_table@pandas", "params:features"], "features", name="build_features"),
        Node(fit_scaler, "features", "scaler", name="fit_scaler"),
    ])
