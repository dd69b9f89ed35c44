"""What the token-reduction methods that act inside the LLM share: attention rows read at the layer they
need, per-image token groups, and the accounting of the tokens each layer holds.

A method that drops tokens between LLM layers (FastV, PyramidDrop, DART, SparseVLM) does not keep one number of
tokens: layer l computes on the `tokens_per_layer[l]` tokens present there. Each method states how its paper
counts that as one number (`Accounting.equivalent_tokens`, with its `rule`) and also gives the plain mean over
layers (`average_tokens`), so a sweep can put every method at the same budget and say how it was matched.

Every such method (`fastv_budget`, `pyramiddrop`, `dart`, `sparsevlm`, and `fastv`) has
``accounting(n_visual, n_layers) -> dict`` for one image of `n_visual` tokens in an `n_layers`-layer LLM, with
the keys of `Accounting`: ``budget``, ``tokens_per_layer``, ``equivalent_tokens``, ``average_tokens``, ``rule``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

from embedlens.attention import attention_rows
from embedlens.errors import InterventionError
from embedlens.reduction._rank import group_sizes, image_groups
from embedlens.reduction.budget import Budget

if TYPE_CHECKING:
    from embedlens.interventions.context import AttentionInput, Context, Rows


class ParametersOnly:
    """The checkpoint state of a method with nothing fitted: its constructor parameters (what it derives from them,
    and what one batch's run leaves behind, are rebuilt or overwritten, never saved)."""

    def state_dict(self) -> dict:
        from embedlens.registry import plugin_params

        return {p.name: getattr(self, p.name) for p in plugin_params(type(self))}


@dataclass(frozen=True)
class Accounting:
    """How many visual tokens of one image a method keeps, layer by layer, and how its paper counts them.

    Attributes:
        budget: the budget `keep` resolves to for this image (`Budget.counts`).
        tokens_per_layer: visual tokens of the image present in each LLM layer's input.
        equivalent_tokens: the one number the method's paper reports for this schedule (see `rule`).
        average_tokens: the mean of `tokens_per_layer` (what prefill cost scales with).
        rule: how `keep` became the schedule, and how `equivalent_tokens` is counted, in words.
    """

    budget: int
    tokens_per_layer: tuple[int, ...]
    equivalent_tokens: float
    average_tokens: float
    rule: str

    def as_dict(self) -> dict:
        out = asdict(self)
        out["tokens_per_layer"] = list(self.tokens_per_layer)
        return out


def make_accounting(budget: int, per_layer: Sequence[int], equivalent: float, rule: str) -> dict:
    """An `Accounting` as a plain dict (what `accounting()` of every in-LLM method returns)."""
    per_layer = tuple(int(c) for c in per_layer)
    return Accounting(int(budget), per_layer, float(equivalent), sum(per_layer) / max(len(per_layer), 1), rule).as_dict()


def check_accounting_args(n_visual: int, n_layers: int) -> None:
    if isinstance(n_visual, bool) or not isinstance(n_visual, int) or n_visual < 1:
        raise InterventionError(f"n_visual: expected a token count >= 1; got {n_visual!r}")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 2:
        raise InterventionError(f"n_layers: expected a layer count >= 2; got {n_layers!r}")


def scaled_layers(reference: Sequence[int], reference_depth: int, n_layers: int) -> list[int]:
    """A schedule's layers, given for a `reference_depth`-layer model, at the same relative depth of `n_layers`
    layers: ``round(l * n_layers / reference_depth)``, kept strictly increasing within 1..n_layers-1."""
    out: list[int] = []
    for layer in reference:
        v = min(max(int(round(layer * n_layers / reference_depth)), 1), n_layers - 1)
        if out and v <= out[-1]:
            v = out[-1] + 1
        if v > n_layers - 1:
            break
        out.append(v)
    return out


def attention_layers_near(layers: Sequence[int], adapter, lo: int, hi: int) -> list[int]:
    """Default stage `layers` moved onto attention layers on a hybrid model (Qwen3.5's Gated DeltaNet layers have
    no attention to rank by): each to the first attention layer at or after it within `lo`..`hi`, else the last
    one before it; kept strictly increasing (a layer two defaults land on is used once). Unchanged on a model
    without linear-attention layers. Layers a user names are not moved: the engine refuses a linear one by name.
    """
    from embedlens.attention import LINEAR, llm_layer_types

    if not getattr(adapter.paths, "linear_attn", ""):
        return list(layers)
    attends = [i for i, t in enumerate(llm_layer_types(adapter)) if t != LINEAR and lo <= i <= hi]
    if not attends:
        raise InterventionError(f"{adapter.name}: no attention layer in {lo}..{hi} to rank tokens by (the others are "
                                "linear-attention layers)")
    out: list[int] = []
    for layer in layers:
        v = next((a for a in attends if a >= layer), attends[-1])
        if not out or v > out[-1]:
            out.append(v)
    return out


def image_sizes(candidates: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """`[batch, seq + 1]` long: candidates per image, in the columns `Budget.keep_mask` counts them in (the last
    column, "not a candidate", as counted; `keep_mask` keeps none of it)."""
    return group_sizes(image_groups(candidates, image))


def query_attention(seen: "AttentionInput", queries: torch.Tensor, seq: int, home: torch.device) -> torch.Tensor:
    """Attention probabilities of some queries in one layer, over batch positions.

    Only the query rows asked for are computed (`embedlens.attention.attention_rows`), whatever attention
    implementation the model runs.

    Args:
        seen: the layer's attention input (`Context.probe_attention`).
        queries: `[batch, q]` long batch positions of the queries (each must be present in the layer).
        seq: the batch's sequence length.
        home: where the result goes (the engine's device).

    Returns:
        `[batch, heads, q, seq]` float, 0 at positions absent from the layer.
    """
    import torch

    rows: Rows = seen.rows
    index = rows.index.to(seen.hidden.device)
    qrow = (index[:, None, :] == queries.to(index.device)[:, :, None]).float().argmax(dim=-1)  # [batch, q]
    allowed = seen.allowed.gather(1, qrow[..., None].expand(-1, -1, seen.allowed.shape[2]))
    probs = attention_rows(seen.module, seen.hidden, seen.position_embeddings, qrow, allowed)
    probs = probs.to(home).masked_fill(~rows.valid[:, None, None, :], 0.0)  # [batch, heads, q, rows]
    full = torch.zeros(*probs.shape[:3], seq, device=home, dtype=probs.dtype)
    return full.scatter(3, rows.index[:, None, None, :].expand_as(probs), probs)


def top_per_sample(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """`[rows, seq]` bool: per row, the `k` (`[rows]` long, or an int) highest-scoring candidates, the earlier on
    ties (`Budget.keep_mask` with the whole row as one group)."""
    import torch

    k = k if isinstance(k, torch.Tensor) else torch.full(scores.shape[:1], k, dtype=torch.long, device=scores.device)
    return Budget(1).keep_mask(scores, candidates, torch.zeros_like(candidates, dtype=torch.long),
                               counts=lambda n: k[:, None].expand_as(n))


def drop_from(ctx: "Context", drop: torch.Tensor, layer: int) -> None:
    """Remove the `drop` tokens (`[batch, seq]` bool) from `layer` on (on the device; no host read)."""
    import torch

    ctx.exit = torch.where(drop, torch.minimum(ctx.exit, torch.full_like(ctx.exit, layer)), ctx.exit)
