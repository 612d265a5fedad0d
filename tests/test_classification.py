"""Whose fault: how exec-node classifies what came out of a Kedro run (docs/exec-node.md).

The end-to-end tests produce each case for real (integration/test_real_projects.py); a
transient storage error of a catalog dataset cannot be produced on the GCS emulator, so it
is built here from the exceptions gcsfs and Kedro really raise.
"""

from __future__ import annotations

from typing import Any

import pytest
from gcsfs.retry import HttpError
from kedro.io.core import DatasetError

from kvx_runtime.errors import CatalogDataError, ExitCode, InfrastructureError, NodeError
from kvx_runtime.graph import plan_step
from kvx_runtime.step.failures import catalog_error, classify
from kvx_runtime.step.hooks import StepHooks
from kvx_runtime.step.identity import JobDirectory, RunIdentity

# Kedro's dataset errors and hooks around its runner.
pytestmark = pytest.mark.kedro


def _wrapped(cause: BaseException, operation: str = "loading data from") -> DatasetError:
    """What Kedro raises: a DatasetError whose message hides the cause."""
    try:
        try:
            raise cause
        except Exception as exc:
            raise DatasetError(f"Failed while {operation} dataset CSVDataset(filepath=x.csv).") from exc
    except DatasetError as outer:
        return outer


def test_a_missing_file_is_input_data_with_its_path() -> None:
    error = catalog_error(_wrapped(FileNotFoundError(2, "No such file or directory", "data/in.csv")),
                           "load", "companies", "kvx-runtime exec-node ...")
    assert isinstance(error, CatalogDataError) and error.exit_code == ExitCode.USAGE
    assert error.message == ("catalog dataset 'companies' could not be loaded: FileNotFoundError: "
                             "[Errno 2] No such file or directory: 'data/in.csv'")


def test_a_refused_save_is_the_projects_problem() -> None:
    error = catalog_error(_wrapped(PermissionError(13, "Permission denied", "/data/out.csv"), "saving data to"),
                           "save", "report", "replay")
    assert isinstance(error, CatalogDataError) and "could not be saved: PermissionError" in error.message


@pytest.mark.parametrize("cause", [
    HttpError({"code": 503, "message": "Service Unavailable"}),
    HttpError({"code": 429, "message": "rate limited"}),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError("read timed out"),
])
def test_a_transient_storage_error_of_a_catalog_dataset_is_infrastructure(cause: BaseException) -> None:
    error = catalog_error(_wrapped(cause), "load", "companies", "replay")
    assert isinstance(error, InfrastructureError) and error.exit_code == ExitCode.INFRASTRUCTURE
    assert "(a transient storage error)" in error.message


def test_a_not_found_from_gcs_is_not_transient() -> None:
    error = catalog_error(_wrapped(HttpError({"code": 404, "message": "No such object: b/x.csv"})),
                           "load", "companies", "replay")
    assert isinstance(error, CatalogDataError) and "No such object: b/x.csv" in error.message


def test_the_pending_dataset_operation_decides_between_node_and_data() -> None:
    from kedro.pipeline import Node, Pipeline

    hooks = StepHooks(plan_step(Pipeline([Node(len, "a", "b", name="n")]), "__default__", ["n"]),
                      JobDirectory(None, RunIdentity("run", "job")))
    hooks.before_pipeline_run()
    hooks.before_dataset_loaded("a")
    error = classify(_wrapped(FileNotFoundError("a.csv")), hooks, "replay")
    assert isinstance(error, CatalogDataError)
    hooks.after_dataset_loaded()
    hooks.on_node_error(ValueError("bad value"), Node(len, "a", "b", name="n"))
    error = classify(ValueError("bad value"), hooks, "replay")
    assert isinstance(error, NodeError) and error.message == "node 'n' raised ValueError: bad value"


@pytest.mark.parametrize("attached", [True, False])
def test_an_attached_step_keeps_kedro_mlflow_from_reopening_the_run_per_node(attached: bool) -> None:
    """kedro-mlflow's after_context_created (registered before the step's hooks, as plugins
    are) makes ``context.mlflow``; the step's hook runs after it whatever the order."""
    pytest.importorskip("kedro_mlflow")
    from types import SimpleNamespace

    from kedro.framework.hooks import _create_hook_manager, hook_impl
    from kedro.pipeline import Node, Pipeline
    from kedro_mlflow.config.kedro_mlflow_config import KedroMlflowConfig

    class KedroMlflowLike:
        @hook_impl
        def after_context_created(self, context: Any) -> None:
            context.mlflow = KedroMlflowConfig()

    manager = _create_hook_manager()
    manager.register(KedroMlflowLike())
    hooks = StepHooks(plan_step(Pipeline([Node(len, "a", "b", name="n")]), "__default__", ["n"]),
                      JobDirectory(None, RunIdentity("run", "job")), tracking=object() if attached else None)
    manager.register(hooks)
    context = SimpleNamespace()
    manager.hook.after_context_created(context=context)
    assert context.mlflow.tracking.run.nested is (not attached)  # kedro-mlflow's default: nested
