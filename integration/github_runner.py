"""The jobs of a generated GitHub Actions workflow, their shell steps run here as GitHub's runner
would: bash -eo pipefail, $GITHUB_ENV carried from step to step, $GITHUB_STEP_SUMMARY collected.
What only GitHub can run (checkout, the auth action, setup-gcloud, the docker build and push)
is left out: ``uses:`` steps and the steps in :data:`NOT_HERE`.

GitHub's ``${{ ... }}`` expressions in a job's or step's ``env:`` and the steps' ``if:`` are
not evaluated here: the test says what GitHub would make of each (``known``), and one it does
not name fails the test rather than running with a guess."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["NOT_HERE", "github_value", "run_job"]

#: Steps that need GitHub's runner or a Docker daemon and registry.
NOT_HERE = frozenset({"Install the project"})

_EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def github_value(text: str, known: Mapping[str, str]) -> str:
    """``text`` with each ``${{ expression }}`` replaced by what ``known`` says GitHub makes of it."""

    def value(match: re.Match[str]) -> str:
        assert match.group(1) in known, f"the test does not say what GitHub makes of ${{{{ {match.group(1)} }}}}"
        return known[match.group(1)]

    return _EXPRESSION.sub(value, text)


def run_job(root: Path, job: dict[str, Any], env: dict[str, str], tmp_path: Path,
            known: Mapping[str, str] | None = None) -> str:
    """Run ``job``'s run: steps in order in ``root``, with ``env``, the job's ``env:`` and each
    step's; returns its step summary. ``known``: the job's expressions and ``if:`` conditions
    (``"true"``/``"false"``) as GitHub would evaluate them."""
    known = known or {}
    runner = tmp_path / "runner"
    runner.mkdir(parents=True, exist_ok=True)
    summary, github_env = runner / "summary.md", runner / "env"
    summary.write_text("")
    github_env.write_text("")
    job_env = {name: github_value(str(value), known) for name, value in (job.get("env") or {}).items()}
    for step in job["steps"]:
        if "run" not in step or step.get("name") in NOT_HERE:
            continue
        if "if" in step:
            condition = _EXPRESSION.sub(r"\1", str(step["if"])).strip()
            assert known.get(condition) in {"true", "false"}, f"the test does not say whether GitHub runs " \
                                                              f"{step.get('name')!r} (if: {condition})"
            if known[condition] == "false":
                continue
        carried = dict(line.split("=", 1) for line in github_env.read_text().splitlines() if "=" in line)
        step_env = {name: github_value(str(value), known) for name, value in (step.get("env") or {}).items()}
        step_environment = {**env, **job_env, **carried, **step_env, "GITHUB_ENV": str(github_env),
                            "GITHUB_STEP_SUMMARY": str(summary), "RUNNER_TEMP": str(runner)}
        result = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd=root,
                                env=step_environment, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{step.get('name')}: {result.stdout[-1000:]}{result.stderr[-2000:]}"
    return summary.read_text()
