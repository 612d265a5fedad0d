"""``kvx-runtime airflow init`` / ``kedro airflow-k8s init``: the Airflow target's config file
(the registry names this command as the target's ``init``)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import click

from kvx_runtime.commands.command import KvxCommand
from kvx_runtime.commands.options import project_path_option
from kvx_runtime.commands.project import write_config_file
from kvx_runtime.errors import UsageError
from kvx_runtime.targets.registry import get_target

__all__ = ["AirflowInitRequest", "init_airflow", "init_command"]

_URL = re.compile(r"^https?://[^\s/?#]+(/[^\s?#]*)?$")


@dataclass(frozen=True)
class AirflowInitRequest:
    host: str
    project_path: str | None = None
    force: bool = False
    with_dockerfile: bool = False


def init_airflow(request: AirflowInitRequest) -> Path:
    """conf/base/airflow-k8s.yml (the plugin family's file name) for the Airflow at ``host``;
    returns it. A ``vertexai*`` or ``kubeflow*`` file in conf/base would win over it: refused."""
    root = Path(request.project_path or os.getcwd()).resolve()
    host = request.host.strip().rstrip("/")
    if not _URL.match(host):
        raise UsageError(f"HOST {request.host!r} is not an http(s) URL",
                         hint="the Airflow web server's URL, e.g. https://airflow.example.com")
    base = root / "conf" / "base"
    hiding = sorted(path.name for pattern in ("vertexai*", "kubeflow*") for path in base.glob(pattern)
                    if path.suffix in {".yml", ".yaml", ".json"} or path.is_dir())
    if hiding:
        raise UsageError(f"conf/base/{hiding[0]} exists: its settings win over an airflow-k8s.yml in the same "
                         "environment, so nothing was written",
                         hint=f"add host: {host} (and the Airflow keys, docs/airflow.md) to it instead")
    return write_config_file(root, get_target("airflow"), {"host": host}, request.force, request.with_dockerfile)


@click.command("init", cls=KvxCommand)
@click.argument("host")
@project_path_option
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.option("--with-dockerfile", is_flag=True,
              help="Also write a Dockerfile (FROM the kvx-runtime image) and .dockerignore.")
def init_command(host: str, project_path: str | None, force: bool, with_dockerfile: bool) -> None:
    """Write a commented conf/base/airflow-k8s.yml for the Airflow (or Cloud Composer) at HOST."""
    init_airflow(AirflowInitRequest(host, project_path, force, with_dockerfile))
