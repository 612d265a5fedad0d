"""The project's pipelines as planning with the step cache last saw them, remembered between
commands so that an unchanged project is planned without importing its code.

Importing a project's pipelines imports everything its node modules import (pandas,
scikit-learn, ...): most of an unchanged second ``run-local --cache on``, whose steps are all
served. Planning reads only each node's name, inputs, outputs, tags, namespace and code digest
(:func:`kvx_runtime.cache.key.code_digest`), so the memo keeps those, under a key over
everything they are made from:

- every file of the project's source folder (its package, helpers and packages beside it)
  and of its configuration folder, symbolic links followed, and its top-level configuration
  files, by content: a new pipeline folder, an edited helper, a changed parameters file;
- every module file loaded that no distribution installed (an editable install, a folder or a
  zip on the path, kvx-runtime's own checkout), and every file the code digests read (a helper
  a node imports inside its body), by content;
- Python's version and every installed distribution's version; the Kedro env; the environment
  variables the command started with (a registry may read one) but those a shell changes
  between commands and those kvx-runtime exports for a run.

Anything else a registry builds pipelines from (a file elsewhere, a database, the clock) is out
of its sight: ``run_config.cache.remember_pipelines: false`` turns the memo off (docs/cache.md);
so is a configuration that is not a folder here. A memo that does not match, cannot be read or
does not rebuild the same pipeline is a miss: the pipelines are imported as without it; one is
written only when nothing it covers changed while the pipelines were imported. A memo written
by a load without the compile's checks never stands in for a compile's load. Nodes rebuilt from
a memo carry a stand-in function (:class:`~kvx_runtime.cache.key.KnownCode`): they are planned,
never run.
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

from kvx_runtime.cache.key import (
    KnownCode,
    add_chunks,
    code_digest,
    environment_digest,
    is_installed,
    project_dirs_of,
    sources_read,
)
from kvx_runtime.config.storage_root import LOCAL_STATE_DIR
from kvx_runtime.config_loader import STORAGE_ROOT_PLACEHOLDER, env_var_name
from kvx_runtime.log import get_logger

if TYPE_CHECKING:
    from kvx_runtime.project import KedroProject

__all__ = ["MEMO_DIR", "remembered_pipeline"]

log = get_logger(__name__)

#: Under the project's local state folder.
MEMO_DIR = "pipelines"
_FORMAT = 1


def remembered_pipeline(project: KedroProject, name: str, load: Callable[[], Any], *, checked: bool) -> Any:
    """The pipeline ``name`` rebuilt from the memo when nothing it is made from changed, else
    ``load()``'s, remembered for the next command (when the memo is on for the project).
    ``checked``: ``load`` refuses a registry whose pipeline modules do not all import or whose
    ``name`` differs loaded alone (the compile's checks): only a memo written by such a load
    stands in for it."""
    if not _memo_on(project):
        return load()
    path = _memo_path(project, name)
    remembered = _valid_memo(project, name, path)
    if remembered is not None and (remembered.get("checked") is True or not checked):
        pipeline = _rebuilt(remembered["nodes"])
        if pipeline is not None:
            from kvx_runtime.project_pipelines import request_pipeline

            request_pipeline(name)  # Kedro's registry as loading it leaves it (what it types parameters by)
            log.debug("pipeline rebuilt from the memo: its code is not imported", pipeline=name, memo=str(path))
            return pipeline
    before = _project_part(project, name)  # the project's files as the pipelines are imported
    pipeline = load()
    _remember(project, name, pipeline, path, before, checked)
    return pipeline


def parameters_untyped(project: KedroProject, name: str) -> bool:
    """Whether the memo of ``name`` holds and says no node of the project's registered pipelines
    types its parameters (Kedro >= 1.x converts parameters by those annotations, importing every
    pipeline to find them: with none, a context's parameters are the configured ones as they are)."""
    if not _memo_on(project):
        return False
    remembered = _valid_memo(project, name, _memo_path(project, name))
    return remembered is not None and remembered.get("typed_parameters") is False


def _memo_on(project: KedroProject) -> bool:
    """Asked for, and the configuration is a folder here (a remote one is not seen to change)."""
    return bool(project.plugin_config.run_config.cache.remember_pipelines) and project.conf_root.exists()


def _valid_memo(project: KedroProject, name: str, path: Path) -> dict[str, Any] | None:
    _environment_variables()  # as they are before any pipeline code is imported
    remembered = _read(path)
    if remembered is None:
        return None
    files = _files_part(remembered["files"])
    if files is None or remembered.get("key") != _combined(_project_part(project, name), files):
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


def _remember(project: KedroProject, name: str, pipeline: Any, path: Path, before: str, checked: bool) -> None:
    """Write the memo of ``pipeline`` when it rebuilds exactly (same nodes, names, datasets,
    tags, order) and nothing it is made from changed while it was loaded and described (which
    version would it be?); never fails the command."""
    dirs = project_dirs_of(project.package_name)
    tracked = _tracked_roots(project)
    loaded = _loaded_code_files(tracked)
    loaded_part = _files_part(sorted(loaded))  # as soon as they are known, as they were imported
    try:
        with sources_read() as read:  # what the code digests read: a helper a node imports in its body too
            records = [_record(node, dirs) for node in pipeline.nodes]
        rebuilt = _rebuilt(records)
    except Exception as exc:  # a node Kedro cannot rebuild from its public description
        log.debug("pipeline not remembered", pipeline=name, reason=f"{type(exc).__name__}: {exc}")
        return
    if rebuilt is None or _shape(rebuilt) != _shape(pipeline):
        log.debug("pipeline not remembered: it does not rebuild the same", pipeline=name)
        return
    typed = _typed_parameters()
    files = sorted(loaded | {str(file) for file in read if not _under(file, tracked)})
    files_part = _files_part(files)
    if loaded_part is None or files_part is None or _files_part(sorted(loaded)) != loaded_part \
            or _project_part(project, name) != before:
        log.debug("pipeline not remembered: its code changed while it was loaded, or cannot be read", pipeline=name)
        return
    memo = {"format": _FORMAT, "pipeline": name, "key": _combined(before, files_part), "files": files,
            "checked": checked, "typed_parameters": typed, "nodes": records}
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


def _loaded_code_files(tracked: list[Path]) -> set[str]:
    """The files of the modules loaded now that ``tracked`` folders do not hold and no
    distribution installed (a sibling source folder, an editable install, a zip on the path):
    the rest of the code a pipeline can be made of."""
    found = set()
    for module in list(sys.modules.values()):
        file = getattr(getattr(module, "__loader__", None), "archive", None) or getattr(module, "__file__", None)
        if not isinstance(file, str):
            continue
        path = Path(file).resolve()
        if not is_installed(path) and not _under(path, tracked):
            found.add(str(path))
    return found


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _tracked_roots(project: KedroProject) -> list[Path]:
    """The package's folders (with their source folder: sibling packages, helpers beside it)
    and the configuration's."""
    roots = []
    for package in project_dirs_of(project.package_name):
        source = package.parent
        roots.append(source if source != project.path.resolve() and source.parent == project.path.resolve()
                     else package)
    return [*roots, project.conf_root.resolve()]


#: Top-level files a registry may read (pyproject.toml, a .env, a steps.yml): not logs or databases.
_TOP_LEVEL_SUFFIXES = (".toml", ".cfg", ".ini", ".yml", ".yaml", ".json", ".py", ".txt", ".env")


def _project_part(project: KedroProject, name: str) -> str:
    """The digest of what the key covers in the project and this process: its package's and
    configuration's files, its top-level configuration files, the versions, env, variables."""
    hasher = hashlib.sha256()
    add_chunks(hasher, str(_FORMAT), name, project.env, project.package_name, str(project.path.resolve()),
         environment_digest(), _environment_variables())
    top_level = sorted(entry for entry in project.path.iterdir()
                       if entry.is_file() and entry.name.lower().endswith(_TOP_LEVEL_SUFFIXES))
    for path in [*(file for root in _tracked_roots(project) for file in _files_under(root)), *top_level]:
        add_chunks(hasher, str(path), _content(path) or b"unreadable")
    return hasher.hexdigest()


def _files_part(files: Iterable[str]) -> str | None:
    """The digest of ``files`` by content; None when one cannot be read."""
    hasher = hashlib.sha256()
    for file in files:
        content = _content(Path(file))
        if content is None:
            return None
        add_chunks(hasher, file, content)
    return hasher.hexdigest()


def _combined(project_part: str, files_part: str) -> str:
    return hashlib.sha256(f"{project_part}:{files_part}".encode()).hexdigest()


def _content(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _files_under(root: Path) -> list[Path]:
    """Every file under ``root`` (a folder, symbolic links followed) or ``root`` itself (a
    packed configuration), sorted; Python's caches and hidden entries left out."""
    if root.is_file():
        return [root]
    found: list[Path] = []
    seen: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(sub for sub in subfolders if sub != "__pycache__" and not sub.startswith("."))
        found.extend(Path(folder) / file for file in sorted(files) if not file.startswith("."))
    return found


#: Variables no pipeline is made from: what a shell or terminal changes between two commands,
#: and what kvx-runtime itself exports for a run (its identity, storage root, MLflow run).
_VOLATILE_ENV = frozenset({"_", "OLDPWD", "PWD", "SHLVL", "COLUMNS", "LINES", "WINDOWID", "TMUX_PANE",
                           *(env_var_name(name) for name in ("run_id", "job_name", STORAGE_ROOT_PLACEHOLDER)),
                           "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"})  # MLflow's names for the run a step attached
_VOLATILE_ENV_PREFIXES = ("SSH_", "VSCODE_", "TERM_", "PYTEST_")


@functools.cache
def _environment_variables() -> str:
    """A digest of the process's variables (their values are never written), as they were
    before the first pipeline was looked up: importing a project's code sets some (OpenMP's
    ``KMP_*``), which the next command starts without."""
    text = "\0".join(f"{key}={value}" for key, value in sorted(os.environ.items())
                     if key not in _VOLATILE_ENV and not key.startswith(_VOLATILE_ENV_PREFIXES))
    return hashlib.sha256(text.encode()).hexdigest()
