""".dockerignore matching with Docker's own rules, to tell what a project image will contain.

Docker's rules differ from .gitignore's (so gitignore libraries give wrong answers): a pattern
is anchored at the build context's root (``*.pyc`` matches only top-level files), ``**``
matches any number of directories, a pattern that matches a parent directory excludes
everything below it, ``!`` re-includes, and the last matching pattern wins.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DockerIgnore"]


@dataclass(frozen=True)
class _Pattern:
    regex: re.Pattern[str]
    depth: int  # path components in the pattern
    include: bool  # a "!" pattern


def _translate(pattern: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):  # "**/": zero or more directories
                    i += 1
                    out.append("(?:.*/)?")
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(char))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("^"):
                    body = "!" + body[1:]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(char))
        i += 1
    return "^" + "".join(out) + "$"


class DockerIgnore:
    """The patterns of one .dockerignore file."""

    def __init__(self, text: str) -> None:
        self.patterns: list[_Pattern] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            if include:
                line = line[1:].strip()
            line = posixpath.normpath(line).lstrip("/")
            if not line or line == ".":
                continue
            self.patterns.append(_Pattern(re.compile(_translate(line)), len(line.split("/")), include))

    @classmethod
    def of_project(cls, project: Path) -> DockerIgnore | None:
        path = project / ".dockerignore"
        if not path.is_file():
            return None
        return cls(path.read_text(encoding="utf-8", errors="replace"))

    def excludes(self, relative_path: str) -> bool:
        """Is ``relative_path`` (POSIX, relative to the build context) left out of the image?"""
        path = posixpath.normpath(relative_path).lstrip("/")
        parts = path.split("/")
        excluded = False
        for pattern in self.patterns:
            matched = bool(pattern.regex.match(path))
            if not matched and len(parts) > 1 and pattern.depth < len(parts):
                # A pattern matching a parent directory covers everything below it.
                matched = bool(pattern.regex.match("/".join(parts[: pattern.depth])))
            if matched:
                excluded = not pattern.include
        return excluded
