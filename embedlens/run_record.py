"""A finished run's ``manifest.json`` and ``summary.json`` read as input from a stranger.

`embedlens compare` takes run folders anyone may have written or edited. Each
file is checked for what reading it could trip over (size, nesting depth,
integers of thousands of digits, keys of any length) and for the shapes the
comparison relies on (mappings where mappings belong, text where text
belongs), with an error naming the file, the key and the value. The figures a
manifest lists are deduplicated here: one figure listed 3000 times is one
figure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from embedlens.errors import InputError

#: The largest manifest.json / summary.json read (a run's are kilobytes).
MAX_BYTES = 64 << 20
#: The deepest nesting accepted (a run's summaries are a few levels deep).
MAX_DEPTH = 32
#: The most values (mapping entries and list items together) in one file.
MAX_NODES = 2_000_000
#: Integers beyond this are refused: no count, id or layer comes near, and arithmetic on them overflows floats.
MAX_INT = 2**63
#: The longest key accepted (keys become row names, figure file names and layer numbers).
MAX_KEY = 256
#: The most distinct figures one manifest may list.
MAX_FIGURES = 1000


def read_record(path: Path, what: str) -> dict[str, Any]:
    """Parse one JSON file of a run and check it is a bounded JSON object.

    Raises:
        InputError: naming the file and what is wrong (too large, not UTF-8 JSON, too deep, a huge integer, a long key).
    """
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise InputError(f"{path}: {size} bytes; a run's {what} is at most {MAX_BYTES} bytes")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise InputError(f"{path}: nested more than {MAX_DEPTH} levels deep") from None
    except ValueError:  # an integer of more digits than Python converts (sys.int_max_str_digits)
        raise InputError(f"{path}: holds an integer of thousands of digits; expected counts, ids and indices (at most 2**63)") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object (a mapping), got {_kind(data)}")
    _check_tree(path, data)
    return data


def _short(key: str) -> str:
    return key if len(key) <= 80 else key[:77] + "..."


def _kind(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "text", bool: "true/false", type(None): "null"}.get(type(v), type(v).__name__)


def _check_tree(path: Path, root: dict) -> None:
    """Depth, size, integers and keys of a parsed file, without recursion (a hostile file must not exhaust the stack)."""
    stack: list[tuple[Any, str, int]] = [(root, "", 0)]
    nodes = 0
    while stack:
        v, key, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise InputError(f"{path}: more than {MAX_NODES} values; a run's summary is far smaller")
        if depth > MAX_DEPTH:
            raise InputError(f"{path}: {_short(key)} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(v, bool) or v is None or isinstance(v, (str, float)):
            continue
        if isinstance(v, int):
            if abs(v) > MAX_INT:
                raise InputError(f"{path}: {_short(key)}: an integer of {len(str(abs(v)))} digits; expected a count, id or index (at most 2**63)")
            continue
        if isinstance(v, dict):
            for k, x in v.items():
                if len(k) > MAX_KEY:
                    raise InputError(f"{path}: {_short((key + '.' if key else '') + k)}: a key of {len(k)} characters; at most {MAX_KEY}")
                stack.append((x, f"{key}.{k}" if key else k, depth + 1))
        elif isinstance(v, list):
            stack.extend((x, f"{key}[{i}]", depth + 1) for i, x in enumerate(v))


def _expect(path: Path, key: str, value: Any, types: tuple[type, ...], expected: str) -> None:
    if value is None or (isinstance(value, types) and not (isinstance(value, bool) and bool not in types)):
        return
    shown = repr(value) if not isinstance(value, (dict, list)) else _kind(value)
    raise InputError(f"{path}: {key}: expected {expected}, got {shown[:80]}")


def check_manifest(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest keys a comparison reads, with the types it reads them as; `figures` deduplicated (first listing kept).

    Raises:
        InputError: naming the file, the key and the value.
    """
    for key in ("model", "tokenizer"):
        _expect(path, key, manifest.get(key), (dict,), "a mapping")
    model, tok = manifest.get("model") or {}, manifest.get("tokenizer") or {}
    _expect(path, "model.name", model.get("name"), (str,), "text")
    _expect(path, "model.source", model.get("source"), (str,), "text")
    _expect(path, "tokenizer.sha256", tok.get("sha256"), (str,), "text")
    _expect(path, "plan_hash", manifest.get("plan_hash"), (str,), "text")
    _expect(path, "n_samples", manifest.get("n_samples"), (int,), "a whole number")
    figures = manifest.get("figures")
    _expect(path, "figures", figures, (list,), "a list of file names inside the run folder")
    if figures is not None:
        for i, f in enumerate(figures):
            _expect(path, f"figures[{i}]", f, (str,), "a file name inside the run folder")
        unique = list(dict.fromkeys(figures))
        if len(unique) > MAX_FIGURES:
            raise InputError(f"{path}: figures: {len(unique)} different files; a run lists at most {MAX_FIGURES}")
        manifest = {**manifest, "figures": unique}
    return manifest


def check_summary(path: Path, summary: dict[str, Any]) -> None:
    """The summary keys a comparison reads by name (the partition, its anchors and fractions, the data), with their types.

    Raises:
        InputError: naming the file, the key and the value.
    """
    _expect(path, "data", summary.get("data"), (dict,), "a mapping")
    part = summary.get("partition")
    _expect(path, "partition", part, (dict,), "a mapping")
    if not part:
        return
    _expect(path, "partition.fractions", part.get("fractions"), (dict,), "a mapping of group -> fraction")
    for g, x in (part.get("fractions") or {}).items():
        _expect(path, f"partition.fractions.{g}", x, (int, float), "a number")
    _expect(path, "partition.anchors", part.get("anchors"), (list,), "a list of {group, id, token}")
    for i, a in enumerate(part.get("anchors") or []):
        _expect(path, f"partition.anchors[{i}]", a, (dict,), "a mapping {group, id, token}")
        if a is None:
            raise InputError(f"{path}: partition.anchors[{i}]: expected a mapping {{group, id, token}}, got null")
        for k, types, expected in (("group", (str,), "text"), ("token", (str,), "text"), ("id", (int,), "a vocabulary id (a whole number)")):
            if k not in a:
                raise InputError(f"{path}: partition.anchors[{i}]: needs {k!r} ({expected})")
            _expect(path, f"partition.anchors[{i}].{k}", a[k], types, expected)
            if a[k] is None:
                raise InputError(f"{path}: partition.anchors[{i}].{k}: expected {expected}, got null")
