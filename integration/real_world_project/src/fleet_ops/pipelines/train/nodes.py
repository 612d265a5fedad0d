import numpy as np


def _scaled(features: dict, scaler: dict) -> np.ndarray:
    return (features["x"] - scaler["mean"]) / scaler["std"]


def train_model(features: dict, scaler: dict, alpha: float) -> dict:
    x = _scaled(features, scaler)
    y = features["y"]
    design = np.hstack([np.ones((len(x), 1)), x])
    ridge = alpha * np.eye(design.shape[1])
    ridge[0, 0] = 0.0
    weights = np.linalg.solve(design.T @ design + ridge, design.T @ y)
    return {"weights": weights, "alpha": alpha, "names": features["names"]}


def evaluate_model(features: dict, scaler: dict, model: dict) -> dict:
    x = _scaled(features, scaler)
    predictions = np.hstack([np.ones((len(x), 1)), x]) @ model["weights"]
    errors = predictions - features["y"]
    return {"mae": round(float(np.abs(errors).mean()), 6), "rows": len(errors), "alpha": model["alpha"]}
