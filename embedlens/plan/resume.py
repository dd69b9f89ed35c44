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
from embedlens.plan.store import CHECKPOINT, Parts, check_parts, clear_run, remove_temp


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
        state = _resume_state(prepared, out, h, identity, n_batches)
        remove_temp(out)  # what a kill left half-written (``.NAME.PID.tmp``): rewritten from the state
        return state, state.next_batch
    if not overwrite and _manifest_kind(out) == "eval":  # as eval refuses a finished run's folder without --overwrite
        from embedlens.files import RunFolderError

        raise RunFolderError(f"{out} holds the results of an `embedlens eval` (manifest.json of kind 'eval'); run would delete "
                             "them: give run another --output, or replace them with --overwrite")
    done = finished_result(out) if resume and not overwrite else None
    if done is not None:
        _check_finished_same(out, h, identity)
        remove_temp(out)
        return None, done
    clear_run(out)
    return RunState(h, identity, 0, n_batches, False, prepared.probes, prepared.partition, prepared.conditions), None


def _check_finished_same(out: Path, h: str, identity: dict) -> None:
    """Refuse to hand back a finished run of another plan, or of data or a model that changed since (as resuming an
    unfinished one refuses): ``--resume`` would otherwise return results this plan did not make."""
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))  # finished_result read it already
    if manifest.get("plan_hash") != h:
        raise EmbedLensError(
            f"{out}: the finished run there is of a different plan (hash {str(manifest.get('plan_hash'))[:40]}, this plan "
            f"{h}); give run another --output, or start again with --overwrite"
        )
    saved = manifest.get("inputs")
    try:
        check_same(saved if isinstance(saved, dict) else {}, identity, out, what="finished run")
    except (AttributeError, TypeError) as e:  # a list or a number where embedlens writes a mapping
        raise EmbedLensError(f"{out / 'manifest.json'}: inputs is not of the kind embedlens writes ({type(e).__name__}: {e}); "
                             "start again with --overwrite") from None


def _manifest_kind(out: Path) -> Any:
    """The ``kind`` of the manifest in `out` (``"eval"`` for an `embedlens eval`'s), or None."""
    if contained(out, "manifest.json") is None:
        return None
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, RecursionError):
        return None
    return manifest.get("kind") if isinstance(manifest, dict) else None


def _resume_state(prepared: Prepared, out: Path, h: str, identity: dict, n_batches: int) -> RunState:
    """The unfinished run's state, every restored value and part file checked before use (`embedlens.plan.checkpoint`).

    Raises:
        CheckpointError: ``cannot resume: FILE what is wrong; start again with --overwrite``.
        EmbedLensError: the run there is of another plan, or its inputs changed.
    """
    doc, tensors = ckpt.read_document(out)
    if doc.get("plan_hash") != h:
        raise EmbedLensError(
            f"{out}: the unfinished run there is of a different plan (hash {str(doc.get('plan_hash'))[:40]}, this plan {h}); "
            "resume with the same plan, or start again with --overwrite"
        )
    ckpt.check_document(doc, out / CHECKPOINT, n_batches)
    try:
        check_same(doc.get("identity") or {}, identity, out)
    except (AttributeError, TypeError) as e:  # a list or a number where embedlens writes a mapping
        raise ckpt.damaged(out / CHECKPOINT, f"identity is not of the kind embedlens writes ({type(e).__name__}: {e})") from None
    state = ckpt.load_into(doc, tensors, prepared.probes, prepared.partition, prepared.conditions, out / CHECKPOINT, n_batches)
    check_parts(out, state.next_batch)
    return state


def _leave_together(own: Path, world: "distributed.World") -> None:
    """Every rank stops with rank 0's refusal: each other rank first removes its own folder when this run wrote
    nothing there but its marker and lock (``ranks/rank-N``; parts of an earlier run stay), then all meet, then
    rank 0 removes ``ranks/`` if it is empty, so a refused run leaves the folder as it found it."""
    from embedlens.plan.store import RANKS, release_shard

    if not world.main:
        release_shard(own)
    distributed.barrier(world)
    if world.main:
        try:
            (own / RANKS).rmdir()
        except OSError:
            pass  # not empty (an earlier run's parts), or not there


def agree_start(prepared: Prepared, out: Path, h: str, identity: dict, n_batches: int, resume: bool, overwrite: bool,
                world: "distributed.World", own: Path | None = None) -> tuple[RunState | None, Any]:
    """`_start_state` decided by rank 0 and taken by every other rank: (state, resumed_from), or (None, the result
    to return) when the run in `out` is finished already.

    Raises:
        EmbedLensError: rank 0's refusal, on rank 0; the other ranks raise a `DistributedError` quoting it.
    """
    if not world.main:
        tensors, doc = distributed.unpack(distributed.broadcast(None, world))
        if "error" in doc:
            _leave_together(own if own is not None else out, world)
            raise distributed.DistributedError(f"rank 0 stopped: {doc['error']}")
        if doc.get("done"):
            return None, RunResult(out_dir=out)
        return _state_from(bytes(tensors["state"].numpy().tobytes()), prepared, out), doc.get("resumed_from")
    try:
        state, resumed_from = _start_state(prepared, out, h, identity, n_batches, resume, overwrite)
    except EmbedLensError as e:
        if world.size > 1:
            distributed.broadcast(distributed.pack({}, {"error": str(e)}), world)
            _leave_together(own if own is not None else out, world)
        raise
    if world.size > 1:
        done = state is None
        distributed.broadcast(distributed.pack({}, {"done": True}) if done else _state_payload(state, {"resumed_from": resumed_from}), world)
    return state, resumed_from
