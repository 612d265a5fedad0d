"""Tables and a small markdown report about the model and the fleet."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LinearRegression


def summarize_shuttles(shuttles: pd.DataFrame) -> pd.DataFrame:
    summary = (
        shuttles.groupby("shuttle_type")
        .agg(shuttles=("price", "size"), mean_price=("price", "mean"))
        .reset_index()
    )
    summary["mean_price"] = summary["mean_price"].round(4)
    return summary


def feature_importance(
    regressor: LinearRegression, feature_means: np.ndarray
) -> tuple[np.ndarray, pd.DataFrame]:
    importance = np.abs(regressor.coef_)
    table = pd.DataFrame(
        {
            "feature": list(regressor.feature_names_in_),
            "importance": importance.round(6),
            "training_mean": np.round(feature_means, 6),
        }
    ).sort_values("importance", ascending=False, kind="stable")
    return importance, table.reset_index(drop=True)


def build_report(
    metrics: dict[str, dict[str, float]],
    importance_table: pd.DataFrame,
    shuttle_summary: pd.DataFrame,
    top_n: int,
    title: str,
) -> str:
    lines = [f"# {title}", "", "## Metrics", ""]
    lines += [f"- {name}: {metric['value']}" for name, metric in sorted(metrics.items())]
    lines += ["", f"## Top {top_n} features", ""]
    lines += [
        f"- {row.feature}: {row.importance}" for row in importance_table.head(top_n).itertuples()
    ]
    lines += ["", "## Fleet", "", f"{len(shuttle_summary)} shuttle types", ""]
    return "\n".join(lines)
