"""Strict YAML reading for user-edited files: duplicate keys are errors, and every value keeps its line number.

PyYAML silently lets a repeated key overwrite the first one, which in a release matrix means a release can vanish
without a word. Here a repeated key is an error naming both lines, and `line_of()` maps a pydantic error location
back to the line a person should edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class YamlProblem(Exception):
    """A file that is not valid YAML, or not the mapping we expect; carries the 1-based line when known."""

    def __init__(self, message: str, line: int | None = None):
        self.message = message
        self.line = line
        super().__init__(message)


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise YamlProblem(f"duplicate key {key!r} (first defined on line {seen[key]})", line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


@dataclass(frozen=True)
class YamlDocument:
    """The parsed data of one YAML file plus its node tree, for line lookups."""

    path: Path
    data: Any
    root: yaml.Node | None

    def line_of(self, loc: tuple[str | int, ...]) -> int | None:
        """Line of the deepest node that `loc` reaches (a missing key points at its parent mapping)."""
        node = self.root
        line = node.start_mark.line + 1 if node is not None else None
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
                if match is None:
                    return line
                line = match[0].start_mark.line + 1
                node = match[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                return line
        return line


def read_yaml(path: Path) -> YamlDocument:
    """Parse `path`; raise YamlProblem with the line for syntax errors and duplicate keys."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise YamlProblem("file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise YamlProblem(f"cannot read file: {exc}") from None
    loader = _UniqueKeyLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise YamlProblem(f"not valid YAML: {exc.problem or exc.context}", line) from None
    except yaml.YAMLError as exc:
        raise YamlProblem(f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    return YamlDocument(path=path, data=data, root=root)
