"""Names Vertex AI / Kubeflow accept: sanitized, unique and stable across compilations."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from kvx_runtime.compiler.plan import CACHE_SERVE_STEP, MLFLOW_END_STEP, MLFLOW_START_STEP, ON_EXIT_STEP, OUTCOME_TASK
from kvx_runtime.compiler.spec import EXIT_HANDLER, FINAL_STATUS, MLFLOW_RUN_ID
from kvx_runtime.config.airflow import dag_id_part
from kvx_runtime.errors import ConfigError
from kvx_runtime.step.invocation import DEFAULT_PIPELINE

#: Task and pipeline names: lowercase letters, digits and dashes, starting with a letter.
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_PARAMETER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX = 63
#: Names the compiler uses for its own tasks.
RESERVED = (MLFLOW_START_STEP, MLFLOW_END_STEP, ON_EXIT_STEP, EXIT_HANDLER, CACHE_SERVE_STEP, OUTCOME_TASK)
#: Pipeline parameter and task input names of the compiler's own (``kvx_storage_root``,
#: ``kvx_job_uuid``...): a Kedro parameter never takes one.
RESERVED_PARAMETER_PREFIX = "kvx_"
RESERVED_PARAMETERS = frozenset({FINAL_STATUS, MLFLOW_RUN_ID})


def sanitize(name: str, *, fallback_prefix: str = "n") -> str:
    """``data_science.Train Model`` -> ``data-science-train-model``; at most 63 characters.

    A name that had to be shortened keeps a short hash of the original, so two long names
    that share a prefix stay distinct.
    """
    text = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or fallback_prefix
    if not text[0].isalpha():
        text = f"{fallback_prefix}-{text}"
    if len(text) > _MAX:
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
        text = f"{text[: _MAX - 9].rstrip('-')}-{digest}"
    return text


def unique_task_names(names: Iterable[str]) -> dict[str, str]:
    """Map each original name to a sanitized, unique task name.

    Collisions get ``-2``, ``-3``... in the order the names are given (the pipeline's
    topological order), so the mapping is the same every time the pipeline is compiled.
    """
    taken: set[str] = set(RESERVED)
    result: dict[str, str] = {}
    for name in names:
        base = sanitize(name)
        candidate, counter = base, 2
        while candidate in taken:
            suffix = f"-{counter}"
            candidate = base[: _MAX - len(suffix)].rstrip("-") + suffix
            counter += 1
        taken.add(candidate)
        result[name] = candidate
    return result


def pipeline_name(name: str) -> str:
    """The pipeline's name as Vertex AI requires it."""
    sanitized = sanitize(name, fallback_prefix="pipeline")
    if not _NAME.match(sanitized):  # pragma: no cover - sanitize() guarantees the pattern
        raise ConfigError(f"pipeline name {name!r} cannot be made valid for Vertex AI")
    return sanitized


def project_pipeline_name(package_name: str, pipeline: str) -> str:
    """The name of a project's pipeline on every target (``<package>`` for the default
    pipeline, else ``<package>-<pipeline>``): what runs, schedules and uploads are found by."""
    return pipeline_name(package_name if pipeline == DEFAULT_PIPELINE else f"{package_name}-{pipeline}")


def pipeline_dag_id(configured: str | None, package_name: str, pipeline: str) -> str:
    """The Airflow DAG of a project's pipeline: ``run_config.dag_id`` names the default
    pipeline's DAG and prefixes the others' (``<dag_id>-<pipeline>``: each pipeline has a DAG of
    its own); without it, the pipeline's name on every target (:func:`project_pipeline_name`)."""
    if not configured:
        return project_pipeline_name(package_name, pipeline)
    if pipeline == DEFAULT_PIPELINE:
        return configured
    return f"{configured}-{dag_id_part(pipeline)}"


def parameter_name(kedro_name: str) -> str:
    """Kedro parameter ``data_science.model_options.test_size`` -> pipeline parameter
    ``data_science__model_options__test_size`` (pipeline parameters are identifiers)."""
    name = kedro_name.replace(".", "__").replace("-", "_")
    if not _PARAMETER.match(name):
        raise ConfigError(f"parameter {kedro_name!r} cannot be a pipeline parameter name")
    if name in RESERVED_PARAMETERS or name.startswith(RESERVED_PARAMETER_PREFIX):
        reserved = ", ".join(sorted(RESERVED_PARAMETERS))
        raise ConfigError(f"parameter {kedro_name!r} cannot be a pipeline parameter: {name} is an input of "
                          "kvx-runtime's own",
                          hint=f"rename the Kedro parameter ({reserved} and names starting "
                               f"{RESERVED_PARAMETER_PREFIX} are reserved)")
    return name


def check_label(key: str, value: str) -> None:
    """Vertex AI label rules: lowercase keys/values, <= 63 chars, letters/digits/_/-."""
    pattern = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
    if not pattern.match(key):
        raise ConfigError(f"run_config.labels: key {key!r} is not a valid label key "
                          "(lowercase letter first, then lowercase letters, digits, _ or -, <= 63)")
    if not re.match(r"^[a-z0-9_-]{0,63}$", value):
        raise ConfigError(f"run_config.labels.{key}: {value!r} is not a valid label value "
                          "(lowercase letters, digits, _ or -, <= 63)")


def label_value(value: str) -> str:
    """``value`` as Vertex AI accepts it in a label: lowercase, ``[a-z0-9_-]``, 63 characters."""
    return re.sub(r"[^a-z0-9_-]", "-", value.lower())[:63]
