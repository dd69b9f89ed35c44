"""What an intervention is handed: `Context` (one condition on one batch) and `Rows` (one layer's tokens).

Interventions (`embedlens.interventions.base`) read and set these; the engine
(`embedlens.interventions.engine`) builds them. Both import this module, so
neither imports the other's module to name them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from embedlens.errors import InterventionError
from embedlens.interventions.select import Selection, SelectionSpec

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch
    from embedlens.roles import TokenRoles


@dataclass
class Rows:
    """The tokens present in one layer: `index[b, r]` is the batch position of
    row r of sample b; `valid[b, r]` is False for the packing's padding rows."""

    index: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def pack(cls, present: torch.Tensor, n: int | None = None) -> "Rows":
        """Pack each sample's `present` tokens (`[batch, seq]` bool) to the left, in sequence order.

        Args:
            present: the tokens the rows hold.
            n: the most tokens a sample holds (the packing's width), when the caller knows it (`schedule`);
                without it, it is read from the device (a host synchronisation).
        """
        import torch

        seq = present.shape[1]
        pos = torch.arange(seq, device=present.device).expand_as(present)
        order = torch.where(present, pos, pos + seq).argsort(dim=1)
        if n is None:
            n = int(present.sum(dim=1).max().item()) if present.numel() else 0
        index = order[:, : max(n, 1)]
        return cls(index=index, valid=present.gather(1, index))

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """`[batch, seq, ...]` -> `[batch, rows, ...]`."""
        if values.dim() == 2:
            return values.gather(1, self.index)
        return values.gather(1, self._expand(values))

    def scatter(self, target: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Write `rows` (`[batch, rows, d]`) back into `target` (`[batch, seq, d]`) at the valid rows.

        The padding rows write back what `target` holds at their positions (each position is in at most one row
        of its sample), so no mask of the valid rows is ever read on the host.
        """
        import torch

        idx = self._expand(target)
        kept = torch.where(self.valid[..., None], rows.to(target.dtype), target.gather(1, idx))
        return target.scatter(1, idx, kept)

    def _expand(self, values: torch.Tensor) -> torch.Tensor:
        idx = self.index.reshape(*self.index.shape, *([1] * (values.dim() - 2)))
        return idx.expand(*self.index.shape, *values.shape[2:])


@dataclass
class AttentionInput:
    """What a layer's attention module is handed, for an intervention that reads it (`Context.probe_attention`).

    Attributes:
        module: the layer's attention module (``q_proj``, ``k_proj``, ...; `embedlens.attention.attention_rows`).
        hidden: `[batch, rows, d]`, its input (after the layer's own norm), in the layer's packing.
        position_embeddings: the layer's ``(cos, sin)``, `[batch, rows, head_dim]`.
        rows: the packing (`Rows`): row r of sample b is batch position ``rows.index[b, r]``.
        allowed: `[batch, rows, rows]` bool, what each row may attend to in that layer.
    """

    module: torch.nn.Module
    hidden: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    rows: Rows
    allowed: torch.Tensor


@dataclass
class Context:
    """What interventions see and set during one run of one condition on one batch.

    Attributes:
        enter, exit: `[batch, seq]` long; a token is present in layer l when
            ``enter <= l < exit``. Interventions raise ``enter`` (injection) or
            lower ``exit`` (pruning, withdrawal) — never the reverse.
        attention: last-token attention recorded for requested layers,
            ``{layer: [batch, heads, seq]}`` over batch positions (0 where absent).
    """

    adapter: "Adapter"
    batch: "Batch"
    condition: str
    roles: "TokenRoles"
    embeds: torch.Tensor
    positions: torch.Tensor
    blocks: torch.Tensor
    n_layers: int
    enter: torch.Tensor
    exit: torch.Tensor
    groups: Callable[[str], torch.Tensor] | None = None
    deepstack: list[torch.Tensor] | None = None  # Qwen3-VL: `[batch, seq, d]` added after decoder layer i (0 off visual positions)
    #: Gemma 4's per-layer inputs, their token-identity part as the model hands it to its language model
    #: (`[batch, seq, layers, d_ple]`); the engine projects the (edited) embeddings into them as the text model does
    per_layer: torch.Tensor | None = None
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    attention_requests: set[int] = field(default_factory=set)
    #: `{layer: [fn]}`: called with the layer's `AttentionInput` as it runs (`probe_attention`)
    attention_probes: dict[int, list[Callable[[AttentionInput], None]]] = field(default_factory=dict)
    #: `{layer: [fn]}`: called with the layer's `AttentionInput` before its `before_layer` hooks (``ahead=True``)
    attention_probes_ahead: dict[int, list[Callable[[AttentionInput], None]]] = field(default_factory=dict)
    #: `[batch, seq]` bool, set by the run: tokens whose LLM input an intervention edited (`edit_embeds`).
    edited: torch.Tensor | None = None

    @functools.cached_property
    def valid(self) -> torch.Tensor:
        """`[batch, seq]` bool: not padding (computed once: the engine and interventions read it every layer)."""
        return ~self.roles.padding

    def select(self, spec: "SelectionSpec | Selection", *, within: torch.Tensor | None = None) -> torch.Tensor:
        """Evaluate a selection on this batch, optionally restricted to `within`."""
        mask = Selection.parse(spec).evaluate(self.roles, self.groups)
        return mask if within is None else mask & within

    def present(self, layer: int) -> torch.Tensor:
        return (self.enter <= layer) & (layer < self.exit) & self.valid

    def request_last_attention(self, layer: int) -> None:
        """Ask the engine to record the last prompt token's attention in `layer`.

        Raises:
            InterventionError: `layer` is a linear-attention layer (no attention matrix), named with the layers
                where attention applies.
        """
        self._refuse_linear(layer, "the last token's attention")
        self.attention_requests.add(layer)

    def _refuse_linear(self, layer: int, what: str) -> None:
        from embedlens.attention import llm_layer_types, refuse_linear

        if getattr(self.adapter.paths, "linear_attn", ""):  # a hybrid model (Qwen3.5's Gated DeltaNet layers)
            refuse_linear([layer], llm_layer_types(self.adapter), what)

    def probe_attention(self, layer: int, fn: Callable[[AttentionInput], None], *, ahead: bool = False) -> None:
        """Ask the engine to hand `fn` the input of `layer`'s attention module (`AttentionInput`).

        An intervention recomputes from it only the attention rows (or keys) it needs, whatever attention
        implementation the model runs. With ``ahead=False`` `fn` is called as `layer` runs, on the tokens it
        holds. With ``ahead=True`` it is called before `layer`'s `before_layer` hooks, on the tokens layer
        ``layer - 1`` held (the engine runs `layer`'s own norm on them and stops at its attention): what an
        intervention that drops tokens *before* `layer` by `layer`'s own attention reads (PyramidDrop).
        `fn` must only launch device work (no host reads). A hybrid model's linear-attention layers have no
        attention module and are refused by name, with the layers where attention applies.
        """
        if ahead and layer < 1:
            raise InterventionError(f"an ahead attention probe needs a layer before it; got layer {layer}")
        self._refuse_linear(layer, "an attention probe")
        (self.attention_probes_ahead if ahead else self.attention_probes).setdefault(layer, []).append(fn)

    def sample_ids(self, mask: torch.Tensor) -> list[str]:
        return [self.batch.samples[int(b)].id for b in mask.nonzero().flatten()]
