"""The pipeline memo (kvx_runtime.cache.pipeline_memo): a pipeline rebuilt from it is the one
remembered, node for node (names, namespaces, datasets, tags, order, code digests); anything
it is made from that changes, or a memo that cannot be read, makes the pipelines load again."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kedro.pipeline import Pipeline, node, pipeline

from kvx_runtime.cache import pipeline_memo
from kvx_runtime.cache.key import KnownCode, code_digest
from kvx_runtime.cache.pipeline_memo import MEMO_DIR, parameters_untyped, remembered_pipeline

pytestmark = pytest.mark.kedro

KEDRO_TYPES_PARAMETERS = importlib.util.find_spec("kedro.validation") is not None


@pytest.fixture(autouse=True)
def _no_modules_of_deleted_projects(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test worker holds modules other tests imported from projects pytest has deleted since:
    a memo is never written while a loaded module's file cannot be read (which version ran?)."""
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and not os.path.exists(file):
            monkeypatch.delitem(sys.modules, name)


def double(value: int) -> int:
    return value * 2


def join(left: int, right: int, scale: int = 1) -> int:
    return (left + right) * scale


def shout(text: str) -> str:
    return text.upper()


def _made() -> Pipeline:
    """Named and unnamed nodes, a list, a dict and no inputs, several outputs, tags, a
    namespace, a partial and a lambda."""
    inner = Pipeline([
        node(double, "raw", "doubled", name="double", tags=["heavy", "nightly"]),
        node(join, {"left": "doubled", "right": "params:offset"}, "joined"),
    ])
    return Pipeline([
        pipeline(inner, namespace="first", inputs={"raw": "raw"}, parameters={"params:offset"}),
        node(functools.partial(join, scale=3), ["first.joined", "raw"], "scaled", name="scaled"),
        node(lambda: "hello", None, "greeting"),
        node(shout, "greeting", ["loud", ], name="shout", confirms="greeting"),
    ])


def _project(root: Path, remember: bool = True) -> Any:
    (root / "conf" / "base").mkdir(parents=True, exist_ok=True)
    (root / "conf" / "base" / "parameters.yml").write_text("offset: 1\n")
    (root / "pyproject.toml").write_text("[tool.kedro]\n")
    cache = SimpleNamespace(remember_pipelines=remember)
    return SimpleNamespace(path=root, package_name="no_such_package_here", env="base", conf_root=root / "conf",
                           plugin_config=SimpleNamespace(run_config=SimpleNamespace(cache=cache)))


def _shape(made: Pipeline) -> list[tuple[Any, ...]]:
    return [(item.name, item.namespace, item.inputs, item.outputs, sorted(item.tags), item.confirms)
            for item in made.nodes]


def _unloadable() -> Pipeline:
    raise AssertionError("the pipelines were loaded: the memo was not used")


def test_a_remembered_pipeline_rebuilds_node_for_node_with_its_code_digests(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Whether nodes type parameters is asked of Kedro's process-wide registry, which another
    # test of this worker may have pointed at its own project: this Kedro's answer, or none.
    monkeypatch.setattr(pipeline_memo, "_typed_parameters", lambda: False if KEDRO_TYPES_PARAMETERS else None)
    project = _project(tmp_path)
    original = _made()
    assert remembered_pipeline(project, "__default__", lambda: original, checked=True) is original

    rebuilt = remembered_pipeline(project, "__default__", _unloadable, checked=True)
    assert _shape(rebuilt) == _shape(original)
    for before, after in zip(original.nodes, rebuilt.nodes, strict=True):
        assert isinstance(after.func, KnownCode)
        assert code_digest(after.func, []) == code_digest(before.func, [])
    with pytest.raises(RuntimeError, match="rebuilt for planning"):
        rebuilt.nodes[0].func(1)
    # Kedro types parameters by node annotations since 1.x (importing every pipeline): none here.
    assert parameters_untyped(project, "__default__") is KEDRO_TYPES_PARAMETERS
    # Another pipeline name, another Kedro env: a memo of their own.
    assert remembered_pipeline(project, "other", lambda: original, checked=True) is original
    project.env = "cloud"
    assert remembered_pipeline(project, "__default__", lambda: original, checked=True) is original


@pytest.mark.parametrize("change", ["conf file", "new conf file", "top-level file", "environment variable",
                                    "loaded code outside the project"])
def test_a_change_to_what_pipelines_are_made_of_loads_them_again(tmp_path: Path, change: str,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  request: pytest.FixtureRequest) -> None:
    project = _project(tmp_path / "project")
    outside = tmp_path / "shared_steps.py"
    outside.write_text("STEPS = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "shared_steps", raising=False)
    import shared_steps  # noqa: F401  # code a registry could be made of, neither installed nor the project's

    request.addfinalizer(lambda: sys.modules.pop("shared_steps", None))  # its file goes with tmp_path

    monkeypatch.setattr(pipeline_memo, "_environment_variables", functools.cache(
        pipeline_memo._environment_variables.__wrapped__))
    original = _made()
    remembered_pipeline(project, "__default__", lambda: original, checked=True)
    assert remembered_pipeline(project, "__default__", _unloadable, checked=True).nodes

    if change == "conf file":
        (project.path / "conf" / "base" / "parameters.yml").write_text("offset: 2\n")
    elif change == "new conf file":
        (project.path / "conf" / "base" / "steps.yml").write_text("extra: true\n")
    elif change == "top-level file":
        (project.path / "pyproject.toml").write_text("[tool.kedro]\nsource_dir = 'src'\n")
    elif change == "environment variable":
        monkeypatch.setenv("KVX_TEST_PIPELINE_SWITCH", "1")
        pipeline_memo._environment_variables.cache_clear()
    else:
        outside.write_text("STEPS = 2\n")
    smaller = Pipeline(original.nodes[:1])
    assert remembered_pipeline(project, "__default__", lambda: smaller, checked=True) is smaller
    assert _shape(remembered_pipeline(project, "__default__", _unloadable, checked=True)) == _shape(smaller)


def test_the_memo_off_loads_the_pipelines_every_time_and_writes_nothing(tmp_path: Path) -> None:
    project = _project(tmp_path, remember=False)
    original = _made()
    assert remembered_pipeline(project, "__default__", lambda: original, checked=True) is original
    assert remembered_pipeline(project, "__default__", lambda: original, checked=True) is original
    assert not (tmp_path / ".kvx").exists()
    assert not parameters_untyped(project, "__default__")


@pytest.mark.parametrize("damage", ["not json", "another format", "a node Kedro refuses", "edited key"])
def test_a_memo_that_cannot_be_used_is_a_miss_and_is_written_again(tmp_path: Path, damage: str) -> None:
    project = _project(tmp_path)
    original = _made()
    remembered_pipeline(project, "__default__", lambda: original, checked=True)
    [memo] = (tmp_path / ".kvx" / MEMO_DIR).iterdir()
    content = json.loads(memo.read_text())
    if damage == "not json":
        memo.write_text("{not json")
    elif damage == "another format":
        memo.write_text(json.dumps({**content, "format": 0}))
    elif damage == "a node Kedro refuses":
        content["nodes"][0]["outputs"] = content["nodes"][0]["inputs"]  # a node reading what it writes
        memo.write_text(json.dumps(content))
    else:
        memo.write_text(json.dumps({**content, "key": "0" * 64}))
    assert remembered_pipeline(project, "__default__", lambda: original, checked=True) is original
    assert _shape(remembered_pipeline(project, "__default__", _unloadable, checked=True)) == _shape(original)


def test_a_pipeline_that_does_not_rebuild_the_same_is_not_remembered(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    project = _project(tmp_path)
    original = _made()
    monkeypatch.setattr(pipeline_memo, "_rebuilt", lambda records: Pipeline(original.nodes[1:]))
    assert remembered_pipeline(project, "__default__", lambda: original, checked=True) is original
    assert not (tmp_path / ".kvx" / MEMO_DIR).exists()


def test_a_project_that_cannot_hold_the_memo_still_plans(tmp_path: Path) -> None:
    project = _project(tmp_path)
    (tmp_path / ".kvx").write_text("a file where the state folder would be")
    original = _made()
    assert remembered_pipeline(project, "__default__", lambda: original, checked=True) is original
    assert remembered_pipeline(project, "__default__", lambda: original, checked=True) is original


def test_a_change_while_the_pipelines_are_imported_is_not_remembered_as_what_was_imported(tmp_path: Path) -> None:
    project = _project(tmp_path)
    original = _made()

    def edited_meanwhile() -> Pipeline:
        (tmp_path / "conf" / "base" / "parameters.yml").write_text("offset: 5\n")
        return original

    assert remembered_pipeline(project, "__default__", edited_meanwhile, checked=True) is original
    assert not (tmp_path / ".kvx" / MEMO_DIR).exists()


def test_files_under_a_linked_folder_and_code_from_a_zip_are_covered(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     request: pytest.FixtureRequest) -> None:
    import zipfile

    project = _project(tmp_path / "project")
    shared = tmp_path / "shared"
    shared.mkdir()
    (project.path / "conf" / "base" / "linked").symlink_to(shared, target_is_directory=True)
    archive = tmp_path / "steps.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("zipped_steps.py", "EXTRA = False\n")
    monkeypatch.syspath_prepend(str(archive))
    monkeypatch.delitem(sys.modules, "zipped_steps", raising=False)
    import zipped_steps  # noqa: F401

    request.addfinalizer(lambda: sys.modules.pop("zipped_steps", None))
    original = _made()
    remembered_pipeline(project, "__default__", lambda: original, checked=True)
    assert remembered_pipeline(project, "__default__", _unloadable, checked=True).nodes

    (shared / "steps.yml").write_text("extra: true\n")  # a new file in the linked folder
    assert remembered_pipeline(project, "__default__", lambda: original, checked=True) is original
    assert remembered_pipeline(project, "__default__", _unloadable, checked=True).nodes
    with zipfile.ZipFile(archive, "w") as zipped:  # the zip's code changes
        zipped.writestr("zipped_steps.py", "EXTRA = True\n")
    assert remembered_pipeline(project, "__default__", lambda: original, checked=True) is original


def test_a_memo_written_without_the_compiles_checks_never_stands_in_for_them(tmp_path: Path) -> None:
    project = _project(tmp_path)
    original = _made()
    remembered_pipeline(project, "__default__", lambda: original, checked=False)
    assert remembered_pipeline(project, "__default__", lambda: original, checked=True) is original
    # A checked memo serves both.
    assert remembered_pipeline(project, "__default__", _unloadable, checked=True).nodes
    assert remembered_pipeline(project, "__default__", _unloadable, checked=False).nodes


def test_what_kvx_exports_for_a_run_and_a_shell_changes_does_not_miss(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    project = _project(tmp_path)
    fresh = functools.cache(pipeline_memo._environment_variables.__wrapped__)
    monkeypatch.setattr(pipeline_memo, "_environment_variables", fresh)
    remembered_pipeline(project, "__default__", _made, checked=True)
    for name, value in {"KEDRO_CONFIG_RUN_ID": "run-2", "KEDRO_CONFIG_JOB_NAME": "job-2", "MLFLOW_RUN_ID": "abc",
                        "OLDPWD": "/elsewhere", "SSH_CONNECTION": "10.0.0.1 22"}.items():
        monkeypatch.setenv(name, value)
    fresh.cache_clear()
    assert remembered_pipeline(project, "__default__", _unloadable, checked=True).nodes


def test_a_hit_leaves_kedros_registry_as_loading_would(tmp_path: Path) -> None:
    from kedro.framework.project import pipelines

    project = _project(tmp_path)
    remembered_pipeline(project, "__default__", _made, checked=True)
    remembered_pipeline(project, "__default__", _unloadable, checked=True)
    if hasattr(pipelines, "set_requested"):  # Kedro >= 1.x types parameters by the requested pipelines
        assert pipelines._requested_pipelines == ["__default__"]


def test_a_configuration_that_is_not_a_folder_here_is_not_remembered(tmp_path: Path) -> None:
    project = _project(tmp_path)
    project.conf_root = tmp_path / "s3:" / "bucket" / "conf"  # as Path() keeps a remote conf_source
    original = _made()
    assert remembered_pipeline(project, "__default__", lambda: original, checked=True) is original
    assert remembered_pipeline(project, "__default__", lambda: original, checked=True) is original
    assert not (tmp_path / ".kvx").exists()


def test_a_loaded_module_whose_file_is_gone_is_never_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                request: pytest.FixtureRequest) -> None:
    gone = tmp_path / "gone_steps.py"
    gone.write_text("EXTRA = False\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import gone_steps  # noqa: F401

    request.addfinalizer(lambda: sys.modules.pop("gone_steps", None))
    gone.unlink()
    project = _project(tmp_path / "project")
    original = _made()
    assert remembered_pipeline(project, "__default__", lambda: original, checked=True) is original
    assert not (project.path / ".kvx" / MEMO_DIR).exists()
