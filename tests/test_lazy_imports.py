"""Libraries imported without the optional integrations kvx-runtime never uses."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from conftest import fresh_python, inside_kvx_runtime
from kvx_runtime.lazy_imports import optional_modules_hidden


def test_a_hidden_module_cannot_be_imported_inside_the_block_and_leaves_no_trace() -> None:
    name = "kvx_never_imported_module_for_this_test"
    with optional_modules_hidden(name), pytest.raises(ImportError):
        __import__(name)
    assert name not in sys.modules


def test_a_module_imported_already_is_left_as_it_is() -> None:
    import json

    with optional_modules_hidden("json"):
        assert sys.modules["json"] is json
    assert sys.modules["json"] is json


@pytest.mark.kedro
@pytest.mark.skipif(importlib.util.find_spec("flask") is None, reason="Flask is not installed here")
def test_opening_kedro_does_not_import_dynaconfs_flask_integration() -> None:
    script = (
        "import sys\n"
        "from kvx_runtime.project import _import_kedro_quietly\n"
        "_import_kedro_quietly()\n"
        "print('flask' in sys.modules)\n"
        "import flask\n"
        "print(flask.Flask.__name__)\n"
    )
    assert fresh_python(script)[0] == ["False", "Flask"]


PARENT_INIT = """\
from kvx_demo_parent import heavy
try:
    from kvx_demo_parent.heavy.sub import X  # an optional integration, as MLflow's dataset sources
except ImportError:
    X = None
try:
    heavy.VALUE
except AttributeError as exc:
    print("during init:", exc)
"""


def _parent(root: Path, heavy_init: str = "print('heavy ran')\nVALUE = 42\n") -> None:
    (root / "kvx_demo_parent" / "heavy").mkdir(parents=True)
    (root / "kvx_demo_parent" / "__init__.py").write_text(PARENT_INIT)
    (root / "kvx_demo_parent" / "heavy" / "__init__.py").write_text(heavy_init)
    (root / "kvx_demo_parent" / "heavy" / "sub.py").write_text("X = 1\n")


def _deferring(root: Path, body: str) -> list[str]:
    script = (f"import sys\nsys.path.insert(0, {str(root)!r})\n"
              "from kvx_runtime.lazy_imports import defer_until_used, is_deferred\n"
              "defer_until_used('kvx_demo_parent', 'kvx_demo_parent.heavy')\n"
              f"{body}")
    return fresh_python(script)[0]


def test_a_package_a_parent_imports_is_imported_at_its_first_use_and_then_as_usual(tmp_path: Path) -> None:
    _parent(tmp_path)
    lines = _deferring(tmp_path, (
        "import importlib.util\n"
        "importlib.util.find_spec('kvx_demo_parent')\n"  # asking is not importing
        "import kvx_demo_parent as parent\n"
        "print('imported', parent.X, is_deferred(parent, 'heavy'))\n"
        "print('used', parent.heavy.VALUE, parent.heavy.VALUE, is_deferred(parent, 'heavy'))\n"
        "import kvx_demo_parent.heavy.sub\n"
        "print(parent.heavy is sys.modules['kvx_demo_parent.heavy'], type(parent.heavy).__name__,\n"
        "      parent.heavy.sub.X)\n"))
    assert lines == ["during init: module 'kvx_demo_parent.heavy' has no attribute 'VALUE' while 'kvx_demo_parent' "
                     "is imported (deferred to its first use)",
                     "imported None True", "heavy ran", "used 42 42 False", "True module 1"]


def test_from_parent_import_name_gives_the_real_package(tmp_path: Path) -> None:
    _parent(tmp_path)
    lines = _deferring(tmp_path, (
        "import importlib, kvx_demo_parent as parent\n"
        "print('heavy' in dir(parent))\n"
        "from kvx_demo_parent import heavy\n"
        "print(heavy is sys.modules['kvx_demo_parent.heavy'] is parent.heavy, type(heavy).__name__)\n"
        "heavy.WRITTEN = 1\n"
        "print(parent.heavy.WRITTEN, importlib.reload(heavy) is heavy)\n"
        "try:\n    parent.missing\nexcept AttributeError as exc:\n    print(exc)\n"))
    assert lines[1:] == ["True", "heavy ran", "True module", "heavy ran", "1 True",  # lines[0]: during init
                         "module 'kvx_demo_parent' has no attribute 'missing'"]


def test_dir_of_a_deferred_package_imports_it(tmp_path: Path) -> None:
    _parent(tmp_path)
    assert _deferring(tmp_path, "import kvx_demo_parent as p\nprint('VALUE' in dir(p.heavy))\n")[-1] == "True"


def test_a_deferred_package_that_fails_to_import_is_no_attribute_at_each_use(tmp_path: Path) -> None:
    # As for a parent importing it under contextlib.suppress(Exception) (MLflow's gateway).
    _parent(tmp_path, heavy_init="raise RuntimeError('no backend')\n")
    lines = _deferring(tmp_path, (
        "import kvx_demo_parent as parent\n"
        "for _ in range(2):\n"
        "    try:\n        parent.heavy.VALUE\n    except AttributeError as exc:\n"
        "        print(type(exc.__cause__).__name__, exc.__cause__)\n"))
    assert lines[-2:] == ["RuntimeError no backend", "RuntimeError no backend"]


def test_a_deferred_package_whose_dependency_is_missing_is_no_attribute(tmp_path: Path) -> None:
    # As for a parent that imports it inside try/except ImportError: hasattr() is False.
    _parent(tmp_path, heavy_init="import kvx_not_installed_anywhere\n")
    lines = _deferring(tmp_path, (
        "import kvx_demo_parent as parent\n"
        "print(hasattr(parent, 'heavy'))\n"
        "try:\n    parent.heavy\nexcept AttributeError as exc:\n    print(exc)\n"))
    assert lines[-2:] == ["False", "module 'kvx_demo_parent' has no attribute 'heavy': it cannot be imported "
                                   "(No module named 'kvx_not_installed_anywhere')"]


def test_threads_first_using_a_deferred_package_at_once_import_it_once(tmp_path: Path) -> None:
    _parent(tmp_path, heavy_init="import time\nprint('heavy ran')\ntime.sleep(0.3)\nVALUE = 42\n")
    lines = _deferring(tmp_path, (
        "import threading, kvx_demo_parent as parent\n"
        "seen = []\n"
        "threads = [threading.Thread(target=lambda: seen.append(parent.heavy.VALUE)) for _ in range(4)]\n"
        "[t.start() for t in threads]\n[t.join() for t in threads]\n"
        "print(seen)\n"))
    assert lines[-2:] == ["heavy ran", "[42, 42, 42, 42]"]


def test_nothing_is_deferred_for_a_parent_imported_already() -> None:
    lines = fresh_python("import sys, json\n"
                         "from kvx_runtime.lazy_imports import defer_until_used\n"
                         "before = list(sys.meta_path)\n"
                         "defer_until_used('json', 'json.decoder')\n"
                         "print(sys.meta_path == before)\n")[0]
    assert lines == ["True"]


MLFLOW = pytest.mark.skipif(importlib.util.find_spec("kedro_mlflow") is None,
                            reason="the MLflow extra is not installed")


@MLFLOW
def test_a_kvx_runtime_process_imports_mlflow_and_kedro_mlflow_without_mlflows_genai(tmp_path: Path) -> None:
    stdout = inside_kvx_runtime(
        "    import mlflow, kedro_mlflow.framework.hooks\n"
        "    from kvx_runtime.lazy_imports import is_deferred\n"
        "    print('deferred', is_deferred(mlflow, 'genai'), is_deferred(mlflow, 'gateway'),\n"
        "          sorted(name for name in sys.modules if name.startswith(('mlflow.genai', 'fastapi'))))\n"
        "    print('used', mlflow.genai.evaluate.__name__, is_deferred(mlflow, 'genai'))\n"
        "    from mlflow.genai.scorers import scorer\n"
        "    print('scorer', scorer.__name__, mlflow.gateway.__name__)\n"
        "    from mlflow import genai\n"
        "    import cloudpickle\n"
        "    cloudpickle.loads(cloudpickle.dumps(lambda: genai.evaluate))\n"
        "    print('real', genai is sys.modules['mlflow.genai'] is mlflow.genai)\n", tmp_path)
    for line in ("deferred True True []", "used evaluate False", "scorer scorer mlflow.gateway", "real True"):
        assert line in stdout


@MLFLOW
def test_mlflows_sql_store_works_with_genai_deferred(tmp_path: Path) -> None:
    # The SQL store imports GenAI submodules: a plain import then, in the package's own order.
    lines = fresh_python(
        "import sys\n"
        "from kvx_runtime.lazy_imports import MLFLOW_PACKAGES_RUN_WHEN_USED, defer_until_used, is_deferred\n"
        "defer_until_used('mlflow', *MLFLOW_PACKAGES_RUN_WHEN_USED)\n"
        "import mlflow\n"
        f"mlflow.set_tracking_uri('sqlite:///{tmp_path / 'mlflow.db'}')\n"
        "with mlflow.start_run() as run:\n"
        "    mlflow.log_metric('m', 2.0)\n"
        "print(mlflow.get_run(run.info.run_id).data.metrics, is_deferred(mlflow, 'genai'))\n")[0]
    assert lines[-1] == "{'m': 2.0} False"


@MLFLOW
def test_mlflow_registers_the_same_dataset_sources_with_genai_deferred() -> None:
    # MLflow's registry imports GenAI's Databricks sources inside try/except ImportError: today
    # that import fails on a circular import either way; a MLflow where it succeeds fails here.
    probe = ("import mlflow.data.dataset_source_registry as registry\n"
             "print(sorted(source.__name__ for source in registry._dataset_source_registry.sources))\n")
    plain = fresh_python(probe)[0]
    deferred = fresh_python("from kvx_runtime.lazy_imports import MLFLOW_PACKAGES_RUN_WHEN_USED, defer_until_used\n"
                            "defer_until_used('mlflow', *MLFLOW_PACKAGES_RUN_WHEN_USED)\n" + probe)[0]
    assert deferred == plain and "HTTPDatasetSource" in plain[0]
