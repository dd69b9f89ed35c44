"""``embedlens eval``: every condition of a plan on every lmms-eval task, in-process, into one run folder.

The plan's model is loaded once (`Bridge`); each condition (``baseline`` first) is evaluated by lmms-eval's
own ``simple_evaluate`` with the ``embedlens`` model, so each task is scored by its own metrics. The run
folder (claimed, locked, written atomically: `embedlens.files`) gets:

- ``benchmarks.parquet`` / ``.csv``: one row per task x condition x metric: the value, the baseline's, their
  difference, and where the metric is the mean of per-sample scores (accuracy, exact match; not precision or
  F1), the paired difference per sample with its standard error and the number of pairs;
- ``benchmark_samples.parquet`` / ``.csv``: every logged sample's score per condition (task, doc, metric,
  score, response);
- ``figures/benchmarks.png``: each task's metrics per condition, with the paired standard errors;
- ``summary.json``, ``manifest.json`` and ``report.html`` (the benchmark section: `embedlens.lmms.report`).
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from embedlens.errors import BenchmarkError, UnknownNameError

#: Table names in the run folder.
TABLE = "benchmarks"
SAMPLES_TABLE = "benchmark_samples"
FIGURE = "figures/benchmarks.png"
#: Columns of the task x condition x metric table.
COLUMNS = ("task", "condition", "metric", "value", "baseline", "diff", "paired_diff", "paired_sem", "paired_n")


@dataclass
class EvalResult:
    """What `run_eval` wrote and the numbers behind it."""

    out_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, Path] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    report: Path | None = None
    raw: dict[str, dict] = field(default_factory=dict)  # condition -> lmms-eval's results dict (without samples)

    def value(self, task: str, condition: str, metric: str) -> float:
        """One cell of the table (``metric`` without lmms-eval's ``,filter`` suffix)."""
        for r in self.rows:
            if (r["task"], r["condition"], r["metric"]) == (task, condition, metric):
                return r["value"]
        raise KeyError((task, condition, metric))


def parse_list(text: str | Sequence[str] | None, what: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``; an empty entry or a repeated one is an error naming `what`.

    Example:
        >>> parse_list("pope, textvqa_val", "--tasks")
        ['pope', 'textvqa_val']
    """
    if text is None:
        return []
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    if not items or any(not t for t in items):
        raise BenchmarkError(f"{what}: expected comma-separated names; got {text!r}")
    dup = sorted({t for t in items if items.count(t) > 1})
    if dup:
        raise BenchmarkError(f"{what}: {', '.join(dup)} given twice")
    return items


def default_output(plan_dir: str) -> Path:
    """Next to the plan's own run folder: ``runs/study`` -> ``runs/study_eval``."""
    p = Path(plan_dir)
    return p.with_name(p.name + "_eval")


#: The most documents per task `--limit` may ask for (lmms-eval slices with it; no benchmark comes near).
MAX_LIMIT = 10**9


def _check_limit(limit: Any) -> None:
    """`--limit` is a whole count in 1..MAX_LIMIT or a fraction in (0, 1): not NaN, an infinity, 2.5 or 10**30."""

    ok = not isinstance(limit, bool) and isinstance(limit, (int, float)) and (
        (isinstance(limit, int) and 1 <= limit <= MAX_LIMIT)
        or (isinstance(limit, float) and math.isfinite(limit) and (0 < limit < 1 or (limit.is_integer() and 1 <= limit <= MAX_LIMIT))))
    if limit is not None and not ok:
        raise BenchmarkError(f"--limit: expected a whole number of documents in 1..{MAX_LIMIT} or a fraction in (0, 1); got {limit!r}")


def run_eval(
    plan: str | Path,
    tasks: Sequence[str],
    conditions: Sequence[str] | None = None,
    *,
    limit: int | float | None = None,
    out_dir: str | Path | None = None,
    batch_size: int | None = None,
    source: str | None = None,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    overrides: Sequence[str] = (),
) -> EvalResult:
    """Evaluate the plan's conditions on lmms-eval tasks and write the table, chart and report.

    Args:
        plan: the plan YAML.
        tasks: lmms-eval task names (``pope``, ``textvqa_val``, or the local ``embedlens_pope`` ...).
        conditions: condition names of the plan; ``baseline`` is always run first (the paired
            differences are to it). Default: ``baseline`` and every condition of the plan.
        limit: documents per task (lmms-eval's ``--limit``: a count, or a fraction below 1).
        out_dir: the run folder (default: the plan's ``output.dir`` + ``_eval``).
        batch_size: prompts per engine run (default: the plan's).
        source: replaces the plan model's source.
        device: replaces the plan model's device (e.g. ``cuda``).
        progress: called with a line of text for the console as each condition starts (and once with where data sets are cached).
        resume: `out_dir` holds a finished eval of the same plan, tasks, conditions and limit: return it as it is.
        overwrite: replace what `out_dir` holds (an unfinished or finished `embedlens run`, another eval).
        overrides: ``KEY=VALUE`` plan keys set before validation (``--set``), recorded in the manifest.

    The run folder follows `embedlens run`'s rules (`eval_folder`): an unfinished run, a finished run's
    results and a multi-model run are never deleted without `overwrite`; an earlier eval in the folder is
    replaced, as a second `run` replaces the first.

    Raises:
        BenchmarkError: bad tasks, conditions or limit; PlanError: the plan; RunFolderError: the folder.
    """
    from embedlens.files import RunLock, check_output, claim, os_error

    tasks = parse_list(list(tasks), "--tasks")
    _check_limit(limit)
    from embedlens.plan import load_plan

    loaded = load_plan(plan, overrides=tuple(overrides))  # the plan's own errors before anything heavy
    out = check_output(out_dir if out_dir is not None else default_output(str(loaded.output_dir)))  # '' is refused, not '.'
    wanted = parse_list(list(conditions), "--conditions") if conditions is not None else None
    if wanted is not None:
        known = [*loaded.plan.conditions, "baseline", "none"]
        for c in wanted:
            if c not in known:
                raise UnknownNameError.make(f"condition of plan {plan}", c, [*loaded.plan.conditions, "baseline"])
        wanted = ["baseline"] + [c for c in wanted if c not in ("baseline", "none")]
    else:
        wanted = ["baseline", *loaded.plan.conditions]
    task_manager = _task_manager(tasks)
    claim(out, kind="eval")
    try:
        with RunLock(out):
            done = eval_folder(out, str(plan), tasks, wanted, limit, resume, overwrite, overrides=loaded.overrides)
            if done is not None:
                return done
            return _run_locked(str(plan), tasks, wanted, limit, out, batch_size, source, device, task_manager, progress,
                               tuple(overrides))
    except OSError as e:
        raise os_error(e, "write", out) from None


def _read_json(out: Path, name: str) -> Any:
    from embedlens.files import contained

    path = contained(out, name)
    if path is None or path.stat().st_size > 64 << 20:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError, OSError):
        return None


def eval_folder(out: Path, plan: str, tasks: Sequence[str], conditions: Sequence[str], limit, resume: bool,
                overwrite: bool, overrides: dict | None = None) -> EvalResult | None:
    """Decide what an eval may do with its claimed, locked folder, by `embedlens run`'s rules.

    - an unfinished `embedlens run` (``checkpoint.safetensors``): refused unless `overwrite` (eval cannot
      resume it: that is ``embedlens run --resume``);
    - a finished `embedlens run` (its manifest and tables), or a multi-model run: refused unless `overwrite`;
    - a finished eval: with `resume`, returned as it is when it is of the same plan, tasks, conditions and
      limit (refused when not); otherwise replaced, as `run` replaces an earlier run of its folder.

    Returns:
        The finished eval to return, or None to evaluate (the folder cleared of earlier results).

    Raises:
        RunFolderError: naming the folder, what it holds and the flag that would allow it.
    """
    from embedlens.files import MARKER, RunFolderError, _read_marker
    from embedlens.plan.store import CHECKPOINT, clear_run

    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite: give one (continue what the folder holds, or replace it)")
    manifest = _read_json(out, "manifest.json")
    manifest = manifest if isinstance(manifest, dict) else None
    marker = _read_marker(out / MARKER) or {}
    if overwrite:
        clear_run(out)
        return None
    if (out / CHECKPOINT).is_file() or (out / CHECKPOINT).is_symlink():
        raise RunFolderError(
            f"{out} holds an unfinished `embedlens run` ({CHECKPOINT} and its parts); eval leaves it alone: continue it with "
            f"`embedlens run PLAN --output {out} --resume`, give eval another --output, or discard the run with --overwrite")
    if manifest is not None and manifest.get("kind") != "eval" or marker.get("kind") == "runs":
        what = "a multi-model run" if marker.get("kind") == "runs" else "the results of an `embedlens run` (manifest.json and its tables)"
        raise RunFolderError(f"{out} holds {what}; eval would delete them: give eval another --output (default: the plan's "
                             "output.dir + _eval), or replace them with --overwrite")
    if manifest is not None and resume:
        want = {"plan": plan, "tasks": list(tasks), "conditions": list(conditions), "limit": limit}
        differ = [f"{k} {manifest.get(k)!r} (now {v!r})" for k, v in want.items() if manifest.get(k) != v]
        if (manifest.get("overrides") or {}) != (overrides or {}):  # --set: another plan
            differ.append(f"overrides {manifest.get('overrides') or {}!r} (now {overrides or {}!r})")
        if differ:
            raise RunFolderError(f"{out}: the finished eval there has {', '.join(differ)}; --resume returns an eval of the same "
                                 "plan, tasks, conditions and limit: replace it with --overwrite, or give another --output")
        return _finished(out, manifest)
    clear_run(out)
    return None


def _finished(out: Path, manifest: dict) -> EvalResult:
    """The finished eval in `out`, read back from its summary and manifest."""
    from embedlens.files import contained

    summary = _read_json(out, "summary.json")
    bench = summary.get("benchmarks") if isinstance(summary, dict) else None
    rows = bench.get("rows") if isinstance(bench, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        from embedlens.files import RunFolderError

        raise RunFolderError(f"{out / 'summary.json'}: not the summary of a finished eval; start again with --overwrite")
    tables = manifest.get("tables") if isinstance(manifest.get("tables"), dict) else {}
    figures = manifest.get("figures") if isinstance(manifest.get("figures"), list) else []
    report = contained(out, "report.html")
    return EvalResult(out_dir=out, rows=rows, tables={k: out / v for k, v in tables.items() if isinstance(v, str) and contained(out, v)},
                      figures=[out / f for f in figures if isinstance(f, str) and contained(out, f)], report=report)


def datasets_cache() -> str:
    """Where lmms-eval caches the data sets it reads: ``LMMS_EVAL_DATASETS_CACHE``, else Hugging Face datasets'
    ``HF_DATASETS_CACHE`` (default ``$HF_HOME/datasets``, ``~/.cache/huggingface/datasets``), as lmms-eval
    resolves it; outside the run folder, so that every eval shares one copy of a benchmark."""
    import os

    def expand(p: str) -> str:
        return os.path.expanduser(os.path.expandvars(p))

    explicit = os.environ.get("LMMS_EVAL_DATASETS_CACHE", "").strip()
    if explicit:
        return expand(explicit)
    home = expand(os.environ.get("HF_HOME", "~/.cache/huggingface"))
    return expand(os.environ.get("HF_DATASETS_CACHE", os.path.join(home, "datasets")))


def _task_manager(tasks: Sequence[str]):
    """lmms-eval's task index with embedlens's local tasks; lmms-eval's own only when a task needs them
    (indexing its ~2000 task files takes a while)."""
    from lmms_eval.tasks import TaskManager

    from embedlens.lmms.tasks import LOCAL_TASKS, TASKS_DIR

    own = all(t in LOCAL_TASKS for t in tasks)
    tm = TaskManager("WARNING", include_path=str(TASKS_DIR), include_defaults=not own)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        hints = "; ".join(
            f"{t!r}" + (f" (did you mean: {', '.join(m)}?)" if (m := difflib.get_close_matches(t, tm.all_tasks, n=3, cutoff=0.6)) else "")
            for t in unknown
        )
        raise BenchmarkError(
            f"--tasks: unknown lmms-eval task(s) {hints}; `python -m lmms_eval tasks list` lists the "
            f"{len(tm.all_tasks)} tasks; embedlens's local ones: {', '.join(LOCAL_TASKS)}"
        )
    return tm


def _run_locked(plan, tasks, conditions, limit, out, batch_size, source, device, task_manager, progress, overrides=()) -> EvalResult:
    from lmms_eval.evaluator import simple_evaluate

    from embedlens.lmms.bridge import Bridge
    from embedlens.lmms.model import EmbedLensLMM
    from embedlens.lmms.plugin import register

    started = time.time()
    if progress is not None:  # not in the run folder: one copy of a benchmark serves every eval
        progress(f"data sets: lmms-eval caches them in {datasets_cache()}, not in {out} "
                 "(set LMMS_EVAL_DATASETS_CACHE or HF_DATASETS_CACHE to move it)")
    register()
    bridge = Bridge.load(plan, source=source, device=device, batch_size=batch_size, overrides=overrides)
    for c in conditions:
        bridge.check_condition(c)
    seed = bridge.prepared.loaded.plan.seed
    result = EvalResult(out_dir=out)
    scores: dict[str, dict[str, dict[str, float]]] = {}  # condition -> task -> metric -> value
    per_sample: dict[tuple[str, str, str], dict[Any, float]] = {}  # (condition, task, metric) -> doc -> score
    for cond in conditions:
        if progress is not None:
            progress(f"evaluating {cond}: {', '.join(tasks)} ...")
        lm = EmbedLensLMM(bridge=bridge, condition=cond)
        res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager, limit=limit, bootstrap_iters=0,
                              log_samples=True, verbosity="WARNING", random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed)
        if res is None:
            raise BenchmarkError("lmms-eval returned no results (a distributed rank other than 0?)")
        scores[cond] = {}
        for task in tasks:
            vals = {_metric(k): v for k, v in (res["results"].get(task) or {}).items()
                    if k != "alias" and "_stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
            scores[cond][task] = {k: float(v) for k, v in vals.items()}
            for s in (res.get("samples") or {}).get(task, []):
                for metric in vals:
                    score = _sample_score(s.get(metric))
                    if score is not None:
                        per_sample.setdefault((cond, task, metric), {})[s["doc_id"]] = score
                        result.samples.append({"task": task, "condition": cond, "doc_id": s["doc_id"], "metric": metric,
                                               "score": score, "response": _response(s)})
        result.raw[cond] = {k: v for k, v in res.items() if k != "samples"}
    means = {t: mean_aggregated(result.raw["baseline"], t) for t in tasks}
    result.rows = table_rows(scores, per_sample, conditions, means)
    _write(result, bridge, plan, tasks, conditions, limit, started)
    return result


def _metric(key: str) -> str:
    return key.split(",", 1)[0]


def _sample_score(value) -> float | None:
    """A logged sample's score: a number, or POPE-style ``{"score": ...}``; None when there is none."""
    if isinstance(value, dict):
        value = value.get("score")
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _response(sample: dict) -> str:
    resp = sample.get("filtered_resps")
    if isinstance(resp, list) and len(resp) == 1 and isinstance(resp[0], str):
        return resp[0]
    return json.dumps(resp, default=str)


def mean_aggregated(results: dict, task: str) -> set[str]:
    """The task's metrics that lmms-eval aggregates with its ``mean`` (from the results' task config)."""
    out = set()
    for entry in ((results.get("configs") or {}).get(task) or {}).get("metric_list") or []:
        agg = entry.get("aggregation") if isinstance(entry, dict) else None
        if (agg if isinstance(agg, str) else getattr(agg, "__name__", "")) == "mean":
            out.add(entry.get("metric"))
    return out


def _per_sample_mean(scores: dict, per_sample: dict, conditions: Sequence[str], task: str, metric: str) -> bool:
    """The metric is the mean of its logged per-sample scores under every condition, and those scores are not
    all one value (where they are, e.g. all 0, precision and accuracy are indistinguishable from them)."""
    seen = set()
    for cond in conditions:
        per = per_sample.get((cond, task, metric))
        if not per or not _is_mean(per, scores.get(cond, {}).get(task, {}).get(metric)):
            return False
        seen |= set(per.values())
    return len(seen) > 1


def table_rows(scores: dict, per_sample: dict, conditions: Sequence[str], means: dict[str, set[str]] | None = None) -> list[dict[str, Any]]:
    """The task x condition x metric rows with differences to the baseline.

    The paired difference (over the documents both logged) is given where the metric is a mean of
    per-sample scores: lmms-eval aggregates it with ``mean`` (`means`: task -> metrics), or its value is the
    mean of its logged scores under every condition and those scores vary (a task-defined accuracy, not
    its precision or F1).

    Example:
        >>> scores = {"baseline": {"t": {"acc": 0.5}}, "prune": {"t": {"acc": 0.25}}}
        >>> per = {("baseline", "t", "acc"): {0: 1.0, 1: 0.0, 2: 1.0, 3: 0.0}, ("prune", "t", "acc"): {0: 0.0, 1: 0.0, 2: 1.0, 3: 0.0}}
        >>> [(r["condition"], r["diff"], r["paired_diff"], r["paired_n"]) for r in table_rows(scores, per, ["baseline", "prune"])]
        [('baseline', 0.0, 0.0, 4), ('prune', -0.25, -0.25, 4)]
    """
    rows = []
    base = scores.get("baseline", {})
    means = means or {}
    for cond in conditions:
        for task, metrics in scores.get(cond, {}).items():
            for metric, value in metrics.items():
                b = base.get(task, {}).get(metric)
                row = {"task": task, "condition": cond, "metric": metric, "value": value, "baseline": b,
                       "diff": (value - b) if b is not None else None, "paired_diff": None, "paired_sem": None, "paired_n": 0}
                mine, ref = per_sample.get((cond, task, metric)), per_sample.get(("baseline", task, metric))
                paired = metric in means.get(task, set()) or _per_sample_mean(scores, per_sample, conditions, task, metric)
                if mine and ref and paired:
                    docs = sorted(set(mine) & set(ref), key=str)
                    d = [mine[k] - ref[k] for k in docs]
                    n = len(d)
                    mean = sum(d) / n
                    sem = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else None
                    row.update(paired_diff=mean, paired_sem=sem, paired_n=n)
                rows.append(row)
    return rows


def _is_mean(per_doc: dict, value: float | None) -> bool:
    return value is not None and bool(per_doc) and abs(sum(per_doc.values()) / len(per_doc) - value) <= 1e-9 * max(1.0, abs(value))


# -- files -----------------------------------------------------------------------------------------------
def _write_table(out: Path, name: str, rows: list[dict[str, Any]], columns: Sequence[str]) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embedlens.files import write_bytes, write_text

    cols = {c: [r.get(c) for r in rows] for c in columns}
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pydict(cols), buf)
    write_bytes(out / f"{name}.parquet", buf.getvalue())
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
    write_text(out / f"{name}.csv", text.getvalue())
    return {"parquet": out / f"{name}.parquet", "csv": out / f"{name}.csv"}


def _write(result: EvalResult, bridge, plan: str, tasks, conditions, limit, started: float) -> None:
    import platform

    from embedlens.files import json_text, safe_dir, write_text
    from embedlens.lmms.report import benchmarks_chart, benchmarks_html
    from embedlens.plan.finish import _versions
    from embedlens.plan.preparation import plan_hash
    from embedlens.report import write_report

    out = result.out_dir
    result.tables[TABLE] = _write_table(out, TABLE, result.rows, COLUMNS)["parquet"]
    result.tables[SAMPLES_TABLE] = _write_table(out, SAMPLES_TABLE, result.samples,
                                                ("task", "condition", "doc_id", "metric", "score", "response"))["parquet"]
    fig_dir = safe_dir(out, "figures")
    from embedlens.plan.effects import matched_controls

    controls = set(matched_controls(list(bridge.conditions.values())).values())
    chart = benchmarks_chart(result.rows, conditions, fig_dir / "benchmarks.png", controls=controls)
    if chart is not None:
        result.figures.append(chart)
    import importlib.metadata as md

    versions = _versions()
    versions["lmms_eval"] = md.version("lmms_eval")
    adapter = bridge.adapter
    counts = result.raw.get("baseline", {}).get("n-samples", {})
    n_docs = {t: int((counts.get(t) or {}).get("effective", 0)) for t in tasks}
    summary = {
        "data": {"samples": sum(n_docs.values()), "used": sum(n_docs.values()), "skipped": [], "converted": 0},
        "benchmarks": {"tasks": list(tasks), "conditions": list(conditions), "limit": limit, "documents": n_docs,
                       "rows": result.rows},
    }
    manifest = {
        "kind": "eval",
        "plan": str(plan),
        "plan_hash": plan_hash(bridge.prepared.loaded),
        "overrides": bridge.prepared.loaded.overrides,  # --set KEY=VALUE applied to the plan
        "seed": bridge.prepared.loaded.plan.seed,
        "model": {"name": bridge.prepared.model_name, "source": adapter.source, "adapter": adapter.name,
                  "class": type(adapter.model).__name__},
        "device": str(adapter.device),
        "versions": versions,
        "n_samples": sum(n_docs.values()),
        "tasks": list(tasks),
        "conditions": list(conditions),
        "limit": limit,
        "batch_size": bridge.batch_size,
        "tables": {TABLE: f"{TABLE}.parquet", SAMPLES_TABLE: f"{SAMPLES_TABLE}.parquet"},
        "figures": [str(f.relative_to(out)) for f in result.figures],
        "platform": platform.platform(),
        "datasets_cache": datasets_cache(),
    }
    write_text(out / "summary.json", json_text(summary, indent=2, default=str))  # NaN -> null: standard JSON
    section = benchmarks_html(out, summary["benchmarks"], manifest["figures"])
    shown = {**manifest, "figures": []}  # the chart is in the benchmark section, not again under "other figures"
    result.report = write_report(out, shown, extra_sections=[("benchmarks", "Benchmarks (lmms-eval)", section)])
    write_text(out / "manifest.json", json_text(manifest, indent=2))
    write_text(out / "run_log.json", json.dumps({"seconds": round(time.time() - started, 3)}, indent=2))

