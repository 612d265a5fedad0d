"""Importing libraries without the optional integrations they load only because those happen to
be installed, and that kvx-runtime never uses: every process (each pipeline step) pays for them
at start-up otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["optional_modules_hidden"]


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
