"""A seeded fuzzer over what a user types: vertexai.yml files, --param values, storage roots.

Every case must end in success or a kvx-runtime error (a clear line, exit 2); any other
exception is a traceback a user would see. Deterministic (seeded), in-process, a few seconds.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from kvx_runtime.config import ALL_KEYS, STEP_KEYS, load_plugin_config, normalize_storage_root
from kvx_runtime.errors import KvxError
from kvx_runtime.params import parse_params

SEED = 20261124
CASES = 2000

VALID = {
    "project_id": "p",
    "region": "europe-west1",
    "run_config": {
        "image": "img:${commit_id|latest}",
        "root": "bucket/prefix",
        "experiment_name": "e",
        "ttl": 3600,
        "on_exit_pipeline": "notify",
        "failure_policy": "fail_slow",
        "resources": {"__default__": {"cpu": "500m", "memory": "1Gi"}, "train": {"cpu": 2, "gpu": 1}},
        "node_selectors": {"train": {"cloud.google.com/gke-accelerator": "NVIDIA_L4"}},
        "retries": {"__default__": {"max_retry_count": 2, "backoff_duration": "30s"}},
        "dynamic_config_providers": [{"cls": "a.b.C", "params": {"x": 1}}],
        "grouping": {"cls": "kvx_runtime.grouping.TagNodeGrouper", "params": {"tag_prefix": "group."}},
        "network": {"vpc": "v", "host_aliases": [{"ip": "10.0.0.1", "hostnames": ["h"]}]},
        "mlflow": {"request_header_provider_params": {"client_id": "x"}, "required": True},
        "labels": {"team": "ml"},
        "env": {"A": "1"},
    },
}

ODD_VALUES = [
    None, True, False, 0, -1, 1.5, 10**30, float("inf"), "", " ", "${", "${undefined}", "${a|b", "${run_id}",
    "${oc.env:NOPE}", "${globals:missing}", "{{$.x}}", "\u00e9\u4e2d\U0001f600", "a" * 5000, [], {}, [1, [2, [3]]],
    {"nested": {"deeper": None}}, "500m", "-3", "1e400", "true", "null", "0x10", "gs://", "://x",
]


def _nested(depth: int) -> str:
    """A deeply nested mapping as YAML flow text (too deep for a YAML dumper to write)."""
    return "run_config: " + "{k: " * depth + "leaf" + "}" * depth + "\n"


def _mutate(rng: random.Random, value: object, depth: int = 0) -> object:
    if isinstance(value, dict) and value and rng.random() < 0.8:
        out = dict(value)
        key = rng.choice(list(out))
        action = rng.random()
        if action < 0.5:
            out[key] = _mutate(rng, out[key], depth + 1)
        elif action < 0.65:
            out.pop(key)
        elif action < 0.8:
            out[rng.choice(["extra", "imgae", key + "_", "\u00fc", "1"])] = rng.choice(ODD_VALUES)
        else:
            out[key] = rng.choice(ODD_VALUES)
        return out
    if isinstance(value, list) and value and rng.random() < 0.7:
        out_list = list(value)
        index = rng.randrange(len(out_list))
        out_list[index] = _mutate(rng, out_list[index], depth + 1)
        return out_list
    return rng.choice(ODD_VALUES)


def _document(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.6:
        text = yaml.safe_dump(_mutate(rng, VALID), allow_unicode=True)
    elif kind < 0.65:
        text = yaml.safe_dump(rng.choice(ODD_VALUES), allow_unicode=True)
    elif kind < 0.7:
        text = _nested(rng.randint(50, 3000))
    elif kind < 0.8:  # broken YAML
        text = yaml.safe_dump(VALID)
        cut = rng.randrange(len(text))
        breakage = rng.choice(["\t", ": :", "[", "{", "'", "\"", "&a *b", "!!python/object:os.system"])
        text = text[:cut] + breakage + text[cut:]
    elif kind < 0.9:  # bytes that are not UTF-8
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
    else:
        text = rng.choice(["42", "true", "- a\n- b", "~", "'just a string'", "run_config: 5", "run_config: [1, 2]",
                           "run_config:\n  resources: 7", "run_config: {root: {a: b}}", "---\n---\n", "%YAML 9.9\n"])
    data = text.encode("utf-8")
    return data if rng.random() > 0.05 else b"\xef\xbb\xbf" + data  # a BOM sometimes


@pytest.mark.slow  # make test and CI run it; make test-fast does not
def test_two_thousand_vertexai_yml_files_never_end_in_a_traceback(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    conf = tmp_path / "conf"
    (conf / "base").mkdir(parents=True)
    (conf / "cloud").mkdir()
    crashes: list[str] = []
    outcomes = {"ok": 0, "error": 0}
    for case in range(CASES):
        (conf / "base" / "vertexai.yml").write_bytes(_document(rng))
        env_file = conf / "cloud" / "vertexai.yml"
        if rng.random() < 0.3:
            env_file.write_bytes(_document(rng))
        elif env_file.exists():
            env_file.unlink()
        needed = ALL_KEYS if rng.random() < 0.5 else STEP_KEYS
        try:
            load_plugin_config(conf, rng.choice(["base", "cloud"]), needed=needed,
                               merge_strategy=rng.choice(["destructive", "soft"]))
            outcomes["ok"] += 1
        except KvxError as exc:
            outcomes["error"] += 1
            assert str(exc).strip(), f"case {case}: an empty error message"
        except Exception as exc:  # a traceback for the user
            crashes.append(f"case {case}: {type(exc).__name__}: {str(exc)[:200]}")
    assert crashes == [], f"{len(crashes)} tracebacks, first: {crashes[:5]}"
    assert outcomes["ok"] > 100 and outcomes["error"] > 100  # both paths exercised


@pytest.mark.parametrize("depth", [10, 200, 5000])
def test_deeply_nested_params_are_an_error_not_a_crash(depth: int) -> None:
    key = ".".join(["k"] * depth)
    value = "[" * depth + "]" * depth
    for item in (f"{key}=1", f"k={value}", f"k:list={value}"):
        try:
            parse_params([item])
        except KvxError:
            pass


@pytest.mark.slow
def test_params_and_storage_roots_fuzz(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    alphabet = "abc.:=/[]{}\"'\\ ${}|@%\u00e9\x00\n\t-_0123456789"
    crashes: list[str] = []
    for case in range(CASES):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        bare_is_bucket = bool(case % 2)
        for function in (lambda t: parse_params([t]),
                         lambda t, bare=bare_is_bucket: normalize_storage_root(t, bare_is_bucket=bare)):
            try:
                function(text)
            except KvxError:
                pass
            except Exception as exc:
                crashes.append(f"{text!r}: {type(exc).__name__}: {exc}")
    assert crashes == [], crashes[:5]
