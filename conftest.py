"""Fixtures shared by the fast tests (tests/) and the end-to-end tests (integration/).

Servers are real and local: the GCS emulator (PyPI gcp-storage-emulator) and an S3 server
(moto's server mode, PyPI moto[server]) on 127.0.0.1, each started once per test session on a
free port and stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
EXAMPLE_PROJECT = REPO / "integration" / "example_project"

# Before anything imports gcsfs: without it every gcsfs call against the emulator hangs 60 s.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
# No test may talk to anything but 127.0.0.1: Kedro telemetry off everywhere.
os.environ["KEDRO_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "1"


#: HTTP(S) that is not for 127.0.0.1 goes to a port nothing listens on. Libraries call Google on
#: their own (google-auth >= 2.62 looks up every service account's Regional Access Boundary at
#: iamcredentials.googleapis.com, whatever endpoint the request itself was for).
LOOPBACK_ONLY = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
                 "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
                 "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


@pytest.fixture(autouse=True)
def _loopback_only(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test and the processes it starts (image builds fetch base packages: exempt)."""
    if request.node.get_closest_marker("buildah") is None:
        for key, value in LOOPBACK_ONLY.items():
            monkeypatch.setenv(key, value)


@pytest.fixture(autouse=True)
def _fsspec_s3_defaults_per_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsspec's process-wide s3 defaults as each test found them: opening a project in-process
    applies its run_config.s3 there (kubeflow.yml's MinIO endpoint, say), which outranks the
    AWS variables of every later test's s3 filesystem in this worker."""
    import copy

    import fsspec.config

    monkeypatch.setitem(fsspec.config.conf, "s3", copy.deepcopy(fsspec.config.conf.get("s3", {})))


@pytest.fixture(autouse=True)
def _redacted_secrets_per_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """The secrets logging redacts as each test found them: a value one test registered (a
    provider's "proj") would otherwise be cut out of every later test's messages in this worker."""
    from kvx_runtime import log

    monkeypatch.setattr(log, "_SECRETS", set(log._SECRETS))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep ``--dist loadgroup`` grouping on pytest 9.2, whose nodes take their id from a
    structured ``_id``: pytest-xdist 3.8 still marks a test's group by rewriting ``_nodeid`` (to
    ``<id>@<group>``), which pytest 9.2 no longer reads, so every ``xdist_group`` was ignored and
    each worker started its own Airflow deployment (pytest-xdist issue 1386)."""
    if not getattr(config.option, "loadgroup", False):  # set on xdist's workers only
        return
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # pytest before 9.2: xdist's rewrite works as it is
        return
    for item in items:
        marked = item.__dict__.get("_nodeid")
        if isinstance(marked, str) and marked != item.nodeid:
            item._id = NodeId.parse(marked)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not listen on port {port} within {timeout}s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class GcsEmulator:
    def __init__(self, port: int, bucket: str) -> None:
        self.port = port
        self.bucket = bucket
        self.host = f"http://127.0.0.1:{port}"

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.host, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def filesystem(self):
        import gcsfs

        return gcsfs.GCSFileSystem(endpoint_url=self.host, token="anon", skip_instance_cache=True)


@pytest.fixture(scope="session")
def gcs_emulator_process() -> Iterator[GcsEmulator]:
    port = free_port()
    bucket = "kvx-test"
    executable = Path(sys.executable).with_name("gcp-storage-emulator")
    process = subprocess.Popen(
        [str(executable), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory",
         "--default-bucket", bucket],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process)
        yield GcsEmulator(port, bucket)
    finally:
        stop(process)


@pytest.fixture
def gcs_emulator(gcs_emulator_process: GcsEmulator, monkeypatch: pytest.MonkeyPatch) -> GcsEmulator:
    """The emulator, named in this test's environment (set per test, never left behind: a
    variable set once for the session is lost to the first test that monkeypatches it)."""
    for key, value in gcs_emulator_process.env.items():
        monkeypatch.setenv(key, value)
    return gcs_emulator_process


class S3Server:
    """moto's S3 server: it checks request shapes and keeps objects, multipart uploads included."""

    def __init__(self, port: int, bucket: str) -> None:
        self.port = port
        self.bucket = bucket
        self.url = f"http://127.0.0.1:{port}"

    @property
    def env(self) -> dict[str, str]:
        """What a step needs to reach it: the standard AWS variables."""
        return {"AWS_ENDPOINT_URL": self.url, **S3_CREDENTIALS}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.url, key=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                 secret=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


#: Throwaway credentials for the local S3 server (moto accepts any); the secret is long enough
#: for the tests that check it never appears in logs.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kvx-test-access-key", "AWS_SECRET_ACCESS_KEY": "kvx-test-secret-8f3e1c",
                  "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server_process() -> Iterator[S3Server]:
    port = free_port()
    executable = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen([str(executable), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process)
        server = S3Server(port, "kvx-test")
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        stop(process)


@pytest.fixture
def s3_server(s3_server_process: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server, named in this test's environment by the standard AWS variables (per test, as
    the GCS emulator)."""
    for key, value in s3_server_process.env.items():
        monkeypatch.setenv(key, value)
    return s3_server_process


def copy_example_project(target: Path) -> Path:
    """A copy of the example project at ``target``, without what runs of it leave behind."""
    shutil.copytree(EXAMPLE_PROJECT, target, ignore=shutil.ignore_patterns(".kvx", "__pycache__", "08_reporting",
                                                                          "mlruns"))
    return target


@pytest.fixture
def example_project(tmp_path: Path) -> Path:
    """A private copy of the example project (outputs and conf edits stay in the test)."""
    return copy_example_project(tmp_path / "example_project")


_STANDARD_RECORD_KEYS = set(vars(__import__("logging").makeLogRecord({}))) | {"message", "asctime"}


def logged_text(caplog) -> str:
    """Every captured record as "message key=value ...", extras included."""
    lines = []
    for record in caplog.records:
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD_RECORD_KEYS}
        lines.append(" ".join([record.getMessage(), *(f"{k}={v!r}" for k, v in extras.items())]))
    return "\n".join(lines)


def conf_archive(tmp_path: Path, files: dict[str, str], name: str = "conf-proj.tar.gz") -> str:
    """A configuration archive as ``kedro package`` makes it (``tar --directory=<parent> conf``:
    the environments in one top-level ``conf/`` folder), or a zip of the same: ``files`` maps
    paths under ``conf/`` (``base/vertexai.yml``) to their text. Its path."""
    import tarfile
    import zipfile

    folder = tmp_path / "packed" / "conf"
    for relative, text in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    archive = str(tmp_path / name)
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w") as packed:
            for path in sorted(folder.rglob("*")):
                packed.write(path, path.relative_to(folder.parent).as_posix())
    else:
        with tarfile.open(archive, "w:gz") as packed:
            packed.add(folder, arcname="conf")
    return archive


def inside_kvx_runtime(probe_body: str, tmp_path: Path) -> list[str]:
    """Run ``probe_body`` (the body of a function, indented by four spaces) inside a real
    ``kvx-runtime`` process (its entry point, as the console script starts it) as the command
    line starts, before any command: what the process set up at its start is seen there. Its
    stdout lines (the command's own output and library logs among them)."""
    (tmp_path / "requirements.txt").write_text("kedro\n")
    script = ("import sys\n"
              "import kvx_runtime.cli\n"
              f"def probe():\n{probe_body}"
              "kvx_runtime.cli.configure_logging = probe\n"
              f"sys.argv = ['kvx-runtime', 'fingerprint', '--project-path', {str(tmp_path)!r}]\n"
              "from kvx_runtime.entry import main\n"
              "main()\n")
    return fresh_python(script)[0]


def fresh_python(script: str, cwd: Path | None = None) -> tuple[list[str], str]:
    """Run ``script`` in a new interpreter (what a process imports is only seen from its start):
    its stdout lines and its stderr; a failure fails the test with stderr's end."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.splitlines(), result.stderr
