"""The plugin configuration (``conf/<env>/vertexai.yml``) as typed, validated objects, and
where a command's storage root comes from.

- :mod:`~kvx_runtime.config.schema`: the typed sections and their defaults (and
  :mod:`~kvx_runtime.config.airflow`: ``airflow-k8s.yml``'s, a superset);
- :mod:`~kvx_runtime.config.validation`: a raw mapping checked leniently against the schema
  (key paths in errors, one warning for unknown keys, strict only for the keys a command needs);
- :mod:`~kvx_runtime.config.files`: finding, reading and merging a project's config files;
- :mod:`~kvx_runtime.config.storage_root`: the storage-root rule of every command.
"""

from __future__ import annotations

from typing import Any

from kvx_runtime.config.files import (
    AIRFLOW_CONFIG_PATTERNS,
    CONFIG_PATTERNS,
    KUBEFLOW_CONFIG_PATTERNS,
    load_plugin_config,
    read_raw_plugin_config,
    schema_of,
)
from kvx_runtime.config.schema import (
    DynamicConfigProviderSpec,
    GroupingConfig,
    HostAlias,
    KubernetesConfig,
    MLflowConfig,
    NetworkConfig,
    PluginConfig,
    ResourceSpec,
    RetrySpec,
    RunConfig,
    S3Config,
    ScheduleConfig,
    SecretAsEnv,
    canonical_duration,
    is_kubernetes_name,
    is_kubernetes_namespace,
)
from kvx_runtime.config.storage_root import (
    LOCAL_STATE_DIR,
    STORAGE_ROOT_FORMS,
    configured_storage_root,
    is_on_this_machine,
    local_storage_root,
    normalize_storage_root,
    resolve_storage_root,
    under_storage_root,
)
from kvx_runtime.config.validation import (
    ALL_KEYS,
    MAX_DEPTH,
    STEP_KEYS,
    nesting_depth,
    parse_plugin_config,
    unknown_keys,
)

__all__ = [
    "AIRFLOW_CONFIG_PATTERNS",
    "ALL_KEYS",
    "CONFIG_PATTERNS",
    "KUBEFLOW_CONFIG_PATTERNS",
    "LOCAL_STATE_DIR",
    "MAX_DEPTH",
    "STEP_KEYS",
    "STORAGE_ROOT_FORMS",
    "AirflowPluginConfig",
    "AirflowRunConfig",
    "DynamicConfigProviderSpec",
    "GroupingConfig",
    "HostAlias",
    "KubernetesConfig",
    "MLflowConfig",
    "NetworkConfig",
    "PluginConfig",
    "PodSecret",
    "ResourceSpec",
    "RetrySpec",
    "RunConfig",
    "S3Config",
    "ScheduleConfig",
    "SecretAsEnv",
    "Toleration",
    "canonical_duration",
    "configured_storage_root",
    "is_kubernetes_name",
    "is_kubernetes_namespace",
    "is_on_this_machine",
    "load_plugin_config",
    "local_storage_root",
    "nesting_depth",
    "normalize_storage_root",
    "parse_plugin_config",
    "read_raw_plugin_config",
    "resolve_storage_root",
    "schema_of",
    "under_storage_root",
    "unknown_keys",
]

#: Airflow's schema, imported on first use: every step imports this package, and building its
#: models costs a step start-up ~50 ms for a target the step may not run on.
_AIRFLOW_NAMES = frozenset({"AirflowPluginConfig", "AirflowRunConfig", "PodSecret", "Toleration"})


def __getattr__(name: str) -> Any:
    if name in _AIRFLOW_NAMES:
        from kvx_runtime.config import airflow

        return getattr(airflow, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
