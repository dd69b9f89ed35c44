"""``--set KEY=VALUE``: change one plan key for one run without editing the plan.

A key is dotted (``model.source``, ``data.synthetic.n``, ``probes.0.params.layer``:
a number indexes a list); the value is read as YAML (``4`` is a number,
``float16`` a string, ``[0, 1]`` a list, ``null`` unsets). Overrides apply to
the plan as parsed, before it is validated, so an override is checked exactly
as the same key written in the file, and an error names it.

Example:
    >>> raw = {"model": {"source": "tiny:llava-clip"}, "batch_size": 2}
    >>> applied = apply_overrides(raw, ["model.source=tiny:paligemma", "batch_size=4"])
    >>> raw, applied
    ({'model': {'source': 'tiny:paligemma'}, 'batch_size': 4}, {'model.source': 'tiny:paligemma', 'batch_size': 4})
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import yaml

from embedlens.errors import PlanError

_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+")


def parse_override(item: str) -> tuple[tuple[str | int, ...], Any]:
    """``"a.b.0=v"`` -> ``(("a", "b", 0), v)`` with `v` read as YAML.

    Raises:
        PlanError: naming the override and what is expected.
    """
    if not isinstance(item, str) or "=" not in item:
        raise PlanError(f"--set {item!r}: expected KEY=VALUE with a dotted plan key, e.g. --set model.source=tiny:paligemma")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not key.strip() or not all(_PART.fullmatch(p) for p in parts) or parts[0].isdigit():
        raise PlanError(f"--set {item!r}: {key.strip()!r} is not a dotted plan key (names and list indexes separated by '.', "
                        "e.g. model.source, batch_size, probes.0.params.layer)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise PlanError(f"--set {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    return tuple(int(p) if p.isdigit() else p for p in parts), value


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict[str, Any]:
    """Set each override in the parsed plan `raw` (in place) and return them as ``{dotted key: value}``.

    Missing mappings on the way are created (``data.synthetic.n`` on a plan
    without ``data``); a list is indexed only within its length.

    Raises:
        PlanError: a malformed override, or a key whose parent in the plan is not a mapping or list.
    """
    applied: dict[str, Any] = {}
    for item in overrides:
        path, value = parse_override(item)
        node: Any = raw
        for depth, part in enumerate(path[:-1]):
            here = ".".join(map(str, path[: depth + 1]))
            if isinstance(node, dict):
                if node.get(part) is None:
                    node[part] = [] if isinstance(path[depth + 1], int) else {}
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int):
                if part >= len(node):
                    raise PlanError(f"--set {item}: {here}: the plan's list has {len(node)} entries (indexes 0..{len(node) - 1})")
                node = node[part]
            else:
                raise PlanError(f"--set {item}: {here}: the plan has {_kind(node)} there, not a mapping with key {part!r}")
        last = path[-1]
        if isinstance(node, dict) and isinstance(last, str):
            node[last] = value
        elif isinstance(node, list) and isinstance(last, int) and last < len(node):
            node[last] = value
        else:
            above = ".".join(map(str, path[:-1]))
            raise PlanError(f"--set {item}: {above} is {_kind(node)} in the plan, not a mapping with key {last!r}"
                            if not isinstance(node, list) else f"--set {item}: {above} is {_kind(node)} in the plan; "
                            f"index it with 0..{len(node) - 1}")
        applied[".".join(map(str, path))] = value
    return applied


def _kind(node: Any) -> str:
    if isinstance(node, list):
        return f"a list of {len(node)}"
    return f"a {type(node).__name__} ({node!r})"


def overridden(loc: tuple, applied: dict[str, Any]) -> str | None:
    """The override that set the plan key at `loc` (or a key above or below it), as ``KEY=VALUE``, or None."""
    dotted = ".".join(map(str, loc))
    for key, value in applied.items():
        if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
            return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
    return None
