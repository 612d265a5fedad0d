"""A real build of the base image (its default, slim flavour: mlflow-skinny) and the example
project's image with buildah, then steps run inside the built images' root filesystems, one
attached to a real MLflow server (integration/images.py builds them). The full-mlflow flavour
is built by ``bench/run.py --only image`` (make bench-image), which records every size: it
would add two to three minutes here (its build took 110 to 190 s, the slim one's 80 s).

Selected with ``-m buildah`` (``make test-image``); skipped, with the reason, where buildah
cannot run. The images' sizes and rebuild times are benchmarks: ``bench/run.py --only image``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import EXAMPLE_PROJECT, REPO
from integration.images import (
    BASE_IMAGE_MAX_MB,
    NOT_IN_CONTEXT,
    PROJECT_IMAGE_MAX_MB,
    Buildah,
    build_project_image,
    build_python_base,
    build_runtime_image,
)

pytestmark = [pytest.mark.buildah, pytest.mark.slow]

#: A storage of the test session's own, deleted after the module.
BUILDAH = Buildah(Path(tempfile.gettempdir()) / f"kvx-buildah-{os.getpid()}")
# The probe runs at collection, also when these tests are deselected (make test).
REASON = BUILDAH.why_not()
if REASON:
    pytestmark.append(pytest.mark.skip(reason=REASON))


@pytest.fixture(scope="module", autouse=True)
def private_storage() -> Iterator[Path]:
    yield BUILDAH.storage
    BUILDAH.remove_everything()


@pytest.fixture(scope="module")
def python_base(tmp_path_factory) -> Iterator[str]:
    image = build_python_base(BUILDAH, tmp_path_factory.mktemp("rootfs"))
    yield image
    BUILDAH.quietly("rmi", "-f", image)


@pytest.fixture(scope="module")
def runtime_image(python_base: str, tmp_path_factory) -> Iterator[str]:
    image = build_runtime_image(BUILDAH, python_base, REPO, tmp_path_factory.mktemp("runtime"))
    yield image
    BUILDAH.quietly("rmi", "-f", image)


@pytest.fixture(scope="module")
def project_image(runtime_image: str, tmp_path_factory) -> Iterator[str]:
    image = build_project_image(BUILDAH, runtime_image, EXAMPLE_PROJECT, REPO, tmp_path_factory.mktemp("project"))
    yield image
    BUILDAH.quietly("rmi", "-f", image)


def test_base_image_smoke_test_and_configuration(runtime_image: str) -> None:
    with BUILDAH.container(runtime_image) as container:  # read-only checks: one container
        result = BUILDAH.run(container, "/usr/local/bin/kvx-entrypoint", "doctor", "--runtime-only")
        usage = BUILDAH.run(container, "/usr/local/bin/kvx-entrypoint")
        # No build tools or pip caches in the final image.
        leftovers = BUILDAH.run(container, "sh", "-c", "ls /root/.cache/pip /tmp/wheels /tmp/certs 2>/dev/null | wc -l")
    assert result.returncode == 0, result.stderr
    assert "ok   runtime  kvx-runtime 0.1.0" in result.stdout and "kedro_mlflow (mlflow-skinny 3." in result.stdout
    config = BUILDAH.image_config(runtime_image)["OCIv1"]["config"]
    assert config["Entrypoint"] == ["/usr/local/bin/kvx-entrypoint"]
    assert config["User"] == "1000:1000"
    assert usage.returncode == 2 and "usage: kvx-entrypoint" in usage.stderr
    assert leftovers.stdout.strip() == "0"


def test_the_slim_base_image_tracks_with_mlflow_skinny_alone(runtime_image: str) -> None:
    """kedro-mlflow and MLflow's client import; the server (Flask) and full mlflow are not there,
    and the environment is consistent for pip (kedro-mlflow's installed metadata names skinny)."""
    imports = ("import kedro_mlflow, mlflow, mlflow.tracking, kvx_runtime.mlflow.pipeline_run; "
               "from kedro_mlflow.framework.hooks import MlflowHook; print('imported', mlflow.__version__)")
    with BUILDAH.container(runtime_image) as container:
        imported = BUILDAH.run(container, "python3", "-c", imports)
        server = BUILDAH.run(container, "python3", "-c", "import mlflow.server")
        shown = BUILDAH.run(container, "python3", "-m", "pip", "show", "mlflow", "mlflow-skinny", "kedro-mlflow")
        checked = BUILDAH.run(container, "python3", "-m", "pip", "check")
        slimmed = BUILDAH.run(container, "python3", "-c", SLIMMED_CHECK, "numpy", "pandas")
        tools = BUILDAH.run(container, "python3", "-c", BUILD_TOOLS_CHECK)
        positions = BUILDAH.run(container, "python3", "-c", POSITIONS_CHECK, "kedro.pipeline.node", "kvx_runtime.cli")
    assert imported.returncode == 0 and "imported 3." in imported.stdout, imported.stderr[-3000:]
    assert server.returncode == 1 and "No module named 'flask'" in server.stderr, server.stderr[-2000:]
    names = [line.split(": ", 1)[1] for line in shown.stdout.splitlines() if line.startswith("Name: ")]
    assert names == ["mlflow-skinny", "kedro_mlflow"] or names == ["mlflow-skinny", "kedro-mlflow"], shown.stdout
    assert "Package(s) not found: mlflow" in shown.stderr
    assert "Requires: kedro, mlflow-skinny, pydantic" in shown.stdout
    assert checked.returncode == 0 and "No broken requirements found." in checked.stdout, checked.stdout
    assert slimmed.stdout.split() == ["numpy:no-tests", "pandas:no-tests", "symbols:none"], slimmed.stderr[-2000:]
    assert tools.stdout.split() == ["setuptools:absent", "strip:absent", "pip-bytecode:0", "stubs:0", "cython:0"], \
        tools.stderr[-2000:]
    # Bytecode compiled, without the column positions of ^^^ markers (smaller; lines still shown).
    assert positions.stdout.split() == ["kedro.pipeline.node:lines", "kvx_runtime.cli:lines"], positions.stderr[-2000:]
    size = BUILDAH.megabytes(runtime_image)
    assert size <= BASE_IMAGE_MAX_MB, f"the slim base image is {size:.0f} MB"


#: Run in an image with package names: whether each ships its test suite still, then whether
#: any extension module of the runtime's environment still carries debug info or a static
#: symbol table.
SLIMMED_CHECK = """
import importlib, pathlib, sys, sysconfig
from kvx_runtime.image_slim import has_debug_info, has_symbol_table
for name in sys.argv[1:]:
    root = pathlib.Path(importlib.import_module(name).__file__).parent
    print(f"{name}:{'tests' if any(root.rglob('tests')) else 'no-tests'}")
site = pathlib.Path(sysconfig.get_paths()["platlib"])
left = [str(p) for p in site.rglob("*.so") if ".libs" not in str(p) and (has_debug_info(p) or has_symbol_table(p))]
print("symbols:" + (",".join(left) or "none"))
"""

#: Run in an image: whether setuptools and binutils' strip are installed, how many bytecode
#: files pip has (a build tool: none) and how many type stubs and Cython sources are left.
BUILD_TOOLS_CHECK = """
import importlib.util, pathlib, shutil, sysconfig
site = pathlib.Path(sysconfig.get_paths()["purelib"])
print("setuptools:" + ("present" if importlib.util.find_spec("setuptools") else "absent"))
print("strip:" + ("present" if shutil.which("strip") else "absent"))
print(f"pip-bytecode:{sum(1 for _ in (site / 'pip').rglob('*.pyc'))}")
print(f"stubs:{sum(1 for _ in site.rglob('*.pyi'))}")
print(f"cython:{sum(1 for p in site.rglob('*.p[yx][xdi]') if p.suffix in ('.pyx', '.pxd', '.pxi'))}")
"""

#: Run in an image with module names: whether each one's installed bytecode holds the column
#: positions of tracebacks' ^^^ markers ("columns") or lines only ("lines").
POSITIONS_CHECK = """
import importlib.util, marshal, sys
def codes(code):
    yield code
    for constant in code.co_consts:
        if hasattr(constant, "co_positions"):
            yield from codes(constant)
for name in sys.argv[1:]:
    with open(importlib.util.find_spec(name).cached, "rb") as file:
        module = marshal.loads(file.read()[16:])
    columns = any(start is not None for code in codes(module) for _, _, start, _ in code.co_positions())
    print(f"{name}:{'columns' if columns else 'lines'}")
"""


def test_a_step_runs_inside_the_project_image(project_image: str) -> None:
    script = (
        "kvx-entrypoint exec-node --node data_processing.preprocess_companies_node --run-id img "
        "--storage-root /tmp/store --env base && "
        "ls /tmp/store/kedro-vertexai-temp/img && "
        "kvx-runtime doctor --env base --storage-root /tmp/store && id -u && cat .telemetry"
    )
    with BUILDAH.container(project_image) as container:
        result = BUILDAH.run(container, "sh", "-c", script)
        # Credentials and local config never reach the image.
        listing = BUILDAH.run(container, "sh", "-c", "ls conf; ls conf/local 2>&1 | head -1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "data_processing.preprocessed_companies.bin" in lines
    assert "ok   project  spaceflights_kvx (env base), 10 nodes in __default__" in lines
    assert "1000" in lines and "consent: false" in lines
    assert '"message": "step finished"' in result.stderr
    assert "local" not in listing.stdout.split()[:3]


def test_project_requirements_naming_kedro_mlflow_keep_mlflow_skinny(project_image: str, runtime_image: str) -> None:
    """The example project's requirements.txt names kedro-mlflow: installing it FROM the slim
    base image left kedro-mlflow as it was, without full mlflow."""
    requirements = (EXAMPLE_PROJECT / "requirements.txt").read_text()
    assert "kedro-mlflow" in requirements  # what this test is about
    with BUILDAH.container(project_image) as container:
        shown = BUILDAH.run(container, "python3", "-m", "pip", "show", "mlflow", "mlflow-skinny")
        flask = BUILDAH.run(container, "python3", "-c", "import flask")
        slimmed = BUILDAH.run(container, "python3", "-c", SLIMMED_CHECK, "sklearn", "scipy")
        tools = BUILDAH.run(container, "python3", "-c", BUILD_TOOLS_CHECK)
        positions = BUILDAH.run(container, "python3", "-c", POSITIONS_CHECK, "scipy.linalg._basic",
                                "spaceflights_kvx.pipelines.data_processing.nodes")
        dpkg = BUILDAH.run(container, "sh", "-c", "dpkg -s binutils > /dev/null 2>&1 && echo binutils:installed "
                           "|| echo binutils:absent; ls /var/lib/apt/lists | wc -l")
        packages = BUILDAH.run(container, "dpkg-query", "-W", "-f", "${Package}\n")
    with BUILDAH.container(runtime_image) as container:
        base_packages = BUILDAH.run(container, "dpkg-query", "-W", "-f", "${Package}\n")
    assert "Package(s) not found: mlflow" in shown.stderr and "Name: mlflow-skinny" in shown.stdout, shown.stderr
    assert flask.returncode == 1
    # The project's own requirements were slimmed too: test suites, Cython sources, symbols
    # (binutils' strip installed for that layer, and gone with apt's lists once it ran).
    assert slimmed.stdout.split() == ["sklearn:no-tests", "scipy:no-tests", "symbols:none"], slimmed.stderr[-2000:]
    assert dpkg.stdout.split() == ["binutils:absent", "0"], dpkg.stdout
    # Exactly what that install added went (its dependencies too), nothing the base image had.
    assert packages.stdout.split() and sorted(packages.stdout.split()) == sorted(base_packages.stdout.split())
    # pip ran without writing its own bytecode into the project's layer.
    assert tools.stdout.split() == ["setuptools:absent", "strip:absent", "pip-bytecode:0", "stubs:0", "cython:0"], \
        tools.stderr[-2000:]
    # Requirements' bytecode without column positions; the project's own code keeps them.
    assert positions.stdout.split() == [
        "scipy.linalg._basic:lines", "spaceflights_kvx.pipelines.data_processing.nodes:columns",
    ], positions.stderr[-2000:]
    size = BUILDAH.megabytes(project_image)
    assert size <= PROJECT_IMAGE_MAX_MB, f"the example project image is {size:.0f} MB"


def test_a_step_attached_to_mlflow_inside_the_project_image(project_image: str, mlflow_server,
                                                          tmp_path: Path) -> None:
    """mlflow-start, a step and mlflow-end inside the image (mlflow-skinny), against a real MLflow
    server on 127.0.0.1 (buildah's chroot isolation shares the host's network). The example
    project's MLflow configuration is in conf/local, which the image leaves out: it is mounted."""
    conf = tmp_path / "conf"
    conf.mkdir()
    shutil.copy(EXAMPLE_PROJECT / "conf" / "local" / "mlflow.yml", conf / "mlflow.yml")
    job, node = "image-job", "data_processing.preprocess_companies_node"
    status = {"state": "SUCCEEDED", "pipelineJobResourceName": f"projects/p/locations/l/pipelineJobs/{job}",
              "pipelineTaskName": "exit-handler-1"}
    script = (
        "set -e; mkdir -p conf/local && cp /mnt/conf/mlflow.yml conf/local/; "
        f"kvx-entrypoint mlflow-start --run-id {job}-uuid --job-name {job} --output /tmp/mlflow-run; "
        f"kvx-entrypoint exec-node --node {node} --run-id {job}-uuid --job-name {job} --storage-root /tmp/store "
        '--mlflow-run-id "$(cat /tmp/mlflow-run)"; '
        f"kvx-entrypoint mlflow-end --job-name {job} --final-status '{json.dumps(status)}'"
    )
    with BUILDAH.container(project_image) as container:
        result = BUILDAH.run(container, "sh", "-c", script, volumes=(f"{conf}:/mnt/conf:ro",),
                             env={"KEDRO_ENV": "local", "KEDRO_CONFIG_MLFLOW_TRACKING_URI": mlflow_server.url})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("spaceflights-kvx")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.vertexai_job_name = '{job}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = client.get_run(runs[0].info.run_id)
    assert run.info.run_name == job and run.info.status == "FINISHED"
    assert run.data.tags["kvx.last_node"] == node and run.data.tags["kvx.final_state"] == "SUCCEEDED"
    assert run.data.tags["vertexai_run_id"] == f"{job}-uuid"


@pytest.fixture
def project_container(project_image: str) -> Iterator[str]:
    with BUILDAH.container(project_image) as container:
        yield container


def test_code_upload_runs_changed_code_in_the_built_image(project_container: str, tmp_path: Path) -> None:
    """The image stays as built; the workspace's changed code and parameter reach the step
    through a code archive. A tampered archive, an escaping member and changed requirements
    are refused before anything runs."""
    import gzip
    import hashlib
    import io
    import itertools

    from kvx_runtime.code_upload import build_archive, upload_archive

    workspace = tmp_path / "workspace"
    shutil.copytree(EXAMPLE_PROJECT, workspace, ignore=NOT_IN_CONTEXT)
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

    steps = itertools.count()

    def step(code: str) -> subprocess.CompletedProcess:
        # Each with a code cache of its own, empty as in a fresh container: an archive unpacked by
        # one step must not be found by the next (one container: vfs copies the image per container).
        return BUILDAH.run(project_container, "kvx-entrypoint", "exec-node", "--node",
                           "data_processing.preprocess_companies_node", "--run-id", "code", "--env", "base",
                           "--storage-root", "/tmp/store", "--code", code, volumes=volumes,
                           env={"KVX_CODE_CACHE": f"/tmp/kvx-code-{next(steps)}"})

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
