"""Commands that work on the project itself: ``compile``, ``run-local``, and what every
target's ``init`` shares (writing its config file from a template, refusing a half-done init)."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO, cast

import click

from kvx_runtime.commands.command import Invocation, KvxCommand, invocation
from kvx_runtime.commands.options import env_option, fail_fast_option, pipeline_options, project_path_option
from kvx_runtime.targets.registry import TargetInfo, default_target
from kvx_runtime.templates import template_text

if TYPE_CHECKING:
    from kvx_runtime.cloud_env import CloudEnv
    from kvx_runtime.compiler import CompiledPipeline, CompileRequest
    from kvx_runtime.project import KedroProject

__all__ = [
    "CloudEnvOptions",
    "CompileSpecRequest",
    "InitOptions",
    "InitRequest",
    "PipelineOptions",
    "RunLocalRequest",
    "compile_command",
    "compile_for",
    "compile_request",
    "compile_spec",
    "init_arguments_given",
    "init_target",
    "refuse_warnings",
    "run_local_command",
    "run_local_spec",
    "run_values",
    "write_config_file",
    "write_init",
    "write_init_files",
]



@dataclass(frozen=True)
class PipelineOptions:
    """Which pipeline to compile, and how (the options of :func:`~.options.pipeline_options`)."""

    pipeline: str = "__default__"
    image: str | None = None
    params: tuple[str, ...] = ()  # NAME:TYPE[,NAME:TYPE]: Kedro parameters exposed as pipeline parameters
    load_versions: tuple[str, ...] = ()  # DATASET=VERSION
    code_upload: bool | None = None
    #: ``on``/``off``: the step cache in every step (docs/cache.md); None: run_config.cache.enabled.
    cache: str | None = None


def run_values(values: tuple[str, ...]) -> dict[str, str]:
    """``--param KEY=VALUE`` items of a run, by Kedro name."""
    from kvx_runtime.errors import UsageError

    parsed: dict[str, str] = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param {item!r} must look like KEY=VALUE")
        parsed[key.strip()] = text
    return parsed


def compile_request(at: Invocation, options: PipelineOptions, storage_root: str | None,
                    values: tuple[str, ...] = (), *, serving: KedroProject | None = None,
                    project: KedroProject | None = None) -> CompileRequest:
    """What the command's target compiles of the project (``values``: this run's
    ``--param KEY=VALUE``), whatever the target renders it into; ``serving`` and ``project``:
    see :func:`compile_for`."""
    from kvx_runtime.compiler import CompileRequest
    from kvx_runtime.versions import parse_load_versions

    request = CompileRequest(
        project_path=at.project_path, env=at.env, pipeline=options.pipeline, image=options.image,
        params=options.params, storage_root=storage_root, load_versions=parse_load_versions(options.load_versions),
        values=run_values(values), code_upload=options.code_upload, cache=options.cache,
        shared_mounts=at.target.shared_mounts,
        gpu_resource_name=at.target.gpu_resource_name, init_command=at.sibling("init"),
        step_start_seconds=at.target.step_start_seconds, project=project or serving,
    )
    if serving is None:
        return request
    from kvx_runtime.commands.cache_hits import with_cached_steps_served

    return with_cached_steps_served(serving, request)


def compile_for(at: Invocation, options: PipelineOptions, storage_root: str | None,
                values: tuple[str, ...] = (), *, serving: KedroProject | None = None,
                project: KedroProject | None = None) -> CompiledPipeline:
    """The project's pipeline compiled for the command's target (``values``: this run's
    ``--param KEY=VALUE``); ``serving``: the project of a run about to be submitted, whose steps
    the step cache has are left out when the cache is on (:mod:`.cache_hits`); ``project`` (or
    ``serving``): the project as the command opened it in ``at``'s env, not opened again."""
    from kvx_runtime.compiler import compile_pipeline

    return compile_pipeline(compile_request(at, options, storage_root, values, serving=serving, project=project))


def refuse_warnings(warnings: list[str], written: str) -> None:
    """``--strict``: every compile warning (a trap that would fail in the cloud) is exit 2,
    nothing ``written`` (what the compile would have written: "spec", "DAG")."""
    if not warnings:
        return
    from kvx_runtime.errors import UsageError

    count = len(warnings)
    raise UsageError(
        f"--strict: {count} warning{'s' if count != 1 else ''} (above): {'; '.join(warnings[:5])}"
        + (f" and {count - 5} more" if count > 5 else "") + f"; no {written} written",
        hint="fix what each warning says, or compile without --strict",
    )


# --- compile -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompileSpecRequest:
    at: Invocation
    options: PipelineOptions = field(default_factory=PipelineOptions)
    storage_root: str | None = None
    output: str = "pipeline.json"
    #: Every warning (a trap that would fail in the cloud) is an error: for CI.
    strict: bool = False
    #: The project as the command opened it (see :func:`compile_for`).
    project: KedroProject | None = None


def compile_spec(request: CompileSpecRequest) -> Path:
    """Compile for the command's target and write the spec (with the target's Kubernetes
    platform spec when it applies one and the file is YAML); returns the file written."""
    from kvx_runtime.compiler import write_spec

    target = request.at.target
    compiled = compile_for(request.at, request.options, request.storage_root, project=request.project)
    if request.strict:
        refuse_warnings(compiled.warnings, "spec")
    platform = compiled.platform_spec if target.applies_platform_spec else None
    if platform and Path(request.output).suffix not in {".yaml", ".yml"}:
        from kvx_runtime.log import get_logger

        get_logger(__name__).warning("run_config.kubernetes is left out of a JSON spec (and so are the GPU "
                                     "node selectors): write .yaml (-o pipeline.yaml) for KFP to apply it",
                                     output=str(request.output))
        platform = None
    path = write_spec(compiled.spec, request.output, platform)
    from kvx_runtime.compiler.kfp_reader import describe_steps, step_names

    click.echo(f"Pipeline spec with {describe_steps(step_names(compiled.spec))} written to {path}")
    return path


@click.command("compile", cls=KvxCommand)
@project_path_option
@env_option
@pipeline_options
@click.option("--storage-root", default=None, help="Default storage root of the run (default: run_config.root).")
@click.option("-o", "--output", default="pipeline.json", show_default=True,
              help="Where to write the spec: JSON, or YAML for .yaml/.yml.")
@click.option("--strict", is_flag=True,
              help="Exit 2 on any warning (a trap that would fail in the cloud), writing no spec: for CI.")
@click.pass_context
def compile_command(ctx: click.Context, project_path: str | None, env: str | None, pipeline: str,
                    image: str | None, params: tuple[str, ...], load_versions: tuple[str, ...],
                    code_upload: bool | None, cache: str | None, storage_root: str | None, output: str,
                    strict: bool) -> None:
    """Compile a Kedro pipeline into a Vertex AI / Kubeflow pipeline spec."""
    compile_spec(CompileSpecRequest(
        at=invocation(ctx, project_path, env),
        options=PipelineOptions(pipeline, image, params, load_versions, code_upload, cache),
        storage_root=storage_root, output=output, strict=strict,
    ))


# --- run-local -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunLocalRequest:
    at: Invocation
    #: The compiled spec to run; None: compile the project's pipeline first (``options``).
    spec: str | None = None
    options: PipelineOptions = field(default_factory=PipelineOptions)
    overrides: tuple[str, ...] = ()  # NAME=VALUE
    storage_root: str | None = None
    max_parallel: int = 4
    job_name: str | None = None
    fail_fast: bool = False
    #: Each step in a fresh copy of what the project's image holds (as on separate machines).
    fresh_copies: bool = False
    #: Run job ``job_name`` again as the same run, keeping the steps it finished.
    resume: bool = False


def run_local_spec(request: RunLocalRequest) -> None:
    """Run the spec here, each step a process; a failed step fails with its own exit code."""
    from kvx_runtime.compiler import read_spec
    from kvx_runtime.config import LOCAL_STATE_DIR, local_storage_root, resolve_storage_root
    from kvx_runtime.errors import NodeError
    from kvx_runtime.local_runner import parse_overrides, run_local
    from kvx_runtime.local_runner.runner import QuietWhenReaderGone, claim_job, job_held, release_job_name

    project = request.at.project_path or os.getcwd()
    root = resolve_storage_root(request.storage_root, None, required=True, default=local_storage_root(project))
    spec = request.spec
    compiled_from = None
    if spec is None:
        from kvx_runtime.project import open_project

        # Opened once: the compile and the step cache's serving share it.
        compiled_from = open_project(request.at.project_path, request.at.env)
        # Steps run here, whatever the group: compiled as for the default target, any image.
        spec = str(compile_spec(CompileSpecRequest(
            at=replace(request.at, target=default_target()),
            options=replace(request.options, image=request.options.image or "local"),
            storage_root=root, output=os.path.join(project, LOCAL_STATE_DIR, "pipeline.json"),
            project=compiled_from,
        )))
    spec_data = read_spec(spec)
    params = parse_overrides(request.overrides)
    job_name = claim_job(project, request.job_name, spec_data, resume=request.resume)
    run_id = str(uuid.uuid4())
    assert root is not None  # required
    output = cast(TextIO, QuietWhenReaderGone(sys.stdout))
    try:
        with job_held(project, job_name):
            served = {} if request.resume else _serve_cached_steps(request, spec_data, root, run_id, job_name,
                                                                   compiled_from)
            result = run_local(
                spec_data,
                project,
                params=params,
                storage_root=root,
                max_parallel=request.max_parallel,
                job_name=job_name,
                stream=output,
                fail_fast=request.fail_fast,
                fresh_copies=request.fresh_copies,
                extra_env={"KVX_CACHE": request.options.cache} if request.options.cache else None,
                run_id=run_id,
                served=served,
                resume=request.resume,
            )
    except BaseException:
        if not request.resume:  # the run directory claimed here, if nothing was left in it
            release_job_name(project, job_name)
        raise
    if result.exit_code:
        failed = result.failed_tasks or ([result.failed_task] if result.failed_task else ["(unknown)"])
        steps = f"step '{failed[0]}'" if len(failed) == 1 else f"steps {', '.join(map(repr, failed))}"
        error = NodeError(f"{steps} of job {result.job_name} failed")
        error.exit_code = result.exit_code  # type: ignore[assignment]  # the step's own code
        raise error
    click.echo(f"Job {result.job_name} succeeded (run id {result.run_id}); logs and step outputs in {result.run_dir}",
               file=output)


def _serve_cached_steps(request: RunLocalRequest, spec: Mapping[str, Any], root: str, run_id: str,
                        job_name: str, opened: KedroProject | None = None) -> dict[str, str]:
    """With the step cache on, the steps it has, served before the run starts (their processes
    never start): step -> the run they come from. Left to each step's exec-node (which serves a
    hit as well, after its start-up) when the run overrides parameters or runs uploaded code.
    ``opened``: the project as the compile of ``spec`` opened it (used when in the steps' env)."""
    from kvx_runtime.compiler.kfp_reader import build_graph
    from kvx_runtime.project import open_project
    from kvx_runtime.step.caching import cache_wanted, serve_before_run
    from kvx_runtime.step.identity import RunIdentity
    from kvx_runtime.step.invocation import ExecNodeInvocation, InvocationError

    if request.options.cache == "off" or request.overrides:
        return {}
    steps: dict[str, tuple[str, ...]] = {}
    invocations = []
    for task in build_graph(spec, {}).tasks.values():
        container = task.container
        try:
            invocation = ExecNodeInvocation.parse([*container.get("command", []), *container.get("args", [])])
        except InvocationError:
            continue  # the MLflow steps, the exit handler's
        if invocation.serve_steps:
            continue  # a cache-serve step serves its steps itself
        steps[task.name] = invocation.nodes
        invocations.append(invocation)
    if not invocations or any(item.params or item.code for item in invocations):
        return {}
    pipelines = {item.pipeline for item in invocations}
    envs = {item.env for item in invocations}
    load_versions = {item.load_versions for item in invocations}
    if len(pipelines) != 1 or len(envs) != 1 or len(load_versions) != 1:
        return {}
    env = next(iter(envs))
    project = opened if opened is not None and opened.env == env else open_project(request.at.project_path, env)
    if not cache_wanted(project, request.options.cache):
        return {}
    from kvx_runtime.versions import parse_load_versions

    return serve_before_run(project, next(iter(pipelines)), steps, root, RunIdentity(run_id, job_name),
                            load_versions=parse_load_versions(next(iter(load_versions))))


@click.command("run-local", cls=KvxCommand)
@click.argument("spec", required=False, type=click.Path(dir_okay=False, exists=True))
@project_path_option
@env_option
@pipeline_options
@click.option("--param", "overrides", multiple=True, metavar="NAME=VALUE",
              help="Override a pipeline parameter (pipeline or dotted Kedro name). Repeatable.")
@click.option("--storage-root", default=None, help="Storage root of the run (default: <project>/.kvx/storage).")
@click.option("--max-parallel", default=4, show_default=True, type=click.IntRange(min=1),
              help="Steps that may run at the same time.")
@click.option("--job-name", default=None, help="Job name (default: <pipeline>-<timestamp>).")
@fail_fast_option
@click.option("--fresh-copies", is_flag=True,
              help="Run each step in a fresh copy of what the project's image holds (its .dockerignore applied, "
              "else the project template's), as on separate machines: nothing a step leaves on its disk is there "
              "for the next.")
@click.option("--resume", "resume", default=None, metavar="JOB",
              help="Run the failed or interrupted job JOB again as the same run (its run id, save version and "
              "intermediates): the steps it finished are kept, the others run with the project as it is now.")
@click.pass_context
def run_local_command(ctx: click.Context, spec: str | None, project_path: str | None, env: str | None,
                      pipeline: str, image: str | None, params: tuple[str, ...], load_versions: tuple[str, ...],
                      code_upload: bool | None, cache: str | None,
                      overrides: tuple[str, ...], storage_root: str | None, max_parallel: int,
                      job_name: str | None, fail_fast: bool, fresh_copies: bool, resume: str | None) -> None:
    """Run a compiled pipeline spec here, each step a separate process (without SPEC: compile the
    project's pipeline first, to .kvx/pipeline.json)."""
    if resume is not None and job_name is not None and job_name != resume:
        from kvx_runtime.errors import UsageError

        raise UsageError("--resume names the job: --job-name cannot name another")
    run_local_spec(RunLocalRequest(
        at=invocation(ctx, project_path, env), spec=spec,
        options=PipelineOptions(pipeline, image, params, load_versions, code_upload, cache),
        overrides=overrides, storage_root=storage_root, max_parallel=max_parallel, job_name=resume or job_name,
        fail_fast=fail_fast, fresh_copies=fresh_copies, resume=resume is not None,
    ))


# --- what every target's init shares -------------------------------------------------------


def write_init_files(root: Path, files: Mapping[Path, str], force: bool, with_dockerfile: bool) -> None:
    """Write ``files`` (and with ``with_dockerfile`` the project's Dockerfile and .dockerignore);
    an existing file without ``force`` refuses them all before anything is written."""
    from kvx_runtime.errors import UsageError

    files = dict(files)
    if with_dockerfile:
        from kvx_runtime.dockerignore import in_conf_folder
        from kvx_runtime.project import conf_folder_of

        folder = conf_folder_of(root)
        for name, template in (("Dockerfile", "project.Dockerfile"), (".dockerignore", "project.dockerignore")):
            files[root / name] = in_conf_folder(template_text(template), folder)
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


def write_config_file(root: Path, target: TargetInfo, values: Mapping[str, str], force: bool,
                      with_dockerfile: bool) -> Path:
    """conf/base/<the target's config file>, from the template of that name filled with
    ``values`` (and ``package``, the project's package name as a label value)."""
    [config] = write_init(InitRequest(root, target, values, force, with_dockerfile))
    return config


@dataclass(frozen=True)
class CloudEnvOptions:
    """``--cloud-env NAME [--per-run]``: a Kedro env overlay putting local datasets under the
    storage root (:mod:`kvx_runtime.cloud_env`)."""

    name: str
    per_run: bool = False


@dataclass(frozen=True)
class InitRequest:
    """What a target's ``init`` writes: its config file from ``values`` (None: not asked for),
    the cloud env when asked, the Dockerfile when asked."""

    root: Path
    target: TargetInfo
    values: Mapping[str, str] | None
    force: bool = False
    with_dockerfile: bool = False
    cloud_env: CloudEnvOptions | None = None
    #: How the user reaches the target's commands (what the closing lines suggest).
    group: str = "kvx-runtime"
    #: ``--with-github-actions``: also .github/workflows/, authenticating to Google Cloud this
    #: way (``--github-auth``, :mod:`.ci_workflows`); None: not asked for.
    github_auth: str | None = None


class InitOptions(Protocol):
    """What every target's init request carries beside the target's own arguments."""

    @property
    def project_path(self) -> str | None: ...
    @property
    def force(self) -> bool: ...
    @property
    def with_dockerfile(self) -> bool: ...
    @property
    def cloud_env(self) -> str | None: ...
    @property
    def per_run(self) -> bool: ...
    @property
    def group(self) -> str: ...
    @property
    def with_github_actions(self) -> bool: ...
    @property
    def github_auth(self) -> str: ...


def init_target(target: TargetInfo, request: InitOptions, arguments: Mapping[str, str | None],
                config_values: Callable[[Path], Mapping[str, str]]) -> list[Path]:
    """A target's ``init``: its config file from ``arguments`` (by name, as the user typed them:
    all or none, see :func:`init_arguments_given`) through ``config_values(project root)``, which
    checks them (exit 2 before anything is written), and the cloud env when asked. Returns the
    files written."""
    root = Path(request.project_path or os.getcwd()).resolve()
    given = init_arguments_given(arguments, request.cloud_env, request.per_run,
                                 with_github_actions=request.with_github_actions)
    cloud_env = CloudEnvOptions(request.cloud_env, request.per_run) if request.cloud_env is not None else None
    github_auth = request.github_auth if request.with_github_actions else None
    return write_init(InitRequest(root, target, config_values(root) if given else None, request.force,
                                  request.with_dockerfile, cloud_env, request.group, github_auth))


def init_arguments_given(names: Mapping[str, str | None], cloud_env: str | None, per_run: bool, *,
                         with_github_actions: bool = False) -> bool:
    """Were a target's ``init`` arguments (``names``: argument -> value) given? All or none;
    none only with ``--cloud-env`` or ``--with-github-actions``, which also write their files
    alone (from the existing config file)."""
    from kvx_runtime.errors import UsageError

    missing = [name for name, value in names.items() if not value]
    if per_run and cloud_env is None:
        raise UsageError("--per-run is an option of --cloud-env", hint="add --cloud-env NAME")
    alone = cloud_env is not None or with_github_actions
    if missing and (len(missing) < len(names) or not alone):
        raise UsageError(f"missing argument{'s' if len(missing) > 1 else ''} {' '.join(missing)}",
                         hint=None if alone else "--cloud-env NAME or --with-github-actions alone writes only "
                         "the cloud env or the workflows")
    return not missing


def write_init(request: InitRequest) -> list[Path]:
    """Write what ``request`` asks for, refusing everything before anything is written (an
    existing file without ``force``: exit 2). With a cloud env an existing config file is kept,
    not refused: the overlay is what is asked for. Returns the files written."""
    from kvx_runtime.project import conf_folder_of, find_package_name

    root = request.root
    files: dict[Path, str] = {}
    name = request.target.config_files[0]
    config = root / conf_folder_of(root) / "base" / name
    kept = request.values is not None and request.cloud_env is not None and config.exists() and not request.force
    if request.values is not None and not kept:
        package = find_package_name(root).replace("_", "-")
        files[config] = template_text(name).format(package=package, **request.values)
    env = _plan_cloud_env(root, request.cloud_env) if request.cloud_env is not None else None
    if env is not None:
        files[env.path] = env.text
    workflows = None
    if request.github_auth is not None:
        from kvx_runtime.commands.ci_workflows import plan_workflows

        # The config this init writes, else the project's own: the workflows take its values.
        workflows = plan_workflows(root, request.target, request.group, files.get(config), request.github_auth,
                                   request.cloud_env.name if request.cloud_env is not None else None)
        files.update(workflows.files)
    write_init_files(root, files, request.force, request.with_dockerfile)
    if kept:
        click.echo(f"{config.relative_to(root)} exists: kept as it is (--force rewrites it)")
    if env is not None:
        _explain_cloud_env(env, request.group)
    if workflows is not None:
        click.echo(workflows.setup)
    return list(files)


def _plan_cloud_env(root: Path, options: CloudEnvOptions) -> CloudEnv:
    """The overlay for the project at ``root`` (opened as the env will see it)."""
    from kvx_runtime.cloud_env import plan_cloud_env
    from kvx_runtime.config_loader import EnvTemplatingMixin
    from kvx_runtime.project import conf_folder_of, install_templating, open_project

    env_dir = root / conf_folder_of(root) / options.name
    project = open_project(root, options.name if env_dir.is_dir() else None, needed=(), templating=False)
    from kedro.framework.project import settings  # after open_project: it keeps Kedro's logging quiet

    loader_class = settings.CONFIG_LOADER_CLASS
    fills = isinstance(loader_class, type) and issubclass(loader_class, EnvTemplatingMixin)
    if not install_templating(settings):
        from kvx_runtime.errors import ConfigError

        raise ConfigError("the project's config loader cannot fill ${storage_root} (it is not Kedro's "
                          "OmegaConfigLoader, or KEDRO_VERTEXAI_DISABLE_CONFIG_HOOK is set): no cloud env written")
    return plan_cloud_env(project, options.name, per_run=options.per_run, kedro_run_fills_placeholder=fills)


def _explain_cloud_env(env: CloudEnv, group: str) -> None:
    """One short block: what was redirected, which inputs to copy where, what to run next."""
    from kvx_runtime.cloud_env import CATALOG_FILE
    from kvx_runtime.config import LOCAL_STATE_DIR

    left = f", {len(env.left_out)} left as they are (listed in its header)" if env.left_out else ""
    count = len(env.redirected)
    lines = [f"conf/{env.name}/{CATALOG_FILE}: {count} catalog entr{'y' if count == 1 else 'ies'} under "
             f"${{storage_root}}{left}"]
    root = env.configured_root()  # after the config file this init may have written
    copy = env.copy_lines(root)
    if copy:
        lines += [f"Before the first run copy the pipelines' inputs to the storage root ({root or 'run_config.root'}):",
                  *copy, f"  (run-local's root is {LOCAL_STATE_DIR}/storage: copy them there too to rehearse here)"]
    if not env.kedro_run_fills_placeholder:
        lines.append(f"`kedro run --env {env.name}` needs kvx-runtime's config loader in settings.py: "
                     "CONFIG_LOADER_CLASS = EnvTemplatedConfigLoader (from kvx_runtime.config_loader)")
    lines.append(f"Next: {group} compile --env {env.name} --strict")
    click.echo("\n".join(lines))
