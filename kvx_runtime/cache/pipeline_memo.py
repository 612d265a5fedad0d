"""The project's pipelines as planning with the step cache last saw them, remembered between
commands so that an unchanged project is planned without importing its code.

Importing a project's pipelines imports everything its node modules import (pandas,
scikit-learn, ...): most of an unchanged second ``run-local --cache on``, whose steps are all
served. Planning reads only each node's name, inputs, outputs, tags, namespace and code digest
(:func:`kvx_runtime.cache.key.code_digest`), so the memo keeps those, under a key over
everything they are made from:

- every file of the project's package, of its configuration folder and at the project's top
  level (by content: a new pipeline folder, an edited helper, a changed parameters file);
- every module file loaded at the time that is not installed (a sibling source folder, an
  editable install, kvx-runtime's own checkout), by content;
- Python's version and every installed distribution's version; the Kedro env; the process's
  environment variables (a pipeline registry may read one).

Anything else a registry builds pipelines from (a file elsewhere, a database, the clock) is out
of its sight: ``run_config.cache.remember_pipelines: false`` turns the memo off (docs/cache.md).
A memo that does not match, cannot be read or does not rebuild the same pipeline is a miss: the
pipelines are imported as without it. Nodes rebuilt from a memo carry a stand-in function
(:class:`~kvx_runtime.cache.key.KnownCode`): they are planned, never run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvx_runtime.cache.key import KnownCode, code_digest, environment_digest, is_installed, project_dirs_of
from kvx_runtime.config.storage_root import LOCAL_STATE_DIR
from kvx_runtime.log import get_logger

if TYPE_CHECKING:
    from kvx_runtime.project import KedroProject

__all__ = ["MEMO_DIR", "remembered_pipeline"]

log = get_logger(__name__)

#: Under the project's local state folder.
MEMO_DIR = "pipelines"
_FORMAT = 1
#: Variables a shell changes between two commands typed in it: no pipeline depends on them.
_VOLATILE_ENV = frozenset({"_", "OLDPWD", "SHLVL", "COLUMNS", "LINES", "TERM_SESSION_ID", "WINDOWID"})


def remembered_pipeline(project: KedroProject, name: str, load: Callable[[], Any]) -> Any:
    """The pipeline ``name`` rebuilt from the memo when nothing it is made from changed, else
    ``load()``'s, remembered for the next command (when the memo is on for the project)."""
    if not project.plugin_config.run_config.cache.remember_pipelines:
        return load()
    path = _memo_path(project, name)
    remembered = _valid_memo(project, name, path)
    if remembered is not None:
        pipeline = _rebuilt(remembered["nodes"])
        if pipeline is not None:
            log.debug("pipeline rebuilt from the memo: its code is not imported", pipeline=name, memo=str(path))
            return pipeline
    unchanged = _memo_key(project, name, ())  # the project's files as the pipelines are imported
    pipeline = load()
    if _memo_key(project, name, ()) == unchanged:  # else edited meanwhile: which version was imported?
        _remember(project, name, pipeline, path)
    return pipeline


def parameters_untyped(project: KedroProject, name: str) -> bool:
    """Whether the memo of ``name`` holds and says no node of the project's registered pipelines
    types its parameters (Kedro >= 1.x converts parameters by those annotations, importing every
    pipeline to find them: with none, a context's parameters are the configured ones as they are)."""
    if not project.plugin_config.run_config.cache.remember_pipelines:
        return False
    remembered = _valid_memo(project, name, _memo_path(project, name))
    return remembered is not None and remembered.get("typed_parameters") is False


def _valid_memo(project: KedroProject, name: str, path: Path) -> dict[str, Any] | None:
    _environment_variables()  # as they are before any pipeline code is imported
    remembered = _read(path)
    if remembered is None or remembered.get("key") != _memo_key(project, name, remembered["files"]):
        return None
    return remembered


def _memo_path(project: KedroProject, name: str) -> Path:
    file = hashlib.sha256(f"{project.env}\0{name}".encode()).hexdigest()[:24]
    return project.path / LOCAL_STATE_DIR / MEMO_DIR / f"{file}.json"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or found.get("format") != _FORMAT or not isinstance(found.get("nodes"), list) \
            or not isinstance(found.get("files"), list):
        return None
    return found


def _remember(project: KedroProject, name: str, pipeline: Any, path: Path) -> None:
    """Write the memo of ``pipeline`` when it rebuilds exactly (same nodes, names, datasets,
    tags, order); never fails the command."""
    dirs = project_dirs_of(project.package_name)
    try:
        records = [_record(node, dirs) for node in pipeline.nodes]
        rebuilt = _rebuilt(records)
    except Exception as exc:  # a node Kedro cannot rebuild from its public description
        log.debug("pipeline not remembered", pipeline=name, reason=f"{type(exc).__name__}: {exc}")
        return
    if rebuilt is None or _shape(rebuilt) != _shape(pipeline):
        log.debug("pipeline not remembered: it does not rebuild the same", pipeline=name)
        return
    typed = _typed_parameters()
    files = sorted(_loaded_code_files(project))
    memo = {"format": _FORMAT, "pipeline": name, "key": _memo_key(project, name, files), "files": files,
            "typed_parameters": typed, "nodes": records}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(memo, separators=(",", ":")))
        os.replace(temporary, path)
    except OSError as exc:  # a read-only project: the next command imports the pipelines again
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        log.debug("pipeline not remembered", pipeline=name, reason=str(exc))


def _typed_parameters() -> bool | None:
    """Whether a node of the registered pipelines (all of them) types its parameters; None: this
    Kedro does not type parameters, or it cannot be told. Kedro's request of pipelines is left
    as it was."""
    try:
        from kedro.framework.project import pipelines
        from kedro.validation.type_extractor import TypeExtractor
    except ImportError:
        return None
    requested = getattr(pipelines, "_requested_pipelines", None)
    try:
        pipelines.set_requested(None)
        return bool(TypeExtractor(dict(pipelines)).extract_types_from_pipelines())
    except Exception:  # a registry that does not load whole: typed or not, untold
        return None
    finally:
        pipelines.set_requested(requested)


def _record(node: Any, dirs: list[Path]) -> dict[str, Any]:
    digest, why = code_digest(node.func, dirs)
    namespace = node.namespace
    name = node.name.removeprefix(f"{namespace}.") if namespace else node.name
    func = node.func
    return {
        "name": name, "namespace": namespace, "inputs": list(node.inputs), "outputs": list(node.outputs),
        "tags": sorted(node.tags), "confirms": _confirms(node),
        "func": {"name": str(getattr(func, "__name__", type(func).__name__)),
                 "module": str(getattr(func, "__module__", "")), "code": digest, "uncacheable": why},
    }


def _confirms(node: Any) -> list[str]:
    confirms = node.confirms
    if confirms is None:
        return []
    return [confirms] if isinstance(confirms, str) else list(confirms)


def _rebuilt(records: list[Any]) -> Any:
    """The pipeline of ``records``, None when they do not make one."""
    from kedro.pipeline import Pipeline
    from kedro.pipeline.node import Node

    try:
        nodes = []
        for record in records:
            func = record["func"]
            stand_in = KnownCode(func["name"], func["module"], func["code"], func["uncacheable"])
            made = functools.partial(Node, stand_in, record["inputs"] or None, record["outputs"] or None,
                                     tags=record["tags"], confirms=record["confirms"] or None,
                                     namespace=record["namespace"])
            try:
                nodes.append(made(name=record["name"]))
            except ValueError:  # a name Kedro made itself and refuses to be given (a lambda's): made again
                nodes.append(made())
        return Pipeline(nodes)
    except Exception:  # written by another Kedro, or edited by hand
        return None


def _shape(pipeline: Any) -> list[tuple[Any, ...]]:
    return [(node.name, node.namespace, list(node.inputs), list(node.outputs), sorted(node.tags),
             _confirms(node)) for node in pipeline.nodes]


def _loaded_code_files(project: KedroProject) -> set[str]:
    """Module files loaded now that the project's folders do not hold and no distribution
    installed: the rest of the code a pipeline can be made of."""
    tracked = _tracked_roots(project)
    found = set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not isinstance(file, str) or not file.endswith(".py"):
            continue
        path = Path(file).resolve()
        if not is_installed(path) and not any(path.is_relative_to(root) for root in tracked):
            found.add(str(path))
    return found


def _tracked_roots(project: KedroProject) -> list[Path]:
    return [*project_dirs_of(project.package_name), project.conf_root.resolve()]


def _memo_key(project: KedroProject, name: str, files: Iterable[str]) -> str:
    hasher = hashlib.sha256()

    def add(*chunks: str | bytes) -> None:
        for chunk in chunks:
            data = chunk.encode() if isinstance(chunk, str) else chunk
            hasher.update(len(data).to_bytes(8, "little"))
            hasher.update(data)

    add(str(_FORMAT), name, project.env, project.package_name, str(project.path.resolve()), environment_digest())
    add(_environment_variables())
    top_level = sorted(entry for entry in project.path.iterdir() if entry.is_file())
    for path in [*(file for root in _tracked_roots(project) for file in _files_under(root)), *top_level,
                 *(Path(file) for file in files)]:
        add(str(path))
        try:
            add(hashlib.sha256(path.read_bytes()).digest())
        except OSError:
            add("missing")
    return hasher.hexdigest()


def _files_under(root: Path) -> list[Path]:
    """Every file under ``root`` (a folder) or ``root`` itself (a packed configuration), sorted;
    Python's caches and hidden entries left out."""
    if root.is_file():
        return [root]
    found: list[Path] = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(sub for sub in subfolders if sub != "__pycache__" and not sub.startswith("."))
        found.extend(Path(folder) / file for file in sorted(files) if not file.startswith("."))
    return found


@functools.cache
def _environment_variables() -> str:
    """A digest of the process's variables (their values are never written), as they were
    before the first pipeline was looked up: importing a project's code sets some (OpenMP's
    ``KMP_*``), which the next command starts without."""
    text = "\0".join(f"{key}={value}" for key, value in sorted(os.environ.items()) if key not in _VOLATILE_ENV)
    return hashlib.sha256(text.encode()).hexdigest()
