"""Rendering a :class:`~.plan.PipelinePlan` as an Airflow 3 DAG file (``airflow.sdk``) that Airflow
2.10 (Cloud Composer 2) imports too.

One task per step of the plan, with the plan's dependencies: a ``KubernetesPodOperator``
(apache-airflow-providers-cncf-kubernetes 10) running the step's ``kvx-runtime`` command in the
plan's image (``pods``), or a ``BashOperator`` running it as a subprocess of the worker in the
project's directory (``local``: Airflow on one machine, tests). The file is self-contained
Python that a reader can follow: no import of kvx-runtime, no secret value (secrets are
Kubernetes secrets named by the config, or Airflow Variables read when a task runs).

The plan's markers become Airflow's own templates: the run id ``{{ run_id }}``, the job name
the DAG's id (made unique per run by the steps' Airflow strategy, ``KVX_ORCHESTRATOR=airflow``),
the save version from when the run became due (``dag_run.run_after``, set for every Airflow 3
run and distinct per run, unlike a manual run's optional logical date), the storage root,
save version and pipeline parameters DAG params (a run's ``conf`` overrides them), the MLflow
run id an XCom of the start task, and the body's outcome (what the exit steps read) a macro
asking Airflow for the states of the body's tasks. The exit steps run whatever the body's
outcome (trigger rule ``all_done``); a last task fails the DAG run when the body failed, since
Airflow takes a run's state from its leaves, which the exit steps would otherwise be.

Airflow 2.10: the names Airflow 3 moved to ``airflow.sdk`` are imported from their 2.x homes
when ``airflow.sdk`` is missing (:data:`_HOMES`); what only Airflow 3 has degrades to its 2.x
equivalent in the same file: a run's logical date (unique per run there) for ``run_after``, the
run's task instances from Airflow's database for the task SDK's ``get_task_states``, and a
``retry_exponential_backoff`` that is a bool there (the delay doubles) for Airflow 3's factor.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import keyword
import math
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeGuard

from kvx_runtime import settings
from kvx_runtime.auth.env import TOKEN as TOKEN_VARIABLE
from kvx_runtime.compiler.plan import (
    MLFLOW_END_STEP,
    MLFLOW_START_STEP,
    ON_EXIT_STEP,
    OUTCOME_TASK,
    ParameterRef,
    PipelinePlan,
    PlannedStep,
    Reference,
    Symbol,
    references,
)
from kvx_runtime.config.airflow import AirflowRunConfig
from kvx_runtime.errors import ConfigError
from kvx_runtime.step.invocation import PROGRAM
from kvx_runtime.step.orchestrator import Airflow
from kvx_runtime.versions import SAVE_VERSION_PARAMETER

__all__ = ["OPERATORS", "OUTCOME_TASK", "AirflowDag", "DagSource", "Operator", "dag_version", "render_airflow",
           "write_dag"]

Operator = Literal["pods", "local"]
OPERATORS: tuple[Operator, ...] = ("pods", "local")
#: The DAG param holding the run's storage root (the KFP spec's pipeline parameter of that name).
STORAGE_ROOT_PARAM = "kvx_storage_root"
#: The task that fails the DAG run when the body failed (only with exit steps).
#: The tasks that run once the body is done, whatever its outcome (``all_done``).
EXIT_TASKS = frozenset({MLFLOW_END_STEP, ON_EXIT_STEP, OUTCOME_TASK})
#: Where a pod's XCom is read from by the provider's sidecar (as JSON).
POD_XCOM_FILE = "/airflow/xcom/return.json"
#: The Kubernetes resource GPUs are asked by on GKE (Composer) and most clusters.
GPU_RESOURCE = "nvidia.com/gpu"
_WIDTH = 110
_JINJA_OPEN = re.compile(r"\{[{%#]")


@dataclass(frozen=True)
class DagSource:
    """Where the DAG came from, for its header (no time: the same input gives the same file)."""

    package: str
    pipeline: str
    env: str
    kvx_version: str
    kedro_version: str


@dataclass(frozen=True)
class AirflowDag:
    dag_id: str
    #: The DAG file's text.
    text: str
    #: Task id -> the task ids it waits for (what the DAG's ``>>`` lines say).
    upstream: dict[str, tuple[str, ...]]


def render_airflow(plan: PipelinePlan, run: AirflowRunConfig, source: DagSource, *,
                   operator: Operator = "pods", project_dir: str | None = None) -> AirflowDag:
    """The DAG file of ``plan`` with the DAG and pod settings of ``run``. ``project_dir``: where
    the project lives on the worker (``local`` only)."""
    if plan.code_upload is not None:
        raise ValueError("the plan's code archive is not uploaded yet: run compiler.upload.upload_code first")
    if operator not in OPERATORS:
        raise ValueError(f"unknown operator {operator!r}")
    if operator == "local" and not project_dir:
        raise ValueError("the local operator needs the project's directory on the worker")
    if run.schedule and run.schedule != "@once" and run.start_date is None:
        raise ConfigError(f"run_config.schedule {run.schedule!r} needs run_config.start_date",
                          hint="the first logical date of the schedule, e.g. start_date: 2026-01-01")
    dag_id = run.dag_id or plan.name
    writer = _DagWriter(plan, run, source, dag_id, operator, project_dir or "")
    text = writer.text()
    # Of what runs, not of the header (which names the Kedro version the DAG was compiled with).
    body = text[text.index('"""\n', 3) + 4:]
    version = hashlib.sha256(body.encode()).hexdigest()[:_VERSION_DIGITS]
    return AirflowDag(dag_id=dag_id, text=text.replace(_VERSION_PLACEHOLDER, version), upstream=writer.upstream())


#: The DAG's doc_md ends with its version: a digest of the file's text (with this placeholder where
#: the digest goes). Airflow stores a DAG's tasks and doc_md together, so a DAG whose doc_md shows
#: the version of the file written runs that file's tasks (its source is updated sooner).
_VERSION_MARK = "kvx-runtime DAG version "
_VERSION_DIGITS = 16
_VERSION_PLACEHOLDER = "0" * _VERSION_DIGITS
_VERSION = re.compile(re.escape(_VERSION_MARK) + r"([0-9a-f]{%d})" % _VERSION_DIGITS)


def dag_version(text: str | None) -> str | None:
    """The version a DAG file (or a parsed DAG's doc_md) carries, if any."""
    match = _VERSION.search(text or "")
    return match.group(1) if match else None


@dataclass(frozen=True)
class Code:
    """Python source written as it is (a name, an expression)."""

    text: str


@dataclass(frozen=True)
class Call:
    """A call with keyword arguments (a key ``**NAME`` unpacks NAME)."""

    name: str
    kwargs: Mapping[str, Any]


def _py(value: Any, indent: int = 0, used: int | None = None) -> str:
    """``value`` as Python source: on one line when it fits after the ``used`` columns, else one
    item per line at ``indent`` + 4 (as black and ruff format it, trailing commas included)."""
    flat = _flat(value)
    used = indent if used is None else used
    if used + len(flat) + 1 <= _WIDTH or not isinstance(value, (dict, list, tuple, Call)) or not _items(value):
        return flat
    inner = indent + 4
    pad = " " * inner
    if isinstance(value, Call):
        lines = [f"{pad}{key}," if key.startswith("**") else
                 f"{pad}{key}={_py(item, inner, inner + len(key) + 1)}," for key, item in value.kwargs.items()]
        opening, closing = f"{value.name}(", ")"
    elif isinstance(value, dict):
        lines = [f"{pad}{_flat(key)}: {_py(item, inner, inner + len(_flat(key)) + 2)}," for key, item in value.items()]
        opening, closing = "{", "}"
    else:
        lines = [f"{pad}{_py(item, inner)}," for item in value]
        opening, closing = "[", "]"
    return opening + "\n" + "\n".join(lines) + "\n" + " " * indent + closing


def _items(value: Any) -> int:
    return len(value.kwargs) if isinstance(value, Call) else len(value)


def _flat(value: Any) -> str:
    if isinstance(value, Code):
        return value.text
    if isinstance(value, Call):
        return f"{value.name}(" + ", ".join(key if key.startswith("**") else f"{key}={_flat(item)}"
                                           for key, item in value.kwargs.items()) + ")"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{value!r} cannot be a DAG's value: Airflow keeps params and settings as JSON, which has "
                          "no inf or nan", hint="give the parameter a finite default (or leave it out of --params)")
    if isinstance(value, bool) or value is None or isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_flat(k)}: {_flat(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flat(item) for item in value) + "]"
    raise TypeError(f"no Python literal for {type(value).__name__}")


def _seconds(value: float) -> str:
    """Seconds as Python reads them back exactly (``30``, ``1.5``, ``1234567``; ``:g`` keeps six digits)."""
    return str(int(value)) if value.is_integer() else repr(value)


#: Pipeline parameter kinds passed to a step as JSON, and the DAG's filter writing them.
_JSON_KINDS = frozenset({"bool", "list", "dict"})
_JSON_FILTER = "kvx_json"


def _jinja_literal(text: str) -> str:
    """Literal ``text`` in a templated field: kept as it is unless Jinja would read it."""
    # Not ASCII-escaped: Jinja reads a \uXXXX surrogate pair (an emoji) as two lone surrogates.
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if _JINJA_OPEN.search(text) else text


def _identifier(task_id: str, taken: set[str]) -> str:
    """A Python variable for ``task_id``, unique among ``taken``."""
    base = re.sub(r"\W", "_", task_id).strip("_") or "task"
    if base[0].isdigit() or keyword.iskeyword(base):
        base = f"task_{base}"
    name, counter = base, 2
    while name in taken:
        name, counter = f"{base}_{counter}", counter + 1
    taken.add(name)
    return name


class _DagWriter:
    def __init__(self, plan: PipelinePlan, run: AirflowRunConfig, source: DagSource, dag_id: str,
                 operator: Operator, project_dir: str) -> None:
        self.plan, self.run, self.source, self.dag_id = plan, run, source, dag_id
        self.operator, self.project_dir = operator, project_dir
        self.kinds = {parameter.name: parameter.type for parameter in plan.parameters}
        # Module-level names the tasks' variables must not shadow.
        taken = {"dag", "task", "POD", "TASK_ENV", "SECRET_ENV", "BODY_TASKS", "DAG", "Param", "Secret", "k8s", "json",
                 "datetime", "timedelta", "timezone", "kvx_final_status", "kvx_google_audience", "kvx_google_id_token",
                 "AirflowFailException", "shlex",
                 "KubernetesPodOperator", "BashOperator", "TriggerRule", "mask_secret", "AIRFLOW_3"}
        taken.add("body")
        taken |= set(dir(builtins))  # kvx_final_status calls sorted(), any(), hasattr()
        self.variables = {step.name: _identifier(step.name, taken) for step in (*plan.steps, *plan.exit_steps)}
        self.outcome_variable = _identifier(OUTCOME_TASK.replace("-", "_"), taken) if plan.exit_steps else ""

    # --- what the DAG says -----------------------------------------------------------------

    def upstream(self) -> dict[str, tuple[str, ...]]:
        body = tuple(step.name for step in self.plan.steps)
        graph = {step.name: tuple(step.after) for step in self.plan.steps}
        graph.update({step.name: body for step in self.plan.exit_steps})
        if self.plan.exit_steps:
            graph[OUTCOME_TASK] = body
        return graph

    def text(self) -> str:
        body = [self._constants()]
        if self.plan.exit_steps:
            body.append(self._final_status_macro())
        if self._google_auth():
            body.append(_GOOGLE_ID_TOKEN_MACRO)
        body.append(self._dag())
        code = "\n\n\n".join(part.rstrip("\n") for part in body)
        return "\n\n".join(part.rstrip("\n") for part in (self._header(), self._imports(code), code)) + "\n"

    def _header(self) -> str:
        source = self.source
        how = ("a Kubernetes pod (KubernetesPodOperator)" if self.operator == "pods"
               else f"a subprocess of the worker in {self.project_dir} (BashOperator)")
        pipeline = "" if source.pipeline == "__default__" else f" --pipeline {source.pipeline}"
        text = (
            f"Airflow DAG {self.dag_id}: the Kedro pipeline {source.pipeline} of {source.package} "
            f"(config env {source.env}),\none task per step, each running `kvx-runtime exec-node` in {how}.\n\n"
            f"Generated by `kvx-runtime airflow compile --env {source.env}{pipeline} --operator {self.operator}` "
            f"(kvx-runtime {source.kvx_version},\nKedro {source.kedro_version}) for Airflow 3 (airflow.sdk) or 2.10"
            + (" with apache-airflow-providers-cncf-kubernetes 10" if self.operator == "pods" else "")
            + ".\nDo not edit: compile again after a change (docs/airflow.md).\n"
        )
        # A worker's path or a name may hold a backslash or quotes: the docstring stays one literal.
        return '"""' + text.replace("\\", "\\\\").replace('"', '\\"') + '"""\n'

    def _imports(self, code: str) -> str:
        """What ``code`` uses, sorted as isort does; the names Airflow 3 moved, from ``airflow.sdk``
        or else from their Airflow 2.10 homes (one ``try``: a file never mixes the two)."""
        lines = ["from __future__ import annotations", ""]
        if self.plan.exit_steps or self._json_parameters():
            lines.append("import json")
        if self.operator == "local":
            lines.append("import shlex")
        dates = [name for name in ("datetime", "timedelta", "timezone") if re.search(rf"\b{name}[(.]", code)]
        if dates:
            lines.append(f"from datetime import {', '.join(dates)}")
        lines.append("")
        if self.operator == "pods":
            lines.append("from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator")
            if self._secrets():
                lines.append("from airflow.providers.cncf.kubernetes.secret import Secret")
            if "k8s." in code:
                lines.append("from kubernetes.client import models as k8s")
            lines.append("")
        names = ["DAG", "Param"]
        if self.operator == "local":
            names.append("BashOperator")
        if self.plan.exit_steps:
            names += ["TriggerRule", "task"]
        if self.plan.exit_steps or self._google_auth():
            names.append("AirflowFailException")
        if self._google_auth():
            names.append("mask_secret")
        flag = re.search(r"\bAIRFLOW_3\b", code) is not None  # a backoff factor Airflow 2.10 cannot say
        lines.append("try:  # Airflow 3")
        lines += [f"    {line}" for line in _from_imports({name: _HOMES[name][0] for name in names})]
        if flag:
            lines += ["", "    AIRFLOW_3 = True"]
        lines.append("except ImportError:  # Airflow 2.10 (Cloud Composer 2)")
        lines += [f"    {line}" for line in _from_imports({name: _HOMES[name][1] for name in names})]
        if flag:
            lines += ["", "    AIRFLOW_3 = False"]
        return "\n".join(lines) + "\n"

    def _constants(self) -> str:
        blocks = [f"#: Every task's environment (KVX_ORCHESTRATOR: how the steps name a run's job directory).\n"
                  f"TASK_ENV = {_py(self._task_env(), 0, len('TASK_ENV = '))}\n"]
        if self.operator == "pods" and self._secret_env():
            blocks.append("#: Environment variables from secret keys that may be missing (secrets_as_env, optional).\n"
                          f"SECRET_ENV = {_py(self._secret_env(), 0, len('SECRET_ENV = '))}\n")
        if self.operator == "pods":
            blocks.append(f"#: What every step's pod shares.\nPOD = {_py(self._pod_settings(), 0, 6)}\n")
        if self.plan.exit_steps:
            body = [step.name for step in self.plan.steps]
            blocks.append(f"#: The tasks of the pipeline's body: their states are the run's outcome.\n"
                          f"BODY_TASKS = {_py(body, 0, len('BODY_TASKS = '))}\n")
        return "\n\n".join(block.rstrip("\n") for block in blocks)

    def _final_status_macro(self) -> str:
        return '''def kvx_final_status(ti) -> str:
    """The body's outcome as the exit steps read it (--final-status): failed tasks named."""
    if hasattr(ti, "get_task_states"):  # Airflow 3: asked through the task SDK
        runs = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id], task_ids=BODY_TASKS)
        states = runs.get(ti.run_id, {})
    else:  # Airflow 2.10: the run's task instances, from Airflow's database
        instances = ti.get_dagrun().get_task_instances()
        states = {other.task_id: other.state for other in instances if other.task_id in BODY_TASKS}
    failed = sorted(task for task, state in states.items() if state == "failed")
    if failed or any(state == "upstream_failed" for state in states.values()):
        message = "failed tasks: " + (", ".join(failed) or "none (upstream failures)")
        return json.dumps({"state": "FAILED", "error": {"message": message}})
    return json.dumps({"state": "SUCCEEDED"})
'''

    def _json_parameters(self) -> bool:
        """Whether a pipeline parameter reaches a command line as JSON (bool, list, dict)."""
        return any(parameter.type in _JSON_KINDS for parameter in self.plan.parameters)

    def _dag(self) -> str:
        run = self.run
        params = {STORAGE_ROOT_PARAM: Call("Param", {"default": self.plan.storage_root, "type": "string",
                                                      "description": "Storage root of the intermediates"}),
                  SAVE_VERSION_PARAMETER: Call("Param", {
                      "default": "", "type": "string",
                      "description": "Save version of versioned datasets (empty: when the run became due)"})}
        for parameter in self.plan.parameters:
            default = self.plan.values.get(parameter.name, parameter.default)  # a compile's --param
            params[parameter.name] = Call("Param", {
                "default": default, "type": _PARAM_TYPES[parameter.type],
                "description": f"Kedro parameter {parameter.kedro_name}"})
        kwargs: dict[str, Any] = {"dag_id": self.dag_id}
        if self.plan.description:
            kwargs["description"] = self.plan.description
        kwargs["schedule"] = run.schedule
        if run.start_date:
            kwargs["start_date"] = Code(_datetime(run.start_date))
        kwargs["catchup"] = run.catchup
        if run.max_active_runs is not None:
            kwargs["max_active_runs"] = run.max_active_runs
        kwargs["tags"] = ["kedro", "kvx-runtime", *run.tags]
        kwargs["doc_md"] = (f"Kedro pipeline `{self.source.pipeline}` of `{self.source.package}` (env "
                            f"`{self.source.env}`), compiled by kvx-runtime {self.source.kvx_version}.\n\n"
                            f"{_VERSION_MARK}{_VERSION_PLACEHOLDER}")
        kwargs["params"] = params
        if self._macros():
            kwargs["user_defined_macros"] = self._macros()
        filters = {"shell_quote": Code("shlex.quote")} if self.operator == "local" else {}
        if self._json_parameters():
            filters[_JSON_FILTER] = Code("json.dumps")
        if filters:
            kwargs["user_defined_filters"] = filters
        lines = [f"with {_py(Call('DAG', kwargs), 0, 5)} as dag:"]
        for step in self.plan.steps:
            lines.append(f"    {self.variables[step.name]} = {self._task(step, after_body=False)}")
        for step in self.plan.exit_steps:
            lines.append(f"    {self.variables[step.name]} = {self._task(step, after_body=True)}")
        if self.plan.exit_steps:
            lines.append("")
            lines.append(f"    @task(task_id={_flat(OUTCOME_TASK)}, trigger_rule=TriggerRule.ALL_DONE, retries=0)")
            lines.append(f"    def {self.outcome_variable}(ti=None) -> None:")
            lines.append('        """Fails the DAG run when the body failed: a run\'s state is its leaves\', and the '
                         'exit\n        tasks succeed whatever happened before them."""')
            lines.append("        status = json.loads(kvx_final_status(ti))")
            lines.append('        if status["state"] != "SUCCEEDED":')
            lines.append('            raise AirflowFailException(status["error"]["message"])')
            lines.append("")
            lines.append(f"    {self.outcome_variable}_task = {self.outcome_variable}()")
        lines.append("")
        lines += self._dependencies()
        return "\n".join(lines) + "\n"

    def _dependencies(self) -> list[str]:
        lines: list[str] = []
        for step in self.plan.steps:
            if step.after:
                lines.append(_dependency([self.variables[name] for name in step.after], [self.variables[step.name]]))
        if self.plan.exit_steps:
            # Airflow has no list >> list: the body's tasks are named once, each exit task waits for them all.
            body = [Code(self.variables[step.name]) for step in self.plan.steps]
            lines.append(f"    body = {_py(body, 4, 11)}")
            for step in self.plan.exit_steps:
                lines.append(f"    body >> {self.variables[step.name]}")
            lines.append(f"    body >> {self.outcome_variable}_task")
        return lines

    # --- one task ----------------------------------------------------------------------------

    def _task(self, step: PlannedStep, *, after_body: bool) -> str:
        kwargs: dict[str, Any] = {"task_id": step.name}
        if self.operator == "pods":
            kwargs["name"] = step.name
            kwargs["arguments"] = [step.command, *(self._templated(arg) for arg in step.args())]
            if step.env != self.plan_env():
                kwargs["env_vars"] = self._env_vars({**self._task_env(), **self._step_env(step)})
            resources = step.resources
            if resources is not None:
                amounts = resources.requests(GPU_RESOURCE)
                if amounts:
                    kwargs["container_resources"] = Call("k8s.V1ResourceRequirements",
                                                         {"requests": amounts, "limits": amounts})
                selector = resources.pod_node_selector(GPU_RESOURCE)
                if selector:  # a templated field: values kept literal
                    kwargs["node_selector"] = {key: _jinja_literal(value) for key, value in selector.items()}
            if any(ref is Symbol.MLFLOW_RUN_ID_OUTPUT for ref in step.references()):
                kwargs["do_xcom_push"] = True
        else:
            kwargs["bash_command"] = self._bash_command(step)
            kwargs["cwd"] = _jinja_literal(str(self.project_dir))  # a templated field
            kwargs["env"] = Code("TASK_ENV") if step.env == self.plan_env() else \
                {**self._task_env(), **self._step_env(step)}
            kwargs["append_env"] = True
        kwargs.update(self._retry(step))
        if after_body:
            kwargs["trigger_rule"] = Code("TriggerRule.ALL_DONE")
        if self.operator == "pods":
            kwargs["**POD"] = None
        name = "KubernetesPodOperator" if self.operator == "pods" else "BashOperator"
        return _py(Call(name, kwargs), 4, 4 + len(self.variables[step.name]) + 3)

    def plan_env(self) -> Mapping[str, str]:
        """The environment most steps share (the plan gives every step the same one today)."""
        envs = [step.env for step in (*self.plan.steps, *self.plan.exit_steps)]
        return max(envs, key=envs.count) if envs else {}

    def _step_env(self, step: PlannedStep) -> dict[str, str]:
        return {name: _jinja_literal(value) for name, value in step.env.items()}

    def _google_auth(self) -> bool:
        return self.run.authentication is not None and self.run.authentication.type == "GoogleOAuth2"

    def _macros(self) -> dict[str, Any]:
        macros: dict[str, Any] = {}
        if self.plan.exit_steps:
            macros["kvx_final_status"] = Code("kvx_final_status")
        if self._google_auth():
            macros["kvx_google_audience"] = Code("kvx_google_audience")
            macros["kvx_google_id_token"] = Code("kvx_google_id_token")
        return macros

    def _task_env(self) -> dict[str, Any]:
        env: dict[str, Any] = {name: _jinja_literal(value) for name, value in self.plan_env().items()}
        env["KVX_ORCHESTRATOR"] = Airflow.name
        authentication = self.run.authentication
        if authentication is not None and authentication.type == "Vars":
            # Rendered by Airflow for each task (a secrets backend serves them); never a value here.
            env.update({name: f"{{{{ var.value.{name} }}}}" for name in authentication.params})
        elif authentication is not None:
            env[TOKEN_VARIABLE] = "{{ kvx_google_id_token() }}"
            # The step renews the token from its own credentials before the hour is up.
            env[settings.MLFLOW_TOKEN_AUDIENCE.name] = "{{ kvx_google_audience() }}"
        return env

    def _retry(self, step: PlannedStep) -> dict[str, Any]:
        retry = step.retry
        if retry is None or not retry.max_retry_count:
            return {"retries": 0}
        delay = float(retry.backoff_duration[:-1])
        settings: dict[str, Any] = {"retries": retry.max_retry_count,
                                    "retry_delay": Code(f"timedelta(seconds={_seconds(delay)})")}
        if delay and retry.backoff_factor > 1:
            # Airflow 2.10 takes a bool (True: the delay doubles), Airflow 3 the factor (True is 2.0).
            settings["retry_exponential_backoff"] = Code("True") if retry.backoff_factor == 2 else \
                Code(f"{float(retry.backoff_factor)!r} if AIRFLOW_3 else True")
            settings["max_retry_delay"] = Code(f"timedelta(seconds={_seconds(float(retry.backoff_max_duration[:-1]))})")
        return settings

    def _pod_settings(self) -> dict[str, Any]:
        run = self.run
        settings: dict[str, Any] = {
            "image": _jinja_literal(self.plan.image),
            "image_pull_policy": run.image_pull_policy,
            "cmds": [PROGRAM],
            "env_vars": self._env_vars(Code("TASK_ENV")),
        }
        if run.namespace:
            settings["namespace"] = run.namespace
        if run.service_account:
            settings["service_account_name"] = run.service_account
        if run.labels:
            settings["labels"] = {key: _jinja_literal(value) for key, value in run.labels.items()}
        if run.annotations:
            settings["annotations"] = {key: _jinja_literal(value) for key, value in run.annotations.items()}
        if run.tolerations:
            settings["tolerations"] = [Call("k8s.V1Toleration", _toleration(t)) for t in run.tolerations]
        secrets = self._secrets()
        if secrets:
            settings["secrets"] = [Call("Secret", secret) for secret in secrets]
        settings.update({
            "kubernetes_conn_id": _jinja_literal(run.kubernetes_conn_id),  # a templated field
            "startup_timeout_seconds": run.startup_timeout,
            "get_logs": True,
            "on_finish_action": run.on_finish_action,
        })
        return settings

    def _secrets(self) -> list[dict[str, Any]]:
        """``run_config.secrets`` and ``run_config.kubernetes.secrets_as_env`` as the provider's
        ``Secret(deploy_type, deploy_target, secret, key)``: names only, never a value."""
        secrets: list[dict[str, Any]] = []
        for secret in self.run.secrets:
            item: dict[str, Any] = {"deploy_type": secret.deploy_type, "deploy_target": secret.deploy_target,
                                    "secret": secret.secret_name}
            if secret.key:
                item["key"] = secret.key
            secrets.append(item)
        for as_env in self.run.kubernetes.secrets_as_env:
            if as_env.optional:
                continue  # the provider's Secret cannot say optional: an env var of its own (_secret_env)
            for key, variable in as_env.keys.items():
                secrets.append({"deploy_type": "env", "deploy_target": variable, "secret": as_env.secret_name,
                                "key": key})
        return secrets

    def _secret_env(self) -> list[Call]:
        """``secrets_as_env`` marked ``optional`` as the pod's env vars from a secret key that may
        be missing (the pod starts without them, as on Kubeflow), where a missing ``Secret`` keeps
        the pod from starting until its start-up timeout."""
        return [Call("k8s.V1EnvVar", {"name": variable, "value_from": Call("k8s.V1EnvVarSource", {
                    "secret_key_ref": Call("k8s.V1SecretKeySelector",
                                           {"name": as_env.secret_name, "key": key, "optional": True})})})
                for as_env in self.run.kubernetes.secrets_as_env if as_env.optional
                for key, variable in as_env.keys.items()]

    def _env_vars(self, values: Any) -> Any:
        """A pod's ``env_vars``: ``values`` (a dict, or code naming one), with the optional
        secrets' variables when there are any (then as the provider's list of V1EnvVar, whose
        values Airflow still templates)."""
        if not self._secret_env():
            return values
        text = values.text if isinstance(values, Code) else _flat(values)
        return Code(f"[*(k8s.V1EnvVar(name=name, value=value) for name, value in {text}.items()), *SECRET_ENV]")

    # --- command lines -----------------------------------------------------------------------

    def _value_of(self, reference: Reference) -> str:
        """The Jinja expression of a plan's marker."""
        if isinstance(reference, ParameterRef):
            kind = self.kinds.get(reference.name)
            if kind is None:
                raise ValueError(f"a step reads pipeline parameter '{reference.name}', which the plan does not declare")
            # json.dumps, not Jinja's tojson: that sorts a dict's keys (node code iterating it would see
            # another order than under kedro run).
            return _param(reference.name) + (f" | {_JSON_FILTER}" if kind in _JSON_KINDS else "")
        expression = _EXPRESSIONS.get(reference)
        if expression is not None:
            return expression
        raise ValueError(f"the Airflow renderer has no value for {reference!r}")

    def _literal_of(self, reference: Reference) -> str | None:
        """The text of a marker whose value the DAG knows when it is written."""
        if reference is Symbol.JOB_NAME:
            return self.dag_id
        if reference is Symbol.MLFLOW_RUN_ID_OUTPUT:
            # Pods: the provider's sidecar reads this file as the task's XCom. A worker's
            # subprocess: the id reaches XCom as the task's last line of output, which
            # mlflow-start prints; the file is not needed.
            return POD_XCOM_FILE if self.operator == "pods" else "/dev/null"
        return None

    def _resolved(self, arg: str) -> list[str | Reference]:
        """``arg`` as literal pieces (the known markers' values merged in) and markers."""
        pieces: list[str | Reference] = []

        def literal(text: str) -> None:
            if pieces and not _is_marker(pieces[-1]):
                pieces[-1] = str(pieces[-1]) + text
            else:
                pieces.append(text)

        def marker(reference: Reference) -> None:
            known = self._literal_of(reference)
            if known is None:
                pieces.append(reference)
            else:
                literal(known)

        _split(arg, literal, marker)
        return pieces

    def _templated(self, arg: str) -> str:
        """A pod argument: literal text kept, markers as Jinja expressions."""
        return "".join("{{ " + self._value_of(piece) + " }}" if _is_marker(piece) else _jinja_literal(str(piece))
                       for piece in self._resolved(arg))

    def _bash_command(self, step: PlannedStep) -> str:
        """The step's command line for bash: literal words quoted now, templated words quoted
        when Airflow renders them (``shlex.quote`` as a filter), so no value reaches the shell
        unquoted."""
        words = []
        for arg in step.argv():
            pieces = self._resolved(arg)
            if not any(map(_is_marker, pieces)):
                words.append(_jinja_literal(shlex.quote("".join(map(str, pieces)))))
                continue
            parts = [self._value_of(piece) if _is_marker(piece) else json.dumps(str(piece)) for piece in pieces]
            expression = parts[0] if len(parts) == 1 else " ~ ".join(f"({part})" for part in parts)
            words.append("{{ (" + expression + ") | shell_quote }}")
        command = " ".join(words)
        # BashOperator reads a command ending in .sh or .bash as a script file's name.
        return command + " " if command.endswith((".sh", ".bash")) else command


def _dependency(upstream: Sequence[str], downstream: Sequence[str]) -> str:
    """``upstream >> downstream`` in the DAG's body, lists one name a line when too long."""
    def side(names: Sequence[str], used: int) -> str:
        return names[0] if len(names) == 1 else _py([Code(name) for name in names], 4, used)

    flat = f"    {side(upstream, 0)} >> {side(downstream, 0)}"
    if len(flat) <= _WIDTH:
        return flat
    left = side(upstream, _WIDTH)  # one name a line
    return f"    {left} >> {side(downstream, len(left.splitlines()[-1]) + 4)}"


def _is_marker(piece: str | Reference) -> TypeGuard[Reference]:
    # Symbol is a str Enum: a marker is told from literal text by its type, not by str.
    return isinstance(piece, (Symbol, ParameterRef))


def _split(text: str, literal: Callable[[str], None], marker: Callable[[Reference], None]) -> None:
    """Walk ``text``: its literal pieces and its markers, in order."""
    position = 0
    for match in re.finditer(r"<kvx:(param:)?[A-Za-z0-9_]+>", text):
        if match.start() > position:
            literal(text[position:match.start()])
        [reference] = references(match.group(0))
        marker(reference)
        position = match.end()
    if position < len(text):
        literal(text[position:])


def _param(name: str) -> str:
    """A DAG param in Jinja, by key: ``params.items`` would be the params dict's own method.
    (Param names are identifiers: nothing to escape.)"""
    return f"params['{name}']"


#: The markers whose Jinja expression is the same for every DAG.
_EXPRESSIONS: dict[Reference, str] = {
    Symbol.RUN_ID: "run_id",
    # Airflow 2.10 has no run_after: its logical date is set for every run and unique per DAG.
    Symbol.JOB_CREATE_TIME: "(dag_run.run_after | default(dag_run.logical_date)).isoformat()",
    Symbol.STORAGE_ROOT: _param(STORAGE_ROOT_PARAM),
    Symbol.SAVE_VERSION: _param(SAVE_VERSION_PARAMETER),
    Symbol.MLFLOW_RUN_ID: f"ti.xcom_pull(task_ids={MLFLOW_START_STEP!r})",
    Symbol.FINAL_STATUS: "kvx_final_status(ti)",
}
#: Where the DAG file imports each name from: (Airflow 3, Airflow 2.10).
_HOMES: dict[str, tuple[str, str]] = {
    "DAG": ("airflow.sdk", "airflow.models.dag"),
    "Param": ("airflow.sdk", "airflow.models.param"),
    "TriggerRule": ("airflow.sdk", "airflow.utils.trigger_rule"),
    "task": ("airflow.sdk", "airflow.decorators"),
    "AirflowFailException": ("airflow.sdk.exceptions", "airflow.exceptions"),
    "mask_secret": ("airflow.sdk.log", "airflow.utils.log.secrets_masker"),
    # Airflow 3's standard provider; Airflow 2.10's core.
    "BashOperator": ("airflow.providers.standard.operators.bash", "airflow.operators.bash"),
}


def _from_imports(homes: Mapping[str, str]) -> list[str]:
    """``from MODULE import NAMES`` lines for name -> module, as isort orders them: modules
    alphabetically, names constants first (``DAG``), then classes, then functions."""
    modules: dict[str, list[str]] = {}
    for name, module in homes.items():
        modules.setdefault(module, []).append(name)

    def kind(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2), name

    return [f"from {module} import {', '.join(sorted(names, key=kind))}"
            for module, names in sorted(modules.items())]


#: Pipeline parameter kinds (kvx_runtime.params) as Param's JSON schema types.
_PARAM_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "list": "array",
                "dict": "object"}


def _datetime(moment: datetime) -> str:
    """A ``datetime`` literal with the offset ``moment`` was given with: Airflow takes a DAG's
    timezone from its start date, so ``0 3 * * *`` from a start at +01:00 runs at 03:00 there."""
    offset = moment.utcoffset()
    zone = "timezone.utc" if not offset else f"timezone(timedelta(seconds={int(offset.total_seconds())}))"
    fields = [moment.year, moment.month, moment.day]
    if (moment.hour, moment.minute, moment.second) != (0, 0, 0):
        fields += [moment.hour, moment.minute, moment.second]
    return f"datetime({', '.join(map(str, fields))}, tzinfo={zone})"


def _toleration(toleration: Any) -> dict[str, Any]:
    fields = {"key": toleration.key, "operator": toleration.operator, "value": toleration.value,
              "effect": toleration.effect, "toleration_seconds": toleration.toleration_seconds}
    return {name: value for name, value in fields.items() if value is not None}


def write_dag(dag: AirflowDag, output: str | Path) -> Path:
    from kvx_runtime.compiler.output import write_output

    return write_output(output, dag.text)


#: run_config.authentication GoogleOAuth2: an ID token for the worker's GOOGLE_AUDIENCE, minted
#: when each task's environment is rendered (google-auth is on Cloud Composer's workers), and the
#: audience itself, so that a step running past the token's hour mints the next one.
_GOOGLE_ID_TOKEN_MACRO = '''def kvx_google_audience() -> str:
    """The worker's GOOGLE_AUDIENCE: the audience of the ID tokens for MLflow (behind Google auth)."""
    import os

    audience = os.environ.get("GOOGLE_AUDIENCE")
    if not audience:
        raise AirflowFailException(
            "run_config.authentication GoogleOAuth2: set GOOGLE_AUDIENCE in the Airflow workers' environment"
        )
    return audience


def kvx_google_id_token() -> str:
    """An ID token for GOOGLE_AUDIENCE from the worker's Google credentials."""
    audience = kvx_google_audience()
    try:
        import google.auth.transport.requests
        import google.oauth2.id_token
    except ImportError as exc:
        raise AirflowFailException(
            f"run_config.authentication GoogleOAuth2 needs google-auth on the worker: {exc}"
        )
    token = google.oauth2.id_token.fetch_id_token(google.auth.transport.requests.Request(), audience)
    mask_secret(token)
    return token'''
