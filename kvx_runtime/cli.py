"""The ``kvx-runtime`` command line.

Every command runs through :func:`_run`, which owns the process-level contract: logging set
up first, SIGTERM/SIGINT turned into a clean stop, and every failure ending in one clear log
line and the documented exit code (see :class:`~kvx_runtime.errors.ExitCode`).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from kvx_runtime import __version__
from kvx_runtime.errors import ExitCode, Interrupted, KvxError
from kvx_runtime.log import configure_logging, get_logger

log = get_logger("kvx_runtime.cli")


def _raise_interrupted(signum: int, _frame: Any) -> None:
    # Restore the default action so a second signal during cleanup ends the process at once.
    signal.signal(signum, signal.SIG_DFL)
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _raise_interrupted)


def _exit(code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    sys.exit(code)


def _run(command: str, action: Callable[[], Any]) -> NoReturn:
    """Run ``action`` under the exit-code contract and exit the process."""
    try:
        action()
    except KvxError as exc:
        log.error(f"{command} failed: {exc}", exit_code=int(exc.exit_code), error_type=type(exc).__name__)
        _exit(int(exc.exit_code))
    except Interrupted as exc:
        log.error(f"{command} {exc}: nothing partial was left behind", exit_code=int(exc.exit_code))
        _exit(int(exc.exit_code))
    except Exception as exc:  # a bug in kvx-runtime itself: show everything
        log.error(
            f"{command} failed with an internal error: {type(exc).__name__}: {exc}",
            exit_code=int(ExitCode.NODE_FAILED),
            exc_info=True,
        )
        _exit(int(ExitCode.NODE_FAILED))
    _exit(int(ExitCode.SUCCESS))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvx-runtime")
def cli() -> None:
    """Run Kedro nodes as Vertex AI / Kubeflow pipeline steps."""
    configure_logging()
    install_signal_handlers()


@cli.command("exec-node")
@click.option("--node", "nodes", multiple=True, required=True, metavar="NAME",
              help="Node to run; repeat for a group (run in one process, data in memory).")
@click.option("--project-path", type=click.Path(file_okay=False, exists=True), default=None,
              help="Kedro project directory (default: the working directory).")
@click.option("-e", "--env", default=None, help="Kedro config environment (default: KEDRO_ENV, then the project's default).")
@click.option("--pipeline", default="__default__", show_default=True, help="Registered pipeline the node(s) belong to.")
@click.option("--run-id", default=None, help="Pipeline run id (default: KEDRO_CONFIG_RUN_ID, then a generated local id).")
@click.option("--job-name", default=None, help="Pipeline job name (default: KEDRO_CONFIG_JOB_NAME, then the run id).")
@click.option("--storage-root", default=None, help="Root for intermediates: gs://bucket/prefix, file://..., or a path (default: run_config.root).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Runtime parameter; typed (int, float, bool, JSON); dotted keys override nested ones. Repeatable.")
@click.option("--mlflow-run-id", default=None, help="MLflow run to log into (the pipeline's run).")
def exec_node(
    nodes: tuple[str, ...],
    project_path: str | None,
    env: str | None,
    pipeline: str,
    run_id: str | None,
    job_name: str | None,
    storage_root: str | None,
    params: tuple[str, ...],
    mlflow_run_id: str | None,
) -> None:
    """Run one pipeline step: the named Kedro node(s), intermediates restored and saved."""

    def action() -> None:
        from kvx_runtime.executor import StepRequest, execute_step
        from kvx_runtime.params import parse_params

        execute_step(
            StepRequest(
                nodes=nodes,
                project_path=project_path,
                env=env,
                pipeline=pipeline,
                run_id=run_id,
                job_name=job_name,
                storage_root=storage_root,
                params=parse_params(params),
                raw_params=params,
                mlflow_run_id=mlflow_run_id,
            )
        )

    _run("exec-node", action)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="kvx-runtime")


if __name__ == "__main__":  # pragma: no cover
    main()
