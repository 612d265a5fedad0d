""".dockerignore matching with Docker's own rules, to tell what a project image will contain.

Docker's rules differ from .gitignore's (so gitignore libraries give wrong answers): a pattern
is anchored at the build context's root (``*.pyc`` matches only top-level files), ``**``
matches any number of directories, a pattern that matches a parent directory (at any depth)
excludes everything below it, ``!`` re-includes, and the last matching pattern wins.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TEMPLATE", "DockerIgnore", "image_files", "in_conf_folder"]

#: The .dockerignore of kvx-runtime's project template (``init --with-dockerfile`` writes it).
TEMPLATE = Path(__file__).resolve().parent / "templates" / "project.dockerignore"


def in_conf_folder(template: str, folder: str) -> str:
    """A project template (the Dockerfile, the .dockerignore: written for Kedro's ``conf/``) for
    a project whose configuration is in ``folder`` (its ``CONF_SOURCE``)."""
    return re.sub(r"(?<![\w/.-])conf/", lambda _: f"{folder}/", template)


@dataclass(frozen=True)
class _Pattern:
    regex: re.Pattern[str]
    include: bool  # a "!" pattern
    text: str = ""  # the pattern, normalized


def _tokens(pattern: str) -> list[str]:
    """``pattern`` as regex pieces: ``"*"`` for a star within a path component, the others
    translated (``**`` and ``**/`` included)."""
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
            out.append("*")
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
    return out


_STARS = ("*", ".*", "(?:.*/)?")


def _translate(pattern: str) -> str:
    """The regex of a .dockerignore pattern, matched in time linear in the path however many
    stars it has: what lies between two stars is matched at its first place and never tried
    elsewhere (fnmatch's way), instead of backtracking over every split of the path
    (polynomial in its length, to the number of stars). The first place is always right when
    the piece has a fixed length, the next star reaches at least as far as this one, and,
    for a star within a path component, the piece cannot match "/" (a "[!x]" can); anywhere
    else the star is left to backtrack."""
    tokens = _tokens(pattern)
    out: list[str] = []
    groups = 0
    i = 0
    while i < len(tokens):
        star = tokens[i]
        if star not in ("*", ".*"):
            out.append(star if star != "*" else "[^/]*")
            i += 1
            continue
        end = i + 1
        while end < len(tokens) and tokens[end] not in _STARS:
            end += 1
        pieces = tokens[i + 1 : end]
        following = tokens[end] if end < len(tokens) else None
        within = star == "*"
        first_place_is_right = bool(pieces) and (
            following in ("*", ".*") and not any(re.fullmatch(piece, "/") for piece in pieces)
            if within else following == ".*")
        run = "[^/]*" if within else ".*"
        if first_place_is_right:
            groups += 1  # a look-ahead matches once: the piece's first place is kept
            out.append(f"(?=(?P<g{groups}>{run}?{''.join(pieces)}))(?P=g{groups})")
        else:
            out.append(run + "".join(pieces))
        i = end
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
            self.patterns.append(_Pattern(re.compile(_translate(line)), include, line))

    @classmethod
    def of_project(cls, project: Path) -> DockerIgnore | None:
        path = project / ".dockerignore"
        if not path.is_file():
            return None
        return cls(path.read_text(encoding="utf-8", errors="replace"))

    def excludes(self, relative_path: str) -> bool:
        """Is ``relative_path`` (POSIX, relative to the build context) left out of the image?

        BuildKit's rule: a pattern matches a path when it matches the path or any of its parent
        directories, whatever the pattern's depth (``**/secrets`` covers
        ``secrets/deeper/key.json``), and the last matching pattern decides. The one rule for
        code upload's archive and for what run-local copies (:func:`image_files`)."""
        path = posixpath.normpath(relative_path).lstrip("/")
        parts = path.split("/")
        candidates = ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]  # parents, then the path
        excluded = False
        for pattern in self.patterns:
            if excluded != pattern.include:
                continue  # cannot change the verdict (BuildKit skips it too)
            if any(pattern.regex.match(candidate) for candidate in candidates):
                excluded = not pattern.include
        return excluded

    def may_include_below(self, relative_dir: str) -> bool:
        """Could a ``!`` pattern bring back something below the directory ``relative_dir``
        (so that an excluded directory must still be looked into)? Errs on yes."""
        parts = posixpath.normpath(relative_dir).lstrip("/").split("/")
        return any(pattern.include and _may_match_below(pattern.text.split("/"), parts) for pattern in self.patterns)


def _may_match_below(components: list[str], parts: list[str]) -> bool:
    """May a pattern of ``components`` match the directory of ``parts``, a parent of it or
    something below it?"""
    for index, part in enumerate(parts):
        if index >= len(components) or "**" in components[index]:
            return True  # it names a parent (whose files it brings back), or any depth
        if not re.match(_translate(components[index]), part):
            return False
    return True


def _conf_folder(project: Path) -> str:
    """The project's configuration folder, as ``init`` writes the template for it."""
    from kvx_runtime.errors import KvxError
    from kvx_runtime.project import DEFAULT_CONF_FOLDER, conf_folder_of

    try:
        return conf_folder_of(project, import_settings=False)  # never imports the project here
    except KvxError:  # not a Kedro project, or a CONF_SOURCE read cannot tell: Kedro's default
        return DEFAULT_CONF_FOLDER


def image_files(project: Path, skip: tuple[str, ...] = ()) -> Iterator[str]:
    """The files (POSIX paths relative to ``project``) a build of the project image would
    hold: the project's .dockerignore applied, else the project template's (for its
    configuration folder). Top-level
    directories in ``skip`` are never looked into."""
    ignore = DockerIgnore.of_project(project) or DockerIgnore(in_conf_folder(TEMPLATE.read_text(encoding="utf-8"),
                                                                              _conf_folder(project)))
    for directory, subdirectories, files in os.walk(project):
        relative_dir = Path(directory).relative_to(project).as_posix()
        prefix = "" if relative_dir == "." else relative_dir + "/"
        subdirectories[:] = sorted(
            name for name in subdirectories
            if not (prefix == "" and name in skip)
            and (not ignore.excludes(prefix + name) or ignore.may_include_below(prefix + name)))
        for name in sorted(files):
            if not ignore.excludes(prefix + name):
                yield prefix + name
