"""The cache key of a step: a digest over everything that can change what its nodes write, and
nothing else, kept as named parts so that a miss can say what changed.

Parts (each a digest; ``StepKey.parts``):

- ``nodes``: the step's nodes, each with its inputs and outputs;
- ``code:<node>``: the source of the node's function and of every module of the project it can
  reach (its module and the project modules imported from there, transitively, read from the
  files); a module that imports by name at run time (``importlib``, ``__import__``) makes the
  whole package count, as does a callable made at run time (a partial, a closure, a bound
  method, a callable object: with the values bound to it). A function from a library counts by
  its name: the library's version is in ``environment``;
- ``code:hooks``, ``code:dataset:<dataset>``: the project's hooks and its own dataset classes;
- ``environment``: Python's version and every installed distribution with its version (Kedro,
  kvx-runtime and the libraries the nodes call): where the steps run. A planner elsewhere (a
  laptop planning a cloud run) passes the environment an earlier entry recorded instead;
- ``code_archive``: the code archive's digest (``--code-upload``), when the step runs one;
- ``param:<input>``: the resolved value of each parameter input (``params:x``, ``parameters``),
  run-time ``--param`` values included (they are merged into the parameters before);
- ``input:<dataset>``: a dataset made by another step of the pipeline counts as that step's key
  (input addressing: a hit upstream hands down exactly what this step's cached run read; a miss
  upstream changes this key); a dataset no node makes is fingerprinted by its store: a local
  file's (or folder's) bytes, a remote object's checksum or generation (GCS ``crc32c`` /
  ``generation``, S3 ``ETag``/``VersionId``), the newest version of a versioned dataset;
- ``output:<dataset>``: the dataset's catalog entry but where it is (``memory`` for an
  intermediate); a raw input's entry counts the same way beside its fingerprint;
- ``env``: the Kedro environment; ``salt``: ``run_config.cache.salt``.

What cannot be fingerprinted (a raw input without a file, a store that gives no checksum, a
function defined outside any file, a node tagged ``no-cache``, an input from a step that is
itself uncacheable) makes the step uncacheable, and :attr:`StepKey.uncacheable` says why.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "KeyContext",
    "KnownCode",
    "StepKey",
    "add_chunks",
    "catalog_entries",
    "code_digest",
    "environment_digest",
    "fingerprint_path",
    "is_installed",
    "project_dirs_of",
    "sources_read",
    "step_identity",
    "step_keys",
]

#: Nodes with this tag never hit (``run_config.cache.no_cache_tag`` names another).
NO_CACHE_TAG = "no-cache"
#: Remote object fields that change whenever its bytes do, strongest first, per store.
_CHECKSUM_FIELDS = ("crc32c", "md5Hash", "generation", "ETag", "VersionId", "etag", "checksum")
_RUNTIME_IMPORTS = ("import_module", "__import__")


def add_chunks(hasher: Any, *chunks: bytes | str) -> None:
    """Feed ``chunks`` to ``hasher``, each prefixed by its length (``ab`` + ``c`` is not ``a`` + ``bc``)."""
    for chunk in chunks:
        data = chunk.encode() if isinstance(chunk, str) else chunk
        hasher.update(len(data).to_bytes(8, "little"))
        hasher.update(data)


def _digest(*chunks: bytes | str) -> str:
    hasher = hashlib.sha256()
    add_chunks(hasher, *chunks)
    return hasher.hexdigest()


def _canonical(value: Any) -> str:
    """A stable text for a value (float formatting does not matter; dict order does, since a node
    may iterate a dict; something JSON cannot say is written by ``repr``, which may make a
    spurious miss, never a stale hit, as long as it shows the value)."""
    return json.dumps(value, default=repr, separators=(",", ":"))


@dataclass(frozen=True)
class StepKey:
    """A step's cache key, by parts."""

    step: str
    parts: Mapping[str, str]
    #: Why the step can never hit (empty: it can).
    uncacheable: tuple[str, ...] = ()
    #: Output dataset -> the file system options its place is reached with (the catalog entry's
    #: credentials and ``fs_args``): to fingerprint, look up and serve it as the dataset saves
    #: it. Never part of the digest, never written, never shown.
    reach: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, repr=False, compare=False)
    #: Dataset this step makes (transcoding resolved) -> the key of the node making it, as
    #: downstream keys count it: what the job directory records the data was made under.
    made: Mapping[str, str] = field(default_factory=dict, compare=False)
    #: Dataset made upstream that this step reads -> the producing node's key this key counts:
    #: the data in this run must have been made under it for an entry to be recorded.
    upstream: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def digest(self) -> str:
        return _digest(*(f"{name}={value}" for name, value in sorted(self.parts.items())))

    @property
    def cacheable(self) -> bool:
        return not self.uncacheable

    def changes(self, before: StepKey) -> list[str]:
        """The parts that differ from ``before`` (added, removed or changed), sorted."""
        names = set(self.parts) | set(before.parts)
        return sorted(name for name in names if self.parts.get(name) != before.parts.get(name))


@dataclass(frozen=True)
class KeyContext:
    """What the keys of a pipeline's steps are computed from."""

    #: A Kedro pipeline (``nodes`` in topological order, each with ``name``, ``func``, ``inputs``,
    #: ``outputs``, ``tags``).
    pipeline: Any
    #: Step name -> the names of its nodes.
    steps: Mapping[str, Sequence[str]]
    #: The resolved parameters (``context.params``, run-time values merged).
    params: Mapping[str, Any]
    #: Dataset name -> its resolved catalog entry (None: not in the catalog, a memory dataset).
    catalog_entry: Callable[[str], Mapping[str, Any] | None]
    env: str
    #: The directories of the project's own code (its package's source).
    project_dirs: Sequence[Path]
    salt: str = ""
    no_cache_tag: str = NO_CACHE_TAG
    #: The code archive's digest, when the steps run one.
    code_identity: str = ""
    #: The ``environment`` part of where the steps run, when that is not here (None: here's).
    environment: str | None = None
    #: Dataset name -> a load version pinned for the run (``--load-versions``).
    load_versions: Mapping[str, str] = field(default_factory=dict)
    #: The modules of the project's hooks (``settings.HOOKS``): they may change what a node
    #: reads or writes, so their code counts for every node.
    hook_modules: Sequence[str] = ()


class _NodeKeys:
    """Each node's key, computed once and only for the nodes asked and their ancestors: a
    dataset made by a node counts, downstream, as that node's key (whatever the grouping of
    nodes into steps, so a step can compute its key without knowing the others' grouping)."""

    def __init__(self, context: KeyContext) -> None:
        self.context = context
        #: Kedro's topological order (its ``nodes`` sorts again at every call).
        self.order = list(context.pipeline.nodes)
        self.nodes = {node.name: node for node in self.order}
        #: Dataset (transcoding resolved: ``x@pandas`` and ``x@spark`` are one) -> the node making it.
        self.producer = {_dataset(output): node.name for node in self.order for output in node.outputs}
        self.environment = context.environment or environment_digest()
        self.hooks_code = _modules_digest(context.hook_modules, context.project_dirs)
        self.keys: dict[str, StepKey] = {}

    def key(self, name: str) -> StepKey:
        if name not in self.keys:
            needed = self._uncomputed_ancestors(name)
            # Kedro's node order is topological: upstream keys exist when a node's is computed.
            for node in self.order if needed else ():
                if node.name in needed:
                    self.keys[node.name] = self._compute(node)
            self.keys[name] = self._compute(self.nodes[name])
        return self.keys[name]

    def _uncomputed_ancestors(self, name: str) -> set[str]:
        found: set[str] = set()
        pending = [name]
        while pending:
            for dataset in self.nodes[pending.pop()].inputs:
                producer = self.producer.get(_dataset(dataset))
                if producer is not None and producer not in found and producer not in self.keys:
                    found.add(producer)
                    pending.append(producer)
        return found

    def _compute(self, node: Any) -> StepKey:
        context = self.context
        parts: dict[str, str] = {
            "environment": self.environment,
            "env": _digest(context.env),
            "salt": _digest(context.salt),
        }
        if context.code_identity:
            parts["code_archive"] = _digest(context.code_identity)
        reasons: list[str] = []
        if context.no_cache_tag in node.tags:
            reasons.append(f"node {node.name} is tagged {context.no_cache_tag}")
        if not node.outputs:
            reasons.append(f"node {node.name} has no outputs (it runs for what it does, not what it returns)")
        digest, why = code_digest(node.func, context.project_dirs)
        parts[f"code:{node.name}"] = digest
        if why:
            reasons.append(f"node {node.name}: {why}")
        if self.hooks_code:
            parts["code:hooks"] = self.hooks_code
        for name in node.inputs:
            if name == "parameters" or name.startswith("params:"):
                parts[f"param:{name}"] = _digest(_canonical(_parameter(context.params, name)))
            elif _dataset(name) in self.producer:
                producer = self.producer[_dataset(name)]
                upstream = self.key(producer)
                if not upstream.cacheable:
                    reasons.append(f"input {name} comes from node {producer}, which is not cacheable")
                parts[f"input:{name}"] = _digest("node", upstream.digest, name,
                                                 _canonical(_settings(context.catalog_entry(name))))
            else:
                digest, why = _raw_input(name, context)
                parts[f"input:{name}"] = digest
                if why:
                    reasons.append(f"input {name}: {why}")
        for name in node.outputs:
            entry = context.catalog_entry(name)
            parts[f"output:{name}"] = _digest(_canonical("memory" if entry is None else _settings(entry)))
        for name in [*node.inputs, *node.outputs]:
            dataset_code = _dataset_type_code(context.catalog_entry(name), context.project_dirs)
            if dataset_code:
                parts[f"code:dataset:{name}"] = dataset_code
        parts["nodes"] = _digest(_canonical([node.name, list(node.inputs), list(node.outputs)]))
        return StepKey(step=node.name, parts=parts, uncacheable=tuple(dict.fromkeys(reasons)))


def step_identity(nodes: Iterable[str]) -> str:
    """What the cache calls a step (its last entry is kept under it): its nodes, whatever the
    target names the step."""
    return "+".join(sorted(nodes))


def step_keys(context: KeyContext, only: Iterable[str] | None = None) -> dict[str, StepKey]:
    """The key of every step of ``context.steps`` (or of the steps named in ``only``): its
    nodes' parts, less the datasets one member hands another, with the "nodes" part over all
    members. Nodes outside the steps asked for are keyed only as far as these depend on them."""
    node_keys = _NodeKeys(context)
    unknown = sorted({name for names in context.steps.values() for name in names} - set(node_keys.nodes))
    if unknown:
        raise ValueError(f"steps name nodes the pipeline does not have: {', '.join(unknown)}")
    wanted = list(context.steps) if only is None else list(only)
    keys: dict[str, StepKey] = {}
    for step in wanted:
        members = [node_keys.nodes[name] for name in context.steps[step]]
        made_here = {_dataset(output) for node in members for output in node.outputs}
        inputs_made_here = {name for node in members for name in node.inputs if _dataset(name) in made_here}
        parts: dict[str, str] = {}
        reasons: list[str] = []
        for node in members:
            key = node_keys.key(node.name)
            parts.update({part: value for part, value in key.parts.items()
                          if part != "nodes" and part.removeprefix("input:") not in inputs_made_here})
            reasons.extend(reason for reason in key.uncacheable
                           if not any(reason.startswith(f"input {name} ") for name in inputs_made_here))
        parts["nodes"] = _digest(*(node_keys.key(node.name).parts["nodes"]
                                   for node in sorted(members, key=lambda node: node.name)))
        reach = {name: options for node in members for name in node.outputs
                 if (options := _storage_options(context.catalog_entry(name) or {}))}
        made = {_dataset(output): node_keys.key(node.name).digest for node in members for output in node.outputs}
        upstream = {_dataset(name): node_keys.key(node_keys.producer[_dataset(name)]).digest
                    for node in members for name in node.inputs
                    if _dataset(name) in node_keys.producer and _dataset(name) not in made_here}
        keys[step] = StepKey(step=step_identity(context.steps[step]), parts=parts,
                             uncacheable=tuple(dict.fromkeys(reasons)), reach=reach, made=made, upstream=upstream)
    return keys


def _parameter(params: Mapping[str, Any], name: str) -> Any:
    """``parameters`` -> all of them; ``params:a.b`` -> ``params["a"]["b"]`` (or the key
    ``a.b`` itself, as Kedro resolves it)."""
    if name == "parameters":
        return params
    path = name.removeprefix("params:")
    if path in params:
        return params[path]
    value: Any = params
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return "<missing>"  # Kedro itself refuses such a run: any stable text will do
        value = value[part]
    return value


def _raw_input(name: str, context: KeyContext) -> tuple[str, str | None]:
    """A digest of what a dataset no node makes holds now, or why it cannot be told."""
    entry = context.catalog_entry(name)
    if entry is None:
        return _digest("absent"), "not in the catalog (a memory dataset nothing writes)"
    path = entry.get("filepath") or entry.get("path")
    if not isinstance(path, str):
        return _digest("no-file"), f"a {entry.get('type')} dataset has no file to fingerprint"
    options = _storage_options(entry)
    if entry.get("versioned"):
        try:
            version = context.load_versions.get(name) or _newest_version(path, options)
        except Exception as exc:  # the store cannot be asked: never a crash, never a guess
            return _digest("unreadable", path), f"the versions of {path} cannot be listed ({_failure(exc)})"
        if version is None:
            return _digest("no-version"), f"no version of {path} yet"
        path = f"{path.rstrip('/')}/{version}/{path.rstrip('/').rsplit('/', 1)[-1]}"
    digest, why = fingerprint_path(path, options)
    return _digest(_canonical(_settings(entry)), digest), why


def _dataset(name: str) -> str:
    """The dataset a node's input or output names (Kedro's transcoding: ``x@pandas`` is ``x``)."""
    return name.split("@", 1)[0]


#: Configuration keys that say where a dataset is (fingerprinted by its content instead, or,
#: for an output, this run's place for it) or how to reach it, not what it holds.
_LOCATION_KEYS = frozenset({"filepath", "path", "credentials"})


def _settings(entry: Mapping[str, Any] | None) -> Any:
    """A dataset's configuration less where it is (at any depth: a wrapped dataset's own
    ``filepath`` too): its type, load and save arguments, file format, ``fs_args``, key in the
    file, wrapped dataset... everything that changes what is read or written."""
    if isinstance(entry, Mapping):
        return {str(key): _settings(value) for key, value in entry.items() if key not in _LOCATION_KEYS}
    if isinstance(entry, list | tuple):
        return [_settings(value) for value in entry]
    return entry


def _storage_options(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The file system options a dataset reaches its file with, as Kedro's file datasets build
    them: its credentials and ``fs_args`` (less the arguments of ``open``)."""
    credentials = entry.get("credentials")
    fs_args = entry.get("fs_args")
    options = dict(credentials) if isinstance(credentials, Mapping) else {}
    if isinstance(fs_args, Mapping):
        options.update({key: value for key, value in fs_args.items()
                        if key not in ("open_args_load", "open_args_save")})
    return options


def _failure(exc: BaseException) -> str:
    from kvx_runtime.log import redact

    return redact(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")[:200]


def _filesystem(path: str, options: Mapping[str, Any]) -> tuple[Any, str]:
    import fsspec

    protocol = fsspec.core.split_protocol(path)[0] or "file"
    return fsspec.core.url_to_fs(path, **({} if protocol == "file" else dict(options)))


def _newest_version(path: str, options: Mapping[str, Any]) -> str | None:
    """The version Kedro loads by default: the newest (version names sort by time)."""
    filesystem, stripped = _filesystem(path, options)
    try:
        versions = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in filesystem.ls(stripped, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return None
    return max(versions) if versions else None


def fingerprint_path(path: str, options: Mapping[str, Any] | None = None) -> tuple[str, str | None]:
    """A digest of the file or folder at ``path`` as it is now, and why it could not be told
    (None when it could). Local files are read whole (a change that keeps the size and the
    modification time is still seen); remote objects count by the checksum their store keeps,
    reached with the dataset's own ``options`` (credentials, ``fs_args``). A store that cannot
    be asked (no credentials, no network) is a reason, never an exception."""
    try:
        return _fingerprint(path, options or {})
    except Exception as exc:
        return _digest("unreadable", path), f"{path} cannot be fingerprinted ({_failure(exc)})"


def _fingerprint(path: str, options: Mapping[str, Any]) -> tuple[str, str | None]:
    filesystem, stripped = _filesystem(path, options)
    local = "file" in (filesystem.protocol if isinstance(filesystem.protocol, tuple) else (filesystem.protocol,))
    try:
        if filesystem.isdir(stripped):
            found = filesystem.find(stripped, detail=True)
            files = sorted(found.items())
        else:
            files = [(stripped, filesystem.info(stripped))]
    except FileNotFoundError:
        return _digest("missing", path), f"{path} does not exist"
    chunks: list[str] = []
    for file_path, info in files:
        relative = file_path[len(stripped):]
        if local:
            chunks.append(_digest(relative, _file_sha256(file_path)))
            continue
        checksums = {name: info[name] for name in _CHECKSUM_FIELDS if info.get(name)}
        if not checksums:
            return _digest("no-checksum", path), f"the store of {path} gives no checksum of {file_path}"
        chunks.append(_digest(relative, _canonical(checksums), str(info.get("size"))))
    return _digest(*chunks), None


def _file_sha256(path: str) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(functools.partial(handle.read, 1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


@functools.lru_cache(maxsize=1)
def _distributions() -> str:
    """Every installed distribution with its version, from the names of the metadata folders on
    ``sys.path`` (``<name>-<version>.dist-info``, ``.egg-info``): what importlib.metadata finds,
    without parsing each METADATA file (hundreds of them: a third of a second)."""
    found: set[str] = set()
    for entry in sys.path:
        try:
            with os.scandir(entry or ".") as listing:
                names = [item.name for item in listing if item.name.endswith((".dist-info", ".egg-info"))]
        except OSError:  # a zip, a missing folder
            continue
        found.update(name.rsplit(".", 1)[0].lower().replace("_", "-") for name in names)
    return "\n".join(sorted(found))


def environment_digest() -> str:
    """Python's version and every installed distribution's version."""
    return _digest(sys.version, _distributions())


def _unwrap(func: Any) -> tuple[Any, list[Any], bool]:
    """The function a node's callable runs, the values bound to it on the way (a partial's
    arguments, a bound method's object, a callable object's state, a closure's cells), and
    whether it was made at run time (then the code that made it, wherever in the project, is
    what chose those values)."""
    bound: list[Any] = []
    made = False
    while True:
        if isinstance(func, functools.partial):
            bound.extend([func.args, func.keywords])
            func, made = func.func, True
        elif inspect.ismethod(func):
            bound.append(func.__self__)
            func, made = func.__func__, True
        elif hasattr(func, "__wrapped__"):
            func = func.__wrapped__
        elif callable(func) and not (inspect.isroutine(func) or inspect.isclass(func)):
            file = getattr(sys.modules.get(type(func).__module__), "__file__", None)
            if file is None or is_installed(Path(file).resolve()):
                break  # a library's callable object (a numpy ufunc): by its name and the library's version
            bound.append(func)  # a callable object of the project's: its class's code, its state
            func, made = type(func).__call__, True
        else:
            break
    for cell in getattr(func, "__closure__", None) or ():
        made = True
        try:
            bound.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    return func, bound, made


def _bound_text(value: Any, dirs: Sequence[Path], depth: int = 0) -> tuple[str, str | None]:
    """A stable text for a value bound to a node's function, by its whole content (a function:
    its code digest; plain data: its JSON; anything else: a digest of its pickle, never its
    ``repr``, which shortens arrays and frames), and why it cannot be told (it cannot be
    pickled: a lock, a connection)."""
    if inspect.isroutine(value) or isinstance(value, functools.partial):
        if depth > 3:
            return "deep", "its callables nest too deep to be fingerprinted"
        return code_digest(value, dirs, depth + 1)
    if inspect.isclass(value) or inspect.ismodule(value):
        return f"{value.__module__ if inspect.isclass(value) else ''}:{value.__name__}", None
    try:
        return json.dumps(value, separators=(",", ":")), None
    except (ValueError, TypeError, RecursionError):
        pass
    import cloudpickle

    try:
        data = cloudpickle.dumps(value)
    except Exception as exc:
        name = type(value).__qualname__
        return name, f"a value bound to it ({name}) cannot be fingerprinted: {_failure(exc)}"
    return "pickle:" + hashlib.sha256(data).hexdigest(), None


class KnownCode:
    """A node function's stand-in whose code digest is known: a node rebuilt from the pipeline
    memo (:mod:`kvx_runtime.cache.pipeline_memo`) is planned, never run."""

    def __init__(self, name: str, module: str, digest: str, why: str | None) -> None:
        self.__name__ = self.__qualname__ = name
        self.__module__ = module
        self.digest, self.why = digest, why

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.__module__}.{self.__name__} was rebuilt for planning: its code is not loaded")


def code_digest(func: Any, project_dirs: Sequence[Path], depth: int = 0) -> tuple[str, str | None]:
    """A digest of the code ``func`` can reach in the project, and why it cannot be told."""
    if isinstance(func, KnownCode):
        return func.digest, func.why
    func, bound, made = _unwrap(func)
    dirs = [Path(directory).resolve() for directory in project_dirs]
    texts: list[str] = []
    for value in bound:
        text, why = _bound_text(value, dirs, depth)
        if why:
            return _digest("unbound", text), why
        texts.append(text)
    digest, why = _function_digest(func, dirs)
    if made:  # a closure, partial or object: made by code the function does not reach
        digest = _digest(digest, *texts, *(_digest(str(_relative(file, dirs)), _source(file))
                                           for file in sorted(_all_sources(dirs))))
    return digest, why


def _function_digest(func: Any, dirs: Sequence[Path]) -> tuple[str, str | None]:
    module = inspect.getmodule(func)
    name = f"{getattr(module, '__name__', '?')}:{getattr(func, '__qualname__', type(func).__qualname__)}"
    file = getattr(module, "__file__", None)
    if module is None or file is None:
        if module is not None and module.__name__ in sys.builtin_module_names:
            return _digest("builtin", name), None
        return _digest("unknown", name), f"{name} is not defined in a file"
    path = Path(file).resolve()
    if is_installed(path):
        return _digest("library", name), None  # its version is in the environment part
    root = str(getattr(func, "__qualname__", "")).split(".")[0]
    sliced = _module_slice(_source(path), root, module.__name__, path.name == "__init__.py")
    if sliced is None:  # a lambda, a name made at run time: the whole module and what it imports
        texts: tuple[str, ...] = ()
        followed = [(module.__name__, path)]
    else:
        texts, imported = sliced
        followed = [(imported_name, found) for imported_name in imported
                    if (found := _project_file(imported_name, dirs)) is not None]
    files = _reachable_files(followed, dirs)
    return _digest(name, *texts, *(_digest(str(_relative(file, dirs)), _source(file)) for file in files)), None


def _modules_digest(modules: Iterable[str], project_dirs: Sequence[Path]) -> str:
    """A digest of the project's code that ``modules`` (those of them in the project) reach;
    "" when none is the project's."""
    dirs = [Path(directory).resolve() for directory in project_dirs]
    start = [(module, found) for module in dict.fromkeys(modules)
             if (found := _project_file(module, dirs)) is not None]
    if not start:
        return ""
    return _digest(*(_digest(str(_relative(file, dirs)), _source(file)) for file in _reachable_files(start, dirs)))


def _dataset_type_code(entry: Mapping[str, Any] | None, project_dirs: Sequence[Path]) -> str:
    """The code of a dataset class the project defines itself (``type: my_project.io.MyDataset``,
    also as a wrapped dataset's type): what it reads or writes is its code's doing. "" for
    Kedro's, kedro-datasets' and every installed library's (their versions count)."""
    modules: list[str] = []
    pending: list[Any] = [entry]
    while pending:
        item = pending.pop()
        if isinstance(item, Mapping):
            kind = item.get("type")
            if isinstance(kind, str) and "." in kind:
                modules.append(kind.rpartition(".")[0])
            pending.extend(item.values())
    return _modules_digest(modules, project_dirs) if modules else ""


@functools.lru_cache(maxsize=4096)
def _module_slice(source: bytes, root: str, module_name: str,
                  is_package: bool) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The part of a module that the top-level definition ``root`` can reach: every top-level
    statement that is not a definition or an import (module-level code runs whatever the node),
    the definitions reachable by name from those and from ``root``, and the modules bound to
    names they use. As text without comments or formatting (``ast.unparse``), so that editing
    another function of the module, or a comment, changes nothing. None when ``root`` is not a
    top-level definition (or the code imports by name at run time): then the whole module counts."""
    try:
        tree = _parse(source)
    except SyntaxError:
        return None
    package = module_name if is_package else module_name.rpartition(".")[0]
    definitions: dict[str, ast.stmt] = {}
    bindings: dict[str, list[str]] = {}
    always: list[ast.stmt] = []
    for statement in tree.body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            definitions[statement.name] = statement
        elif isinstance(statement, (ast.Import, ast.ImportFrom)):
            for bound, modules in _bindings(statement, package).items():
                bindings.setdefault(bound, []).extend(modules)
        else:
            always.append(statement)
            # Imports under a top-level try/if/with bind names too (``try: import fast as impl``).
            for inner in _top_level_nodes(statement):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    for bound, modules in _bindings(inner, package).items():
                        bindings.setdefault(bound, []).extend(modules)
    if root not in definitions:
        return None
    texts = [ast.unparse(statement) for statement in always]
    if any(call in text for text in texts for call in _RUNTIME_IMPORTS):
        return None
    pending = [root, *(name for statement in always for name in _names(statement))]
    reached: set[str] = set()
    # An import whose name nothing in the module reads is there for what importing it does (a
    # pandas accessor, a registry): whatever the node, it is followed; so is a star import.
    read = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    imported: list[str] = [module for bound, modules in bindings.items() if bound == "*" or bound not in read
                           for module in modules]
    while pending:
        name = pending.pop()
        if name in reached:
            continue
        reached.add(name)
        imported.extend(bindings.get(name, ()))
        definition = definitions.get(name)
        if definition is not None:
            text = ast.unparse(definition)
            if any(call in text for call in _RUNTIME_IMPORTS):
                return None
            texts.append(text)
            pending.extend(_names(definition))
            for inner in ast.walk(definition):  # imports inside a function body
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    imported.extend(module for modules in _bindings(inner, package).values() for module in modules)
    return tuple(texts), tuple(dict.fromkeys(imported))


def _top_level_nodes(statement: ast.stmt) -> Iterable[ast.AST]:
    """The nodes of a top-level statement that run with the module (not a function's or a
    class's body inside it)."""
    pending: list[ast.AST] = [statement]
    while pending:
        node = pending.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            pending.extend(ast.iter_child_nodes(node))


def _names(statement: ast.AST) -> list[str]:
    """The global names ``statement`` may read (``a`` of ``a.b.c`` too): names read, less a
    function's parameters and the names it assigns (unless declared ``global``). Comprehension
    scopes are not told apart: a name too many makes a spurious miss, never a stale hit."""
    return sorted(_free_names(statement))


def _free_names(node: ast.AST) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        arguments = node.args
        parameters = {arg.arg for arg in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                                          *filter(None, [arguments.vararg, arguments.kwarg])]}
        # Defaults, annotations and decorators are evaluated where the function is defined.
        outer: set[str] = set()
        for part in [*arguments.defaults, *filter(None, arguments.kw_defaults),
                     *getattr(node, "decorator_list", []), *filter(None, [getattr(node, "returns", None)])]:
            outer |= _free_names(part)
        body = node.body if isinstance(node.body, list) else [node.body]
        inner: set[str] = set()
        for statement in body:
            inner |= _free_names(statement)
        return outer | (inner - parameters - (_assigned(body) - _declared_global(body)))
    if isinstance(node, ast.Name):
        return {node.id} if isinstance(node.ctx, ast.Load) else set()
    found: set[str] = set()
    for child in ast.iter_child_nodes(node):
        found |= _free_names(child)
    return found


def _scope_nodes(body: Sequence[ast.AST]) -> Iterable[ast.AST]:
    """Every node of a function's own scope (not inside a nested function or class)."""
    pending = list(body)
    while pending:
        node = pending.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            pending.extend(ast.iter_child_nodes(node))


def _assigned(body: Sequence[ast.AST]) -> set[str]:
    names: set[str] = set()
    for node in _scope_nodes(body):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def _declared_global(body: Sequence[ast.AST]) -> set[str]:
    return {name for node in _scope_nodes(body) if isinstance(node, (ast.Global, ast.Nonlocal)) for name in node.names}


def _bindings(statement: ast.Import | ast.ImportFrom, package: str) -> dict[str, list[str]]:
    """Name bound by an import -> the modules it may stand for (``from a import b``: ``a.b``,
    a module, or ``a``, whose attribute b is; ``import a.b``: binds ``a``, runs both)."""
    bound: dict[str, list[str]] = {}
    if isinstance(statement, ast.Import):
        for alias in statement.names:
            parents = [alias.name.rsplit(".", depth)[0] for depth in range(alias.name.count(".") + 1)]
            bound.setdefault(alias.asname or alias.name.split(".")[0], []).extend(parents)
        return bound
    base = statement.module or ""
    if statement.level:
        try:
            base = importlib.util.resolve_name("." * statement.level + base, package)
        except (ImportError, ValueError):
            return bound
    parents = [base.rsplit(".", depth)[0] for depth in range(base.count(".") + 1)] if base else []
    for alias in statement.names:
        if alias.name == "*":
            bound.setdefault("*", []).extend(parents)
            continue
        bound.setdefault(alias.asname or alias.name, []).extend([f"{base}.{alias.name}", *parents])
    return bound


def _relative(path: Path, dirs: Sequence[Path]) -> Path:
    for directory in dirs:
        if path.is_relative_to(directory):
            return path.relative_to(directory)
    return path


#: The source files code digests read while :func:`sources_read` records them.
_sources_read: ContextVar[set[Path] | None] = ContextVar("kvx_sources_read", default=None)


def _source(path: Path) -> bytes:
    recording = _sources_read.get()
    if recording is not None:
        recording.add(path)
    return path.read_bytes()


@contextmanager
def sources_read() -> Iterator[set[Path]]:
    """The source files the code digests computed in the block read (whatever module they
    import, when: a node that imports a helper inside its body reads that helper's file)."""
    found: set[Path] = set()
    token = _sources_read.set(found)
    try:
        yield found
    finally:
        _sources_read.reset(token)


def _reachable_files(start: Sequence[tuple[str, Path]], dirs: Sequence[Path]) -> list[Path]:
    """The project's source files of the modules ``start`` and of those they import,
    transitively (sorted); every file of the project when one imports by name at run time."""
    seen: dict[Path, None] = {}
    pending = list(start)
    while pending:
        name, file = pending.pop()
        if file in seen:
            continue
        seen[file] = None
        source = _source(file)
        if any(call.encode() in source for call in _RUNTIME_IMPORTS):
            return sorted(_all_sources(dirs))
        for imported in _imports(source, name, file.name == "__init__.py"):
            found = _project_file(imported, dirs)
            if found is not None:
                pending.append((imported, found))
    return sorted(seen)


@functools.lru_cache(maxsize=4096)
def _parse(source: bytes) -> ast.Module:
    """A module's syntax tree, parsed once per content (a project's nodes share a few modules).
    Callers only read it."""
    return ast.parse(source)


@functools.lru_cache(maxsize=4096)
def _imports(source: bytes, module_name: str, is_package: bool) -> tuple[str, ...]:
    """Module names ``source`` imports (``from a import b`` gives ``a`` and ``a.b``: b may be a module)."""
    package = module_name if is_package else module_name.rpartition(".")[0]
    try:
        tree = _parse(source)
    except SyntaxError:
        return ()
    names: list[str] = []
    for statement in ast.walk(tree):
        if isinstance(statement, ast.Import):
            names.extend(alias.name for alias in statement.names)
        elif isinstance(statement, ast.ImportFrom):
            base = statement.module or ""
            if statement.level:
                try:
                    base = importlib.util.resolve_name("." * statement.level + base, package)
                except (ImportError, ValueError):
                    continue
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in statement.names if alias.name != "*")
    # A module's parents run first: importing a.b.c runs a/__init__.py and a/b/__init__.py.
    parents = [name.rsplit(".", depth)[0] for name in names for depth in range(1, name.count(".") + 1)]
    return tuple(name for name in dict.fromkeys([*names, *parents]) if name)


def _project_file(module_name: str, dirs: Sequence[Path]) -> Path | None:
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None) if module is not None else None
    if file is None:
        try:
            spec = importlib.util.find_spec(module_name)
        except (ImportError, ValueError):
            return None
        file = spec.origin if spec is not None and spec.has_location else None
    if not file or not file.endswith(".py"):
        return None
    path = Path(file).resolve()
    return None if is_installed(path) else path


@functools.lru_cache(maxsize=1)
def _installed_roots() -> tuple[Path, ...]:
    """Where installed distributions and the standard library live: their code counts by the
    distributions' versions. Code anywhere else (the project's package, a sibling source folder,
    an editable install) counts by its source."""
    import sysconfig

    roots = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib", "stdlib", "platstdlib")}
    roots |= {Path(path).resolve() for path in sys.path
              if path.rstrip("/").endswith(("site-packages", "dist-packages"))}
    return tuple(sorted(roots))


def is_installed(path: Path) -> bool:
    """Whether ``path`` belongs to an installed distribution or the standard library."""
    return any(path.is_relative_to(root) for root in _installed_roots())


def _all_sources(dirs: Sequence[Path]) -> list[Path]:
    return [path.resolve() for directory in dirs for path in directory.rglob("*.py")
            if "__pycache__" not in path.parts and not any(part.startswith(".") for part in
                                                          path.relative_to(directory).parts)]


def project_dirs_of(package_name: str) -> list[Path]:
    """The source directory of the project's package (what counts as the project's code)."""
    spec = importlib.util.find_spec(package_name)
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(location).resolve() for location in spec.submodule_search_locations]


def catalog_entries(catalog_config: Mapping[str, Any],
                    resolver: Any = None) -> Callable[[str], Mapping[str, Any] | None]:
    """A dataset's resolved catalog entry (dataset factories included), with its credentials as
    the catalog resolves them (the key reaches the dataset's store with them; they are never
    part of a digest: :func:`_settings`)."""
    resolved = getattr(resolver, "config", None)
    configs = resolved if isinstance(resolved, Mapping) else catalog_config

    def entry(name: str) -> Mapping[str, Any] | None:
        config = configs.get(name)
        if config is None and resolver is not None and resolver.match_dataset_pattern(name):
            config = resolver.resolve_pattern(name)
        return dict(config) if isinstance(config, Mapping) else None

    return entry


def key_context_of(kedro_context: Any, pipeline: Any, steps: Mapping[str, Sequence[str]], *, package_name: str,
                   salt: str = "", code_identity: str = "", environment: str | None = None,
                   load_versions: Mapping[str, str] | None = None, catalog: Any = None) -> KeyContext:
    """The key context of a loaded Kedro context (``session.load_context()``: its env, resolved
    parameters with run-time values merged, and catalog config). ``catalog``: the context's
    catalog when the caller has it already (each ``context.catalog`` builds a new one, firing
    the project's ``after_catalog_created`` hooks again)."""
    catalog_config = kedro_context.config_loader["catalog"]
    resolver = getattr(kedro_context.catalog if catalog is None else catalog, "config_resolver", None)
    return KeyContext(pipeline=pipeline, steps=steps, params=kedro_context.params,
                      catalog_entry=catalog_entries(catalog_config, resolver), env=kedro_context.env,
                      project_dirs=project_dirs_of(package_name), salt=salt, code_identity=code_identity,
                      environment=environment, load_versions=dict(load_versions or {}),
                      hook_modules=project_hook_modules())


def project_hook_modules() -> tuple[str, ...]:
    """The modules of the hooks the project registers (``settings.HOOKS``)."""
    from kedro.framework.project import settings

    return tuple(dict.fromkeys(type(hook).__module__ for hook in getattr(settings, "HOOKS", ()) or ()))
