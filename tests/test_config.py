"""vertexai.yml: typed values, key-path errors, one warning for unknown keys, and leniency
for values a step does not need."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

from conftest import conf_archive, logged_text
from kvx_runtime.config import (
    STEP_KEYS,
    PluginConfig,
    load_plugin_config,
    normalize_storage_root,
    parse_plugin_config,
)
from kvx_runtime.errors import ConfigError, ExitCode

SEED_SAMPLE = """
project_id: my-gcp-mlops-project
region: europe-west1
run_config:
  image: eu.gcr.io/my-gcp-mlops-project/example_model:${commit_id}
  image_pull_policy: IfNotPresent
  root: bucket_name/gcs_suffix
  experiment_name: MyExperiment
  scheduled_run_name: MyExperimentRun
  ttl: 604800
  resources:
    data-import-node:
      memory: 2Gi
    model-training-node:
      cpu: 8
      memory: 60Gi
    tensorflow-node:
      gpu: 1
    __default__:
      cpu: 200m
      memory: 64Mi
  node_selectors:
    gpu_node_tag:
      cloud.google.com/gke-accelerator: NVIDIA_TESLA_T4
  dynamic_config_providers:
    - cls: kedro_vertexai.auth.gcp.MLFlowGoogleOAuthCredentialsProvider
      params:
        client_id: iam-client-id
  network:
    vpc: projects/12345/global/networks/name-of-vpc
    host_aliases:
      - ip: 10.10.10.10
        hostnames: ['mlflow.internal']
  mlflow:
    request_header_provider_params:
      client_id: abc
      service_account: sa@example.com
"""


def write_conf(root: Path, env: str, text: str, name: str = "vertexai.yml") -> None:
    (root / env).mkdir(parents=True, exist_ok=True)
    (root / env / name).write_text(text)


def test_seed_sample_parses_into_typed_values(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KEDRO_CONFIG_COMMIT_ID", "abc123")
    write_conf(tmp_path, "base", SEED_SAMPLE)
    config = load_plugin_config(tmp_path, "local")
    run = config.run_config
    assert run.image == "eu.gcr.io/my-gcp-mlops-project/example_model:abc123"
    assert run.resources["model-training-node"].cpu == "8"
    assert run.resources["__default__"].memory == "64Mi"
    assert run.resources["tensorflow-node"].gpu == 1
    assert run.network.host_aliases[0].hostnames == ["mlflow.internal"]
    assert run.dynamic_config_providers[0].params == {"client_id": "iam-client-id"}
    assert run.mlflow.request_header_provider_params["service_account"] == "sa@example.com"
    assert run.mlflow.required is True


def test_step_does_not_need_the_image_placeholder(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.delenv("KEDRO_CONFIG_COMMIT_ID", raising=False)
    write_conf(tmp_path, "base", SEED_SAMPLE)
    config = load_plugin_config(tmp_path, "local", needed=STEP_KEYS)
    assert config.run_config.image is None
    assert config.run_config.root == "bucket_name/gcs_suffix"
    with pytest.raises(ConfigError, match=r"run_config\.image: config placeholder \$\{commit_id\}"):
        load_plugin_config(tmp_path, "local")


def test_wrong_value_names_the_key_path() -> None:
    raw = {"run_config": {"resources": {"fit": {"cpu": "lots"}}}}
    with pytest.raises(ConfigError, match=r"run_config\.resources\.fit\.cpu: 'lots' is not a cpu") as caught:
        parse_plugin_config(raw)
    assert caught.value.exit_code == ExitCode.USAGE


def test_all_problems_are_reported_at_once() -> None:
    raw = {"run_config": {"ttl": -5, "mlflow": {"required": "maybe"}, "resources": []}}
    with pytest.raises(ConfigError) as caught:
        parse_plugin_config(raw)
    message = str(caught.value)
    for path in ("run_config.ttl", "run_config.mlflow.required", "run_config.resources"):
        assert path in message


def test_problems_outside_step_keys_only_warn_in_a_step(caplog) -> None:
    raw = {"run_config": {"root": "b/p", "resources": {"fit": {"cpu": "lots"}}, "ttl": "x"}}
    with caplog.at_level(logging.WARNING):
        config = parse_plugin_config(raw, needed=STEP_KEYS)
    assert config.run_config.root == "b/p"
    assert config.run_config.resources == {}
    assert "run_config.resources.fit.cpu" in logged_text(caplog)


def test_problems_in_step_keys_fail_a_step() -> None:
    raw = {"run_config": {"root": 5, "dynamic_config_providers": [{"params": {}}]}}
    with pytest.raises(ConfigError) as caught:
        parse_plugin_config(raw, needed=STEP_KEYS)
    assert "run_config.root" in str(caught.value)
    assert "run_config.dynamic_config_providers.0.cls: required key is missing" in str(caught.value)


def test_unknown_keys_give_one_warning_with_suggestions(caplog) -> None:
    raw = {"projet_id": "x", "run_config": {"imgae": "i", "resources": {"n": {"memroy": "1Gi"}}}}
    with caplog.at_level(logging.WARNING):
        parse_plugin_config(raw)
    warnings = [r for r in caplog.records if "unknown keys" in r.getMessage()]
    assert len(warnings) == 1
    text = logged_text(caplog)
    assert "projet_id (did you mean project_id?)" in text
    assert "run_config.imgae (did you mean run_config.image?)" in text
    assert "run_config.resources.n.memroy (did you mean run_config.resources.n.memory?)" in text


def test_env_file_replaces_top_level_keys_like_kedro(tmp_path: Path) -> None:
    write_conf(tmp_path, "base", "project_id: p\nrun_config:\n  root: base/root\n  experiment_name: e\n")
    write_conf(tmp_path, "prod", "run_config:\n  root: prod/root\n")
    config = load_plugin_config(tmp_path, "prod")
    assert config.project_id == "p"
    assert config.run_config.root == "prod/root"
    assert config.run_config.experiment_name is None  # destructive merge, as Kedro's default


def test_soft_merge_strategy_merges_deeply(tmp_path: Path) -> None:
    write_conf(tmp_path, "base", "run_config:\n  root: base/root\n  experiment_name: e\n")
    write_conf(tmp_path, "prod", "run_config:\n  root: prod/root\n")
    config = load_plugin_config(tmp_path, "prod", merge_strategy="soft")
    assert (config.run_config.root, config.run_config.experiment_name) == ("prod/root", "e")


def test_yaml_extension_and_missing_file(tmp_path: Path) -> None:
    assert load_plugin_config(tmp_path, "local").run_config.root is None
    write_conf(tmp_path, "base", "run_config: {root: a/b}\n", name="vertexai.yaml")
    assert load_plugin_config(tmp_path, "local").run_config.root == "a/b"


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    write_conf(tmp_path, "base", "run_config: [unclosed\n")
    with pytest.raises(ConfigError, match=r"vertexai.yml:2:1: not valid YAML"):
        load_plugin_config(tmp_path, "local")


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        ("bucket/prefix", "gs://bucket/prefix"),
        ("bucket", "gs://bucket"),
        ("gs://bucket/prefix/", "gs://bucket/prefix"),
        ("s3://minio-bucket/kvx/", "s3://minio-bucket/kvx"),
        ("s3a://bucket.with.dots", "s3://bucket.with.dots"),
        ("file:///tmp/x", "file:///tmp/x"),
        ("/tmp/x", "/tmp/x"),
        ("./rel", str(Path("./rel").resolve())),
    ],
)
def test_storage_root_normalization(root: str, expected: str) -> None:
    assert normalize_storage_root(root) == expected


@pytest.mark.parametrize(
    ("root", "problem"),
    [
        ("gs://", "names no bucket"),
        ("gs:///prefix", "names no bucket"),
        ("gs://Not_A_Bucket!/x", "is not a Cloud Storage bucket name"),
        ("s3://", "names no bucket"),
        ("s3://Upper_Case/x", "is not an S3 bucket name"),
        ("s3://" + "b" * 64, "is not an S3 bucket name"),
        ("file://", "needs an absolute path"),
        ("file://relative/dir", "needs an absolute path"),
        ("://x", "unsupported scheme (none)"),
        ("http://example.com/x", "unsupported scheme http://"),
        ("   ", "the storage root is empty"),
    ],
)
def test_storage_roots_that_would_write_somewhere_unexpected_are_refused(root: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)) as caught:
        normalize_storage_root(root, bare_is_bucket=False)
    assert "gs://bucket[/prefix], s3://bucket[/prefix], file:///absolute/path, or a local path" in str(caught.value)


def test_a_kedro_kubeflow_projects_kubeflow_yml_is_read_when_there_is_no_vertexai_yml(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "kubeflow.yml").write_text(
        "host: https://kubeflow.example.com/pipeline\n"
        "run_config:\n  image: img\n  experiment_name: Demo\n  run_name: Demo Run\n  namespace: team-a\n"
        "  s3:\n    endpoint_url: http://minio-service.kubeflow:9000\n")
    config = load_plugin_config(tmp_path, "base")
    assert config.host == "https://kubeflow.example.com/pipeline"
    assert (config.run_config.namespace, config.run_config.run_name) == ("team-a", "Demo Run")
    assert config.run_config.s3.endpoint_url == "http://minio-service.kubeflow:9000"
    # A vertexai.yml, when there is one, is the configuration (never a merge of both).
    (tmp_path / "base" / "vertexai.yml").write_text("run_config:\n  image: other\n")
    assert load_plugin_config(tmp_path, "base").run_config.image == "other"
    assert load_plugin_config(tmp_path, "base").host is None


def test_kubeflow_yml_in_base_and_vertexai_yml_in_an_env_both_count(tmp_path: Path, caplog) -> None:
    """Files are chosen per environment: a kedro-kubeflow project that adds conf/local/vertexai.yml
    keeps its conf/base/kubeflow.yml (the env file on top, as Kedro merges)."""
    (tmp_path / "base").mkdir()
    (tmp_path / "local").mkdir()
    (tmp_path / "base" / "kubeflow.yml").write_text(
        "host: https://kubeflow.example.com/pipeline\nrun_config:\n  image: img\n  namespace: team-a\n")
    (tmp_path / "local" / "vertexai.yml").write_text("run_config:\n  image: img\n  namespace: team-b\n")
    config = load_plugin_config(tmp_path, "local", merge_strategy="soft")
    assert config.host == "https://kubeflow.example.com/pipeline"
    assert config.run_config.namespace == "team-b"
    # Both kinds in one environment: vertexai wins there, with a warning.
    (tmp_path / "local" / "kubeflow.yml").write_text("run_config:\n  namespace: team-c\n")
    assert load_plugin_config(tmp_path, "local", merge_strategy="soft").run_config.namespace == "team-b"
    assert "vertexai and kubeflow config files in one environment: only the vertexai ones are read" in caplog.text
    # A stray backup is not a config file: it hides nothing.
    (tmp_path / "base" / "vertexai.yml.bak").write_text("run_config:\n  namespace: stale\n")
    assert load_plugin_config(tmp_path, "base").host == "https://kubeflow.example.com/pipeline"


def test_an_s3_endpoint_that_is_not_a_url_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "vertexai.yml").write_text("run_config:\n  s3:\n    endpoint_url: minio:9000\n")
    with pytest.raises(ConfigError, match="run_config.s3.endpoint_url"):
        load_plugin_config(tmp_path, "base")


@pytest.mark.parametrize(("given", "canonical"), [
    (30, "30s"), ("30.0s", "30s"), (1.5, "1.500s"), ("0.25s", "0.250s"), ("0.000001s", "0.000001s"),
    ("2.1234567891s", "2.123456789s"), ("600s", "600s"),
])
def test_retry_durations_are_written_as_protobuf_writes_them(given, canonical) -> None:
    """KFP stores an uploaded spec re-serialized: its durations must already be canonical for the
    stored version to be recognised as ours after a lost answer."""
    from kvx_runtime.config import RetrySpec

    assert RetrySpec(backoff_duration=given).backoff_duration == canonical


def test_a_kubeflow_namespace_that_kubernetes_refuses_is_a_config_error() -> None:
    from pydantic import ValidationError

    from kvx_runtime.config import RunConfig

    assert RunConfig(namespace="team-a").namespace == "team-a"
    for bad in ("Team_A", "team.a", "-team", "x" * 64):
        with pytest.raises(ValidationError, match="is not a Kubernetes namespace name"):
            RunConfig(namespace=bad)


def test_one_storage_root_rule_for_every_command(tmp_path) -> None:
    from kvx_runtime.config import local_storage_root, resolve_storage_root

    # The flag wins; without a scheme it is a local path, where run_config.root's bucket/prefix is gs://.
    assert resolve_storage_root("bucket/prefix", "other/root", required=True) == os.path.abspath("bucket/prefix")
    assert resolve_storage_root(None, "bucket/prefix", required=True) == "gs://bucket/prefix"
    assert resolve_storage_root(None, None, required=False) is None
    assert resolve_storage_root(None, None, required=True, default=local_storage_root(tmp_path)) == str(
        tmp_path / ".kvx" / "storage")
    # Given but empty is an error, never run_config.root read some other way.
    with pytest.raises(ConfigError, match="the storage root is empty") as caught:
        resolve_storage_root("", "bucket/prefix", required=True)
    assert caught.value.exit_code == 2
    with pytest.raises(ConfigError, match="no storage root is set") as caught:
        resolve_storage_root(None, "", required=True)
    assert caught.value.exit_code == 2


# --- airflow-k8s.yml ---------------------------------------------------------------------------


def test_airflow_k8s_yml_is_read_with_its_own_keys_and_the_familys_volume_is_ignored_saying_why(
        tmp_path: Path, caplog) -> None:
    from kvx_runtime.config import AirflowPluginConfig

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "airflow-k8s.yml").write_text(
        "host: https://airflow.example.com\nrun_config:\n  image: img\n  schedule: '0 3 * * mon-fri'\n"
        "  start_date: 2026-01-01\n  tolerations: [{key: gpu, operator: Exists, effect: NoSchedule}]\n"
        "  secrets: [{secret_name: mlflow-auth, deploy_target: MLFLOW_TRACKING_TOKEN, key: token}]\n"
        "  volume: {size: 10Gi, access_modes: [ReadWriteMany]}\n  dag_idd: x\n")
    config = load_plugin_config(tmp_path, "base")
    assert isinstance(config, AirflowPluginConfig) and config.run_config.schedule == "0 3 * * mon-fri"
    assert config.run_config.start_date is not None and config.run_config.start_date.tzinfo is not None
    assert config.run_config.tolerations[0].operator == "Exists" and config.run_config.secrets[0].key == "token"
    assert "run_config.volume is ignored: steps exchange intermediates as blobs" in caplog.text
    assert "run_config.dag_idd (did you mean run_config.dag_id?)" in logged_text(caplog)  # as elsewhere
    # airflow.yml is accepted too; a vertexai.yml in the same environment wins (a warning names both).
    (tmp_path / "base" / "airflow-k8s.yml").rename(tmp_path / "base" / "airflow.yml")
    assert isinstance(load_plugin_config(tmp_path, "base"), AirflowPluginConfig)
    (tmp_path / "base" / "vertexai.yml").write_text("run_config:\n  image: other\n")
    assert type(load_plugin_config(tmp_path, "base")) is PluginConfig
    assert "vertexai and airflow config files in one environment" in caplog.text


@pytest.mark.parametrize(("schedule", "says"), [
    ("0 3 * *", "4 fields, not 5"),
    ("60 * * * *", "'60' is out of the minute field's range 0-59"),
    ("0 3 * smarch *", "'smarch' is out of the month field's range 1-12"),
    ("*/0 * * * *", "a step of 0 in the minute field"),
    ("@fortnightly", "is not one of Airflow's presets"),
])
def test_a_bad_schedule_is_one_config_error_naming_the_field(schedule: str, says: str) -> None:
    from kvx_runtime.config import AirflowPluginConfig

    with pytest.raises(ConfigError, match="run_config.schedule") as refused:
        parse_plugin_config({"run_config": {"schedule": schedule}}, schema=AirflowPluginConfig)
    assert says in str(refused.value) and refused.value.exit_code == 2


def test_airflow_pod_settings_are_checked() -> None:
    from kvx_runtime.config import AirflowPluginConfig

    for bad, says in [({"dag_id": "my dag"}, "is not a DAG id"),
                      ({"secrets": [{"secret_name": "s", "deploy_type": "volume", "deploy_target": "rel"}]},
                       "not an absolute mount path"),
                      ({"secrets": [{"secret_name": "s", "deploy_target": "TOKEN"}]}, "needs the key"),
                      ({"tolerations": [{"operator": "Exists", "value": "x"}]}, "takes no value"),
                      ({"service_account": "sa@project.iam.gserviceaccount.com"}, "Kubernetes service account"),
                      ({"start_date": "next tuesday"}, "is not a date")]:
        with pytest.raises(ConfigError, match=says):
            parse_plugin_config({"run_config": bad}, schema=AirflowPluginConfig)


@pytest.mark.parametrize("archive_name", ["conf-proj.tar.gz", "conf-proj.zip"])
def test_the_config_is_read_from_a_configuration_archive_as_kedro_reads_it(tmp_path: Path, archive_name: str) -> None:
    archive = conf_archive(tmp_path, {"base/vertexai.yml": "run_config:\n  image: img\n  root: gs://bucket/base\n",
                                      "prod/vertexai.yml": "run_config:\n  image: img\n  root: gs://bucket/prod\n"},
                           archive_name)
    assert load_plugin_config(archive, "prod").run_config.root == "gs://bucket/prod"
    assert load_plugin_config(archive, "base").run_config.root == "gs://bucket/base"


def test_an_unreadable_configuration_archive_is_a_config_error(tmp_path: Path) -> None:
    archive = tmp_path / "conf-proj.tar.gz"
    archive.write_bytes(b"not an archive")
    with pytest.raises(ConfigError, match="archive .* cannot be read") as refused:
        load_plugin_config(archive, "base")
    assert refused.value.exit_code == ExitCode.USAGE
