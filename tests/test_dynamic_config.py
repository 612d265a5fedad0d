"""Dynamic config providers: deep merge, file mode 0600, atomic replacement, clear errors."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import logged_text
from kvx_runtime.config import parse_plugin_config
from kvx_runtime.dynamic_config import DynamicConfigProvider, deep_merge, materialize_dynamic_config
from kvx_runtime.errors import ConfigError, ExitCode


class TokenProvider(DynamicConfigProvider):
    """Writes a token under gcp_credentials, like the MLflow providers do."""

    @property
    def target_config_file(self) -> str:
        return "credentials.yml"

    def generate_config(self) -> dict[str, Any]:
        return {
            "gcp_credentials": {"MLFLOW_TRACKING_TOKEN": self.params["token"]},
            "project": self.config.project_id,
        }


class BaseEnvProvider(TokenProvider):
    @property
    def target_env(self) -> str:
        return "base"


class FailingProvider(TokenProvider):
    def generate_config(self) -> dict[str, Any]:
        raise RuntimeError("vault sealed")


class EscapingProvider(TokenProvider):
    @property
    def target_config_file(self) -> str:
        return "../../escape.yml"


def config_with(*providers: tuple[str, dict]) -> Any:
    return parse_plugin_config(
        {
            "project_id": "proj",
            "run_config": {
                "dynamic_config_providers": [{"cls": c, "params": p} for c, p in providers]
            },
        }
    )


def test_deep_merge_keeps_siblings_and_replaces_leaves() -> None:
    base = {"a": {"x": 1, "y": {"k": 1}}, "b": [1, 2], "c": 3}
    merged = deep_merge(base, {"a": {"y": {"k": 2, "n": 3}}, "b": [9]})
    assert merged == {"a": {"x": 1, "y": {"k": 2, "n": 3}}, "b": [9], "c": 3}
    assert base["a"]["y"] == {"k": 1}  # inputs untouched


def test_provider_output_is_merged_into_existing_file_with_mode_0600(tmp_path: Path) -> None:
    target = tmp_path / "local" / "credentials.yml"
    target.parent.mkdir(parents=True)
    target.write_text(
        yaml.safe_dump({"db": {"user": "u"}, "gcp_credentials": {"OTHER": "keep", "MLFLOW_TRACKING_TOKEN": "old"}})
    )
    target.chmod(0o644)
    config = config_with((f"{__name__}.TokenProvider", {"token": "t-123"}))
    written = materialize_dynamic_config(config, tmp_path, "local")
    assert written == [target]
    content = yaml.safe_load(target.read_text())
    assert content == {
        "db": {"user": "u"},
        "gcp_credentials": {"OTHER": "keep", "MLFLOW_TRACKING_TOKEN": "t-123"},
        "project": "proj",
    }
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["credentials.yml"]  # no temp files


def test_target_env_defaults_to_the_run_env_and_can_be_overridden(tmp_path: Path) -> None:
    config = config_with(
        (f"{__name__}.TokenProvider", {"token": "a"}), (f"{__name__}.BaseEnvProvider", {"token": "b"})
    )
    materialize_dynamic_config(config, tmp_path, "prod")
    assert yaml.safe_load((tmp_path / "prod" / "credentials.yml").read_text())["project"] == "proj"
    assert (tmp_path / "base" / "credentials.yml").exists()


def test_failing_provider_keeps_the_existing_file_and_hides_nothing_secret(tmp_path: Path, caplog) -> None:
    target = tmp_path / "local" / "credentials.yml"
    target.parent.mkdir(parents=True)
    target.write_text("db: {password: hunter2}\n")
    config = config_with((f"{__name__}.FailingProvider", {"token": "t"}))
    with pytest.raises(ConfigError, match="FailingProvider failed: RuntimeError: vault sealed"):
        materialize_dynamic_config(config, tmp_path, "local")
    assert target.read_text() == "db: {password: hunter2}\n"


def test_secret_values_are_not_logged(tmp_path: Path, caplog) -> None:
    config = config_with((f"{__name__}.TokenProvider", {"token": "very-secret-token"}))
    with caplog.at_level("INFO"):
        materialize_dynamic_config(config, tmp_path, "local")
    assert "gcp_credentials" in logged_text(caplog)
    assert "very-secret-token" not in logged_text(caplog)


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        ("no_such_module_kvx.Provider", "cannot import module 'no_such_module_kvx'"),
        (f"{__name__}.NotThere", "has no 'NotThere'"),
        ("builtins.dict", "not a subclass of kvx_runtime.dynamic_config.DynamicConfigProvider"),
    ],
)
def test_bad_provider_class_is_a_config_error(tmp_path: Path, cls: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        materialize_dynamic_config(config_with((cls, {})), tmp_path, "local")


def test_unexpected_params_are_a_config_error(tmp_path: Path) -> None:
    class Strict(TokenProvider):
        def __init__(self, config, token: str):
            super().__init__(config, token=token)

    globals()["Strict"] = Strict
    try:
        with pytest.raises(ConfigError, match=r"dynamic_config_providers\.0\.params"):
            materialize_dynamic_config(config_with((f"{__name__}.Strict", {"tokn": "x"})), tmp_path, "local")
    finally:
        del globals()["Strict"]


def test_provider_cannot_write_outside_conf(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    with pytest.raises(ConfigError, match="outside"):
        materialize_dynamic_config(config_with((f"{__name__}.EscapingProvider", {"token": "x"})), conf, "local")
    assert not (tmp_path / "escape.yml").exists()


def test_existing_file_that_is_not_a_mapping_is_reported(tmp_path: Path) -> None:
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "credentials.yml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        materialize_dynamic_config(config_with((f"{__name__}.TokenProvider", {"token": "x"})), tmp_path, "local")


def test_a_configuration_archive_is_refused_before_any_provider_runs(tmp_path: Path) -> None:
    archive = tmp_path / "conf-proj.tar.gz"
    archive.write_bytes(b"packed")
    config = config_with((f"{__name__}.FailingProvider", {"token": "t"}))  # never runs
    with pytest.raises(ConfigError, match="is not a folder") as refused:
        materialize_dynamic_config(config, archive, "local")
    assert refused.value.exit_code == ExitCode.USAGE and archive.read_bytes() == b"packed"


class PathProvider(TokenProvider):
    def generate_config(self) -> dict[str, Any]:
        return {"key_file": Path("/secrets/sa-kvx-7.json"), "token": self.params["token"]}


def test_a_value_yaml_cannot_write_or_a_target_that_cannot_be_written_is_exit_2_quoting_no_value(
        tmp_path: Path) -> None:
    config = config_with((f"{__name__}.PathProvider", {"token": "t0k3n-kvx"}))
    with pytest.raises(ConfigError, match="cannot be written as YAML") as raised:
        materialize_dynamic_config(config, tmp_path, "local")
    assert raised.value.exit_code == ExitCode.USAGE and "sa-kvx-7" not in str(raised.value)
    assert list((tmp_path / "local").iterdir()) == []  # no temporary file left
    (tmp_path / "base" / "credentials.yml").mkdir(parents=True)  # a folder where the file goes
    with pytest.raises(ConfigError, match="cannot write") as raised:
        materialize_dynamic_config(config_with((f"{__name__}.BaseEnvProvider", {"token": "t0k3n-kvx"})),
                                   tmp_path, "local")
    assert raised.value.exit_code == ExitCode.USAGE and "t0k3n-kvx" not in str(raised.value)
