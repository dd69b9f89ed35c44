"""The batch passes of a run: the fit passes and the main pass, in one process or across ranks.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from embedlens.metrics import compare
from embedlens.plan import distributed
from embedlens.plan.store import Parts, _plain
from embedlens.probes.base import Tensors
from embedlens.tracing import collect


#: ``progress(phase, done, total)``: phase is "fit: NAME" for a fitting pass, "run" for the main pass.
ProgressFn = Callable[[str, int, int], None]


#: Audit event (`sys.audit`) with (rank, batch) once a data-parallel rank has written its parts of a batch, before
#: rank 0 folds them in (see `embedlens.plan.finish.FINISH_EVENT`).
BATCH_EVENT = "embedlens.plan.batch"


def _main_pass(prepared, state, chunks, parts, engine, sites, load_chunk, checkpoint, progress) -> None:
    """The batches not finished yet: probes and conditions per batch, a checkpoint after each."""
    probes, partition, conditions = state.probes, state.partition, state.conditions
    adapter, plan = prepared.adapter, prepared.loaded.plan
    bs, n_records = plan.batch_size, len(prepared.records)
    for b in range(state.next_batch, len(chunks)):
        torch.manual_seed(plan.seed * 1_000_003 + b)  # per batch, so a resumed run draws the same numbers
        positions: list[int] = []
        samples = load_chunk(chunks[b], record_problems=True, positions=positions)
        if samples and probes:
            batch = adapter.encode(samples, padding_side=plan.data.padding_side)
            acts = collect(adapter, batch, sites)
            if partition is not None:
                batch.groups = partition.label(adapter, batch, acts=acts)
            for label, probe in probes:
                for name, rows in probe.update(adapter, batch, acts).items():
                    _emit(parts, label, name, rows, b, len(probes), [b * bs + p for p in positions])
        if samples and engine is not None:
            touched: dict[str, list] = {}
            table = compare(engine, samples, conditions, prepared.metrics, padding_side=plan.data.padding_side, groups=partition,
                            touched=touched)
            parts.table("effects", table, b)
            parts.table("touched_tokens", touched, b)
            state.effects.add(table)
        state.next_batch = b + 1
        checkpoint()
        if progress is not None:
            progress("run", min(n_records, (b + 1) * bs), n_records)


def _rounds(start: int, n: int, world: "distributed.World"):
    """``(batches of the round, this rank's batch or None)`` from batch `start` on, `world.size` batches a round."""
    for first in range(start, n, world.size):
        mine = first + (world.rank - first) % world.size
        yield range(first, min(first + world.size, n)), (mine if mine < n else None)


def _received(rnd: range, mine: int | None, payload, world: "distributed.World"):
    """Rank 0: ``(batch, tensors, doc)`` for every batch of the round, in batch order (its own payload for its
    own batch, the owner's message for the others), checking each message is the batch due."""
    for b in rnd:
        tensors, doc = distributed.unpack(payload if b == mine else distributed.recv(world.owner(b)))
        if doc.get("batch") != b:
            raise distributed.DistributedError(f"rank {world.owner(b)} sent batch {doc.get('batch')} where batch {b} was due")
        yield b, tensors, doc


def _sharded_stream(adapter, plan, chunks, world, sites, load_chunk, phase, progress, n_records):
    """A fit pass across ranks: each rank reads its batches' activations at `sites` and sends them to rank 0,
    which yields ``(batch, acts)`` for every batch in batch order (the other ranks yield nothing)."""
    bs = plan.batch_size
    for rnd, mine in _rounds(0, len(chunks), world):
        payload = None
        if mine is not None:
            samples = load_chunk(chunks[mine], False)
            tensors = {}
            if samples and sites:
                acts = collect(adapter, adapter.encode(samples, padding_side=plan.data.padding_side), sites)
                tensors = {f"s{i}": acts[s] for i, s in enumerate(sites)}
            payload = distributed.pack(tensors, {"batch": mine, "empty": not samples})
            if not world.main:
                distributed.send(payload, 0)
        if not world.main:
            continue
        for b, tensors, doc in _received(rnd, mine, payload, world):
            if not doc["empty"]:
                batch = adapter.encode(load_chunk(chunks[b], False), padding_side=plan.data.padding_side)
                yield batch, {s: tensors[f"s{i}"].to(adapter.device) for i, s in enumerate(sites) if f"s{i}" in tensors}
            if progress is not None:
                progress(phase, min(n_records, (b + 1) * bs), n_records)


def _main_pass_sharded(prepared, state, chunks, parts, engine, sites, load_chunk, checkpoint, progress, world) -> None:
    """`_main_pass` across ranks: each rank runs the model on its batch of every round (activations, conditions) and
    writes its effect parts; rank 0 folds every batch into the probes, the partition's tally and the effect summary
    in batch order, as one process does, and checkpoints after each round."""
    probes, partition, conditions = state.probes, state.partition, state.conditions
    adapter, plan = prepared.adapter, prepared.loaded.plan
    bs, n_records = plan.batch_size, len(prepared.records)
    for rnd, mine in _rounds(state.next_batch, len(chunks), world):
        payload = None
        if mine is not None:
            torch.manual_seed(plan.seed * 1_000_003 + mine)
            samples = load_chunk(chunks[mine], False)
            tensors: dict[str, torch.Tensor] = {}
            doc: dict[str, Any] = {"batch": mine, "empty": not samples}
            if samples and probes:
                acts = collect(adapter, adapter.encode(samples, padding_side=plan.data.padding_side), sites)
                tensors = {f"s{i}": acts[s] for i, s in enumerate(sites)}
            if samples and engine is not None:
                kept = partition.tally if partition is not None else None
                if partition is not None:
                    partition.tally = {}  # what labelling this batch adds, for rank 0 to fold in order
                touched: dict[str, list] = {}
                table = compare(engine, samples, conditions, prepared.metrics, padding_side=plan.data.padding_side, groups=partition,
                                touched=touched)
                if partition is not None:
                    doc["tally"], partition.tally = partition.tally, kept
                parts.table("effects", table, mine)  # this rank's own parts
                parts.table("touched_tokens", touched, mine)
                doc["effects"] = {k: _plain(v) for k, v in table.items()}
            sys.audit(BATCH_EVENT, world.rank, mine)  # this rank's parts of batch `mine` are written
            payload = distributed.pack(tensors, doc)
            if not world.main:
                distributed.send(payload, 0)
        if not world.main:
            continue
        for b, tensors, doc in _received(rnd, mine, payload, world):
            torch.manual_seed(plan.seed * 1_000_003 + b)
            positions: list[int] = []
            samples = load_chunk(chunks[b], record_problems=True, positions=positions)
            if samples and probes:
                batch = adapter.encode(samples, padding_side=plan.data.padding_side)
                acts = {s: tensors[f"s{i}"].to(adapter.device) for i, s in enumerate(sites)}
                if partition is not None:
                    batch.groups = partition.label(adapter, batch, acts=acts)
                for label, probe in probes:
                    for name, rows in probe.update(adapter, batch, acts).items():
                        _emit(parts, label, name, rows, b, len(probes), [b * bs + p for p in positions])
            if "effects" in doc:
                if partition is not None:
                    partition.tally.update(doc.get("tally") or {})
                state.effects.add(doc["effects"])
        state.next_batch = rnd[-1] + 1
        checkpoint()
        if progress is not None:
            progress("run", min(n_records, state.next_batch * bs), n_records)


def _emit(parts: Parts, label: str, name: str, rows: Any, index: int, n_probes: int, data_index: list[int] | None = None) -> None:
    """Write one probe output of batch `index`. A table's ``sample`` column, which probes fill with the sample's
    place in its batch, becomes its place in the data set (`data_index`: the data-set index of each sample of
    the batch, skipped samples left out), as the Python API gives it; ``sample_id`` stays beside it."""
    full = f"{label}.{name}" if n_probes > 1 else name
    if isinstance(rows, Tensors):
        parts.tensors(full, rows, index)
        return
    if data_index is not None and "sample" in rows:
        rows = {**rows, "sample": [data_index[int(s)] for s in rows["sample"]]}
    parts.table(full, rows, index)
