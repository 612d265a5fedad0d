"""``kvx-runtime init`` / ``kedro vertexai init``: Vertex AI's config file (the registry names
this command as the target's ``init``), and with ``--cloud-env`` a Kedro env putting the
catalog's local datasets under the storage root."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import click

from kvx_runtime.commands.command import KvxCommand
from kvx_runtime.commands.options import cloud_env_options, project_path_option
from kvx_runtime.commands.project import CloudEnvOptions, InitRequest, init_arguments_given, write_init
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


def init_vertex(request: VertexInitRequest) -> list[Path]:
    """conf/base/vertexai.yml for the Google Cloud project and region, and the cloud env when
    asked; returns the files written."""
    root = Path(request.project_path or os.getcwd()).resolve()
    given = init_arguments_given({"PROJECT_ID": request.project_id, "REGION": request.region},
                                 request.cloud_env, request.per_run)
    values = {"project_id": str(request.project_id), "region": str(request.region)} if given else None
    cloud_env = CloudEnvOptions(request.cloud_env, request.per_run) if request.cloud_env is not None else None
    return write_init(InitRequest(root, get_target("vertex"), values, request.force, request.with_dockerfile,
                                  cloud_env, request.group))


@click.command("init", cls=KvxCommand)
@click.argument("project_id", required=False)
@click.argument("region", required=False)
@project_path_option
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.option("--with-dockerfile", is_flag=True,
              help="Also write a Dockerfile (FROM the kvx-runtime image) and .dockerignore.")
@cloud_env_options
@click.pass_context
def init_command(ctx: click.Context, project_id: str | None, region: str | None, project_path: str | None,
                 force: bool, with_dockerfile: bool, cloud_env: str | None, per_run: bool) -> None:
    """Write a commented conf/base/vertexai.yml for PROJECT_ID and REGION (with --cloud-env NAME
    also conf/NAME/catalog.yml; PROJECT_ID and REGION may then be left out)."""
    group = ctx.parent.command_path if ctx.parent is not None else "kvx-runtime"
    init_vertex(VertexInitRequest(project_id, region, project_path, force, with_dockerfile, cloud_env, per_run, group))
