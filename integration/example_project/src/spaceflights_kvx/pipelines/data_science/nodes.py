"""Splitting, scaling, training and evaluating the price model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LinearRegression
from sklearn.metrics import max_error, mean_absolute_error, r2_score
from sklearn.model_selection import train_test_split


def split_data(
    data: pd.DataFrame, options: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series, pd.Series]:
    features = data[options["features"]].astype(float)
    target = data["price"]
    x_train, x_test, y_train, y_test = train_test_split(
        features, target, test_size=options["test_size"], random_state=options["random_state"]
    )
    return x_train, x_test, y_train, y_test


def fit_scaler(
    x_train: pd.DataFrame, options: dict[str, Any]
) -> tuple[Callable[[pd.DataFrame], pd.DataFrame], np.ndarray]:
    """Return a closure that scales features with the training statistics, and the means."""
    means = x_train.mean().to_numpy()
    stds = x_train.std(ddof=0).replace(0, 1).to_numpy()
    clip = float(options["scaler"]["clip"])
    columns = list(x_train.columns)

    def scale(frame: pd.DataFrame) -> pd.DataFrame:
        scaled = (frame[columns].to_numpy() - means) / stds
        return pd.DataFrame(np.clip(scaled, -clip, clip), columns=columns, index=frame.index)

    return scale, means


def train_model(
    x_train: pd.DataFrame, y_train: pd.Series, scale: Callable[[pd.DataFrame], pd.DataFrame]
) -> LinearRegression:
    regressor = LinearRegression()
    regressor.fit(scale(x_train), y_train)
    return regressor


def evaluate_model(
    regressor: LinearRegression,
    scale: Callable[[pd.DataFrame], pd.DataFrame],
    x_test: pd.DataFrame,
    y_test: pd.Series,
) -> dict[str, dict[str, float]]:
    """Metrics in kedro-mlflow's format ({name: {value, step}}), so that the ``local``
    environment can log them to MLflow while ``base`` writes them as JSON."""
    predicted = regressor.predict(scale(x_test))
    values = {
        "r2_score": round(float(r2_score(y_test, predicted)), 10),
        "mae": round(float(mean_absolute_error(y_test, predicted)), 6),
        "max_error": round(float(max_error(y_test, predicted)), 6),
        "test_rows": float(len(y_test)),
    }
    return {name: {"value": value, "step": 0} for name, value in values.items()}
