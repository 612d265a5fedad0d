"""kedro-mlflow's hooks as a step runs them. kedro-mlflow is written for a process that runs a
whole pipeline; a step runs one node (or a group) of it, attached to the pipeline's one MLflow
run (:mod:`kvx_runtime.mlflow.pipeline_run`). Two of its hooks are adapted on the step
session's own hook manager (nothing global, nothing in a ``kedro run``):

- ``after_catalog_created`` walks only the datasets that may be kedro-mlflow's
  (:func:`narrow_kedro_mlflows_catalog_pass`);
- ``before_pipeline_run`` tags the run as the pipeline's, not as this step's
  (:func:`tag_the_pipelines_run`).

An implementation that does not look like kedro-mlflow 2's is left as it is.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvx_runtime.log import get_logger, redact
from kvx_runtime.mlflow.kedro_mlflow_rules import pipeline_run_tags, run_pipeline_names
from kvx_runtime.step.hooks import declared_type

if TYPE_CHECKING:
    from kvx_runtime.mlflow import AttachedRun

__all__ = ["adapt_kedro_mlflow_hooks", "narrow_kedro_mlflows_catalog_pass",
           "pipeline_run_tags", "run_pipeline_names", "tag_the_pipelines_run"]

log = get_logger(__name__)

def adapt_kedro_mlflow_hooks(hook_manager: Any, attached: AttachedRun | None, *, run_id: str) -> None:
    """Adapt kedro-mlflow's hooks on a step session's ``hook_manager`` (before the session runs):
    its catalog pass always, its run tags where the step is attached to the pipeline's run."""
    narrow_kedro_mlflows_catalog_pass(hook_manager)
    if attached is not None:
        tag_the_pipelines_run(hook_manager, attached, run_id=run_id)


def _kedro_mlflows_implementations(hook_manager: Any, hook: str, argument: str) -> Iterator[tuple[Any, int]]:
    """kedro-mlflow's implementations of ``hook`` on ``hook_manager`` that take ``argument``,
    each with the argument's position (pluggy calls a HookImpl's function positionally)."""
    caller = getattr(getattr(hook_manager, "hook", None), hook, None)
    if caller is None:
        return
    for implementation in caller.get_hookimpls():
        plugin_module = type(implementation.plugin).__module__
        argnames = tuple(getattr(implementation, "argnames", ()))
        if plugin_module.startswith("kedro_mlflow.") and argument in argnames:
            yield implementation, argnames.index(argument)


def tag_the_pipelines_run(hook_manager: Any, attached: AttachedRun, *, run_id: str) -> None:
    """kedro-mlflow's ``before_pipeline_run`` tags the active run with the session's run
    parameters and ``kedro_command``: in every step, the pipeline's run would be left saying
    what its last step ran (``kedro run --node=<one node>``, that step's Kedro session and
    runner), two requests a step. Here its tag writes are taken while it runs, and the
    pipeline's tags (:func:`pipeline_run_tags`) that the run does not carry yet are written in
    one request: by the first steps, none by the others (nor by the on-exit step, whose
    pipeline is another)."""
    for implementation, position in _kedro_mlflows_implementations(hook_manager, "before_pipeline_run",
                                                                     "run_params"):
        setattr(implementation, "function",  # noqa: B010 (HookImpl.function is Final for pluggy)
                _tagging_the_pipelines_run(implementation.function, position, attached, run_id))


def _tagging_the_pipelines_run(function: Any, position: int, attached: AttachedRun, run_id: str) -> Any:
    @functools.wraps(function)
    def before_pipeline_run(*args: Any, **kwargs: Any) -> Any:
        with _tag_writes_taken() as taken:
            result = function(*args, **kwargs)
        if taken:
            run_params = args[position] if position < len(args) else kwargs.get("run_params", {})
            attached.add_missing_tags(pipeline_run_tags(taken, run_params, run_id))
        return result

    return before_pipeline_run


@contextmanager
def _tag_writes_taken() -> Iterator[dict[str, str]]:
    """While the block runs, ``mlflow.set_tags`` and ``mlflow.set_tag`` (the fluent API
    kedro-mlflow's hook calls) record the tags instead of writing them, values as MLflow
    would write them (``str``, through kvx's redaction like every logged value)."""
    import mlflow

    taken: dict[str, str] = {}
    set_tags, set_tag = mlflow.set_tags, mlflow.set_tag

    def take_tags(tags: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
        taken.update({str(key): redact(str(value)) for key, value in tags.items()})

    def take_tag(key: str, value: Any, *args: Any, **kwargs: Any) -> None:
        taken[str(key)] = redact(str(value))

    mlflow.set_tags, mlflow.set_tag = take_tags, take_tag
    try:
        yield taken
    finally:
        mlflow.set_tags, mlflow.set_tag = set_tags, set_tag


def _is_kedros_own(dataset_type: str) -> bool:
    """Does ``dataset_type`` name a class of Kedro's or kedro-datasets' (which are never
    kedro-mlflow's datasets or subclasses of them), as Kedro resolves a type (its packages
    first, ``kedro.io.core._DEFAULT_PACKAGES``, then the name as written)? Told without
    importing the class. An answer of no is always safe: kedro-mlflow then sees the dataset as
    it would without :func:`narrow_kedro_mlflows_catalog_pass`."""
    import importlib.machinery
    import importlib.util

    if dataset_type.startswith(("kedro.io.", "kedro_datasets.", "kedro_datasets_experimental.")):
        return True
    module, _, name = dataset_type.rpartition(".")
    if not module:
        import kedro.io

        return hasattr(kedro.io, name)
    package, *submodules = module.split(".")
    try:
        spec = importlib.util.find_spec(f"kedro_datasets.{package}")
        for submodule in submodules:  # pandas.csv_dataset.X: found without importing kedro_datasets.pandas
            if spec is None or spec.submodule_search_locations is None:
                return False
            spec = importlib.machinery.PathFinder.find_spec(f"{spec.name}.{submodule}",
                                                            list(spec.submodule_search_locations))
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if submodules or spec.submodule_search_locations is None:  # a module of kedro-datasets named in full
        return True
    # A subpackage of kedro-datasets (pandas, api...): Kedro takes it only where it holds the
    # class, else it falls back to a project's own package of that name (``api.HouseMetric``).
    return name in _classes_of_kedro_datasets_package(spec.origin or "")


@functools.cache
def _classes_of_kedro_datasets_package(init_file: str) -> frozenset[str]:
    """The names a kedro-datasets subpackage's ``__init__`` gives (``from .csv_dataset import
    CSVDataset``, ``lazy.attach(submod_attrs=...)``), read from its source: importing it would
    import the datasets' libraries (requests, SQLAlchemy...), which is what the narrowing spares."""
    import ast

    try:
        tree = ast.parse(Path(init_file).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return frozenset()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.keyword) and node.arg == "submod_attrs" and isinstance(node.value, ast.Dict):
            names.update(element.value for value in node.value.values if isinstance(value, ast.List | ast.Tuple)
                         for element in value.elts
                         if isinstance(element, ast.Constant) and isinstance(element.value, str))
    return frozenset(names)


class _KedroMlflowsShareOfCatalog:
    """The step's catalog as kedro-mlflow's ``after_catalog_created`` walks it: the datasets
    already built and those not built yet that may be kedro-mlflow's (any type but Kedro's and
    kedro-datasets' own); writes and everything else go to the catalog itself."""

    def __init__(self, catalog: Any) -> None:
        self._catalog = catalog
        lazy = getattr(catalog, "_lazy_datasets", {})
        self._names = [name for name in catalog.keys()  # noqa: SIM118 (a catalog, not a dict)
                       if name not in lazy or not _is_kedros_own(str(declared_type(catalog, name) or ""))]

    def keys(self) -> list[str]:
        return list(self._names)

    def __iter__(self) -> Any:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._names)

    def items(self) -> list[tuple[str, Any]]:
        return [(name, self._catalog[name]) for name in self._names]

    def values(self) -> list[Any]:
        return [self._catalog[name] for name in self._names]

    def __contains__(self, name: object) -> bool:
        return name in self._catalog

    def __getitem__(self, name: str) -> Any:
        return self._catalog[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self._catalog[name] = value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._catalog, name)


def narrow_kedro_mlflows_catalog_pass(hook_manager: Any) -> None:
    """kedro-mlflow's ``after_catalog_created`` names its metric datasets after their catalog
    entries by walking ``catalog.items()``, which builds every dataset of the project's
    catalog: in a step that runs one node of a large catalog, each dataset's package imported
    and each dataset constructed for nothing. In a step it walks only the datasets it may
    change (:class:`_KedroMlflowsShareOfCatalog`). Purely an optimisation, like
    :func:`kvx_runtime.project.entry_points_of_disabled_plugins_not_loaded`: an implementation
    that does not look like kedro-mlflow 2's is left as it is."""
    for implementation, position in _kedro_mlflows_implementations(hook_manager, "after_catalog_created", "catalog"):
        # HookImpl.function is what pluggy calls (annotated Final for its own code).
        setattr(implementation, "function",  # noqa: B010
                _walking_mlflows_share(implementation.function, position))


def _walking_mlflows_share(function: Any, position: int) -> Any:
    """``function`` (a hook implementation pluggy calls with its arguments in order) given
    kedro-mlflow's share of the catalog at ``position``."""

    def walk_mlflows_share(*args: Any, **kwargs: Any) -> Any:
        narrowed = list(args)
        if position < len(narrowed):
            narrowed[position] = _KedroMlflowsShareOfCatalog(narrowed[position])
        return function(*narrowed, **kwargs)

    return walk_mlflows_share
