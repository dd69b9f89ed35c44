"""Running a batch's baseline and conditions and comparing them."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from embedlens.adapters.base import resolve_path

if TYPE_CHECKING:
    from embedlens.data import Sample
    from embedlens.interventions.condition import Condition
    from embedlens.interventions.engine import Engine, Outcome
    from embedlens.metrics.base import Metric


def prefill_flops(outcome: "Outcome") -> torch.Tensor:
    """Estimated LLM prefill FLOPs per sample (`[batch]`, float64).

    Per layer: 2 x (tokens present) x (weights of the layer's linear maps), plus
    4 x (query-key pairs attended) x (heads x head_dim) for scores and values
    (none in a linear-attention layer, whose scan is linear in its tokens).
    The vision tower and the head are left out (no intervention changes them).
    """
    eng = outcome.engine
    total = torch.zeros(outcome.counts["rows"].shape[1], dtype=torch.float64)
    for i, layer in enumerate(eng.layers):
        weights = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
        total += 2.0 * outcome.counts["rows"][i].double() * weights
        if i in eng.linear:
            continue  # a linear-attention layer's scan is linear in its rows: no query-key pairs
        attn = eng.mixers[i]
        width = attn.config.num_attention_heads * attn.head_dim
        total += 4.0 * outcome.counts["keys"][i].double() * width
    return total


def prompt_only(samples: Sequence["Sample"]) -> list["Sample"]:
    """The samples without their answers (the answer is scored as a continuation)."""
    return [dataclasses.replace(s, answer=None) for s in samples]


def compare(
    engine: "Engine",
    samples: Sequence["Sample"],
    conditions: Sequence["Condition"],
    metrics: Sequence["Metric"],
    *,
    padding_side: str = "left",
    groups: Callable | None = None,
    touched: dict[str, list] | None = None,
) -> dict[str, list]:
    """Run the baseline and each condition on one batch and apply the metrics.

    The batch is the samples' prompts without answers; answers and candidates
    are scored as continuations, and generation continues from the prompt.

    Args:
        touched: when given, each condition's touched visual tokens are appended to it
            (`embedlens.interventions.touched.touched_rows`: what token maps draw).

    Returns:
        a table: one row per (sample, condition), columns ``sample``,
        ``condition`` and each metric's columns.
    """
    adapter = engine.adapter
    batch = adapter.encode(prompt_only(samples), padding_side=padding_side)
    cache = any(m.needs_cache for m in metrics)
    base = engine.run(batch, cache=cache, groups=groups)
    groups = base.context.groups  # the batch's groups, labelled once for every condition
    table: dict[str, list] = {"sample": [], "condition": []}
    for cond in conditions:
        out = engine.run(batch, cond.interventions, condition=cond.name, groups=groups, embeds=base.context.embeds, cache=cache)
        cols: dict[str, list] = {}
        for m in metrics:
            cols.update(m.compute(base, out, samples))
        if touched is not None:
            from embedlens.interventions.touched import touched_rows

            for k, v in touched_rows(out, cond.interventions, cond.name).items():
                touched.setdefault(k, []).extend(v)
        table["sample"] += [s.id for s in samples]
        table["condition"] += [cond.name] * len(samples)
        for k, v in cols.items():
            table.setdefault(k, []).extend(v)
    return table
