"""Kedro hooks that kvx-runtime registers in every project (``kedro.hooks`` entry point).

``pip install "kvx-runtime[mlflow]"`` brings kedro-mlflow, whose hooks then run in every
``kedro`` command of every project. Without a tracking URI (no ``mlflow.yml``, or one without
``server.mlflow_tracking_uri``, and no ``MLFLOW_TRACKING_URI``) kedro-mlflow falls back to a
``./mlruns`` file store, which MLflow 3 refuses: a plain ``kedro run`` would fail in a project
that never asked for MLflow. This hook runs first and gives kedro-mlflow MLflow 3's own
default instead, a SQLite store in the project (``mlflow.db``). It changes nothing when a
tracking URI is configured anywhere.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from kedro.framework.hooks import hook_impl

__all__ = ["KedroMlflowDefaultStore", "kedro_mlflow_default_store"]

# Plain logging: these hooks run inside any `kedro` command, under Kedro's logging setup.
log = logging.getLogger(__name__)

_MLFLOW_PATTERNS = ["mlflow*", "mlflow*/**", "**/mlflow*"]


def _configured_tracking_uri(config_loader: Any) -> str | None:
    from kedro.config import MissingConfigException

    patterns = getattr(config_loader, "config_patterns", None)
    if patterns is None:
        return None
    patterns.setdefault("mlflow", list(_MLFLOW_PATTERNS))  # what kedro-mlflow registers too
    try:
        config = config_loader["mlflow"] or {}
    except MissingConfigException:
        return None
    except Exception:  # kedro-mlflow reports a broken mlflow.yml itself
        return "(unreadable)"
    server = config.get("server") if isinstance(config, dict) else None
    uri = server.get("mlflow_tracking_uri") if isinstance(server, dict) else None
    return str(uri) if uri else None


def _kedro_mlflow_disabled() -> bool:
    from kedro.framework.project import settings

    disabled = getattr(settings, "DISABLE_HOOKS_FOR_PLUGINS", ()) or ()
    return any(name.replace("_", "-").lower() == "kedro-mlflow" for name in disabled)


class KedroMlflowDefaultStore:
    """Point kedro-mlflow's unconfigured default at ``sqlite:///<project>/mlflow.db``."""

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: Any) -> None:
        import importlib.util

        if os.environ.get("MLFLOW_TRACKING_URI") or importlib.util.find_spec("kedro_mlflow") is None:
            return
        if _kedro_mlflow_disabled():  # e.g. by exec-node, in steps that do not track
            return
        if _configured_tracking_uri(context.config_loader) is not None:
            return
        uri = f"sqlite:///{(context.project_path / 'mlflow.db').as_posix()}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        log.warning(
            "No MLflow tracking URI is configured: kedro-mlflow logs to %s (MLflow 3 refuses "
            "kedro-mlflow's ./mlruns default). Set server.mlflow_tracking_uri in mlflow.yml to choose.",
            uri,
        )


kedro_mlflow_default_store = KedroMlflowDefaultStore()
