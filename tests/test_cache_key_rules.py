"""Rules of the step cache's key that need no Kedro project on disk: what makes a step
uncacheable, and which code counts by its source."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvx_runtime.cache.key import KeyContext, code_digest, step_keys


def _module(tmp_path: Path, name: str, source: str) -> Any:
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def nodes_module(tmp_path: Path) -> Iterator[Any]:
    yield _module(tmp_path, "kvx_cache_rules_nodes",
                  "def make():\n    return 1\n\n\ndef push(value):\n    print('sent', value)\n")
    sys.modules.pop("kvx_cache_rules_nodes", None)


def test_a_node_without_outputs_runs_for_its_side_effects_and_is_never_served(nodes_module: Any) -> None:
    from kedro.pipeline import Pipeline, node

    pipeline = Pipeline([node(nodes_module.make, None, "value", name="make"),
                         node(nodes_module.push, "value", None, name="push")])
    context = KeyContext(pipeline=pipeline, steps={"make": ["make"], "push": ["push"]}, params={},
                         catalog_entry=lambda name: None, env="base", project_dirs=[])
    keys = step_keys(context)
    assert keys["make"].cacheable
    assert keys["push"].uncacheable == ("node push has no outputs (it runs for what it does, not what it returns)",)


def test_code_outside_installed_distributions_counts_by_its_source_even_outside_the_package(
        tmp_path: Path, nodes_module: Any) -> None:
    """A sibling source folder is not the project's package, but not a library either: an edit
    there must change the key (a library counts by its version instead)."""
    before, why = code_digest(nodes_module.make, project_dirs=[tmp_path / "elsewhere"])
    assert why is None
    path = Path(nodes_module.__file__)
    path.write_text(path.read_text().replace("return 1", "return 2"))
    after, _ = code_digest(nodes_module.make, project_dirs=[tmp_path / "elsewhere"])
    assert after != before
    library, why = code_digest(pytest.approx, project_dirs=[])
    assert why is None and library == code_digest(pytest.approx, project_dirs=[])[0]
