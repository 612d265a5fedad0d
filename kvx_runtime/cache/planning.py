"""Which steps of a run would hit the step cache, decided before the run starts: the keys of
every step computed from the project as its steps would load it (a session of the run's env with
the run's parameters; ``${storage_root}`` the run's root), each looked up in the index.

Every step can be decided beforehand: a dataset made upstream counts as its node's key (input
addressing, :mod:`kvx_runtime.cache.key`), so a step downstream of hits is decided too.

Where the steps run elsewhere (an image), the planner cannot compute the ``environment`` part
there: :func:`run_verdicts` also tries the environments the steps' last entries recorded (the
image they ran in), and keeps the one that explains the most hits. That is a prediction; the
steps check again where they run (``exec-node --cache on``, ``--serve-step``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from kvx_runtime.cache.key import StepKey, key_context_of, step_keys
from kvx_runtime.cache.store import CacheEntry, StepCache

if TYPE_CHECKING:
    from kvx_runtime.project import KedroProject

__all__ = ["RunVerdicts", "StepVerdict", "planned_run", "project_step_keys", "run_context", "run_verdicts",
           "verdicts"]

#: How many environments recorded by earlier entries :func:`run_verdicts` tries (newest first).
RECORDED_ENVIRONMENTS_TRIED = 3


@dataclass(frozen=True)
class StepVerdict:
    step: str
    key: StepKey
    #: The entry a hit serves (None: a miss, or the step is not cacheable).
    entry: CacheEntry | None
    reason: str
    #: A miss: the parts of the key that differ from the last key recorded for the step.
    changed: tuple[str, ...] = field(default=())

    @property
    def hit(self) -> bool:
        return self.entry is not None


@contextmanager
def run_context(project: KedroProject, runtime_params: Mapping[str, Any], storage_root: str, *,
                parameters_untyped: bool = False) -> Iterator[Any]:
    """The Kedro context a run's steps load (:func:`kvx_runtime.project.untracked_context`)."""
    from kvx_runtime.project import untracked_context

    with untracked_context(project, storage_root, runtime_params, parameters_untyped=parameters_untyped) as context:
        yield context


@contextmanager
def planned_run(project: KedroProject, pipeline: str, runtime_params: Mapping[str, Any],
                storage_root: str, *, remember: bool = True) -> Iterator[tuple[Any, Any]]:
    """The pipeline a run plans (rebuilt from the pipeline memo when the project did not change:
    :mod:`.pipeline_memo`) and the Kedro context its steps load (:func:`run_context`).
    ``remember``: False where no later command reads a memo (a step's fresh machine)."""
    from kvx_runtime.project_pipelines import load_pipeline

    if not remember:
        with run_context(project, runtime_params, storage_root) as context:
            yield load_pipeline(pipeline), context
        return
    from kvx_runtime.cache.pipeline_memo import parameters_untyped, remembered_pipeline

    kedro_pipeline = remembered_pipeline(project, pipeline, lambda: load_pipeline(pipeline), checked=False)
    untyped = parameters_untyped(project, pipeline)
    with run_context(project, runtime_params, storage_root, parameters_untyped=untyped) as context:
        yield kedro_pipeline, context


def project_step_keys(project: KedroProject, pipeline: str, steps: Mapping[str, Sequence[str]],
                      runtime_params: Mapping[str, Any], storage_root: str,
                      code_identity: str = "") -> dict[str, StepKey]:
    """The keys the steps of a run would compute here (:func:`run_context`)."""
    return _keys_by_environment(project, pipeline, steps, runtime_params, storage_root, code_identity, [None])[None]


def _keys_by_environment(project: KedroProject, pipeline: str, steps: Mapping[str, Sequence[str]],
                         runtime_params: Mapping[str, Any], storage_root: str, code_identity: str,
                         environments: Sequence[str | None],
                         load_versions: Mapping[str, str] | None = None) -> dict[str | None, dict[str, StepKey]]:
    """The steps' keys for each of ``environments`` (None: here's), from one session."""
    salt = project.plugin_config.run_config.cache.salt
    with planned_run(project, pipeline, runtime_params, storage_root) as (kedro_pipeline, context):
        here = key_context_of(context, kedro_pipeline, steps, package_name=project.package_name, salt=salt,
                              code_identity=code_identity, load_versions=load_versions)
        return {environment: step_keys(replace(here, environment=environment)) for environment in environments}


@dataclass(frozen=True)
class RunVerdicts:
    verdicts: list[StepVerdict]
    #: The environment assumed: None, this machine's; else the run the entry that recorded it comes from.
    recorded_by: str | None = None

    @property
    def hits(self) -> list[StepVerdict]:
        return [verdict for verdict in self.verdicts if verdict.hit]


def run_verdicts(project: KedroProject, pipeline: str, steps: Mapping[str, Sequence[str]],
                 runtime_params: Mapping[str, Any], storage_root: str, code_identity: str = "",
                 load_versions: Mapping[str, str] | None = None) -> RunVerdicts:
    """Each step's verdict, assuming the steps run here or in an environment the steps' last
    entries recorded (the newest :data:`RECORDED_ENVIRONMENTS_TRIED`): whichever gives the
    most hits (here's on a tie)."""
    from kvx_runtime.cache.key import environment_digest, step_identity

    cache = StepCache(storage_root)
    here = environment_digest()
    recorded: dict[str, CacheEntry] = {}
    lasts = [cache.last_key(step_identity(nodes)) for nodes in steps.values()]
    for last in sorted((entry for entry in lasts if entry is not None), key=lambda entry: entry.created,
                       reverse=True):
        environment = last.parts.get("environment")
        if environment and environment != here and environment not in recorded \
                and len(recorded) < RECORDED_ENVIRONMENTS_TRIED:
            recorded[environment] = last
    keys = _keys_by_environment(project, pipeline, steps, runtime_params, storage_root, code_identity,
                                [None, *recorded], load_versions)
    best = RunVerdicts(verdicts(keys[None], cache))
    for environment, entry in recorded.items():
        found = RunVerdicts(verdicts(keys[environment], cache), recorded_by=entry.run_id)
        if len(found.hits) > len(best.hits):
            best = found
    return best


def verdicts(keys: Mapping[str, StepKey], cache: StepCache) -> list[StepVerdict]:
    """Each step's hit or miss (with the parts that changed since its last entry)."""
    found = []
    for step, key in keys.items():
        entry, reason = cache.lookup(key)
        changed: tuple[str, ...] = ()
        if entry is None and key.cacheable:
            last = cache.last_key(key.step)
            if last is not None and last.key != key.digest:
                names = set(last.parts) | set(key.parts)
                changed = tuple(sorted(name for name in names if last.parts.get(name) != key.parts.get(name)))
        found.append(StepVerdict(step=step, key=key, entry=entry, reason=reason, changed=changed))
    return found
