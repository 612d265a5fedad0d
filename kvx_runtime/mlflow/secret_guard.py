"""Secrets never reach the MLflow run: parameters named like secrets are not logged, and no
logged value carries a registered secret.

kedro-mlflow logs every parameter a node takes as an MLflow param and sets the run's tags from
the session's run parameters (``runtime_params`` included): ``--param api_key=...`` would be
readable by anyone who may read the experiment. Installed in every process that talks to
MLflow, this guard filters the three ways a param or tag is written (``MlflowClient.log_param``,
``set_tag`` and ``log_batch``, which the fluent ``mlflow.log_param(s)``/``set_tag(s)`` use):

- a param whose name says secret (:func:`kvx_runtime.params.says_secret`) is dropped, with one
  warning per name that says where secrets belong;
- every other param and tag value goes through the log redaction (registered secrets, such as
  the values of those parameters, credentials in URLs).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from kvx_runtime.log import REDACTED, get_logger, redact
from kvx_runtime.params import SECRET_HINT, says_secret

__all__ = ["install_secret_guard", "logged_value", "param_kept", "tag_kept"]

log = get_logger(__name__)

_INSTALLED = "_kvx_secret_guard"
_warned: set[str] = set()


def param_kept(key: str) -> bool:
    """Whether a param named ``key`` may be logged (warned once per name when not)."""
    if not says_secret(key):
        return True
    if key not in _warned:
        _warned.add(key)
        log.warning(f"parameter {key} is not logged to MLflow: its name says it is a secret",
                    hint=SECRET_HINT)
    return False


def tag_kept(key: str) -> bool:
    """Whether a single tag write of ``key`` is kept: kedro-mlflow writes a param too long for
    MLflow as a tag (``long_params_strategy: tag``); MLflow's and kvx-runtime's own tags
    (``kvx.create_token``) are not parameters."""
    return key.startswith(("kvx.", "mlflow.")) or param_kept(key)


def _safe(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


def logged_value(value: Any) -> str:
    """``value`` as a param or tag carries it: secret-named keys inside it masked, registered
    secrets and URL credentials redacted."""
    return _safe(str(_scrubbed(value)))


def _scrubbed(value: Any) -> Any:
    """``value`` with what secret-named keys hold inside it masked (a whole ``parameters`` dict
    or ``params:db`` logged as one param, kedro-mlflow's ``flatten: false``)."""
    if isinstance(value, Mapping):
        return {key: REDACTED if says_secret(str(key)) else _scrubbed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(item) for item in value]
    return value


def install_secret_guard() -> None:
    """Wrap MlflowClient's param and tag writes (once per process)."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    if getattr(MlflowClient.log_batch, _INSTALLED, False):
        return
    log_param, set_tag, log_batch = MlflowClient.log_param, MlflowClient.set_tag, MlflowClient.log_batch

    @functools.wraps(log_param)
    def guarded_log_param(self: Any, run_id: str, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if not param_kept(key):
            return value  # what MLflow returns: the value "logged"
        return log_param(self, run_id, key, logged_value(value), *args, **kwargs)

    @functools.wraps(set_tag)
    def guarded_set_tag(self: Any, run_id: str, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if not tag_kept(key):
            return None
        return set_tag(self, run_id, key, logged_value(value), *args, **kwargs)

    @functools.wraps(log_batch)
    def guarded_log_batch(self: Any, run_id: str, metrics: Any = (), params: Any = (), tags: Any = (),
                          *args: Any, **kwargs: Any) -> Any:
        params = [Param(p.key, _safe(str(p.value))) for p in params or () if param_kept(p.key)]
        tags = [RunTag(t.key, _safe(str(t.value))) for t in tags or ()]
        return log_batch(self, run_id, metrics, params, tags, *args, **kwargs)

    for guarded in (guarded_log_param, guarded_set_tag, guarded_log_batch):
        setattr(guarded, _INSTALLED, True)
    MlflowClient.log_param = guarded_log_param  # type: ignore[method-assign]
    MlflowClient.set_tag = guarded_set_tag  # type: ignore[method-assign]
    MlflowClient.log_batch = guarded_log_batch  # type: ignore[method-assign]
