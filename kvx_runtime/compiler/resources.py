"""Per-step settings chosen by node name, tag or ``__default__``: resources, accelerators,
retry policies. More specific wins: a node's own entry over its tags', tags over the default."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from kvx_runtime.config import ResourceSpec, RetrySpec
from kvx_runtime.errors import ConfigError

T = TypeVar("T")
DEFAULT = "__default__"
#: The node label of GKE naming a node's accelerator: in ``run_config.node_selectors``, the
#: step's accelerator type (as Vertex AI names it, NVIDIA_TESLA_T4).
ACCELERATOR_KEY = "cloud.google.com/gke-accelerator"
_MEMORY_UNITS = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


def cpu_cores(text: str) -> float:
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_bytes(text: str) -> float:
    match = re.match(r"^(\d+(?:\.\d+)?)([A-Za-z]*)$", text)
    if not match:  # pragma: no cover - validated by the config schema
        raise ValueError(text)
    return float(match.group(1)) * _MEMORY_UNITS[match.group(2)]


def _layers(table: Mapping[str, T], node: str, tags: Iterable[str]) -> list[T]:
    """Entries that apply to ``node``, least specific first."""
    layers = [table[DEFAULT]] if DEFAULT in table else []
    layers += [table[tag] for tag in sorted(tags) if tag in table]
    if node in table:
        layers.append(table[node])
    return layers


def node_resources(table: Mapping[str, ResourceSpec], node: str, tags: Iterable[str]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in _layers(table, node, tags):
        merged.update({k: v for k, v in layer.model_dump(exclude_none=True).items() if k in {"cpu", "memory", "gpu"}})
    return merged


def node_selectors(table: Mapping[str, Mapping[str, str]], node: str, tags: Iterable[str]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for layer in _layers(table, node, tags):
        merged.update(layer)
    return merged


def node_retry(table: Mapping[str, RetrySpec], node: str, tags: Iterable[str]) -> RetrySpec | None:
    layers = _layers(table, node, tags)
    return layers[-1] if layers else None


@dataclass(frozen=True)
class StepResources:
    cpu: str | None = None
    memory: str | None = None
    gpu: int | None = None
    accelerator: str | None = None
    #: ``run_config.node_selectors``' other labels, sorted: what the step's Kubernetes pod needs
    #: of its node on targets that schedule pods themselves (Airflow); KFP and Vertex AI leave them.
    node_labels: tuple[tuple[str, str], ...] = ()

    def to_spec(self, gpu_resource_name: str | None = None) -> dict[str, Any]:
        """The ``PipelineContainerSpec.ResourceSpec`` JSON (limits and requests alike). The
        accelerator's type is ``gpu_resource_name`` where the target asks for GPUs by Kubernetes
        resource name (KFP: ``nvidia.com/gpu``, the type going to :meth:`node_selector`), else
        the accelerator type itself (Vertex AI)."""
        spec: dict[str, Any] = {}
        if self.cpu:
            cores = cpu_cores(self.cpu)
            spec.update(cpuLimit=cores, cpuRequest=cores,
                        resourceCpuLimit=self.cpu, resourceCpuRequest=self.cpu)
        if self.memory:
            gigabytes = memory_bytes(self.memory) / 10**9
            spec.update(memoryLimit=gigabytes, memoryRequest=gigabytes,
                        resourceMemoryLimit=self.memory, resourceMemoryRequest=self.memory)
        if self.gpu or self.accelerator:
            count = str(self.gpu or 1)
            accelerator: dict[str, Any] = {"count": count, "resourceCount": count}
            # Both spellings: KFP releases before resourceType existed read type and count.
            kind = gpu_resource_name or self.accelerator
            if kind:
                accelerator.update(type=kind, resourceType=kind)
            spec["accelerator"] = accelerator
        return spec

    def node_selector(self, gpu_resource_name: str | None = None) -> dict[str, str]:
        """The node labels a Kubernetes pod of this step needs where GPUs are asked for by
        resource name: the accelerator type as GKE labels its nodes (nvidia-tesla-t4)."""
        if not gpu_resource_name or not self.accelerator:
            return {}
        return {ACCELERATOR_KEY: gke_accelerator_label(self.accelerator)}

    def pod_node_selector(self, gpu_resource_name: str) -> dict[str, str]:
        """Every node label of a pod the target schedules itself: the configured labels and
        the accelerator's (Airflow's pods)."""
        return {**dict(self.node_labels), **self.node_selector(gpu_resource_name)}

    def requests(self, gpu_resource_name: str) -> dict[str, str]:
        """Kubernetes requests (and limits: the same) of the step's container."""
        amounts = {"cpu": self.cpu, "memory": self.memory}
        if self.gpu or self.accelerator:
            amounts[gpu_resource_name] = str(self.gpu or 1)
        return {name: value for name, value in amounts.items() if value}


def gke_accelerator_label(accelerator: str) -> str:
    """GKE's node label value for an accelerator type as Vertex AI names it
    (NVIDIA_TESLA_T4 -> nvidia-tesla-t4; a label value is kept as it is)."""
    return accelerator.lower().replace("_", "-")


def group_resources(per_node: list[dict[str, Any]], selectors: list[dict[str, str]]) -> StepResources:
    """A group step gets the largest request of its nodes, field by field. ``gpu: 0`` said
    explicitly by every node that says anything is no GPU, whatever accelerator a selector
    names (a ``__default__`` one, say): the step asks for no accelerator."""
    cpu = max((r["cpu"] for r in per_node if "cpu" in r), key=cpu_cores, default=None)
    memory = max((r["memory"] for r in per_node if "memory" in r), key=memory_bytes, default=None)
    gpus = [r["gpu"] for r in per_node if r.get("gpu") is not None]
    gpu = max(gpus) if gpus else None
    accelerators = sorted({s[ACCELERATOR_KEY] for s in selectors if ACCELERATOR_KEY in s})
    labels: dict[str, str] = {}
    for selector in selectors:  # one group's nodes agree on each label (check_group_agrees)
        labels.update((key, value) for key, value in selector.items() if key != ACCELERATOR_KEY)
    accelerator = accelerators[-1] if accelerators and gpu != 0 else None
    return StepResources(cpu=cpu, memory=memory, gpu=gpu or None, accelerator=accelerator,
                         node_labels=tuple(sorted(labels.items())))


def check_group_agrees(step: str, nodes: Sequence[str], selectors: Sequence[Mapping[str, str]]) -> None:
    """The nodes of one step run in one container on one machine: they cannot want different
    accelerators or node labels (a grouping by tag that put them together is refused, where
    the step would silently get one node's and the other nodes a machine they did not ask for)."""
    for key in sorted({key for selector in selectors for key in selector}):
        wanted: dict[str, list[str]] = {}
        for node, selector in zip(nodes, selectors, strict=True):
            if key in selector:
                wanted.setdefault(selector[key], []).append(node)
        if len(wanted) > 1:
            which = "; ".join(f"{value}: {', '.join(names)}" for value, names in sorted(wanted.items()))
            raise ConfigError(f"step {step} groups nodes whose run_config.node_selectors disagree on {key} ({which})",
                              hint="give them the same value, or group them apart (run_config.grouping, their tags)")
