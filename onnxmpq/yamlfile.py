"""YAML as profiles and run configs use it: `yaml.SafeLoader` without anchors and aliases.

Neither format needs `&anchor` / `*alias`, and they are how a 1 KB file becomes a self-referring
structure (RecursionError further on) or an exponential one (the "billion laughs"); the loader refuses
the first alias with its line. Nesting deeper than the parser's recursion allows is refused too, and
files are read whole only up to `paths.MAX_SIDE_FILE` bytes.
"""

from __future__ import annotations

from typing import Any

import yaml

from onnxmpq.errors import OnnxmpqError


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]  # types-PyYAML leaves it unannotated
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in onnxmpq's YAML files",
                                              event.start_mark)
        return super().compose_node(parent, index)


def parse(text: str, source: str, hint: str) -> tuple[Any, yaml.Node | None]:
    """(data, node tree) of one YAML document; an error names `source` and the line."""
    try:
        node = yaml.compose(text, Loader=_NoAliasLoader)
        data = yaml.load(text, Loader=_NoAliasLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if mark is not None and mark.line >= len(text.splitlines()):  # an error found at the end of input
            mark = getattr(exc, "context_mark", None) or mark
        where = f" line {min(mark.line + 1, max(len(text.splitlines()), 1))}" if mark else ""
        raise OnnxmpqError(f"{source}{where} is not valid YAML: {getattr(exc, 'problem', exc)}.", hint) from None
    except RecursionError:
        raise OnnxmpqError(f"{source} nests too deeply to be a profile or config.", hint) from None
    return data, node


def key_lines(node: yaml.Node | None, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Line (1-based) of every mapping key in a composed YAML node tree, by key path."""
    lines: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = path + (str(key.value),)
            lines[sub] = key.start_mark.line + 1
            lines.update(key_lines(value, sub))
    return lines
