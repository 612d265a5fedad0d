"""``kvx-runtime airflow init`` / ``kedro airflow-k8s init``: the Airflow target's config file
(the registry names this command as the target's ``init``), and with ``--cloud-env`` a Kedro env
putting the catalog's local datasets under the storage root."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import click

from kvx_runtime.commands.command import KvxCommand
from kvx_runtime.commands.options import init_options
from kvx_runtime.commands.project import init_target
from kvx_runtime.errors import UsageError
from kvx_runtime.targets.registry import get_target

__all__ = ["AirflowInitRequest", "init_airflow", "init_command"]

_URL = re.compile(r"^https?://[^\s/?#]+(/[^\s?#]*)?$")


@dataclass(frozen=True)
class AirflowInitRequest:
    host: str | None
    project_path: str | None = None
    force: bool = False
    with_dockerfile: bool = False
    #: ``--cloud-env NAME``: also (or, without HOST, only) the env overlay.
    cloud_env: str | None = None
    per_run: bool = False
    group: str = "kvx-runtime airflow"
    #: ``--with-github-actions``: also .github/workflows/ (:mod:`.ci_workflows`), authenticating
    #: to Google Cloud as ``github_auth`` says.
    with_github_actions: bool = False
    github_auth: str = "workload-identity"


def init_airflow(request: AirflowInitRequest) -> list[Path]:
    """conf/base/airflow-k8s.yml (the plugin family's file name) for the Airflow at ``host``,
    and the cloud env when asked; returns the files written. A ``vertexai*`` or ``kubeflow*``
    file in conf/base would win over it: refused."""

    def config_values(root: Path) -> dict[str, str]:
        from kvx_runtime.config.files import files_read_instead
        from kvx_runtime.project import conf_folder_of

        host = str(request.host).strip().rstrip("/")
        if not _URL.match(host):
            raise UsageError(f"HOST {request.host!r} is not an http(s) URL",
                             hint="the Airflow web server's URL, e.g. https://airflow.example.com")
        base = f"{conf_folder_of(root)}/base"
        hiding = files_read_instead(root / base, "airflow")
        if hiding:
            raise UsageError(f"{base}/{hiding[0]} exists: its settings win over an airflow-k8s.yml in the same "
                             "environment, so nothing was written",
                             hint=f"add host: {host} (and the Airflow keys, docs/airflow.md) to it instead")
        return {"host": host}

    return init_target(get_target("airflow"), request, {"HOST": request.host}, config_values)


@click.command("init", cls=KvxCommand)
@click.argument("host", required=False)
@init_options
@click.pass_context
def init_command(ctx: click.Context, host: str | None, project_path: str | None, force: bool, with_dockerfile: bool,
                 cloud_env: str | None, per_run: bool,
                 with_github_actions: bool, github_auth: str) -> None:
    """Write a commented conf/base/airflow-k8s.yml for the Airflow (or Cloud Composer) at HOST
    (with --cloud-env NAME also conf/NAME/catalog.yml; HOST may then be left out)."""
    group = ctx.parent.command_path if ctx.parent is not None else "kvx-runtime airflow"
    init_airflow(AirflowInitRequest(host, project_path, force, with_dockerfile, cloud_env, per_run, group,
                                    with_github_actions, github_auth))
