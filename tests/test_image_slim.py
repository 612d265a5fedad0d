"""`kvx-runtime slim-packages`: test suites, debug info and static symbols go, nothing a step
loads does.

Real extension modules with debug info and symbols (PyYAML's, as its wheel ships it; one with
symbols only, as scipy's are) and binutils' strip; a stand-in ``strip`` only where a broken one
is the point.
"""

from __future__ import annotations

import ctypes
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml._yaml
from click.testing import CliRunner

from kvx_runtime.cli import cli
from kvx_runtime.image_slim import has_debug_info, has_symbol_table, slim_site_packages

#: An extension module as PyPI's wheel ships it: with DWARF sections.
WITH_DEBUG_INFO = Path(yaml._yaml.__file__)
needs_strip = pytest.mark.skipif(shutil.which("strip") is None, reason="binutils' strip is not installed")


def fake_site_packages(root: Path) -> Path:
    site = root / "site-packages"
    for suite in ("numpy/tests", "numpy/_core/tests/data", "pandas/tests/io", "joblib/test", "sklearn/svm/tests"):
        (site / suite).mkdir(parents=True)
        (site / suite / "test_something.py").write_text("x = 1\n" * 1000)
    for kept in ("numpy/testing", "numpy/_core", "mypackage/tests", "sklearn/utils/_test_common"):
        (site / kept).mkdir(parents=True, exist_ok=True)
        (site / kept / "__init__.py").write_text("")
    (site / "mypackage").mkdir(exist_ok=True)
    shutil.copy2(WITH_DEBUG_INFO, site / "mypackage" / WITH_DEBUG_INFO.name)
    (site / "vendored.libs").mkdir()
    shutil.copy2(WITH_DEBUG_INFO, site / "vendored.libs" / "libvendored.so.1")
    # Type stubs, a Windows launcher (as pip's vendored distlib ships them) and Cython's sources
    # (as scipy and scikit-learn ship them); kept: code, data, the marker that says a package
    # is typed, C headers (cffi may read them at run time) and other templates.
    (site / "mypackage" / "__init__.pyi").write_text("def f() -> int: ...\n" * 50)
    for cython in ("_fast.pyx", "_fast.pxd", "_defs.pxi", "_loss.pyx.tp"):
        (site / "mypackage" / cython).write_text("cdef int x\n" * 10)
    for kept in ("api.h", "report.tp"):
        (site / "mypackage" / kept).write_text("x\n")
    (site / "mypackage" / "py.typed").write_text("")
    (site / "mypackage" / "data.json").write_text("{}")
    (site / "pip" / "_vendor" / "distlib").mkdir(parents=True)
    (site / "pip" / "_vendor" / "distlib" / "t64.exe").write_bytes(b"MZ" + bytes(998))
    return site


def test_debug_info_is_told_from_the_section_names(tmp_path: Path) -> None:
    assert has_debug_info(WITH_DEBUG_INFO)
    (tmp_path / "text.so").write_text("not an ELF file")
    truncated = tmp_path / "truncated.so"
    truncated.write_bytes(WITH_DEBUG_INFO.read_bytes()[:200])
    assert not has_debug_info(tmp_path / "text.so")
    assert not has_debug_info(truncated)
    assert not has_debug_info(tmp_path / "missing.so")
    # A section table claimed far past the file's end (a corrupt or hostile header) is no crash.
    bogus = bytearray(WITH_DEBUG_INFO.read_bytes()[:4096])
    bogus[0x28:0x30] = (2**63).to_bytes(8, "little")
    (tmp_path / "bogus.so").write_bytes(bytes(bogus))
    assert not has_debug_info(tmp_path / "bogus.so")


@needs_strip
def test_suites_go_debug_info_goes_everything_else_stays(tmp_path: Path) -> None:
    site = fake_site_packages(tmp_path)
    module = site / "mypackage" / WITH_DEBUG_INFO.name
    before = module.stat().st_size

    report = slim_site_packages([site])

    assert sorted(str(p.relative_to(site)) for p in report.test_suites) == [
        "joblib/test", "numpy/_core/tests", "numpy/tests", "pandas/tests", "sklearn/svm/tests"]
    assert not any((site / suite).exists() for suite in ("numpy/tests", "pandas/tests", "joblib/test"))
    assert all((site / kept / "__init__.py").exists()
               for kept in ("numpy/testing", "numpy/_core", "mypackage/tests", "sklearn/utils/_test_common"))
    assert report.test_bytes == 5 * 6000
    assert report.unused_files == 6 and report.unused_bytes == 50 * 20 + 1000 + 4 * 110
    assert not (site / "mypackage" / "__init__.pyi").exists()
    cython = ("_fast.pyx", "_fast.pxd", "_defs.pxi", "_loss.pyx.tp")
    assert not any((site / "mypackage" / name).exists() for name in cython)
    assert all((site / "mypackage" / name).exists() for name in ("api.h", "report.tp"))
    assert not (site / "pip" / "_vendor" / "distlib" / "t64.exe").exists()
    assert all((site / "mypackage" / name).exists() for name in ("py.typed", "data.json"))
    # Stripped, smaller, and still a library the loader takes.
    assert report.stripped == [module] and not report.restored
    assert not has_debug_info(module) and not has_symbol_table(module)
    assert module.stat().st_size == before - report.strip_bytes
    assert report.strip_bytes > before // 2
    ctypes.CDLL(str(module))
    # Vendored libraries are never touched.
    assert (site / "vendored.libs" / "libvendored.so.1").read_bytes() == WITH_DEBUG_INFO.read_bytes()
    # Run again, the directory named twice (a venv's lib64 -> lib): nothing left to do, once.
    (tmp_path / "lib64").symlink_to(site)
    again = slim_site_packages([site, tmp_path / "lib64"])
    assert not again.test_suites and not again.stripped and not again.unused_files


def test_a_module_that_no_longer_loads_once_stripped_gets_its_original_back(tmp_path: Path, monkeypatch) -> None:
    site = fake_site_packages(tmp_path)
    module = site / "mypackage" / WITH_DEBUG_INFO.name
    original = module.read_bytes()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    broken = bin_dir / "strip"  # "strips" into a file no loader takes
    broken.write_text('#!/bin/sh\nfor f; do :; done\nprintf "garbage" > "$f"\n')
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")

    report = slim_site_packages([site])

    assert report.restored == [module] and not report.stripped and report.strip_bytes == 0
    assert module.read_bytes() == original
    assert any("no longer loadable" in line and module.name in line for line in report.lines())


@needs_strip
def test_a_module_that_crashes_the_load_check_costs_only_itself(tmp_path: Path) -> None:
    """A library whose loading (or unloading: matplotlib's ft2font aborts at interpreter exit)
    kills the checking interpreter: the other modules are still stripped, that one is not."""
    site = tmp_path / "site-packages"
    (site / "fine").mkdir(parents=True)
    (site / "crashy").mkdir()
    fine = site / "fine" / WITH_DEBUG_INFO.name
    crashy = site / "crashy" / WITH_DEBUG_INFO.name
    shutil.copy2(WITH_DEBUG_INFO, fine)
    shutil.copy2(WITH_DEBUG_INFO, crashy)
    python = tmp_path / "python"  # this interpreter, aborting whenever it is asked about crashy/
    python.write_text(f'#!/bin/sh\ncase "$*" in *crashy/*) kill -ABRT $$ ;; esac\nexec {sys.executable} "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)

    report = slim_site_packages([site], python=str(python))

    assert report.stripped == [fine] and not has_debug_info(fine)
    assert crashy.read_bytes() == WITH_DEBUG_INFO.read_bytes()


@needs_strip
def test_a_load_check_that_hangs_counts_only_that_module(tmp_path: Path, monkeypatch) -> None:
    """A library whose initialiser blocks would hold the image build: the check gives up on
    it and it stays as it was; the others are stripped."""
    from kvx_runtime import image_slim

    site = tmp_path / "site-packages"
    (site / "fine").mkdir(parents=True)
    (site / "stuck").mkdir()
    fine, stuck = site / "fine" / WITH_DEBUG_INFO.name, site / "stuck" / WITH_DEBUG_INFO.name
    shutil.copy2(WITH_DEBUG_INFO, fine)
    shutil.copy2(WITH_DEBUG_INFO, stuck)
    python = tmp_path / "python"  # this interpreter, hanging whenever it is asked about stuck/
    python.write_text(f'#!/bin/sh\ncase "$*" in *stuck/*) exec sleep 30 ;; esac\nexec {sys.executable} "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(image_slim, "_LOAD_CHECK_TIMEOUT", 2.0)

    report = slim_site_packages([site], python=str(python))

    assert report.stripped == [fine] and stuck.read_bytes() == WITH_DEBUG_INFO.read_bytes()


@needs_strip
def test_a_module_whose_backup_cannot_be_written_is_left_as_it_is(tmp_path: Path, monkeypatch) -> None:
    """Stripping borrows disk for backups, a batch at a time; a module whose backup does not
    fit (a full disk) is left as it is instead of failing the build."""
    from kvx_runtime import image_slim

    site = tmp_path / "site-packages"
    modules = []
    for name in ("first", "second", "third"):
        (site / name).mkdir(parents=True)
        modules.append(site / name / WITH_DEBUG_INFO.name)
        shutil.copy2(WITH_DEBUG_INFO, modules[-1])
    real_copy = shutil.copy2

    def disk_full_for_second(source, target, *args, **kwargs):
        if "second" in str(source) and "kvx-slim-" in str(target):
            raise OSError(28, "No space left on device")
        return real_copy(source, target, *args, **kwargs)

    monkeypatch.setattr(image_slim, "_STRIP_BATCH", 2)  # two batches: backups never all at once
    monkeypatch.setattr(image_slim.shutil, "copy2", disk_full_for_second)
    report = slim_site_packages([site])

    assert sorted(report.stripped) == sorted([modules[0], modules[2]]) and not report.restored
    assert modules[1].read_bytes() == WITH_DEBUG_INFO.read_bytes()


def test_the_load_check_survives_a_library_that_aborts_at_interpreter_exit(tmp_path: Path) -> None:
    """The check's interpreter ends without finalization: a destructor that aborts (as
    matplotlib's ft2font's does outside its package) cannot fail the check."""
    from kvx_runtime.image_slim import _LOAD_CHECK

    assert _LOAD_CHECK.rstrip().endswith("os._exit(0)")
    checked = subprocess.run([sys.executable, "-c", _LOAD_CHECK.replace(
        "os._exit(0)", "import atexit; atexit.register(os.abort); os._exit(0)"), str(WITH_DEBUG_INFO)],
        capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stdout.strip() == "", checked.stderr[-2000:]


@needs_strip
def test_a_module_with_symbols_but_no_debug_info_loses_its_symbol_table(tmp_path: Path) -> None:
    """scipy's extension modules, as its wheels ship them: no DWARF, a static symbol table."""
    site = tmp_path / "site-packages"
    (site / "scipy_like").mkdir(parents=True)
    module = site / "scipy_like" / WITH_DEBUG_INFO.name
    shutil.copy2(WITH_DEBUG_INFO, module)
    subprocess.run(["strip", "--strip-debug", str(module)], check=True)
    assert has_symbol_table(module) and not has_debug_info(module)
    before = module.stat().st_size

    report = slim_site_packages([site])

    assert report.stripped == [module] and not has_symbol_table(module)
    assert 0 < report.strip_bytes == before - module.stat().st_size
    # What Python looks up in an extension module stays: it still imports and works.
    checked = subprocess.run(
        [sys.executable, "-c", "import importlib.util, sys; spec = importlib.util.spec_from_file_location("
         "'yaml._yaml', sys.argv[1]); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
         "print(m.CParser.__name__)", str(module)], capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stdout.strip() == "CParser", checked.stderr[-2000:]


def test_symbols_are_told_from_the_section_names(tmp_path: Path) -> None:
    assert has_symbol_table(WITH_DEBUG_INFO)
    (tmp_path / "text.so").write_text("not an ELF file")
    assert not has_symbol_table(tmp_path / "text.so")
    assert not has_symbol_table(tmp_path / "missing.so")


@needs_strip
def test_one_directory_under_two_names_is_stripped_once(tmp_path: Path) -> None:
    site = fake_site_packages(tmp_path)
    (tmp_path / "lib64").symlink_to(site)
    report = slim_site_packages([site, tmp_path / "lib64"])
    assert len(report.stripped) == 1 and len(report.test_suites) == 5


def test_without_strip_suites_still_go_and_the_report_says_debug_info_stayed(tmp_path: Path, monkeypatch) -> None:
    site = fake_site_packages(tmp_path)
    module = site / "mypackage" / WITH_DEBUG_INFO.name
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))

    report = slim_site_packages([site])

    assert report.strip_missing and not report.stripped
    assert module.read_bytes() == WITH_DEBUG_INFO.read_bytes()
    assert len(report.test_suites) == 5
    assert "debug info and static symbols kept: `strip` (binutils) is not installed" in report.lines()


def test_the_command_reports_what_it_saved_and_refuses_a_missing_directory(tmp_path: Path) -> None:
    site = fake_site_packages(tmp_path)
    result = CliRunner().invoke(cli, ["slim-packages", "--no-strip", str(site)])
    assert result.exit_code == 0, result.output
    assert "test suites removed: 5 (0.0 MB)" in result.output
    assert "type stubs, Windows launchers and Cython sources removed: 6 (0.0 MB)" in result.output
    assert (site / "mypackage" / WITH_DEBUG_INFO.name).read_bytes() == WITH_DEBUG_INFO.read_bytes()

    missing = CliRunner().invoke(cli, ["slim-packages", str(tmp_path / "absent")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
