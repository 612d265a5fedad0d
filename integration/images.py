"""Image builds with buildah, shared by the image tests (integration/test_image.py: what the
images do) and the image benchmarks (bench/run.py --only image: their sizes and rebuild times).

No registry is reachable here, so the Python base image is made locally: a Debian bookworm
root filesystem (debootstrap, with Debian's python3) imported into buildah. Every build uses
a storage of its own (under ``storage``), removed by :meth:`Buildah.remove_everything`: the
layer cache that repeated runs leave would fill the disk. The storage driver is overlay where
the kernel lets us mount it (layers stored as differences: make test-image peaked at 4.6 GB
and took 3 minutes here), else vfs (every layer copied whole: 5.6 GB, 5.3 minutes);
``KVX_BUILDAH_DRIVER`` forces one. The tests start only with that disk free, and a margin.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

BASE = "localhost/kvx-test-python:bookworm"
RUNTIME = "localhost/kvx-runtime:kvx-test"
#: The base image with full mlflow (KVX_MLFLOW=full), tagged as releases are: <version>-mlflow-full.
RUNTIME_FULL = "localhost/kvx-runtime:kvx-test-mlflow-full"
PROJECT = "localhost/spaceflights-kvx:kvx-test"
MIRROR = os.environ.get("KVX_DEBIAN_MIRROR", "http://deb.debian.org/debian")
#: Size bounds (MB, as buildah reports them). The base image's is issue 24's goal (measured:
#: 404 MB). The project image's goal is 550 MB (measured: 547, by make bench-image); the bound
#: here leaves room for its requirements' next releases, and catches full mlflow coming back
#: (+600 MB) or the slimming undone (symbols, bytecode positions: +20 MB); test_image checks
#: each of those by itself.
BASE_IMAGE_MAX_MB = 450
PROJECT_IMAGE_MAX_MB = 565
#: What a project image's build context leaves out (as a checkout's .dockerignore would).
NOT_IN_CONTEXT = shutil.ignore_patterns(".kvx", "__pycache__", "08_reporting")


#: Free disk a test session's builds need (GB), by storage driver: the measured peaks (base,
#: runtime and project images: 4.6 and 5.6 GB) plus a margin for what CI runs beside them.
DISK_NEEDED_GB = {"overlay": 7, "vfs": 8}


class Buildah:
    """buildah with a private storage under ``storage`` (driver: :meth:`why_not` picks it)."""

    def __init__(self, storage: Path) -> None:
        self.storage = storage
        self.driver = os.environ.get("KVX_BUILDAH_DRIVER", "vfs")

    @property
    def command(self) -> list[str]:
        return ["buildah", "--storage-driver", self.driver, "--root", str(self.storage / "root"),
                "--runroot", str(self.storage / "run")]

    def __call__(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        """Run ``buildah args``; a failure raises with the end of its output."""
        result = subprocess.run([*self.command, *args], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"buildah {' '.join(args[:3])} failed:\n{result.stdout[-3000:]}\n"
                               f"{result.stderr[-3000:]}")
        return result

    def quietly(self, *args: str) -> None:
        """Clean-up: whatever it answers."""
        subprocess.run([*self.command, *args], capture_output=True)

    def why_not(self) -> str | None:
        """Why images cannot be built here, or None; picks the storage driver (overlay where it
        can be mounted, unless ``KVX_BUILDAH_DRIVER`` says). Leaves no storage behind."""
        if shutil.which("buildah") is None:
            return "buildah is not installed (apt-get install buildah)"
        if shutil.which("debootstrap") is None:
            return "debootstrap is not installed (apt-get install debootstrap)"
        if os.geteuid() != 0:
            return "building with --isolation chroot needs root here"
        if "KVX_BUILDAH_DRIVER" not in os.environ:
            self.driver = "overlay" if self._mounts("overlay") else "vfs"
        probe = subprocess.run([*self.command, "images"], capture_output=True, text=True)
        shutil.rmtree(self.storage, ignore_errors=True)
        if probe.returncode != 0:
            return f"buildah cannot run: {probe.stderr.strip()[:200]}"
        self.storage.parent.mkdir(parents=True, exist_ok=True)
        free_gb = shutil.disk_usage(self.storage.parent).free / 1e9
        if free_gb < DISK_NEEDED_GB[self.driver]:
            return (f"only {free_gb:.1f} GB free under {self.storage.parent}: the image builds need "
                    f"{DISK_NEEDED_GB[self.driver]} GB with buildah's {self.driver} storage")
        return None

    def _mounts(self, driver: str) -> bool:
        """Whether a working container's root filesystem mounts with ``driver`` here."""
        saved, self.driver = self.driver, driver
        try:
            made = subprocess.run([*self.command, "from", "-q", "scratch"], capture_output=True, text=True)
            if made.returncode != 0:
                return False
            mounted = subprocess.run([*self.command, "mount", made.stdout.strip()], capture_output=True)
            self.quietly("umount", "--all")
            return mounted.returncode == 0
        finally:
            self.quietly("rm", "--all")
            self.driver = saved
            shutil.rmtree(self.storage, ignore_errors=True)

    def remove_everything(self) -> None:
        self.quietly("rm", "--all")
        self.quietly("rmi", "--all", "--force")
        shutil.rmtree(self.storage, ignore_errors=True)

    @contextlib.contextmanager
    def container(self, image: str) -> Iterator[str]:
        """A working container of ``image`` (vfs copies the whole image: one per use, not per command)."""
        name = self("from", "-q", image).stdout.strip()
        try:
            yield name
        finally:
            self.quietly("rm", name)

    def run(self, container: str, *command: str, volumes: tuple[str, ...] = (),
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """``command`` in ``container`` (with ``volumes`` mounted, ``env`` set); the result whatever
        its exit code."""
        options = [arg for volume in volumes for arg in ("--volume", volume)]
        options += [arg for name, value in (env or {}).items() for arg in ("--env", f"{name}={value}")]
        return subprocess.run([*self.command, "run", "--isolation", "chroot", *options, container, "--", *command],
                              capture_output=True, text=True, timeout=600)

    def run_in(self, image: str, *command: str) -> subprocess.CompletedProcess:
        """``command`` in a fresh container of ``image``."""
        with self.container(image) as container:
            return self.run(container, *command)

    def image_config(self, image: str) -> dict:
        return json.loads(self("inspect", "--type", "image", image).stdout)

    def megabytes(self, image: str) -> float:
        """``image``'s size in MB (10**6 bytes, buildah's unit), from what :meth:`sizes` prints."""
        number, unit = self.sizes(image)[image].split()
        return float(number) * {"B": 1e-6, "kB": 1e-3, "MB": 1, "GB": 1e3}[unit]

    def sizes(self, *images: str) -> dict[str, str]:
        """Each image's size as buildah prints it (e.g. "1.2 GB")."""
        sizes = {}
        for entry in json.loads(self("images", "--json").stdout):
            for name in entry.get("names") or []:
                if name in images:
                    sizes[name] = str(entry["size"])
        return sizes


#: What Debian's slim images leave out (debian:bookworm-slim, under python:3.11-slim), as
#: dpkg path filters: documentation but the copyright notices, manuals, info pages and
#: translations. Also written to the image's /etc/dpkg/dpkg.cfg.d/, so that packages installed
#: later (apt-get in a derived image) leave them out too.
DPKG_SLIM = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
"""
#: Caches and indexes an image does not need (apt-get update fetches the lists again).
NOT_IN_BASE = ("var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/lib/apt/lists/*",
               "var/cache/debconf/*-old", "var/lib/dpkg/*-old", "var/log/*.log", "var/log/apt/*")


def build_python_base(buildah: Buildah, workdir: Path, tag: str = BASE) -> str:
    """Debian bookworm + python3 as a local base image, as slim as python:3.11-slim: a
    debootstrap minbase root filesystem without what :data:`DPKG_SLIM` filters, the downloaded
    packages and apt's lists."""
    root = workdir / "rootfs"
    result = subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
         "bookworm", str(root), MIRROR], capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"debootstrap failed:\n{result.stderr[-3000:]}")
    slim(root)
    archive = workdir / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname=".")
    shutil.rmtree(root, ignore_errors=True)
    with buildah.container("scratch") as container:
        buildah("add", container, str(archive), "/")
        buildah("config", "--cmd", "/bin/sh", container)
        buildah("commit", "-q", container, tag)
    archive.unlink()
    return tag


def slim(root: Path) -> None:
    """Removes from the root filesystem at ``root`` what :data:`DPKG_SLIM` excludes (as if dpkg
    had filtered it when installing) and :data:`NOT_IN_BASE`; records the filters for dpkg."""
    (root / "etc" / "dpkg" / "dpkg.cfg.d" / "kvx-slim").write_text(
        "# As Debian's slim images: no documentation but copyright notices, manuals or translations.\n" + DPKG_SLIM)
    rules = [line.split() for line in DPKG_SLIM.splitlines()]
    included = [pattern.lstrip("/") for kind, pattern in rules if kind == "path-include"]

    def keep(path: Path) -> bool:
        return any(path.relative_to(root).match(pattern) for pattern in included)

    for pattern in [pattern.lstrip("/") for kind, pattern in rules if kind == "path-exclude"]:
        for path in list(root.glob(pattern)):
            _remove(path, keep)
    for pattern in NOT_IN_BASE:
        for path in list(root.glob(pattern)):
            _remove(path, lambda _: False)


def _remove(path: Path, keep) -> None:
    """``path``, a directory with its content, but what ``keep`` (and the directories holding it)."""
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            _remove(child, keep)
        if not any(path.iterdir()):
            path.rmdir()
    elif not keep(path):
        path.unlink()


def build_runtime_image(buildah: Buildah, base: str, repo: Path, workdir: Path, tag: str = RUNTIME,
                        mlflow: str = "skinny") -> str:
    """The kvx-runtime base image (docker/Dockerfile) with a wheel of the checkout at ``repo``;
    ``mlflow``: its KVX_MLFLOW (skinny, full or none)."""
    context = workdir / f"runtime-context-{mlflow}"
    shutil.copytree(repo / "docker", context / "docker")
    shutil.copytree(repo / "entrypoint", context / "entrypoint")
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                            str(context / "docker" / "wheels"), str(repo)], capture_output=True, text=True)
    if wheel.returncode != 0:
        raise RuntimeError(f"pip wheel failed:\n{wheel.stderr[-3000:]}")
    # This machine reaches PyPI through a TLS-inspecting proxy: trust what the host trusts.
    host_bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if host_bundle.exists():
        shutil.copy(host_bundle, context / "docker" / "certs" / "host.crt")
    buildah("bud", "--isolation", "chroot", "-q", "-f", "docker/Dockerfile", "--build-arg",
            f"BASE_IMAGE={base}", "--build-arg", f"KVX_MLFLOW={mlflow}", "-t", tag, str(context))
    shutil.rmtree(context, ignore_errors=True)
    return tag


def project_context(project: Path, repo: Path, target: Path) -> Path:
    """A project's build context: the project, docker/project.Dockerfile and its .dockerignore."""
    shutil.copytree(project, target, ignore=NOT_IN_CONTEXT)
    shutil.copy(repo / "docker" / "project.Dockerfile", target / "Dockerfile")
    shutil.copy(repo / "docker" / "project.dockerignore", target / ".dockerignore")
    return target


def project_build_args(runtime: str, tag: str, context: Path) -> list[str]:
    """``buildah bud`` arguments of a project image FROM ``runtime`` (add "--layers" to cache)."""
    return ["--isolation", "chroot", "-q", "-f", "Dockerfile", "--build-arg", f"KVX_BASE_IMAGE={runtime}",
            "-t", tag, str(context)]


def build_project_image(buildah: Buildah, runtime: str, project: Path, repo: Path, workdir: Path,
                        tag: str = PROJECT) -> str:
    context = project_context(project, repo, workdir / "project-context" / "project")
    buildah("bud", *project_build_args(runtime, tag, context))
    return tag
