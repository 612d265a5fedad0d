"""Whose fault a failed step is: what came out of Kedro's session, classified into the exit
codes of the step contract (the table in docs/exec-node.md)."""

from __future__ import annotations

import re

from kvx_runtime.errors import (
    CatalogDataError,
    ConfigError,
    InfrastructureError,
    KvxError,
    NodeError,
    exception_chain,
    find_kvx_error,
)
from kvx_runtime.step.hooks import StepHooks, is_kedro_mlflow_type, type_name

__all__ = ["catalog_error", "classify", "first_line"]

_UNREACHABLE = re.compile(
    r"Max retries exceeded|Connection refused|Connection aborted|Connection reset|RemoteDisconnected|"
    r"Failed to establish a new connection|Read timed out|NameResolutionError"
)
_UNAUTHENTICATED = re.compile(r"\b401\b|UNAUTHENTICATED|Unauthorized", re.IGNORECASE)
# MLflow says "Param with key='lr' was already logged" (one param) or lists dicts with 'key': ... (batches).
_PARAM_KEYS = re.compile(r"key='([^']+)'|'key': '([^']+)'")


def classify(exc: Exception, hooks: StepHooks, replay: str) -> KvxError:
    """Classify what came out of Kedro: our own error, a setup problem, a catalog dataset
    that could not be read or written, or the user's node."""
    ours = find_kvx_error(exc)
    if ours is not None:
        return ours
    mlflow = _mlflow_failure(exc, hooks, replay)
    if mlflow is not None:
        return mlflow
    if not hooks.pipeline_started:
        # Kedro failed while building the context or catalog: the project's config.
        return ConfigError(
            f"the Kedro project could not be set up for this step: "
            f"{type(exc).__name__}: {first_line(exc)}"
        )
    if hooks.failed_node is not None:
        return NodeError(
            f"node '{hooks.failed_node}' raised {type(hooks.node_error).__name__}: "
            f"{first_line(hooks.node_error)}",
            hint=f"replay: {replay}",
        )
    if hooks.dataset_operation is not None:
        return catalog_error(exc, *hooks.dataset_operation, replay)
    return NodeError(
        f"the step failed: {type(exc).__name__}: {first_line(exc)}", hint=f"replay: {replay}"
    )


def _mlflow_failure(exc: Exception, hooks: StepHooks, replay: str) -> KvxError | None:
    """MLflow's part of a failure: the tracking server lost mid-step (exit 3, whoever called
    MLflow: kedro-mlflow's hooks, its datasets, the node), or a parameter logged again with
    another value (exit 2: MLflow keeps one value per run)."""
    chain = exception_chain(exc)
    operation = hooks.dataset_operation
    mlflow_dataset = (operation is not None and hooks.catalog is not None
                      and is_kedro_mlflow_type(type_name(hooks.catalog, operation[1])))
    # MLflow's own errors, or those of kvx-runtime's REST client for it (kvx_runtime.mlflow.rest_client).
    if not mlflow_dataset and not any(type(item).__module__.startswith(("mlflow", "kvx_runtime.mlflow"))
                                      for item in chain):
        return None
    text = " ".join(str(item) for item in chain)
    if "Changing param values is not allowed" in text:
        keys = sorted({one or other for one, other in _PARAM_KEYS.findall(text)})
        return ConfigError(
            f"parameter{'s' if len(keys) != 1 else ''} {', '.join(keys) or '(unknown)'} already logged with "
            "another value in this pipeline's MLflow run: every step of one run must use the same "
            "parameter values",
            hint="a run with other values needs its own job (another --job-name, a new pipeline run)",
        )
    from kvx_runtime.auth import unauthenticated_because
    from kvx_runtime.mlflow.rest_client import MlflowRestError
    from kvx_runtime.storage.store import is_transient

    if _UNAUTHENTICATED.search(text):
        explained = unauthenticated_because("an MLflow request of the step was refused (401)")
        if explained is not None:
            return explained
    refused = next((item for item in chain if isinstance(item, MlflowRestError) and item.status is not None
                    and 400 <= item.status < 500), None)
    if refused is not None:  # the tracking server said no to a write: its configuration, not the node
        return ConfigError(f"the MLflow tracking server refused the step's request: {first_line(refused)[:300]}",
                           hint=f"check the tracking URI, its auth and permissions; replay: {replay}")
    if any(isinstance(item, MlflowRestError) for item in chain) or any(is_transient(item) for item in chain) \
            or _UNREACHABLE.search(text):
        root = chain[-1]
        return InfrastructureError(
            f"MLflow became unreachable during the step: {type(root).__name__}: {first_line(root)[:300]}",
            hint=f"worth a retry: {replay}",
        )
    return None


def catalog_error(exc: Exception, operation: str, dataset: str, replay: str) -> KvxError:
    """A catalog dataset failed to load or save: keep the innermost cause (the path, the
    permission), which Kedro's own wrapping message does not show."""
    from kvx_runtime.storage.store import is_transient

    chain = exception_chain(exc)
    root = chain[-1]
    verb = "loaded" if operation == "load" else "saved"
    message = f"catalog dataset '{dataset}' could not be {verb}: {type(root).__name__}: {first_line(root)}"
    if any(is_transient(item) for item in chain):
        return InfrastructureError(message + " (a transient storage error)", hint=f"worth a retry: {replay}")
    fix = ("check that the file exists where the catalog says and that this step may read it"
           if operation == "load" else "check the catalog entry's path and that this step may write there")
    return CatalogDataError(message, hint=f"{fix}; replay: {replay}")


def first_line(exc: BaseException | None) -> str:
    text = str(exc or "").strip()
    return text.splitlines()[0] if text else "(no message)"
