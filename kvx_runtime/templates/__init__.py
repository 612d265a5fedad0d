"""The files kvx-runtime writes into projects (init's config files, Dockerfile and
.dockerignore; the CI workflows), read as text."""

from __future__ import annotations

from pathlib import Path

__all__ = ["template_text"]

_FOLDER = Path(__file__).resolve().parent


def template_text(name: str) -> str:
    """The template file ``name`` of this folder."""
    return _FOLDER.joinpath(name).read_text(encoding="utf-8")
