"""Project pipelines."""

from kedro.pipeline import Pipeline

from spaceflights_kvx.pipelines import data_processing, data_science, reporting


def register_pipelines() -> dict[str, Pipeline]:
    processing = data_processing.create_pipeline()
    science = data_science.create_pipeline()
    report = reporting.create_pipeline()
    return {
        "__default__": processing + science + report,
        "data_processing": processing,
        "data_science": science,
        "reporting": report,
    }
