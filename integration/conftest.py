"""End-to-end fixtures: the example project run by real `kvx-runtime exec-node` processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import EXAMPLE_PROJECT, LOOPBACK_ONLY, copy_example_project

KVX = [sys.executable, "-m", "kvx_runtime"]


@dataclass
class StepRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def records(self) -> list[dict]:
        out = []
        for line in self.stderr.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out

    @property
    def last_message(self) -> str:
        return self.records[-1]["message"] if self.records else self.stderr.strip().splitlines()[-1]

    def messages(self) -> list[str]:
        return [record.get("message", "") for record in self.records]


def step_env(**extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("KEDRO_CONFIG_", "KVX_", "PYTEST_"))
    }
    env.update({"KVX_LOG_FORMAT": "json", "KVX_STORAGE_RETRY_WAIT": "0.1"})
    env.update(extra)
    return env


def run_step(project: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 180) -> StepRun:
    result = subprocess.run(
        [*KVX, "exec-node", *args],
        cwd=project,
        env=env or step_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return StepRun(result.returncode, result.stdout, result.stderr)


_BASELINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from kedro.framework.startup import bootstrap_project
    from kedro.framework.project import pipelines, settings
    from kedro.framework.session import KedroSession
    from kvx_runtime.config_loader import EnvTemplatedConfigLoader

    project = Path(sys.argv[1])
    bootstrap_project(project)
    if sys.argv[2] == "order":
        print(json.dumps([n.name for n in pipelines["__default__"].nodes]))
        raise SystemExit(0)
    # A plain in-process `kedro run` of the whole pipeline (no kedro-mlflow: not configured).
    settings.set("DISABLE_HOOKS_FOR_PLUGINS", ("kedro_mlflow", "kedro-telemetry"))
    settings.set("CONFIG_LOADER_CLASS", EnvTemplatedConfigLoader)
    with KedroSession.create(project, env=sys.argv[3]) as session:
        session.run()
    """
)


def kedro_in_process(project: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-c", _BASELINE_SCRIPT, str(project), *args],
        cwd=project,
        env=env or step_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="session")
def node_order() -> list[str]:
    return json.loads(kedro_in_process(EXAMPLE_PROJECT, "order").strip().splitlines()[-1])


#: The example pipeline's report files (data/08_reporting/<run id>/), what runs are compared by.
REPORT_FILES = ["importance.csv", "metrics.json", "report_dirty.md", "shuttle_summary.csv"]


def reports(project: Path, run_id: str) -> dict[str, str]:
    folder = project / "data" / "08_reporting" / run_id
    return {name: (folder / name).read_text() for name in REPORT_FILES}


@pytest.fixture(scope="session")
def kedro_run_reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The report files of a plain in-process `kedro run` of the example project (base env),
    the reference for runs through kvx-runtime: one run per test session (they do not depend on
    the run id)."""
    project = copy_example_project(tmp_path_factory.mktemp("kedro-run") / "example_project")
    kedro_in_process(project, "run", "base", env=step_env(KEDRO_CONFIG_RUN_ID="baseline", **LOOPBACK_ONLY))
    return reports(project, "baseline")


def signal_after_node_started(process: subprocess.Popen, signum: int, timeout: float = 60,
                              event: str = "node started", delay: float = 0.0) -> str:
    """Wait until the step logs ``event`` (and ``delay`` seconds more), send ``signum``,
    return the rest of stderr."""
    import time

    assert process.stderr is not None
    deadline = time.monotonic() + timeout
    for line in process.stderr:
        if f'"{event}"' in line or time.monotonic() > deadline:
            break
    time.sleep(delay)
    process.send_signal(signum)
    _, rest = process.communicate(timeout=30)
    return str(rest)


_SLOW_NODES = """
import time

def make():
    return list(range(1000))

def slow(values):
    time.sleep(120)
    return values
"""
_SLOW_PIPELINE = """
from kedro.pipeline import Node, Pipeline
from {package}.nodes import make, slow

def register_pipelines():
    return {{"__default__": Pipeline([Node(make, None, "values", name="make"),
                                      Node(slow, "values", "result", name="slow"),
                                      Node(len, "result", "size", name="count")])}}
"""


def make_slow_project(root: Path, package: str) -> Path:
    """make -> slow (sleeps two minutes) -> count: for stopping a step in the middle of a node."""
    return make_project(root, package, _SLOW_NODES, _SLOW_PIPELINE.format(package=package))


_SLOW_PICKLING_NODES = """
import os, time


class SlowToPickle:
    def __reduce__(self):
        time.sleep({pause})
        return (SlowToPickle, ())


def make():
    # Megabytes first (an upload session is open by then), then seconds of pickling.
    return [os.urandom({megabytes} * 1024 * 1024), [SlowToPickle() for _ in range({objects})]]
"""
_SLOW_PICKLING_PIPELINE = """
from kedro.pipeline import Node, Pipeline
from {package}.nodes import make

def register_pipelines():
    return {{"__default__": Pipeline([Node(make, None, "payload", name="make"),
                                      Node(len, "payload", "size", name="count")])}}
"""


def make_slow_pickling_project(root: Path, package: str, *, megabytes: int = 16, objects: int = 1000,
                               pause: float = 0.02) -> Path:
    """make -> count, where make's output takes seconds to pickle (``objects`` x ``pause``) after
    megabytes of data: for stopping a step in the middle of writing a blob."""
    nodes = _SLOW_PICKLING_NODES.format(megabytes=megabytes, objects=objects, pause=pause)
    return make_project(root, package, nodes, _SLOW_PICKLING_PIPELINE.format(package=package))


def make_project(root: Path, package: str, nodes_py: str, pipeline_py: str, catalog: str = "",
                 vertexai: str = "") -> Path:
    """A minimal Kedro project written from strings (for failure modes the example lacks)."""
    project = root / package
    src = project / "src" / package
    src.mkdir(parents=True)
    (project / "conf" / "base").mkdir(parents=True)
    (project / "conf" / "local").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        f'[project]\nname = "{package}"\nversion = "0.1"\n\n'
        f'[tool.kedro]\npackage_name = "{package}"\nproject_name = "{package}"\n'
        'kedro_init_version = "1.0.0"\nsource_dir = "src"\n'
    )
    (src / "__init__.py").write_text("")
    (src / "settings.py").write_text("")
    (src / "nodes.py").write_text(textwrap.dedent(nodes_py))
    (src / "pipeline_registry.py").write_text(textwrap.dedent(pipeline_py))
    (project / "conf" / "base" / "catalog.yml").write_text(textwrap.dedent(catalog))
    (project / "conf" / "base" / "parameters.yml").write_text("{}\n")
    if vertexai:
        (project / "conf" / "base" / "vertexai.yml").write_text(textwrap.dedent(vertexai))
    return project


# --- a three-node project for the step cache --------------------------------------------------

_CACHE_NODES = """
from .helpers import scale
from . import formatting


def clean(raw, factor):
    return [scale(value, factor) for value in raw]


def total(cleaned):
    return sum(cleaned)


def tabulate(total, label):
    import pandas as pd

    if label == "FAIL":
        raise ValueError("the label says FAIL")
    return pd.DataFrame({"label": [formatting.title(label)], "total": [total]})
"""
_CACHE_HELPERS = "def scale(value, factor):\n    return value * factor\n"
_CACHE_FORMATTING = "def title(text):\n    return text.title()\n"
_CACHE_PIPELINE = """
from kedro.pipeline import Pipeline, node

from .nodes import clean, tabulate, total


def register_pipelines():
    return {"__default__": Pipeline([
        node(clean, ["raw_numbers", "params:factor"], "cleaned", name="clean"),
        node(total, "cleaned", "total", name="total"),
        node(tabulate, ["total", "params:label"], "table", name="tabulate"),
    ])}
"""
_CACHE_CATALOG = """
raw_numbers:
  type: json.JSONDataset
  filepath: data/raw.json
table:
  type: pandas.CSVDataset
  filepath: data/table.csv
  save_args: {index: false}
"""


def make_cache_project(root: Path, package: str = "cachekey") -> Path:
    """clean(raw_numbers, params:factor) -> cleaned -> total -> tabulate(total, params:label) ->
    table (a CSV with save args); the nodes import a helper module each way (from-import, module
    import); a second env ``other``. tabulate raises when the label is ``FAIL``."""
    made = make_project(root, package, _CACHE_NODES, _CACHE_PIPELINE, _CACHE_CATALOG)
    src = made / "src" / package
    (src / "helpers.py").write_text(_CACHE_HELPERS)
    (src / "formatting.py").write_text(_CACHE_FORMATTING)
    (made / "conf" / "base" / "parameters.yml").write_text("factor: 2\nlabel: total\n")
    (made / "conf" / "other").mkdir()
    (made / "data").mkdir()
    (made / "data" / "raw.json").write_text("[1, 2, 3]")
    return made


# --- a spaceflights-like project with a local-path catalog (as the Kedro starter's) ---------

_SPACEFLIGHTS_NODES = """
import numpy as np
import pandas as pd


def preprocess_companies(companies):
    companies = companies.copy()
    companies["iata_approved"] = companies["iata_approved"] == "t"
    companies["company_rating"] = companies["company_rating"].str.rstrip("%").astype(float) / 100
    return companies


def preprocess_shuttles(shuttles):
    shuttles = shuttles.copy()
    shuttles["price"] = shuttles["price"].str.lstrip("$").str.replace(",", "", regex=False).astype(float)
    return shuttles


def create_model_input_table(shuttles, companies, reviews):
    table = shuttles.merge(reviews, left_on="id", right_on="shuttle_id").drop(columns=["id"])
    return table.merge(companies, left_on="company_id", right_on="id").dropna().reset_index(drop=True)


def split_data(table, options):
    features = table[options["features"]].astype(float)
    cut = int(len(table) * (1 - options["test_size"]))
    return features[:cut], features[cut:], table["price"][:cut], table["price"][cut:]


def train_model(x_train, y_train):
    design = np.column_stack([np.ones(len(x_train)), x_train.to_numpy()])
    coefficients, *_ = np.linalg.lstsq(design, y_train.to_numpy(), rcond=None)
    return {"coefficients": coefficients, "features": list(x_train.columns)}


def evaluate_model(regressor, x_test, y_test):
    design = np.column_stack([np.ones(len(x_test)), x_test[regressor["features"]].to_numpy()])
    errors = design @ regressor["coefficients"] - y_test.to_numpy()
    return {"mae": round(float(np.abs(errors).mean()), 6), "rows": int(len(x_test))}


def shuttle_summary(table):
    return table.groupby("engine_type", as_index=False)["price"].mean().round(4)
"""

_SPACEFLIGHTS_PIPELINE = """
from kedro.pipeline import Pipeline, node

from {package}.nodes import (create_model_input_table, evaluate_model, preprocess_companies, preprocess_shuttles,
                             shuttle_summary, split_data, train_model)


def register_pipelines():
    processing = Pipeline([
        node(preprocess_companies, "companies", "preprocessed_companies", name="preprocess_companies"),
        node(preprocess_shuttles, "shuttles", "preprocessed_shuttles", name="preprocess_shuttles"),
        node(create_model_input_table, ["preprocessed_shuttles", "preprocessed_companies", "reviews"],
             "model_input_table", name="create_model_input_table"),
    ])
    science = Pipeline([
        node(split_data, ["model_input_table", "params:model_options"], ["x_train", "x_test", "y_train", "y_test"],
             name="split_data"),
        node(train_model, ["x_train", "y_train"], "regressor", name="train_model"),
        node(evaluate_model, ["regressor", "x_test", "y_test"], "metrics", name="evaluate_model"),
        node(shuttle_summary, "model_input_table", "shuttle_summary_report", name="shuttle_summary"),
    ])
    return {{"__default__": processing + science, "data_processing": processing}}
"""

#: The Kedro spaceflights starter's catalog, locally: csv (one with load_args), parquet, a
#: dataset factory, a versioned pickle, json; plus what a cloud env leaves as it is.
SPACEFLIGHTS_CATALOG = """
_csv: &csv
  type: pandas.CSVDataset

companies:
  <<: *csv
  filepath: data/01_raw/companies.csv

reviews:
  type: pandas.CSVDataset
  filepath: data/01_raw/reviews.csv

shuttles:
  type: pandas.CSVDataset
  filepath: data/01_raw/shuttles.csv
  load_args:
    sep: ";"

preprocessed_companies:
  type: pandas.ParquetDataset
  filepath: data/02_intermediate/preprocessed_companies.parquet

preprocessed_shuttles:
  type: pandas.ParquetDataset
  filepath: data/02_intermediate/preprocessed_shuttles.parquet
  save_args:
    index: false

"{name}_table":
  type: pandas.ParquetDataset
  filepath: data/03_primary/{name}_table.parquet

regressor:
  type: pickle.PickleDataset
  filepath: data/06_models/regressor.pickle
  versioned: true

metrics:
  type: json.JSONDataset
  filepath: data/08_reporting/metrics.json

"{name}_report":
  type: pandas.CSVDataset
  filepath: data/08_reporting/{name}.csv
  save_args:
    index: false

archive:
  type: pandas.CSVDataset
  filepath: s3://kvx-archive/shuttles.csv

scratch:
  type: MemoryDataset
"""


def make_spaceflights_project(root: Path, package: str, *, shuttles: int = 60,
                              vertexai: str = "run_config: {image: sf:1, root: gs://kvx-e2e/spaceflights}\n") -> Path:
    """A project laid out as the Kedro spaceflights starter, with deterministic raw data."""
    import numpy as np
    import pandas as pd

    project = make_project(root, package, _SPACEFLIGHTS_NODES, _SPACEFLIGHTS_PIPELINE.format(package=package),
                           SPACEFLIGHTS_CATALOG, vertexai)
    (project / "conf" / "base" / "parameters.yml").write_text(
        "model_options:\n  test_size: 0.25\n  features: [engines, passenger_capacity, company_rating]\n")
    rng = np.random.default_rng(11)
    companies = pd.DataFrame({"id": range(1, 11),
                              "company_rating": [f"{r}%" for r in rng.integers(50, 101, 10)],
                              "iata_approved": rng.choice(["t", "f"], 10)})
    ids = np.arange(1, shuttles + 1)
    engines = rng.integers(1, 5, shuttles)
    capacity = rng.integers(2, 9, shuttles)
    table = pd.DataFrame({"id": ids, "company_id": rng.integers(1, 11, shuttles), "engines": engines,
                          "passenger_capacity": capacity,
                          "engine_type": rng.choice(["Plasma", "Quantum", "Nuclear"], shuttles),
                          "price": [f"${p:,.2f}" for p in 900 + 350 * engines + 120 * capacity
                                    + rng.normal(0, 40, shuttles)]})
    reviews = pd.DataFrame({"shuttle_id": ids, "review_scores_rating": rng.integers(60, 101, shuttles)})
    raw = project / "data" / "01_raw"
    raw.mkdir(parents=True)
    companies.to_csv(raw / "companies.csv", index=False)
    table.to_csv(raw / "shuttles.csv", index=False, sep=";")
    reviews.to_csv(raw / "reviews.csv", index=False)
    return project


# --- MLflow servers and Google fakes (started once per test session) ---------------------

from collections.abc import Iterator  # noqa: E402

from conftest import free_port, stop, wait_for_port  # noqa: E402

ADMIN_USER, ADMIN_PASSWORD = "admin", "kvx-admin-Passw0rd!"


@dataclass
class MlflowServer:
    url: str
    port: int
    process: subprocess.Popen

    def client(self, **env: str):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.url)


def _start_mlflow(root: Path, *extra: str, env_extra: dict[str, str] | None = None) -> MlflowServer:
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           **(env_extra or {})}
    log = (root / "server.log").open("wb")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1", *extra],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
    )
    try:
        wait_for_port(port, process, timeout=120)
    except RuntimeError:
        stop(process)
        raise RuntimeError(f"mlflow server failed: {(root / 'server.log').read_text()[-2000:]}") from None
    return MlflowServer(url=f"http://127.0.0.1:{port}", port=port, process=process)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    server = _start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield server
    stop(server.process)


@pytest.fixture(scope="session")
def mlflow_auth_server(tmp_path_factory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow-auth")
    config = root / "basic_auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
        f"admin_username = {ADMIN_USER}\nadmin_password = {ADMIN_PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    server = _start_mlflow(root, "--app-name", "basic-auth", env_extra={
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "kvx-test-flask-secret",
    })
    yield server
    stop(server.process)


@pytest.fixture(scope="session")
def fake_google() -> Iterator[Any]:
    from integration.fakes import FakeGoogle

    server = FakeGoogle().start()
    yield server
    server.stop()


AUDIENCE = "kvx-test-oauth-client.apps.googleusercontent.com"


@pytest.fixture(scope="session")
def bearer_proxy(mlflow_server, fake_google) -> Iterator[Any]:
    from integration.fakes import BearerProxy

    proxy = BearerProxy(mlflow_server.port, AUDIENCE).start()
    yield proxy
    proxy.stop()


from integration.airflow_server import AirflowServer  # noqa: E402


@pytest.fixture(scope="module")
def airflow_server(tmp_path_factory, mlflow_server: MlflowServer) -> Iterator[AirflowServer]:
    """A real Airflow 3 deployment on 127.0.0.1 (``integration.airflow_server``): API server,
    scheduler (LocalExecutor, SQLite) and DAG processor, started for each module that uses it
    (a minute at most): an idle deployment keeps parsing its folder and polling, a third of a
    core that the rest of the session would pay for. Its tasks run ``kvx-runtime`` from this venv
    and log to the session's MLflow server; DAG files dropped into ``dags_folder`` are parsed
    within seconds."""
    from integration.airflow_env import find_or_build
    from integration.airflow_server import start_airflow_server

    root = tmp_path_factory.mktemp("airflow-server")
    found = find_or_build(root / "home")
    if isinstance(found, str):
        pytest.skip(found)
    server = start_airflow_server(root, {"KEDRO_CONFIG_MLFLOW_TRACKING_URI": mlflow_server.url}, found=found)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def airflow2_server(tmp_path_factory, mlflow_server: MlflowServer) -> Iterator[AirflowServer]:
    """A real Airflow 2.10 deployment on 127.0.0.1 (``integration.airflow_server.AIRFLOW_2``, as
    Cloud Composer 2 runs): webserver with REST API v1 and HTTP Basic auth, and a scheduler that
    parses the DAG folder and runs one task at a time (SequentialExecutor, SQLite). Its tasks run
    ``kvx-runtime`` from this venv and log to the session's MLflow server. Started for each module
    that uses it, as ``airflow_server``; each such module's tests have an xdist_group of their
    own, so that they share it on one worker while other modules' deployments may run on the
    other (at their peaks 0.75 GB and 0.5 GB of proportional set size, 1.3 and 1.0 GB RSS, tasks
    included)."""
    from integration.airflow_env import AIRFLOW2, find_or_build
    from integration.airflow_server import AIRFLOW_2, start_airflow_server

    root = tmp_path_factory.mktemp("airflow2-server")
    found = find_or_build(root / "home", AIRFLOW2)
    if isinstance(found, str):
        pytest.skip(found)
    server = start_airflow_server(root, {"KEDRO_CONFIG_MLFLOW_TRACKING_URI": mlflow_server.url}, found=found,
                                  deployment=AIRFLOW_2)
    yield server
    server.stop()
