"""Make an image's Python environment smaller without changing what it runs (``kvx-runtime
slim-packages``, run by the base image's build and by project images' after ``pip install``).

What no step ever loads goes:

- the test suites that packages ship inside themselves (numpy, pandas, scipy, scikit-learn,
  fsspec...: ~100 MB with the example project's requirements); only their own test runners
  import them, and only directories named as their suites are removed;
- files that only other tools read: type stubs (``*.pyi``, for type checkers), Windows
  launchers (``*.exe``, which pip and setuptools copy next to scripts on Windows only), and
  Cython's sources and templates (``*.pyx``, ``*.pxd``, ``*.pxi``, ``*.pyx.tp``...: read by
  Cython when it compiles an extension, which needs a C compiler no image of ours has);
- what extension modules carry for debuggers and linkers only: DWARF ``.debug_*`` sections
  (zstandard's two backends alone carry 23 MB) and the static symbol table (``.symtab``:
  scipy's modules, 8 MB). ``strip --strip-unneeded``, as Debian strips its shared libraries,
  keeps the dynamic symbols the loader and Python need (``PyInit_*``); a module that no longer
  loads afterwards (checked in a fresh interpreter, as the loader of a step would) gets its
  original back. Vendored libraries (``<package>.libs``, patched by auditwheel) are left alone.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TEST_SUITES", "UNUSED_SUFFIXES", "SlimReport", "default_site_packages", "has_debug_info",
           "has_symbol_table", "slim_site_packages"]

#: Package -> the directory names of the test suite it ships (anywhere below the package).
#: Only packages whose suites are never imported outside their own test runners.
TEST_SUITES: dict[str, tuple[str, ...]] = {
    "numpy": ("tests",),
    "pandas": ("tests",),
    "scipy": ("tests",),
    "sklearn": ("tests",),
    "pyarrow": ("tests",),
    "matplotlib": ("tests",),
    "joblib": ("test",),
    "fsspec": ("tests",),
    "gitdb": ("test",),
    "smmap": ("test",),
    "kedro_datasets_experimental": ("tests",),
}

#: Files no step reads, by the end of their name, and who does read them.
UNUSED_SUFFIXES: dict[str, str] = {
    ".pyi": "type checkers",
    ".exe": "pip and setuptools on Windows",
    ".pyx": "Cython, compiling an extension",
    ".pxd": "Cython, compiling an extension",
    ".pxi": "Cython, compiling an extension",
    ".pyx.tp": "Tempita, generating Cython sources",
    ".pxd.tp": "Tempita, generating Cython sources",
    ".pxi.tp": "Tempita, generating Cython sources",
}


@dataclass
class SlimReport:
    """What was removed or stripped, and the bytes it saved."""

    test_suites: list[Path] = field(default_factory=list)
    test_bytes: int = 0
    unused_files: int = 0  # type stubs, Windows launchers, Cython sources (UNUSED_SUFFIXES)
    unused_bytes: int = 0
    stripped: list[Path] = field(default_factory=list)
    strip_bytes: int = 0
    restored: list[Path] = field(default_factory=list)  # stripped, then no longer loadable
    strip_missing: bool = False  # debug info or symbols found, but no `strip` to remove them

    def lines(self) -> list[str]:
        mb = 1024 * 1024
        out = [f"test suites removed: {len(self.test_suites)} ({self.test_bytes / mb:.1f} MB)",
               f"type stubs, Windows launchers and Cython sources removed: {self.unused_files} "
               f"({self.unused_bytes / mb:.1f} MB)",
               f"extension modules stripped of debug info and static symbols: {len(self.stripped)} "
               f"({self.strip_bytes / mb:.1f} MB)"]
        if self.restored:
            out.append("kept as they were (no longer loadable once stripped): "
                       + ", ".join(path.name for path in self.restored))
        if self.strip_missing:
            out.append("debug info and static symbols kept: `strip` (binutils) is not installed")
        return out


def default_site_packages() -> list[Path]:
    """The running interpreter's site-packages (pure and platform, once each)."""
    paths = sysconfig.get_paths()
    return sorted({Path(paths["purelib"]), Path(paths["platlib"])})


def _tree_bytes(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file() and not entry.is_symlink())


def _test_suites(site_packages: Path) -> Iterator[Path]:
    for package, names in TEST_SUITES.items():
        root = site_packages / package
        if not root.is_dir():
            continue
        for directory, subdirectories, _ in os.walk(root):
            for name in list(subdirectories):
                if name in names:
                    subdirectories.remove(name)  # removed whole: nothing below needs a look
                    yield Path(directory) / name


def _unused_files(site_packages: Path) -> Iterator[Path]:
    suffixes = tuple(UNUSED_SUFFIXES)
    for directory, _, files in os.walk(site_packages):
        for name in files:
            if name.endswith(suffixes):
                path = Path(directory) / name
                if not path.is_symlink():
                    yield path


#: ELF identification: magic, class (2: 64-bit), data (1: little, 2: big endian).
_ELF_MAGIC = b"\x7fELF"


def _section_names(path: Path) -> list[bytes]:
    """The section names of the 64-bit ELF file at ``path`` (none for anything else)."""
    try:
        with path.open("rb") as file:
            header = file.read(64)
            if len(header) < 64 or header[:4] != _ELF_MAGIC or header[4] != 2 or header[5] not in (1, 2):
                return []
            order = "<" if header[5] == 1 else ">"
            section_offset, = struct.unpack_from(order + "Q", header, 0x28)
            entry_size, count, names_index = struct.unpack_from(order + "HHH", header, 0x3A)
            size = path.stat().st_size
            if (not section_offset or entry_size < 64 or names_index >= count
                    or section_offset + entry_size * count > size):
                return []
            file.seek(section_offset)
            table = file.read(entry_size * count)
            if len(table) < entry_size * count:
                return []
            sections = [struct.unpack_from(order + "IIQQQQ", table, i * entry_size) for i in range(count)]
            _, _, _, _, names_offset, names_size = sections[names_index]
            if names_offset + names_size > size:
                return []
            file.seek(names_offset)
            names = file.read(names_size)
    except (OSError, OverflowError, ValueError, MemoryError, struct.error):
        return []
    return [_name_at(names, start) for start, *_ in sections]


def _name_at(names: bytes, start: int) -> bytes:
    end = names.find(b"\0", start)
    return names[start:end if end >= 0 else len(names)]


def has_debug_info(path: Path) -> bool:
    """Whether the 64-bit ELF file at ``path`` has ``.debug_*`` sections (False for anything else)."""
    return any(name.startswith(b".debug_") for name in _section_names(path))


def has_symbol_table(path: Path) -> bool:
    """Whether the 64-bit ELF file at ``path`` has a static symbol table (``.symtab``; the
    loader reads ``.dynsym`` only)."""
    return b".symtab" in _section_names(path)


def _strippable(path: Path) -> bool:
    names = _section_names(path)
    return b".symtab" in names or any(name.startswith(b".debug_") for name in names)


def _extension_modules(site_packages: Path) -> Iterator[Path]:
    for directory, subdirectories, files in os.walk(site_packages):
        # auditwheel's vendored libraries: patched by patchelf, which strip can corrupt.
        subdirectories[:] = [name for name in subdirectories if not name.endswith(".libs")]
        for name in files:
            if name.endswith(".so") or ".so." in name:
                path = Path(directory) / name
                if not path.is_symlink():
                    yield path


_LOAD_CHECK = """
import ctypes, os, sys
failed = []
for path in sys.argv[1:]:
    try:
        ctypes.CDLL(path)
    except OSError:
        failed.append(path)
print("\\n".join(failed), flush=True)
# No interpreter finalization: some modules abort in their destructors once loaded outside
# their package (matplotlib's ft2font does, stripped or not).
os._exit(0)
"""


#: Seconds a load check may take: a library whose initialiser blocks (a device, a lock) counts
#: as unloadable instead of holding the image build.
_LOAD_CHECK_TIMEOUT = 300.0
#: Modules stripped, checked and settled together: their backups are all the disk it borrows.
_STRIP_BATCH = 64


def _unloadable(paths: Iterable[Path], python: str) -> set[Path]:
    """Those of ``paths`` the dynamic loader refuses, asked in a fresh interpreter; where that
    interpreter crashes or hangs (a loader or a library's initialiser did), each is asked
    alone, so that one crash counts one module."""
    paths = list(paths)
    if not paths:
        return set()
    try:
        checked = subprocess.run([python, "-c", _LOAD_CHECK, *map(str, paths)], capture_output=True, text=True,
                                 timeout=_LOAD_CHECK_TIMEOUT)
        crashed = checked.returncode != 0
    except subprocess.TimeoutExpired:
        crashed = True
    if crashed:
        if len(paths) == 1:
            return set(paths)
        return set().union(*(_unloadable([path], python) for path in paths))
    # Only the paths asked about: a library's initialiser may print lines of its own.
    named = {str(path): path for path in paths}
    return {named[line] for line in checked.stdout.splitlines() if line in named}


def _strip(modules: list[Path], strip: str, python: str, report: SlimReport) -> None:
    unloadable = _unloadable(modules, python)
    loadable = [path for path in modules if path not in unloadable]
    for start in range(0, len(loadable), _STRIP_BATCH):
        _strip_batch(loadable[start:start + _STRIP_BATCH], strip, python, report)


def _strip_batch(modules: list[Path], strip: str, python: str, report: SlimReport) -> None:
    with tempfile.TemporaryDirectory(prefix="kvx-slim-") as backups:
        originals: dict[Path, tuple[Path, int]] = {}
        for index, path in enumerate(modules):
            backup = Path(backups) / str(index)
            try:
                shutil.copy2(path, backup)
            except OSError:  # no room for its backup (a full disk): left as it is
                continue
            size = path.stat().st_size
            if subprocess.run([strip, "--strip-unneeded", "--preserve-dates", str(path)],
                              capture_output=True).returncode != 0:
                shutil.copy2(backup, path)  # strip may leave a partial file behind
                report.restored.append(path)
                continue
            originals[path] = (backup, size)
        for path in _unloadable(originals, python):
            shutil.copy2(originals.pop(path)[0], path)
            report.restored.append(path)
        for path, (_, size) in originals.items():
            report.stripped.append(path)
            report.strip_bytes += size - path.stat().st_size


def slim_site_packages(site_packages: Iterable[Path], *, strip: bool = True, python: str | None = None) -> SlimReport:
    """Remove known test suites and files no step reads (:data:`UNUSED_SUFFIXES`), and strip
    debug info and static symbols from extension modules below each of ``site_packages``;
    ``python`` checks that stripped modules still load (default: this one)."""
    report = SlimReport()
    modules: list[Path] = []
    # One pass per directory: purelib and platlib may be two names of one (a venv's lib64 -> lib).
    for root in dict.fromkeys(Path(path).resolve() for path in site_packages):
        for suite in list(_test_suites(root)):
            report.test_bytes += _tree_bytes(suite)
            shutil.rmtree(suite)
            report.test_suites.append(suite)
        for path in list(_unused_files(root)):
            report.unused_bytes += path.stat().st_size
            path.unlink()
            report.unused_files += 1
        if strip:
            modules.extend(path for path in _extension_modules(root) if _strippable(path))
    if modules:
        strip_program = shutil.which("strip")
        if strip_program is None:
            report.strip_missing = True
        else:
            _strip(modules, strip_program, python or sys.executable, report)
    return report
