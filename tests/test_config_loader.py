"""EnvTemplatedConfigLoader: KEDRO_CONFIG_* placeholders next to everything Kedro does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvx_runtime.config_loader import EnvTemplatedConfigLoader, with_env_templating
from kvx_runtime.errors import ConfigError

# A subclass of Kedro's OmegaConfigLoader, with Kedro's resolvers.
pytestmark = pytest.mark.kedro


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    (tmp_path / "base").mkdir()
    (tmp_path / "local").mkdir()
    return tmp_path


def loader(conf: Path, **kwargs) -> EnvTemplatedConfigLoader:
    return EnvTemplatedConfigLoader(str(conf), base_env="base", default_run_env="local", **kwargs)


def test_run_id_and_defaults_are_filled(conf: Path, monkeypatch) -> None:
    monkeypatch.setenv("KEDRO_CONFIG_RUN_ID", "run-42")
    monkeypatch.delenv("KEDRO_CONFIG_COMMIT_ID", raising=False)
    (conf / "base" / "catalog.yml").write_text(
        "model:\n  type: pickle.PickleDataset\n"
        "  filepath: gs://bucket/${run_id}/model_${commit_id|dirty}.pkl\n"
    )
    assert loader(conf)["catalog"]["model"]["filepath"] == "gs://bucket/run-42/model_dirty.pkl"
    monkeypatch.setenv("KEDRO_CONFIG_COMMIT_ID", "c0ffee")
    assert loader(conf)["catalog"]["model"]["filepath"] == "gs://bucket/run-42/model_c0ffee.pkl"


def test_values_with_yaml_syntax_cannot_break_the_file(conf: Path, monkeypatch) -> None:
    monkeypatch.setenv("KEDRO_CONFIG_BRANCH_NAME", "feat: x # y")
    (conf / "base" / "parameters.yml").write_text(
        "branch: ${branch_name|main}\nquoted: '${branch_name}'\ndefault: ${missing_one|a: b, c}\n"
    )
    params = loader(conf)["parameters"]
    assert params == {"branch": "feat: x # y", "quoted": "feat: x # y", "default": "a: b, c"}


def test_omegaconf_interpolations_and_kedro_resolvers_keep_working(conf: Path, monkeypatch) -> None:
    monkeypatch.setenv("KEDRO_CONFIG_RUN_ID", "r1")
    (conf / "base" / "globals.yml").write_text("bucket: gs://from-globals\n")
    (conf / "base" / "parameters.yml").write_text(
        "lr: 0.1\n"
        "lr_copy: ${lr}\n"
        "nested: {a: 1, b: '${nested.a}'}\n"
        "where: ${globals:bucket}/${run_id}\n"
        "epochs: ${runtime_params:epochs, 3}\n"
        "escaped: \\${run_id}\n"
    )
    params = loader(conf, runtime_params={"epochs": 9})["parameters"]
    assert params["lr_copy"] == 0.1
    assert params["nested"]["b"] == 1
    assert params["where"] == "gs://from-globals/r1"
    assert params["epochs"] == 9
    assert params["escaped"] == "${run_id}"


def test_oc_env_still_works_in_credentials(conf: Path, monkeypatch) -> None:
    monkeypatch.setenv("SECRET_FROM_ENV", "s3cr3t")
    monkeypatch.setenv("KEDRO_CONFIG_JOB_NAME", "job-7")
    (conf / "local" / "credentials.yml").write_text(
        "db:\n  password: ${oc.env:SECRET_FROM_ENV}\n  user: ${job_name}\n"
    )
    assert loader(conf)["credentials"]["db"] == {"password": "s3cr3t", "user": "job-7"}


def test_undefined_name_without_default_names_it_and_the_file(conf: Path, monkeypatch) -> None:
    monkeypatch.delenv("KEDRO_CONFIG_COMMIT_ID", raising=False)
    path = conf / "base" / "catalog.yml"
    path.write_text("x:\n  type: pickle.PickleDataset\n  filepath: data/${commit_id}/x.pkl\n")
    with pytest.raises(ConfigError) as caught:
        loader(conf)["catalog"]
    message = str(caught.value)
    assert "${commit_id}" in message
    assert str(path) in message
    assert "KEDRO_CONFIG_COMMIT_ID" in message


def test_run_id_is_always_defined_outside_a_step(conf: Path, monkeypatch) -> None:
    monkeypatch.delenv("KEDRO_CONFIG_RUN_ID", raising=False)
    (conf / "base" / "parameters.yml").write_text("out: runs/${run_id}\n")
    first = loader(conf)["parameters"]["out"]
    assert first.startswith("runs/local-")
    assert loader(conf)["parameters"]["out"] == first  # stable within the process


def test_templating_composes_with_a_projects_own_loader() -> None:
    from kedro.config import OmegaConfigLoader

    class ProjectLoader(OmegaConfigLoader):
        pass

    composed = with_env_templating(ProjectLoader)
    assert composed is not None and issubclass(composed, ProjectLoader)
    assert with_env_templating(OmegaConfigLoader) is EnvTemplatedConfigLoader
    assert with_env_templating(EnvTemplatedConfigLoader) is EnvTemplatedConfigLoader
    assert with_env_templating(dict) is None


STORAGE_CATALOG = "model:\n  type: pickle.PickleDataset\n  filepath: ${storage_root}/data/06_models/model.pkl\n"


def test_storage_root_is_what_a_step_or_command_exports(conf: Path, monkeypatch) -> None:
    from kvx_runtime.config_loader import exported_storage_root

    (conf / "base" / "catalog.yml").write_text(STORAGE_CATALOG)
    (conf / "base" / "vertexai.yml").write_text("run_config:\n  root: configured-bucket/x\n")
    monkeypatch.setenv("KEDRO_CONFIG_STORAGE_ROOT", "gs://step-bucket/run")  # what exec-node exports
    assert loader(conf)["catalog"]["model"]["filepath"] == "gs://step-bucket/run/data/06_models/model.pkl"
    with exported_storage_root("/tmp/compile-root"):  # compile's storage root while it loads the catalog
        assert loader(conf)["catalog"]["model"]["filepath"] == "/tmp/compile-root/data/06_models/model.pkl"
    assert os.environ["KEDRO_CONFIG_STORAGE_ROOT"] == "gs://step-bucket/run"  # restored


def test_storage_root_outside_a_step_is_the_envs_run_config_root(conf: Path, monkeypatch) -> None:
    monkeypatch.delenv("KEDRO_CONFIG_STORAGE_ROOT", raising=False)
    (conf / "cloud").mkdir()
    (conf / "base" / "catalog.yml").write_text(STORAGE_CATALOG)
    (conf / "base" / "vertexai.yml").write_text("run_config:\n  root: base-bucket/pipelines\n")
    (conf / "cloud" / "vertexai.yml").write_text("run_config:\n  root: s3://cloud-bucket/runs/\n")
    # A bare bucket/prefix is a Cloud Storage root, as every command reads run_config.root.
    assert loader(conf)["catalog"]["model"]["filepath"] == "gs://base-bucket/pipelines/data/06_models/model.pkl"
    cloud = EnvTemplatedConfigLoader(str(conf), base_env="base", default_run_env="local", env="cloud")
    assert cloud["catalog"]["model"]["filepath"] == "s3://cloud-bucket/runs/data/06_models/model.pkl"
    monkeypatch.setenv("KEDRO_CONFIG_STORAGE_ROOT", "/mnt/shared")  # the variable wins
    assert loader(conf)["catalog"]["model"]["filepath"] == "/mnt/shared/data/06_models/model.pkl"


def test_storage_root_never_falls_back_to_a_local_directory(conf: Path, monkeypatch) -> None:
    monkeypatch.delenv("KEDRO_CONFIG_STORAGE_ROOT", raising=False)
    path = conf / "base" / "catalog.yml"
    path.write_text(STORAGE_CATALOG)
    (conf / "base" / "vertexai.yml").write_text("run_config:\n  image: img\n")  # no root
    with pytest.raises(ConfigError) as caught:
        loader(conf)["catalog"]
    message = str(caught.value)
    assert message.startswith(f"config placeholder ${{storage_root}} in {path} is not defined")
    assert "KEDRO_CONFIG_STORAGE_ROOT" in message and "run_config.root" in message
    assert "\n" not in message
