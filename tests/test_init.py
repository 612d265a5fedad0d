"""`kvx-runtime init`: a commented vertexai.yml (and a Dockerfile), never a half-done init."""

from __future__ import annotations

from pathlib import Path

import pytest
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


def kfp_init(path: Path, *args: str):
    return CliRunner().invoke(cli, ["kfp", "init", *args, "--project-path", str(path)])


def test_kfp_init_writes_a_kubeflow_yml_that_loads_with_kfps_minio(tmp_path: Path, caplog) -> None:
    from conftest import logged_text
    from kvx_runtime.config import load_plugin_config

    result = kfp_init(project(tmp_path), "https://kubeflow.example.com/pipeline/", "--namespace", "team-a")
    assert result.exit_code == 0, result.output
    written = tmp_path / "conf" / "base" / "kubeflow.yml"
    assert "conf/base/kubeflow.yml written" in result.output
    config = load_plugin_config(tmp_path / "conf", "base")
    assert "unknown" not in logged_text(caplog).lower()  # every key of the template is known
    assert config.host == "https://kubeflow.example.com/pipeline"
    run_config = config.run_config
    assert run_config.namespace == "team-a" and run_config.experiment_name == "my-proj"
    assert run_config.root == "s3://mlpipeline/kvx/my-proj"
    assert run_config.s3.endpoint_url == "http://minio-service.kubeflow:9000"
    [secret] = run_config.kubernetes.secrets_as_env
    assert secret.secret_name == "mlpipeline-minio-artifact"
    assert secret.keys == {"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}
    assert run_config.image == "my-proj:latest"  # no KEDRO_CONFIG_COMMIT_ID here
    # Without --namespace the key is left commented out.
    again = kfp_init(tmp_path, "http://localhost:8080", "--force")
    assert again.exit_code == 0 and "# namespace: team-a" in written.read_text()
    assert load_plugin_config(tmp_path / "conf", "base").run_config.namespace is None


def test_kfp_init_refuses_a_bad_host_an_existing_file_and_a_vertexai_yml_that_would_hide_it(tmp_path: Path) -> None:
    project(tmp_path)
    bad = kfp_init(tmp_path, "ftp://kubeflow.example.com")
    assert bad.exit_code == 2 and "is not an http(s) URL" in bad.output
    assert not (tmp_path / "conf").exists()
    assert kfp_init(tmp_path, "http://localhost:8080").exit_code == 0
    twice = kfp_init(tmp_path, "http://localhost:8080")
    assert twice.exit_code == 2 and "already exists; nothing was written" in twice.output
    (tmp_path / "conf" / "base" / "kubeflow.yml").unlink()
    (tmp_path / "conf" / "base" / "vertexai.yml").write_text("project_id: p\nregion: r\n")
    hidden = kfp_init(tmp_path, "http://localhost:8080")
    assert hidden.exit_code == 2 and "conf/base/vertexai.yml exists" in hidden.output
    assert "host: http://localhost:8080" in hidden.output
    assert not (tmp_path / "conf" / "base" / "kubeflow.yml").exists()


def test_kfp_init_quotes_the_namespace_and_refuses_a_bad_one(tmp_path: Path) -> None:
    from kvx_runtime.config import load_plugin_config

    project(tmp_path)
    bad = kfp_init(tmp_path, "http://localhost:8080", "--namespace", "Team_A")
    assert bad.exit_code == 2 and "is not a Kubernetes namespace name" in bad.output
    assert not (tmp_path / "conf").exists()
    for namespace in ("on", "123"):  # YAML would read these as a bool and an int unquoted
        assert kfp_init(tmp_path, "http://localhost:8080", "--namespace", namespace, "--force").exit_code == 0
        assert load_plugin_config(tmp_path / "conf", "base").run_config.namespace == namespace


def _conf_source(root: Path, line: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    package = project(root) / "src" / "my_proj"
    package.mkdir(parents=True)
    (package / "settings.py").write_text(f'"""Settings."""\n\n# CONF_SOURCE = "conf"\n{line}\n')
    return root


def test_init_writes_into_the_projects_conf_source_and_the_image_copies_it(tmp_path: Path) -> None:
    root = _conf_source(tmp_path, 'CONF_SOURCE = "settings/config"')
    result = init(root, "--with-dockerfile")
    assert result.exit_code == 0, result.output
    assert (root / "settings" / "config" / "base" / "vertexai.yml").is_file() and not (root / "conf").exists()
    dockerfile, dockerignore = (root / "Dockerfile").read_text(), (root / ".dockerignore").read_text()
    assert "COPY --chown=1000:1000 settings/config/ settings/config/\n" in dockerfile
    assert "!settings/config/\n" in dockerignore and "settings/config/local/\n" in dockerignore
    assert " conf/" not in dockerfile and "\nconf/" not in dockerignore and "!conf/" not in dockerignore


def test_a_conf_source_init_cannot_follow_is_refused_with_nothing_written(tmp_path: Path) -> None:
    for index, (line, said) in enumerate([
        ("CONF_SOURCE = str(Path(__file__).parent / 'conf')",  # run to tell, and it raises
         "settings.py cannot be imported to tell CONF_SOURCE: NameError: name 'Path' is not defined"),
        ('CONF_SOURCE = "/etc/project-conf"', "CONF_SOURCE '/etc/project-conf' is not a folder of the project"),
        ('CONF_SOURCE = "../shared-conf"', "is not a folder of the project"),
        ('CONF_SOURCE = "dist/conf-my_proj.tar.gz"', "CONF_SOURCE 'dist/conf-my_proj.tar.gz' is an archive"),
    ]):
        root = _conf_source(tmp_path / str(index), line)
        result = init(root, "--with-dockerfile")
        assert result.exit_code == 2, result.output
        assert said in result.output and "Traceback" not in result.output
        assert sorted(path.name for path in root.iterdir()) == ["pyproject.toml", "src"]


def test_a_computed_conf_source_is_what_the_projects_settings_give(tmp_path: Path) -> None:
    from conftest import copy_example_project
    from kvx_runtime.errors import ConfigError
    from kvx_runtime.project import conf_folder_of

    root = copy_example_project(tmp_path / "project")
    settings = root / "src" / "spaceflights_kvx" / "settings.py"
    settings.write_text(settings.read_text() + '\nfrom pathlib import Path as _Path\n'
                        'CONF_SOURCE = str(_Path(__file__).resolve().parents[2] / "conf")\n')
    assert conf_folder_of(root) == "conf"  # an absolute path inside the project: its folder
    with pytest.raises(ConfigError, match="CONF_SOURCE is not a plain string, and the project is not imported"):
        conf_folder_of(root, import_settings=False)


def test_a_computed_conf_source_whose_settings_cannot_be_imported_is_refused_not_guessed(tmp_path: Path) -> None:
    from conftest import copy_example_project
    from kvx_runtime.errors import ConfigError
    from kvx_runtime.project import conf_folder_of

    root = copy_example_project(tmp_path / "project")
    settings = root / "src" / "spaceflights_kvx" / "settings.py"
    settings.write_text(settings.read_text() + '\nimport not_an_installed_dependency  # noqa\n'
                        'if True:\n    CONF_SOURCE = "config"\n')
    with pytest.raises(ConfigError, match="settings.py cannot be imported to tell CONF_SOURCE: ModuleNotFoundError"):
        conf_folder_of(root)
