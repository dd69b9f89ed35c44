"""The checkpoint of an unfinished run: data only (JSON in a safetensors file), read only on ``--resume``.

``checkpoint.safetensors`` holds every tensor of the run's state, and in its
metadata (key ``embedlens``) one JSON document: the plan hash, the run's
identity (data files and model, see `embedlens.plan.identity`), progress, and
the `state_dict()` of every probe, condition, the partition and the effect
summary (`embedlens.state`). Nothing in it can run code when read: the
safetensors header is parsed by the safetensors library and the rest by
`json`. On resume the plugins are built from the plan and the saved states
loaded into them, so no class is ever chosen by the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from embedlens.errors import EmbedLensError
from embedlens.files import write_bytes
from embedlens.plan.effects import EffectSummary
from embedlens.plan.store import CHECKPOINT
from embedlens.state import CheckpointError, decode_state, decode_value, encode_state, encode_value

FORMAT = "embedlens-checkpoint"
VERSION = 1


@dataclass
class RunState:
    """What a checkpoint holds: enough to continue exactly where a run stopped."""

    plan_hash: str
    identity: dict[str, Any]
    next_batch: int
    n_batches: int
    fitted: bool
    probes: list[tuple[str, Any]]
    partition: Any
    conditions: list[Any]
    effects: EffectSummary = field(default_factory=EffectSummary)
    skipped: list[dict[str, str]] = field(default_factory=list)
    converted: list[dict[str, str]] = field(default_factory=list)


def encode(state: RunState) -> bytes:
    """The checkpoint file's bytes.

    Raises:
        CheckpointError: a plugin's state is not data; the message names the plugin and attribute.
    """
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}

    def enc(obj: Any, owner: str) -> Any:
        value, own = encode_state(obj, owner)
        prefix = f"s{len(tensors)}_"
        renamed = {k: prefix + k for k in own}
        tensors.update({renamed[k]: v for k, v in own.items()})
        return _rename(value, renamed)

    doc = {
        "format": FORMAT,
        "version": VERSION,
        "plan_hash": state.plan_hash,
        "identity": state.identity,
        "next_batch": state.next_batch,
        "n_batches": state.n_batches,
        "fitted": state.fitted,
        "probes": [{"label": label, "class": type(p).__name__, "state": enc(p, f"probe {label!r} ({type(p).__name__})")}
                   for label, p in state.probes],
        "partition": enc(state.partition, "partition") if state.partition is not None else None,
        "conditions": [{"name": c.name, "state": enc(c, f"condition {c.name!r}")} for c in state.conditions],
        "effects": enc(state.effects, "effect summary"),
        "skipped": encode_value(state.skipped, tensors, "skipped samples"),
        "converted": encode_value(state.converted, tensors, "converted images"),
    }
    text = json.dumps(doc, allow_nan=False, separators=(",", ":"))
    return save(tensors, metadata={"embedlens": text})


def _rename(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, list):
        return [_rename(v, names) for v in value]
    if isinstance(value, dict):
        out = {k: _rename(v, names) for k, v in value.items()}
        for tag in ("$tensor", "$ndarray", "$generator"):
            if tag in out and out[tag] in names:
                out[tag] = names[out[tag]]
        return out
    return value


def write(out: Path, state: RunState) -> None:
    write_bytes(Path(out) / CHECKPOINT, encode(state))


def exists(out: Path) -> bool:
    p = Path(out) / CHECKPOINT
    return p.is_file() or p.is_symlink()


def read_document(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checkpoint's JSON document and tensors (no state loaded yet).

    Raises:
        CheckpointError: the file is missing, a link, damaged, or not an embedlens checkpoint.
    """
    path = Path(out) / CHECKPOINT
    if path.is_symlink():
        raise CheckpointError(f"{path} is a symbolic link; embedlens does not read checkpoints through links")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint to resume from") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}); start again with --overwrite") from None
    return decode(raw, path)


def decode(raw: bytes, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON document and tensors of checkpoint bytes (`encode`'s); `path` names them in errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_len].decode("utf-8"))
        doc = json.loads(header.get("__metadata__", {}).get("embedlens", "null"))
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}); start again with --overwrite") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an embedlens checkpoint; start again with --overwrite")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {doc.get('version')!r}, this embedlens reads {VERSION}; start again with --overwrite")
    return doc, tensors


def load_into(doc: dict[str, Any], tensors: dict[str, torch.Tensor], probes: list[tuple[str, Any]], partition: Any,
              conditions: list[Any], path: Path) -> RunState:
    """Load the saved states into plugins freshly built from the plan; returns the run state.

    Raises:
        CheckpointError: the saved plugins are not those of the plan (labels, classes, conditions).
    """
    try:
        saved = [(p["label"], p["class"]) for p in doc["probes"]]
        if saved != [(label, type(p).__name__) for label, p in probes]:
            raise CheckpointError(f"{path}: the checkpoint's probes {saved} are not this plan's; start again with --overwrite")
        for entry, (label, p) in zip(doc["probes"], probes):
            decode_state(p, entry["state"], tensors, f"probe {label!r}")
        if (doc["partition"] is None) != (partition is None):
            raise CheckpointError(f"{path}: the checkpoint and the plan disagree on whether there is a partition")
        if partition is not None:
            decode_state(partition, doc["partition"], tensors, "partition")
        if [c["name"] for c in doc["conditions"]] != [c.name for c in conditions]:
            raise CheckpointError(f"{path}: the checkpoint's conditions are not this plan's; start again with --overwrite")
        for entry, c in zip(doc["conditions"], conditions):
            decode_state(c, entry["state"], tensors, f"condition {c.name!r}")
        effects = EffectSummary()
        decode_state(effects, doc["effects"], tensors, "effect summary")
        state = RunState(
            plan_hash=str(doc["plan_hash"]),
            identity=doc.get("identity") or {},
            next_batch=int(doc["next_batch"]),
            n_batches=int(doc["n_batches"]),
            fitted=bool(doc["fitted"]),
            probes=probes,
            partition=partition,
            conditions=conditions,
            effects=effects,
            skipped=list(decode_value(doc["skipped"], tensors, "skipped")),
            converted=list(decode_value(doc["converted"], tensors, "converted")),
        )
    except EmbedLensError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the checkpoint is damaged ({type(e).__name__}: {e}); start again with --overwrite") from None
    return state
