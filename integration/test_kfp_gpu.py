"""A GPU asked for in ``run_config.resources`` as each target reads it: on Kubeflow Pipelines
``nvidia.com/gpu`` in the pod's limits plus a GKE node selector for the accelerator type in the
platform spec (checked by the fake KFP, which also receives it), on Vertex AI the accelerator
type itself, unchanged."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from integration.conftest import KVX, step_env
from integration.fake_kfp import BEARER_TOKEN, FakeKfp, check_accelerators, check_platform_spec

pytestmark = pytest.mark.slow

#: Added to the example's own resources (which give the training node cpu and memory).
GPU_CONFIG = """
      gpu: 2
  node_selectors:
    data_science.train_model_node: {cloud.google.com/gke-accelerator: NVIDIA_TESLA_T4}
"""
TRAIN = "exec-data-science-train-model-node"


def _kvx(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*KVX, *args], cwd=project, env=step_env(KVX_LOG_FORMAT="json", **env),
                          capture_output=True, text=True, timeout=300)


def _with_gpu(project: Path) -> Path:
    config = project / "conf" / "base" / "vertexai.yml"
    config.write_text(config.read_text().replace("      memory: 4Gi\n", "      memory: 4Gi" + GPU_CONFIG, 1))
    return config


def test_a_gpu_step_compiles_as_kfp_and_vertex_ai_read_it(example_project: Path) -> None:
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    _with_gpu(example_project)
    compiled = _kvx(example_project, "kfp", "compile", "-o", "kfp.yaml")
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    spec, platform = yaml.safe_load_all((example_project / "kfp.yaml").read_text())
    label = TRAIN
    executors = spec["deploymentSpec"]["executors"]
    assert executors[label]["container"]["resources"]["accelerator"] == {
        "count": "2", "resourceCount": "2", "type": "nvidia.com/gpu", "resourceType": "nvidia.com/gpu"}
    json_format.ParseDict(executors[label], pipeline_spec_pb2.PipelineDeploymentConfig.ExecutorSpec())
    configs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    # Only the GPU step gets a node selector (and no secrets are asked for here).
    assert configs == {label: {"nodeSelector": {"labels": {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}}}}
    assert check_accelerators(spec) == [] and check_platform_spec(spec, platform) == []
    others = [e for name, e in executors.items() if name != label]
    assert others and all("accelerator" not in e["container"].get("resources", {}) for e in others)

    # Vertex AI: the accelerator type itself, no platform spec.
    vertex = _kvx(example_project, "compile", "-o", "vertex.json")
    assert vertex.returncode == 0, vertex.stderr[-3000:]
    vertex_spec = yaml.safe_load((example_project / "vertex.json").read_text())
    assert vertex_spec["deploymentSpec"]["executors"][label]["container"]["resources"]["accelerator"] == {
        "count": "2", "resourceCount": "2", "type": "NVIDIA_TESLA_T4", "resourceType": "NVIDIA_TESLA_T4"}
    # ... which KFP would put in a pod's limits as is: the fake refuses it.
    problems = check_accelerators(vertex_spec)
    assert problems and all("'NVIDIA_TESLA_T4' is not a Kubernetes resource name" in p for p in problems)


def test_a_gpu_step_uploaded_to_kfp_keeps_its_node_selector(example_project: Path) -> None:
    server = FakeKfp(auth="bearer").start()
    try:
        config = _with_gpu(example_project)
        config.write_text(config.read_text() + f"\nhost: {server.url}\n")
        uploaded = _kvx(example_project, "kfp", "upload-pipeline", KF_PIPELINES_TOKEN=BEARER_TOKEN)
        assert uploaded.returncode == 0, uploaded.stderr[-3000:]
        [versions] = server.versions.values()
        stored = versions[0]["pipeline_spec"]
        spec, platform = stored["pipeline_spec"], stored["platform_spec"]
        label = TRAIN
        assert spec["deploymentSpec"]["executors"][label]["container"]["resources"]["accelerator"][
            "resourceType"] == "nvidia.com/gpu"
        selector = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][label]["nodeSelector"]
        assert selector == {"labels": {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}}
        assert server.problems == []
    finally:
        server.stop()
