"""YAML errors point at the place: ``path:LINE:COLUMN: problem`` (counted from 1), and a key
written twice is refused naming it and both lines, in ``vertexai.yml`` and in the file a
dynamic config provider merges into. Exit 2 (ConfigError), as any configuration error."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from kvx_runtime.config import load_plugin_config, parse_plugin_config
from kvx_runtime.dynamic_config import DynamicConfigProvider, materialize_dynamic_config
from kvx_runtime.errors import ConfigError, ExitCode

#: (broken text, line, column, what the message says): PyYAML's problem, at its place.
BROKEN = {
    "flow sequence": ("project_id: p\nrun_config: {root: a, labels: [x, y}\n", 2, 36,
                      "expected ',' or ']', but got '}' (while parsing a flow sequence started at line 2)"),
    "indent": ("run_config:\n  root: a/b\n experiment_name: e\n", 3, 2,
               "expected <block end>, but found '<block mapping start>'"),
    "tab": ("run_config:\n\troot: a/b\n", 2, 1, "found character '\\t' that cannot start any token"),
    "duplicate top-level key": ("project_id: p\nrun_config: {root: a}\nproject_id: q\n", 3, 1,
                                "duplicate key 'project_id' (first at line 1, again at line 3)"),
    "duplicate nested key": ("run_config:\n  root: a\n  image: i\n  root: b\n", 4, 3,
                             "duplicate key 'root' (first at line 2, again at line 4)"),
}


def expected_message(path: Path, line: int, column: int, problem: str) -> str:
    return f"{path}:{line}:{column}: not valid YAML: {problem}"


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_vertexai_yml_errors_name_file_line_and_column(tmp_path: Path, case: str) -> None:
    text, line, column, problem = BROKEN[case]
    path = tmp_path / "base" / "vertexai.yml"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_plugin_config(tmp_path, "local")
    assert str(caught.value).startswith(expected_message(path, line, column, problem)), str(caught.value)
    assert caught.value.exit_code == ExitCode.USAGE


def test_a_merge_key_may_still_override_what_it_merges(tmp_path: Path) -> None:
    """``<<`` is YAML's way to reuse a mapping and change some keys: no duplicate there."""
    path = tmp_path / "base" / "vertexai.yml"
    path.parent.mkdir()
    path.write_text("defaults: &d {root: a/b, experiment_name: e}\nrun_config:\n  <<: *d\n  root: c/d\n")
    config = load_plugin_config(tmp_path, "local")
    assert (config.run_config.root, config.run_config.experiment_name) == ("c/d", "e")


class TokenProvider(DynamicConfigProvider):
    @property
    def target_config_file(self) -> str:
        return "credentials.yml"

    def generate_config(self) -> dict[str, Any]:
        return {"gcp_credentials": {"TOKEN": "t"}}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_dynamic_config_file_errors_name_file_line_and_column(tmp_path: Path, case: str) -> None:
    text, line, column, problem = BROKEN[case]
    target = tmp_path / "local" / "credentials.yml"
    target.parent.mkdir()
    target.write_text(text)
    config = parse_plugin_config(
        {"project_id": "p", "run_config": {"dynamic_config_providers": [{"cls": f"{__name__}.TokenProvider"}]}})
    with pytest.raises(ConfigError) as caught:
        materialize_dynamic_config(config, tmp_path, "local")
    assert str(caught.value).startswith(expected_message(target, line, column, problem)), str(caught.value)
    assert caught.value.exit_code == ExitCode.USAGE
    assert target.read_text() == text  # refused, not rewritten


def test_the_message_is_one_line_without_pyyaml_s_snippet(tmp_path: Path) -> None:
    path = tmp_path / "base" / "vertexai.yml"
    path.parent.mkdir()
    path.write_text(BROKEN["flow sequence"][0])
    with pytest.raises(ConfigError) as caught:
        load_plugin_config(tmp_path, "local")
    assert "\n" not in str(caught.value) and not re.search(r"\^|<unicode string>", str(caught.value))
