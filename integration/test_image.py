"""A real build of the base image and the example project's image with buildah, then a step
run inside the built image's root filesystem.

No registry is reachable here, so the Python base image is made locally: a Debian bookworm
root filesystem (debootstrap, with Debian's python3) imported into buildah. Selected with
``-m buildah`` (``make test-image``); skipped, with the reason, where buildah cannot run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import EXAMPLE_PROJECT, REPO

pytestmark = [pytest.mark.buildah, pytest.mark.slow]

#: A storage of the test session's own, deleted after the module: vfs copies every layer whole,
#: and the layer cache that repeated runs leave (untagged intermediate images, the working
#: containers of a failed build) would fill the disk.
STORAGE = Path(tempfile.gettempdir()) / f"kvx-buildah-{os.getpid()}"
BUILDAH = ["buildah", "--storage-driver", "vfs", "--root", str(STORAGE / "root"), "--runroot", str(STORAGE / "run")]
BASE = "localhost/kvx-test-python:bookworm"
RUNTIME = "localhost/kvx-runtime:kvx-test"
PROJECT = "localhost/spaceflights-kvx:kvx-test"
MIRROR = os.environ.get("KVX_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def _why_not() -> str | None:
    if shutil.which("buildah") is None:
        return "buildah is not installed (apt-get install buildah)"
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (apt-get install debootstrap)"
    if os.geteuid() != 0:
        return "building with --isolation chroot --storage-driver vfs needs root here"
    probe = subprocess.run([*BUILDAH, "images"], capture_output=True, text=True)
    # The probe runs at collection, also when these tests are deselected (make test): its
    # storage must not outlive it. Builds create it again.
    shutil.rmtree(STORAGE, ignore_errors=True)
    if probe.returncode != 0:
        return f"buildah cannot run: {probe.stderr.strip()[:200]}"
    return None


REASON = _why_not()
if REASON:
    pytestmark.append(pytest.mark.skip(reason=REASON))


@pytest.fixture(scope="module", autouse=True)
def private_storage() -> Iterator[Path]:
    yield STORAGE
    subprocess.run([*BUILDAH, "rm", "--all"], capture_output=True)
    subprocess.run([*BUILDAH, "rmi", "--all", "--force"], capture_output=True)
    shutil.rmtree(STORAGE, ignore_errors=True)


def buildah(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    result = subprocess.run([*BUILDAH, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"buildah {' '.join(args[:3])} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def python_base(tmp_path_factory) -> Iterator[str]:
    """Debian bookworm + python3 as a local base image (what python:3.11-slim provides)."""
    root = tmp_path_factory.mktemp("rootfs") / "rootfs"
    result = subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
         "bookworm", str(root), MIRROR], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    archive = root.parent / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname=".")
    container = buildah("from", "scratch").stdout.strip()
    try:
        buildah("add", container, str(archive), "/")
        buildah("config", "--cmd", "/bin/sh", container)
        buildah("commit", "-q", container, BASE)
    finally:
        subprocess.run([*BUILDAH, "rm", container], capture_output=True)
    yield BASE
    subprocess.run([*BUILDAH, "rmi", "-f", BASE], capture_output=True)


@pytest.fixture(scope="module")
def runtime_image(python_base: str, tmp_path_factory) -> Iterator[str]:
    context = tmp_path_factory.mktemp("runtime-context")
    shutil.copytree(REPO / "docker", context / "docker")
    shutil.copytree(REPO / "entrypoint", context / "entrypoint")
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                            str(context / "docker" / "wheels"), str(REPO)], capture_output=True, text=True)
    assert wheel.returncode == 0, wheel.stderr
    # This machine reaches PyPI through a TLS-inspecting proxy: trust what the host trusts.
    host_bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if host_bundle.exists():
        shutil.copy(host_bundle, context / "docker" / "certs" / "host.crt")
    buildah("bud", "--isolation", "chroot", "-q", "-f", "docker/Dockerfile", "--build-arg",
            f"BASE_IMAGE={python_base}", "-t", RUNTIME, str(context))
    yield RUNTIME
    subprocess.run([*BUILDAH, "rmi", "-f", RUNTIME], capture_output=True)


@pytest.fixture(scope="module")
def project_image(runtime_image: str, tmp_path_factory) -> Iterator[str]:
    context = tmp_path_factory.mktemp("project-context") / "project"
    shutil.copytree(EXAMPLE_PROJECT, context,
                    ignore=shutil.ignore_patterns(".kvx", "__pycache__", "08_reporting"))
    shutil.copy(REPO / "docker" / "project.Dockerfile", context / "Dockerfile")
    shutil.copy(REPO / "docker" / "project.dockerignore", context / ".dockerignore")
    buildah("bud", "--isolation", "chroot", "-q", "-f", "Dockerfile", "--build-arg",
            f"KVX_BASE_IMAGE={runtime_image}", "-t", PROJECT, str(context))
    yield PROJECT
    subprocess.run([*BUILDAH, "rmi", "-f", PROJECT], capture_output=True)


def run_in(image: str, *command: str, volumes: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    container = buildah("from", "-q", image).stdout.strip()
    mounts = [arg for volume in volumes for arg in ("--volume", volume)]
    try:
        return subprocess.run([*BUILDAH, "run", "--isolation", "chroot", *mounts, container, "--", *command],
                              capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run([*BUILDAH, "rm", container], capture_output=True)


def image_config(image: str) -> dict:
    import json

    return json.loads(buildah("inspect", "--type", "image", image).stdout)


def test_base_image_smoke_test_and_configuration(runtime_image: str) -> None:
    result = run_in(runtime_image, "/usr/local/bin/kvx-entrypoint", "doctor", "--runtime-only")
    assert result.returncode == 0, result.stderr
    assert "ok   runtime  kvx-runtime 0.1.0" in result.stdout and "kedro_mlflow" in result.stdout
    config = image_config(runtime_image)["OCIv1"]["config"]
    assert config["Entrypoint"] == ["/usr/local/bin/kvx-entrypoint"]
    assert config["User"] == "1000:1000"
    usage = run_in(runtime_image, "/usr/local/bin/kvx-entrypoint")
    assert usage.returncode == 2 and "usage: kvx-entrypoint" in usage.stderr
    # No build tools or pip caches in the final image.
    leftovers = run_in(runtime_image, "sh", "-c", "ls /root/.cache/pip /tmp/wheels /tmp/certs 2>/dev/null | wc -l")
    assert leftovers.stdout.strip() == "0"


def test_image_sizes_are_recorded_for_the_benchmarks(python_base: str, runtime_image: str, project_image: str) -> None:
    """The sizes reported in docs/images.md and docs/benchmarks.md (bench/run.py reads this file)."""
    import json

    listing = buildah("images", "--json").stdout
    sizes = {}
    for entry in json.loads(listing):
        for name in entry.get("names") or []:
            if name in {f"{python_base}", f"{runtime_image}", f"{project_image}"}:
                sizes[name] = str(entry["size"])  # as buildah prints it, e.g. "1.2 GB"
    assert set(sizes) == {python_base, runtime_image, project_image}
    target = REPO / "bench" / "results" / "image-sizes.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"base (Debian bookworm + python3)": sizes[python_base],
                                  "kvx-runtime base image (mlflow extra)": sizes[runtime_image],
                                  "example project image": sizes[project_image]}, indent=2) + "\n")


def test_rebuilding_after_a_code_change_is_timed_for_the_benchmarks(runtime_image: str, tmp_path: Path) -> None:
    """What code upload saves: a rebuild of the project image after a one-line code change,
    with a warm layer cache (bench/run.py reads the figure)."""
    import json
    import time

    context = tmp_path / "project"
    shutil.copytree(EXAMPLE_PROJECT, context, ignore=shutil.ignore_patterns(".kvx", "__pycache__", "08_reporting"))
    shutil.copy(REPO / "docker" / "project.Dockerfile", context / "Dockerfile")
    shutil.copy(REPO / "docker" / "project.dockerignore", context / ".dockerignore")
    tag = "localhost/kvx-rebuild:kvx-test"
    command = ["bud", "--isolation", "chroot", "--layers", "-q", "-f", "Dockerfile", "--build-arg",
               f"KVX_BASE_IMAGE={runtime_image}", "-t", tag, str(context)]
    try:
        buildah(*command)  # warms the layer cache
        nodes = context / "src" / "spaceflights_kvx" / "pipelines" / "data_processing" / "nodes.py"
        seconds = []
        for change in range(2):
            nodes.write_text(nodes.read_text() + f"\n# a code change ({change})\n")
            started = time.perf_counter()
            buildah(*command)
            seconds.append(round(time.perf_counter() - started, 2))
        # The timed rebuild must deliver the change to the package a step imports.
        installed = run_in(tag, "python3", "-c", "import inspect, spaceflights_kvx.pipelines.data_processing.nodes "
                           "as n; print(inspect.getsource(n))")
    finally:
        subprocess.run([*BUILDAH, "rmi", "-f", tag], capture_output=True)
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert "# a code change (1)" in installed.stdout
    target = REPO / "bench" / "results" / "image-rebuild.json"
    target.write_text(json.dumps({"seconds": seconds, "what": "buildah bud --layers after a one-line code change"},
                                 indent=2) + "\n")


def test_a_step_runs_inside_the_project_image(project_image: str) -> None:
    script = (
        "kvx-entrypoint exec-node --node data_processing.preprocess_companies_node --run-id img "
        "--storage-root /tmp/store --env base && "
        "ls /tmp/store/kedro-vertexai-temp/img && "
        "kvx-runtime doctor --env base --storage-root /tmp/store && id -u && cat .telemetry"
    )
    result = run_in(project_image, "sh", "-c", script)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "data_processing.preprocessed_companies.bin" in lines
    assert "ok   project  spaceflights_kvx (env base), 10 nodes in __default__" in lines
    assert "1000" in lines and "consent: false" in lines
    assert '"message": "step finished"' in result.stderr
    # Credentials and local config never reach the image.
    listing = run_in(project_image, "sh", "-c", "ls conf; ls conf/local 2>&1 | head -1")
    assert "local" not in listing.stdout.split()[:3]


def test_code_upload_runs_changed_code_in_the_built_image(project_image: str, tmp_path: Path) -> None:
    """The image stays as built; the workspace's changed code and parameter reach the step
    through a code archive. A tampered archive, an escaping member and changed requirements
    are refused before anything runs."""
    import gzip
    import hashlib
    import io

    from kvx_runtime.code_upload import build_archive, upload_archive

    workspace = tmp_path / "workspace"
    shutil.copytree(EXAMPLE_PROJECT, workspace, ignore=shutil.ignore_patterns(".kvx", "__pycache__", "08_reporting"))
    nodes = workspace / "src" / "spaceflights_kvx" / "pipelines" / "data_processing" / "nodes.py"
    nodes.write_text(nodes.read_text() + (
        "\n\ndef preprocess_companies_announced(companies, title):\n"
        "    import logging\n"
        "    logging.getLogger('spaceflights_kvx').warning('new code says: %s', title)\n"
        "    return preprocess_companies(companies)\n"))
    pipeline = nodes.with_name("pipeline.py")
    text = pipeline.read_text()
    text = text.replace("preprocess_companies, preprocess_shuttles",
                        "preprocess_companies, preprocess_companies_announced, preprocess_shuttles")
    text = text.replace('Node(preprocess_companies, "companies",',
                        'Node(preprocess_companies_announced, ["companies", "params:reporting.title"],')
    text = text.replace('        outputs={"model_input_table", "preprocessed_shuttles"},\n',
                        '        outputs={"model_input_table", "preprocessed_shuttles"},\n'
                        '        parameters={"params:reporting.title"},\n')
    pipeline.write_text(text)
    parameters = workspace / "conf" / "base" / "parameters.yml"
    parameters.write_text(parameters.read_text().replace("title: Spaceflights price model",
                                                         "title: Shipped without a rebuild"))
    store = tmp_path / "store"
    store.mkdir(mode=0o777)
    reference = upload_archive(build_archive(workspace, "spaceflights_kvx"), str(store))
    inside = reference.replace(str(store), "/mnt/store")
    volumes = (f"{store}:/mnt/store",)

    def step(code: str) -> subprocess.CompletedProcess:
        return run_in(project_image, "kvx-entrypoint", "exec-node", "--node",
                      "data_processing.preprocess_companies_node", "--run-id", "code", "--env", "base",
                      "--storage-root", "/tmp/store", "--code", code, volumes=volumes)

    result = step(inside)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "new code says: Shipped without a rebuild" in result.stderr

    tampered = store / "kvx-code" / "tampered.tar.gz"
    data = bytearray((store / "kvx-code" / reference.split("/")[-1].split("#")[0]).read_bytes())
    data[-30] ^= 0xFF
    tampered.write_bytes(bytes(data))
    refused = step(f"/mnt/store/kvx-code/tampered.tar.gz#sha256={reference.rsplit('=', 1)[1]}")
    assert refused.returncode == 2 and "refused, nothing was run" in refused.stderr
    assert '"node started"' not in refused.stderr

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("../escape.py")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    evil = gzip.compress(raw.getvalue())
    (store / "kvx-code" / "evil.tar.gz").write_bytes(evil)
    escaping = step(f"/mnt/store/kvx-code/evil.tar.gz#sha256={hashlib.sha256(evil).hexdigest()}")
    assert escaping.returncode == 2 and "would land outside its directory" in escaping.stderr

    (workspace / "requirements.txt").write_text((workspace / "requirements.txt").read_text() + "requests>=2\n")
    drifted = upload_archive(build_archive(workspace, "spaceflights_kvx"), str(store)).replace(str(store), "/mnt/store")
    result = step(drifted)
    assert result.returncode == 2 and "requirements changed since the image was built" in result.stderr
