"""Parsing a configuration file's YAML text so that every error points at its place:
``path:LINE:COLUMN: problem`` (lines and columns counted from 1, as editors do), and a key
written twice in one mapping refused with its name and both lines (PyYAML would silently
keep the last one).
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node

from kvx_runtime.errors import ConfigError

__all__ = ["UniqueKeyLoader", "describe_yaml_error", "load_yaml"]

_MERGE_TAG = "tag:yaml.org,2002:merge"


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing a key repeated in one mapping (``<<`` merges may still
    override keys: that is what they are for)."""

    def construct_mapping(self, node: Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            first_seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first_seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if earlier is not key_node.start_mark:
                    raise ConstructorError(
                        None, earlier, f"duplicate key {key!r} (first at line {earlier.line + 1}, again at line "
                        f"{key_node.start_mark.line + 1}): YAML would keep only the last", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def describe_yaml_error(exc: yaml.YAMLError, path: str) -> str:
    """``path:LINE:COLUMN: not valid YAML: problem (context)`` where PyYAML knows the place,
    else ``path: not valid YAML: problem``."""
    if not isinstance(exc, yaml.MarkedYAMLError) or (exc.problem_mark is None and exc.context_mark is None):
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        return f"{path}: not valid YAML: {first}"
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or type(exc).__name__
    context = ""
    if exc.context and exc.problem:  # "while parsing a flow sequence", with where it started
        started = f" started at line {exc.context_mark.line + 1}" if exc.context_mark else ""
        context = f" ({exc.context}{started})"
    return f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}{context}"


def load_yaml(text: str, path: str) -> Any:
    """``text`` parsed (safe tags only); a :class:`ConfigError` naming the place otherwise."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: safe tags only
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a configuration") from None
    except yaml.YAMLError as exc:
        raise ConfigError(describe_yaml_error(exc, path)) from None
