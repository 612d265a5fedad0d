"""The project commands, each defined once, for both front-ends.

``kvx-runtime <command>`` and ``kedro vertexai <command>`` are the same click commands: the
``kvx-runtime`` group adds them next to the step commands (``exec-node``, ``mlflow-*``), the
``kedro vertexai`` group of :mod:`kvx_runtime.kedro_plugin` adds them under its ``-e/--env``
option (which every command here also takes itself). Bodies stay thin: the logic lives in the
compiler, the local runner, the targets.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from kvx_runtime import settings
from kvx_runtime.errors import Interrupted, KvxError
from kvx_runtime.process import run_command

__all__ = ["KUBEFLOW_COMMANDS", "PROJECT_COMMANDS", "env_option", "fail_fast_option", "load_version_option",
           "project_path_option"]

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
    help="Kedro config environment (default: KEDRO_ENV, then the project's default_run_env unless "
    "it is 'local', then base).",
)


def _compile_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """What says which pipeline to compile, and how: shared by compile and run-local."""
    for option in reversed([
        click.option("-p", "--pipeline", default="__default__", show_default=True, help="Registered pipeline."),
        click.option("-i", "--image", default=None, help="Image of the steps (default: run_config.image)."),
        click.option("--params", "params", multiple=True, metavar="NAME:TYPE[,NAME:TYPE]",
                     help="Kedro parameters exposed as pipeline parameters (types: str, int, float, bool, "
                     "list, dict)."),
        load_version_option,
        click.option("--code-upload/--no-code-upload", default=None,
                     help="Package the workspace's code and configuration for the steps to run, so that a "
                     "code change needs no image rebuild (default: run_config.code_upload)."),
    ]):
        function = option(function)
    return function


def resolve_env(ctx: click.Context, env: str | None) -> str | None:
    """The command's own ``--env``, else the ``kedro vertexai -e`` group's."""
    if env:
        return env
    parent = ctx.find_object(dict) or {}
    return parent.get("env")


def run(ctx: click.Context, action: Callable[[], Any]) -> None:
    run_command(ctx.command_path, action)


# --- bodies --------------------------------------------------------------------------------


def do_compile(
    project_path: str | None,
    env: str | None,
    pipeline: str,
    image: str | None,
    storage_root: str | None,
    params: tuple[str, ...],
    output: str,
    load_versions: tuple[str, ...] = (),
    code_upload: bool | None = None,
    for_kubeflow: bool = False,
) -> Path:
    from kvx_runtime.compiler import CompileRequest, compile_pipeline, write_spec
    from kvx_runtime.compiler.checks import VERTEX_SHARED_MOUNTS
    from kvx_runtime.versions import parse_load_versions

    compiled = compile_pipeline(CompileRequest(
        project_path=project_path, env=env, pipeline=pipeline, image=image,
        params=params, storage_root=storage_root, load_versions=parse_load_versions(load_versions),
        code_upload=code_upload, shared_mounts=() if for_kubeflow else VERTEX_SHARED_MOUNTS,
    ))
    # KFP reads run_config.kubernetes from a YAML's second document (Vertex AI does not apply it).
    platform = compiled.platform_spec if for_kubeflow else None
    if platform and Path(output).suffix not in {".yaml", ".yml"}:
        from kvx_runtime.log import get_logger

        get_logger(__name__).warning("run_config.kubernetes is left out of a JSON spec: write .yaml "
                                     "(-o pipeline.yaml) for KFP to apply it", output=str(output))
        platform = None
    path = write_spec(compiled.spec, output, platform)
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
        failed = result.failed_tasks or ([result.failed_task] if result.failed_task else ["(unknown)"])
        steps = f"step '{failed[0]}'" if len(failed) == 1 else f"steps {', '.join(map(repr, failed))}"
        error = NodeError(f"{steps} of job {result.job_name} failed")
        error.exit_code = result.exit_code  # type: ignore[assignment]  # the step's own code
        raise error
    click.echo(f"Job {result.job_name} succeeded (run id {result.run_id}); logs and step outputs in {result.run_dir}")


_TEMPLATES = Path(__file__).parent / "templates"


def do_init(project_path: str | None, project_id: str, region: str, force: bool,
            with_dockerfile: bool = False) -> Path:
    from kvx_runtime.project import find_package_name

    root = Path(project_path or os.getcwd()).resolve()
    package = find_package_name(root).replace("_", "-")
    config = _TEMPLATES.joinpath("vertexai.yml").read_text()
    target = root / "conf" / "base" / "vertexai.yml"
    _write_init_files(root, {target: config.format(project_id=project_id, region=region, package=package)},
                      force, with_dockerfile)
    return target


def do_kubeflow_init(project_path: str | None, host: str, namespace: str | None, force: bool,
                     with_dockerfile: bool = False) -> Path:
    """conf/base/kubeflow.yml (the plugin family's file name) for the KFP at ``host``."""
    from kvx_runtime.config import is_kubernetes_namespace
    from kvx_runtime.errors import UsageError
    from kvx_runtime.project import find_package_name
    from kvx_runtime.targets.kubeflow import KubeflowTarget

    root = Path(project_path or os.getcwd()).resolve()
    host = KubeflowTarget(host).host  # refused here (exit 2) rather than at the first command
    base = root / "conf" / "base"
    hiding = sorted(p.name for p in base.glob("vertexai*")
                    if p.suffix in {".yml", ".yaml", ".json"} or (p.is_dir() and p.name == "vertexai"))
    if hiding:
        raise UsageError(f"conf/base/{hiding[0]} exists: its settings win over a kubeflow.yml in the same "
                         "environment, so nothing was written",
                         hint=f"add host: {host} (and the Kubeflow keys, docs/kubeflow.md) to it instead")
    if namespace is not None and not is_kubernetes_namespace(namespace):
        raise UsageError(f"--namespace {namespace!r} is not a Kubernetes namespace name",
                         hint="lowercase letters, digits and '-', at most 63 characters")
    package = find_package_name(root).replace("_", "-")
    namespace_line = (f"  # The user namespace (profile) of a multi-user Kubeflow.\n  namespace: '{namespace}'\n"
                      if namespace else
                      "  # The user namespace (profile) of a multi-user Kubeflow.\n  # namespace: team-a\n")
    config = _TEMPLATES.joinpath("kubeflow.yml").read_text()
    target = base / "kubeflow.yml"
    _write_init_files(root, {target: config.format(host=host, package=package, namespace_line=namespace_line)},
                      force, with_dockerfile)
    return target


def _write_init_files(root: Path, files: dict[Path, str], force: bool, with_dockerfile: bool) -> None:
    from kvx_runtime.errors import UsageError

    files = dict(files)
    if with_dockerfile:
        files[root / "Dockerfile"] = _TEMPLATES.joinpath("project.Dockerfile").read_text()
        files[root / ".dockerignore"] = _TEMPLATES.joinpath("project.dockerignore").read_text()
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


# --- commands ------------------------------------------------------------------------------


@click.command("compile")
@project_path_option
@env_option
@_compile_options
@click.option("--storage-root", default=None, help="Default storage root of the run (default: run_config.root).")
@click.option("-o", "--output", default="pipeline.json", show_default=True,
              help="Where to write the spec: JSON, or YAML for .yaml/.yml.")
@click.pass_context
def compile_command(ctx: click.Context, project_path: str | None, env: str | None, pipeline: str,
                    image: str | None, params: tuple[str, ...], load_versions: tuple[str, ...],
                    code_upload: bool | None, storage_root: str | None, output: str) -> None:
    """Compile a Kedro pipeline into a Vertex AI / Kubeflow pipeline spec."""
    run(ctx, lambda: do_compile(project_path, resolve_env(ctx, env), pipeline, image, storage_root, params,
                                output, load_versions, code_upload, for_kubeflow=target_kind(ctx) == KUBEFLOW))


@click.command("run-local")
@click.argument("spec", required=False, type=click.Path(dir_okay=False, exists=True))
@project_path_option
@env_option
@_compile_options
@click.option("--param", "overrides", multiple=True, metavar="NAME=VALUE",
              help="Override a pipeline parameter (pipeline or dotted Kedro name). Repeatable.")
@click.option("--storage-root", default=None, help="Storage root of the run (default: <project>/.kvx/storage).")
@click.option("--max-parallel", default=4, show_default=True, type=click.IntRange(min=1),
              help="Steps that may run at the same time.")
@click.option("--job-name", default=None, help="Job name (default: <pipeline>-<timestamp>).")
@fail_fast_option
@click.pass_context
def run_local_command(ctx: click.Context, spec: str | None, project_path: str | None, env: str | None,
                      pipeline: str, image: str | None, params: tuple[str, ...], load_versions: tuple[str, ...],
                      code_upload: bool | None,
                      overrides: tuple[str, ...], storage_root: str | None, max_parallel: int,
                      job_name: str | None, fail_fast: bool) -> None:
    """Run a compiled pipeline spec here, each step a separate process (without SPEC: compile the
    project's pipeline first, to .kvx/pipeline.json)."""

    def action() -> None:
        nonlocal spec
        from kvx_runtime.config import LOCAL_STATE_DIR, local_storage_root, resolve_storage_root

        project = project_path or os.getcwd()
        root = resolve_storage_root(storage_root, None, required=True, default=local_storage_root(project))
        if spec is None:
            # The image does not matter locally: steps run in this environment.
            spec = str(do_compile(project_path, resolve_env(ctx, env), pipeline, image or "local", root, params,
                                  os.path.join(project, LOCAL_STATE_DIR, "pipeline.json"), load_versions, code_upload))
        do_run_local(spec, project_path, overrides, root, max_parallel, job_name, fail_fast)

    run(ctx, action)


@click.command("init")
@click.argument("project_id")
@click.argument("region")
@project_path_option
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.option("--with-dockerfile", is_flag=True,
              help="Also write a Dockerfile (FROM the kvx-runtime image) and .dockerignore.")
@click.pass_context
def init_command(ctx: click.Context, project_id: str, region: str, project_path: str | None, force: bool,
                 with_dockerfile: bool) -> None:
    """Write a commented conf/base/vertexai.yml for PROJECT_ID and REGION."""
    run(ctx, lambda: do_init(project_path, project_id, region, force, with_dockerfile))


@click.command("init")
@click.argument("host")
@click.option("--namespace", default=None, help="The user namespace (profile) of a multi-user Kubeflow.")
@project_path_option
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.option("--with-dockerfile", is_flag=True,
              help="Also write a Dockerfile (FROM the kvx-runtime image) and .dockerignore.")
@click.pass_context
def kubeflow_init_command(ctx: click.Context, host: str, namespace: str | None, project_path: str | None,
                          force: bool, with_dockerfile: bool) -> None:
    """Write a commented conf/base/kubeflow.yml for the Kubeflow Pipelines API at HOST (its
    /pipeline URL), with KFP's MinIO as the storage root."""
    run(ctx, lambda: do_kubeflow_init(project_path, host, namespace, force, with_dockerfile))


class _DoctorFailed(KvxError):
    def __init__(self, code: int) -> None:
        super().__init__("at least one check failed (see the FAIL lines above)")
        self.exit_code = code  # type: ignore[assignment]


@click.command("doctor")
@project_path_option
@env_option
@click.option("--storage-root", default=None, help="Storage root to check (default: run_config.root).")
@click.option("--runtime-only", is_flag=True, help="Only check the runtime itself (base image smoke test).")
@click.pass_context
def doctor_command(ctx: click.Context, project_path: str | None, env: str | None, storage_root: str | None,
                   runtime_only: bool) -> None:
    """Check that this container can run steps: project, config, storage, MLflow, auth."""

    def action() -> None:
        from kvx_runtime.doctor import run_doctor

        code = run_doctor(project_path, resolve_env(ctx, env), storage_root, runtime_only)
        if code:
            raise _DoctorFailed(code)

    run(ctx, action)


@click.command("gc")
@project_path_option
@env_option
@click.option("--storage-root", default=None, help="Storage root to clean (default: run_config.root).")
@click.option("--older-than", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Expire jobs whose newest blob is older than this (default: run_config.ttl).")
@click.option("--yes", is_flag=True, help="Delete (default: only say what would be deleted).")
@click.pass_context
def gc_command(ctx: click.Context, project_path: str | None, env: str | None, storage_root: str | None,
               older_than: float | None, yes: bool) -> None:
    """Delete what a storage root no longer needs: expired jobs' intermediates, dead writers' files."""

    def action() -> None:
        from kvx_runtime.config import STEP_KEYS, resolve_storage_root
        from kvx_runtime.errors import ConfigError, KvxError
        from kvx_runtime.project import open_project
        from kvx_runtime.storage.gc import collect_garbage, describe

        ttl = older_than
        root = resolve_storage_root(storage_root, None, required=False)
        needs_project = root is None or ttl is None
        config = None
        if root is None or ttl is None or root.startswith("s3://"):
            try:  # for an s3:// root given outright, the project's run_config.s3, when there is one
                config = open_project(project_path, resolve_env(ctx, env), needed=(*STEP_KEYS, "run_config.ttl"))
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
        for line in describe(collect_garbage(root, float(ttl), delete=yes)):
            click.echo(line)

    run(ctx, action)


# --- commands that talk to the target (Vertex AI) ---------------------------------------------


#: ``ctx.obj["target"]`` of the group a command runs under: ``kvx-runtime kfp`` and ``kedro
#: kubeflow`` set "kubeflow"; everything else talks to Vertex AI.
VERTEX, KUBEFLOW = "vertex", "kubeflow"


def target_kind(ctx: click.Context) -> str:
    return str((ctx.find_object(dict) or {}).get("target") or VERTEX)


def sibling_command(ctx: click.Context, name: str) -> str:
    """How the user types another command of the same group (``kvx-runtime kfp status``)."""
    parent = ctx.parent.command_path if ctx.parent is not None else "kvx-runtime"
    return f"{parent} {name}"


def _target_and_project(ctx: click.Context, project_path: str | None, env: str | None) -> tuple[Any, Any]:
    from kvx_runtime.project import open_project

    project = open_project(project_path, resolve_env(ctx, env))
    config = project.plugin_config
    if target_kind(ctx) == KUBEFLOW:
        from kvx_runtime.targets import KubeflowTarget

        return KubeflowTarget(str(config.host or ""), namespace=config.run_config.namespace,
                              experiment_name=config.run_config.experiment_name), project
    from kvx_runtime.targets import VertexTarget

    return VertexTarget(str(config.project_id or ""), str(config.region or "")), project


def _submit_options(function: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("--param", "values", multiple=True, metavar="KEY=VALUE",
                     help="Any Kedro parameter for this run, typed from its Kedro value. Repeatable."),
        click.option("--storage-root", default=None, help="Storage root of the run (default: run_config.root)."),
        click.option("--template", default=None, metavar="TAG",
                     help="Run the spec uploaded with this tag to run_config.template_repository "
                     "(upload-pipeline) instead of sending the spec itself."),
    ]):
        function = option(function)
    return function


def _template_uri(run_config: Any, spec: Any, tag: str | None) -> str | None:
    from kvx_runtime.errors import ConfigError

    if tag is None:
        return None
    if not run_config.template_repository:
        raise ConfigError("--template needs run_config.template_repository",
                          hint="https://{region}-kfp.pkg.dev/{project}/{repository}")
    name = str(spec.get("pipelineInfo", {}).get("name", "pipeline"))
    return f"{run_config.template_repository.rstrip('/')}/{name}/{tag}"


def _compile_for_target(project_path: str | None, env: str | None, pipeline: str, image: str | None,
                        storage_root: str | None, params: tuple[str, ...], load_versions: tuple[str, ...],
                        values: tuple[str, ...], code_upload: bool | None = None,
                        for_kubeflow: bool = False) -> Any:
    from kvx_runtime.compiler import CompileRequest, compile_pipeline
    from kvx_runtime.compiler.checks import VERTEX_SHARED_MOUNTS
    from kvx_runtime.errors import UsageError
    from kvx_runtime.versions import parse_load_versions

    parsed: dict[str, str] = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param {item!r} must look like KEY=VALUE")
        parsed[key.strip()] = text
    return compile_pipeline(CompileRequest(
        project_path=project_path, env=env, pipeline=pipeline, image=image, params=params,
        storage_root=storage_root, load_versions=parse_load_versions(load_versions), values=parsed,
        code_upload=code_upload, shared_mounts=() if for_kubeflow else VERTEX_SHARED_MOUNTS,
    ))


def _finish(target: Any, run: Any, spec: Any, values: Any, fetch_logs: bool = False) -> None:
    """Print the summary and, on failure, the diagnosis; exit 1 unless the run succeeded."""
    from kvx_runtime.errors import NodeError
    from kvx_runtime.submission import diagnose, summary

    click.echo(summary(run))
    if run.state == "SUCCEEDED":
        return
    for line in diagnose(target, run, spec, values, fetch_logs=fetch_logs):
        click.echo(line)
    raise NodeError(f"pipeline run {run.run_id} {run.state}", hint=target.console_url(run))


@click.command("run-once")
@project_path_option
@env_option
@_compile_options
@_submit_options
@click.option("--wait/--no-wait", default=None,
              help="Watch the run until it ends: exit 0 if it succeeded, 1 if not (default: "
              "run_config.wait_for_completion, false).")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="With --wait: stop waiting after this long (the run goes on).")
@click.pass_context
def run_once_command(ctx: click.Context, project_path: str | None, env: str | None, pipeline: str,
                     image: str | None, params: tuple[str, ...], load_versions: tuple[str, ...],
                     code_upload: bool | None,
                     values: tuple[str, ...], storage_root: str | None, template: str | None, wait: bool | None,
                     timeout: float | None) -> None:
    """Compile the pipeline and run it once (on Vertex AI; under `kfp`, Kubeflow Pipelines); with
    --wait, watch it to the end."""

    def action() -> None:
        from kvx_runtime.submission import run_request, watch

        target, project = _target_and_project(ctx, project_path, env)
        compiled = _compile_for_target(project_path, project.env, pipeline, image, storage_root, params,
                                       load_versions, values, code_upload, target_kind(ctx) == KUBEFLOW)
        run_config = project.plugin_config.run_config
        request = run_request(compiled.spec, run_config, values=compiled.values,
                              template_uri=_template_uri(run_config, compiled.spec, template),
                              platform_spec=compiled.platform_spec)
        if target_kind(ctx) == KUBEFLOW and run_config.run_name:
            from dataclasses import replace

            from kvx_runtime.submission import job_id

            request = replace(request, run_id=job_id(run_config.run_name))
        run = target.submit(request)
        click.echo(f"Submitted {run.name}" + (f" ({run.display_name})" if run.display_name != run.name else ""))
        click.echo(f"  {target.console_url(run)}")
        if not (run_config.wait_for_completion if wait is None else wait):
            return
        interval = settings.WATCH_INTERVAL.get()
        try:
            run = watch(target, run, click.echo, timeout=timeout, first_poll=interval,
                        status_command=sibling_command(ctx, "status"),
                        max_poll=max(interval, 60.0 if interval >= 5 else interval))
        except Interrupted:  # Ctrl-C (SIGINT, turned into Interrupted by the process contract)
            cancel = sibling_command(ctx, "cancel")
            click.echo(f"Stopped watching; the run goes on. Cancel it with: {cancel} {run.run_id}")
            raise
        _finish(target, run, compiled.spec, compiled.values)

    run(ctx, action)


@click.command("status")
@click.argument("job")
@project_path_option
@env_option
@click.option("--logs", "fetch_logs", is_flag=True, help="Also fetch failed tasks' last error log entries.")
@click.pass_context
def status_command(ctx: click.Context, job: str, project_path: str | None, env: str | None, fetch_logs: bool) -> None:
    """A run's state and its tasks; for a failed run, what failed and where to look."""

    def action() -> None:
        target, _ = _target_and_project(ctx, project_path, env)
        info = target.get(job)
        click.echo(f"{info.run_id}: {info.state}  {target.console_url(info)}")
        for task in info.tasks:
            click.echo(f"  {task.state:<10} {task.name}" + (f": {task.error}" if task.error else ""))
        if info.finished:
            _finish(target, info, info.spec, info.parameters, fetch_logs=fetch_logs)

    run(ctx, action)


@click.command("list-pipelines")
@project_path_option
@env_option
@click.option("-p", "--pipeline", default="__default__", show_default=True, help="Registered pipeline.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1), help="How many runs.")
@click.option("--all", "all_pipelines", is_flag=True, help="Runs of every pipeline, not only this one.")
@click.pass_context
def list_pipelines_command(ctx: click.Context, project_path: str | None, env: str | None, pipeline: str,
                           limit: int, all_pipelines: bool) -> None:
    """Runs of this pipeline, newest first: job, state, start, duration."""

    def action() -> None:
        from itertools import islice

        from kvx_runtime.compiler.names import pipeline_name

        target, project = _target_and_project(ctx, project_path, env)
        name = pipeline_name(project.package_name if pipeline == "__default__"
                             else f"{project.package_name}-{pipeline}")
        runs = list(islice(target.list_runs(None if all_pipelines else name), limit))
        click.echo(f"{'JOB':<60} {'STATE':<10} {'STARTED (UTC)':<19} DURATION")
        for info in runs:
            started = info.start_time.strftime("%Y-%m-%d %H:%M:%S") if info.start_time else "-"
            duration = f"{info.duration / 60:.1f} min" if info.duration is not None else "-"
            click.echo(f"{info.run_id:<60} {info.state:<10} {started:<19} {duration}")
        if not runs:
            click.echo("no runs")

    run(ctx, action)


@click.command("cancel")
@click.argument("job")
@project_path_option
@env_option
@click.pass_context
def cancel_command(ctx: click.Context, job: str, project_path: str | None, env: str | None) -> None:
    """Ask the pipeline service to cancel a run (Kubeflow Pipelines: terminate it)."""

    def action() -> None:
        target, _ = _target_and_project(ctx, project_path, env)
        target.cancel(job)
        click.echo(f"Cancellation of {job} requested; `{sibling_command(ctx, 'status')} {job}` shows when it stopped")

    run(ctx, action)


@click.command("ui")
@project_path_option
@env_option
@click.option("--open", "open_browser", is_flag=True, help="Also open it in a browser.")
@click.pass_context
def ui_command(ctx: click.Context, project_path: str | None, env: str | None, open_browser: bool) -> None:
    """Print the pipeline service's console URL (--open: open a browser)."""

    def action() -> None:
        target, _ = _target_and_project(ctx, project_path, env)
        url = target.console_url()
        click.echo(url)
        if open_browser:
            import webbrowser

            webbrowser.open(url)

    run(ctx, action)


@click.command("schedule")
@project_path_option
@env_option
@_compile_options
@_submit_options
@click.option("--cron", default=None, help="Cron expression (default: run_config.schedules).")
@click.option("--timezone", default=None, help="IANA time zone of the cron expression (sent as TZ=<zone>).")
@click.option("--start-time", default=None, metavar="RFC3339", help="First possible run.")
@click.option("--end-time", default=None, metavar="RFC3339", help="No runs after this.")
@click.option("--max-run-count", type=click.IntRange(min=1), default=None, help="Stop after this many runs.")
@click.option("--max-concurrent-runs", type=click.IntRange(min=1), default=None, help="Runs at the same time.")
@click.option("--allow-queueing/--no-queueing", default=None, help="Queue runs beyond the concurrency limit.")
@click.option("--pause", "action_name", flag_value="pause", help="Pause the schedule.")
@click.option("--resume", "action_name", flag_value="resume", help="Resume the schedule.")
@click.option("--delete", "action_name", flag_value="delete", help="Delete the schedule.")
@click.pass_context
def schedule_command(ctx: click.Context, project_path: str | None, env: str | None, pipeline: str,
                     image: str | None, params: tuple[str, ...], load_versions: tuple[str, ...],
                     code_upload: bool | None,
                     values: tuple[str, ...], storage_root: str | None, template: str | None,
                     cron: str | None, timezone: str | None,
                     start_time: str | None, end_time: str | None, max_run_count: int | None,
                     max_concurrent_runs: int | None, allow_queueing: bool | None, action_name: str | None) -> None:
    """Create or update (in place, by display name) the recurring run of this pipeline; or
    --pause, --resume, --delete it."""

    def action() -> None:
        from kvx_runtime.config import ScheduleConfig
        from kvx_runtime.errors import ConfigError, UsageError
        from kvx_runtime.submission import run_request
        from kvx_runtime.targets import ScheduleRequest

        target, project = _target_and_project(ctx, project_path, env)
        run_config = project.plugin_config.run_config
        key = pipeline if pipeline in run_config.schedules else "default_schedule"
        configured = run_config.schedules.get(key) or ScheduleConfig()
        compiled = _compile_for_target(project_path, project.env, pipeline, image, storage_root, params,
                                       load_versions, values, code_upload, target_kind(ctx) == KUBEFLOW)
        request = run_request(compiled.spec, run_config, values=compiled.values,
                              template_uri=_template_uri(run_config, compiled.spec, template),
                              platform_spec=compiled.platform_spec)
        display_name = run_config.scheduled_run_name or request.display_name
        if action_name is not None:
            existing = target.find_schedule(display_name)
            if existing is None:
                raise UsageError(f"no schedule named {display_name!r}", hint="create it with `schedule --cron ...`")
            after = target.set_schedule_state(existing.name, action_name)
            click.echo(f"Schedule {display_name}: {'deleted' if after is None else after.state}")
            return
        expression = cron or configured.cron_expression
        if not expression:
            raise ConfigError("no cron expression",
                              hint=f"pass --cron or set run_config.schedules.{key}.cron_expression")
        schedule, created = target.upsert_schedule(ScheduleRequest(
            display_name=display_name, cron=expression, timezone=timezone or configured.timezone, run=request,
            start_time=start_time or configured.start_time, end_time=end_time or configured.end_time,
            max_run_count=max_run_count or configured.max_run_count,
            max_concurrent_runs=max_concurrent_runs or configured.max_concurrent_run_count,
            allow_queueing=configured.allow_queueing if allow_queueing is None else allow_queueing,
        ))
        click.echo(f"Schedule {display_name} {'created' if created else 'updated'}: {schedule.cron} "
                   f"({schedule.state}) {schedule.name}")

    run(ctx, action)


def _project_version(path: Path) -> str | None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        version = tomllib.loads((path / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    except (OSError, KeyError, ValueError):
        return None
    return str(version)


@click.command("upload-pipeline")
@project_path_option
@env_option
@_compile_options
@click.option("--storage-root", default=None, help="Default storage root of the runs (default: run_config.root).")
@click.option("--tag", "tags", multiple=True, help="Extra tags (always: the project version, the commit id, latest).")
@click.pass_context
def upload_pipeline_command(ctx: click.Context, project_path: str | None, env: str | None, pipeline: str,
                            image: str | None, params: tuple[str, ...], load_versions: tuple[str, ...],
                            code_upload: bool | None, storage_root: str | None, tags: tuple[str, ...]) -> None:
    """Compile the pipeline and upload it: to run_config.template_repository on Vertex AI (run-once
    and schedule run it with --template TAG), as a pipeline or a new version on Kubeflow Pipelines."""

    def action() -> None:
        import re
        import tempfile

        from kvx_runtime.compiler import write_spec
        from kvx_runtime.errors import ConfigError

        target, project = _target_and_project(ctx, project_path, env)
        if target_kind(ctx) == KUBEFLOW:
            _upload_to_kubeflow(target, project, ctx, pipeline, image, storage_root, params, load_versions,
                                code_upload, tags)
            return
        repository = project.plugin_config.run_config.template_repository
        if not repository:
            raise ConfigError("no run_config.template_repository",
                              hint="https://{region}-kfp.pkg.dev/{project}/{repository} (an Artifact Registry "
                              "repository of format Kubeflow Pipelines)")
        compiled = _compile_for_target(project_path, project.env, pipeline, image, storage_root, params,
                                       load_versions, (), code_upload)
        version = _project_version(project.path)
        commit = os.environ.get("KEDRO_CONFIG_COMMIT_ID")
        wanted = [*tags, *([f"v{version}"] if version else []), *([commit] if commit else []), "latest"]
        clean = list(dict.fromkeys(re.sub(r"[^A-Za-z0-9_.-]", "-", tag)[:128] for tag in wanted if tag))
        with tempfile.TemporaryDirectory() as directory:
            spec_file = write_spec(compiled.spec, Path(directory) / "pipeline.yaml")
            uri = target.upload_template(repository, str(spec_file), clean)
        click.echo(f"Uploaded as {uri} (tags: {', '.join(clean)})")

    run(ctx, action)


def _upload_to_kubeflow(target: Any, project: Any, ctx: click.Context, pipeline: str, image: str | None,
                        storage_root: str | None, params: tuple[str, ...], load_versions: tuple[str, ...],
                        code_upload: bool | None, tags: tuple[str, ...]) -> None:
    """A new KFP pipeline, or a new version of the existing one (named by the project version,
    the commit and the time: KFP version names are unique per pipeline)."""
    import re
    import tempfile
    from datetime import datetime, timezone

    from kvx_runtime.compiler import write_spec

    compiled = _compile_for_target(project.path, project.env, pipeline, image, storage_root, params,
                                   load_versions, (), code_upload, for_kubeflow=True)
    name = str(compiled.spec.get("pipelineInfo", {}).get("name", "pipeline"))
    version = _project_version(project.path)
    commit = os.environ.get("KEDRO_CONFIG_COMMIT_ID")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    parts = [*tags, *([f"v{version}"] if version else []), *([commit[:12]] if commit else []), stamp]
    version_name = "-".join(re.sub(r"[^A-Za-z0-9_.-]", "-", part) for part in parts)[:100]
    description = str(project.plugin_config.run_config.description or "")
    with tempfile.TemporaryDirectory() as directory:
        spec_file = write_spec(compiled.spec, Path(directory) / "pipeline.yaml", compiled.platform_spec)
        pipeline_id, version_id, created = target.upload_pipeline(name, str(spec_file), version_name, description)
    what = "pipeline" if created else "version"
    click.echo(f"Uploaded {name} as a new {what} (pipeline {pipeline_id}, version {version_name} {version_id})")


#: Shared by ``kvx-runtime`` and ``kedro vertexai``.
PROJECT_COMMANDS: tuple[click.Command, ...] = (
    compile_command,
    run_local_command,
    run_once_command,
    schedule_command,
    list_pipelines_command,
    status_command,
    cancel_command,
    ui_command,
    upload_pipeline_command,
    init_command,
    doctor_command,
    gc_command,
)
#: Options only Vertex AI has. Kubeflow Pipelines refuses them with a clear line (the schedule's
#: config can set them too), so its commands' help does not offer them.
_VERTEX_ONLY_OPTIONS = frozenset({"template", "timezone", "max_run_count", "allow_queueing"})


def _for_kubeflow(command: click.Command) -> click.Command:
    """``command`` with the Vertex-only options hidden from its help."""
    import copy

    def hidden(option: click.Parameter) -> click.Parameter:
        option = copy.copy(option)
        option.hidden = True  # type: ignore[attr-defined]
        return option

    clone = copy.copy(command)
    clone.params = [hidden(p) if p.name in _VERTEX_ONLY_OPTIONS else p for p in command.params]
    return clone


#: Under ``kvx-runtime kfp`` and ``kedro kubeflow`` (the plugin family's names), for Kubeflow Pipelines.
KUBEFLOW_COMMANDS: tuple[click.Command, ...] = (
    *(_for_kubeflow(c) for c in PROJECT_COMMANDS if c.name not in {"init", "gc"}),
    kubeflow_init_command,
)
