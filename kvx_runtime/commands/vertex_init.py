"""``kvx-runtime init`` / ``kedro vertexai init``: Vertex AI's config file (the registry names
this command as the target's ``init``), and with ``--cloud-env`` a Kedro env putting the
catalog's local datasets under the storage root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from kvx_runtime.commands.command import KvxCommand
from kvx_runtime.commands.options import init_options
from kvx_runtime.commands.project import init_target
from kvx_runtime.targets.registry import get_target

__all__ = ["VertexInitRequest", "init_command", "init_vertex"]


@dataclass(frozen=True)
class VertexInitRequest:
    project_id: str | None
    region: str | None
    project_path: str | None = None
    force: bool = False
    with_dockerfile: bool = False
    #: ``--cloud-env NAME``: also (or, without PROJECT_ID and REGION, only) the env overlay.
    cloud_env: str | None = None
    per_run: bool = False
    group: str = "kvx-runtime"
    #: ``--with-github-actions``: also .github/workflows/ (:mod:`.ci_workflows`), authenticating
    #: to Google Cloud as ``github_auth`` says.
    with_github_actions: bool = False
    github_auth: str = "workload-identity"


def init_vertex(request: VertexInitRequest) -> list[Path]:
    """conf/base/vertexai.yml for the Google Cloud project and region, and the cloud env when
    asked; returns the files written."""
    return init_target(get_target("vertex"), request, {"PROJECT_ID": request.project_id, "REGION": request.region},
                       lambda _: {"project_id": str(request.project_id), "region": str(request.region)})


@click.command("init", cls=KvxCommand)
@click.argument("project_id", required=False)
@click.argument("region", required=False)
@init_options
@click.pass_context
def init_command(ctx: click.Context, project_id: str | None, region: str | None, project_path: str | None,
                 force: bool, with_dockerfile: bool, cloud_env: str | None, per_run: bool,
                 with_github_actions: bool, github_auth: str) -> None:
    """Write a commented conf/base/vertexai.yml for PROJECT_ID and REGION (with --cloud-env NAME
    also conf/NAME/catalog.yml; PROJECT_ID and REGION may then be left out)."""
    group = ctx.parent.command_path if ctx.parent is not None else "kvx-runtime"
    init_vertex(VertexInitRequest(project_id, region, project_path, force, with_dockerfile, cloud_env, per_run, group,
                                  with_github_actions, github_auth))
