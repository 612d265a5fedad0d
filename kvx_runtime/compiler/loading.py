"""Loading what planning needs from a Kedro project: its configuration, the pipeline as a step
loads it, parameters, catalog paths, the exit pipeline. The project's setup is refused here
(no image, no storage root, a pipeline that does not load alone, ...), before anything is
planned or uploaded."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from typing import Any

import yaml

from kvx_runtime.compiler.checks import warn_envs_not_in_image
from kvx_runtime.compiler.names import check_label
from kvx_runtime.compiler.planner import CompileRequest, ProjectFacts
from kvx_runtime.config import is_on_this_machine, resolve_storage_root, under_storage_root
from kvx_runtime.config.validation import unknown_keys
from kvx_runtime.errors import ConfigError, KvxError, UsageError
from kvx_runtime.graph import dataset_identity
from kvx_runtime.grouping import build_grouper
from kvx_runtime.log import get_logger

__all__ = ["load_pipeline_as_steps_do", "load_project_facts", "mlflow_configured"]

log = get_logger(__name__)

#: Passed from the compiling machine into every step, so ${commit_id} means the same thing.
FORWARDED_ENV = ("KEDRO_CONFIG_COMMIT_ID", "KEDRO_CONFIG_BRANCH_NAME")


def load_project_facts(request: CompileRequest) -> ProjectFacts:
    """Open the project of ``request`` and load what its plan is made of."""
    from kvx_runtime.project import open_project

    project = request.project if request.project is not None else open_project(request.project_path, request.env)
    if request.env is not None and project.env != request.env:  # a caller's mistake, never the user's
        raise ValueError(f"CompileRequest: env {request.env!r} with a project opened in {project.env!r}")
    run = project.plugin_config.run_config
    _check_env_uploaded(project.env, request.code_upload if request.code_upload is not None else run.code_upload)
    image = request.image or run.image
    if not image:
        raise ConfigError("no image to run the steps in", hint="pass --image or set run_config.image")
    storage_root = resolve_storage_root(request.storage_root, run.root, required=True)
    assert storage_root is not None
    for key, value in run.labels.items():
        check_label(key, value)

    from kvx_runtime.step.caching import cache_wanted

    remember = cache_wanted(project, request.cache)
    kedro_pipeline, kedro_params, catalog, catalog_config = _load_kedro(project, request.pipeline, storage_root,
                                                                        remember=remember)
    if not kedro_pipeline.nodes:
        raise ConfigError(f"pipeline '{request.pipeline}' has no nodes")
    exit_pipeline = _exit_pipeline(project, run.on_exit_pipeline, remember=remember)
    _check_catalog_has(catalog, kedro_pipeline, request, exit_pipeline)
    grouper = build_grouper(run.grouping.cls, run.grouping.params)
    written = {dataset_identity(out) for node in kedro_pipeline.nodes for out in node.outputs}
    catalog_names = {name for node in kedro_pipeline.nodes for name in [*node.inputs, *node.outputs]}
    inputs = {name for name in catalog_names
              if dataset_identity(name) not in written and not name.startswith("params:") and name != "parameters"}
    input_configs = _dataset_configs(catalog, catalog_config, inputs)
    written_paths = _dataset_paths(catalog, catalog_config,
                                   {name for name in catalog_names if dataset_identity(name) in written})
    return ProjectFacts(
        project_path=project.path, package_name=project.package_name, conf_root=project.conf_root,
        env=project.env, run=run, image=image, storage_root=storage_root,
        pipeline=kedro_pipeline, kedro_params=kedro_params, grouper=grouper,
        dataset_paths=written_paths,
        exit_nodes=tuple(node.name for node in exit_pipeline.nodes) if exit_pipeline is not None else (),
        exit_pipeline=exit_pipeline,
        mlflow=mlflow_configured(project),
        forwarded_env={key: os.environ[key] for key in FORWARDED_ENV if key in os.environ},
        envs_not_in_image=tuple(warn_envs_not_in_image(project.path, project.conf_root,
                                                       [project.base_env, project.env])),
        unread_mlflow_files=() if mlflow_configured(project) else _unread_mlflow_files(project),
        memory_datasets_assigned=_assigned_memory_datasets(_dataset_configs(catalog, catalog_config,
                                                                            catalog_names)),
        blob_outputs=_blob_outputs(catalog, catalog_names, written),
        missing_inputs=_missing_inputs(_paths_of(input_configs), storage_root),
        remote_inputs=_remote_inputs(project, input_configs, storage_root, written_paths=written_paths),
        node_durations=_node_durations(project) if grouper.uses_durations else {},
        unknown_top_level_keys=tuple(key for key in unknown_keys(project.plugin_config)
                                     if not key.startswith("run_config.")),
        named_elsewhere=_named_in_other_pipelines(run, kedro_pipeline, request.pipeline),
    )


def _blob_outputs(catalog: Any, names: set[str], written: set[str]) -> frozenset[str]:
    """What the steps exchange as blobs: written datasets the catalog keeps nowhere lasting (the
    rule of :meth:`kvx_runtime.step.hooks.StepHooks.after_catalog_created`)."""
    from kvx_runtime.step.hooks import is_declared

    return frozenset(dataset_identity(name) for name in names
                     if dataset_identity(name) in written and not is_declared(catalog, name))


def _check_catalog_has(catalog: Any, pipeline: Any, request: Any, exit_pipeline: Any = None) -> None:
    """What ``kedro run`` refuses before any node runs, refused before any step does: pipeline
    inputs no node writes that are neither catalog entries nor dataset factory matches (every
    step reading one would fail: the steps of a ``--pipeline`` whose producer is another
    pipeline, its data kept in memory there), and ``--load-version`` of datasets the catalog
    does not have."""
    unsatisfied = sorted(name for name in pipeline.inputs()
                         if not name.startswith("params:") and name != "parameters" and name not in catalog)
    if unsatisfied:
        raise ConfigError(
            f"pipeline '{request.pipeline}' reads {', '.join(unsatisfied)}, which none of its nodes writes and the "
            "catalog does not define: every step reading them would fail (kedro run refuses it too)",
            hint="declare them in catalog.yml where the steps can read them (under ${storage_root}), or compile the "
                 "pipeline that writes them with this one")
    if exit_pipeline is not None:  # it reads the pipeline's outputs (kept for it) and the catalog
        written = {dataset_identity(out) for node in pipeline.nodes for out in node.outputs}
        unsatisfied = sorted(name for name in exit_pipeline.inputs()
                             if not name.startswith("params:") and name != "parameters" and name not in catalog
                             and dataset_identity(name) not in written)
        if unsatisfied:
            raise ConfigError(
                f"run_config.on_exit_pipeline reads {', '.join(unsatisfied)}, which no node of it or of pipeline "
                f"'{request.pipeline}' writes and the catalog does not define: the exit step would fail",
                hint="declare them in catalog.yml, or choose an exit pipeline that reads what this one writes")
    unknown = sorted(name for name in request.load_versions if name not in catalog)
    if unknown:
        raise ConfigError(f"--load-version {', '.join(unknown)}: not in the catalog",
                          hint="name datasets of the catalog (versioned ones)")


def _named_in_other_pipelines(run: Any, pipeline: Any, name: str) -> frozenset[str]:
    """Entries of ``run_config``'s per-node tables that name no node or tag of ``pipeline`` but
    one of another registered pipeline (the whole registry is loaded only when there are such
    entries). A pipeline that cannot be loaded leaves its names unknown."""
    from kvx_runtime.project_pipelines import load_pipeline, registered_pipeline_names, request_pipeline

    here = {node.name for node in pipeline.nodes} | {tag for node in pipeline.nodes for tag in node.tags}
    named = {key for table in (run.resources, run.node_selectors, run.retries) for key in table}
    named -= here | {"__default__"}
    if not named:
        return frozenset()
    found: set[str] = set()
    try:
        for other in registered_pipeline_names():
            if other != name:
                nodes = load_pipeline(other).nodes
                found |= named & ({node.name for node in nodes} | {tag for node in nodes for tag in node.tags})
    except Exception as exc:  # another pipeline's own problem: its names stay unknown here
        log.debug("the other pipelines could not all be loaded", error=str(exc)[:200])
    finally:
        request_pipeline(name)
    return frozenset(found)


def _node_durations(project: Any) -> dict[str, float]:
    """Earlier runs' node seconds: the MLflow runs' (where the steps ran: the cloud too) over
    this machine's run-local logs."""
    from kvx_runtime.grouping.timings import earlier_node_durations

    durations = earlier_node_durations(project.path)
    if mlflow_configured(project):
        from kvx_runtime.mlflow import earlier_node_seconds

        durations.update(earlier_node_seconds(project))
    return durations


def _check_env_uploaded(env: str, code_upload: bool) -> None:
    """With code upload the steps read the archive's configuration, which never holds
    ``conf/local``: a pipeline compiled for it would fail every step."""
    from kvx_runtime.code_upload import NOT_UPLOADED_ENVS

    if code_upload and env in NOT_UPLOADED_ENVS:
        raise ConfigError(
            f"--env {env} with code upload: conf/{env} is never uploaded (it holds this machine's credentials "
            "and settings), so every step would fail",
            hint="compile with an environment the archive carries (--env base, or an env of your own such "
            "as conf/cloud), or without --code-upload",
        )


def _unread_mlflow_files(project: Any) -> tuple[str, ...]:
    """kedro-mlflow configuration in environments the steps will not read (``kedro mlflow
    init`` writes ``conf/local/mlflow.yml``): the pipeline would be compiled without tracking."""
    if importlib.util.find_spec("kedro_mlflow") is None:
        return ()
    from kvx_runtime.mlflow import unread_mlflow_files

    files = unread_mlflow_files(project)
    for path in files:
        log.warning(
            f"MLflow is configured in {path.relative_to(project.path)}, which the steps do not read (they use "
            f"env {project.env}): this pipeline is compiled without tracking",
            hint=f"compile with --env {path.parent.name}, or move the file to conf/{project.base_env}",
        )
    return tuple(str(path.relative_to(project.path)) for path in files)


def _missing_inputs(paths: dict[str, str], storage_root: str) -> dict[str, str]:
    """The pipeline's inputs (datasets no node writes) that the catalog reads from under a
    storage root on this machine, and that are not there (on a cloud root they are not looked
    for: compiling talks to no storage)."""
    if not is_on_this_machine(storage_root):
        return {}
    return {name: path for name, path in paths.items()
            if under_storage_root(path, storage_root) and not os.path.exists(path.removeprefix("file://"))}


#: Dataset types whose load takes a missing folder for "nothing new yet" (no error).
_EMPTY_IS_DATA = ("IncrementalDataset",)
#: What makes a path a pattern the dataset expands (Spark, Dask, Polars), not a file's name.
_GLOB_CHARACTERS = frozenset("*?[{")


def _remote_inputs(project: Any, configs: dict[str, dict[str, Any]], storage_root: str, *,
                   written_paths: dict[str, str]) -> dict[str, str]:
    """The pipeline's inputs the catalog reads from under a cloud storage root, whose path is
    the one their step will read: compiling talks to no storage, so whether they are there is
    told before a run is submitted (:func:`kvx_runtime.submission.refuse_missing_inputs`).

    Left out, since a missing one there may be no fault: a path naming the run (``${run_id}``,
    ``${job_name}``: another value in each run) or a glob; an entry that reads run-time
    parameters (``${runtime_params:...}``, which compiling does not resolve as a run does), or
    any, when that cannot be told per entry (:func:`_entries_reading_runtime_params`); a dataset
    that takes a missing folder for no data (``IncrementalDataset``); a path that a node writes
    under another catalog name."""
    if is_on_this_machine(storage_root):
        return {}
    reading = _entries_reading_runtime_params(project)
    if reading is None:
        return {}
    from kvx_runtime.config_loader import run_identity_values

    identity = run_identity_values()
    written = [path.rstrip("/") for path in written_paths.values()]
    found: dict[str, str] = {}
    for name, path in _paths_of(configs).items():
        config = configs[name]
        if not under_storage_root(path, storage_root) or name in reading:
            continue
        if _GLOB_CHARACTERS & set(path) or any(value in path for value in identity):
            continue
        if str(config.get("type", "")).rsplit(".", 1)[-1] in _EMPTY_IS_DATA:
            continue
        stripped = path.rstrip("/")
        if any(stripped == other or other.startswith(stripped + "/") or stripped.startswith(other + "/")
               for other in written):
            continue
        found[name] = path
    return found


#: ``${...}`` taking another catalog key's value (``${_root}``, ``${_base.path}``,
#: ``${..x}``), not a resolver's (``${name:...}``) nor a run's template (``${run_id}``,
#: ``${storage_root|...}``: :mod:`kvx_runtime.config_loader`).
_KEY_INTERPOLATION = re.compile(r"\$\{\s*(?:[._]|[A-Za-z0-9_]+\.)[^}:|]*\}")


def _entries_reading_runtime_params(project: Any) -> frozenset[str] | None:
    """The catalog entries of the project's environments whose settings read run-time
    parameters (``${runtime_params:...}``, anchors merged); None when that cannot be told per
    entry, and then every entry may: a dataset factory or a ``_`` variable reading them (the
    entries it feeds are not named), an entry taking another key's value (``${_root}``) in a
    catalog that reads them, a file that cannot be read here."""
    from kvx_runtime.config.files import conf_files, conf_filesystem
    from kvx_runtime.project import catalog_patterns

    try:
        fs, _ = conf_filesystem(project.conf_source)
        files = {path for env in {project.base_env, project.env} for pattern in catalog_patterns(project)
                 for path in conf_files(project.conf_source, f"{env}/{pattern}") if fs.isfile(path)}
        texts = [fs.cat_file(path).decode("utf-8", "replace") for path in sorted(files)]
        if not any("runtime_params:" in text for text in texts):
            return frozenset()
        entries: list[tuple[str, str]] = []  # every env's definition of each entry
        for text in texts:
            loaded = yaml.safe_load(text) or {}
            if not isinstance(loaded, dict):
                return None
            entries.extend((str(name), json.dumps(entry, default=str)) for name, entry in loaded.items())
    except Exception:  # unreadable here: the catalog already loaded; assume the worst
        return None
    reading = set()
    for name, text in entries:
        if _KEY_INTERPOLATION.search(text):
            return None  # another key's value: that key may read them
        if "runtime_params:" in text:
            if name.startswith("_") or "{" in name:
                return None
            reading.add(name)
    return frozenset(reading)


def _assigned_memory_datasets(configs: dict[str, dict[str, Any]]) -> frozenset[str]:
    """The pipeline's datasets that the catalog (an entry or a dataset factory) keeps in memory
    without copying (``MemoryDataset`` with ``copy_mode: assign``, what Kedro's Spark starters
    use for DataFrames)."""
    return frozenset(
        name for name, config in configs.items()
        if isinstance(config, dict) and str(config.get("type", "")).rsplit(".", 1)[-1] == "MemoryDataset"
        and config.get("copy_mode") == "assign"
    )


def load_pipeline_as_steps_do(name: str, role: str) -> Any:
    """The registered pipeline ``name``, checked to be what a step gets when Kedro loads it
    alone (Kedro 1.x loads only the pipelines a run asks for: a pipeline that exists only
    when the whole registry is loaded would fail every step in the cloud)."""
    from kedro.framework.project import pipelines

    from kvx_runtime.project_pipelines import load_pipeline, pipeline_import_errors_raised, registered_pipeline_names

    try:
        with pipeline_import_errors_raised():
            known = registered_pipeline_names()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"the project's pipelines cannot be loaded: {type(exc).__name__}: {exc}") from exc
    if name not in known:
        raise UsageError(f"{role}: no pipeline named '{name}'", hint=f"registered: {', '.join(known) or 'none'}")
    whole = pipelines[name]
    try:
        alone = load_pipeline(name)
    except Exception as exc:
        raise ConfigError(
            f"{role} '{name}' exists when Kedro loads every pipeline but not when it loads "
            f"'{name}' alone, as a step does ({type(exc).__name__}: {exc})",
            hint=f"check that `kedro run --pipeline {name}` works; with find_pipelines() the "
            f"pipeline must live in a module named pipelines/{name}/",
        ) from None
    expected = sorted(node.name for node in whole.nodes)
    got = sorted(node.name for node in alone.nodes)
    if got != expected:
        differing = sorted(set(expected) ^ set(got))
        raise ConfigError(
            f"{role} '{name}' has other nodes when Kedro loads it alone, as a step does, than "
            f"when it loads every pipeline: {', '.join(differing[:5])}"
            + (f" and {len(differing) - 5} more" if len(differing) > 5 else ""),
            hint=f"compare `kedro run --pipeline {name}` with the registry",
        )
    return alone


def mlflow_configured(project: Any) -> bool:
    """MLflow steps are compiled in when kedro-mlflow is installed and configured."""
    from kvx_runtime.project import has_config

    return importlib.util.find_spec("kedro_mlflow") is not None and has_config(project, "mlflow*")


def _exit_pipeline(project: Any, exit_pipeline: str | None, *, remember: bool) -> Any:
    """``run_config.on_exit_pipeline``'s pipeline (None: none is configured)."""
    if not exit_pipeline:
        return None
    try:
        return _pipeline_as_steps_load_it(project, exit_pipeline, "run_config.on_exit_pipeline", remember)
    except UsageError as exc:  # not the command line's fault: the project's configuration
        raise ConfigError(exc.message, hint=exc.hint) from None


def _pipeline_as_steps_load_it(project: Any, name: str, role: str, remember: bool) -> Any:
    """:func:`load_pipeline_as_steps_do`; with the step cache on, rebuilt from the pipeline memo
    when the project did not change since it was checked (:mod:`kvx_runtime.cache.pipeline_memo`)."""
    if not remember:
        return load_pipeline_as_steps_do(name, role)
    from kvx_runtime.cache.pipeline_memo import remembered_pipeline

    return remembered_pipeline(project, name, lambda: load_pipeline_as_steps_do(name, role), checked=True)


def _parameters_untyped(project: Any, pipeline: str) -> bool:
    from kvx_runtime.cache.pipeline_memo import parameters_untyped

    return parameters_untyped(project, pipeline)


def _load_kedro(project: Any, pipeline: str, storage_root: str, *,
                remember: bool) -> tuple[Any, dict[str, Any], Any, dict[str, Any]]:
    """The pipeline, the resolved parameters, the catalog and the catalog config (with
    ``${storage_root}`` the run's storage root, as in its steps)."""
    from kedro.framework.project import settings

    from kvx_runtime.project import MLFLOW_PLUGINS, disable_plugin_hooks, untracked_context

    # Compiling must not start MLflow runs or contact a tracking server (before the pipelines load).
    disable_plugin_hooks(settings, MLFLOW_PLUGINS)
    kedro_pipeline = _pipeline_as_steps_load_it(project, pipeline, "the pipeline", remember)
    try:
        with untracked_context(project, storage_root, parameters_untyped=remember and _parameters_untyped(
                project, pipeline)) as context:
            catalog_config = context.config_loader["catalog"]
            return kedro_pipeline, context.params, context.catalog, catalog_config
    except KvxError:
        raise
    except Exception as exc:  # the user's catalog, parameters or settings
        text = " ".join(str(exc).split())
        raise ConfigError(
            f"the Kedro project's configuration (env {project.env}) cannot be loaded: "
            f"{type(exc).__name__}: {text[:500]}"
        ) from exc


def _dataset_configs(catalog: Any, catalog_config: dict[str, Any], names: set[str]) -> dict[str, dict[str, Any]]:
    """The resolved catalog configuration of every dataset in ``names`` that has one (its entry,
    or the factory pattern it matches: the project's catch-all ``{name}`` too, not Kedro's
    runtime default)."""
    configs: dict[str, dict[str, Any]] = {}
    resolver = getattr(catalog, "config_resolver", None)
    for name in sorted(names):
        config = catalog_config.get(name)
        if config is None and resolver is not None and (
                resolver.match_dataset_pattern(name) or resolver.match_user_catch_all_pattern(name)):
            config = resolver.resolve_pattern(name)
        if isinstance(config, dict):
            configs[name] = config
    return configs


def _dataset_paths(catalog: Any, catalog_config: dict[str, Any], names: set[str]) -> dict[str, str]:
    """Local or remote file path of every catalog dataset in ``names`` that has one."""
    return _paths_of(_dataset_configs(catalog, catalog_config, names))


def _paths_of(configs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The file path (``filepath``, or ``path``) of each dataset configuration that has one."""
    paths: dict[str, str] = {}
    for name, config in configs.items():
        path = config.get("filepath") or config.get("path")
        if isinstance(path, str):
            paths[name] = path
    return paths
