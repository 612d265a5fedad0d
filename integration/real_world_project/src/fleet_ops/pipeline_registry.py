"""Pipelines found by find_pipelines(); the default pipeline is the main four.

Kedro >= 1.x may load only the pipelines a run asks for (the exit pipeline's step asks for
``notify`` alone), so nothing here assumes that every pipeline was found.
"""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

MAIN = ("ingest", "features", "train", "report")


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum((pipelines[name] for name in MAIN if name in pipelines), Pipeline([]))
    return pipelines
