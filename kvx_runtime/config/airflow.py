"""The schema of ``airflow-k8s.yml`` (or ``airflow.yml``): the run config of the Airflow target,
kedro-airflow-k8s's keys on top of ``vertexai.yml``'s (:mod:`kvx_runtime.config.schema`), which
every target shares (image, root, resources, node selectors, retries, env, labels, MLflow,
dynamic config providers, ``on_exit_pipeline``...).

Keys of the plugin family that we do not need are accepted with a warning saying why
(``ACCEPTED_UNUSED``, reported by :mod:`kvx_runtime.config.validation`) rather than as unknown.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timezone
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from kvx_runtime.config.schema import (
    PluginConfig,
    RunConfig,
    _Section,
    checked_namespace,
    checked_secret_name,
    is_kubernetes_name,
)

__all__ = ["RUN_ONCE_SUFFIX", "AirflowPluginConfig", "AirflowRunConfig", "MlflowAuthentication", "PodSecret",
           "Toleration", "check_schedule", "dag_id_part", "is_dag_id"]

#: What run-once adds to the id of a scheduled DAG: its one-off copy, without the schedule.
RUN_ONCE_SUFFIX = "-run-once"
#: Airflow's own names for schedules (``schedule="@daily"``).
SCHEDULE_PRESETS = frozenset({"@once", "@continuous", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly",
                              "@yearly", "@annually"})
#: A cron field's bounds (minute, hour, day of month, month, day of week) and the names it takes.
_CRON_FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
    ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
#: Airflow's longest tag (``DagTag.name``).
_TAG_LENGTH = 100
#: What croniter (Airflow's cron parser) also takes in the day fields: ``?`` (no value), ``L``
#: (the month's last day; ``L5``, its last Friday), ``15W`` (the weekday nearest the 15th),
#: ``5#3`` (its third Friday).
_CRON_DAY_SPECIALS = {
    "day of month": re.compile(r"^(\?|L|(?:[1-9]|[12][0-9]|3[01])W)$", re.IGNORECASE),
    "day of week": re.compile(r"^(\?|L[0-7]|(?:[0-7]|sun|mon|tue|wed|thu|fri|sat)#[1-5])$", re.IGNORECASE),
}
_CRON_ITEM = re.compile(r"^(\*|[0-9A-Za-z]+(?:-[0-9A-Za-z]+)?)(?:/([0-9]+))?$")
#: Airflow's rule for DAG and task ids (``airflow.utils.helpers.KEY_REGEX``), 250 characters at most.
_DAG_ID_CHARACTERS = r"\w.-"
_DAG_ID = re.compile(rf"[{_DAG_ID_CHARACTERS}]+")
_NOT_IN_DAG_ID = re.compile(rf"[^{_DAG_ID_CHARACTERS}]+")
_ENV_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_dag_id(value: str) -> bool:
    """A DAG id Airflow accepts: letters, digits, ``_``, ``.``, ``-``; at most 250 characters."""
    return 0 < len(value) <= 250 and bool(_DAG_ID.fullmatch(value))


def dag_id_part(text: str) -> str:
    """``text`` as part of a DAG id: each run of characters an id cannot hold becomes ``-``."""
    return _NOT_IN_DAG_ID.sub("-", text)


def check_schedule(value: str) -> str:
    """``value`` if it is a five-field cron expression or one of Airflow's presets; else a
    ValueError saying which field is wrong (Airflow would refuse the DAG only when parsing it)."""
    text = " ".join(value.split())
    if text.startswith("@"):
        if text not in SCHEDULE_PRESETS:
            raise ValueError(f"{value!r} is not one of Airflow's presets ({', '.join(sorted(SCHEDULE_PRESETS))})")
        return text
    parts = text.split(" ")
    if len(parts) != 5:
        raise ValueError(f"{value!r} is not a cron expression: {len(parts)} fields, not 5 "
                         "(minute hour day-of-month month day-of-week)")
    for part, (name, low, high, names) in zip(parts, _CRON_FIELDS, strict=True):
        for item in part.split(","):
            special = _CRON_DAY_SPECIALS.get(name)
            if special is not None and special.match(item):
                continue
            match = _CRON_ITEM.match(item)
            if not match:
                raise ValueError(f"{value!r}: the {name} field {part!r} is not a cron field")
            for bound in match.group(1).split("-") if match.group(1) != "*" else ():
                number = _cron_number(bound, low, names)
                if number is None or not low <= number <= high:
                    raise ValueError(f"{value!r}: {bound!r} is out of the {name} field's range {low}-{high}")
            if match.group(2) is not None and int(match.group(2)) == 0:
                raise ValueError(f"{value!r}: a step of 0 in the {name} field")
    return text


def _cron_number(bound: str, low: int, names: tuple[str, ...]) -> int | None:
    """A cron bound as a number (``jan`` is 1, ``sun`` is 0); None if it is neither."""
    if bound.lower() in names:
        return names.index(bound.lower()) + low
    return int(bound) if bound.isdigit() else None


class Toleration(_Section):
    """A Kubernetes toleration of every step's pod (``run_config.tolerations``)."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("a toleration with operator Exists takes no value")
        if self.operator == "Equal" and self.key is None:
            raise ValueError("a toleration with operator Equal needs a key")
        return self


class PodSecret(_Section):
    """A Kubernetes secret of the namespace given to every step (``run_config.secrets``): one
    key as an environment variable, or the whole secret (or one key) mounted as files."""

    secret_name: str
    #: ``env``: ``key`` becomes the variable ``target``; ``volume``: mounted at the path ``target``.
    deploy_type: Literal["env", "volume"] = "env"
    deploy_target: str
    key: str | None = None

    @field_validator("secret_name")
    @classmethod
    def _name(cls, value: str) -> str:
        return checked_secret_name(value)

    @model_validator(mode="after")
    def _target(self) -> PodSecret:
        if self.deploy_type == "env":
            if not _ENV_VAR.fullmatch(self.deploy_target):
                raise ValueError(f"{self.deploy_target!r} is not an environment variable name")
            if not self.key:
                raise ValueError("a secret deployed as env needs the key whose value the variable gets")
        elif not self.deploy_target.startswith("/"):
            raise ValueError(f"{self.deploy_target!r} is not an absolute mount path")
        return self


class MlflowAuthentication(_Section):
    """``run_config.authentication`` (kedro-airflow-k8s's section): how the DAG's tasks
    authenticate to MLflow, from what the Airflow worker holds.

    ``GoogleOAuth2``: an ID token for the worker's ``GOOGLE_AUDIENCE`` from its Google
    credentials, minted for each task and given to it as ``MLFLOW_TRACKING_TOKEN``. ``Vars``:
    the Airflow Variables named in ``params`` (``MLFLOW_TRACKING_USERNAME``...; a secrets
    backend such as Vault serves them) given to each task under the same names. The DAG file
    holds the templates, never a value.
    """

    type: Literal["GoogleOAuth2", "Vars"]
    params: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _params(self) -> MlflowAuthentication:
        if self.type == "Vars":
            if not self.params:
                raise ValueError("type Vars needs params: the Airflow Variables to pass, e.g. "
                                 "[MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD]")
            for name in self.params:
                if not _ENV_VAR.fullmatch(name):
                    raise ValueError(f"{name!r} is not an environment variable name")
        elif self.params:
            raise ValueError("type GoogleOAuth2 takes no params (the audience is the worker's GOOGLE_AUDIENCE)")
        return self


class AirflowRunConfig(RunConfig):
    """``run_config`` of ``airflow-k8s.yml``: the shared keys plus the DAG's and its pods'."""

    #: Keys of kedro-airflow-k8s that mean nothing here, with why (one warning, not an error).
    ACCEPTED_UNUSED: ClassVar[dict[str, str]] = {
        "volume": "steps exchange intermediates as blobs under run_config.root, not through a shared "
        "persistent volume, so no volume is created",
    }

    #: The DAG's id (default: the pipeline's name as compiled, e.g. ``my-project``).
    dag_id: str | None = None
    tags: list[str] = Field(default_factory=list)
    #: A cron expression or an Airflow preset (``@daily``); none: runs start only when triggered.
    schedule: str | None = None
    #: The first logical date of a schedule (a date, or an ISO time; UTC unless it says otherwise);
    #: the DAG's renderer refuses a schedule without it.
    start_date: datetime | None = None
    catchup: bool = False
    max_active_runs: int | None = Field(default=None, ge=1)
    tolerations: list[Toleration] = Field(default_factory=list)
    annotations: dict[str, str] = Field(default_factory=dict)
    secrets: list[PodSecret] = Field(default_factory=list)
    #: Seconds a step's pod may take to start (pulling its image) before the task fails.
    startup_timeout: int = Field(default=600, gt=0)
    #: What happens to a step's pod when it ends: deleted, or kept (``keep_pod``) for debugging.
    on_finish_action: Literal["delete_pod", "delete_succeeded_pod", "keep_pod"] = "delete_pod"
    #: Airflow's Kubernetes connection (the cluster the pods run in); Composer's default works in-cluster.
    kubernetes_conn_id: str = "kubernetes_default"
    #: How the tasks authenticate to MLflow from the Airflow worker (GoogleOAuth2 or Vars).
    authentication: MlflowAuthentication | None = None
    #: Where upload-pipeline, run-once and schedule write the DAG file: a path Airflow's DAG
    #: processor reads, or ``gs://<Composer environment bucket>/dags``.
    dags_folder: str | None = None

    @field_validator("dag_id")
    @classmethod
    def _dag_id(cls, value: str | None) -> str | None:
        if value is not None and not is_dag_id(value):
            raise ValueError(f"{value!r} is not a DAG id (letters, digits, '_', '.', '-'; at most 250 characters)")
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        return None if value is None else check_schedule(value)

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        for tag in value:
            if not 0 < len(tag) <= _TAG_LENGTH:
                raise ValueError(f"tag {tag[:40]!r}... has {len(tag)} characters: Airflow takes 1 to {_TAG_LENGTH}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _continuous_runs_one_at_a_time(cls, data: Any) -> Any:
        # Airflow refuses to import a @continuous DAG that may run more than one run at a time.
        if isinstance(data, dict) and " ".join(str(data.get("schedule") or "").split()) == "@continuous":
            if data.get("max_active_runs") is None:
                return {**data, "max_active_runs": 1}
            if data["max_active_runs"] != 1:
                raise ValueError("schedule @continuous runs one run at a time: max_active_runs must be 1 (or unset)")
        return data

    @field_validator("start_date", mode="before")
    @classmethod
    def _start_date(cls, value: Any) -> Any:
        if isinstance(value, date) and not isinstance(value, datetime):
            return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(f"{value!r} is not a date (2026-01-31) or an ISO time") from None
        if isinstance(value, datetime) and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value

    @field_validator("annotations")
    @classmethod
    def _annotations(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.fullmatch(r"([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", key) or len(key) > 316:
                raise ValueError(f"{key!r} is not a Kubernetes annotation key")
        return value

    @field_validator("namespace")
    @classmethod
    def _pod_namespace(cls, value: str | None) -> str | None:
        return checked_namespace(value)

    @field_validator("service_account")
    @classmethod
    def _service_account(cls, value: str | None) -> str | None:
        # On Airflow the steps run as a Kubernetes service account of the namespace, not a Google one.
        if value is not None and not is_kubernetes_name(value):
            raise ValueError(f"{value!r} is not a Kubernetes service account name")
        return value


class AirflowPluginConfig(PluginConfig):
    """The whole ``airflow-k8s.yml``: ``host`` is the Airflow webserver / API server URL."""

    run_config: AirflowRunConfig = Field(default_factory=AirflowRunConfig)
