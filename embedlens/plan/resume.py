"""Start, resume or refuse: the run state a run starts from (`embedlens.plan.checkpoint`), a finished run's
result, and rank 0's state as bytes for the other ranks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from embedlens.errors import EmbedLensError
from embedlens.files import contained
from embedlens.plan import checkpoint as ckpt
from embedlens.plan import distributed
from embedlens.plan.checkpoint import RunState
from embedlens.plan.finish import RunResult
from embedlens.plan.identity import check_same
from embedlens.plan.preparation import Prepared
from embedlens.plan.store import CHECKPOINT, Parts, clear_run


def finished_result(out: Path) -> RunResult | None:
    """The result of a finished run in `out` (manifest and no checkpoint), or None.

    Parts a kill left after the checkpoint was removed are deleted (the tables hold them).
    """
    out = Path(out)
    if ckpt.exists(out) or contained(out, "manifest.json") is None:
        return None
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8")) if contained(out, "summary.json") else {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    if not isinstance(manifest, dict) or not isinstance(summary, dict):
        return None
    Parts(out).remove()
    report = out / "report.html"
    return RunResult(
        out_dir=out,
        tables={k: out / v for k, v in manifest.get("tables", {}).items() if contained(out, v)},
        figures=[out / f for f in manifest.get("figures", []) if contained(out, f)],
        summary=summary,
        skipped=summary.get("data", {}).get("skipped", []),
        report=report if report.is_file() else None,
        resumed_from=manifest.get("n_batches"),
    )


def _state_payload(state: RunState, doc: dict) -> bytes:
    raw = ckpt.encode(state)
    return distributed.pack({"state": torch.frombuffer(bytearray(raw), dtype=torch.uint8)}, doc)


def _state_from(raw: bytes, prepared: Prepared, out: Path) -> RunState:
    """Rank 0's run state (a checkpoint's bytes) loaded into this rank's plugins."""
    doc, tensors = ckpt.decode(raw, out / CHECKPOINT)
    return ckpt.load_into(doc, tensors, prepared.probes, prepared.partition, prepared.conditions, out / CHECKPOINT)


def _start_state(prepared: Prepared, out: Path, h: str, identity: dict, n_batches: int, resume: bool, overwrite: bool):
    """(state, resumed_from) to run from, or (None, the finished result) when `out` holds a finished run and `resume` is set."""
    unfinished = ckpt.exists(out)
    if unfinished and not resume and not overwrite:
        raise EmbedLensError(
            f"{out} holds an unfinished run ({CHECKPOINT}); continue it with --resume or start again with --overwrite"
        )
    state: RunState | None = None
    if unfinished and resume:  # the only place a checkpoint is read
        doc, tensors = ckpt.read_document(out)
        if doc.get("plan_hash") != h:
            raise EmbedLensError(
                f"{out}: the unfinished run there is of a different plan (hash {doc.get('plan_hash')}, this plan {h}); "
                "resume with the same plan, or start again with --overwrite"
            )
        check_same(doc.get("identity") or {}, identity, out)
        state = ckpt.load_into(doc, tensors, prepared.probes, prepared.partition, prepared.conditions, out / CHECKPOINT)
        if state.n_batches != n_batches:
            raise EmbedLensError(f"{out}: the unfinished run has {state.n_batches} batches, this plan {n_batches}; start again with --overwrite")
        return state, state.next_batch
    done = finished_result(out) if resume and not overwrite else None
    if done is not None:
        return None, done
    clear_run(out)
    return RunState(h, identity, 0, n_batches, False, prepared.probes, prepared.partition, prepared.conditions), None


def agree_start(prepared: Prepared, out: Path, h: str, identity: dict, n_batches: int, resume: bool, overwrite: bool,
                world: "distributed.World") -> tuple[RunState | None, Any]:
    """`_start_state` decided by rank 0 and taken by every other rank: (state, resumed_from), or (None, the result
    to return) when the run in `out` is finished already.

    Raises:
        EmbedLensError: rank 0's refusal, on rank 0; the other ranks raise a `DistributedError` quoting it.
    """
    if not world.main:
        tensors, doc = distributed.unpack(distributed.broadcast(None, world))
        if "error" in doc:
            raise distributed.DistributedError(f"rank 0 stopped: {doc['error']}")
        if doc.get("done"):
            return None, RunResult(out_dir=out)
        return _state_from(bytes(tensors["state"].numpy().tobytes()), prepared, out), doc.get("resumed_from")
    try:
        state, resumed_from = _start_state(prepared, out, h, identity, n_batches, resume, overwrite)
    except EmbedLensError as e:
        if world.size > 1:
            distributed.broadcast(distributed.pack({}, {"error": str(e)}), world)
        raise
    if world.size > 1:
        done = state is None
        distributed.broadcast(distributed.pack({}, {"done": True}) if done else _state_payload(state, {"resumed_from": resumed_from}), world)
    return state, resumed_from
