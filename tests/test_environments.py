"""Which config environment steps use, and whether the project image contains it."""

from __future__ import annotations

import functools
import itertools
import random
import re
from pathlib import Path

import pytest

from conftest import conf_archive
from kvx_runtime.compiler.checks import warn_envs_not_in_image
from kvx_runtime.dockerignore import DockerIgnore
from kvx_runtime.errors import ConfigError, ExitCode
from kvx_runtime.project import check_env_exists, default_env

TEMPLATE = (Path(__file__).resolve().parents[1] / "kvx_runtime" / "templates" / "project.dockerignore").read_text()


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        ("conf/base/catalog.yml", False),
        ("conf/local/catalog.yml", True),
        ("conf/local", True),
        ("conf/base/credentials.yml", True),
        ("conf/cloud/nested/credentials_gcp.yml", True),
        ("src/pkg/nodes.py", False),
        ("src/pkg/__pycache__/nodes.cpython-311.pyc", True),
        ("data/01_raw/companies.csv", False),
        ("data/02_intermediate/x.parquet", True),
        ("notebooks/explore.ipynb", True),
        ("pyproject.toml", False),
    ],
)
def test_the_project_template_dockerignore(path: str, excluded: bool) -> None:
    assert DockerIgnore(TEMPLATE).excludes(path) is excluded


def test_docker_rules_differ_from_gitignore() -> None:
    ignore = DockerIgnore("*.pyc\n/build/\n**/secret?.txt\nlogs/**\n!logs/keep.log\n# comment\n")
    assert ignore.excludes("x.pyc") and not ignore.excludes("src/x.pyc")  # anchored at the root
    assert ignore.excludes("build/out/a.bin")  # a matching parent directory covers its files
    assert ignore.excludes("a/b/secret1.txt") and ignore.excludes("secret2.txt")
    assert not ignore.excludes("secret10.txt")
    assert ignore.excludes("logs/run.log") and not ignore.excludes("logs/keep.log")  # last match wins


def test_default_env_avoids_the_laptop_env() -> None:
    assert default_env({}) == "base"
    assert default_env({"default_run_env": "local"}) == "base"
    assert default_env({"default_run_env": "local", "base_env": "common"}) == "common"
    assert default_env({"default_run_env": "prod"}) == "prod"


def test_a_missing_env_directory_names_the_env_the_path_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / "conf" / "base").mkdir(parents=True)
    check_env_exists(str(tmp_path / "conf"), "base", "base")
    with pytest.raises(ConfigError) as caught:
        check_env_exists(str(tmp_path / "conf"), "local", "base")
    text = str(caught.value)
    assert "config environment 'local' does not exist" in text
    assert str(tmp_path / "conf" / "local") in text and "--env base" in text


def test_compile_warns_when_the_image_lacks_the_env(tmp_path: Path, caplog) -> None:
    for env in ("base", "local", "cloud"):
        (tmp_path / "conf" / env).mkdir(parents=True)
        (tmp_path / "conf" / env / "catalog.yml").write_text("{}\n")
    (tmp_path / "conf" / "cloud" / "credentials.yml").write_text("{}\n")
    assert warn_envs_not_in_image(tmp_path, tmp_path / "conf", ["base", "local"]) == []  # no .dockerignore
    (tmp_path / ".dockerignore").write_text(TEMPLATE)
    assert warn_envs_not_in_image(tmp_path, tmp_path / "conf", ["base", "local"]) == ["local"]
    # Credentials left out of an env that the image otherwise has: intended, no warning.
    assert warn_envs_not_in_image(tmp_path, tmp_path / "conf", ["base", "cloud"]) == []


def test_image_files_look_into_excluded_folders_only_for_what_is_brought_back(tmp_path: Path) -> None:
    from kvx_runtime.dockerignore import image_files

    for name in ("pyproject.toml", "src/pkg/nodes.py", "src/pkg/__pycache__/nodes.pyc", "conf/base/catalog.yml",
                 "conf/local/credentials.yml", "data/01_raw/a.csv", "data/02_intermediate/b.parquet",
                 "notebooks/x.ipynb", ".kvx/runs/j/copies/t/pyproject.toml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    # No .dockerignore: the project template's.
    assert list(image_files(tmp_path, skip=(".kvx",))) == [
        "pyproject.toml", "conf/base/catalog.yml", "data/01_raw/a.csv", "src/pkg/nodes.py"]
    (tmp_path / ".dockerignore").write_text("data/\n!data/02_intermediate/\nnotebooks\n")
    assert list(image_files(tmp_path, skip=(".kvx",))) == [
        ".dockerignore", "pyproject.toml", "conf/base/catalog.yml", "conf/local/credentials.yml",
        "data/02_intermediate/b.parquet", "src/pkg/nodes.py", "src/pkg/__pycache__/nodes.pyc"]
    ignore = DockerIgnore("*\n!src/\n!**/keep.txt\n")
    assert ignore.may_include_below("src") and ignore.may_include_below("anything/deep")
    assert not DockerIgnore("*\n!src/\n").may_include_below("data")


def test_image_files_follow_the_projects_conf_source_without_a_dockerignore(tmp_path: Path) -> None:
    from kvx_runtime.dockerignore import image_files

    (tmp_path / "pyproject.toml").write_text('[tool.kedro]\npackage_name = "pkg"\n')
    for name in ("src/pkg/settings.py", "settings/base/catalog.yml", "settings/local/credentials.yml",
                 "conf/base/stale.yml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "src/pkg/settings.py").write_text('CONF_SOURCE = "settings"\n')
    assert list(image_files(tmp_path)) == ["pyproject.toml", "settings/base/catalog.yml", "src/pkg/settings.py"]


def test_an_environment_missing_from_a_configuration_archive_is_named_with_what_it_holds(tmp_path: Path) -> None:
    archive = conf_archive(tmp_path, {"base/parameters.yml": "a: 1\n", "cloud/parameters.yml": "a: 2\n"})
    check_env_exists(archive, "cloud", "base")
    with pytest.raises(ConfigError, match=r"environment 'prod' is not in the configuration archive .* "
                                          r"\(it holds: base, cloud\)") as caught:
        check_env_exists(archive, "prod", "base")
    assert caught.value.exit_code == ExitCode.USAGE


@pytest.mark.parametrize("name", ["conf-proj.tar.gz", "conf-proj.zip"])
def test_mlflow_config_in_a_configuration_archive_is_seen(tmp_path: Path, name: str) -> None:
    # Compile and the steps decide whether MLflow is on from these: an archive holding
    # mlflow.yml was read as holding none (tracking silently off).
    from types import SimpleNamespace

    from kvx_runtime.mlflow.pipeline_run import unread_mlflow_files
    from kvx_runtime.project import has_config

    archive = conf_archive(tmp_path, {"base/parameters.yml": "a: 1\n", "cloud/mlflow.yml": "server: {}\n",
                                      "local/mlflow.yml": "server: {}\n"}, name)
    cloud = SimpleNamespace(conf_source=archive, base_env="base", env="cloud")
    assert has_config(cloud, "mlflow*")  # type: ignore[arg-type]
    assert [path.as_posix() for path in unread_mlflow_files(cloud)] == ["conf/local/mlflow.yml"]  # type: ignore[arg-type]
    assert not has_config(SimpleNamespace(conf_source=archive, base_env="base", env="base"), "mlflow*")  # type: ignore[arg-type]


def _glob_reference(tokens: list[str], path: str) -> bool:
    """Docker's rules by dynamic programming over the pattern's tokens: ``*`` any run of
    characters but "/", ``**`` any run, ``**/`` nothing or any run ending in "/", ``?`` one
    character but "/", ``[ab]`` and ``[!a]`` one character in or not in the set (the regexes
    must agree with it)."""
    @functools.cache
    def match(t: int, s: int) -> bool:
        if t == len(tokens):
            return s == len(path)
        token = tokens[t]
        if token == "*":
            return match(t + 1, s) or (s < len(path) and path[s] != "/" and match(t, s + 1))
        if token == "**":
            return any(match(t + 1, end) for end in range(s, len(path) + 1))
        if token == "**/":
            return match(t + 1, s) or any(path[end - 1] == "/" and match(t + 1, end)
                                          for end in range(s + 1, len(path) + 1))
        if s == len(path):
            return False
        char = path[s]
        fits = {"?": char != "/", "[!a]": char != "a", "[ab]": char in "ab"}.get(token, char == token)
        return fits and match(t + 1, s + 1)

    return match(0, 0)


def test_star_patterns_match_as_docker_reads_them() -> None:
    from kvx_runtime.dockerignore import _translate

    chooser = random.Random(20261204)
    for _ in range(5000):
        pattern = "".join(chooser.choice(["a", "b", "/", "*", "**", "**/", "?", "[!a]", "[ab]"])
                          for _ in range(chooser.randint(1, 7)))
        tokens = re.findall(r"\*\*/|\*\*|\*|\[!a\]|\[ab\]|.", pattern)  # as the pattern reads
        if any(left.startswith("*") and right.startswith("*") for left, right in itertools.pairwise(tokens)):
            continue  # "***" and the like: no rule of Docker's to compare with
        path = "".join(chooser.choice("aab/") for _ in range(chooser.randint(0, 9)))
        assert bool(re.match(_translate(pattern), path)) is _glob_reference(tokens, path), (pattern, path)


def test_many_stars_against_a_long_name_do_not_backtrack_without_end() -> None:
    # Matched by backtracking, this took time to the power of the stars (minutes at 255 characters).
    for pattern in ("*a*a*a*a*a*a*a*b", "**a**a**a**a**a**b"):
        ignore = DockerIgnore(pattern + "\n")
        assert not ignore.excludes("a" * 255)
        assert ignore.excludes("a" * 254 + "b")
    # A negated class takes "/" too (as Docker's regexes do): no first-place shortcut past it.
    assert DockerIgnore("*[!x]*b\n").excludes("a/b")
