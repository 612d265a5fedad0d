"""A step's GPU as each target reads it: the accelerator type itself (Vertex AI) or a Kubernetes
resource name plus GKE's node label (Kubeflow Pipelines)."""

from __future__ import annotations

from kvx_runtime.compiler.resources import ACCELERATOR_KEY, StepResources, gke_accelerator_label
from kvx_runtime.targets.registry import TARGETS, default_target


def test_vertex_ai_reads_the_accelerator_type() -> None:
    step = StepResources(gpu=2, accelerator="NVIDIA_TESLA_T4")
    assert step.to_spec()["accelerator"] == {"count": "2", "resourceCount": "2", "type": "NVIDIA_TESLA_T4",
                                             "resourceType": "NVIDIA_TESLA_T4"}
    assert step.node_selector() == {}


def test_kubernetes_reads_a_resource_name_and_a_node_label() -> None:
    gpu = TARGETS["kubeflow"].gpu_resource_name
    assert gpu == "nvidia.com/gpu" and default_target().gpu_resource_name is None
    step = StepResources(gpu=1, accelerator="NVIDIA_TESLA_T4")
    assert step.to_spec(gpu)["accelerator"] == {"count": "1", "resourceCount": "1", "type": gpu, "resourceType": gpu}
    assert step.node_selector(gpu) == {ACCELERATOR_KEY: "nvidia-tesla-t4"}
    # A GPU without a type: any GPU node.
    assert StepResources(gpu=1).node_selector(gpu) == {}
    assert StepResources(gpu=1).to_spec(gpu)["accelerator"]["resourceType"] == gpu
    assert StepResources(cpu="1").to_spec(gpu) == StepResources(cpu="1").to_spec()


def test_gke_label_values() -> None:
    assert gke_accelerator_label("NVIDIA_L4") == "nvidia-l4"
    assert gke_accelerator_label("NVIDIA_A100_80GB") == "nvidia-a100-80gb"
    assert gke_accelerator_label("nvidia-tesla-t4") == "nvidia-tesla-t4"
