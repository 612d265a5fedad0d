"""`init --cloud-env NAME`: the Kedro env overlay putting every local catalog dataset under the
storage root, checked by loading it with Kedro's own config loader; its refusals."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from integration.conftest import SPACEFLIGHTS_CATALOG, make_project, make_spaceflights_project
from kvx_runtime.cli import cli
from kvx_runtime.config_loader import EnvTemplatedConfigLoader

# The overlay is read through Kedro's OmegaConfigLoader and its catalog pattern matching.
pytestmark = pytest.mark.kedro

#: Beyond the starter's: a YAML variable, the user's own placeholder, an absolute path, a
#: wrapped dataset.
EXTRA_CATALOG = """
_logs: data/09_logs

run_log:
  type: text.TextDataset
  filepath: ${_logs}/${run_id}.txt

mounted:
  type: text.TextDataset
  filepath: /gcs/kvx-e2e/mounted.txt

cached_summary:
  type: CachedDataset
  dataset:
    type: pandas.CSVDataset
    filepath: data/04_feature/summary.csv
"""
LOCAL_KEYS = ["companies", "reviews", "shuttles", "preprocessed_companies", "preprocessed_shuttles", "{name}_table",
              "regressor", "metrics", "{name}_report", "run_log", "cached_summary"]


@pytest.fixture(autouse=True)
def _no_exported_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KEDRO_CONFIG_STORAGE_ROOT", "KEDRO_CONFIG_RUN_ID", "KEDRO_ENV"):
        monkeypatch.delenv(name, raising=False)


def project_with_extras(tmp_path: Path, package: str) -> Path:
    project = make_spaceflights_project(tmp_path, package)
    with (project / "conf" / "base" / "catalog.yml").open("a") as catalog:
        catalog.write(textwrap.dedent(EXTRA_CATALOG))
    return project


def init(project: Path, *args: str, group: tuple[str, ...] = ()):
    return CliRunner().invoke(cli, [*group, "init", *args, "--project-path", str(project)], prog_name="kvx-runtime")


def catalog_of(project: Path, env: str) -> dict:
    return EnvTemplatedConfigLoader(str(project / "conf"), base_env="base", default_run_env="local", env=env)["catalog"]


def path_key(entry: dict) -> tuple[dict, str]:
    """(the mapping holding the entry's path, its key)."""
    holder = entry.get("dataset", entry)
    return holder, "filepath" if "filepath" in holder else "path"


def test_every_local_entry_is_copied_whole_with_only_its_path_under_the_root(tmp_path: Path, monkeypatch) -> None:
    project = project_with_extras(tmp_path, "sf_overlay_whole")
    result = init(project, "--cloud-env", "cloud")
    assert result.exit_code == 0, result.output
    overlay = project / "conf" / "cloud" / "catalog.yml"
    text = overlay.read_text()
    written = yaml.safe_load(text)
    # The base entries on local paths (factories too), in the base file's order; the variable they use.
    assert list(written) == ["_logs", *LOCAL_KEYS]
    assert written["regressor"]["versioned"] is True
    assert written["shuttles"]["load_args"] == {"sep": ";"}
    assert written["run_log"]["filepath"] == "${storage_root}/${_logs}/${run_id}.txt"  # the user's own kept
    assert written["{name}_table"]["filepath"] == "${storage_root}/data/03_primary/{name}_table.parquet"
    assert text.startswith("# Kedro environment 'cloud'")

    # As Kedro reads it: each entry the base one, its path under the step's storage root.
    monkeypatch.setenv("KEDRO_CONFIG_STORAGE_ROOT", "gs://bucket/runs")
    monkeypatch.setenv("KEDRO_CONFIG_RUN_ID", "run-7")
    base, cloud = catalog_of(project, "base"), catalog_of(project, "cloud")
    for key in LOCAL_KEYS:
        expected = yaml.safe_load(yaml.safe_dump(base[key]))
        holder, name = path_key(expected)
        holder[name] = f"gs://bucket/runs/{holder[name]}"
        assert cloud[key] == expected, key
    for key in ("archive", "scratch", "mounted"):  # left as they are: base's entry
        assert cloud[key] == base[key]
    for line in ("#   archive: already on s3://", "#   scratch: MemoryDataset: in memory, no path",
                 "#   mounted: an absolute path (/gcs/kvx-e2e/mounted.txt)"):
        assert line in text

    # The one block: what was done, which inputs to copy where, what next.
    assert "conf/cloud/catalog.yml: 11 catalog entries under ${storage_root}, 3 left as they are" in result.output
    assert "data/01_raw/ -> gs://kvx-e2e/spaceflights/data/01_raw/  (companies.csv, reviews.csv, shuttles.csv)" \
        in result.output
    assert "#   data/01_raw/shuttles.csv -> ${storage_root}/data/01_raw/shuttles.csv" in text
    assert "needs kvx-runtime's config loader in settings.py" in result.output  # make_project's settings are empty
    assert "Next: kvx-runtime compile --env cloud --strict" in result.output


def test_per_run_puts_outputs_under_the_run_id_and_keeps_inputs_shared(tmp_path: Path) -> None:
    project = make_spaceflights_project(tmp_path, "sf_overlay_per_run")
    result = init(project, "--cloud-env", "isolated", "--per-run")
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((project / "conf" / "isolated" / "catalog.yml").read_text())
    paths = {key: entry["filepath"] for key, entry in written.items()}
    assert paths["companies"] == "${storage_root}/data/01_raw/companies.csv"
    assert paths["metrics"] == "${storage_root}/${run_id}/data/08_reporting/metrics.json"
    assert paths["{name}_table"] == "${storage_root}/${run_id}/data/03_primary/{name}_table.parquet"
    assert paths["regressor"] == "${storage_root}/${run_id}/data/06_models/regressor.pickle"
    assert paths["{name}_report"] == "${storage_root}/${run_id}/data/08_reporting/{name}.csv"


def test_an_existing_env_is_resolved_as_it_is_and_its_own_entries_are_kept(tmp_path: Path, monkeypatch) -> None:
    project = make_project(
        tmp_path, "sf_overlay_env", "def f(x):\n    return x\n",
        "from kedro.pipeline import Pipeline, node\nfrom sf_overlay_env.nodes import f\n\n"
        "def register_pipelines():\n    return {'__default__': Pipeline([node(f, 'raw', 'model', name='train'),\n"
        "        node(f, 'model', 'report', name='report')])}\n",
        catalog="raw:\n  type: pickle.PickleDataset\n  filepath: data/01_raw/raw.pkl\n"
                "model:\n  type: pickle.PickleDataset\n  filepath: data/06_models/model.pkl\n"
                "report:\n  type: text.TextDataset\n  filepath: ${globals:reports}/report.txt\n",
        vertexai="run_config: {image: img}\n")
    (project / "conf" / "base" / "globals.yml").write_text("reports: data/08_reporting\n")
    cloud = project / "conf" / "cloud"
    cloud.mkdir()
    (cloud / "globals.yml").write_text("reports: gs://reports-bucket/team\n")
    (cloud / "catalog_models.yml").write_text("model:\n  type: pickle.PickleDataset\n  filepath: s3://models/m.pkl\n")
    (cloud / "vertexai.yml").write_text("run_config: {root: s3://cloud-root/x}\n")
    result = init(project, "--cloud-env", "cloud")
    assert result.exit_code == 0, result.output
    text = (cloud / "catalog.yml").read_text()
    assert list(yaml.safe_load(text)) == ["raw"]
    assert "#   model: conf/cloud defines it already" in text and "#   report: already on gs://" in text
    assert "data/01_raw/ -> s3://cloud-root/x/data/01_raw/  (raw.pkl)" in result.output  # the env's root
    monkeypatch.setenv("KEDRO_CONFIG_STORAGE_ROOT", "s3://cloud-root/x")
    loaded = catalog_of(project, "cloud")  # no duplicate key between the env's files
    assert loaded["raw"]["filepath"] == "s3://cloud-root/x/data/01_raw/raw.pkl"
    assert loaded["model"]["filepath"] == "s3://models/m.pkl"

    # --force rewrites the overlay from conf/base again: the old one is not read as the env's.
    again = init(project, "--cloud-env", "cloud", "--force")
    assert again.exit_code == 0, again.output
    assert (cloud / "catalog.yml").read_text() == text


@pytest.mark.parametrize(("name", "says"), [
    ("base", "is Kedro's base environment"),
    ("local", "is Kedro's laptop environment"),
    ("../up", "is not a folder name"),
    (".hidden", "is not a folder name"),
    ("two words", "is not a folder name"),
])
def test_a_bad_env_name_is_refused_and_nothing_written(tmp_path: Path, name: str, says: str) -> None:
    project = make_spaceflights_project(tmp_path, "sf_bad_" + "".join(c for c in name if c.isalnum()))
    before = sorted(p.relative_to(project).as_posix() for p in (project / "conf").rglob("*"))
    result = init(project, "my-gcp", "europe-west4", "--cloud-env", name)
    assert result.exit_code == 2
    assert says in result.output and "Traceback" not in result.output
    assert sorted(p.relative_to(project).as_posix() for p in (project / "conf").rglob("*")) == before


def test_an_existing_overlay_a_catalog_without_local_paths_and_bad_arguments_are_refused(tmp_path: Path) -> None:
    project = make_spaceflights_project(tmp_path, "sf_refusals")
    overlay = project / "conf" / "cloud" / "catalog.yml"
    overlay.parent.mkdir()
    overlay.write_text("# mine\n")
    exists = init(project, "--cloud-env", "cloud")
    assert exists.exit_code == 2 and "catalog.yml already exists; nothing was written" in exists.output
    assert overlay.read_text() == "# mine\n"

    assert init(project).exit_code == 2 and "missing arguments PROJECT_ID REGION" in init(project).output
    half = init(project, "my-gcp", "--cloud-env", "cloud2")
    assert half.exit_code == 2 and "missing argument REGION" in half.output
    per_run = init(project, "my-gcp", "europe-west4", "--per-run")
    assert per_run.exit_code == 2 and "--per-run is an option of --cloud-env" in per_run.output
    assert not (project / "conf" / "cloud2").exists()

    remote = make_project(tmp_path, "sf_no_local", "", "def register_pipelines():\n    return {}\n",
                          catalog="a:\n  type: pandas.CSVDataset\n  filepath: gs://b/a.csv\n"
                                  "b:\n  type: MemoryDataset\n")
    nothing = init(remote, "--cloud-env", "cloud")
    assert nothing.exit_code == 2
    assert "conf/base's catalog has no dataset on a local path" in nothing.output
    assert "a: already on gs://" in nothing.output
    assert not (remote / "conf" / "cloud").exists()


def test_every_targets_init_takes_it_and_keeps_an_existing_config_file(tmp_path: Path) -> None:
    from kvx_runtime.commands.groups import commands_for
    from kvx_runtime.targets.registry import TARGETS

    project = make_spaceflights_project(tmp_path, "sf_targets")
    config = project / "conf" / "base" / "vertexai.yml"
    before = config.read_text()
    kept = init(project, "my-gcp", "europe-west4", "--cloud-env", "cloud")
    assert kept.exit_code == 0, kept.output
    assert "conf/base/vertexai.yml exists: kept as it is" in kept.output and config.read_text() == before

    kfp = init(project, "--cloud-env", "minio", group=("kfp",))
    assert kfp.exit_code == 0, kfp.output
    assert (project / "conf" / "minio" / "catalog.yml").is_file()
    assert "Next: kvx-runtime kfp compile --env minio --strict" in kfp.output
    for target in TARGETS.values():  # `kedro vertexai init`, `kedro kubeflow init`: the same command objects
        [command] = [c for c in commands_for(target) if c.name == "init"]
        assert {"cloud_env", "per_run"} <= {p.name for p in command.params}

    # A new project: the config file and the overlay in one init, the root from the new file.
    fresh = make_project(tmp_path, "sf_fresh", "def f(x):\n    return x\n",
                         "from kedro.pipeline import Pipeline, node\nfrom sf_fresh.nodes import f\n\n"
                         "def register_pipelines():\n    return {'__default__': Pipeline([node(f, 'a', 'b')])}\n",
                         catalog=SPACEFLIGHTS_CATALOG.replace("companies:", "a:", 1))
    (fresh / "src" / "sf_fresh" / "settings.py").write_text(
        "from kvx_runtime.config_loader import EnvTemplatedConfigLoader\n\n"
        "CONFIG_LOADER_CLASS = EnvTemplatedConfigLoader\n")
    both = init(fresh, "my-gcp", "europe-west4", "--cloud-env", "cloud")
    assert both.exit_code == 0, both.output
    assert (fresh / "conf" / "base" / "vertexai.yml").is_file() and (fresh / "conf" / "cloud" / "catalog.yml").is_file()
    assert "data/01_raw/ -> gs://my-gcp-pipelines/sf-fresh/data/01_raw/  (companies.csv)" in both.output
    assert "needs kvx-runtime's config loader" not in both.output
