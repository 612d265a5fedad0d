"""``kvx-runtime init`` / ``kedro vertexai init``: Vertex AI's config file (the registry names
this command as the target's ``init``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import click

from kvx_runtime.commands.command import KvxCommand
from kvx_runtime.commands.options import project_path_option
from kvx_runtime.commands.project import write_config_file
from kvx_runtime.targets.registry import get_target

__all__ = ["VertexInitRequest", "init_command", "init_vertex"]


@dataclass(frozen=True)
class VertexInitRequest:
    project_id: str
    region: str
    project_path: str | None = None
    force: bool = False
    with_dockerfile: bool = False


def init_vertex(request: VertexInitRequest) -> Path:
    """conf/base/vertexai.yml for the Google Cloud project and region; returns it."""
    root = Path(request.project_path or os.getcwd()).resolve()
    return write_config_file(root, get_target("vertex"), {"project_id": request.project_id, "region": request.region},
                             request.force, request.with_dockerfile)


@click.command("init", cls=KvxCommand)
@click.argument("project_id")
@click.argument("region")
@project_path_option
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.option("--with-dockerfile", is_flag=True,
              help="Also write a Dockerfile (FROM the kvx-runtime image) and .dockerignore.")
def init_command(project_id: str, region: str, project_path: str | None, force: bool, with_dockerfile: bool) -> None:
    """Write a commented conf/base/vertexai.yml for PROJECT_ID and REGION."""
    init_vertex(VertexInitRequest(project_id, region, project_path, force, with_dockerfile))
