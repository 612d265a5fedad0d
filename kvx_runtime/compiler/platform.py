"""The Kubernetes platform spec of a compiled pipeline: pod settings that only Kubeflow
Pipelines applies, beside the pipeline spec that both targets read.

Its shape is kfp-pipeline-spec's ``PlatformSpec`` holding, per executor, a kfp-kubernetes
``KubernetesExecutorConfig`` (proto3 JSON names). KFP takes it as a second YAML document of an
uploaded pipeline, and in a run's ``pipeline_spec`` as ``{"pipeline_spec", "platform_spec"}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["kubernetes_platform_spec", "with_platform_spec"]


def kubernetes_platform_spec(spec: Mapping[str, Any], kubernetes: Any,
                             node_selectors: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, Any] | None:
    """The platform spec giving every executor of ``spec`` what ``run_config.kubernetes`` asks
    for, and an executor of ``node_selectors`` (executor label -> node labels) its node
    selector; None when nothing is asked for."""
    secrets = [
        {
            # secretName for KFP releases before secretNameParameter existed; newer read either.
            "secretName": secret.secret_name,
            "secretNameParameter": {"runtimeValue": {"constant": secret.secret_name}},
            "keyToEnv": [{"secretKey": key, "envVar": variable} for key, variable in secret.keys.items()],
            **({"optional": True} if secret.optional else {}),
        }
        for secret in kubernetes.secrets_as_env
    ]
    selectors = node_selectors or {}
    configs: dict[str, dict[str, Any]] = {}
    for label in spec.get("deploymentSpec", {}).get("executors", {}):
        config: dict[str, Any] = {}
        if secrets:
            config["secretAsEnv"] = [dict(secret) for secret in secrets]
        if selectors.get(label):
            config["nodeSelector"] = {"labels": dict(selectors[label])}
        if config:
            configs[label] = config
    if not configs:
        return None
    return {"platforms": {"kubernetes": {"deploymentSpec": {"executors": configs}}}}


def with_platform_spec(spec: Mapping[str, Any], platform: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a KFP run or recurring run carries as its ``pipeline_spec``."""
    if not platform:
        return dict(spec)
    return {"pipeline_spec": dict(spec), "platform_spec": dict(platform)}
