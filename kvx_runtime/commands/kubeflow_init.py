"""``kvx-runtime kfp init`` / ``kedro kubeflow init``: Kubeflow Pipelines' config file (the
registry names this command as the target's ``init``), and with ``--cloud-env`` a Kedro env
putting the catalog's local datasets under the storage root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from kvx_runtime.commands.command import KvxCommand
from kvx_runtime.commands.options import init_options
from kvx_runtime.commands.project import init_target
from kvx_runtime.targets.registry import get_target

__all__ = ["KubeflowInitRequest", "init_command", "init_kubeflow"]


@dataclass(frozen=True)
class KubeflowInitRequest:
    host: str | None
    namespace: str | None = None
    project_path: str | None = None
    force: bool = False
    with_dockerfile: bool = False
    #: ``--cloud-env NAME``: also (or, without HOST, only) the env overlay.
    cloud_env: str | None = None
    per_run: bool = False
    group: str = "kvx-runtime kfp"
    #: ``--with-github-actions``: also .github/workflows/ (:mod:`.ci_workflows`), authenticating
    #: to Google Cloud as ``github_auth`` says.
    with_github_actions: bool = False
    github_auth: str = "workload-identity"


def init_kubeflow(request: KubeflowInitRequest) -> list[Path]:
    """conf/base/kubeflow.yml (the plugin family's file name) for the KFP at ``host``, with
    KFP's MinIO as the storage root, and the cloud env when asked; returns the files written."""

    def config_values(root: Path) -> dict[str, str]:
        from kvx_runtime.config import is_kubernetes_namespace
        from kvx_runtime.config.files import files_read_instead
        from kvx_runtime.errors import UsageError
        from kvx_runtime.project import conf_folder_of
        from kvx_runtime.targets.kubeflow import KubeflowTarget

        host = KubeflowTarget(str(request.host)).host  # refused here (exit 2) rather than at the first command
        base = f"{conf_folder_of(root)}/base"
        hiding = files_read_instead(root / base, "kubeflow")
        if hiding:
            raise UsageError(f"{base}/{hiding[0]} exists: its settings win over a kubeflow.yml in the same "
                             "environment, so nothing was written",
                             hint=f"add host: {host} (and the Kubeflow keys, docs/kubeflow.md) to it instead")
        namespace = request.namespace
        if namespace is not None and not is_kubernetes_namespace(namespace):
            raise UsageError(f"--namespace {namespace!r} is not a Kubernetes namespace name",
                             hint="lowercase letters, digits and '-', at most 63 characters")
        namespace_line = (f"  # The user namespace (profile) of a multi-user Kubeflow.\n  namespace: '{namespace}'\n"
                          if namespace else
                          "  # The user namespace (profile) of a multi-user Kubeflow.\n  # namespace: team-a\n")
        return {"host": host, "namespace_line": namespace_line}

    return init_target(get_target("kubeflow"), request, {"HOST": request.host}, config_values)


@click.command("init", cls=KvxCommand)
@click.argument("host", required=False)
@click.option("--namespace", default=None, help="The user namespace (profile) of a multi-user Kubeflow.")
@init_options
@click.pass_context
def init_command(ctx: click.Context, host: str | None, namespace: str | None, project_path: str | None, force: bool,
                 with_dockerfile: bool, cloud_env: str | None, per_run: bool,
                 with_github_actions: bool, github_auth: str) -> None:
    """Write a commented conf/base/kubeflow.yml for the Kubeflow Pipelines API at HOST (its
    /pipeline URL), with KFP's MinIO as the storage root (with --cloud-env NAME also
    conf/NAME/catalog.yml; HOST may then be left out)."""
    group = ctx.parent.command_path if ctx.parent is not None else "kvx-runtime kfp"
    init_kubeflow(KubeflowInitRequest(host, namespace, project_path, force, with_dockerfile, cloud_env, per_run,
                                      group, with_github_actions, github_auth))
