"""The project's registered pipelines, loaded as a step loads them.

Light on purpose (Kedro and :mod:`kvx_runtime.errors` only): ``doctor`` counts a project's nodes
in a child process that imports nothing else of ours.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kvx_runtime.errors import ConfigError

__all__ = ["load_pipeline", "pipeline_import_errors_raised", "registered_pipeline_names", "request_pipeline"]


def load_pipeline(name: str) -> Any:
    """The registered pipeline ``name``, loaded the way a step's ``session.run`` loads it.

    Kedro >= 1.x loads only the requested pipelines (``pipelines.set_requested``; with
    ``find_pipelines`` only their modules are imported), so a pipeline can exist when the
    whole registry is loaded and not when a step asks for it alone. Raises ``KeyError``.
    """
    from kedro.framework.project import pipelines

    request_pipeline(name)
    return pipelines[name]


def request_pipeline(name: str) -> None:
    """Kedro's registry as :func:`load_pipeline` leaves it (only ``name`` requested: what Kedro
    types parameters by), without loading anything."""
    from kedro.framework.project import pipelines

    set_requested = getattr(pipelines, "set_requested", None)
    if set_requested is not None:
        set_requested([name])


def registered_pipeline_names() -> list[str]:
    """Every registered pipeline (the whole registry loaded)."""
    from kedro.framework.project import pipelines

    set_requested = getattr(pipelines, "set_requested", None)
    if set_requested is not None:
        set_requested(None)
    return sorted(pipelines.keys())


@contextmanager
def pipeline_import_errors_raised() -> Iterator[None]:
    """Raise :class:`ConfigError` for a pipeline module that fails to import while the block
    loads pipelines. Kedro's ``find_pipelines()`` only warns and leaves that module's nodes out,
    so a compiled pipeline or a node count would silently miss them. Other warnings pass on.
    """
    from kedro.framework.project import IMPORT_ERROR_MESSAGE

    prefix = IMPORT_ERROR_MESSAGE.split("{module}")[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    failed = [str(warning.message) for warning in caught if str(warning.message).startswith(prefix)]
    for warning in caught:
        if not str(warning.message).startswith(prefix):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if failed:
        module = failed[0][len(prefix):].split("'", 1)[0]
        error = [line for line in failed[0].splitlines() if line.strip()][-1]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise ConfigError(f"the pipeline module '{module}' cannot be imported{more}: {error}",
                          hint="Kedro's find_pipelines() would leave its nodes out of every run; fix the "
                          "import or install what it needs")
