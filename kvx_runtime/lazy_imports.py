"""Importing libraries without the optional integrations they load only because those happen to
be installed, and that kvx-runtime never uses: every process (each pipeline step) pays for them
at start-up otherwise."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["MLFLOW_PACKAGES_RUN_WHEN_USED", "AfterImport", "after_import", "defer_until_used", "is_deferred",
           "optional_modules_hidden"]

#: MLflow 3's ``import mlflow`` imports its GenAI package (judges, scorers, prompts, LiteLLM
#: adapters) and its AI gateway (FastAPI): about 0.3 s of the 0.8 s a step attached to its MLflow
#: run pays for the import, for code a Kedro step does not call. They are imported at their first
#: use instead (:func:`defer_until_used`).
MLFLOW_PACKAGES_RUN_WHEN_USED = ("mlflow.genai", "mlflow.gateway")


@contextmanager
def optional_modules_hidden(*names: str) -> Iterator[None]:
    """While the block imports a library, ``import name`` fails as if ``name`` were not
    installed (the library takes its fallback); afterwards ``name`` imports normally. A module
    imported already stays as it is."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # import -> ImportError
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


class _StandIn(types.ModuleType):
    """What ``parent.name`` is while the parent's ``__init__`` runs: not a package (importing a
    submodule of it fails with ImportError, which the parent's ``__init__`` meets only inside
    ``try``). The parent keeps no reference to it after (see :func:`_import_on_first_use`); a
    reference taken meanwhile reads the real package's attributes."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._package(name), name)

    def __dir__(self) -> list[str]:
        return dir(self._package("__dir__"))

    def _package(self, wanted: str) -> types.ModuleType:
        if sys.modules.get(self.__name__) is self:  # the parent's __init__ still runs
            raise AttributeError(f"module {self.__name__!r} has no attribute {wanted!r} while "
                                 f"{self.__name__.rpartition('.')[0]!r} is imported (deferred to its first use)")
        return importlib.import_module(self.__name__)


class _ParentLoader(importlib.abc.Loader):
    """The parent's own loader, its ``__init__`` run with the stand-ins in ``sys.modules``."""

    def __init__(self, loader: importlib.abc.Loader, names: frozenset[str]) -> None:
        self._loader = loader
        self._names = names

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        sys.meta_path[:] = [finder for finder in sys.meta_path
                            if not (isinstance(finder, _ParentFinder) and finder.parent == module.__name__)]
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        stand_ins = {name: _StandIn(name) for name in self._names if name not in sys.modules}
        sys.modules.update(stand_ins)
        try:
            self._loader.exec_module(module)
        finally:
            # Out of sys.modules: the next import of the package (or of a submodule) is a
            # plain one, in the package's own order.
            for name, stand_in in stand_ins.items():
                if sys.modules.get(name) is stand_in:
                    del sys.modules[name]
        _import_on_first_use(module, stand_ins)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader...: the real loader's
        return getattr(self._loader, name)


def _import_on_first_use(parent: types.ModuleType, stand_ins: dict[str, _StandIn]) -> None:
    """Take the stand-ins off the parent and give it a module ``__getattr__`` (PEP 562) that
    imports such a package at its first use (``parent.name``, ``from parent import name``): the
    import system then makes the real package the parent's attribute, as a plain import would
    have (writes, ``importlib.reload``, pickling by reference all meet the real module)."""
    names = {name.rpartition(".")[2] for name, stand_in in stand_ins.items()
             if parent.__dict__.get(name.rpartition(".")[2]) is stand_in}
    if not names:
        return
    for name in names:
        del parent.__dict__[name]
    previous = parent.__dict__.get("__getattr__")

    def __getattr__(name: str) -> Any:
        if name in names:
            try:
                return importlib.import_module(f"{parent.__name__}.{name}")
            except Exception as exc:
                # What a parent importing it under contextlib.suppress(Exception) (MLflow's
                # gateway) would have shown: no such attribute (hasattr() is False), the reason
                # chained.
                raise AttributeError(f"module {parent.__name__!r} has no attribute {name!r}: "
                                     f"it cannot be imported ({exc})") from exc
        if previous is not None:
            return previous(name)
        raise AttributeError(f"module {parent.__name__!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*parent.__dict__, *names})

    __getattr__.deferred_names = frozenset(names)  # type: ignore[attr-defined]
    parent.__getattr__ = __getattr__  # type: ignore[method-assign]
    if "__dir__" not in parent.__dict__:
        parent.__dir__ = __dir__  # type: ignore[method-assign]


class _ParentFinder(importlib.abc.MetaPathFinder):
    def __init__(self, parent: str, names: Sequence[str]) -> None:
        self.parent = parent
        self.names = frozenset(names)

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.parent:
            return None
        # importlib.util.find_spec asks too, without importing: only the import that runs the
        # parent's __init__ (see _ParentLoader) retires this finder.
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ParentLoader(spec.loader, self.names)
        return spec


def defer_until_used(parent: str, *names: str) -> None:
    """When ``parent`` is imported, the packages ``names`` that its ``__init__`` imports are not:
    each is imported at its first use (``parent.name``, ``from parent import name``, an import
    of it or of a submodule of it), as a plain import. Nothing happens if ``parent`` is
    imported already."""
    if parent in sys.modules or any(isinstance(finder, _ParentFinder) and finder.parent == parent
                                    for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _ParentFinder(parent, names))


def is_deferred(parent: types.ModuleType, name: str) -> bool:
    """Whether ``parent.name`` is deferred to its first use and not imported yet."""
    deferred: frozenset[str] = getattr(parent.__dict__.get("__getattr__"), "deferred_names", frozenset())
    return name in deferred and name not in parent.__dict__ and f"{parent.__name__}.{name}" not in sys.modules


class AfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback once ``name`` has been imported (its ``__init__`` run), in the importing
    thread, before the import statement returns; see :func:`after_import`."""

    def __init__(self, name: str, callback: Callable[[types.ModuleType], None]) -> None:
        self.name = name
        self.callback = callback

    def cancel(self) -> None:
        """Never run the callback (the import, if it comes, is a plain one)."""
        if self in sys.meta_path:
            sys.meta_path.remove(self)

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name or self not in sys.meta_path:
            return None
        # The finders after this one, in order (a defer_until_used finder wraps its loader too).
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CallbackLoader(spec.loader, self)
        return spec


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, finder: AfterImport) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        # importlib.util.find_spec asks finders without importing: only the import retires it.
        waiting = self._finder in sys.meta_path
        self._finder.cancel()
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        if waiting:
            self._finder.callback(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def after_import(name: str, callback: Callable[[types.ModuleType], None]) -> AfterImport | None:
    """Call ``callback(module)`` once the top-level package ``name`` is imported (None, and no
    call, when it is imported already). The returned finder's ``cancel()`` withdraws it."""
    if name in sys.modules:
        return None
    finder = AfterImport(name, callback)
    sys.meta_path.insert(0, finder)
    return finder
