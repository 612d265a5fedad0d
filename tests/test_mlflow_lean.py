"""The lean MLflow attachment's own rules (kvx_runtime.mlflow.lean): kedro-mlflow's and
MLflow's rules it repeats stay equal to theirs, a step takes it only where it can, and the
import hook that hands the run over to MLflow. The REST side runs against a real server in
integration/test_mlflow_lean.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from integration.conftest import make_project
from kvx_runtime.errors import ConfigError
from kvx_runtime.lazy_imports import after_import
from kvx_runtime.mlflow import lean

SAMPLES: list[dict[str, Any]] = [
    {},
    {"a": 1, "b": "x"},
    {"model": {"depth": 3, "nested": {"rate": 0.5, "deeper": {"x": [1, 2]}}}, "n": None},
    {"parameters": {"a": {"b": {}}, "c": {"d": 1}}},
]


@pytest.mark.parametrize("sample", SAMPLES)
@pytest.mark.parametrize(("recursive", "sep"), [(True, "."), (False, "."), (True, "__")])
def test_flattening_is_kedro_mlflows(sample: dict[str, Any], recursive: bool, sep: str) -> None:
    from kedro_mlflow.framework.hooks.utils import _flatten_dict

    assert lean.flatten_params(sample, recursive=recursive, sep=sep) == _flatten_dict(sample, recursive=recursive,
                                                                                      sep=sep)


@pytest.mark.parametrize("name", ["lr", "model.depth", "a b", "what?", "é/ü-1:2", "x[0]", "tab\tname", ""])
def test_param_names_are_sanitized_as_kedro_mlflow_does(name: str) -> None:
    from kedro_mlflow.framework.hooks.mlflow_hook import MlflowHook

    assert lean.sanitized_param_name(name) == MlflowHook().sanitize_param_name(name)


def test_the_longest_param_is_mlflows() -> None:
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    assert lean.LONG_PARAM_LENGTH == MAX_PARAM_VAL_LENGTH


@pytest.fixture
def fresh_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"kvx_after_import_probe_{tmp_path.name.replace('-', '_')}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_the_callback_runs_once_after_the_package_is_imported(fresh_package: str) -> None:
    import importlib
    import importlib.util

    seen: list[Any] = []
    finder = after_import(fresh_package, lambda module: seen.append(module.VALUE))
    assert finder is not None
    assert importlib.util.find_spec(fresh_package) is not None and seen == []  # looking is not importing
    module = importlib.import_module(fresh_package)
    assert seen == [42] and module.VALUE == 42
    assert finder not in sys.meta_path
    del sys.modules[fresh_package]
    importlib.import_module(fresh_package)
    assert seen == [42]  # once
    assert after_import(fresh_package, seen.append) is None  # imported already: no hook


def test_a_cancelled_callback_never_runs(fresh_package: str) -> None:
    import importlib

    seen: list[Any] = []
    finder = after_import(fresh_package, seen.append)
    assert finder is not None
    finder.cancel()
    importlib.import_module(fresh_package)
    assert seen == [] and finder not in sys.meta_path


MLFLOW_YML = """
server:
  mlflow_tracking_uri: {uri}
tracking:
  params:
    dict_params:
      flatten: {flatten}
"""


def project_with(tmp_path: Path, *, uri: str = "http://127.0.0.1:5000", flatten: str = "true",
                 catalog: str = "", extra: str = "") -> Any:
    from kvx_runtime.project import open_project

    root = make_project(tmp_path, "leanrules", "def f(x):\n    return x\n",
                        "from kedro.pipeline import Pipeline\n\ndef register_pipelines():\n"
                        "    return {'__default__': Pipeline([])}\n",
                        catalog=catalog, vertexai=yaml.safe_dump({"run_config": {"image": "img"}}))
    (root / "conf" / "base" / "mlflow.yml").write_text(MLFLOW_YML.format(uri=uri, flatten=flatten) + extra)
    return open_project(root, "base")


def why(project: Any, run_id: str | None = "0" * 32, datasets: tuple[str, ...] = ("a", "b")) -> str:
    reason, found = lean._why_not_lean(project, None, run_id, datasets, object())
    assert (found is None) == bool(reason)
    return reason


def test_a_step_is_lean_only_where_it_can_be(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "mlflow", raising=False)  # as in a step's own process
    monkeypatch.delenv("MLFLOW_TRACKING_AUTH", raising=False)
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    project = project_with(tmp_path / "plain")
    assert why(project) == ""
    _, found = lean._why_not_lean(project, None, "0" * 32, (), object())
    assert found == lean.LeanSettings(tracking_uri="http://127.0.0.1:5000", flatten=True)
    assert "job name" in why(project, run_id=None)
    monkeypatch.setenv("KVX_MLFLOW_CLIENT", "mlflow")
    assert "KVX_MLFLOW_CLIENT" in why(project)
    monkeypatch.delenv("KVX_MLFLOW_CLIENT")
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    assert "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING" in why(project)
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")

    assert "http(s)" in why(project_with(tmp_path / "sqlite", uri="sqlite:///mlflow.db"))
    assert "http(s)" in why(project_with(tmp_path / "userinfo", uri="https://user:pw@mlflow.example.com"))
    with_provider = project_with(tmp_path / "provider")
    (with_provider.conf_root / "base" / "mlflow.yml").write_text(
        "server:\n  mlflow_tracking_uri: http://h:1\n  request_header_provider:\n    type: some.Provider\n")
    assert "request header provider" in why(with_provider)
    registry = project_with(tmp_path / "registry")
    (registry.conf_root / "base" / "mlflow.yml").write_text(
        "server:\n  mlflow_tracking_uri: http://h:1\n  mlflow_registry_uri: models/registry\n")
    assert "registry URI is a path" in why(registry)
    (registry.conf_root / "base" / "mlflow.yml").write_text(
        "server:\n  mlflow_tracking_uri: http://h:1\n  mlflow_registry_uri: databricks-uc://profile\n")
    assert lean._why_not_lean(registry, None, "0" * 32, (), object())[1].registry_uri == "databricks-uc://profile"
    metrics = "b:\n  type: kedro_mlflow.io.metrics.MlflowMetricDataset\n"
    assert "kedro-mlflow's (b)" in why(project_with(tmp_path / "metrics", catalog=metrics))
    assert why(project_with(tmp_path / "other", catalog=metrics), datasets=("a", "c")) == ""
    factory = "'{name}_metric':\n  type: kedro_mlflow.io.metrics.MlflowMetricDataset\n"
    assert "{name}_metric" in why(project_with(tmp_path / "factory", catalog=factory))
    with pytest.raises(ConfigError, match="mlflow.yml: tracking.params"):
        why(project_with(tmp_path / "bad", flatten="'yes'"))
    listed = project_with(tmp_path / "list")
    (listed.conf_root / "base" / "mlflow.yml").write_text(
        "server:\n  mlflow_tracking_uri: http://h:1\ntracking:\n  params:\n    dict_params: [1]\n")
    with pytest.raises(ConfigError, match="are mappings"):
        why(listed)
    (listed.conf_root / "base" / "mlflow.yml").write_text("server: [\n")  # not YAML: MLflow's client way says so
    assert "cannot be read" in why(listed)


def test_mlflows_own_variables_and_credentials_file_keep_a_step_on_mlflows_client(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "mlflow", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in lean._MLFLOWS_OWN:
        monkeypatch.delenv(name, raising=False)
    project = project_with(tmp_path / "p")
    assert why(project) == ""
    for name in ("MLFLOW_TRACKING_AWS_SIGV4", "MLFLOW_WORKSPACE", "MLFLOW_TRACKING_AUTH"):
        monkeypatch.setenv(name, "true" if "SIGV4" in name else "team-a")
        assert name in why(project)
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    assert why(project) == ""
    # Set by mlflow.yml's server.credentials entry, exported by the step: seen before it is.
    (project.conf_root / "base" / "credentials.yml").write_text("mlflow_creds:\n  MLFLOW_WORKSPACE: team-b\n")
    mlflow_yml = project.conf_root / "base" / "mlflow.yml"
    mlflow_yml.write_text(mlflow_yml.read_text().replace("server:\n", "server:\n  credentials: mlflow_creds\n", 1))
    assert "MLFLOW_WORKSPACE" in why(project)
    (project.conf_root / "base" / "credentials.yml").write_text("mlflow_creds:\n  MLFLOW_TRACKING_TOKEN: t0k3n-kvx\n")
    reason, found = lean._why_not_lean(project, None, "0" * 32, (), object())
    assert reason == "" and found is not None and dict(found.exported) == {"MLFLOW_TRACKING_TOKEN": "t0k3n-kvx"}
    assert "t0k3n-kvx" not in repr(found)
    (tmp_path / "home" / ".mlflow").mkdir(parents=True)
    (tmp_path / "home" / ".mlflow" / "credentials").write_text("[mlflow]\nmlflow_tracking_username = a\n")
    assert "~/.mlflow/credentials" in why(project)


def test_the_rest_client_reads_mlflows_variables_as_mlflow_does(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvx_runtime.auth import RequestHeaderProviderWithKedroContext
    from kvx_runtime.mlflow import rest_client

    for value, expected in (("1", True), ("TRUE", True), ("true", True), ("0", False), ("no", False)):
        monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", value)
        assert rest_client.mlflow_flag("MLFLOW_TRACKING_INSECURE_TLS") is expected
    monkeypatch.delenv("MLFLOW_TRACKING_INSECURE_TLS")
    assert rest_client.mlflow_flag("MLFLOW_TRACKING_INSECURE_TLS") is False
    assert rest_client.mlflow_flag("MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER", True) is True

    class Provider(RequestHeaderProviderWithKedroContext):
        def in_context(self) -> bool:
            return True

        def request_headers(self) -> dict[str, str]:
            return {"Authorization": "Bearer from-the-provider", "X-Extra": "1"}

    import kvx_runtime.auth as auth

    monkeypatch.setattr(auth, "_ACTIVE", Provider({}))
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    assert rest_client.MlflowRestClient._headers()["Authorization"] == "Bearer from-the-provider"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    headers = rest_client.MlflowRestClient._headers()  # MLflow's order: the credentials win
    assert headers["Authorization"] == "Basic YWxpY2U6cHc=" and headers["X-Extra"] == "1"
