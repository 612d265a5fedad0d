"""Libraries imported without the optional integrations kvx-runtime never uses."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import fresh_python
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
