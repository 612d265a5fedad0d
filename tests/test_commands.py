"""The project commands as plain functions (kvx_runtime/commands/), the target registry, and
the one command class that maps exceptions to exit codes.

Bodies that talk to a target run in-process against the fake Kubeflow Pipelines API
(integration/fake_kfp.py), with a two-node Kedro project written by the test.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from kvx_runtime.commands import Invocation, KvxCommand, StepCommand, commands_for
from kvx_runtime.errors import ConfigError, NodeError, UsageError
from kvx_runtime.log import configure_logging
from kvx_runtime.targets.base import PipelineTarget
from kvx_runtime.targets.registry import TARGETS, default_target, get_target

TEMPLATES = Path(__file__).resolve().parents[1] / "kvx_runtime" / "templates"


# --- the registry ----------------------------------------------------------------------------


def test_an_unknown_target_is_a_usage_error_naming_the_known_ones() -> None:
    with pytest.raises(UsageError, match="unknown target 'argo'") as refused:
        get_target("argo")
    assert "vertex, kubeflow, airflow" in str(refused.value) and refused.value.exit_code == 2


def test_every_target_is_complete_and_one_is_the_default() -> None:
    assert default_target() is TARGETS["vertex"]
    groups = [target.command_group for target in TARGETS.values()]
    assert groups.count(None) == 1 and len(set(groups)) == len(groups)
    for target in TARGETS.values():
        commands = {command.name: command for command in commands_for(target)}
        if target.client is None:  # no API client: none of the commands that need one
            assert not {"run-once", "schedule", "status", "cancel", "list-pipelines", "ui"} & set(commands)
        else:
            assert issubclass(target.client_class(), PipelineTarget)
        assert (TEMPLATES / target.config_files[0]).is_file()  # what its init writes
        assert isinstance(commands["init"], KvxCommand) and isinstance(commands["compile"], KvxCommand)
        assert target.spec_format == ("airflow-dag" if target.name == "airflow" else "kfp")


def test_a_target_without_a_client_says_so_in_one_line() -> None:
    offline = dataclasses.replace(TARGETS["airflow"], client=None)
    with pytest.raises(UsageError, match="the airflow target has no API client in this version") as refused:
        offline.client_class()
    assert refused.value.exit_code == 2


def test_a_targets_own_command_replaces_the_shared_one_of_its_name() -> None:
    from kvx_runtime.commands.airflow_compile import compile_command as airflow_compile

    airflow = {command.name: command for command in commands_for(TARGETS["airflow"])}
    assert airflow["compile"] is airflow_compile and "--operator" in {o for p in airflow_compile.params
                                                                       for o in p.opts}
    assert airflow["run-local"] is next(c for c in commands_for(TARGETS["vertex"]) if c.name == "run-local")
    from kvx_runtime.commands import airflow_service

    # A DAG's schedule and params live in its file: Airflow publishes before it runs or schedules.
    assert airflow["run-once"] is airflow_service.run_once_command
    assert airflow["schedule"] is airflow_service.schedule_command
    assert airflow["upload-pipeline"] is airflow_service.upload_pipeline_command
    vertex = {command.name: command for command in commands_for(TARGETS["vertex"])}
    assert airflow["status"] is vertex["status"] and airflow["cancel"] is vertex["cancel"]


def test_a_target_whose_client_cannot_be_imported_exits_2_with_the_install_hint() -> None:
    from kvx_runtime.config import PluginConfig

    missing = dataclasses.replace(TARGETS["kubeflow"], client="kvx_airflow_not_installed.client:AirflowTarget",
                                  install_hint='pip install "kvx-runtime[airflow]"')
    with pytest.raises(ConfigError, match="the kubeflow target cannot be loaded: kvx_airflow_not_installed is not "
                       "installed") as refused:
        missing.build(PluginConfig())
    assert 'kvx-runtime[airflow]' in str(refused.value)

    @click.command("status", cls=KvxCommand)
    def status() -> None:
        missing.build(PluginConfig())

    configure_logging()
    result = CliRunner().invoke(status, [])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "status failed: the kubeflow target cannot be loaded" in result.output


# --- the command class -----------------------------------------------------------------------


def _raising(error: BaseException | None, cls: type[click.Command] = KvxCommand) -> click.Command:
    @click.command("exec-node", cls=cls)
    def command() -> None:
        if error is not None:
            raise error
        click.echo("done")

    return command


@pytest.mark.parametrize(("error", "code"), [
    (None, 0),
    (ConfigError("bad vertexai.yml"), 2),
    (NodeError("node raised"), 1),
    (RuntimeError("a bug"), 1),
])
def test_the_command_class_maps_exceptions_to_exit_codes_once(error: BaseException | None, code: int) -> None:
    configure_logging()
    group = click.Group("kvx-runtime", commands=[_raising(error)])
    result = CliRunner().invoke(group, ["exec-node"])
    assert result.exit_code == code, result.output
    if error is None:
        assert result.output == "done\n"
    elif isinstance(error, RuntimeError):
        assert "kvx-runtime exec-node failed with an internal error: RuntimeError: a bug" in result.output
    else:
        assert f"kvx-runtime exec-node failed: {error}" in result.output


def test_a_step_command_names_itself_alone() -> None:
    configure_logging()
    group = click.Group("kvx-runtime", commands=[_raising(ConfigError("bad"), StepCommand)])
    result = CliRunner().invoke(group, ["exec-node"])
    assert result.exit_code == 2
    assert "exec-node failed: bad" in result.output and "kvx-runtime exec-node failed" not in result.output


def test_every_command_of_every_front_end_runs_under_the_command_class() -> None:
    from kvx_runtime.cli import cli
    from kvx_runtime.kedro_plugin import commands

    def leaves(group: click.Group) -> Iterator[click.Command]:
        for command in group.commands.values():
            if isinstance(command, click.Group):
                yield from leaves(command)
            else:
                yield command

    every = [*leaves(cli), *leaves(commands)]
    assert len(every) > 40 and all(isinstance(command, KvxCommand) for command in every)
    steps = {command.name for command in leaves(cli) if isinstance(command, StepCommand)}
    assert steps == {"exec-node", "mlflow-start", "mlflow-end", "fingerprint"}


def test_a_targets_group_hides_the_options_it_lacks_and_leaves_out_its_unsupported_commands() -> None:
    vertex, kubeflow = commands_for(TARGETS["vertex"]), commands_for(TARGETS["kubeflow"])
    assert "gc" in {c.name for c in vertex} and "gc" not in {c.name for c in kubeflow}
    vertex_run_once = next(c for c in vertex if c.name == "run-once")
    kubeflow_run_once = next(c for c in kubeflow if c.name == "run-once")
    hidden = {p.name for p in kubeflow_run_once.params if getattr(p, "hidden", False)}
    assert hidden == {"template"} and not any(getattr(p, "hidden", False) for p in vertex_run_once.params)
    # Commands without such options are shared as they are.
    assert next(c for c in kubeflow if c.name == "status") is next(c for c in vertex if c.name == "status")
    assert commands_for(TARGETS["kubeflow"]) is kubeflow  # one set of objects for every front-end


# --- init ------------------------------------------------------------------------------------


def _pyproject(root: Path) -> Path:
    root.mkdir()
    (root / "pyproject.toml").write_text('[tool.kedro]\npackage_name = "my_proj"\n')
    return root


def test_init_bodies_write_the_targets_config_file_and_refuse_a_half_done_init(tmp_path: Path, capsys) -> None:
    from kvx_runtime.commands.kubeflow_init import KubeflowInitRequest, init_kubeflow
    from kvx_runtime.commands.vertex_init import VertexInitRequest, init_vertex

    vertex_root, kubeflow_root = _pyproject(tmp_path / "vertex"), _pyproject(tmp_path / "kubeflow")
    [written] = init_vertex(VertexInitRequest("my-gcp", "europe-west4", str(vertex_root)))
    assert written == vertex_root / "conf" / "base" / "vertexai.yml"
    assert "project_id: my-gcp" in written.read_text()
    assert "conf/base/vertexai.yml written" in capsys.readouterr().out
    with pytest.raises(UsageError, match="already exists; nothing was written"):
        init_vertex(VertexInitRequest("my-gcp", "europe-west4", str(vertex_root), with_dockerfile=True))
    assert not (vertex_root / "Dockerfile").exists()

    [written] = init_kubeflow(KubeflowInitRequest("http://localhost:8080/", "team-a", str(kubeflow_root)))
    assert written.name == "kubeflow.yml" and "host: http://localhost:8080\n" in written.read_text()
    assert "namespace: 'team-a'" in written.read_text()
    with pytest.raises(UsageError, match="not a Kubernetes namespace name"):
        init_kubeflow(KubeflowInitRequest("http://localhost:8080", "Team A", str(kubeflow_root), force=True))
    (kubeflow_root / "conf" / "base" / "vertexai.yml").write_text("{}\n")
    with pytest.raises(UsageError, match="vertexai.yml exists: its settings win over a kubeflow.yml"):
        init_kubeflow(KubeflowInitRequest("http://localhost:8080", project_path=str(kubeflow_root), force=True))


# --- bodies that talk to a target: against the fake Kubeflow Pipelines API --------------------


@pytest.fixture
def kfp() -> Iterator[object]:
    from integration.fake_kfp import FakeKfp

    server = FakeKfp(auth="bearer").start()
    yield server
    server.stop()


@pytest.fixture
def kfp_project(tmp_path: Path, kfp, monkeypatch: pytest.MonkeyPatch) -> Path:
    from integration.conftest import make_project
    from integration.fake_kfp import BEARER_TOKEN

    monkeypatch.setenv("KF_PIPELINES_TOKEN", BEARER_TOKEN)
    monkeypatch.setenv("KVX_WATCH_INTERVAL", "0.01")
    monkeypatch.delenv("KEDRO_CONFIG_COMMIT_ID", raising=False)
    project = make_project(
        tmp_path, "tiny_commands",
        nodes_py="""
        def make():
            return 1

        def add_one(value):
            return value + 1
        """,
        pipeline_py="""
        from kedro.pipeline import Pipeline, node

        from tiny_commands.nodes import add_one, make


        def register_pipelines():
            return {"__default__": Pipeline([node(make, None, "a", name="make"),
                                             node(add_one, "a", "b", name="add_one")])}
        """,
    )
    (project / "conf" / "base" / "kubeflow.yml").write_text(textwrap.dedent(f"""
        host: {kfp.url}
        run_config:
          image: tiny:1
          root: s3://bucket/tiny
          experiment_name: tiny-experiment
          run_name: nightly
    """))
    return project


def _at(project: Path) -> Invocation:
    return Invocation(project_path=str(project), env="base", target=TARGETS["kubeflow"], group="kvx-runtime kfp")


def test_kfp_bodies_upload_run_list_show_cancel_against_the_fake(kfp, kfp_project: Path, capsys) -> None:
    from kvx_runtime.commands.service import (
        CancelRequest,
        ConsoleRequest,
        ListRunsRequest,
        RunOnceRequest,
        StatusRequest,
        UploadPipelineRequest,
        cancel_run,
        list_runs,
        run_once,
        show_console,
        show_status,
        upload_pipeline,
    )

    at = _at(kfp_project)
    upload_pipeline(UploadPipelineRequest(at, tags=("release",)))
    upload_pipeline(UploadPipelineRequest(at))
    out = capsys.readouterr().out
    assert "Uploaded tiny-commands as a new pipeline (pipeline " in out and "version release-v0.1-" in out
    assert "Uploaded tiny-commands as a new version" in out
    [pipeline_id] = kfp.pipelines
    assert len(kfp.versions[pipeline_id]) == 2

    run_once(RunOnceRequest(at, wait=False))
    [run] = kfp.runs.values()
    assert run["display_name"].startswith("nightly-")  # the target's run_once_name: run_config.run_name
    assert "Submitted " in capsys.readouterr().out

    list_runs(ListRunsRequest(at))
    assert run["run_id"] in capsys.readouterr().out
    show_console(ConsoleRequest(at))
    assert capsys.readouterr().out.strip() == f"{kfp.url}/#/runs".replace("/pipeline/#", "/_/pipeline/#")
    cancel_run(CancelRequest(at, run["run_id"]))
    assert f"`kvx-runtime kfp status {run['run_id']}` shows when it stopped" in capsys.readouterr().out
    with pytest.raises(NodeError, match=f"pipeline run {run['run_id']} CANCELLED"):  # exit 1: it did not succeed
        show_status(StatusRequest(at, run["run_id"]))
    assert capsys.readouterr().out.startswith(f"{run['run_id']}: CANCELLED")
    assert kfp.problems == []


def test_kfp_bodies_refuse_what_kfp_lacks_before_any_request(kfp, kfp_project: Path) -> None:
    from kvx_runtime.commands.service import RunOnceRequest, SchedulePipelineRequest, run_once, schedule_pipeline

    at = _at(kfp_project)
    before = len(kfp.requests)
    with pytest.raises(UsageError, match="--template is a Vertex AI"):
        run_once(RunOnceRequest(at, template="v1"))
    with pytest.raises(UsageError, match="runs schedules in UTC"):
        schedule_pipeline(SchedulePipelineRequest(at, cron="0 6 * * *", timezone="Europe/Paris"))
    assert kfp.requests[before:] == [] and kfp.runs == {} and kfp.recurring == {}


def test_vertex_upload_without_a_template_repository_is_refused_before_compiling() -> None:
    from kvx_runtime.config import PluginConfig, RunConfig
    from kvx_runtime.targets.vertex import VertexTarget

    target = TARGETS["vertex"].build(PluginConfig(project_id="p", region="europe-west1"))
    assert isinstance(target, VertexTarget)
    with pytest.raises(ConfigError, match="no run_config.template_repository"):
        target.check_upload()
    with pytest.raises(ConfigError, match="--template needs run_config.template_repository"):
        target.template_uri({"pipelineInfo": {"name": "p"}}, "v1")
    configured = TARGETS["vertex"].build(PluginConfig(
        project_id="p", region="europe-west1",
        run_config=RunConfig(template_repository="https://europe-west1-kfp.pkg.dev/p/repo/")))
    configured.check_upload()
    assert configured.template_uri({"pipelineInfo": {"name": "pipe"}}, "v1") == \
        "https://europe-west1-kfp.pkg.dev/p/repo/pipe/v1"
    assert configured.template_uri({}, None) is None and configured.run_once_name() is None
