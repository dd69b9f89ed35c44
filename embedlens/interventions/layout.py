"""Which tokens each LLM layer holds, packed into rows, and what the layers holding one packing share
(position ids, rotary embeddings, attention masks).

The engine's per-layer loop must only launch work: on a GPU the host waits
for every `.item()`, `.tolist()`, `nonzero()` and tensor built from a Python
list, and a loop that waits once per layer cannot queue the next layer while
the current one computes. So:

- `schedule` reads, in one host transfer, every layer's row count and whether
  its tokens differ from the layer before (the only thing the host must know:
  how wide to pack); the engine calls it once per run, and again from a layer
  where an intervention moved tokens in or out (FastV);
- a `Layout` is built once per packing and holds its position ids, rotary
  embeddings and base masks; its `Entry` per (window, interventions' blocks
  and zeros) holds the attention mask, the zeroed rows and the token counts,
  so layers that share them reuse the tensors instead of rebuilding them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from embedlens.attention import Chunk, within
from embedlens.interventions.context import Rows

if TYPE_CHECKING:
    from embedlens.interventions.context import Context


def schedule(enter: torch.Tensor, exit: torch.Tensor, valid: torch.Tensor, n_layers: int) -> tuple[list[int], list[bool]]:
    """Per layer, the most tokens a sample holds and whether they differ from the layer before, in one host read.

    A token is present in layer l when ``enter <= l < exit`` (and it is not padding). The layout changes at l
    exactly where some present-somewhere token enters (``enter == l``) or leaves (``exit == l``); the counts are
    a cumulative sum of those events, so nothing of size layers x tokens is built.

    Args:
        enter, exit: `[batch, seq]` long, as `Context` holds them.
        valid: `[batch, seq]` bool, False for padding.
        n_layers: the number of decoder layers.

    Returns:
        ``(rows, changes)``: `rows[l]` the packing width of layer l, `changes[l]` True where layer l holds other
        tokens than layer l - 1 (`changes[0]` is True).
    """
    bsz = valid.shape[0]
    live = (valid & (enter < exit)).long()  # tokens present in some layer
    lo, hi = enter.clamp(0, n_layers), exit.clamp(0, n_layers)
    delta = torch.zeros(bsz, n_layers + 1, dtype=torch.long, device=valid.device)
    delta = delta.scatter_add(1, lo, live).scatter_add(1, hi, -live)
    events = torch.zeros_like(delta).scatter_add(1, lo, live).scatter_add(1, hi, live)
    rows = delta.cumsum(dim=1)[:, :n_layers].amax(dim=0)
    changes = events[:, :n_layers].amax(dim=0) > 0
    host = torch.cat([rows, changes.long()]).tolist()  # the one host read
    out_changes = [bool(c) for c in host[n_layers:]]
    if out_changes:
        out_changes[0] = True
    return host[:n_layers], out_changes


def _stamp(tensors: Sequence[torch.Tensor]) -> tuple:
    """What identifies a mask an intervention returned: the tensor object and its in-place version counter."""
    return tuple((id(t), t._version) for t in tensors)


@dataclass
class Entry:
    """What the layers that share a packing, a window and the interventions' blocks and zeros share.

    Attributes:
        allowed: `[batch, rows, rows]` bool, what each row may attend to (a row with nothing allowed attends to
            itself, and its attention update is zeroed).
        key_valid: `[batch, rows]` bool, the valid rows some valid query may attend to (decoded tokens see these).
        counts: `[3, batch]` long: rows, visual rows and allowed (query, key) pairs of each sample.
        zero_attn, zero_mlp: `[batch, rows]` bool rows whose update is zeroed, or None when none can be.
    """

    allowed: torch.Tensor
    key_valid: torch.Tensor
    counts: torch.Tensor
    zero_attn: torch.Tensor | None
    zero_mlp: torch.Tensor | None
    refs: list = field(default_factory=list)  # the interventions' masks: kept alive so their ids stay theirs
    masks: dict = field(default_factory=dict)  # device -> the 4-D mask the attention implementation takes


class Layout:
    """One packing of the batch's tokens and what every layer holding it shares.

    Built when the packing changes (once per run without FastV-like interventions); everything here is
    computed on the device and reused by the layers that hold the packing.
    """

    def __init__(self, ctx: "Context", rows: Rows, x: torch.Tensor, *, rotaries: Callable, mask: Callable,
                 window_bounds_blocks: bool, full_layers_see_blocks: bool = True):
        """
        Args:
            ctx: the run's context (positions, blocks, roles).
            rows: the packing.
            x: `[batch, rows, d]`, the residual stream in that packing (rotary embeddings take its dtype).
            rotaries: ``(x, positions) -> {layer type: (cos, sin)}``, the model's own rotary embeddings.
            mask: ``[batch, q, k] bool -> the 4-D mask`` the attention implementation takes.
            window_bounds_blocks: whether a sliding window bounds the bidirectional blocks too
                (`Capability.WINDOWED_BLOCKS`).
            full_layers_see_blocks: whether full-attention layers see the blocks (False: Gemma 4's stay causal,
                `Capability.SLIDING_BLOCKS_ONLY`).
        """
        self.ctx, self.rows = ctx, rows
        self._rotaries, self._mask, self._window_bounds_blocks = rotaries, mask, window_bounds_blocks
        self._full_layers_see_blocks = full_layers_see_blocks
        self.positions = gather_positions(rows, ctx.positions)
        self._x = x
        self._pe: dict = {}
        self._bases: dict = {}
        self._entries: dict = {}
        dev = rows.index.device
        bsz = rows.index.shape[0]
        o = rows.gather(torch.arange(ctx.positions.shape[-1], device=dev).expand(bsz, -1))
        blk = rows.gather(ctx.blocks)
        self.causal = o[:, None, :] <= o[:, :, None]
        self.block = (blk[:, :, None] == blk[:, None, :]) & (blk[:, :, None] >= 0)
        self.visual_rows = (rows.valid & rows.gather(ctx.roles.image_span)).sum(dim=1)
        self.n_rows = rows.valid.sum(dim=1)

    def rotary(self, layer_type: str, device: torch.device):
        """The rotary embeddings of one layer type, on `device`: `(cos, sin)`, or the one complex tensor of
        Llama 4's ``rotary_emb``, as the model's own rotary embedding returns them."""
        if None not in self._pe:
            self._pe[None] = self._rotaries(self._x, self.positions)
        key = (layer_type, device)
        if key not in self._pe:
            self._pe[key] = rotary_on(self._pe[None][layer_type], device)
        return self._pe[key]

    def position_ids(self, device: torch.device) -> torch.Tensor | None:
        """What a decoder layer takes as ``position_ids`` (see `layer_positions`), on `device`."""
        pos = layer_positions(self.positions)
        return pos if pos is None or pos.device == device else pos.to(device)

    def base(self, window: int | Chunk | None) -> torch.Tensor:
        """`[batch, rows, rows]`: causal in the original order, plus the family's bidirectional blocks, over the
        valid keys; on a sliding layer also within `window` rows (the present tokens, packed left), as HF counts
        sequence index; on a chunked layer (`Chunk`, Llama 4) within the query's chunk of rows, counted the same
        way. The window bounds the blocks too (Gemma 3: AND(window, OR(causal, blocks))) or only the causal part
        (PaliGemma 2: OR(AND(window, causal), blocks)), as the adapter declares."""
        if window not in self._bases:
            keys = self.rows.valid[:, None, :]
            if window is None:
                self._bases[window] = ((self.causal | self.block) if self._full_layers_see_blocks else self.causal) & keys
            else:
                r = torch.arange(self.causal.shape[1], device=self.causal.device)
                inside = within(window, r[None, None, :], r[None, :, None])
                if self._window_bounds_blocks:
                    self._bases[window] = (self.causal | self.block) & inside & keys
                else:
                    self._bases[window] = ((self.causal & inside) | self.block) & keys
        return self._bases[window]

    def entry(self, window: int | Chunk | None, blocked: list, zero_attn: list, zero_mlp: list) -> Entry:
        """The shared tensors for one layer: its window, the `(src, dst)` masks interventions block and the
        `[batch, seq]` masks whose attention / MLP updates they zero (all over batch positions)."""
        flat = [t for pair in blocked for t in pair]
        key = (window, _stamp(flat), _stamp(zero_attn), _stamp(zero_mlp))
        if key in self._entries:
            return self._entries[key]
        rows = self.rows
        allowed = self.base(window)
        for src, dst in blocked:
            s, d = rows.gather(src), rows.gather(dst)
            allowed = allowed & ~(s[:, :, None] & d[:, None, :])
        # a key no prompt query may attend to (e.g. pruned by mask) stays hidden from decoded tokens too
        seen = (allowed & rows.valid[:, :, None]).any(dim=1)  # padding queries do not count
        empty = ~allowed.any(dim=-1)  # such a row attends to itself (no NaN) and its attention update is zeroed
        eye = torch.eye(allowed.shape[1], dtype=torch.bool, device=allowed.device)
        allowed = allowed | (eye[None] & empty[..., None])
        # a valid row always sees itself unless a block hides it: without blocks no update needs zeroing
        z_attn = empty & rows.valid if blocked else None
        z_mlp = None
        for masks, sub in ((zero_attn, "attn"), (zero_mlp, "mlp")):
            if masks:
                z = masks[0]
                for m in masks[1:]:
                    z = z | m
                z = rows.gather(z) & rows.valid
                if sub == "attn":
                    z_attn = z if z_attn is None else z_attn | z
                else:
                    z_mlp = z
        keys = (allowed & rows.valid[:, :, None]).sum(dim=(1, 2))
        counts = torch.stack([self.n_rows, self.visual_rows, keys])
        entry = Entry(allowed=allowed, key_valid=rows.valid & seen, counts=counts, zero_attn=z_attn, zero_mlp=z_mlp,
                      refs=flat + list(zero_attn) + list(zero_mlp))
        self._entries[key] = entry
        return entry

    def mask(self, entry: Entry, device: torch.device) -> torch.Tensor:
        """The entry's mask as the attention implementation takes it, on `device`."""
        if device not in entry.masks:
            m = self._mask(entry.allowed)
            entry.masks[device] = m if m.device == device else m.to(device)
        return entry.masks[device]


def rotary_on(pe, device: torch.device):
    """A layer's rotary embeddings on `device`: a `(cos, sin)` pair, or one tensor (Llama 4's complex frequencies)."""
    if isinstance(pe, torch.Tensor):
        return pe if pe.device == device else pe.to(device)
    return tuple(t if t.device == device else t.to(device) for t in pe)


def gather_positions(rows: Rows, positions: torch.Tensor) -> torch.Tensor:
    """The position ids of the present rows: `[batch, rows]` from `[batch, seq]`, or `[3, batch, rows]` from M-RoPE's
    `[3, batch, seq]` (each kept token keeps its original (t, h, w) ids)."""
    if positions.dim() == 3:
        idx = rows.index[None].expand(positions.shape[0], -1, -1)
        return positions.gather(2, idx)
    return rows.gather(positions)


def layer_positions(pos: torch.Tensor) -> torch.Tensor | None:
    """What a decoder layer takes as ``position_ids`` (only flash-attention kernels read them): the 1-D ids,
    or None for M-RoPE ids, as the model's own text model passes (its rotary embeddings carry the positions)."""
    return pos if pos.dim() == 2 else None


def gather_counts(per_layer: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"rows", "visual", "keys"}: [layers, batch]`` on the host from each layer's `Entry.counts`, moved in one
    transfer (layers sharing an entry share its tensor)."""
    unique: dict[int, tuple[int, torch.Tensor]] = {}
    which = [unique.setdefault(id(t), (len(unique), t))[0] for t in per_layer]
    if not unique:
        return {k: torch.zeros(0, 0, dtype=torch.long) for k in ("rows", "visual", "keys")}
    host = torch.stack([t for _, t in unique.values()]).cpu()[which]  # [layers, 3, batch]
    return {k: host[:, i].contiguous() for i, k in enumerate(("rows", "visual", "keys"))}
