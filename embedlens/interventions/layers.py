"""Layer-wise interventions: sublayer skipping, attention knockout, mid-layer
injection and withdrawal of image tokens."""

from __future__ import annotations

from typing import Literal, Union

from typing_extensions import TypedDict

from embedlens.attention import llm_layer_types, refuse_linear
from embedlens.errors import InterventionError
from embedlens.interventions.base import IfEmpty, Intervention, check_layer, parse_selection, require_nonempty
from embedlens.interventions.context import Context
from embedlens.interventions.select import SelectionSpec
from embedlens.registry import interventions


class SublayerRef(TypedDict):
    """A sublayer in explicit form: ``{layer: 3, sublayer: mlp}``."""

    layer: int
    sublayer: Literal["attn", "mlp"]


SublayerSpec = Union[float, SublayerRef]


def parse_sublayer(value, n_layers: int | None = None) -> tuple[int, str]:
    """`(layer, "attn"|"mlp")` from the study's float notation or the explicit form.

    ``n`` is the attention update of decoder layer n, ``n + 0.5`` its MLP update.

    Example:
        >>> parse_sublayer(1.5), parse_sublayer(2), parse_sublayer({"layer": 0, "sublayer": "attn"})
        ((1, 'mlp'), (2, 'attn'), (0, 'attn'))
        >>> parse_sublayer(1.3)
        Traceback (most recent call last):
        ...
        embedlens.errors.InterventionError: sublayer 1.3 is neither n (attention of layer n) nor n + 0.5 (its MLP)
    """
    if isinstance(value, dict):
        if set(value) != {"layer", "sublayer"} or value["sublayer"] not in ("attn", "mlp"):
            raise InterventionError(f"sublayer {value!r}: the explicit form is {{layer: N, sublayer: attn|mlp}}")
        layer, sub = value["layer"], value["sublayer"]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        frac = float(value) - int(value)
        if value < 0 or frac not in (0.0, 0.5):
            raise InterventionError(f"sublayer {value!r} is neither n (attention of layer n) nor n + 0.5 (its MLP)")
        layer, sub = int(value), ("mlp" if frac else "attn")
    else:
        raise InterventionError(f"sublayer {value!r}: give n / n + 0.5 or {{layer: N, sublayer: attn|mlp}}")
    if n_layers is not None:
        layer = check_layer(layer, n_layers, f"sublayer {value!r}")
    return layer, sub


def parse_layers(values: list[Union[int, str]], n_layers: int, param: str = "layers") -> set[int]:
    """Layer indices from ints and inclusive ranges ``"a-b"`` (e.g. Neo et al.'s 10-layer windows)."""
    out: set[int] = set()
    for v in values:
        if isinstance(v, str):
            lo, sep, hi = v.partition("-")
            if not sep or not lo.strip().isdigit() or not hi.strip().isdigit() or int(lo) > int(hi):
                raise InterventionError(f"{param}: {v!r} is not a layer or an inclusive range 'a-b'")
            for i in range(int(lo), int(hi) + 1):
                out.add(check_layer(i, n_layers, param))
        else:
            out.add(check_layer(v, n_layers, param))
    return out


@interventions.register("skip_sublayer")
class SkipSublayer(Intervention):
    """Zero the attention and/or MLP update of selected tokens in selected layers.

    The update is zeroed before the residual add; the tokens' keys and values
    are still computed and attended by others. In a linear-attention layer of a
    hybrid model (Qwen3.5's Gated DeltaNet) the "attention" sublayer is the
    DeltaNet mixer: its update is zeroed, and the tokens still write into the
    recurrent state that later tokens read. `sublayers` takes the study's
    notation (n = attention of layer n, n + 0.5 = its MLP) or
    ``{layer: n, sublayer: attn|mlp}``.

    Args:
        tokens: the tokens whose updates are zeroed.
        sublayers: ``n`` = the attention update of decoder layer n, ``n + 0.5`` = its MLP update, or
            ``{layer: n, sublayer: attn|mlp}``.
        if_empty: ``error`` (the default) when some sample's selection is empty, or ``noop`` to leave such
            samples unchanged.

    Example:
        >>> SkipSublayer(tokens="visual", sublayers=[0.5, 1]).targets
        [(0, 'mlp'), (1, 'attn')]
    """

    def __init__(self, tokens: SelectionSpec, sublayers: list[SublayerSpec], if_empty: IfEmpty = "error"):
        if not sublayers:
            raise InterventionError("sublayers: give at least one sublayer (n or n + 0.5)")
        self.tokens, self.sublayers, self.if_empty = tokens, sublayers, if_empty
        self.selection = parse_selection(tokens, "tokens")
        self.targets = sorted({parse_sublayer(s) for s in sublayers})

    def check(self, adapter) -> None:
        for s in self.sublayers:
            parse_sublayer(s, adapter.n_llm_layers)

    def setup(self, ctx: Context) -> None:
        self.check(ctx.adapter)
        self._mask = ctx.select(self.selection)
        require_nonempty(ctx, self._mask, "tokens", self.tokens, self.if_empty, what="")

    def zero_update(self, ctx: Context, layer: int, sublayer: str):
        return self._mask if (layer, sublayer) in self.targets else None


@interventions.register("attention_knockout")
class AttentionKnockout(Intervention):
    """Block attention from `source` queries to `target` keys in `layers`.

    `layers` takes indices and inclusive ranges (``["0-9"]`` for a 10-layer
    window). A query left with nothing to attend to gets a zero attention update.
    A hybrid model's linear-attention layers (Qwen3.5's Gated DeltaNet) have no
    attention to block and are refused by name, with the layers where knockout
    applies.

    Args:
        source: the queries that may not look.
        target: the keys they may not attend to.
        layers: decoder layers: indices and inclusive ranges such as ``"0-9"``.
        if_empty: ``error`` (the default) when some sample's selection is empty, or ``noop`` to leave such
            samples unchanged.

    Example:
        >>> AttentionKnockout(source="last", target="visual", layers=["0-1", 3]).layers
        ['0-1', 3]
    """

    def __init__(
        self,
        source: SelectionSpec,
        target: SelectionSpec,
        layers: list[Union[int, str]],
        if_empty: IfEmpty = "error",
    ):
        if not layers:
            raise InterventionError("layers: give at least one layer")
        self.source, self.target, self.layers, self.if_empty = source, target, layers, if_empty
        self.src_sel = parse_selection(source, "source")
        self.dst_sel = parse_selection(target, "target")

    def check(self, adapter) -> None:
        self._layers = parse_layers(self.layers, adapter.n_llm_layers)
        refuse_linear(self._layers, llm_layer_types(adapter), "attention_knockout.layers")

    def setup(self, ctx: Context) -> None:
        self.check(ctx.adapter)
        self._src = ctx.select(self.src_sel)
        self._dst = ctx.select(self.dst_sel)
        require_nonempty(ctx, self._src, "source", self.source, self.if_empty, what="")
        require_nonempty(ctx, self._dst, "target", self.target, self.if_empty, what="")

    def blocked(self, ctx: Context, layer: int):
        return (self._src, self._dst) if layer in self._layers else None


@interventions.register("inject_at_layer")
class InjectAtLayer(Intervention):
    """Mid-layer injection: image tokens enter the sequence at `layer`; text runs alone before.

    At `layer` the projector outputs enter at their original positions.

    ``layer: 0`` is the unmodified model.

    Args:
        layer: k: the tokens enter at decoder layer k (0 = the unmodified model).
        tokens: the tokens held back until layer k.
        if_empty: ``error`` (the default) when some sample's selection is empty, or ``noop`` to leave such
            samples unchanged.

    Example:
        >>> InjectAtLayer(layer=8).layer
        8
    """

    def __init__(self, layer: int, tokens: SelectionSpec = "image_span", if_empty: IfEmpty = "error"):
        self.layer, self.tokens, self.if_empty = layer, tokens, if_empty
        self.selection = parse_selection(tokens, "tokens")

    def check(self, adapter) -> None:
        self._k = check_layer(self.layer, adapter.n_llm_layers, "layer")

    def setup(self, ctx: Context) -> None:
        import torch

        self.check(ctx.adapter)
        sel = ctx.select(self.selection, within=ctx.roles.image_span)
        require_nonempty(ctx, sel, "tokens", self.tokens, self.if_empty, what="image")
        ctx.enter = torch.where(sel, torch.clamp(ctx.enter, min=self._k), ctx.enter)


@interventions.register("withdraw_at_layer")
class WithdrawAtLayer(Intervention):
    """Visual token withdrawal (VTW): image tokens leave the sequence from `layer` on.

    ``layer`` may equal the number of layers (nothing leaves): the unmodified model.

    Args:
        layer: k: the tokens leave from decoder layer k on (the number of layers = the unmodified model).
        tokens: the tokens withdrawn.
        if_empty: ``error`` (the default) when some sample's selection is empty, or ``noop`` to leave such
            samples unchanged.

    Example:
        >>> WithdrawAtLayer(layer=16).layer
        16
    """

    def __init__(self, layer: int, tokens: SelectionSpec = "image_span", if_empty: IfEmpty = "error"):
        self.layer, self.tokens, self.if_empty = layer, tokens, if_empty
        self.selection = parse_selection(tokens, "tokens")

    def check(self, adapter) -> None:
        self._k = check_layer(self.layer, adapter.n_llm_layers, "layer", allow_end=True)

    def setup(self, ctx: Context) -> None:
        import torch

        self.check(ctx.adapter)
        sel = ctx.select(self.selection, within=ctx.roles.image_span)
        require_nonempty(ctx, sel, "tokens", self.tokens, self.if_empty, what="image")
        ctx.exit = torch.where(sel, torch.clamp(ctx.exit, max=self._k), ctx.exit)
