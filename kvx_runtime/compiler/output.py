"""Writing what a compile produces (a KFP spec, an Airflow DAG file) to the user's ``-o`` path."""

from __future__ import annotations

from pathlib import Path

from kvx_runtime.errors import UsageError

__all__ = ["write_output"]


def write_output(output: str | Path, text: str) -> Path:
    """``text`` at ``output`` (its folder made if missing); a path that cannot be written is
    exit 2 naming it and why, never an internal error."""
    path = Path(output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write -o {output}: {exc.strerror or type(exc).__name__}",
                         hint="name a file in a folder you can write to") from None
    return path
