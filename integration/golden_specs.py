"""Golden pipeline specs: the example and real-world projects compiled in the configurations the
integration tests use, written exactly as ``write_spec`` writes them. integration/test_golden_specs.py
compiles them again and compares byte for byte, so a change to the compiler that changes a
spec is a decision (regenerate and review the diff), never an accident.

Regenerate after an intended change, from the repository root::

    python -m integration.golden_specs --write      # rewrites integration/golden/
    git diff integration/golden/                    # review what changed

``--out DIR`` writes them elsewhere (what the test does). Each case gives ``<case>.json`` or
``<case>.yaml`` (the spec, a KFP YAML with its Kubernetes platform spec as second document where
the case has one) and ``<case>.compiled.json`` (the rest of ``CompiledPipeline``: steps, warnings,
typed run values).

What would make a spec vary is pinned: the environment (no ``KEDRO_CONFIG_*``/``KVX_*`` from the
caller; the commit id and branch forwarded to the steps are fixed), the projects' files (fresh
copies without generated data), the package version written as ``sdkVersion`` and into the code
archive's manifest (a release must not churn the fixtures), and the code upload (the archive is
built for real, deterministic by design; storing it is replaced by the reference it would get).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "integration" / "golden"
EXAMPLE_PROJECT = REPO / "integration" / "example_project"
REAL_WORLD_PROJECT = REPO / "integration" / "real_world_project"

#: Forwarded into every step (compiler.FORWARDED_ENV): fixed, so specs do not depend on the caller.
PINNED_ENV = {"KEDRO_CONFIG_COMMIT_ID": "0123abc", "KEDRO_CONFIG_BRANCH_NAME": "golden"}
PINNED_VERSION = "0.0.0-golden"
#: What a DAG file's header says of Kedro's version.
PINNED_KEDRO = "x.y.z"

#: A run_config using every part of it that reaches a spec (an env of its own: the base's
#: vertexai.yml is replaced whole, Kedro's destructive merge).
EXAMPLE_RICH_CONFIG = """\
project_id: kvx-example-project
region: europe-west1
run_config:
  image: europe-docker.pkg.dev/kvx-example-project/images/spaceflights-kvx:${commit_id|latest}
  root: s3://kvx-golden-bucket/pipelines
  description: Every run_config section that reaches a spec
  failure_policy: fail_fast
  on_exit_pipeline: reporting
  labels: {team: golden}
  resources:
    __default__: {cpu: 500m, memory: 1Gi}
    data_science.train_model_node: {cpu: "2", memory: 8Gi, gpu: 1}
    no_such_node: {cpu: "1"}
  node_selectors:
    data_science.train_model_node: {cloud.google.com/gke-accelerator: NVIDIA_L4}
  retries:
    __default__: {max_retry_count: 2, backoff_duration: 10s}
    data_science.train_model_node: {max_retry_count: 4, backoff_duration: 30s, backoff_factor: 3}
  network:
    host_aliases: [{ip: 10.0.0.5, hostnames: [mlflow.internal, mlflow]}]
  env: {EXTRA: "1", KVX_LOG_FORMAT: json}
  s3: {endpoint_url: "http://minio.kubeflow:9000", region: us-east-1}
  kubernetes:
    secrets_as_env:
      - secret_name: mlpipeline-minio-artifact
        keys: {accesskey: AWS_ACCESS_KEY_ID, secretkey: AWS_SECRET_ACCESS_KEY}
      - secret_name: optional-extra
        keys: {token: EXTRA_TOKEN}
        optional: true
"""

#: Everything of airflow-k8s.yml that reaches a pod (integration/test_airflow_dags.py checks the
#: pods real Airflow builds from it).
AIRFLOW_RICH_CONFIG = """\
host: https://airflow.example.com
run_config:
  image: europe-docker.pkg.dev/kvx-example/images/spaceflights:${commit_id|latest}
  image_pull_policy: Always
  root: gs://kvx-example-bucket/airflow
  dag_id: spaceflights-airflow
  tags: [golden]
  schedule: "30 2 * * mon-fri"
  start_date: 2026-01-05
  max_active_runs: 2
  namespace: kedro-steps
  service_account: kedro-runner
  startup_timeout: 900
  on_finish_action: delete_succeeded_pod
  labels: {team: golden}
  annotations: {cluster-autoscaler.kubernetes.io/safe-to-evict: "false"}
  tolerations: [{key: dedicated, operator: Equal, value: kedro, effect: NoSchedule}]
  secrets:
    - {secret_name: mlflow-auth, deploy_type: env, deploy_target: MLFLOW_TRACKING_TOKEN, key: token}
    - {secret_name: gcp-key, deploy_type: volume, deploy_target: /var/secrets/google}
  env: {EXTRA: "1"}
  resources:
    __default__: {cpu: 500m, memory: 1Gi}
    data_science.train_model_node: {cpu: "2", memory: 8Gi, gpu: 1}
  node_selectors:
    __default__: {cloud.google.com/gke-nodepool: kedro-pool}
    data_science.train_model_node: {cloud.google.com/gke-accelerator: NVIDIA_L4}
  retries:
    __default__: {max_retry_count: 2, backoff_duration: 10s}
  volume: {size: 10Gi}
"""
#: Where the local DAG says the project lives on the worker (what --worker-project-path gives).
WORKER_PROJECT_PATH = "/opt/airflow/projects/spaceflights"

EXAMPLE_LOCAL_MLFLOW = (EXAMPLE_PROJECT / "conf" / "local" / "mlflow.yml").read_text()
MLFLOW_CONFIG = "server:\n  mlflow_tracking_uri: http://127.0.0.1:9\n"


@dataclass(frozen=True)
class Case:
    name: str  # the file name without suffix
    project: str  # "example" | "real_world"
    output: str  # ".json" | ".yaml"
    env: str | None = None
    pipeline: str = "__default__"
    storage_root: str | None = None
    params: tuple[str, ...] = ()
    values: dict[str, str] = field(default_factory=dict)
    load_versions: dict[str, str] = field(default_factory=dict)
    code_upload: bool | None = None
    kubeflow: bool = False  # `kvx-runtime kfp compile`: no shared mounts, the platform spec in YAML
    #: `kvx-runtime airflow compile --operator OPERATOR`: a DAG file (output ".py").
    airflow: str | None = None
    #: A config env of this case alone (file name -> text), there while it compiles: the other
    #: cases' warnings and code archives stay as they were.
    own_env: dict[str, str] = field(default_factory=dict)


def _add_env(project: Path, env: str, files: dict[str, str]) -> None:
    (project / "conf" / env).mkdir()
    for name, text in files.items():
        (project / "conf" / env / name).write_text(text)


#: What the exit pipeline (reporting) reads of data_processing, kept where a compile of the
#: data_science pipeline alone leaves it readable (else compile refuses: the exit step would fail).
EXIT_INPUTS_CATALOG = """\
preprocessed_shuttles:
  type: pandas.ParquetDataset
  filepath: ${storage_root}/preprocessed_shuttles.parquet
"""

#: How each project is copied: one copy per project (a package is imported once per process),
#: with the config environments its cases add.
PROJECTS: dict[str, tuple[Path, Callable[[Path], None]]] = {
    "example": (EXAMPLE_PROJECT, lambda project: (
        _add_env(project, "golden", {"vertexai.yml": EXAMPLE_RICH_CONFIG, "catalog.yml": EXIT_INPUTS_CATALOG}),
        # The local env's MLflow and catalog in an env a code archive carries (conf/local never travels).
        _add_env(project, "tracked", {name: (project / "conf" / "local" / name).read_text()
                                      for name in ("mlflow.yml", "catalog.yml")}))),
    "real_world": (REAL_WORLD_PROJECT, lambda project: _add_env(project, "mlflow", {"mlflow.yml": MLFLOW_CONFIG})),
}


CASES: tuple[Case, ...] = (
    # test_example_project_compiles_to_a_valid_spec: Vertex AI, declared --params.
    Case("example-vertex-params", "example", ".json", env="cloud",
         params=("data_science.model_options.test_size:float",
                 "data_science.model_options.features:list,reporting.title:str")),
    # An env with MLflow (the local env's files); run values (run-once's --param), load versions, code upload.
    Case("example-vertex-mlflow-code", "example", ".json", env="tracked",
         storage_root="gs://kvx-golden-bucket/runs", params=("data_science.model_options.test_size:float",),
         values={"data_science.model_options.test_size": "0.3", "reporting.top_n": "2",
                 "data_science.model_options.scaler": '{"method": "minmax", "clip": 1}'},
         load_versions={"model_input_table": "2024-01-02T03.04.05.678Z", "companies": "2024-01-01T00.00.00.000Z"},
         code_upload=True),
    # The same pipeline for Kubeflow as YAML, without any platform spec.
    Case("example-kfp-base", "example", ".yaml", env="base", kubeflow=True),
    # Kubeflow with every run_config section: resources, selectors, retries, host aliases, env, s3,
    # fail_fast, an exit pipeline, Kubernetes secrets (the platform spec as second YAML document).
    Case("example-kfp-rich", "example", ".yaml", env="golden", kubeflow=True,
         params=("reporting.top_n:int",)),
    # The same on Vertex AI as JSON, for one named pipeline.
    Case("example-vertex-rich-pipeline", "example", ".json", env="golden", pipeline="data_science"),
    # test_laptop_compile_runs_from_the_image_copy_as_kedro_run: the default env, an exit pipeline.
    Case("real-world", "real_world", ".json"),
    # test_mlflow_with_an_exit_pipeline_ends_finished: MLflow and the exit pipeline.
    Case("real-world-mlflow-exit", "real_world", ".json", env="mlflow",
         params=("alpha:float", "features:list"), values={"alpha": "0.75"}),
    # test_failures_say_whose_fault_it_is: a named pipeline; for Kubeflow as YAML.
    Case("real-world-faulty-kfp", "real_world", ".yaml", pipeline="faulty", kubeflow=True),
    # Airflow: pods with every airflow-k8s.yml section that reaches a pod, MLflow (start task's XCom,
    # final status of the exit task) and a declared parameter.
    Case("example-airflow-pods", "example", ".py", env="airflow", airflow="pods",
         params=("reporting.top_n:int",), own_env={"airflow-k8s.yml": AIRFLOW_RICH_CONFIG,
                                                   "mlflow.yml": EXAMPLE_LOCAL_MLFLOW}),
    # test_airflow_run.py's DAG: the local operator, MLflow of the local env, a declared parameter.
    Case("example-airflow-local", "example", ".py", env="local", airflow="local",
         storage_root="/var/lib/kvx/storage", params=("data_science.model_options.test_size:float",)),
)


def _copy_project(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(
        ".kvx", "__pycache__", "08_reporting", "mlruns", "mlflow.db", ".telemetry"))
    for generated in target.glob("data/0[2-9]_*"):
        shutil.rmtree(generated)
    return target


def _pin_environment() -> None:
    for key in list(os.environ):
        if key.startswith(("KEDRO_CONFIG_", "KVX_")) or key == "KEDRO_ENV":
            del os.environ[key]
    os.environ.update(PINNED_ENV)
    os.environ["KEDRO_DISABLE_TELEMETRY"] = "true"
    os.environ["DO_NOT_TRACK"] = "1"

    import kvx_runtime
    from kvx_runtime import code_upload

    kvx_runtime.__version__ = PINNED_VERSION

    def reference_without_storing(archive: Any, storage_root: str) -> str:
        return f"{storage_root.rstrip('/')}/{code_upload.CODE_DIR}/{archive.name}#sha256={archive.digest}"

    code_upload.upload_archive = reference_without_storing  # type: ignore[assignment]


def compile_case(case: Case, project: Path, out: Path) -> list[Path]:
    """Compile ``case`` in ``project`` as the commands do; write its files to ``out``."""
    if case.own_env:
        _add_env(project, str(case.env), case.own_env)
    try:
        if case.airflow:
            return _compile_dag_case(case, project, out)
        return _compile_spec_case(case, project, out)
    finally:
        if case.own_env:
            shutil.rmtree(project / "conf" / str(case.env))


def _compile_spec_case(case: Case, project: Path, out: Path) -> list[Path]:
    from kvx_runtime.compiler import CompileRequest, compile_pipeline, write_spec
    from kvx_runtime.targets.registry import TARGETS, default_target

    target = TARGETS["kubeflow"] if case.kubeflow else default_target()
    compiled = compile_pipeline(CompileRequest(
        project_path=project, env=case.env, pipeline=case.pipeline, params=case.params,
        storage_root=case.storage_root, load_versions=dict(case.load_versions), values=dict(case.values),
        code_upload=case.code_upload, shared_mounts=target.shared_mounts,
        gpu_resource_name=target.gpu_resource_name,
    ))
    platform = compiled.platform_spec if target.applies_platform_spec and case.output == ".yaml" else None
    spec_path = write_spec(compiled.spec, out / f"{case.name}{case.output}", platform)
    rest = out / f"{case.name}.compiled.json"
    rest.write_text(json.dumps({"steps": compiled.steps, "warnings": compiled.warnings,
                                "values": compiled.values}, indent=2) + "\n", encoding="utf-8")
    return [spec_path, rest]


def _compile_dag_case(case: Case, project: Path, out: Path) -> list[Path]:
    """A DAG file as ``kvx-runtime airflow compile`` writes it, Kedro's version in its header
    normalized (the header names the versions it was made with)."""
    import kedro

    from kvx_runtime.compiler import CompileRequest, compile_dag
    from kvx_runtime.compiler.airflow_render import write_dag
    from kvx_runtime.targets.registry import TARGETS

    target = TARGETS["airflow"]
    compiled = compile_dag(CompileRequest(
        project_path=project, env=case.env, pipeline=case.pipeline, params=case.params,
        storage_root=case.storage_root, load_versions=dict(case.load_versions), values=dict(case.values),
        code_upload=case.code_upload, shared_mounts=target.shared_mounts,
        gpu_resource_name=target.gpu_resource_name,
    ), operator="local" if case.airflow == "local" else "pods",
        project_dir=WORKER_PROJECT_PATH if case.airflow == "local" else None)
    header = compiled.dag.text.replace(f"Kedro {kedro.__version__})", f"Kedro {PINNED_KEDRO})", 1)
    dag = replace(compiled.dag, text=header)
    dag_path = write_dag(dag, out / f"{case.name}{case.output}")
    rest = out / f"{case.name}.compiled.json"
    rest.write_text(json.dumps({"steps": compiled.steps, "warnings": compiled.warnings,
                                "upstream": compiled.dag.upstream}, indent=2) + "\n", encoding="utf-8")
    return [dag_path, rest]


def generate(out: Path) -> list[Path]:
    """Every case's files, written to ``out``."""
    _pin_environment()
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="kvx-golden-") as scratch:
        copies: dict[str, Path] = {}
        for name, (source, prepare) in PROJECTS.items():
            copies[name] = _copy_project(source, Path(scratch) / name)
            prepare(copies[name])
        for case in CASES:
            written += compile_case(case, copies[case.project], out)
    return written


def find_ruff() -> str | None:
    """ruff's executable (on PATH or beside this Python), if installed."""
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    return ruff if Path(ruff).exists() else None


def ruff_findings(ruff: str, dag_files: list[str]) -> str | None:
    """What ruff says of DAG files meant to be read (None: nothing): not as its formatter writes
    them, or imports unsorted, unused or undefined (the renderer's line width, no project config)."""
    import subprocess

    for check in (["format", "--check"], ["check", "--select", "I,F,W"]):
        done = subprocess.run([ruff, *check, "--isolated", "--line-length", "110", *dag_files],
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            return done.stdout + done.stderr
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--write", action="store_true", help=f"rewrite {GOLDEN.relative_to(REPO)}/")
    where.add_argument("--out", type=Path, help="write the specs to this directory instead")
    args = parser.parse_args(argv)
    out = GOLDEN if args.write else args.out
    if args.write:
        shutil.rmtree(GOLDEN, ignore_errors=True)
    for path in generate(out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
