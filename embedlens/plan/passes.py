"""The batch passes of a run: the fit passes and the main pass, one implementation whatever the world size.

A pass goes through the batches in rounds of `world.size` batches. In each
round every rank runs the model on its own batch (activations at the pass's
sites; for the main pass, the conditions too, whose effect parts it writes
itself) and hands the result, a `Work`, to a `Transport`; rank 0 receives
every batch of the round from it in batch order and folds each one into the
probes, the partition's tally and the effect summary, exactly as it would
alone. One process is world size 1: the transport hands its own work back
as it is, nothing serialised; across ranks (torchrun) a batch's work travels
to rank 0 as one safetensors payload (`embedlens.plan.distributed`).

Per batch the random seed is ``seed * 1_000_003 + batch``, set before the
model runs and again before rank 0 folds, so a resumed run, and a run on any
number of processes, draws the same numbers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from embedlens.data import Record, Sample
from embedlens.errors import InputError
from embedlens.metrics import compare
from embedlens.plan import distributed
from embedlens.plan.resume import _state_from, _state_payload
from embedlens.plan.store import Parts, _plain
from embedlens.probes.base import Tensors
from embedlens.tracing import collect

if TYPE_CHECKING:
    from embedlens.adapters.base import Batch
    from embedlens.interventions.engine import Engine
    from embedlens.plan.checkpoint import RunState
    from embedlens.plan.preparation import Prepared
    from embedlens.video import VideoOptions
    from embedlens.sites import Site

#: ``progress(phase, done, total)``: phase is "fit: NAME" for a fitting pass, "run" for the main pass.
ProgressFn = Callable[[str, int, int], None]

#: Audit event (`sys.audit`) with (rank, batch) once a rank has run the model on a batch of the main pass and
#: written its effect parts, before rank 0 folds it in (see `embedlens.plan.finish.FINISH_EVENT`).
BATCH_EVENT = "embedlens.plan.batch"


@dataclass
class Loaded:
    """A chunk of records read into samples: those that load, their places in the chunk, and what was skipped
    (unreadable) or converted (e.g. a CMYK image made RGB), as rows for the run's ``skipped``/``converted`` tables."""

    samples: list[Sample] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    converted: list[dict[str, str]] = field(default_factory=list)


def load_chunk(chunk: list[Record], max_pixels: int | None, video: "VideoOptions | None" = None) -> Loaded:
    """The chunk's samples that load; the others are recorded as skipped, with their error."""
    out = Loaded()
    for i, r in enumerate(chunk):
        try:
            s, notes = r.load(max_pixels, video)
        except InputError as e:
            out.skipped.append({"sample_id": r.id, "where": r.where, "error": str(e)})
            continue
        out.converted += [{"sample_id": r.id, "where": r.where, "note": n} for n in notes]
        out.samples.append(s)
        out.positions.append(i)
    return out


@dataclass
class Work:
    """What the rank that owns batch `batch` computed for it.

    Attributes:
        acts: activations at the pass's sites, ``{site: [batch, seq, d]}`` (empty when there are no sites).
        loaded, encoded: the samples and the encoded batch, kept where the work was done; None once the work
            travelled to another rank (rank 0 reads and encodes the batch again, which is cheap next to the model).
        effects, tally: the conditions' effects table (None: no conditions ran) and what labelling its images
            added to the partition's tally.
    """

    batch: int
    empty: bool
    acts: dict["Site", torch.Tensor] = field(default_factory=dict)
    loaded: Loaded | None = None
    encoded: "Batch | None" = None
    effects: dict[str, list] | None = None
    tally: dict[str, dict[str, int]] | None = None


def _rounds(start: int, n: int, world: "distributed.World"):
    """``(batches of the round, this rank's batch or None)`` from batch `start` on, `world.size` batches a round."""
    for first in range(start, n, world.size):
        mine = first + (world.rank - first) % world.size
        yield range(first, min(first + world.size, n)), (mine if mine < n else None)


class Transport:
    """Carries each batch's `Work` to rank 0, which receives every batch of a round in batch order.

    World size 1 hands the work back as it is. Across ranks a rank other than 0 sends its work as one payload
    (activations as named tensors, the rest as JSON), and rank 0 checks each message is the batch due.
    """

    def __init__(self, world: "distributed.World", sites: list["Site"], device: torch.device):
        self.world, self.sites, self.device = world, sites, device

    def rounds(self, start: int, n: int):
        return _rounds(start, n, self.world)

    def exchange(self, rnd: range, mine: int | None, work: Work | None) -> Iterator[Work]:
        """Send this rank's work (if not rank 0); on rank 0, yield the work of every batch of the round in order."""
        if self.world.size == 1:
            if work is not None:
                yield work
            return
        if work is not None and not self.world.main:
            distributed.send(self._pack(work), 0)
        if not self.world.main:
            return
        for b in rnd:
            if b == mine:
                yield work
                continue
            tensors, doc = distributed.unpack(distributed.recv(self.world.owner(b)))
            if doc.get("batch") != b:
                raise distributed.DistributedError(f"rank {self.world.owner(b)} sent batch {doc.get('batch')} where batch {b} was due")
            acts = {s: tensors[f"s{i}"].to(self.device) for i, s in enumerate(self.sites) if f"s{i}" in tensors}
            yield Work(b, doc["empty"], acts, effects=doc.get("effects"), tally=doc.get("tally"))

    def _pack(self, work: Work) -> bytes:
        tensors = {f"s{i}": work.acts[s] for i, s in enumerate(self.sites) if s in work.acts}
        doc: dict[str, Any] = {"batch": work.batch, "empty": work.empty}
        if work.effects is not None:
            doc["effects"], doc["tally"] = work.effects, work.tally
        return distributed.pack(tensors, doc)


class Passes:
    """The passes of one run over `chunks` (the data in batches), on this rank of `world`."""

    def __init__(self, prepared: "Prepared", chunks: list[list[Record]], world: "distributed.World",
                 progress: ProgressFn | None = None):
        self.prepared, self.chunks, self.world, self.progress = prepared, chunks, world, progress
        self.adapter, self.plan = prepared.adapter, prepared.loaded.plan
        self.n_records = len(prepared.records)

    def _load(self, b: int) -> Loaded:
        return load_chunk(self.chunks[b], self.plan.data.max_pixels, self.plan.data.video.options())

    def _encode(self, samples: list[Sample]) -> "Batch":
        return self.adapter.encode(samples, padding_side=self.plan.data.padding_side)

    def _progress(self, phase: str, b: int) -> None:
        if self.progress is not None:
            self.progress(phase, min(self.n_records, (b + 1) * self.plan.batch_size), self.n_records)

    def stream(self, phase: str, sites: list["Site"]) -> Iterator[tuple["Batch", dict]]:
        """A fit pass: ``(batch, acts at sites)`` for every batch that has samples, in batch order, on rank 0
        (the other ranks run their batches and yield nothing)."""
        transport = Transport(self.world, sites, self.adapter.device)
        for rnd, mine in transport.rounds(0, len(self.chunks)):
            work = None
            if mine is not None:
                loaded = self._load(mine)
                work = Work(mine, not loaded.samples, loaded=loaded)
                if loaded.samples:
                    work.encoded = self._encode(loaded.samples)
                    if sites:
                        work.acts = collect(self.adapter, work.encoded, sites)
            for w in transport.exchange(rnd, mine, work):
                if not w.empty:
                    yield (w.encoded if w.encoded is not None else self._encode(self._load(w.batch).samples)), w.acts
                self._progress(phase, w.batch)

    def fit(self, phase: str, sites: list["Site"], consume: Callable) -> None:
        """One fit pass: ``consume(stream)`` on rank 0; the other ranks run their batches of it."""
        stream = self.stream(phase, sites)
        if self.world.main:
            consume(stream)
        else:
            for _ in stream:
                pass

    def main(self, state: "RunState", parts: Parts, engine: "Engine | None", sites: list["Site"],
             checkpoint: Callable[[], None]) -> None:
        """The batches not finished yet: probes and conditions per batch; rank 0 checkpoints after each round."""
        transport = Transport(self.world, sites, self.adapter.device)
        for rnd, mine in transport.rounds(state.next_batch, len(self.chunks)):
            work = None
            if mine is not None:
                work = self._run_model(mine, state, parts, engine, sites)
                sys.audit(BATCH_EVENT, self.world.rank, mine)  # this rank's parts of batch `mine` are written
            for w in transport.exchange(rnd, mine, work):
                self._fold(w, state, parts)
            if not self.world.main:
                continue
            state.next_batch = rnd[-1] + 1
            checkpoint()
            self._progress("run", rnd[-1])

    def _run_model(self, b: int, state: "RunState", parts: Parts, engine: "Engine | None", sites: list["Site"]) -> Work:
        """Batch `b` on this rank: activations for the probes, the conditions' effects (their parts written here)."""
        probes, partition = state.probes, state.partition
        torch.manual_seed(self.plan.seed * 1_000_003 + b)  # per batch, so a resumed run draws the same numbers
        loaded = self._load(b)
        work = Work(b, not loaded.samples, loaded=loaded)
        if loaded.samples and probes:
            work.encoded = self._encode(loaded.samples)
            work.acts = collect(self.adapter, work.encoded, sites)
        if loaded.samples and engine is not None:
            kept = partition.tally if partition is not None else None
            if partition is not None:
                partition.tally = {}  # what labelling this batch adds, for rank 0 to fold in order
            touched: dict[str, list] = {}
            table = compare(engine, loaded.samples, state.conditions, self.prepared.metrics,
                            padding_side=self.plan.data.padding_side, groups=partition, touched=touched)
            if partition is not None:
                work.tally, partition.tally = partition.tally, kept
            parts.table("effects", table, b)  # this rank's own parts
            parts.table("touched_tokens", touched, b)
            work.effects = {k: _plain(v) for k, v in table.items()}
        return work

    def _fold(self, work: Work, state: "RunState", parts: Parts) -> None:
        """Rank 0: batch `work.batch` into the probes, the skipped/converted records, the tally and the effects."""
        probes, partition = state.probes, state.partition
        b, bs = work.batch, self.plan.batch_size
        torch.manual_seed(self.plan.seed * 1_000_003 + b)
        loaded = work.loaded if work.loaded is not None else self._load(b)
        state.skipped += loaded.skipped
        state.converted += loaded.converted
        if loaded.samples and probes:
            batch = work.encoded if work.encoded is not None else self._encode(loaded.samples)
            if partition is not None:
                batch.groups = partition.label(self.adapter, batch, acts=work.acts)
            for label, probe in probes:
                for name, rows in probe.update(self.adapter, batch, work.acts).items():
                    _emit(parts, label, name, rows, b, len(probes), [b * bs + p for p in loaded.positions])
        if work.effects is not None:
            if partition is not None:
                partition.tally.update(work.tally or {})
            state.effects.add(work.effects)


def _emit(parts: Parts, label: str, name: str, rows: Any, index: int, n_probes: int, data_index: list[int] | None = None) -> None:
    """Write one probe output of batch `index`. A table's ``sample`` column, which probes fill with the sample's
    place in its batch, becomes its place in the data set (`data_index`: the data-set index of each sample of
    the batch, skipped samples left out), as the Python API gives it; ``sample_id`` stays beside it."""
    full = f"{label}.{name}" if n_probes > 1 else name
    if isinstance(rows, Tensors):
        parts.tensors(full, rows, index)
        return
    if data_index is not None and "sample" in rows:
        rows = {**rows, "sample": np.asarray(data_index, dtype=np.int64)[np.asarray(rows["sample"], dtype=np.int64)]}
    parts.table(full, rows, index)


def fit_all(passes: Passes, state: "RunState", checkpoint: Callable[[], None], out) -> "RunState":
    """The fit passes a run needs before its main pass, once: the partition's discovered anchors, probes that
    fit, conditions' data-set statistics (e.g. mean ablation). Every rank ends with rank 0's fitted state."""
    adapter, world = passes.adapter, passes.world
    partition = state.partition
    torch.manual_seed(passes.plan.seed)
    if partition is not None and partition.needs_fit:  # discovered anchors, before any batch is labelled
        passes.fit("fit: partition", partition.fit_sites(adapter), lambda stream: partition.fit_stream(adapter, stream))
    for label, probe in state.probes:
        if probe.needs_fit:
            if world.size > 1 and not world.main:
                continue  # a probe fitted with the partition (token_partition): rank 0's state comes below
            if world.size > 1:
                raise distributed.DistributedError(f"probe {label!r} needs a fit pass of its own, which is not sharded "
                                                   "across processes; run this plan in one process")
            probe.fit(adapter, (batch for batch, _ in passes.stream(f"fit: {label}", [])))
    for cond in state.conditions:
        if cond.needs_fit:  # data-set statistics (e.g. mean ablation) in an earlier pass
            passes.fit(f"fit: {cond.name}", cond.fit_sites(adapter), lambda stream, c=cond: c.fit_stream(adapter, stream))
    from embedlens.plan.pools import check_pools, outside_target_draws

    if outside_target_draws(state.conditions):  # a matched control its pool cannot serve: refused before the main pass
        passes.fit("check: control pools", partition.sites(adapter) if partition is not None else [],
                   lambda stream: check_pools(passes.prepared.loaded, adapter, partition, state.conditions, stream))
    state.fitted = True
    if world.main:
        checkpoint()
    if world.size > 1:  # the fitted anchors and means: rank 0's, on every rank
        data = distributed.broadcast(_state_payload(state, {}) if world.main else None, world)
        if not world.main:
            state = _state_from(bytes(distributed.unpack(data)[0]["state"].numpy().tobytes()), passes.prepared, out)
    return state
