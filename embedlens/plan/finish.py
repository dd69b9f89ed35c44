"""Finish a run: gather the parts into tables, then figures, summary, report and manifest, in an order
where a kill at any point resumes to the same bytes (the checkpoint goes only after everything is written,
the parts only after the checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from embedlens.anchors import EVIDENCE_COLUMNS
from embedlens.files import json_text, safe_dir, write_text
from embedlens.plan import distributed
from embedlens.plan.checkpoint import RunState
from embedlens.plan.conclusions import breakdown_fields
from embedlens.plan.effects import matched_controls, summary_rows
from embedlens.plan.loader import LoadedPlan
from embedlens.plan.preparation import Prepared, plan_hash
from embedlens.plan.store import CHECKPOINT, Parts


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


#: Where a run stands, reported as audit events (`sys.audit`; nothing listens unless a hook is added, e.g. a
#: profiler, or the kill tests' hook in tests/support/kill_hook/, which kills the process at one of them):
#: ``embedlens.plan.finish`` (phase) after each step of the finish, phases in order `PHASES`, every prefix of
#: which resumes to the same bytes; ``embedlens.plan.batch`` (rank, batch) once a data-parallel rank has written
#: its parts of a batch, before rank 0 folds them in.
FINISH_EVENT = "embedlens.plan.finish"


PHASES = ("after_gather", "after_figures", "after_summary", "after_report", "after_manifest", "after_checkpoint")


_PHASES = PHASES  # the old name


def _phase(name: str) -> None:
    sys.audit(FINISH_EVENT, name)


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
        parts.table("effects_summary", summary_rows(effects, controls), 0)
    if partition is not None and partition.evidence:  # why each id is (not) an anchor
        parts.table("partition_discovery", {k: [r[k] for r in partition.evidence] for k in EVIDENCE_COLUMNS}, 0)
    concl, touched = _conclusions(prepared, parts, controls)
    board = _leaderboard(prepared, parts, state, concl)
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

            panels = token_map_panels(concl, touched, adapter, prepared.records, plan.report.token_map_samples, plan.data.max_pixels,
                                      plan.data.video.options())
            result.figures += conclusion_figures(concl, fig_dir, panels)
        if board is not None:
            from embedlens.plan.leaderboard import accuracy_figure

            result.figures.append(accuracy_figure(board, fig_dir / "leaderboard_accuracy.png"))
    if concl is not None:
        result.summary["statistics"] = concl.headline()
    if board is not None:
        result.summary["leaderboard"] = [dict(zip(board, vals)) for vals in zip(*board.values())]
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


def _leaderboard(prepared: Prepared, parts: Parts, state: RunState, concl) -> dict[str, list] | None:
    """The token-reduction leaderboard (`embedlens.plan.leaderboard`), written as the ``leaderboard`` table when
    the run has a condition with a budget."""
    from embedlens.plan import conclusions
    from embedlens.plan.leaderboard import leaderboard

    board = leaderboard(concl, state.effects.result(), state.conditions, conclusions.sweep_groups(prepared.loaded),
                        prepared.adapter.n_llm_layers)
    if board is not None:
        parts.table("leaderboard", board, 0)
    return board


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
