"""Reading a plan's YAML safely: UTF-8 named by its byte, the safe loader within limits on size, nesting,
aliases and values (a hostile plan costs no minutes of CPU and no RecursionError), and the first duplicate key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from embedlens.errors import EmbedLensError, PlanError


#: Limits that keep a hostile plan from costing minutes of CPU or a RecursionError (YAML alias bombs, deep nesting).
MAX_PLAN_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_ALIASES = 100
MAX_NODES = 100_000


def read_utf8(path: Path, error: type[EmbedLensError]) -> str:
    """The text of `path`, or `error` naming the byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save the file as UTF-8") from None


class _Limits(yaml.SafeLoader):
    """The safe loader, with a cap on nesting depth and alias count while composing."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise _TooBig(mark.line + 1, f"more than {MAX_ALIASES} aliases (*name); write the values out")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise _TooBig(mark.line + 1, f"nested more than {MAX_DEPTH} levels deep")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _TooBig(Exception):
    def __init__(self, line: int, msg: str):
        super().__init__(msg)
        self.line = line


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Number of values the document holds once aliases are expanded (shared nodes counted each time)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a cycle counts once, never loops
    if isinstance(node, yaml.MappingNode):
        n = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        n = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        n = 1
    memo[key] = min(n, MAX_NODES + 1)
    return memo[key]


def _parse_yaml(text: str, where: str) -> tuple[yaml.Node | None, Any]:
    """Compose and construct the document with the safe loader, within `MAX_DEPTH`, `MAX_ALIASES` and `MAX_NODES`."""
    loader = _Limits(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_NODES:
            raise _TooBig(1, f"expands to more than {MAX_NODES} values through aliases")
        raw = loader.construct_document(node) if node is not None else None
    except _TooBig as e:
        raise PlanError(f"{where}:{e.line}: the plan is {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise PlanError(f"{where}{line}: YAML syntax error: {problem}") from None
    except RecursionError:
        raise PlanError(f"{where}: the plan is nested too deeply") from None
    finally:
        loader.dispose()
    return node, raw


def _duplicate_key(node: yaml.Node | None, path: str = "") -> tuple[int, str, str, int] | None:
    """The first mapping key given twice (PyYAML would silently keep the last): (line, key path, key, first line)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for k, v in node.value:
            key = k.value
            if key in seen:
                return k.start_mark.line + 1, path or "(top level)", key, seen[key]
            seen[key] = k.start_mark.line + 1
            found = _duplicate_key(v, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            found = _duplicate_key(v, f"{path}[{i}]")
            if found:
                return found
    return None
