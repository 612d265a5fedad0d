"""Where compile writes (-o): an unwritable path is exit 2 naming it, never an internal error."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvx_runtime.compiler.output import write_output
from kvx_runtime.errors import ExitCode, UsageError


def test_the_folder_is_made_and_the_text_written(tmp_path: Path) -> None:
    written = write_output(tmp_path / "new" / "dag.py", "x = 1\n")
    assert written.read_text() == "x = 1\n"


def test_a_path_under_a_file_is_exit_2_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UsageError) as raised:
        write_output(blocker / "dag.py", "x = 1\n")
    assert raised.value.exit_code == ExitCode.USAGE
    assert f"cannot write -o {blocker / 'dag.py'}" in str(raised.value)
