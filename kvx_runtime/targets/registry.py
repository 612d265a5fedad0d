"""The pipeline services kvx-runtime can target, each declared once (fsspec's
``known_implementations`` is the model: a name, a lazy import path, an install hint).

An entry says everything the commands would otherwise decide by testing the target's name:
which command group reaches it, which client class talks to it (imported only when a command
needs it, so ``exec-node`` never pays for a client), its config file, the spec format its
renderer takes, the options it does not offer, the local mounts its steps share, whether it
applies ``run_config.kubernetes`` from the spec file, how its steps ask for GPUs, and its
``init`` command. Adding a target
is one entry here plus its own modules (docs/architecture.md, "Adding a target").

This module imports nothing heavy: ``kvx_runtime.cli`` reads it at start-up.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvx_runtime.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from kvx_runtime.config import PluginConfig
    from kvx_runtime.targets.base import PipelineTarget

__all__ = ["ONE_MACHINE", "TARGETS", "VERTEX_SHARED_MOUNTS", "TargetInfo", "default_target", "get_target",
           "load_object"]

#: Vertex AI's Cloud Storage FUSE mount, which every step of a Vertex AI pipeline sees.
VERTEX_SHARED_MOUNTS: tuple[str, ...] = ("/gcs/",)
#: Steps that all run on one machine in one project directory (Airflow's ``--operator local``):
#: every path is shared (every path starts with "").
ONE_MACHINE: tuple[str, ...] = ("",)


@dataclass(frozen=True)
class TargetInfo:
    """One pipeline service, as the commands see it."""

    #: What the command groups record as the target of their commands (``ctx.obj["target"]``).
    name: str
    #: ``module:ClassName`` of its :class:`~kvx_runtime.targets.base.PipelineTarget`, imported
    #: lazily; None: no API client (yet): its group offers only the commands that need none.
    client: str | None
    #: What to install when the client cannot be imported.
    install_hint: str
    #: The ``kedro <group> ...`` group of the kedro plugin (the plugin family's names), its help.
    kedro_group: str
    kedro_group_help: str
    #: ``module:attribute`` of its ``init`` command, which writes ``config_files[0]`` from the
    #: template of that name (kvx_runtime/templates/).
    init_command: str
    #: The plugin config files it is configured by, in conf/<env>/; ``init`` writes the first.
    config_files: tuple[str, ...]
    #: The group under ``kvx-runtime`` (``kvx-runtime kfp ...``), its help; None: the default
    #: target, whose commands are kvx-runtime's own.
    command_group: str | None = None
    command_group_help: str = ""
    #: The spec format its renderer takes ("kfp": a KFP v2 pipeline spec).
    spec_format: str = "kfp"
    #: Options of the shared commands it does not offer: hidden from its help (the client still
    #: refuses them with its own line, since a schedule's config can set them too).
    unsupported_options: frozenset[str] = frozenset()
    #: Shared commands its group leaves out.
    unsupported_commands: frozenset[str] = frozenset()
    #: ``module:attribute`` of commands of its own, each replacing the shared command of its
    #: name (Airflow's ``compile`` writes a DAG file, with options of its own).
    own_commands: tuple[str, ...] = ()
    #: Local paths every step sees (Vertex AI's Cloud Storage FUSE mount): a dataset there is
    #: shared between steps, anywhere else it is on the step machine's own disk.
    shared_mounts: tuple[str, ...] = ()
    #: It applies ``run_config.kubernetes``, read from the spec file's second YAML document
    #: (KFP's platform spec); elsewhere the setting is left out of the file.
    applies_platform_spec: bool = False
    #: The Kubernetes resource name its steps ask GPUs by, the accelerator type
    #: (``cloud.google.com/gke-accelerator`` in ``run_config.node_selectors``) becoming a node
    #: selector of the platform spec; None: the accelerator type itself is asked for (Vertex AI).
    gpu_resource_name: str | None = None
    #: Seconds a step spends before its node starts (a machine or pod, the image, Python): what
    #: fusing nodes saves (``run_config.grouping.cls: auto`` weighs it; its params can override).
    step_start_seconds: float = 20.0

    def client_class(self) -> type[PipelineTarget]:
        """The client class, imported now; a missing dependency is a ConfigError with the install hint."""
        if self.client is None:
            raise UsageError(f"the {self.name} target has no API client in this version",
                             hint="its group's commands that need none (compile, init, doctor, run-local) work")
        client: type[PipelineTarget] = load_object(self.client, what=f"the {self.name} target",
                                                   install_hint=self.install_hint)
        return client

    def build(self, config: PluginConfig) -> PipelineTarget:
        """The client for a project whose plugin config is ``config``."""
        return self.client_class().from_config(config)


#: Every known target, by name. The one without a command group is the default: the commands
#: at the top of ``kvx-runtime`` and ``kedro vertexai`` talk to it.
TARGETS: Mapping[str, TargetInfo] = {
    "vertex": TargetInfo(
        name="vertex",
        client="kvx_runtime.targets.vertex:VertexTarget",
        install_hint='pip install "kvx-runtime" (Vertex AI needs google-auth and requests)',
        kedro_group="vertexai",
        kedro_group_help="Compile, run and watch Kedro pipelines on Vertex AI / Kubeflow Pipelines (kvx-runtime).",
        init_command="kvx_runtime.commands.vertex_init:init_command",
        config_files=("vertexai.yml",),
        shared_mounts=VERTEX_SHARED_MOUNTS,
        step_start_seconds=60.0,  # a CustomJob's machine: about a minute before the node starts
    ),
    "kubeflow": TargetInfo(
        name="kubeflow",
        client="kvx_runtime.targets.kubeflow:KubeflowTarget",
        install_hint='pip install "kvx-runtime" (Kubeflow Pipelines needs requests)',
        kedro_group="kubeflow",
        kedro_group_help="Compile, run and watch Kedro pipelines on Kubeflow Pipelines (kvx-runtime).",
        init_command="kvx_runtime.commands.kubeflow_init:init_command",
        config_files=("kubeflow.yml",),
        command_group="kfp",
        command_group_help="The same project commands against Kubeflow Pipelines (host and run_config.namespace, "
        "experiment_name in vertexai.yml or kubeflow.yml; auth from the environment, docs/kubeflow.md).",
        unsupported_options=frozenset({"template", "timezone", "max_run_count", "allow_queueing"}),
        unsupported_commands=frozenset({"gc"}),
        applies_platform_spec=True,
        gpu_resource_name="nvidia.com/gpu",
    ),
    "airflow": TargetInfo(
        name="airflow",
        client="kvx_runtime.targets.airflow:AirflowTarget",
        install_hint='pip install "kvx-runtime" (Airflow needs requests; gs:// DAG folders gcsfs); where Airflow '
        'runs, "apache-airflow-providers-cncf-kubernetes>=10,<11" (Cloud Composer 3 has it)',
        kedro_group="airflow-k8s",
        kedro_group_help="Compile Kedro pipelines into Airflow 3 / Cloud Composer DAGs, publish, run and watch "
        "them (kvx-runtime).",
        init_command="kvx_runtime.commands.airflow_init:init_command",
        config_files=("airflow-k8s.yml", "airflow.yml"),
        command_group="airflow",
        command_group_help="The project's pipeline as an Airflow 3 DAG whose tasks run exec-node, as Kubernetes "
        "pods or worker subprocesses: compile, publish, run, schedule, watch (airflow-k8s.yml; docs/airflow.md).",
        spec_format="airflow-dag",
        # Airflow has no template repository, and a DAG's schedule lives in the DAG file.
        unsupported_options=frozenset({"template", "timezone", "max_run_count", "allow_queueing"}),
        unsupported_commands=frozenset({"gc"}),
        own_commands=("kvx_runtime.commands.airflow_compile:compile_command",
                      "kvx_runtime.commands.airflow_service:run_once_command",
                      "kvx_runtime.commands.airflow_service:schedule_command",
                      "kvx_runtime.commands.airflow_service:upload_pipeline_command"),
        gpu_resource_name="nvidia.com/gpu",
    ),
}


def get_target(name: str) -> TargetInfo:
    """The target called ``name``; an unknown name is a UsageError naming the known ones."""
    try:
        return TARGETS[name]
    except KeyError:
        raise UsageError(f"unknown target {name!r}", hint=f"known targets: {', '.join(TARGETS)}") from None


def default_target() -> TargetInfo:
    """The target of the commands outside any target's group."""
    [default] = [target for target in TARGETS.values() if target.command_group is None]
    return default


def load_object(path: str, *, what: str, install_hint: str) -> Any:
    """The attribute ``path`` (``module:attribute``) names, importing its module now. A module
    that cannot be imported (a dependency not installed) is a ConfigError (exit 2) with
    ``install_hint``, never a traceback."""
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = f"{exc.name} is not installed" if exc.name else str(exc)
        raise ConfigError(f"{what} cannot be loaded: {missing}", hint=install_hint) from None
    return getattr(module, attribute)
