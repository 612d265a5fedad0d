"""Commands that look after a runtime and its storage: ``doctor`` and ``gc``."""

from __future__ import annotations

from dataclasses import dataclass

import click

from kvx_runtime.commands.command import Invocation, KvxCommand, invocation
from kvx_runtime.commands.options import env_option, project_path_option
from kvx_runtime.errors import Interrupted, KvxError

__all__ = ["DoctorFailed", "DoctorRequest", "GcRequest", "collect_storage_garbage", "doctor", "doctor_command",
           "gc_command"]


class DoctorFailed(KvxError):
    """At least one check failed; the exit code is the worst check's."""

    def __init__(self, code: int) -> None:
        super().__init__("at least one check failed (see the FAIL lines above)")
        self.exit_code = code  # type: ignore[assignment]


@dataclass(frozen=True)
class DoctorRequest:
    at: Invocation
    storage_root: str | None = None
    runtime_only: bool = False


def doctor(request: DoctorRequest) -> None:
    """Run the checks (each prints its line); :class:`DoctorFailed` when one failed."""
    from kvx_runtime.doctor import run_doctor

    code = run_doctor(request.at.project_path, request.at.env, request.storage_root, request.runtime_only)
    if code:
        raise DoctorFailed(code)


@click.command("doctor", cls=KvxCommand)
@project_path_option
@env_option
@click.option("--storage-root", default=None, help="Storage root to check (default: run_config.root).")
@click.option("--runtime-only", is_flag=True, help="Only check the runtime itself (base image smoke test).")
@click.pass_context
def doctor_command(ctx: click.Context, project_path: str | None, env: str | None, storage_root: str | None,
                   runtime_only: bool) -> None:
    """Check that this container can run steps: project, config, storage, MLflow, auth."""
    doctor(DoctorRequest(invocation(ctx, project_path, env), storage_root, runtime_only))


@dataclass(frozen=True)
class GcRequest:
    at: Invocation
    storage_root: str | None = None
    older_than: float | None = None  # seconds; None: run_config.ttl
    delete: bool = False


def collect_storage_garbage(request: GcRequest) -> None:
    """Expire old jobs' intermediates and cache entries, and dead writers' files (with ``delete``; else only say
    what would go). The project is read only for what the request leaves out."""
    from kvx_runtime.config import STEP_KEYS, resolve_storage_root
    from kvx_runtime.errors import ConfigError
    from kvx_runtime.project import open_project
    from kvx_runtime.storage.gc import GarbageReport, collect_garbage, describe

    ttl = request.older_than
    root = resolve_storage_root(request.storage_root, None, required=False)
    needs_project = root is None or ttl is None
    config = None
    if root is None or ttl is None or root.startswith("s3://"):
        try:  # for an s3:// root given outright, the project's run_config.s3, when there is one
            config = open_project(request.at.project_path, request.at.env, needed=(*STEP_KEYS, "run_config.ttl"))
        except KvxError as exc:
            if needs_project:
                raise
            from kvx_runtime.log import get_logger

            get_logger(__name__).warning(
                "no project config read: run_config.s3 does not apply (the AWS variables do)", error=str(exc))
    if needs_project and config is not None:
        run_config = config.plugin_config.run_config
        ttl = run_config.ttl if ttl is None else ttl
        root = root or resolve_storage_root(None, run_config.root, required=True)
    if root is None or ttl is None:  # a project was read when either was missing
        raise ConfigError("gc needs a storage root and a time to live",
                          hint="pass --storage-root and --older-than, or set run_config.root and run_config.ttl")
    report = GarbageReport(root=root)
    try:
        collect_garbage(root, float(ttl), delete=request.delete, report=report)
    except (KvxError, Interrupted) as stopped:
        if report.deleted:  # what went before the failure (or the stop signal): said, not lost with it
            for line in describe(report)[:-1]:
                click.echo(line)
            cause = "the error below" if isinstance(stopped, KvxError) else stopped.signal_name
            click.echo(f"gc stopped half-way by {cause}: only what is listed above was deleted")
            if isinstance(stopped, Interrupted) and report.partly_deleted is not None:
                stopped.left_behind = f"job {report.partly_deleted} may be partly deleted"
        raise
    for line in describe(report):
        click.echo(line)


@click.command("gc", cls=KvxCommand)
@project_path_option
@env_option
@click.option("--storage-root", default=None, help="Storage root to clean (default: run_config.root).")
@click.option("--older-than", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Expire jobs whose newest blob is older than this, and cache entries recorded longer ago "
                   "(default: run_config.ttl).")
@click.option("--yes", is_flag=True, help="Delete (default: only say what would be deleted).")
@click.pass_context
def gc_command(ctx: click.Context, project_path: str | None, env: str | None, storage_root: str | None,
               older_than: float | None, yes: bool) -> None:
    """Delete what a storage root no longer needs: expired jobs' intermediates, cache entries that
    can never hit again, dead writers' files."""
    collect_storage_garbage(GcRequest(invocation(ctx, project_path, env), storage_root, older_than, yes))
