"""The ``kvx-runtime`` command line.

Every command runs through :func:`_run`, which owns the process-level contract: logging set
up first, SIGTERM/SIGINT turned into a clean stop, and every failure ending in one clear log
line and the documented exit code (see :class:`~kvx_runtime.errors.ExitCode`).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
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


def _run_unless_ok(what: str, action: Callable[[], Any]) -> None:
    """Run a start-up action; a failure ends the process like a command failure."""
    try:
        action()
    except KvxError as exc:
        log.error(f"{what}: {exc}", exit_code=int(exc.exit_code))
        _exit(int(exc.exit_code))


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
        log.error(f"{command} failed: {exc}", exit_code=int(exc.exit_code), error_type=type(exc).__name__,
                  error=exc.message)
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


project_path_option = click.option(
    "--project-path", type=click.Path(file_okay=False, exists=True), default=None,
    help="Kedro project directory (default: the working directory).",
)
load_version_option = click.option(
    "--load-version", "load_versions", multiple=True, metavar="DATASET=VERSION",
    help="Load this version of a versioned dataset (wins over the run's own version). Repeatable.",
)
fail_fast_option = click.option(
    "--fail-fast", is_flag=True,
    help="After a failure start no new step (default: the spec's kvx_failure_policy, fail_slow: "
    "independent steps finish, as on Vertex AI).",
)
env_option = click.option(
    "-e", "--env", default=None,
    help="Kedro config environment (default: KEDRO_ENV, then the project's default run env).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvx-runtime")
def cli() -> None:
    """Run Kedro nodes as Vertex AI / Kubeflow pipeline steps."""
    configure_logging()
    install_signal_handlers()
    if os.environ.get("KVX_HOST_ALIASES"):
        from kvx_runtime.hosts import install_host_aliases

        _run_unless_ok("host aliases", install_host_aliases)


# --- command bodies, shared with the `kedro vertexai` plugin commands ---------------------


def do_compile(
    project_path: str | None,
    env: str | None,
    pipeline: str,
    image: str | None,
    storage_root: str | None,
    params: tuple[str, ...],
    output: str,
    load_versions: tuple[str, ...] = (),
) -> Path:
    from kvx_runtime.compiler import CompileRequest, compile_pipeline, write_spec
    from kvx_runtime.versions import parse_load_versions

    compiled = compile_pipeline(CompileRequest(
        project_path=project_path, env=env, pipeline=pipeline, image=image,
        params=params, storage_root=storage_root, load_versions=parse_load_versions(load_versions),
    ))
    path = write_spec(compiled.spec, output)
    click.echo(f"Pipeline spec with {len(compiled.steps)} steps written to {path}")
    return path


def do_run_local(
    spec: str | Path,
    project_path: str | None,
    params: tuple[str, ...],
    storage_root: str | None,
    max_parallel: int,
    job_name: str | None,
    fail_fast: bool = False,
) -> None:
    from kvx_runtime.compiler import read_spec
    from kvx_runtime.errors import NodeError
    from kvx_runtime.local_runner import parse_overrides, run_local

    result = run_local(
        read_spec(spec),
        project_path or os.getcwd(),
        params=parse_overrides(params),
        storage_root=storage_root,
        max_parallel=max_parallel,
        job_name=job_name,
        fail_fast=fail_fast,
    )
    if result.exit_code:
        failed = result.failed_tasks or [result.failed_task]
        steps = f"step '{failed[0]}'" if len(failed) == 1 else f"steps {', '.join(map(repr, failed))}"
        error = NodeError(f"{steps} of job {result.job_name} failed")
        error.exit_code = result.exit_code  # type: ignore[assignment]  # the step's own code
        raise error
    click.echo(f"Job {result.job_name} succeeded (run id {result.run_id}); logs and step outputs in {result.run_dir}")


def do_init(project_path: str | None, project_id: str, region: str, force: bool,
            with_dockerfile: bool = False) -> Path:
    from kvx_runtime.errors import UsageError
    from kvx_runtime.project import find_package_name

    root = Path(project_path or os.getcwd()).resolve()
    templates = Path(__file__).parent / "templates"
    package = find_package_name(root).replace("_", "-")
    config = templates.joinpath("vertexai.yml").read_text()
    files = {root / "conf" / "base" / "vertexai.yml":
             config.format(project_id=project_id, region=region, package=package)}
    if with_dockerfile:
        files[root / "Dockerfile"] = templates.joinpath("project.Dockerfile").read_text()
        files[root / ".dockerignore"] = templates.joinpath("project.dockerignore").read_text()
    # Refuse before writing anything: never a half-done init.
    existing = [path for path in files if path.exists()]
    if existing and not force:
        raise UsageError(
            f"{', '.join(map(str, existing))} already exist{'s' if len(existing) == 1 else ''}; nothing was written",
            hint="pass --force to overwrite",
        )
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        click.echo(f"{path.relative_to(root)} written ({path})")
    return root / "conf" / "base" / "vertexai.yml"


@cli.command("exec-node")
@click.option("--node", "nodes", multiple=True, required=True, metavar="NAME",
              help="Node to run; repeat for a group (run in one process, data in memory).")
@project_path_option
@env_option
@click.option("--pipeline", default="__default__", show_default=True, help="Registered pipeline the node(s) belong to.")
@click.option("--run-id", default=None,
              help="Pipeline run id (default: KEDRO_CONFIG_RUN_ID, then a generated local id).")
@click.option("--job-name", default=None, help="Pipeline job name (default: KEDRO_CONFIG_JOB_NAME, then the run id).")
@click.option("--storage-root", default=None,
              help="Root for intermediates: gs://bucket/prefix, file://..., or a path (default: run_config.root).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Runtime parameter; typed (int, float, bool, JSON); dotted keys override nested ones. Repeatable.")
@click.option("--mlflow-run-id", default=None, help="MLflow run to log into (the pipeline's run).")
@click.option("--save-version", default=None, metavar="VERSION",
              help="The pipeline run's version for versioned datasets: a Kedro version or an RFC 3339 "
              "time (default: KVX_SAVE_VERSION, else one per process as in kedro run).")
@load_version_option
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
    save_version: str | None,
    load_versions: tuple[str, ...],
) -> None:
    """Run one pipeline step: the named Kedro node(s), intermediates restored and saved."""

    def action() -> None:
        from kvx_runtime.executor import StepRequest, execute_step
        from kvx_runtime.params import parse_params
        from kvx_runtime.versions import parse_load_versions

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
                save_version=save_version or os.environ.get("KVX_SAVE_VERSION") or None,
                load_versions=parse_load_versions(load_versions),
            )
        )

    _run("exec-node", action)


@cli.command("compile")
@project_path_option
@env_option
@click.option("--pipeline", default="__default__", show_default=True, help="Registered pipeline to compile.")
@click.option("--image", default=None, help="Image of the steps (default: run_config.image).")
@click.option("--storage-root", default=None, help="Default storage root of the run (default: run_config.root).")
@click.option("--params", "params", multiple=True, metavar="NAME:TYPE[,NAME:TYPE]",
              help="Kedro parameters exposed as pipeline parameters (types: str, int, float, bool, list, dict).")
@load_version_option
@click.option("-o", "--output", default="pipeline.json", show_default=True,
              help="Where to write the spec: JSON, or YAML for .yaml/.yml.")
def compile_command(
    project_path: str | None,
    env: str | None,
    pipeline: str,
    image: str | None,
    storage_root: str | None,
    params: tuple[str, ...],
    load_versions: tuple[str, ...],
    output: str,
) -> None:
    """Compile a Kedro pipeline into a Vertex AI / Kubeflow pipeline spec."""

    _run("compile", lambda: do_compile(project_path, env, pipeline, image, storage_root, params, output,
                                       load_versions))


@cli.command("run-local")
@click.argument("spec", type=click.Path(dir_okay=False, exists=True))
@project_path_option
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="Override a pipeline parameter (pipeline or dotted Kedro name). Repeatable.")
@click.option("--storage-root", default=None, help="Storage root of the run (default: <project>/.kvx/storage).")
@click.option("--max-parallel", default=4, show_default=True, type=click.IntRange(min=1),
              help="Steps that may run at the same time.")
@click.option("--job-name", default=None, help="Job name (default: <pipeline>-<timestamp>).")
@fail_fast_option
def run_local_command(
    spec: str,
    project_path: str | None,
    params: tuple[str, ...],
    storage_root: str | None,
    max_parallel: int,
    job_name: str | None,
    fail_fast: bool,
) -> None:
    """Run a compiled pipeline spec on this machine, each step a separate process."""

    _run("run-local", lambda: do_run_local(spec, project_path, params, storage_root, max_parallel, job_name,
                                           fail_fast))


def _step_identity(run_id: str | None, job_name: str | None) -> tuple[str, str]:
    from kvx_runtime.config_loader import env_var_name
    from kvx_runtime.errors import UsageError

    run_id = run_id or os.environ.get(env_var_name("run_id"))
    job_name = job_name or os.environ.get(env_var_name("job_name")) or run_id
    if not run_id or not job_name:
        raise UsageError("no run id", hint="pass --run-id (and --job-name) or set KEDRO_CONFIG_RUN_ID")
    os.environ[env_var_name("run_id")] = run_id
    os.environ[env_var_name("job_name")] = job_name
    return run_id, job_name


def _mlflow_project(project_path: str | None, env: str | None) -> object:
    from kvx_runtime.config import STEP_KEYS
    from kvx_runtime.errors import ConfigError
    from kvx_runtime.mlflow import mlflow_available
    from kvx_runtime.project import open_project

    if not mlflow_available():
        raise ConfigError("kedro-mlflow is not installed", hint='pip install "kvx-runtime[mlflow]"')
    return open_project(project_path, env, needed=STEP_KEYS)


@cli.command("mlflow-start")
@click.option("--output", required=True, type=click.Path(dir_okay=False),
              help="File to write the MLflow run id to (its directory is created).")
@project_path_option
@env_option
@click.option("--run-id", default=None, help="Pipeline run id (default: KEDRO_CONFIG_RUN_ID).")
@click.option("--job-name", default=None, help="Pipeline job name (default: KEDRO_CONFIG_JOB_NAME, then the run id).")
@click.option("--kubeflow", is_flag=True, help="Also tag kubeflow_run_id (Kubeflow Pipelines targets).")
def mlflow_start_command(output: str, project_path: str | None, env: str | None, run_id: str | None,
                         job_name: str | None, kubeflow: bool) -> None:
    """Create the pipeline's MLflow run; write its id to OUTPUT and print it."""

    def action() -> None:
        from kvx_runtime.log import bind_step_context
        from kvx_runtime.mlflow import start_pipeline_run

        resolved_run, resolved_job = _step_identity(run_id, job_name)
        bind_step_context(node="mlflow-start-run", run_id=resolved_run, job_name=resolved_job)
        project = _mlflow_project(project_path, env)
        mlflow_run_id, _ = start_pipeline_run(project, resolved_run, resolved_job, kubeflow=kubeflow)
        target = Path(output)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(mlflow_run_id)
        click.echo(mlflow_run_id)

    _run("mlflow-start", action)


@cli.command("mlflow-end")
@click.option("--final-status", required=True, metavar="JSON",
              help='The pipeline\'s final status as Vertex passes it, e.g. {"state": "FAILED", "error": {...}}.')
@click.option("--mlflow-run-id", default=None, help="The run to end (default: found by --job-name).")
@click.option("--job-name", default=None,
              help="Find the run by its vertexai_job_name tag (default: KEDRO_CONFIG_JOB_NAME).")
@project_path_option
@env_option
def mlflow_end_command(final_status: str, mlflow_run_id: str | None, job_name: str | None,
                       project_path: str | None, env: str | None) -> None:
    """End the pipeline's MLflow run as FINISHED, FAILED or KILLED."""

    def action() -> None:
        from kvx_runtime.config_loader import env_var_name
        from kvx_runtime.log import bind_step_context
        from kvx_runtime.mlflow import end_pipeline_run, parse_final_status

        parse_final_status(final_status)  # bad input fails before any network call
        job = job_name or os.environ.get(env_var_name("job_name"))
        bind_step_context(node="mlflow-end-run", job_name=job)
        project = _mlflow_project(project_path, env)
        run_id, status = end_pipeline_run(project, final_status, mlflow_run_id=mlflow_run_id, job_name=job)
        click.echo(f"{run_id} {status}")

    _run("mlflow-end", action)


@cli.command("doctor")
@project_path_option
@env_option
@click.option("--storage-root", default=None, help="Storage root to check (default: run_config.root).")
@click.option("--runtime-only", is_flag=True, help="Only check the runtime itself (base image smoke test).")
def doctor_command(project_path: str | None, env: str | None, storage_root: str | None, runtime_only: bool) -> None:
    """Check that this container can run steps: project, config, storage, MLflow, auth."""

    def action() -> None:
        from kvx_runtime.doctor import run_doctor

        code = run_doctor(project_path, env, storage_root, runtime_only)
        if code:
            raise _DoctorFailed(code)

    _run("doctor", action)


class _DoctorFailed(KvxError):
    def __init__(self, code: int) -> None:
        super().__init__("at least one check failed (see the FAIL lines above)")
        self.exit_code = code  # type: ignore[assignment]


@cli.command("gc")
@project_path_option
@env_option
@click.option("--storage-root", default=None, help="Storage root to clean (default: run_config.root).")
@click.option("--older-than", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Expire jobs whose newest blob is older than this (default: run_config.ttl).")
@click.option("--yes", is_flag=True, help="Delete (default: only say what would be deleted).")
def gc_command(project_path: str | None, env: str | None, storage_root: str | None, older_than: float | None,
               yes: bool) -> None:
    """Delete what a storage root no longer needs: expired jobs' intermediates, dead writers' files."""

    def action() -> None:
        from kvx_runtime.config import normalize_storage_root
        from kvx_runtime.storage.gc import collect_garbage, describe

        ttl = older_than
        root = normalize_storage_root(storage_root, bare_is_bucket=False) if storage_root is not None else None
        if root is None or ttl is None:
            from kvx_runtime.config import STEP_KEYS
            from kvx_runtime.errors import ConfigError
            from kvx_runtime.project import open_project

            run = open_project(project_path, env, needed=(*STEP_KEYS, "run_config.ttl")).plugin_config.run_config
            ttl = run.ttl if ttl is None else ttl
            if root is None:
                if not run.root:
                    raise ConfigError("no storage root", hint="pass --storage-root or set run_config.root")
                root = normalize_storage_root(run.root)
        for line in describe(collect_garbage(root, float(ttl), delete=yes)):
            click.echo(line)

    _run("gc", action)


@cli.command("init")
@click.argument("project_id")
@click.argument("region")
@project_path_option
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.option("--with-dockerfile", is_flag=True,
              help="Also write a Dockerfile (FROM the kvx-runtime image) and .dockerignore.")
def init_command(project_id: str, region: str, project_path: str | None, force: bool, with_dockerfile: bool) -> None:
    """Write a commented conf/base/vertexai.yml for PROJECT_ID and REGION."""
    _run("init", lambda: do_init(project_path, project_id, region, force, with_dockerfile))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="kvx-runtime")


if __name__ == "__main__":  # pragma: no cover
    main()
