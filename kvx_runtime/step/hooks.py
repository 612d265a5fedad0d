"""The Kedro hooks a step registers on its session: intermediates injected into the catalog
as blobs, node logging and MLflow tags, and what was under way when something failed (which
:mod:`kvx_runtime.step.failures` reads to say whose fault it was)."""

from __future__ import annotations

import time
from typing import Any

from kvx_runtime import collector
from kvx_runtime.errors import find_kvx_error
from kvx_runtime.graph import StepPlan, dataset_identity
from kvx_runtime.log import NODE_FINISHED, bind_step_context, get_logger
from kvx_runtime.mlflow.kedro_mlflow_rules import is_kedro_mlflow_type
from kvx_runtime.step.identity import JobDirectory

__all__ = [
    "StepHooks", "dataset_config", "declared_type", "is_declared", "is_kedro_mlflow_type", "type_name",
]

log = get_logger(__name__)

_HOOKS = (
    "after_catalog_created",
    "before_pipeline_run",
    "after_node_run",
    "on_node_error",
    "before_dataset_loaded",
    "after_dataset_loaded",
    "before_dataset_saved",
    "after_dataset_saved",
)


def declared_type(catalog: Any, name: str) -> str | None:
    """The type the catalog gives ``name`` (``pandas.CSVDataset``, ``kedro_datasets.pandas.CSVDataset``,
    ``MemoryDataset``...), or None when no entry or pattern gives it one. Only the last dotted
    part is comparable.

    Read from the dataset's configuration while the catalog has not built it: Kedro's
    ``get_type`` imports the dataset's package to name the class, and ``kedro_datasets.pandas``
    imports every pandas dataset (SQLAlchemy, Excel and BigQuery support included), which a
    step reading only parameters or blobs would never pay for otherwise.
    """
    config = dataset_config(catalog, name)
    configured = config.get("type") if config is not None else None
    if isinstance(configured, str):
        return configured
    return catalog.get_type(name)


def dataset_config(catalog: Any, name: str) -> dict[str, Any] | None:
    """The configuration the catalog would build ``name`` from (its entry, or the pattern it
    matches, resolved as the catalog resolves it: credentials and absolute paths included);
    None once the catalog has built it, or when nothing configures it."""
    lazy = getattr(catalog, "_lazy_datasets", None)
    config: Any = None
    if isinstance(lazy, dict) and name in lazy:
        config = getattr(lazy[name], "config", None)
    elif name not in getattr(catalog, "_datasets", {}) and name in catalog:
        resolver = getattr(catalog, "config_resolver", None)
        config = resolver.resolve_pattern(name) if resolver is not None else None
    return config if isinstance(config, dict) else None


def type_name(catalog: Any, name: str) -> str:
    """The class name of ``name``'s dataset type ("" when the catalog gives it none)."""
    return str(declared_type(catalog, name) or "").rsplit(".", 1)[-1]


def is_declared(catalog: Any, name: str) -> bool:
    """Does the catalog keep ``name`` somewhere that survives the step?

    Explicit entries and dataset factory patterns count; a (Shared)MemoryDataset does not,
    since memory does not cross containers; Kedro's default runtime pattern does not either.
    """
    found = type_name(catalog, name)
    return bool(found) and not found.endswith("MemoryDataset")


class StepHooks:
    """Kedro hooks registered on the step's session: blob injection and node logging."""

    def __init__(
        self,
        plan: StepPlan,
        job_directory: JobDirectory,
        tracking: Any = None,
        save_version: str | None = None,
    ) -> None:
        self.plan = plan
        self.tracking = tracking
        self.job_directory = job_directory
        self.save_version = save_version
        self.stored: list[str] = []
        self.loaded: list[str] = []
        self.pipeline_started = False
        self.failed_node: str | None = None
        self.node_error: BaseException | None = None
        #: The node between its before_node_run and after_node_run, if any.
        self.running_node: str | None = None
        #: The catalog operation under way: ("load" | "save", dataset name), else None.
        self.dataset_operation: tuple[str, str] | None = None
        self.catalog: Any = None
        self._started: dict[str, float] = {}
        self._kedro_mlflow_run_config: Any = None
        from kedro.framework.hooks import hook_impl

        # pluggy discovers hook implementations through this marker.
        for name in _HOOKS:
            hook_impl(getattr(self, name).__func__)
        hook_impl(trylast=True)(StepHooks.after_context_created)  # after kedro-mlflow's
        hook_impl(tryfirst=True)(StepHooks.before_node_run)  # before kedro-mlflow's

    def after_context_created(self, context: Any) -> None:
        """The step's thread has the pipeline's MLflow run active (attached) before any hook
        runs: kedro-mlflow's per-node reopening of it (for threaded runners, whose threads do
        not have it), nested by default, costs three requests per node; not nested, it finds
        the run active and does nothing. :meth:`before_node_run` nests it again for a node
        that follows one that left a run of its own open, as kedro-mlflow would."""
        mlflow_config = getattr(context, "mlflow", None) if self.tracking is not None else None
        run_config = getattr(getattr(mlflow_config, "tracking", None), "run", None)
        if run_config is not None and getattr(run_config, "nested", False):
            run_config.nested = False
            self._kedro_mlflow_run_config = run_config

    def before_dataset_loaded(self, dataset_name: str) -> None:
        self.dataset_operation = ("load", dataset_name)

    def after_dataset_loaded(self) -> None:
        self.dataset_operation = None

    def before_dataset_saved(self, dataset_name: str) -> None:
        self.dataset_operation = ("save", dataset_name)
        if self.save_version and self.catalog is not None:
            from kvx_runtime.versions import remove_earlier_attempt

            remove_earlier_attempt(self.catalog.get(dataset_name), dataset_name, self.save_version)

    def after_dataset_saved(self) -> None:
        self.dataset_operation = None

    def _store(self) -> Any:
        exchanged = ", ".join(self.plan.inputs + self.plan.crossing_outputs)
        return self.job_directory.store(f"this step exchanges intermediate data ({exchanged})")

    def _blob(self, name: str, store: Any) -> Any:
        from kvx_runtime.storage.dataset import BlobDataset

        # One blob per dataset: `x@spark` saved and `x@pandas` loaded are both the blob `x`.
        identity = dataset_identity(name)
        return BlobDataset(identity, store, producer=self.plan.producers.get(identity))

    def _mute_mlflow_datasets(self, catalog: Any) -> None:
        """Untracked step (MLflow unreachable with ``required: false``, or not configured):
        kedro-mlflow's datasets still save their local files but log nothing (kedro-mlflow's
        own switch), instead of failing for want of a run."""
        import importlib.util

        if importlib.util.find_spec("kedro_mlflow") is None:
            return
        names = [name for name in catalog.keys()  # noqa: SIM118 (a catalog, not a dict)
                 if is_kedro_mlflow_type(type_name(catalog, name))]
        if not names:
            return
        from kedro_mlflow.io.catalog.switch_catalog_logging import switch_catalog_logging

        switch_catalog_logging(catalog, False)
        log.warning("this step is not tracked: kedro-mlflow datasets log nothing to MLflow", datasets=names)

    def after_catalog_created(self, catalog: Any) -> None:
        self.catalog = catalog
        if self.tracking is None:
            self._mute_mlflow_datasets(catalog)
        store = None
        for name in self.plan.inputs:
            if is_declared(catalog, name):
                continue
            store = store or self._store()
            catalog[name] = self._blob(name, store)
            self.loaded.append(name)
        for name in self.plan.crossing_outputs:
            if is_declared(catalog, name):
                continue
            store = store or self._store()
            dataset: Any = self._blob(name, store)
            if name in self.plan.shared_outputs:
                from kedro.io import CachedDataset

                dataset = CachedDataset(dataset=dataset)
            catalog[name] = dataset
            self.stored.append(name)
        dropped = [name for name in self.plan.final_outputs if not is_declared(catalog, name)]
        if dropped:
            log.warning(
                "outputs that no node consumes and the catalog does not define are not stored",
                datasets=dropped,
                hint="declare them in catalog.yml to keep them",
            )
        log.info(
            "step plan",
            blob_inputs=self.loaded,
            blob_outputs=self.stored,
            storage_root=self.job_directory.root if (self.loaded or self.stored) else None,
        )

    def before_pipeline_run(self) -> None:
        self.pipeline_started = True
        # Before the runner loads the first node's inputs: they and the node's own objects meet
        # the collector as under kedro run, and are never frozen.
        collector.start_up_done()

    def before_node_run(self, node: Any) -> None:
        if self._kedro_mlflow_run_config is not None and self.tracking is not None:
            # Reopened (nested) only where an earlier node left its own run on top.
            self._kedro_mlflow_run_config.nested = not self.tracking.is_on_top()
        bind_step_context(node=node.name)
        self.running_node = node.name
        self._started[node.name] = time.perf_counter()
        log.info("node started", func=getattr(node, "func_name", None) or node._func_name)

    def after_node_run(self, node: Any) -> None:
        self.running_node = None
        seconds = time.perf_counter() - self._started.get(node.name, time.perf_counter())
        log.info(NODE_FINISHED, seconds=round(seconds, 3))
        if self.tracking is not None:
            self.tracking.node_finished(node.name, seconds)

    def on_node_error(self, error: BaseException, node: Any) -> None:
        self.failed_node = node.name
        self.node_error = error
        if self.tracking is not None:
            from kvx_runtime.mlflow import TAG_FAILED_NODE

            self.tracking.tag(TAG_FAILED_NODE, node.name)
        if find_kvx_error(error) is None:
            # The one place the user's traceback is printed.
            log.error(
                "node raised an exception",
                error=f"{type(error).__name__}: {error}",
                exc_info=(type(error), error, error.__traceback__),
            )
