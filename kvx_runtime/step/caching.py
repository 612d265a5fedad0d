"""The step cache inside ``exec-node`` (docs/cache.md): between the plan and the session, the
step's key is computed from the session's own context (parameters with the run's values, the
catalog as the run resolves it); on a hit the step's outputs are made this run's and the nodes
do not run (nor do the project's node hooks); after a miss that succeeded, the outputs are
recorded under the key. A step whose key or outputs cannot be told runs as without a cache and
says why; recording that fails is a warning, never the step's failure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvx_runtime.errors import KvxError
from kvx_runtime.graph import StepPlan, dataset_identity
from kvx_runtime.log import get_logger

if TYPE_CHECKING:
    from kvx_runtime.cache.key import StepKey
    from kvx_runtime.cache.store import StepCache
    from kvx_runtime.project import KedroProject
    from kvx_runtime.step.identity import JobDirectory, RunIdentity
    from kvx_runtime.step.request import StepRequest

__all__ = ["StepCaching", "cache_wanted", "prepare_caching", "serve_before_run"]

log = get_logger(__name__)


def cache_wanted(project: KedroProject, asked: str | None) -> bool:
    """The step cache for a run or a step: ``--cache on|off`` (or ``KVX_CACHE``) as ``asked``,
    else the project's ``run_config.cache.enabled``. Here, in a module every step imports
    anyway, so that a step with the cache off pays no import of the cache's code."""
    if asked in ("on", "off"):
        return asked == "on"
    return bool(project.plugin_config.run_config.cache.enabled)


@dataclass
class StepCaching:
    cache: StepCache
    key: StepKey
    #: Every output the step leaves behind -> its location in this run.
    outputs: dict[str, str]
    nodes: tuple[str, ...]
    #: The outputs that are intermediate blobs, and the job directory's store they are in.
    blobs: dict[str, str]
    store: Any = None
    #: The run's job directory: it notes the key each output of the step was made under.
    job_directory: Any = None
    #: Catalog outputs fingerprinted as the step saved them (:meth:`hooks`).
    as_saved: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    def _job_store(self) -> Any:
        return self.store or self.job_directory.store("the step cache notes what made each output")

    def _note_made(self) -> None:
        """This job's outputs of the step are what its key stands for (made or served now)."""
        store = self._job_store()
        for dataset, key in self.key.made.items():
            store.note_made(dataset, key)

    def _made_otherwise(self) -> list[str]:
        """The inputs made upstream in this job under another key than the one this step's
        key counts (a resumed or replayed job after a code change, a raw input changed
        between the steps): an entry recorded now would say this key gives these outputs,
        which it does not."""
        store = self._job_store()
        return sorted(dataset for dataset, key in self.key.upstream.items() if store.made_under(dataset) != key)

    def hooks(self) -> Any:
        """Kedro hooks that fingerprint each catalog output right after the node saved it."""
        return _OutputsAsSaved(self)

    def serve(self) -> bool:
        """Make a hit's outputs this run's; False on a miss (said, with why)."""
        try:
            return self._serve()
        except (KvxError, OSError, ValueError) as exc:
            log.warning("the step cache could not serve this step: it runs",
                        error=f"{type(exc).__name__}: {str(exc)[:300]}")
            return False

    def _serve(self) -> bool:
        entry, why = self.cache.lookup(self.key)
        if entry is None:
            log.info("step cache miss", key=self.key.digest[:16], reason=why,
                     changed=self._changed())
            return False
        if set(entry.outputs) != set(self.outputs):
            log.info("step cache miss", key=self.key.digest[:16], reason="the entry has other outputs")
            return False
        copied = self.cache.serve(entry, self.outputs, self.key.reach)
        for name in copied:
            if name in self.blobs:
                self.store.note_served(self.blobs[name], entry.job_name)
        self._note_made()
        log.info("step served from the cache: its nodes do not run", key=self.key.digest[:16],
                 from_run=entry.run_id, outputs=sorted(self.outputs), copied=copied)
        return True

    def _changed(self) -> list[str] | None:
        try:
            last = self.cache.last_key(self.key.step)
        except OSError:
            return None
        if last is None or last.key == self.key.digest:
            return None
        names = set(last.parts) | set(self.key.parts)
        return sorted(name for name in names if last.parts.get(name) != self.key.parts.get(name))

    def record(self, identity: RunIdentity) -> None:
        try:
            otherwise = self._made_otherwise()
            if otherwise:
                log.warning("step not cached: inputs of this job were made under other keys than this step's "
                            "(their code, parameters or inputs changed since they were made)", datasets=otherwise)
                return
            entry = self.cache.record(self.key, nodes=self.nodes, run_id=identity.run_id,
                                      job_name=identity.job_name, outputs=self.outputs, as_saved=self.as_saved)
            if entry is not None:
                self._note_made()
        except (OSError, KvxError) as exc:
            log.warning("the step's cache entry could not be written: the step succeeded, it will not hit",
                        error=f"{type(exc).__name__}: {str(exc)[:300]}")
            return
        if entry is not None:
            log.info("step cached", key=self.key.digest[:16], entry=self.cache.url(self.key.digest))


class _OutputsAsSaved:
    """A step's catalog outputs fingerprinted right after each is saved: the entry then records
    what this step wrote, not what the place holds when the step ends (another run may write a
    fixed catalog path meanwhile; its data must never be served under this step's key)."""

    def __init__(self, caching: StepCaching) -> None:
        from kedro.framework.hooks import hook_impl

        hook_impl(_OutputsAsSaved.after_dataset_saved)  # marked here: Kedro is not imported with this module
        self._caching = caching

    def after_dataset_saved(self, dataset_name: str) -> None:
        from kvx_runtime.cache.key import fingerprint_path

        location = self._caching.outputs.get(dataset_name)
        if location is not None and dataset_name not in self._caching.blobs:
            self._caching.as_saved[dataset_name] = fingerprint_path(location, self._caching.key.reach.get(dataset_name))


def prepare_caching(project: KedroProject, request: StepRequest, plan: StepPlan, context: Any,
                    job_directory: JobDirectory) -> StepCaching | None:
    """The step's key and output locations, from the session's loaded ``context`` (before the
    step's hooks are registered); None, said once, when the step cannot use the cache."""
    from kvx_runtime.cache.key import key_context_of, step_keys
    from kvx_runtime.cache.store import StepCache
    from kvx_runtime.project_pipelines import load_pipeline

    if not job_directory.root:
        log.warning("the step cache needs a storage root: caching off for this step")
        return None
    settings = project.plugin_config.run_config.cache
    pipeline = load_pipeline(request.pipeline)
    step = "+".join(plan.nodes)
    code_identity = ""
    if request.code:  # the archive the step runs (fetched and checked already): its digest
        from kvx_runtime.code_upload import parse_code_reference

        code_identity = parse_code_reference(request.code)[1]
    catalog = context.catalog  # once: each access builds a catalog
    key_context = key_context_of(context, pipeline, {step: list(plan.nodes)}, package_name=project.package_name,
                                 salt=settings.salt, code_identity=code_identity,
                                 load_versions=request.load_versions, catalog=catalog)
    key = step_keys(key_context)[step]
    if not key.cacheable:
        log.info("step not cacheable: it runs", reasons=list(key.uncacheable))
        return None
    found = _output_locations(pipeline, plan, catalog, job_directory)
    if isinstance(found, str):
        log.info("step not cacheable: it runs", reasons=[found])
        return None
    outputs, blobs, store = found
    return StepCaching(cache=StepCache(job_directory.root), key=key, outputs=outputs, nodes=tuple(plan.nodes),
                       blobs=blobs, store=store, job_directory=job_directory)


def _output_locations(pipeline: Any, plan: StepPlan, catalog: Any,
                      job_directory: JobDirectory) -> tuple[dict[str, str], dict[str, str], Any] | str:
    """Where this run keeps each output the step leaves behind (declared datasets: where the
    catalog saves them; crossing intermediates: their blobs), the blobs among them and the job
    directory's store; or why an output cannot be told."""
    from kvx_runtime.cache.store import configured_location, dataset_location
    from kvx_runtime.step.hooks import dataset_config, declared_type, is_declared

    outputs: dict[str, str] = {}
    blobs: dict[str, str] = {}
    store = None
    for node in pipeline.nodes:
        if node.name not in plan.nodes:
            continue
        for name in node.outputs:
            if is_declared(catalog, name):
                # From the configuration where it tells (the dataset is not built, so a broken
                # entry shows in the step that reads the output, as it would without the cache).
                location = configured_location(dataset_config(catalog, name)) or dataset_location(catalog.get(name))
                if location is None:
                    return f"output {name} ({declared_type(catalog, name)}) is not a file kvx-runtime can copy"
                outputs[name] = location
            elif name in plan.crossing_outputs:
                store = store or job_directory.store("the step cache keeps intermediates")
                blobs[name] = dataset_identity(name)
                outputs[name] = store.url(blobs[name])
    return outputs, blobs, store


def serve_before_run(project: KedroProject, pipeline_name: str, steps: Mapping[str, Sequence[str]],
                     storage_root: str, identity: RunIdentity, runtime_params: Mapping[str, Any] | None = None,
                     code_identity: str = "", load_versions: Mapping[str, str] | None = None,
                     remember: bool = True) -> dict[str, str]:
    """Serve, before a run starts, every step the cache has (so that its process or machine is
    never started): keys and this run's output locations from a session of the run's env (and
    typed ``runtime_params``), with the run's identity and storage root exported as its steps
    will have them; ``code_identity``: the code archive's digest when the steps run one;
    ``load_versions``: the versions the run pins (``--load-version``); ``remember``: the
    pipeline through the pipeline memo (:func:`kvx_runtime.cache.planning.planned_run`). Returns the steps
    served (step -> the run they come from). Steps with versioned outputs are left to their
    own ``exec-node`` (the run's save version is the steps' to decide), as is any step whose
    serving fails (said; the step then runs and decides again)."""
    from kvx_runtime.cache.key import key_context_of, step_keys
    from kvx_runtime.cache.planning import planned_run
    from kvx_runtime.cache.store import StepCache
    from kvx_runtime.graph import plan_step
    from kvx_runtime.step.identity import JobDirectory

    identity.export()
    served: dict[str, str] = {}
    with planned_run(project, pipeline_name, runtime_params or {}, storage_root,
                     remember=remember) as (pipeline, context):
        catalog = context.catalog  # once: each access builds a catalog
        key_context = key_context_of(context, pipeline, steps, package_name=project.package_name,
                                     salt=project.plugin_config.run_config.cache.salt, code_identity=code_identity,
                                     load_versions=load_versions, catalog=catalog)
        cache = StepCache(storage_root)
        job_directory = JobDirectory(storage_root, identity)
        for step, key in step_keys(key_context).items():
            entry, _ = cache.lookup(key)
            if entry is None:
                continue
            plan = plan_step(pipeline, pipeline_name, list(steps[step]))
            if any((key_context.catalog_entry(name) or {}).get("versioned")
                   for node in pipeline.nodes if node.name in plan.nodes for name in node.outputs):
                continue
            found = _output_locations(pipeline, plan, catalog, job_directory)
            if isinstance(found, str) or set(found[0]) != set(entry.outputs):
                continue
            outputs, blobs, store = found
            caching = StepCaching(cache=cache, key=key, outputs=outputs, nodes=tuple(plan.nodes), blobs=blobs,
                                  store=store, job_directory=job_directory)
            if caching.serve():
                served[step] = entry.run_id
    return served
