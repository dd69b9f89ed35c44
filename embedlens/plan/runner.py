"""Run a plan: load the model, check the plan against it, stream batches through probes and conditions.

Results stream to disk per batch (`parts/`), with a checkpoint of every
probe's running state after each batch (data only: `embedlens.plan.checkpoint`),
so a run killed at any moment resumes (``resume=True``) from the last finished
batch and ends with the same bytes as an uninterrupted run. The output folder
is claimed (a marker) and locked for the life of the run (`embedlens.plan.store`).
At the end the parts are gathered into one Parquet (and/or CSV) file per
table, figures, ``summary.json``, ``report.html`` and ``manifest.json`` are
written, the checkpoint is removed, and only then the parts: a kill at any
point of the finish resumes to the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from embedlens.adapters import load_model
from embedlens.adapters.base import Adapter
from embedlens.adapters.placement import DeviceMapError, Placement, check_device_map
from embedlens.anchors import EVIDENCE_COLUMNS
from embedlens.data import Record, Sample, read_hf_dataset, read_records
from embedlens.errors import EmbedLensError, InputError
from embedlens.groups import Partition
from embedlens.interventions.condition import Condition
from embedlens.interventions.engine import Engine
from embedlens.metrics import Metric, compare
from embedlens.plan.loader import LoadedPlan
from embedlens.plan.effects import matched_controls
from embedlens.plan.conclusions import breakdown_fields
from embedlens.plan.schema import ModelSpec
from embedlens.files import check_output, contained, json_text, os_error, safe_dir, write_text
from embedlens.plan import checkpoint as ckpt
from embedlens.plan.checkpoint import RunState
from embedlens.plan.identity import check_same, run_identity
from embedlens.files import MARKER
from embedlens.plan import distributed
from embedlens.plan.store import CHECKPOINT, Parts, RunLock, _plain, check_parts, claim, clear_run, offload_dir, remove_offload, remove_shards, remove_temp, shard_dir
from embedlens.sites import Site
from embedlens.probes.base import Probe, Tensors
from embedlens.registry import interventions as intervention_registry
from embedlens.registry import metrics as metric_registry
from embedlens.registry import probes as probe_registry
from embedlens.tracing import collect

#: ``progress(phase, done, total)``: phase is "fit: NAME" for a fitting pass, "run" for the main pass.
ProgressFn = Callable[[str, int, int], None]


@dataclass
class Prepared:
    """Everything a run needs, checked against the loaded model before the first batch."""

    loaded: LoadedPlan
    adapter: Adapter
    probes: list[tuple[str, Probe]]
    records: list[Record]
    conditions: list[Condition] = field(default_factory=list)
    metrics: list[Metric] = field(default_factory=list)
    partition: Partition | None = None
    model_name: str = "model"


@dataclass
class RunResult:
    out_dir: Path
    tables: dict[str, Path] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    report: Path | None = None
    resumed_from: int | None = None

    @property
    def warnings(self) -> list[str]:
        """What looks degenerate (today: the partition), each with what to check."""
        return list(self.summary.get("partition", {}).get("warnings", []))


def _model_loc(loaded: LoadedPlan, name: str) -> tuple:
    return ("models", name) if loaded.plan.models is not None else ("model",)


def load_plan_model(loaded: LoadedPlan, name: str | None = None, run_dir: Path | None = None) -> tuple[str, Adapter]:
    """Load one of the plan's models (the only one when `name` is None); errors point at its entry.

    Args:
        run_dir: the run folder; modules a device map sends to ``disk`` are offloaded into its ``offload/``.
    """
    specs = loaded.plan.model_specs()
    if name is None:
        name = next(iter(specs))
    m: ModelSpec = specs[name]
    loc = _model_loc(loaded, name)
    device = m.device
    from embedlens.plan import distributed

    world = distributed.current()
    if world.size > 1 and device.startswith("cuda") and m.device_map is None:
        device = f"cuda:{world.local_rank}"  # one model per process, each on its own GPU
    _check_device(loaded, loc, device)
    try:
        check_device_map(m.device_map)
    except DeviceMapError as e:  # before loading: named by the map's own key
        raise _device_map_error(loaded, loc, e) from None
    if m.remote:
        _check_remote(loaded, loc, m)
    placement = None
    if m.device_map is not None or m.quantization is not None:
        placement = Placement(m.device_map, m.max_memory, offload_dir(run_dir) if run_dir is not None else None, m.quantization)
    try:
        return name, load_model(loaded.model_source(m.source), adapter=m.adapter, dtype=m.dtype, device=device, attn_implementation=m.attn_implementation,
                                placement=placement, remote=m.remote)
    except DeviceMapError as e:
        raise _device_map_error(loaded, loc, e) from None
    except EmbedLensError as e:
        msg = str(e)
        for key in ("quantization", "device_map", "max_memory", "remote"):
            if msg.startswith(f"model.{key}"):
                sub = msg.split(":", 1)[0].split(".")[1:]
                raise loaded.error((*loc, *sub), msg.split(": ", 1)[1]) from None
        key = "adapter" if m.adapter and "adapter" in str(e) else "source"
        raise loaded.error((*loc, key), str(e)) from None
    except MemoryError:
        raise loaded.error((*loc, "source"), f"not enough memory to load {m.source!r}") from None
    except Exception as e:  # noqa: BLE001 - transformers / safetensors raise many types for a broken model folder
        msg = f"{type(e).__name__}: {e}".strip()
        if m.attn_implementation and "attn" in msg.lower():
            raise loaded.error((*loc, "attn_implementation"), f"{m.attn_implementation!r} cannot be used with this model ({msg[:400]})") from None
        if m.device_map is not None and any(w in msg.lower() for w in ("device_map", "device map", "offload", "meta tensor")):
            raise loaded.error((*loc, "device_map"), f"{m.source!r} cannot be placed by this device map: {msg[:600]}") from None
        raise loaded.error((*loc, "source"), f"cannot load the model from {m.source!r}: {msg[:600]}") from None


def _check_remote(loaded: LoadedPlan, loc: tuple, m: ModelSpec) -> None:
    """What a remote model (NDIF) can do, checked before anything loads: probe passes only, a hub checkpoint."""
    key = ".".join(str(k) for k in loc)
    plan = loaded.plan
    if plan.conditions:
        cname, items = next(iter(plan.conditions.items()))
        raise loaded.error(("conditions", cname, 0), f"{items[0].name} (condition {cname!r}) runs the intervention engine, which "
                           f"runs locally only; {key}.remote: true runs probe passes on NDIF. Run the conditions in a plan "
                           "without remote (on a model you host), or drop them from this one")
    if m.source.startswith(("zoo:", "tiny:")) or Path(m.source).exists():
        raise loaded.error((*loc, "remote"), f"NDIF runs hub checkpoints; {m.source!r} is not a hub id (e.g. llava-hf/llava-1.5-7b-hf)")


def _device_map_error(loaded: LoadedPlan, loc: tuple, e: DeviceMapError):
    """A `DeviceMapError` at its key in the plan (``model.device_map.<module path>``, with the path quoted as written)."""
    if not e.key:  # the map as a whole, or '' (the whole model): the device_map key itself
        return loaded.error((*loc, "device_map"), e.reason if e.key is None else f"module '' (the whole model): {e.reason}")
    return loaded.error((*loc, "device_map", e.key), f"module {e.key!r}: {e.reason}")


def _check_device(loaded: LoadedPlan, loc: tuple, device: str) -> None:
    """An unknown or unavailable device is a plan error, not a traceback from the first tensor moved there."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise loaded.error((*loc, "device"), f"not a device: {device!r} ({e}); expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index is not None and dev.index >= n):
            raise loaded.error((*loc, "device"), f"{device!r} is not available here ({n} CUDA device(s)); use cpu or an available device")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise loaded.error((*loc, "device"), "'mps' is not available here; use cpu")
    elif dev.type == "meta":
        raise loaded.error((*loc, "device"), "'meta' holds no weights (shapes only), so nothing can run on it; expected cpu, cuda, cuda:N or mps")
    elif dev.type not in ("cpu", "cuda", "mps") and not hasattr(torch, dev.type):
        raise loaded.error((*loc, "device"), f"{device!r} is not a device this torch supports")


def read_data(loaded: LoadedPlan, adapter: Adapter | None = None) -> list[Record]:
    """The plan's samples as records (images not decoded yet), checked record by record.

    Raises:
        PlanError: pointing at the data key, with the file and line of the bad record.
    """
    data = loaded.plan.data
    try:
        if data.prompts is not None:
            key = "prompts"
            records = read_records(loaded.resolve(data.prompts), loaded.resolve(data.images) if data.images else None)
        elif data.dataset is not None:
            key = "dataset"
            records = read_hf_dataset(loaded.resolve(data.dataset), data.split, data.columns)
        else:
            from embedlens.synthetic import SyntheticSpec, make_records

            key = "synthetic"
            syn = data.synthetic.model_dump()
            if syn["patch_grid"] == "auto":
                if adapter is None:
                    syn["patch_grid"] = 8
                else:
                    syn["patch_grid"] = adapter.grid()[0]
            syn["question_types"] = tuple(syn["question_types"])
            records = make_records(SyntheticSpec(**syn))
    except EmbedLensError as e:
        raise loaded.error(("data", key), str(e)) from None
    if data.limit is not None:
        records = records[: data.limit]
    return records


def prepare(loaded: LoadedPlan, adapter: Adapter | None = None, model: str | None = None, run_dir: Path | None = None) -> Prepared:
    """Load model and data and build the plugins; run the checks that need the model.

    Args:
        loaded: from `load_plan`.
        adapter: an already loaded model (skips loading `model`).
        model: which of the plan's `models` (default: the first).
        run_dir: the run folder (claimed), for modules a device map offloads to ``disk``.

    Raises:
        PlanError: naming the plan file, line and key (e.g. a layer out of range).
    """
    plan = loaded.plan
    name = model or next(iter(plan.model_specs()))
    if adapter is None:
        name, adapter = load_plan_model(loaded, name, run_dir)
    built: list[tuple[str, Probe]] = []
    for i, spec in enumerate(plan.probes):
        try:
            probe = probe_registry.get(spec.name)(**spec.params)
            probe.check(adapter)
        except EmbedLensError as e:
            msg = str(e)
            key = next((k for k in spec.params if msg.startswith(f"{spec.name}.{k}")), None)
            loc = ("probes", i, "params", key) if key else ("probes", i)
            raise loaded.error(loc, msg.split(": ", 1)[-1] if key else msg) from None
        built.append((spec.label or spec.name, probe))
    conditions = []
    for cname, items in plan.conditions.items():
        ivs = []
        for i, spec in enumerate(items):
            try:
                iv = intervention_registry.get(spec.name)(**spec.params)
                iv.check(adapter)
            except EmbedLensError as e:
                raise _plugin_error(loaded, ("conditions", cname, i), spec, e, f"condition {cname!r} ({spec.name}): ") from None
            ivs.append(iv)
        conditions.append(Condition(cname, ivs))
    metrics = []
    for i, spec in enumerate(plan.metrics):
        try:
            metrics.append(metric_registry.get(spec.name)(**spec.params))
        except EmbedLensError as e:
            raise _plugin_error(loaded, ("metrics", i), spec, e) from None
    partition = None
    if plan.partition is not None:
        try:
            partition = Partition(**plan.partition.model_dump())
            partition.check(adapter)
        except EmbedLensError as e:
            head, _, msg = str(e).partition(": ")  # "partition.anchors.dead: ..." -> that key
            key = tuple(head.split(".")) if head.startswith("partition.") else ("partition",)
            raise loaded.error(key, msg if head.startswith("partition.") else str(e)) from None
    for i, (_, probe) in enumerate(built):  # one partition per plan (see loader._one_partition): token_partition
        if partition is not None and hasattr(probe, "use_partition"):  # labels with it, anchor_discovery reports its discovery
            try:
                probe.use_partition(partition)
            except EmbedLensError as e:
                raise _plugin_error(loaded, ("probes", i), plan.probes[i], e) from None
    own = [i for i, spec in enumerate(plan.probes) if spec.name == "anchor_discovery"]
    if not (partition is not None and partition.discover) and len({repr(sorted(plan.probes[i].params.items())) for i in own}) > 1:
        raise loaded.error(("probes", own[-1]), "a run has one anchor discovery: give the anchor_discovery probes the same "
                           "parameters, or set them once in a partition: block with discover: true")
    records = read_data(loaded, adapter)
    breakdown_fields(loaded, records)  # report.breakdown names fields the samples have
    key = ("data", "prompts" if plan.data.prompts else "dataset" if plan.data.dataset else "synthetic")
    for r in records:  # prompt checks are cheap: fail before the first batch, not in the middle
        try:
            adapter.prompt(Sample([None] * len(r.images), r.question, r.prompt, r.answer, r.id, r.meta))
        except EmbedLensError as e:
            raise loaded.error(key, f"{r.where}: {e}") from None
    return Prepared(loaded, adapter, built, records, conditions, metrics, partition, name)


def _plugin_error(loaded: LoadedPlan, loc: tuple, spec, err: EmbedLensError, prefix: str = ""):
    """Point a plugin's error at the parameter it names (``"key: ..."``), else at the entry."""
    msg = str(err)
    key = next((k for k in spec.params if msg.startswith(f"{k}:")), None)
    if key:
        return loaded.error((*loc, "params", key), prefix + msg.split(": ", 1)[1])
    return loaded.error(loc, prefix + msg)


def plan_hash(loaded: LoadedPlan) -> str:
    """Hash of the validated (sweep-expanded) plan: what a resumed run must match."""
    return hashlib.sha256(loaded.plan.model_dump_json().encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """Class, size and a hash of the vocabulary (token -> id): two runs whose ids mean the same words share it."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
    return {"class": type(tokenizer).__name__, "vocab_size": len(vocab), "sha256": digest}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("embedlens", "torch", "transformers", "nnsight", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


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


def run(
    prepared: Prepared,
    out_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> RunResult:
    """Run every batch through the probes and conditions; write tables, figures, a report and a manifest.

    Args:
        prepared: from `prepare`.
        out_dir: overrides the plan's `output.dir` (which is relative to the plan's folder).
        progress: called as ``progress(phase, done_samples, total_samples)``.
        resume: continue the unfinished run in `out_dir` from its last finished batch.
        overwrite: discard an unfinished run in `out_dir` and start again.

    Raises:
        EmbedLensError: `out_dir` holds an unfinished run and neither `resume` nor
            `overwrite` is given, or the checkpoint belongs to another plan, or the
            data files or model changed since the unfinished run started.
        RunFolderError: `out_dir` is not embedlens's (non-empty without its marker),
            holds a symbolic link, is locked by another run, or cannot be written
            (full disk, read-only file system).
    """
    world = distributed.current()
    out, own = claim_run(Path(out_dir) if out_dir is not None else prepared.loaded.output_dir, world)
    try:
        with RunLock(own):  # rank 0 locks the run folder, every other rank its own folder in it
            result = _run_locked(prepared, out, own, world, progress, resume, overwrite)
            if world.main:
                distributed.barrier(world)  # every other rank has finished and let go of its lock
                remove_shards(out)
        if not world.main:
            distributed.barrier(world)
        return result
    except OSError as e:  # full disk, read-only file system, permissions: an error naming the file, state kept
        raise os_error(e, "write", out) from None


def claim_run(out: Path, world: "distributed.World", kind: str = "run") -> tuple[Path, Path]:
    """Claim the run folder (rank 0) and each other rank's own folder in it; returns (run folder, this rank's folder).

    Raises:
        RunFolderError: see `embedlens.files.claim`.
        DistributedError: a rank does not see the folder rank 0 claimed (it must be on a file system every rank sees).
    """
    refusal = None
    if world.main:
        try:
            out = claim(out, kind=kind)
        except EmbedLensError as e:
            refusal = e
    distributed.settle(refusal, world)  # every rank stops with rank 0's refusal
    if world.main:
        return out, out
    if not (Path(out) / MARKER).is_file():
        raise distributed.DistributedError(f"{out}: rank {world.rank} does not see the run folder rank 0 claimed; "
                                           "the output folder must be on a file system every rank sees")
    return Path(out), claim(safe_dir(Path(out), shard_dir(Path("."), world.rank)))


def _run_locked(prepared: Prepared, out: Path, own: Path, world: "distributed.World", progress: ProgressFn | None,
                resume: bool, overwrite: bool) -> RunResult:
    from embedlens.figures import EXTRA_FORMATS

    loaded, adapter = prepared.loaded, prepared.adapter
    plan = loaded.plan
    started = time.time()
    h = plan_hash(loaded)
    records = prepared.records
    bs = plan.batch_size
    chunks = [records[i : i + bs] for i in range(0, len(records), bs)]
    identity = run_identity(prepared)
    distributed.agree([h, len(chunks), identity], world, "the plan, its data and its model")
    if not world.main:  # rank 0 decides whether to start, resume or stop; the others take its state
        tensors, doc = distributed.unpack(distributed.broadcast(None, world))
        if "error" in doc:
            _leave_together(own, world)
            raise distributed.DistributedError(f"rank 0 stopped: {doc['error']}")
        if doc.get("done"):
            return RunResult(out_dir=out)
        state = _state_from(bytes(tensors["state"].numpy().tobytes()), prepared, out)
        resumed_from = doc.get("resumed_from")
    else:
        try:
            state, resumed_from = _start_state(prepared, out, h, identity, len(chunks), resume, overwrite)
        except EmbedLensError as e:
            if world.size > 1:
                distributed.broadcast(distributed.pack({}, {"error": str(e)}), world)
                _leave_together(own, world)
            raise
        if state is None:  # resuming a finished run: nothing left to do
            if world.size > 1:
                distributed.broadcast(distributed.pack({}, {"done": True}), world)
            return resumed_from
        if world.size > 1:
            distributed.broadcast(_state_payload(state, {"resumed_from": resumed_from}), world)
    parts = Parts(own, shards=[shard_dir(out, r) for r in range(1, world.size)] if world.main else None)
    parts.drop_from(state.next_batch)  # every rank its own parts
    probes, partition, conditions = state.probes, state.partition, state.conditions

    def checkpoint() -> None:
        ckpt.write(out, state)

    def load_chunk(chunk: list[Record], record_problems: bool, positions: list[int] | None = None) -> list[Sample]:
        """The chunk's samples that load (the others are skipped, and recorded where `record_problems`); their
        places in the chunk are appended to `positions` when given."""
        samples = []
        for i, r in enumerate(chunk):
            try:
                s, notes = r.load(plan.data.max_pixels)
            except InputError as e:
                if record_problems:
                    state.skipped.append({"sample_id": r.id, "where": r.where, "error": str(e)})
                continue
            if record_problems:
                state.converted += [{"sample_id": r.id, "where": r.where, "note": n} for n in notes]
            samples.append(s)
            if positions is not None:
                positions.append(i)
        return samples

    def batches(phase: str):
        done = 0
        for chunk in chunks:
            samples = load_chunk(chunk, record_problems=False)
            if samples:
                yield adapter.encode(samples, padding_side=plan.data.padding_side)
            done += len(chunk)
            if progress is not None:
                progress(phase, done, len(records))

    def fit(phase: str, sites: list[Site], consume: Callable) -> None:
        """One fit pass: ``consume((batch, acts) for every batch in order)`` on rank 0; the others read their batches."""
        if world.size == 1:
            consume((batch, collect(adapter, batch, sites) if sites else {}) for batch in batches(phase))
            return
        stream = _sharded_stream(adapter, plan, chunks, world, sites, load_chunk, phase, progress, len(records))
        if world.main:
            consume(stream)
        else:
            for _ in stream:
                pass

    token = EXTRA_FORMATS.set(tuple(f for f in plan.output.figure_formats if f != "png"))
    try:
        if not state.fitted:
            torch.manual_seed(plan.seed)
            if partition is not None and partition.needs_fit:  # discovered anchors, before any batch is labelled
                fit("fit: partition", partition.fit_sites(adapter), lambda stream: partition.fit_stream(adapter, stream))
            for label, probe in probes:
                if probe.needs_fit:
                    if world.size > 1 and not world.main:
                        continue  # a probe fitted with the partition (token_partition): rank 0's state comes below
                    if world.size > 1:
                        raise distributed.DistributedError(f"probe {label!r} needs a fit pass of its own, which is not sharded "
                                                           "across processes; run this plan in one process")
                    probe.fit(adapter, batches(f"fit: {label}"))
            for cond in conditions:
                if cond.needs_fit:  # data-set statistics (e.g. mean ablation) in an earlier pass
                    fit(f"fit: {cond.name}", cond.fit_sites(adapter), lambda stream, c=cond: c.fit_stream(adapter, stream))
            from embedlens.plan.pools import check_pools, outside_target_draws

            if outside_target_draws(conditions):  # a matched control its pool cannot serve: refused before the main pass
                fit("check: control pools", partition.sites(adapter) if partition is not None else [],
                    lambda stream: check_pools(prepared.loaded, adapter, partition, conditions, stream))
            state.fitted = True
            if world.main:
                checkpoint()
            if world.size > 1:  # the fitted anchors and means: rank 0's, on every rank
                data = distributed.broadcast(_state_payload(state, {}) if world.main else None, world)
                if not world.main:
                    state = _state_from(bytes(distributed.unpack(data)[0]["state"].numpy().tobytes()), prepared, out)
                    probes, partition, conditions = state.probes, state.partition, state.conditions
        sites = {s for _, p in probes for s in p.sites(adapter)}
        if partition is not None and probes:
            sites |= set(partition.sites(adapter))
        sites = sorted(sites, key=lambda s: s.order_key())
        engine = Engine(adapter) if conditions else None
        if progress is not None and world.main:
            progress("run", min(len(records), state.next_batch * bs), len(records))
        try:
            if world.size == 1:
                _main_pass(prepared, state, chunks, parts, engine, sites, load_chunk, checkpoint, progress)
            else:
                _main_pass_sharded(prepared, state, chunks, parts, engine, sites, load_chunk, checkpoint, progress, world)
        except EmbedLensError as e:
            if state.next_batch:
                raise type(e)(f"{e}\n(the {state.next_batch} finished batch(es) of {len(chunks)} are kept in {out}: "
                              "fix the cause and continue with --resume)") from None
            raise
        if not world.main:
            return RunResult(out_dir=out)
        for label, probe in probes:
            for name, rows in probe.final_tables().items():
                _emit(parts, label, name, rows, len(chunks), len(probes))
        return _finish(prepared, out, parts, state, started, resumed_from, world)
    finally:
        EXTRA_FORMATS.reset(token)


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
    done = finished_result(out) if resume and not overwrite else None
    if done is not None:
        remove_temp(out)
        return None, done
    clear_run(out)
    return RunState(h, identity, 0, n_batches, False, prepared.probes, prepared.partition, prepared.conditions), None


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
            if os.environ.get(KILL_ENV) == f"rank{world.rank}_batch{mine}":  # test hook: a rank dies mid-round
                os.kill(os.getpid(), signal.SIGKILL)
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
        rows = {**rows, "sample": np.asarray(data_index, dtype=np.int64)[np.asarray(rows["sample"], dtype=np.int64)]}
    parts.table(full, rows, index)


#: Test hook: ``EMBEDLENS_KILL_AT=PHASE`` makes the runner SIGKILL itself at that point of the finish, so tests
#: can check that every state a kill leaves on disk resumes to the same bytes. Phases, in order: see `_PHASES`.
#: In a data-parallel run, ``rankR_batchB`` kills rank R once it has written its parts of batch B, before rank 0 folds it;
#: ``write:NAME`` kills the process inside `embedlens.files.write_bytes`, with NAME's temporary file written, not yet renamed.
KILL_ENV = "EMBEDLENS_KILL_AT"
_PHASES = ("after_gather", "after_figures", "after_summary", "after_report", "after_manifest", "after_checkpoint")


def _phase(name: str) -> None:
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _finish(prepared: Prepared, out: Path, parts: Parts, state: RunState, started: float, resumed_from: int | None,
            world: "distributed.World | None" = None) -> RunResult:
    """Write the run's results in an order where every prefix resumes to the same bytes.

    Tables, figures, artifacts, summary, report and manifest are all derived
    from the parts and the checkpointed state; the checkpoint goes only after
    all of them are written, and the parts only after the checkpoint.
    """
    from embedlens.figures import effect_chart, evidence_figure

    loaded, adapter, plan = prepared.loaded, prepared.adapter, prepared.loaded.plan
    probes, partition = state.probes, state.partition
    if state.skipped:
        parts.table("skipped", {k: [s[k] for s in state.skipped] for k in ("sample_id", "where", "error")}, 0)
    if state.converted:
        parts.table("converted", {k: [s[k] for s in state.converted] for k in ("sample_id", "where", "note")}, 0)
    effects = state.effects.stats()
    controls = matched_controls(state.conditions)
    if effects:
        rows: dict[str, list] = {"condition": [], "metric": [], "mean": [], "sem": [], "n": [], "control": []}
        for cond, cols in effects.items():
            for metric, st in cols.items():
                rows["condition"].append(cond)
                rows["metric"].append(metric)
                rows["mean"].append(st["mean"])
                rows["sem"].append(st["sem"])
                rows["n"].append(st["n"])
                # "" where a condition has no matched control, never a missing cell: a missing cell compares
                # unequal to itself (pandas), so two runs' tables would differ there whatever they computed
                rows["control"].append(controls.get(cond, ""))
        parts.table("effects_summary", rows, 0)
    if partition is not None and partition.evidence:  # why each id is (not) an anchor
        parts.table("partition_discovery", {k: [r[k] for r in partition.evidence] for k in EVIDENCE_COLUMNS}, 0)
    concl, touched = _conclusions(prepared, parts, controls)
    tables = parts.gather(plan.output.formats)
    _phase("after_gather")
    result = RunResult(out_dir=out, tables=tables, skipped=list(state.skipped), resumed_from=resumed_from)
    result.summary = {label: probe.result() for label, probe in probes}
    if partition is not None:
        result.summary["partition"] = partition.summary()
    if effects:
        result.summary["effects"] = state.effects.result()
        result.summary["effects_sem"] = {c: {k: v["sem"] for k, v in cols.items()} for c, cols in effects.items()}
        if controls:
            result.summary["controls"] = controls
    result.summary["data"] = {
        "samples": len(prepared.records),
        "used": len(prepared.records) - len(state.skipped),
        "skipped": state.skipped,
        "converted": len(state.converted),
    }
    names = [type(p).__name__ for _, p in probes]
    # probes sharing a class (sweeps, labels) get a folder each so their files do not collide
    own = {label: names.count(type(p).__name__) > 1 for label, p in probes}
    artifacts = [a for label, probe in probes for a in probe.artifacts(safe_dir(out, Path("artifacts") / label) if own[label] else out)]
    if plan.output.figures:
        fig_dir = safe_dir(out, "figures")
        for label, probe in probes:
            result.figures += probe.figures(safe_dir(out, Path("figures") / label) if own[label] else fig_dir)
        if partition is not None and partition.evidence:
            result.figures.append(evidence_figure(partition.evidence, partition.anchor_rule(), fig_dir / "partition_discovery.png",
                                                  title="Partition: discovered anchors and the rejected candidates (marker size: token share)"))
        if effects:
            metrics = sorted({m for cols in effects.values() for m in cols})
            for m in metrics:
                vals = [cols[m]["mean"] for cols in effects.values() if m in cols]
                if concl is not None and m in concl.accuracy:
                    continue  # drawn with intervals and reference lines below
                if len(set(vals)) > 1 and not re.search(r"_l\d+$", m):  # constant metrics and per-layer columns say little as charts
                    fname = re.sub(r"[^A-Za-z0-9_.\-]", "_", m).lstrip(".")[:120]  # a metric column is a name, not a path
                    result.figures.append(effect_chart(effects, m, fig_dir / f"effects_{fname}.png", controls))
        if concl is not None:
            from embedlens.plan.conclusions import figures as conclusion_figures, token_map_panels

            panels = token_map_panels(concl, touched, adapter, prepared.records, plan.report.token_map_samples, plan.data.max_pixels)
            result.figures += conclusion_figures(concl, fig_dir, panels)
    if concl is not None:
        result.summary["statistics"] = concl.headline()
    _phase("after_figures")
    manifest = {
        "plan": str(loaded.path) if loaded.path else None,
        "plan_hash": plan_hash(loaded),
        "overrides": loaded.overrides,  # --set KEY=VALUE applied to the plan file
        "seed": plan.seed,
        "model": {
            "name": prepared.model_name,
            "source": adapter.source,
            "adapter": adapter.name,
            "class": type(adapter.model).__name__,
            "dtype": str(next(adapter.model.parameters()).dtype),
        },
        "tokenizer": tokenizer_fingerprint(adapter.tokenizer),
        "device": str(adapter.device),
        "device_name": torch.cuda.get_device_name(adapter.device) if adapter.device.type == "cuda" else platform.processor() or platform.machine(),
        "versions": _versions(),
        "n_samples": len(prepared.records),
        "n_batches": state.n_batches,
        "batch_size": plan.batch_size,
        "skipped_samples": len(state.skipped),
        "tables": {k: str(v.relative_to(out)) for k, v in sorted(result.tables.items())},
        "figures": [str(f.relative_to(out)) for f in result.figures],
        "artifacts": [str(a.relative_to(out)) for a in artifacts],
        "tensors": sorted(str(p.relative_to(out)) for p in (out / "tensors").glob("*")) if (out / "tensors").is_dir() else [],
        "inputs": state.identity,
    }
    write_text(out / "summary.json", json_text(result.summary, indent=2, default=str))  # NaN -> null: standard JSON
    write_text(out / "run_plan.yaml", getattr(loaded, "text", None) or _plan_yaml(loaded))  # the report embeds it
    _phase("after_summary")
    if plan.output.report:
        from embedlens.report import write_report

        result.report = write_report(out, manifest)
    _phase("after_report")
    write_text(out / "manifest.json", json_text(manifest, indent=2))
    _phase("after_manifest")
    (out / CHECKPOINT).unlink(missing_ok=True)  # the commit point: from here on the run is finished
    _phase("after_checkpoint")
    parts.remove()
    log = {"seconds": round(time.time() - started, 3), "resumed_from_batch": resumed_from, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "processes": world.size if world is not None else 1}
    write_text(out / "run_log.json", json.dumps(log, indent=2))
    return result


def _plan_yaml(loaded: LoadedPlan) -> str:
    import yaml

    return "# the validated plan (it was not read from a file)\n" + yaml.safe_dump(loaded.plan.model_dump(mode="json"), sort_keys=False)


def _conclusions(prepared: Prepared, parts: Parts, controls: dict[str, str]):
    """The effect tests (`embedlens.plan.conclusions`) from the effects parts, written as the ``effect_tests`` table."""
    from embedlens.plan import conclusions

    effects = parts.read("effects")
    if effects is None:
        return None, None
    loaded = prepared.loaded
    touched = parts.read("touched_tokens")
    touched = touched.to_pydict() if touched is not None else None
    fields = breakdown_fields(loaded, prepared.records)
    groups = {f: {r.id: r.meta.get(f) for r in prepared.records} for f in fields}
    descriptive = {c for m in prepared.metrics for c in getattr(m, "descriptive", ())}
    concl = conclusions.analyse(effects.to_pydict(), touched, controls, loaded.plan.report, loaded.plan.seed, groups,
                                conclusions.sweep_groups(loaded), descriptive=descriptive)
    parts.table("effect_tests", concl.rows, 0)
    return concl, touched


def run_all(
    loaded: LoadedPlan,
    out_dir: str | Path | None = None,
    progress: Callable[[str, str, int, int], None] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_model: Callable[[str], None] | None = None,
) -> dict[str, RunResult]:
    """Run a plan on every model it names: one run folder each, then a comparison.

    A single-model plan writes into the output folder itself. With several
    models every model is loaded and checked before any batch runs (each is
    released after its checks), then each runs into ``OUT/NAME`` and
    ``OUT/compare`` puts them side by side.

    Args:
        progress: ``progress(model, phase, done, total)``.
        on_model: called with each model's name before it loads.
    """
    plan = loaded.plan
    out = Path(out_dir) if out_dir is not None else loaded.output_dir  # the plan's: relative to its folder
    names = list(plan.model_specs())

    def prog(name):
        return (lambda phase, d, t: progress(name, phase, d, t)) if progress else None

    check_output(out_dir if out_dir is not None else plan.output.dir)  # as written: '' is not '.'
    check_output(out)
    world = distributed.current()
    # refuse a foreign folder before loading any model
    out, own = claim_run(out, world, kind="run" if len(names) == 1 else "runs")
    if len(names) == 1:
        if on_model:
            on_model(names[0])
        prepared = prepare(loaded, run_dir=own)
        try:
            return {names[0]: run(prepared, out, prog(names[0]), resume=resume, overwrite=overwrite)}
        finally:
            remove_offload(own)  # weights a device map offloaded to disk: not results
    if world.size > 1:
        raise distributed.DistributedError("models: a plan with several models runs in one process; "
                                           "run each model's plan with torchrun, then embedlens compare")
    try:
        with RunLock(out):
            for name in names:  # every model checked before the first batch of any
                if on_model:
                    on_model(f"{name} (checking)")
                prepare(loaded, model=name, run_dir=out)
            results = {}
            for name in names:
                if on_model:
                    on_model(name)
                results[name] = run(prepare(loaded, model=name, run_dir=out), out / name, prog(name), resume=resume, overwrite=overwrite)
                remove_offload(out)
            from embedlens.compare import compare_runs

            compare_runs([out / n for n in names], out / "compare", names=names)
    except OSError as e:
        raise os_error(e, "write", out) from None
    return results
