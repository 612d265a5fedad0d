"""exec-node's --param checked against the project's Kedro parameters, end to end: a value that
does not fit its parameter (a mapping replaced by a scalar, a scalar of the wrong kind, a dotted
key through a scalar) is the caller's error, exit 2 naming the key, before anything runs;
never the node's TypeError (exit 1) later."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import copy_example_project
from integration.conftest import run_step

pytestmark = pytest.mark.slow

FIRST = "data_processing.preprocess_companies_node"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One copy of the example project for the module (the failing steps write nothing)."""
    return copy_example_project(tmp_path_factory.mktemp("param-shapes") / "example_project")


@pytest.mark.parametrize(("param", "message"), [
    pytest.param("data_science.model_options=yes",
                 "--param data_science.model_options: expected a mapping (keys: test_size, random_state, features, "
                 "scaler), got a str (yes)", marks=pytest.mark.kedro),
    ("data_science=5", "--param data_science: expected a mapping (keys: model_options), got an int (5)"),
    ("reporting.top_n=many", "--param reporting.top_n: expected an int (a whole number), got 'many'"),
    ("reporting.top_n.first=1", "--param reporting.top_n.first: reporting.top_n is an int (3) in the Kedro "
                                "parameters, not a mapping"),
])
def test_a_param_that_does_not_fit_exits_2_naming_the_key(project: Path, tmp_path: Path, param: str,
                                                          message: str) -> None:
    result = run_step(project, "--node", FIRST, "--storage-root", str(tmp_path), "--param", param)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.last_message
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # refused before the step wrote anything


def test_proper_overrides_still_run(project: Path, tmp_path: Path) -> None:
    result = run_step(project, "--node", FIRST, "--storage-root", str(tmp_path),
                      "--param", "data_science.model_options.test_size=0.3", "--param", "reporting.top_n=5",
                      "--param", "reporting.title:str=Prices")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step finished" in result.messages()
