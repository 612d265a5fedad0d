"""Kubeflow Pipelines pieces that need no server: auth selection, cron, job identity."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvx_runtime.auth.kfp import (
    BearerTokenAuth,
    DexAuth,
    IapAuth,
    NoAuth,
    ServiceAccountTokenAuth,
    kfp_auth_from_environment,
)
from kvx_runtime.errors import ConfigError, UsageError
from kvx_runtime.targets.kubeflow import KubeflowTarget, kfp_cron

_AUTH_VARIABLES = ("KF_PIPELINES_TOKEN", "KVX_KFP_TOKEN", "IAP_CLIENT_ID", "DEX_USERNAME", "DEX_PASSWORD",
                   "KF_PIPELINES_SA_TOKEN_PATH")


@pytest.fixture
def clean_auth_env(monkeypatch) -> pytest.MonkeyPatch:
    for name in _AUTH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_auth_modes_are_chosen_in_the_documented_order(clean_auth_env, tmp_path: Path) -> None:
    host = "https://kubeflow.example.com/pipeline"
    token_file = tmp_path / "token"
    token_file.write_text("sa-token-value\n")
    clean_auth_env.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    in_cluster = kfp_auth_from_environment(host)
    assert isinstance(in_cluster, ServiceAccountTokenAuth)
    assert in_cluster.headers() == {"Authorization": "Bearer sa-token-value"}
    clean_auth_env.setenv("DEX_USERNAME", "ci@example.com")
    with pytest.raises(ConfigError, match="both DEX_USERNAME and DEX_PASSWORD"):
        kfp_auth_from_environment(host)
    clean_auth_env.setenv("DEX_PASSWORD", "secret-password")
    assert isinstance(kfp_auth_from_environment(host), DexAuth)
    clean_auth_env.setenv("IAP_CLIENT_ID", "client.apps.googleusercontent.com")
    assert isinstance(kfp_auth_from_environment(host), IapAuth)
    clean_auth_env.setenv("KF_PIPELINES_TOKEN", "bearer-value")
    assert isinstance(kfp_auth_from_environment(host), BearerTokenAuth)


def test_without_any_credentials_requests_go_unauthenticated(clean_auth_env) -> None:
    auth = kfp_auth_from_environment("http://localhost:8080")
    assert isinstance(auth, NoAuth) and auth.headers() == {}


def test_an_unreadable_service_account_token_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the service-account token"):
        ServiceAccountTokenAuth(tmp_path / "missing").headers()


@pytest.mark.parametrize(("given", "expected"), [("0 6 * * *", "0 0 6 * * *"), ("30 0 6 * * 1", "30 0 6 * * 1")])
def test_cron_expressions_get_kfps_seconds_field(given: str, expected: str) -> None:
    assert kfp_cron(given) == expected


def test_a_cron_with_the_wrong_number_of_fields_is_refused() -> None:
    with pytest.raises(UsageError, match="has 3 fields"):
        kfp_cron("0 6 *")


def test_kfp_needs_a_host_url() -> None:
    with pytest.raises(ConfigError, match="needs host"):
        KubeflowTarget("")


def test_the_ui_url_follows_the_central_dashboard_layout() -> None:
    assert KubeflowTarget("https://kf.example.com/pipeline").console_url() == "https://kf.example.com/_/pipeline/#/runs"
    assert KubeflowTarget("http://localhost:8080").console_url() == "http://localhost:8080/#/runs"


def test_job_names_are_made_unique_per_run_only_in_kfp_pods(monkeypatch) -> None:
    from kvx_runtime.step.identity import resolve_identity

    monkeypatch.delenv("KFP_POD_NAME", raising=False)
    monkeypatch.delenv("KVX_ORCHESTRATOR", raising=False)
    assert resolve_identity("uuid-1", "my-pipeline").job_name == "my-pipeline"
    monkeypatch.setenv("KFP_POD_NAME", "pod-1")
    assert resolve_identity("uuid-1", "my-pipeline").job_name == "my-pipeline-uuid-1"
    assert resolve_identity("uuid-1", "my-pipeline-uuid-1").job_name == "my-pipeline-uuid-1"
    monkeypatch.delenv("KFP_POD_NAME")
    monkeypatch.setenv("KVX_ORCHESTRATOR", "kubeflow")
    assert resolve_identity("uuid-1", "my-pipeline").job_name == "my-pipeline-uuid-1"


def test_a_time_zone_prefix_in_the_cron_is_refused_on_kfp() -> None:
    with pytest.raises(UsageError, match="UTC"):
        kfp_cron("TZ=Europe/Paris 0 6 * * *")


def test_replays_name_the_job_directory_kfp_steps_use() -> None:
    from kvx_runtime.targets.base import RunInfo

    run = RunInfo(name="uuid-7", run_id="uuid-7", display_name="spaceflights-20261124", state="FAILED")
    assert KubeflowTarget("http://localhost:8080").job_name(run) == "spaceflights-20261124-uuid-7"


def test_schedule_options_kfp_lacks_are_refused_not_ignored() -> None:
    from kvx_runtime.targets.base import RunRequest, ScheduleRequest

    run = RunRequest(spec={"root": {}}, run_id="p-1", display_name="p")
    target = KubeflowTarget("http://localhost:8080")
    for request, problem in [
        (ScheduleRequest(display_name="s", cron="0 6 * * *", timezone="Europe/Paris", run=run), "UTC"),
        (ScheduleRequest(display_name="s", cron="0 6 * * *", timezone=None, run=run, max_run_count=3),
         "maximum run count"),
        (ScheduleRequest(display_name="s", cron="0 6 * * *", timezone=None, run=run, allow_queueing=True),
         "do not queue"),
    ]:
        with pytest.raises(UsageError, match=problem):
            target.schedule_body(request)


@pytest.mark.parametrize(("account", "problem"), [
    ("pipelines@my-project.iam.gserviceaccount.com", "is a Google service account's email"),
    ("Pipeline_Runner", "is not a Kubernetes name"),
    ("-runner", "is not a Kubernetes name"),
])
def test_a_service_account_kfp_cannot_run_pods_as_is_refused_before_any_request(account: str, problem: str) -> None:
    from kvx_runtime.targets.base import RunRequest

    # Port 9 is closed: the refusal must come before the experiment is looked up.
    target = KubeflowTarget("http://127.0.0.1:9/pipeline", attempts=1)
    run = RunRequest(spec={"root": {}}, run_id="p-1", display_name="p", service_account=account)
    with pytest.raises(ConfigError, match=problem) as refused:
        target.run_body(run)
    assert "Kubernetes service account" in refused.value.hint


def test_vertex_only_network_and_cmek_settings_are_named_as_not_applied(caplog) -> None:
    from conftest import logged_text
    from kvx_runtime.targets.base import RunRequest

    target = KubeflowTarget("http://127.0.0.1:9/pipeline", attempts=1)
    target._experiment_id = "e-1"  # known already: no request (port 9 is closed)
    key = "projects/p/locations/europe-west1/keyRings/r/cryptoKeys/k"
    run = RunRequest(spec={"root": {}}, run_id="p-1", display_name="p", network="projects/1/global/networks/n",
                     encryption_key=key)
    body = target.run_body(run)
    assert key not in str(body) and "network" not in body
    text = logged_text(caplog)
    assert "run_config.network.vpc is a Vertex AI setting that Kubeflow Pipelines does not apply" in text
    assert "run_config.encryption_spec_key_name is a Vertex AI setting" in text and "not with this key" in text
    caplog.clear()
    target.run_body(RunRequest(spec={"root": {}}, run_id="p-2", display_name="p"))
    assert "Vertex AI setting" not in logged_text(caplog)


def test_a_kubernetes_service_account_name_is_sent_as_is() -> None:
    from kvx_runtime.targets.kubeflow import _kubernetes_service_account

    assert _kubernetes_service_account("default-editor") == "default-editor"
    assert _kubernetes_service_account("kvx.runner-1") == "kvx.runner-1"


def test_a_host_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError) as refused:
        KubeflowTarget("http://admin:s3cretpw@kubeflow.example.com/pipeline")
    assert "s3cretpw" not in str(refused.value) + str(refused.value.hint)
    assert "must not hold credentials" in str(refused.value)
    for host in ("http://[::1", "https://kubeflow.example.com/pipeline?x=1"):
        with pytest.raises(ConfigError, match="host"):
            KubeflowTarget(host)


def test_a_bearer_token_is_trimmed_and_one_with_inner_whitespace_refused(clean_auth_env) -> None:
    clean_auth_env.setenv("KF_PIPELINES_TOKEN", "tok-123\n")
    assert kfp_auth_from_environment("http://h").headers() == {"Authorization": "Bearer tok-123"}
    clean_auth_env.setenv("KF_PIPELINES_TOKEN", "tok 123")
    with pytest.raises(ConfigError, match="holds whitespace") as refused:
        kfp_auth_from_environment("http://h")
    assert "tok 123" not in str(refused.value)


def test_a_bad_cron_is_refused_before_any_request() -> None:
    from kvx_runtime.targets.base import RunRequest, ScheduleRequest

    target = KubeflowTarget("http://127.0.0.1:9/pipeline", attempts=1)  # closed: no request may be made
    run = RunRequest(spec={"root": {}}, run_id="p-1", display_name="p")
    with pytest.raises(UsageError, match="cron"):
        target.schedule_body(ScheduleRequest(display_name="s", cron="* * *", timezone=None, run=run))


@pytest.mark.parametrize("command", ["run-once", "schedule", "compile", "upload-pipeline"])
def test_kfp_help_does_not_offer_vertex_only_options_but_still_refuses_them(command: str) -> None:
    from click.testing import CliRunner

    from kvx_runtime.cli import cli

    runner = CliRunner()
    kfp_help = runner.invoke(cli, ["kfp", command, "--help"]).output.split("Options:")[1]
    vertex_help = runner.invoke(cli, [command, "--help"]).output.split("Options:")[1]
    for option in ("--template", "--timezone", "--max-run-count", "--allow-queueing"):
        assert option not in kfp_help
    if command in {"run-once", "schedule"}:
        assert "--template" in vertex_help  # hidden on a copy: the Vertex commands keep them
        # still parsed (the target refuses it with its own line), not "no such option": click
        # reads every option before it checks the project path
        parsed = runner.invoke(cli, ["kfp", command, "--template", "v1", "--project-path", "/nonexistent"])
        assert "No such option" not in parsed.output and "does not exist" in parsed.output


def test_a_split_oauth2_proxy_session_cookie_is_sent_whole_and_in_order() -> None:
    import requests

    from kvx_runtime.auth.kfp import _session_cookies

    jar = requests.cookies.RequestsCookieJar()
    for index in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9):
        jar.set(f"oauth2_proxy_kubeflow_{index}", f"part{index}")
    jar.set("unrelated", "x")
    cookies = _session_cookies(jar)
    assert list(cookies) == [f"oauth2_proxy_kubeflow_{i}" for i in range(11)]
    jar.set("authservice_session", "whole")  # an unsplit session cookie wins
    assert _session_cookies(jar) == {"authservice_session": "whole"}
    assert _session_cookies(requests.cookies.RequestsCookieJar()) == {}


def test_the_kubernetes_platform_spec_is_built_for_kfp_and_named_as_not_applied_on_vertex(caplog) -> None:
    from conftest import logged_text
    from kvx_runtime.compiler.platform import kubernetes_platform_spec, with_platform_spec
    from kvx_runtime.config import KubernetesConfig
    from kvx_runtime.targets.base import RunRequest
    from kvx_runtime.targets.vertex import VertexTarget

    spec = {"root": {}, "deploymentSpec": {"executors": {"exec-a": {}, "exec-b": {}}}}
    assert kubernetes_platform_spec(spec, KubernetesConfig()) is None
    assert with_platform_spec(spec, None) == spec
    config = KubernetesConfig(secrets_as_env=[{"secret_name": "s3-keys", "keys": {"k": "AWS_ACCESS_KEY_ID"},
                                               "optional": True}])
    platform = kubernetes_platform_spec(spec, config)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == {"exec-a", "exec-b"}
    assert executors["exec-a"]["secretAsEnv"][0]["optional"] is True
    assert with_platform_spec(spec, platform) == {"pipeline_spec": spec, "platform_spec": platform}

    run = RunRequest(spec=spec, run_id="p-1", display_name="p", platform_spec=platform)
    body = VertexTarget("proj", "europe-west1").job_body(run)
    assert body["pipelineSpec"] == spec and "s3-keys" not in str(body)
    assert "run_config.kubernetes is for Kubeflow Pipelines; Vertex AI does not apply it" in logged_text(caplog)


@pytest.mark.parametrize(("entry", "problem"), [
    ({"secret_name": "MinIO_Keys", "keys": {"a": "B"}}, "is not a Kubernetes secret name"),
    ({"secret_name": "keys", "keys": {"a": "1B"}}, "is not an environment variable name"),
    ({"secret_name": "keys", "keys": {"a/b": "B"}}, "is not a secret key"),
    ({"secret_name": "keys", "keys": {}}, "at least 1 item"),
])
def test_bad_secrets_as_env_entries_are_refused(entry: dict, problem: str) -> None:
    from pydantic import ValidationError

    from kvx_runtime.config import KubernetesConfig

    with pytest.raises(ValidationError, match=problem):
        KubernetesConfig(secrets_as_env=[entry])
