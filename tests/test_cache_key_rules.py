"""Rules of the step cache's key that need no Kedro project on disk: what makes a step
uncacheable, and which code counts by its source."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvx_runtime.cache.key import KeyContext, StepKey, code_digest, step_keys


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


# --- What a node's code is: each case changes what the node returns without touching the body
# of the function the node names (a stale hit if the key missed it).

def _package(tmp_path: Path, name: str, files: dict[str, str]) -> Path:
    """A package ``name`` under ``tmp_path`` (on sys.path), its modules imported fresh."""
    root = tmp_path / name
    root.mkdir()
    for relative, source in files.items():
        (root / relative).write_text(source)
    sys.path.insert(0, str(tmp_path))
    return root


@pytest.fixture
def fresh_modules() -> Iterator[None]:
    """The test's own packages (``kvx_rules_*``) forgotten after it (libraries it imported stay:
    numpy cannot be imported twice in a process)."""
    path = list(sys.path)
    yield
    for name in [name for name in sys.modules if name.startswith("kvx_rules_")]:
        del sys.modules[name]
    sys.path[:] = path


@pytest.mark.usefixtures("fresh_modules")
@pytest.mark.parametrize(("node", "edited", "old", "new"), [
    ("pipeline.scaled", "pipeline.py", "FACTOR = 2", "FACTOR = 3"),  # a partial's argument, set where it is made
    ("pipeline.closed", "pipeline.py", "FACTOR = 2", "FACTOR = 3"),  # a closure's cell, likewise
    ("nodes.decorated", "nodes.py", "x + 1", "x + 100"),  # a decorator without functools.wraps
    ("nodes.fast", "impl.py", "x * 2", "x * 5"),  # imported under a top-level try
    ("nodes.plain", "accessors.py", "'rev'", "'REV'"),  # imported only for what importing it does
])
def test_code_a_node_reaches_other_than_by_name_counts(tmp_path: Path, node: str, edited: str,
                                                       old: str, new: str) -> None:
    import importlib

    root = _package(tmp_path, "kvx_rules_pkg", {
        "__init__.py": "",
        "impl.py": "def compute(x):\n    return x * 2\n",
        "accessors.py": "REGISTERED = ['rev']\n",
        "nodes.py": (
            "import kvx_rules_pkg.accessors\n"
            "try:\n    from kvx_rules_pkg.impl import compute\nexcept ImportError:\n    compute = None\n\n"
            "def multiply(x, factor):\n    return x * factor\n\n"
            "def make_closed(factor):\n    def closed(x):\n        return x * factor\n    return closed\n\n"
            "def logged(function):\n    def wrapper(*args):\n        return function(*args)\n    return wrapper\n\n"
            "@logged\ndef decorated(x):\n    return x + 1\n\n"
            "def fast(x):\n    return compute(x)\n\n"
            "def plain(x):\n    return x\n"
        ),
        "pipeline.py": (
            "import functools\n"
            "from kvx_rules_pkg.nodes import make_closed, multiply\n\n"
            "FACTOR = 2\n"
            "scaled = functools.partial(multiply, factor=FACTOR)\n"
            "closed = make_closed(FACTOR)\n"
        ),
    })
    module, _, name = node.partition(".")
    func = getattr(importlib.import_module(f"kvx_rules_pkg.{module}"), name)
    before, why = code_digest(func, [root])
    assert why is None, why
    (root / edited).write_text((root / edited).read_text().replace(old, new))
    assert code_digest(func, [root])[0] != before


@pytest.mark.usefixtures("fresh_modules")
def test_a_value_bound_to_a_node_counts_by_its_whole_content(tmp_path: Path) -> None:
    import functools
    import threading

    import numpy as np

    # An array's repr shortens it ("..."): two arrays differing in the middle must not match.
    first, second = np.zeros(5000), np.zeros(5000)
    second[2500] = 1.0
    assert repr(first) == repr(second)
    digests = [code_digest(functools.partial(sorted, value), [tmp_path]) for value in (first, second)]
    assert digests[0][1] is None and digests[0][0] != digests[1][0]
    # What cannot be pickled cannot be told: the node is uncacheable, and says so.
    _, why = code_digest(functools.partial(sorted, key=threading.Lock()), [tmp_path])
    assert why is not None and "cannot be fingerprinted" in why and "lock" in why


def _catalog_context(pipeline: Any, entries: dict[str, dict[str, Any]], **extra: Any) -> KeyContext:
    return KeyContext(pipeline=pipeline, steps={node.name: [node.name] for node in pipeline.nodes}, params={},
                      catalog_entry=entries.get, env="base", project_dirs=[], **extra)


def test_a_transcoded_input_counts_as_the_step_that_makes_it(nodes_module: Any) -> None:
    # x@pandas written by one node and read as x@csv by another is one dataset: the reader's key
    # follows the writer's (a changed parameter upstream is a miss downstream, before it runs).
    from kedro.pipeline import Pipeline, node

    pipeline = Pipeline([node(nodes_module.push, "params:p", "mid@pandas", name="make"),
                         node(nodes_module.push, "mid@csv", "out", name="total")])
    entries = {"mid@pandas": {"type": "pandas.CSVDataset", "filepath": "data/mid.csv"},
               "mid@csv": {"type": "text.TextDataset", "filepath": "data/mid.csv"}}
    one = step_keys(_with_params(pipeline, entries, 1))
    ten = step_keys(_with_params(pipeline, entries, 10))
    assert one["total"].cacheable, one["total"].uncacheable  # not fingerprinted as a raw file
    assert one["total"].digest != ten["total"].digest
    assert ten["total"].changes(one["total"]) == ["input:mid@csv"]


def _with_params(pipeline: Any, entries: dict[str, dict[str, Any]], p: int) -> KeyContext:
    from dataclasses import replace

    return replace(_catalog_context(pipeline, entries), params={"p": p})


@pytest.mark.parametrize(("setting", "value"), [
    ("key", "t2"),  # HDF: another table of the same file
    ("fs_args", {"open_args_load": {"encoding": "utf-16"}}),
    ("dataset", {"type": "pandas.CSVDataset", "load_args": {"sep": ","}}),  # a wrapped dataset's
    ("file_format", "json"),
])
def test_every_setting_of_a_dataset_but_its_place_counts(nodes_module: Any, tmp_path: Path, setting: str,
                                                         value: Any) -> None:
    from kedro.pipeline import Pipeline, node

    (tmp_path / "raw.csv").write_text("a\n1\n")
    pipeline = Pipeline([node(nodes_module.push, "raw", "out", name="read")])
    base = {"type": "pandas.GenericDataset", "filepath": str(tmp_path / "raw.csv"), "key": "t1",
            "dataset": {"type": "pandas.CSVDataset", "load_args": {"sep": ";"}}}
    keys = [step_keys(_catalog_context(pipeline, {"raw": entry, "out": entry}))["read"]
            for entry in (base, {**base, setting: value})]
    assert keys[1].changes(keys[0]) == ["input:raw", "output:out"]
    moved = {**base, "filepath": str(tmp_path / "raw.csv"), "credentials": {"token": "x"}}
    assert step_keys(_catalog_context(pipeline, {"raw": base, "out": moved}))["read"].parts["output:out"] \
        == keys[0].parts["output:out"]  # where an output goes and how it is reached are not what it holds


def test_a_store_that_cannot_be_asked_makes_the_step_uncacheable_not_a_crash(nodes_module: Any) -> None:
    from kedro.pipeline import Pipeline, node

    pipeline = Pipeline([node(nodes_module.push, "raw", "out", name="read")])
    entries = {"raw": {"type": "pandas.CSVDataset", "filepath": "kvxnosuchprotocol://bucket/raw.csv"}}
    key = step_keys(_catalog_context(pipeline, entries))["read"]
    assert len(key.uncacheable) == 1 and "cannot be fingerprinted" in key.uncacheable[0]


@pytest.mark.usefixtures("fresh_modules")
def test_the_code_of_a_projects_own_dataset_class_and_hooks_counts(tmp_path: Path, nodes_module: Any) -> None:
    from dataclasses import replace

    from kedro.pipeline import Pipeline, node

    root = _package(tmp_path, "kvx_rules_io", {
        "__init__.py": "",
        "io.py": "class Doubled:\n    factor = 2\n",
        "hooks.py": "class Hooks:\n    shift = 0\n",
    })
    pipeline = Pipeline([node(nodes_module.push, "value", "out", name="save")])
    entries = {"out": {"type": "kvx_rules_io.io.Doubled", "filepath": "data/out.bin"}}
    context = replace(_catalog_context(pipeline, entries), project_dirs=[root], hook_modules=("kvx_rules_io.hooks",))
    before = step_keys(context)["save"]
    for file, old, new in (("io.py", "factor = 2", "factor = 3"), ("hooks.py", "shift = 0", "shift = 1")):
        (root / file).write_text((root / file).read_text().replace(old, new))
    after = step_keys(context)["save"]
    assert after.changes(before) == ["code:dataset:out", "code:hooks"]
    library = replace(context, catalog_entry={"out": {"type": "pandas.CSVDataset", "filepath": "o.csv"}}.get)
    assert "code:dataset:out" not in step_keys(library)["save"].parts  # a library's class counts by its version


def test_a_raw_input_on_s3_is_fingerprinted_with_the_catalogs_own_credentials(
        s3_server_process: Any, nodes_module: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No ambient AWS credentials: only the catalog entry's reach the store (as the dataset reads).
    import uuid

    from kedro.pipeline import Pipeline, node

    from conftest import S3_CREDENTIALS

    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                     "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    key = f"{uuid.uuid4().hex}/raw.csv"
    client = s3_server_process.client()
    client.put_object(Bucket=s3_server_process.bucket, Key=key, Body=b"a\n1\n")
    entry = {"type": "pandas.CSVDataset", "filepath": f"s3://{s3_server_process.bucket}/{key}",
             "credentials": {"key": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                             "secret": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                             "client_kwargs": {"endpoint_url": s3_server_process.url}}}
    pipeline = Pipeline([node(nodes_module.push, "raw", "out", name="read")])
    before = step_keys(_catalog_context(pipeline, {"raw": entry}))["read"]
    assert before.cacheable, before.uncacheable
    client.put_object(Bucket=s3_server_process.bucket, Key=key, Body=b"a\n2\n")
    after = step_keys(_catalog_context(pipeline, {"raw": entry}))["read"]
    assert after.changes(before) == ["input:raw"]


def test_an_outputs_credentials_reach_it_but_are_never_in_the_key(nodes_module: Any) -> None:
    # How a catalog output is reached (credentials, fs_args) goes with the key to fingerprint and
    # serve it as the dataset saves it; it is no part of the digest and never shown.
    from kedro.pipeline import Pipeline, node

    pipeline = Pipeline([node(nodes_module.push, "params:p", "out", name="save")])

    def key_with(secret: str) -> StepKey:
        entry = {"type": "pandas.CSVDataset", "filepath": "s3://bucket/out.csv",
                 "credentials": {"key": "id", "secret": secret}, "fs_args": {"open_args_save": {"mode": "wb"},
                                                                            "requester_pays": True}}
        return step_keys(_with_params(pipeline, {"out": entry}, 1))["save"]

    key = key_with("s3cr3t-value")
    assert key.reach == {"out": {"key": "id", "secret": "s3cr3t-value", "requester_pays": True}}
    assert "s3cr3t-value" not in repr(key) and "s3cr3t-value" not in json.dumps(dict(key.parts))
    assert key_with("rotated").digest == key.digest


def test_a_librarys_callable_object_counts_by_its_name(tmp_path: Path) -> None:
    # A numpy ufunc or array-function dispatcher as a node's function: a library's code, whose
    # version is in the environment part, not a callable object made by the project.
    import numpy as np

    for function in (np.add, np.dot):
        digest, why = code_digest(function, [tmp_path])
        assert why is None and digest == code_digest(function, [tmp_path])[0]
