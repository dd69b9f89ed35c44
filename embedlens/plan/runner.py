"""Run a plan: load the model, check the plan against it, stream batches through the probes."""

from __future__ import annotations

import csv
import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from embedlens.adapters import load_model
from embedlens.adapters.base import Adapter
from embedlens.data import Sample, read_jsonl
from embedlens.errors import EmbedLensError
from embedlens.groups import Partition
from embedlens.interventions.condition import Condition
from embedlens.interventions.engine import Engine
from embedlens.metrics import Metric, compare
from embedlens.registry import interventions as intervention_registry
from embedlens.registry import metrics as metric_registry
from embedlens.plan.loader import LoadedPlan
from embedlens.probes.base import Probe
from embedlens.registry import probes as probe_registry
from embedlens.tracing import collect


@dataclass
class Prepared:
    """Everything a run needs, checked against the loaded model before the first batch."""

    loaded: LoadedPlan
    adapter: Adapter
    probes: list[tuple[str, Probe]]
    samples: list[Sample]
    conditions: list[Condition] = field(default_factory=list)
    metrics: list[Metric] = field(default_factory=list)
    partition: Partition | None = None


@dataclass
class RunResult:
    out_dir: Path
    tables: dict[str, Path] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def prepare(loaded: LoadedPlan, adapter: Adapter | None = None) -> Prepared:
    """Load model and data and build the probes; run the checks that need the model.

    Raises:
        PlanError: naming the plan file, line and key (e.g. a layer out of range).
    """
    plan = loaded.plan
    if adapter is None:
        m = plan.model
        try:
            adapter = load_model(
                m.source, adapter=m.adapter, dtype=m.dtype, device=m.device, attn_implementation=m.attn_implementation
            )
        except EmbedLensError as e:
            raise loaded.error(("model", "adapter" if m.adapter and "adapter" in str(e) else "source"), str(e)) from None
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
        built.append((spec.name, probe))
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
        p = plan.partition
        try:
            partition = Partition(**p.model_dump())
            partition.check(adapter)
        except EmbedLensError as e:
            head, _, msg = str(e).partition(": ")  # "partition.anchors.dead: ..." -> that key
            key = tuple(head.split(".")) if head.startswith("partition.") else ("partition",)
            raise loaded.error(key, msg if head.startswith("partition.") else str(e)) from None
    data = plan.data
    try:
        samples = read_jsonl(loaded.resolve(data.prompts), loaded.resolve(data.images) if data.images else None)
    except EmbedLensError as e:
        raise loaded.error(("data", "prompts"), str(e)) from None
    if data.limit is not None:
        samples = samples[: data.limit]
    try:
        for s in samples:  # prompt checks are cheap: fail before the first batch, not in the middle
            adapter.prompt(s)
    except EmbedLensError as e:
        raise loaded.error(("data", "prompts"), str(e)) from None
    return Prepared(loaded, adapter, built, samples, conditions, metrics, partition)


def _plugin_error(loaded: LoadedPlan, loc: tuple, spec, err: EmbedLensError, prefix: str = ""):
    """Point a plugin's error at the parameter it names (``"key: ..."``), else at the entry."""
    msg = str(err)
    key = next((k for k in spec.params if msg.startswith(f"{k}:")), None)
    if key:
        return loaded.error((*loc, "params", key), prefix + msg.split(": ", 1)[1])
    return loaded.error(loc, prefix + msg)


def _plan_hash(loaded: LoadedPlan) -> str:
    return hashlib.sha256(loaded.plan.model_dump_json().encode()).hexdigest()[:16]


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("embedlens", "torch", "transformers", "nnsight"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


class _CsvSink:
    """Appends rows to one CSV per table as batches finish."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.files: dict[str, tuple[Any, csv.writer, list[str]]] = {}
        self.paths: dict[str, Path] = {}

    def write(self, name: str, table: dict[str, list]) -> None:
        cols = list(table)
        if name not in self.files:
            path = self.out_dir / f"{name}.csv"
            fh = path.open("w", newline="")
            w = csv.writer(fh)
            w.writerow(cols)
            self.files[name], self.paths[name] = (fh, w, cols), path
        fh, w, header = self.files[name]
        if cols != header:
            raise EmbedLensError(f"table {name!r} changed columns between batches: {header} -> {cols}")
        w.writerows(zip(*(table[c] for c in cols)))
        fh.flush()

    def close(self) -> None:
        for fh, _, _ in self.files.values():
            fh.close()


class _EffectSummary:
    """Running mean of every numeric metric column, per condition (NaN values skipped)."""

    def __init__(self):
        self.sums: dict[str, dict[str, list[float]]] = {}

    def add(self, table: dict[str, list]) -> None:
        for i, cond in enumerate(table["condition"]):
            acc = self.sums.setdefault(cond, {})
            for col, values in table.items():
                v = values[i]
                if col in ("sample", "condition") or isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                    continue
                s = acc.setdefault(col, [0.0, 0])
                s[0] += float(v)
                s[1] += 1

    def result(self) -> dict[str, dict[str, float]]:
        return {c: {k: s / n for k, (s, n) in cols.items()} for c, cols in self.sums.items()}


def run(
    prepared: Prepared,
    out_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RunResult:
    """Run every batch through the probes and write tables, figures and a manifest.

    Args:
        prepared: from `prepare`.
        out_dir: overrides the plan's `output.dir`.
        progress: called as ``progress(done_samples, total_samples)`` after each batch.
    """
    loaded, adapter = prepared.loaded, prepared.adapter
    plan = loaded.plan
    out = Path(out_dir) if out_dir is not None else Path(plan.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(plan.seed)
    partition = prepared.partition
    sites = {s for _, p in prepared.probes for s in p.sites(adapter)}
    if partition is not None and prepared.probes:
        sites |= set(partition.sites(adapter))
    sites = sorted(sites, key=lambda s: s.order_key())
    sink = _CsvSink(out)
    started = time.time()
    total = len(prepared.samples)
    chunks = [prepared.samples[i : i + plan.batch_size] for i in range(0, total, plan.batch_size)]
    engine = Engine(adapter) if prepared.conditions else None
    def batches():
        return (adapter.encode(c, padding_side=plan.data.padding_side) for c in chunks)

    if partition is not None and partition.needs_fit:  # discovered anchors, before any batch is labelled
        partition.fit(adapter, batches())
    for _, probe in prepared.probes:
        if probe.needs_fit:
            probe.fit(adapter, batches())
    for cond in prepared.conditions:
        if cond.needs_fit:  # data-set statistics (e.g. mean ablation) in an earlier pass
            cond.fit(adapter, batches())
    effects = _EffectSummary()
    try:
        done = 0
        for chunk in chunks:
            if prepared.probes:
                batch = adapter.encode(chunk, padding_side=plan.data.padding_side)
                acts = collect(adapter, batch, sites)
                if partition is not None:
                    batch.groups = partition.label(adapter, batch, acts=acts)
                for name, probe in prepared.probes:
                    for table, rows in probe.update(adapter, batch, acts).items():
                        sink.write(f"{name}.{table}" if len(prepared.probes) > 1 else table, rows)
            if engine is not None:
                table = compare(
                    engine,
                    chunk,
                    prepared.conditions,
                    prepared.metrics,
                    padding_side=plan.data.padding_side,
                    groups=prepared.partition,
                )
                sink.write("effects", table)
                effects.add(table)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        for name, probe in prepared.probes:
            for table, rows in probe.final_tables().items():
                sink.write(f"{name}.{table}" if len(prepared.probes) > 1 else table, rows)
    finally:
        sink.close()
    result = RunResult(out_dir=out, tables=dict(sink.paths))
    result.summary = {name: probe.result() for name, probe in prepared.probes}
    if partition is not None and partition.discovered:
        result.summary["partition"] = {"discovered_anchors": partition.discovered}
    artifacts = [p for _, probe in prepared.probes for p in probe.artifacts(out)]
    if engine is not None:
        result.summary["effects"] = effects.result()
    if plan.output.figures:
        fig_dir = out / "figures"
        for _, probe in prepared.probes:
            result.figures += probe.figures(fig_dir)
    manifest = {
        "plan": str(loaded.path) if loaded.path else None,
        "plan_hash": _plan_hash(loaded),
        "seed": plan.seed,
        "model": {"source": adapter.source, "adapter": adapter.name, "class": type(adapter.model).__name__},
        "device": str(adapter.device),
        "versions": _versions(),
        "n_samples": total,
        "seconds": round(time.time() - started, 3),
        "tables": {k: str(v.relative_to(out)) for k, v in result.tables.items()},
        "figures": [str(f.relative_to(out)) for f in result.figures],
        "artifacts": [str(a.relative_to(out)) for a in artifacts],
    }
    (out / "summary.json").write_text(json.dumps(result.summary, indent=2, default=str))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return result
