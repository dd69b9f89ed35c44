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

This module is the orchestrator; the steps are their own modules:
`embedlens.plan.preparation` (model, plugins, data), `embedlens.plan.resume`
(start, resume or refuse), `embedlens.plan.passes` (the batch passes) and
`embedlens.plan.finish` (tables, figures, report, manifest).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from embedlens.errors import EmbedLensError
from embedlens.files import MARKER, check_output, os_error, safe_dir
from embedlens.interventions.engine import Engine
from embedlens.plan import checkpoint as ckpt
from embedlens.plan import distributed
from embedlens.plan.finish import FINISH_EVENT, PHASES, _PHASES, RunResult, _finish, _versions, tokenizer_fingerprint  # noqa: F401
from embedlens.plan.identity import run_identity
from embedlens.plan.loader import LoadedPlan
from embedlens.plan.passes import BATCH_EVENT, Passes, ProgressFn, _emit, _rounds, fit_all  # noqa: F401
from embedlens.plan.preparation import Prepared, load_plan_model, plan_hash, prepare, read_data
from embedlens.plan.resume import agree_start, finished_result
from embedlens.plan.store import Parts, RunLock, claim, remove_offload, remove_shards, shard_dir

__all__ = [  # the runner's names, wherever they are defined now
    "BATCH_EVENT", "FINISH_EVENT", "PHASES", "Prepared", "ProgressFn", "RunResult", "claim_run", "finished_result",
    "load_plan_model", "plan_hash", "prepare", "read_data", "run", "run_all", "tokenizer_fingerprint",
]


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
    """Start or resume (`embedlens.plan.resume`), the fit passes and the main pass (`embedlens.plan.passes`), then
    the finish on rank 0 (`embedlens.plan.finish`)."""
    from embedlens.figures import EXTRA_FORMATS

    plan, adapter = prepared.loaded.plan, prepared.adapter
    started, h, bs = time.time(), plan_hash(prepared.loaded), plan.batch_size
    chunks = [prepared.records[i : i + bs] for i in range(0, len(prepared.records), bs)]
    identity = run_identity(prepared)
    distributed.agree([h, len(chunks), identity], world, "the plan, its data and its model")
    state, resumed_from = agree_start(prepared, out, h, identity, len(chunks), resume, overwrite, world, own)
    if state is None:  # resuming a finished run: nothing left to do
        return resumed_from
    parts = Parts(own, shards=[shard_dir(out, r) for r in range(1, world.size)] if world.main else None)
    parts.drop_from(state.next_batch)  # every rank its own parts
    passes = Passes(prepared, chunks, world, progress)

    def checkpoint() -> None:
        ckpt.write(out, state)

    token = EXTRA_FORMATS.set(tuple(f for f in plan.output.figure_formats if f != "png"))
    try:
        if not state.fitted:
            state = fit_all(passes, state, checkpoint, out)
        probes, partition = state.probes, state.partition
        sites = {s for _, p in probes for s in p.sites(adapter)}
        if partition is not None and probes:
            sites |= set(partition.sites(adapter))
        sites = sorted(sites, key=lambda s: s.order_key())
        engine = Engine(adapter) if state.conditions else None
        if progress is not None and world.main:
            progress("run", min(len(prepared.records), state.next_batch * bs), len(prepared.records))
        try:
            passes.main(state, parts, engine, sites, checkpoint)
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
