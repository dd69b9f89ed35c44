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
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from embedlens.errors import EmbedLensError
from embedlens.files import write_bytes
from embedlens.plan.effects import EffectSummary
from embedlens.plan.store import CHECKPOINT, damaged  # noqa: F401 - damaged: ckpt.damaged as before
from embedlens.state import MAX_JSON_DEPTH, CheckpointError, decode_state, decode_value, encode_state, encode_value, json_depth

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


#: safetensors' own limit on the JSON header of a file.
_MAX_HEADER = 100 << 20


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def read_document(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checkpoint's JSON document and tensors (no state loaded yet).

    The file is sized before it is read: its length must be exactly what its safetensors header
    describes (a truncated, padded or sparse file is refused without being read whole), and the
    tensors must fit in this machine's memory.

    Raises:
        CheckpointError: the file is missing, a link, damaged, or not an embedlens checkpoint.
    """
    path = Path(out) / CHECKPOINT
    if path.is_symlink():
        raise damaged(path, "is a symbolic link; embedlens does not read checkpoints through links")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint to resume from") from None
    except OSError as e:
        raise damaged(path, f"cannot read the checkpoint ({type(e).__name__}: {e})") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise damaged(path, "cannot read the checkpoint: it is not a regular file")
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > _MAX_HEADER or 8 + n > st.st_size:
            raise damaged(path, f"cannot read the checkpoint: a {st.st_size}-byte file whose header length reads {n}")
        try:
            header = json.loads(_json_text(fh.read(n), path))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise damaged(path, f"cannot read the checkpoint (its header: {type(e).__name__}: {e})") from None
        want = 8 + n + max(ends, default=0)
        if st.st_size != want:
            raise damaged(path, f"cannot read the checkpoint: the file is {st.st_size} bytes, its header describes {want} "
                                "(truncated, padded or not a checkpoint)")
        memory = _memory_bytes()
        if memory is not None and want > memory:
            raise damaged(path, f"the checkpoint's tensors are {want / 2**30:.1f} GiB, more than this machine's memory ({memory / 2**30:.1f} GiB)")
        fh.seek(0)
        raw = fh.read()
    return decode(raw, path)


def _json_text(raw: bytes, path: Path) -> str:
    """JSON text checked for depth before it is parsed (`json` recurses once per level)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise damaged(path, f"cannot read the checkpoint (not UTF-8: {e})") from None
    if json_depth(text) > MAX_JSON_DEPTH:
        raise damaged(path, f"the checkpoint's JSON is nested more than {MAX_JSON_DEPTH} levels deep")
    return text


def decode(raw: bytes, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON document and tensors of checkpoint bytes (`encode`'s); `path` names them in errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(_json_text(raw[8 : 8 + header_len], path))
        doc = json.loads(_json_text(header.get("__metadata__", {}).get("embedlens", "null").encode(), path))
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError, AttributeError, RecursionError) as e:
        raise damaged(path, f"cannot read the checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise damaged(path, "not an embedlens checkpoint")
    if doc.get("version") != VERSION:
        raise damaged(path, f"checkpoint format version {doc.get('version')!r}, this embedlens reads {VERSION}")
    return doc, tensors


def _int(doc: dict, key: str, lo: int, hi: int, path: Path) -> int:
    v = doc.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise damaged(path, f"{key} is {v!r}; expected an integer in {lo}..{hi}")
    return v


def check_document(doc: dict[str, Any], path: Path, n_batches: int | None = None) -> None:
    """The checkpoint document's own fields, before any state is loaded: kinds and ranges.

    Args:
        n_batches: the plan's number of batches; `next_batch` must lie in ``0..n_batches``.

    Raises:
        CheckpointError: ``cannot resume: FILE KEY is VALUE; expected ...``.
    """
    limit = n_batches if n_batches is not None else 1 << 40
    total = _int(doc, "n_batches", 0, limit, path)
    if n_batches is not None and total != n_batches:
        raise damaged(path, f"n_batches is {total}; this plan has {n_batches} batches")
    nxt = _int(doc, "next_batch", 0, total, path)
    if not isinstance(doc.get("fitted"), bool):
        raise damaged(path, f"fitted is {doc.get('fitted')!r}; expected true or false")
    if nxt and not doc["fitted"]:
        raise damaged(path, f"next_batch is {nxt} but fitted is false: batches run only after the fit passes")
    if not isinstance(doc.get("plan_hash"), str) or not isinstance(doc.get("identity", {}), (dict, type(None))):
        raise damaged(path, "plan_hash or identity is not of the kind embedlens writes")
    for key in ("probes", "conditions"):
        entries = doc.get(key)
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise damaged(path, f"{key} is {type(entries).__name__}; expected a list of entries")
    for key, columns in (("skipped", ("sample_id", "where", "error")), ("converted", ("sample_id", "where", "note"))):
        rows = doc.get(key)
        if not isinstance(rows, list) or not all(isinstance(r, dict) and set(r) == set(columns) and all(isinstance(r[c], str) for c in columns)
                                                 for r in rows):
            raise damaged(path, f"{key} is not a list of {{{', '.join(columns)}}} entries of text")


def load_into(doc: dict[str, Any], tensors: dict[str, torch.Tensor], probes: list[tuple[str, Any]], partition: Any,
              conditions: list[Any], path: Path, n_batches: int | None = None) -> RunState:
    """Load the saved states into plugins freshly built from the plan; returns the run state.

    Every value is checked before it is used (`check_document`; `embedlens.state.check_state` for each
    plugin's attributes). On a resume after some batches the loaded plugins are also asked for their
    results once (on copies), so a state that does not work is refused now rather than at the end of the run.

    Args:
        n_batches: the plan's number of batches (checked against the checkpoint's); given on a resume.

    Raises:
        CheckpointError: ``cannot resume: FILE what is wrong; start again with --overwrite``, or the saved
            plugins are not those of the plan (labels, classes, conditions).
    """
    check_document(doc, path, n_batches)
    try:
        saved = [(p.get("label"), p.get("class")) for p in doc["probes"]]
        if saved != [(label, type(p).__name__) for label, p in probes]:
            raise damaged(path, f"the checkpoint's probes {saved} are not this plan's")
        for entry, (label, p) in zip(doc["probes"], probes):
            decode_state(p, entry["state"], tensors, f"probe {label!r}")
        if (doc["partition"] is None) != (partition is None):
            raise damaged(path, "the checkpoint and the plan disagree on whether there is a partition")
        if partition is not None:
            decode_state(partition, doc["partition"], tensors, "partition")
        if [c.get("name") for c in doc["conditions"]] != [c.name for c in conditions]:
            raise damaged(path, "the checkpoint's conditions are not this plan's")
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
    except CheckpointError as e:
        raise (e if str(e).startswith("cannot resume:") else damaged(path, str(e))) from None
    except EmbedLensError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, IndexError) as e:
        raise damaged(path, f"the checkpoint is damaged ({type(e).__name__}: {e})") from None
    if n_batches is not None and state.next_batch > 0:  # a resume (not a state passed between ranks) after some batches
        _exercise(state, path)
    return state


def _exercise(state: RunState, path: Path) -> None:
    """Ask every loaded plugin for what the end of the run will ask it (results, statistics): a saved state
    of the right kinds that still does not work (lists of wrongly shaped rows, say) is refused here."""
    import copy

    checks = [(f"probe {label!r}", p, "result") for label, p in state.probes] + [("effect summary", state.effects, "stats")]
    if state.partition is not None:
        checks.append(("partition", state.partition, "summary"))
    for what, obj, method in checks:
        rng = torch.get_rng_state()
        try:
            getattr(copy.deepcopy(obj), method)()  # on a copy: a result may cache what it computed
        except EmbedLensError as e:
            raise damaged(path, f"{what}: its saved state does not work ({e})") from None
        except Exception as e:  # noqa: BLE001 - whatever a plugin raises on a state it could never have written
            raise damaged(path, f"{what}: its saved state does not work ({type(e).__name__}: {str(e)[:300]})") from None
        finally:
            torch.set_rng_state(rng)
