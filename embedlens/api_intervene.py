"""`intervene`: conditions on samples in memory, with a plan's pairing and statistics, as DataFrames.

It runs what a plan's run does for its conditions (`embedlens.plan.passes`), without writing files:
the partition's and the conditions' fit passes over all samples, the check that every matched control's
pool can serve it, then per batch the baseline and every condition (`embedlens.metrics.compare`) with
the plan's seeds; the effect summary (`embedlens.plan.effects`) and the paired tests
(`embedlens.plan.conclusions`) are the plan's own code.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from embedlens.errors import EmbedLensError, InputError

if TYPE_CHECKING:
    import pandas as pd

    from embedlens.adapters.base import Adapter
    from embedlens.data import Record, Sample
    from embedlens.interventions.condition import Condition
    from embedlens.metrics.base import Metric
    from embedlens.synthetic import SyntheticSpec

__all__ = ["TABLES", "intervene"]

#: The tables `intervene` can return (a plan's run writes the same names).
TABLES = ("effects", "effects_summary", "effect_tests", "touched_tokens")


def _condition(name: str, spec: Any) -> "Condition":
    """One condition from what a notebook has at hand: interventions, plain functions, plan-style dicts."""
    from embedlens.interventions.base import Intervention
    from embedlens.interventions.condition import Condition
    from embedlens.interventions.hook import Hook

    if not isinstance(name, str) or not name or name == "baseline":
        raise InputError(f"conditions: {name!r} is not a condition name ('baseline' is the unmodified run every condition is compared with)")
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise InputError(f"conditions[{name!r}]: no interventions")
    out: list[Intervention] = []
    for i, item in enumerate(items):
        if isinstance(item, Intervention):
            out.append(item)
        elif isinstance(item, Mapping):
            if set(item) - {"name", "params"} or "name" not in item:
                raise InputError(f"conditions[{name!r}][{i}]: a dict is a plan entry {{name: ..., params: {{...}}}}; got keys {sorted(item)}")
            out += Condition.build(name, [item]).interventions
        elif isinstance(item, type):
            raise InputError(f"conditions[{name!r}][{i}]: {item.__name__} is a class; give an instance, e.g. {item.__name__}(...)")
        elif callable(item):
            out.append(Hook(item))  # fn(ctx) before the first layer
        else:
            raise InputError(f"conditions[{name!r}][{i}]: expected an intervention (e.g. Prune(tokens='dead')), embedlens.Hook(fn, site=...), "
                             f"a function fn(ctx) or a plan entry {{name: ..., params: ...}}; got {type(item).__name__}")
    return Condition(name, out)


def matched_control(cond: "Condition", seed: int, params: Mapping[str, Any]) -> "Condition | None":
    """The plan's matched random control for a one-intervention prune/ablate condition (None for others):
    as many tokens as its target, drawn at random (`prune_random_matched` / `ablate_random_matched`)."""
    from embedlens.interventions.ablate import Ablate, AblateRandomMatched
    from embedlens.interventions.condition import Condition
    from embedlens.interventions.prune import Prune, PruneRandomMatched

    if len(cond.interventions) != 1:
        return None
    iv = cond.interventions[0]
    if isinstance(iv, Prune):
        cls, kw = PruneRandomMatched, {"mode": iv.mode}
    elif isinstance(iv, Ablate) and not isinstance(iv, AblateRandomMatched):
        cls, kw = AblateRandomMatched, {"value": iv.value, "site": iv.site, "mean_over": iv.mean_over, "word": iv.word}
    else:
        return None
    kw = {"target": iv.tokens, "seed": seed, "if_empty": iv.if_empty, **kw, **params}
    try:
        return Condition(f"{cond.name}_random", [cls(**kw)])
    except (TypeError, EmbedLensError) as e:
        raise InputError(f"controls: the matched control of {cond.name!r} ({cls.registered_name}): {e}") from None


def _metrics(metrics: Any) -> "list[Metric]":
    from embedlens.metrics.base import Metric
    from embedlens.registry import metrics as registry

    items = [metrics] if isinstance(metrics, (str, Metric, Mapping)) else list(metrics)
    if not items:
        raise InputError("metrics: give at least one metric (e.g. 'next_token_kl'); conditions are compared with the baseline through them")
    out = []
    for i, m in enumerate(items):
        if isinstance(m, Metric):
            out.append(m)
            continue
        name, params = (m, {}) if isinstance(m, str) else (m.get("name"), dict(m.get("params") or {})) if isinstance(m, Mapping) else (None, None)
        if name is None:
            raise InputError(f"metrics[{i}]: expected a metric name, {{name: ..., params: ...}} or a Metric; got {m!r}")
        try:
            out.append(registry.get(name)(**params))
        except TypeError as e:
            raise InputError(f"metrics[{i}] ({name}): {e}") from None
    return out


def _breakdown(samples: "list[Sample]", breakdown: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """``{field: {sample id: value}}`` the accuracies are broken down by: the plan's default rule, or the fields given."""
    from embedlens.plan.conclusions import DEFAULT_BREAKDOWN

    have = {k for s in samples for k in s.meta}
    if breakdown is None:
        fields = [f for f in DEFAULT_BREAKDOWN if f in have][:1]
    else:
        fields = [breakdown] if isinstance(breakdown, str) else list(dict.fromkeys(breakdown))
        for f in fields:
            if f not in have:
                raise InputError(f"breakdown: no sample has a field {f!r}; fields the samples have: {', '.join(sorted(have)) or 'none'}")
            if not all(isinstance(s.meta.get(f), (str, int, float, bool)) or s.meta.get(f) is None for s in samples):
                raise InputError(f"breakdown: field {f!r} holds lists or mappings; a breakdown needs one value per sample")
    return {f: {s.id: s.meta.get(f) for s in samples} for f in fields}


def _validated(where: str, schema: type, values: Mapping[str, Any]):
    """A plan block given as a dict, checked by the plan's schema; errors name the key as a plan error would."""
    from pydantic import ValidationError

    try:
        return schema(**values)
    except ValidationError as e:
        err = e.errors()[0]
        msg = "unknown key" if err["type"] == "extra_forbidden" else f"{err['msg']}; got {err.get('input')!r}"
        raise InputError(f"{where}.{'.'.join(map(str, err['loc']))}: {msg}") from None


def intervene(
    model: "Adapter | str",
    samples: "Sequence[Sample] | Sequence[Record] | SyntheticSpec | str",
    conditions: Mapping[str, Any],
    *,
    metrics: Any = ("next_token_kl",),
    controls: bool | Mapping[str, Any] = False,
    partition: dict[str, Any] | None = None,
    batch_size: int = 4,
    padding_side: str = "right",
    seed: int = 0,
    report: dict[str, Any] | None = None,
    table: str = "effects",
) -> "pd.DataFrame":
    """Run conditions on samples in memory and return their effects as a DataFrame, as a plan's run would.

    The same pairing and statistics as a plan with these conditions, metrics, partition, batch size,
    padding side, seed and ``report:`` settings: the tables are those a run writes (``effects``: one row
    per sample and condition; ``effects_summary``: mean, standard error, n and matched control per
    condition and metric; ``effect_tests``: the paired comparisons with the baseline and the matched
    control; ``touched_tokens``), value for value.

    Args:
        model: a loaded adapter (`embedlens.load_model`) or a source string.
        samples: `Sample` objects, `Record` objects, a `SyntheticSpec` or a JSONL/CSV prompts file.
        conditions: ``{name: interventions}``; each a list (or one) of: an intervention object
            (``Prune(tokens="dead")``), an `embedlens.Hook` (a function at a named site), a plain
            function ``fn(ctx)`` (run before the first layer, as `Hook` without a site), or a plan entry
            ``{"name": "prune", "params": {...}}``.
        metrics: metric names, ``{"name": ..., "params": ...}`` dicts or `Metric` objects (default: the
            next-token KL divergence, which needs no answers).
        controls: True adds, after each condition that is one ``prune`` or ``ablate``, its matched random
            control ``NAME_random`` (``prune_random_matched`` / ``ablate_random_matched`` with the condition's
            tokens as target, `seed` as seed); a dict adds them with these parameters too (e.g.
            ``{"exclude_target": False}``). Controls given in `conditions` pair as in a plan either way.
        partition: a plan's ``partition:`` block as a dict (needed by selections naming ``dead``, ``sink``, ...).
        batch_size: samples per forward pass.
        padding_side: "left" or "right" (the plan's ``data.padding_side``).
        seed: the plan's ``seed``.
        report: the plan's ``report:`` block (``breakdown``, ``resamples``, ``confidence``, ...).
        table: which table to return, one of `TABLES`.

    Returns:
        The table. ``df.attrs["summary"]`` holds what a run's ``summary.json`` says of the effects
        (``effects``, ``effects_sem``, ``controls``, ``statistics``); ``df.attrs["tables"]`` the tables'
        names; `intervene` with another `table=` returns another one.

    Raises:
        InputError: a bad condition, metric, argument, or a matched control whose pool is too small
            (naming the condition and the sample).
        InterventionError: an intervention's error, naming the condition.

    Example:
        >>> import embedlens
        >>> from embedlens.interventions.prune import Prune
        >>> df = embedlens.intervene("tiny:llava-clip", embedlens.SyntheticSpec(n=2, size=32),
        ...                          {"top_rows": [Prune(tokens="visual and row < 2")]}, controls=True)
        >>> df[["sample", "condition"]].values.tolist()
        [['syn-0-00000', 'top_rows'], ['syn-0-00001', 'top_rows'], ['syn-0-00000', 'top_rows_random'], ['syn-0-00001', 'top_rows_random']]
        >>> df.attrs["summary"]["controls"]
        {'top_rows': 'top_rows_random'}
    """
    import pyarrow as pa
    import torch
    from embedlens.adapters import Adapter, load_model
    from embedlens.api import _as_samples  # one sample reader for both entry points
    from embedlens.groups import Partition
    from embedlens.interventions.engine import Engine, _lookup
    from embedlens.metrics.compare import compare
    from embedlens.plan import conclusions
    from embedlens.plan.effects import EffectSummary, matched_controls, summary_rows
    from embedlens.plan.pools import outside_target_draws, short_samples
    from embedlens.plan.schema import PartitionSpec, ReportSpec
    from embedlens.plan.store import _plain, arrow_table, is_empty
    from embedlens.tracing import collect

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size: expected a positive integer; got {batch_size!r}")
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side: expected 'left' or 'right'; got {padding_side!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**32 - 1:
        raise InputError(f"seed: expected an integer in 0..2**32-1; got {seed!r}")
    if table not in TABLES:
        raise InputError(f"table: expected one of {', '.join(TABLES)}; got {table!r}")
    if not isinstance(conditions, Mapping) or not conditions:
        raise InputError("conditions: expected {name: [interventions]} with at least one condition, e.g. {'prune_dead': [Prune(tokens='dead')]}")
    if not isinstance(controls, (bool, Mapping)):
        raise InputError(f"controls: expected True/False or a dict of the controls' parameters; got {type(controls).__name__}")
    if report is not None and not isinstance(report, Mapping):
        raise InputError(f"report: expected a dict of the plan's report: keys; got {type(report).__name__}")
    report = dict(report or {})
    breakdown = report.pop("breakdown", None)
    spec = _validated("report", ReportSpec, report)
    if partition is not None and not isinstance(partition, Mapping):
        raise InputError(f"partition: expected a dict of the plan's partition: keys; got {type(partition).__name__}")
    part = Partition(**_validated("partition", PartitionSpec, partition).model_dump()) if partition is not None else None

    built = []
    for name, items in conditions.items():
        cond = _condition(name, items)
        built.append(cond)
        extra = matched_control(cond, seed, controls if isinstance(controls, Mapping) else {}) if controls is not False else None
        if extra is not None:
            if extra.name in conditions:
                raise InputError(f"controls: the matched control of {name!r} would be named {extra.name!r}, which is already a condition")
            built.append(extra)
    mets = _metrics(metrics)
    adapter = model if isinstance(model, Adapter) else load_model(model) if isinstance(model, str) else None
    if adapter is None:
        raise InputError(f"model: expected a loaded adapter or a source string (zoo:NAME, tiny:NAME, a folder); got {type(model).__name__}")
    if part is not None:
        part.check(adapter)
    for cond in built:
        cond.check(adapter)
    items = _as_samples(samples, adapter)
    groups = _breakdown(items, breakdown)
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]

    def stream(sites):
        for chunk in chunks:
            batch = adapter.encode(chunk, padding_side=padding_side)
            yield batch, (collect(adapter, batch, sites) if sites else {})

    # the plan's fit passes, in its order and with its seed: the partition's anchors, then the conditions' statistics
    torch.manual_seed(seed)
    if part is not None and part.needs_fit:
        part.fit_stream(adapter, stream(part.fit_sites(adapter)))
    for cond in built:
        if cond.needs_fit:
            cond.fit_stream(adapter, stream(cond.fit_sites(adapter)))
    draws = outside_target_draws(built)
    if draws:  # a matched control its pool cannot serve: refused before the main pass, as a plan does
        for batch, acts in stream(part.sites(adapter) if part is not None else []):
            labels = _lookup(part.label(adapter, batch, acts=acts)) if part is not None else None
            for cname, i, iv in draws:
                short = short_samples(batch, labels, iv)
                if short:
                    sid, nt, npool = short[0]
                    raise InputError(f"conditions[{cname!r}][{i}] ({type(iv).registered_name}): sample {sid!r} has {nt} target tokens "
                                     f"({iv.target!r}) but only {npool} pool tokens ({iv.pool!r}) outside the target to draw a matched "
                                     "control from; use controls={'exclude_target': False} (draws from the whole pool) or a smaller target")

    engine = Engine(adapter)
    summary = EffectSummary()
    effects, touched = [], []
    for b, chunk in enumerate(chunks):
        torch.manual_seed(seed * 1_000_003 + b)  # the plan's per-batch seed
        seen: dict[str, list] = {}
        rows = compare(engine, chunk, built, mets, padding_side=padding_side, groups=part, touched=seen)
        summary.add({k: _plain(v) for k, v in rows.items()})
        effects.append(arrow_table(rows))
        if not is_empty(seen):
            touched.append(arrow_table(seen))
    tables = {"effects": pa.concat_tables(effects, promote_options="permissive")}
    if touched:
        tables["touched_tokens"] = pa.concat_tables(touched, promote_options="permissive")
    stats, pairs = summary.stats(), matched_controls(built)
    tables["effects_summary"] = arrow_table(summary_rows(stats, pairs))
    descriptive = {c for m in mets for c in getattr(m, "descriptive", ())}
    concl = conclusions.analyse(tables["effects"].to_pydict(), tables["touched_tokens"].to_pydict() if touched else None, pairs, spec,
                                seed, groups, {}, descriptive=descriptive)
    tables["effect_tests"] = arrow_table(concl.rows)
    df = tables[table].to_pandas() if table in tables else pa.table({}).to_pandas()
    result = {"effects": summary.result(), "effects_sem": {c: {k: v["sem"] for k, v in cols.items()} for c, cols in stats.items()},
              "controls": pairs, "statistics": concl.headline()}
    df.attrs["summary"] = json.loads(json.dumps(result, default=str))
    df.attrs["tables"] = sorted(tables)
    return df
