"""Logging: structlog for our own lines, the same renderer for Kedro's and the user's lines.

In a container (stderr is not a TTY, or ``KVX_LOG_FORMAT=json``) every line is one JSON object
with the fields Cloud Logging reads (``severity``, ``message``, ``time``) plus the step context
(``node``, ``run_id``, ``job_name``) bound with :func:`bind_step_context`. On a TTY the same
events render as readable text.

Secrets are never passed to a logger: callers log names, paths and sizes, not values. As a
second line of defence every rendered line (ours, Kedro's, the user's, at any level) has the
values of the project's credentials and of dynamic config providers' outputs replaced
(:func:`register_secrets`), as well as credentials in URLs and upload-session ids; Kedro's
hook-call traces (DEBUG, with every hook argument, credentials included) are dropped.

A failed command's final line is its verdict (:func:`log_verdict`): what failed and where. Lines
logged after it (libraries closing down at the process's end) are kept at DEBUG.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from kvx_runtime.lazy_imports import optional_modules_hidden

# structlog.dev and structlog.tracebacks import rich's console, traceback and pretty-printer (60 ms
# of every process's start-up; Kedro imports none of them) only to draw exceptions in colour on a
# terminal: our lines render exceptions as plain text.
with optional_modules_hidden("rich"):
    import structlog

from kvx_runtime import settings
from kvx_runtime.errors import ConfigError

__all__ = ["NODE_FINISHED", "bind_step_context", "configure_logging", "get_logger", "log_verdict",
           "print_only_own_lines", "redact", "register_secrets"]

REDACTED = "[redacted]"
#: What a step logs as each of its nodes ends (with ``node`` and ``seconds``): what the fusing
#: groupers read back as the node's duration (:mod:`kvx_runtime.grouping.timings`).
NODE_FINISHED = "node finished"
#: Values shorter than this are not secrets worth redacting (and would mangle every line).
_MIN_SECRET = 4
_SECRETS: set[str] = set()
# Every rendered line passes through these, so each must take linear time on any text (a 1 MB
# word included). Each starts with a literal ("://", "="), which re.sub finds by a fast scan; the
# name before "=" is checked by fixed-width lookbehinds and the value that follows is a greedy
# run that nothing can fail after. ("[\w-]+key=", which this replaced, rescanned a long word
# from each of its positions: quadratic, minutes for 100 KB.) The user:password part can fail
# at its end, but its scan stops at the next "/": scans from two "://" never overlap. Same
# redactions as before (tests/test_log.py compares them with the previous patterns).
_VALUE = r"[^&;\s'\"]+"  # a value stops at &, ;, whitespace and quotes
_URL_SECRETS = [
    (re.compile(r"://[^/@\s:]+:[^/@\s]+@"), "://" + REDACTED + "@"),  # https://user:password@host
    # <name>=VALUE anywhere (access_token and x-amz-security-token end in "token",
    # x-amz-signature in "signature"), and <name>key=VALUE: AccountKey=, x-api-key=, ssh_key=...
    # ("[deglnty]": the last letters of those names, one quick test for a run of "=".)
    (re.compile(r"(?i)=(?<=[deglnty]=)(?:(?<=upload_id=)|(?<=uploadid=)|(?<=token=)|(?<=sig=)|(?<=signature=)|"
                r"(?<=[\w-]key=)|(?<=password=)|(?<=secret=)|(?<=x-amz-credential=))" + _VALUE),
     "=" + REDACTED),
    # A bare "key" (no name before it) only as a URL query parameter (?key=API_KEY): in
    # "--param KEY=VALUE" it is advice.
    (re.compile(r"(?i)=(?<=[?&]key=)" + _VALUE), "=" + REDACTED),
]


def register_secrets(values: Iterable[Any]) -> None:
    """Redact these values (and every string nested in them) wherever they would be logged."""
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set)):
            stack.extend(value)
        elif isinstance(value, str) and len(value.strip()) >= _MIN_SECRET:
            _SECRETS.add(value.strip())
            _SECRETS.add(json.dumps(value.strip())[1:-1])  # as it appears inside a JSON line


def redact(text: str) -> str:
    """``text`` without registered secrets, URL credentials or upload-session ids."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in _URL_SECRETS:
        text = pattern.sub(replacement, text)
    return text


def _redact_rendered(_: Any, __: str, rendered: Any) -> Any:
    return redact(rendered) if isinstance(rendered, str) else rendered

_HANDLER_NAME = "kvx-runtime"
# Cloud Logging's severity names; stdlib's "warning"/"critical" map onto them directly.
_SEVERITY = {
    "debug": "DEBUG",
    "info": "INFO",
    "warning": "WARNING",
    "warn": "WARNING",
    "error": "ERROR",
    "exception": "ERROR",
    "critical": "CRITICAL",
}


def _library_defaults() -> None:
    """Until a command configures logging, behave like a library: plain stdlib records.

    Key-value pairs become the record's ``extra`` attributes, so any handler (pytest's, a
    user's) sees them; :func:`configure_logging` replaces this with the full pipeline.
    """
    if structlog.is_configured():
        return
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.filter_by_level,
            structlog.stdlib.render_to_log_kwargs,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None) -> Any:
    """Return a structlog logger that renders through the handler set up by us."""
    return structlog.stdlib.get_logger(name or "kvx_runtime")


def bind_step_context(**values: Any) -> None:
    """Attach values (node, run_id, job_name...) to every following log line of this process."""
    structlog.contextvars.bind_contextvars(**{k: v for k, v in values.items() if v is not None})


def wants_json(stream: Any = None) -> bool:
    """JSON when forced by ``KVX_LOG_FORMAT=json``, or when the stream is not a terminal."""
    fmt, _ = _lenient(settings.LOG_FORMAT)
    if fmt:
        return fmt == "json"
    stream = stream or sys.stderr
    return not (hasattr(stream, "isatty") and stream.isatty())


#: While set (a thread's id), only kvx-runtime's own records logged by that thread are printed.
_own_lines_thread: int | None = None


def print_only_own_lines(thread: int | None) -> None:
    """From now on print only kvx-runtime's records logged by ``thread``; ``None``: all again.
    For a command that prints a table while libraries retry, warn and log in threads (its own
    and theirs) that it may give up on: their lines would break up the table or follow its
    verdict (doctor). Survives :func:`configure_logging`; at level DEBUG everything prints."""
    global _own_lines_thread
    _own_lines_thread = thread


#: Set once the command has logged its verdict: every later line is kept at DEBUG.
_verdict_given = False


def log_verdict(logger: Any, message: str, **fields: Any) -> None:
    """Log a failed command's final line (ERROR) with ``logger``, and keep every line logged
    after it at DEBUG: dropped, or at level DEBUG printed with severity DEBUG (and the severity
    it was logged with as ``demoted_from``). Whatever runs once the outcome is known (thread
    shutdown, atexit callbacks, a library's finalizers: py4j closing a thread's connection to
    the JVM logs at INFO) would otherwise bury the line that says what failed and where.
    Reset by :func:`configure_logging` (the start of a command)."""
    global _verdict_given
    logger.error(message, **fields)
    _verdict_given = True


def _demote_late_lines(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    if _verdict_given:
        level = str(event.get("level", "info")).lower()
        event["level"] = "debug"
        if level != "debug":
            event["demoted_from"] = _SEVERITY.get(level, level.upper())
    return event


class _StepNoiseFilter(logging.Filter):
    """Drop advice that is wrong inside a kvx-runtime command:

    - Kedro's "resume with --from-nodes": a failed step prints its own replay command;
    - kedro-mlflow's warnings about an already active run: attaching to the pipeline's run
      before the session starts is exactly how a step shares one run;
    - gcsfs's own error records with tracebacks (out of retries, deferred closes): the blob
      store retries and reports storage failures itself, in one line (kept at DEBUG);
    - urllib3's connection warnings from google-auth's background Regional Access Boundary
      lookup: google-auth treats that lookup as optional and logs its failure at DEBUG, but
      the retries under it would warn (where iamcredentials.googleapis.com is unreachable),
      at any moment, even after a command's final line (kept at DEBUG);
    - any line after the command's verdict (:func:`log_verdict`; kept at DEBUG).
    """

    _mlflow_prefixes = ("The mlflow run", "mlflow_config.", "A mlflow run was already active",
                        "The run '")

    def filter(self, record: logging.LogRecord) -> bool:
        if _verdict_given and not logging.getLogger().isEnabledFor(logging.DEBUG):
            return False
        if (_own_lines_thread is not None and not logging.getLogger().isEnabledFor(logging.DEBUG)
                and (record.thread != _own_lines_thread or record.name.split(".")[0] != "kvx_runtime")):
            return False
        if record.name == "kedro.framework.hooks.manager" and record.levelno <= logging.DEBUG:
            return False  # pluggy's hook-call traces: every argument, credentials included
        message = str(record.getMessage())
        if record.name.startswith("kedro.runner"):
            return not (message.startswith("No nodes ran.")
                        or (message.startswith("There are ") and "--from-nodes" in message))
        if record.name.startswith("kedro_mlflow.framework.hooks"):
            return not message.startswith(self._mlflow_prefixes)
        if record.name.startswith("gcsfs") and record.levelno >= logging.ERROR:
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        if record.name.startswith("urllib3") and _in_access_boundary_lookup():
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def _in_access_boundary_lookup() -> bool:
    # google-auth runs the lookup in a thread of this (private) class; if it is renamed the
    # warnings simply show again.
    return type(threading.current_thread()).__name__ == "_RegionalAccessBoundaryRefreshThread"


def _cloud_logging_fields(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    level = str(event.pop("level", "info")).lower()
    head = {
        "severity": _SEVERITY.get(level, level.upper()),
        "message": str(event.pop("event", "")),
        "time": event.pop("timestamp", None),
    }
    return {**head, **event}


# Presentation hints that Kedro passes to its rich handler; meaningless in our output.
_PRESENTATION_KEYS = ("color_message", "rich_format", "markup", "highlighter")


def _drop_presentation_hints(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in _PRESENTATION_KEYS:
        event.pop(key, None)
    return event


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
        _drop_presentation_hints,
    ]


def _renderer_chain(json_output: bool) -> list[Any]:
    if json_output:
        return [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _demote_late_lines,
            structlog.processors.format_exc_info,
            _cloud_logging_fields,
            structlog.processors.JSONRenderer(default=str),
            _redact_rendered,
        ]
    return [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        _demote_late_lines,
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(), pad_event_to=40),
        _redact_rendered,
    ]


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is now (test capture, a redirected stream...)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _silence_known_noise() -> None:
    import warnings

    # Raised by Kedro's own OmegaConfigLoader on OmegaConf >= 2.4: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated")


def configure_logging(*, json_output: bool | None = None, level: str | None = None) -> None:
    """Route structlog and stdlib logging (Kedro's, the user's) through one stderr handler.

    Safe to call more than once: Kedro re-applies its own logging config when a project is
    bootstrapped, so the executor calls this again afterwards to take the console back.
    File handlers configured by the project are kept.
    """
    global _verdict_given
    _verdict_given = False  # a new command: no verdict yet
    if json_output is None:
        json_output = wants_json()
    _, format_problem = _lenient(settings.LOG_FORMAT)
    configured_level, level_problem = _lenient(settings.LOG_LEVEL)
    level_name = (level or configured_level).upper()

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(_CurrentStderr())
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(_StepNoiseFilter())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_shared_processors(),
            processors=_renderer_chain(json_output),
        )
    )
    # Python warnings (deprecations in libraries...) become log records, so that they are JSON
    # in a container too; the ones that are noise for a step user are dropped.
    logging.captureWarnings(True)
    _silence_known_noise()
    root = logging.getLogger()
    for existing in list(root.handlers):
        # Console handlers (Kedro's rich handler, a plain StreamHandler) would print every line
        # twice and not as JSON; file handlers are the project's business and stay.
        if isinstance(existing, logging.FileHandler):
            continue
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level_name)
    for name in ("kvx_runtime", "kedro"):
        logging.getLogger(name).setLevel(level_name)
    # Third-party chatter that adds nothing to a step's log.
    for noisy in ("urllib3", "google.auth", "gcsfs", "s3fs", "botocore", "aiobotocore", "fsspec", "asyncio", "git"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    adopt_library_loggers()
    for problem in (format_problem, level_problem):
        if problem:  # logging must work to report anything: said, not fatal
            get_logger("kvx_runtime").warning(f"{problem}: the default is used")


def _lenient(setting: settings.Setting[str]) -> tuple[str, str | None]:
    """A logging setting, or its default and what was wrong with it."""
    try:
        return setting.get(), None
    except ConfigError as exc:
        return setting.default, exc.message


#: Libraries that install console handlers of their own on import (MLflow does), whose lines
#: would then bypass the step's JSON handler.
_SELF_CONFIGURED = ("mlflow",)


def adopt_library_loggers() -> None:
    """Send the lines of self-configured library loggers through our handler (call again after
    importing such a library)."""
    for name in _SELF_CONFIGURED:
        logger = logging.getLogger(name)
        for existing in list(logger.handlers):
            if not isinstance(existing, logging.FileHandler):
                logger.removeHandler(existing)
        logger.propagate = True


_library_defaults()
