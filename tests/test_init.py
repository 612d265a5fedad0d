"""`kvx-runtime init`: a commented vertexai.yml (and a Dockerfile), never a half-done init."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from kvx_runtime.cli import cli


def project(tmp_path: Path) -> Path:
    (tmp_path / "pyproject.toml").write_text('[tool.kedro]\npackage_name = "my_proj"\n')
    return tmp_path


def init(path: Path, *args: str):
    return CliRunner().invoke(cli, ["init", "my-gcp", "europe-west4", "--project-path", str(path), *args])


def test_init_writes_config_dockerfile_and_dockerignore(tmp_path: Path) -> None:
    result = init(project(tmp_path), "--with-dockerfile")
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((tmp_path / "conf" / "base" / "vertexai.yml").read_text())
    assert config["project_id"] == "my-gcp" and config["run_config"]["root"] == "my-gcp-pipelines/my-proj"
    assert "conf/local/" in (tmp_path / ".dockerignore").read_text()
    assert (tmp_path / "Dockerfile").read_text().startswith("# Image of a Kedro project")


def test_a_refused_init_writes_nothing(tmp_path: Path) -> None:
    project(tmp_path)
    (tmp_path / "Dockerfile").write_text("FROM mine\n")
    result = init(tmp_path, "--with-dockerfile")
    assert result.exit_code == 2
    assert "Dockerfile already exists; nothing was written" in result.output
    assert not (tmp_path / "conf").exists() and not (tmp_path / ".dockerignore").exists()
    assert (tmp_path / "Dockerfile").read_text() == "FROM mine\n"
    forced = init(tmp_path, "--with-dockerfile", "--force")
    assert forced.exit_code == 0 and (tmp_path / "Dockerfile").read_text() != "FROM mine\n"
