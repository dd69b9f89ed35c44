"""What a prefill produced, and decoding from it: `Outcome` (final hidden states, token counts per layer,
logits, and, when run with ``cache=True``, a decoder that continues from the prefill over a `RowCache`).

`embedlens.interventions.engine.Engine.run` builds an `Outcome`; the outcome calls back into that engine for
the model's own pieces (its layers, final norm, head, rotary embeddings and mask format). It does not import
the engine module, so the two stay one-way: engine -> outcome.
"""

from __future__ import annotations

from typing import Sequence

import torch

from embedlens.attention import LINEAR, within
from embedlens.errors import EmbedLensError
from embedlens.interventions.context import Context
from embedlens.interventions.layout import gather_counts, layer_positions, rotary_on

#: `Outcome.generate` reads whether every sample has ended once per this many tokens.
DONE_EVERY = 8


class RowCache:
    """Key/value cache where each layer holds its own rows.

    Layers may hold different tokens (pruned after layer K, injected at k), so
    each layer's length is its own. Implements the `update` call Hugging Face
    attention modules make. A linear-attention layer (Gated DeltaNet) holds its
    input rows and their flags instead (`hold`).
    """

    def __init__(self, n_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def hold(self, layer_idx: int, x: torch.Tensor, present: torch.Tensor, kept: torch.Tensor) -> None:
        """Keep a linear-attention layer's input rows instead of keys and values (its recurrent state is a scan
        over them, re-run when decoding: `Outcome.step`).

        Args:
            x: `[batch, rows, d]` the layer's input.
            present: `[batch, rows]` bool, the rows the sample holds (False: padding).
            kept: `[batch, rows]` bool, the rows whose input the mixer reads (False also for tokens hidden by mask,
                which keep their step of the scan with nothing written).
        """
        flags = torch.stack([present, kept], dim=-1)
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = x, flags
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], x], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], flags], dim=-2)

    def lengths(self) -> list[int]:
        return [0 if k is None else int(k.shape[-2]) for k in self.keys]

    def crop(self, lengths: Sequence[int]) -> None:
        for i, n in enumerate(lengths):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i][..., :n, :]
                self.values[i] = self.values[i][..., :n, :]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths()[layer_idx]


class Outcome:
    """What a run produced: final hidden states, token counts per layer, and
    (when run with ``cache=True``) a decoder that continues from the prefill.

    ``engine`` is the `embedlens.interventions.engine.Engine` that ran it: decoding calls its layers, norm,
    head, rotary embeddings and mask format (not annotated, so this module does not import the engine's).
    """

    def __init__(self, engine, ctx: Context, hidden: torch.Tensor, present: torch.Tensor,
                 counts: "dict | list[torch.Tensor]"):
        self.engine = engine
        self.context = ctx
        self.hidden = hidden
        self.present = present
        self._counts = counts  # the host table, or each layer's `[3, batch]` device counts until first read
        self.memo: dict = {}  # per-run values metrics keep (e.g. the baseline's generation)
        self.cache: RowCache | None = None
        self.key_valid: list[torch.Tensor] = []
        self.row_valid: list[torch.Tensor] = []  # per layer: the prefill's present rows (sliding windows count them)
        self.decoded_valid: torch.Tensor | None = None
        self.next_position: torch.Tensor | None = None
        self.stopwatch = None  # `embedlens.interventions.timing.Stopwatch` of the prefill, set by the engine

    @property
    def counts(self) -> dict[str, torch.Tensor]:
        """``{"rows", "visual", "keys"}: [layers, batch]`` long on the host: each layer's rows (tokens present),
        visual rows and allowed (query, key) pairs per sample. Moved off the device in one transfer when first
        read, so the run itself never waits for it."""
        if not isinstance(self._counts, dict):
            self._counts = gather_counts(self._counts)
        return self._counts

    @property
    def last_index(self) -> torch.Tensor:
        return self.context.roles.last_index

    def logits_at(self, index: torch.Tensor) -> torch.Tensor:
        """`[batch, vocab]` logits at one batch position per sample."""
        rows = self.hidden[torch.arange(self.hidden.shape[0], device=index.device), index]
        return self.engine.head(rows)

    def last_logits(self) -> torch.Tensor:
        """`[batch, vocab]` next-token logits after the prompt."""
        return self.logits_at(self.last_index)

    def logits(self) -> torch.Tensor:
        """`[batch, seq, vocab]` logits; NaN at tokens absent from the last layer."""
        out = self.engine.head(self.hidden)
        return out.masked_fill(~self.present[..., None], float("nan"))

    # -- decoding --------------------------------------------------------------
    def checkpoint(self):
        self._need_cache()
        return (self.cache.lengths(), self.decoded_valid.shape[1], self.next_position.clone())

    def rollback(self, point) -> None:
        lengths, n_decoded, nxt = point
        self.cache.crop(lengths)
        self.decoded_valid = self.decoded_valid[:, :n_decoded]
        self.next_position = nxt

    def _need_cache(self) -> None:
        if self.cache is None:
            raise EmbedLensError("this outcome was run without cache=True; it cannot decode")

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Feed `tokens` (`[batch, n]`) after everything so far; return their logits.

        Args:
            tokens: token ids; each sample's continuation, right-padded.
            valid: `[batch, n]` bool, False for padding (nothing attends to it).
        """
        self._need_cache()
        eng = self.engine
        tokens = tokens.to(eng.device)
        bsz, n = tokens.shape
        valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid.to(eng.device)
        tokens = eng.adapter.text_ids(tokens)  # as the model embeds decoded tokens (Gemma 4: placeholders as padding)
        x = eng.adapter.model.get_input_embeddings()(tokens)
        pos = self.next_position[:, None] + (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        if self.context.positions.dim() == 3:  # M-RoPE: decoded text has t = h = w (HF: text position + rope_deltas)
            pos = pos[None].expand(self.context.positions.shape[0], -1, -1)
        pe = eng.rotaries(x, pos)
        causal = torch.ones(n, n, dtype=torch.bool, device=eng.device).tril()
        new = causal[None] & valid[:, None, :]
        new = new | torch.eye(n, dtype=torch.bool, device=eng.device)[None]
        lpos = layer_positions(pos)
        # Gemma 4's per-layer inputs of the new tokens, as its text model builds them from ids and embeddings
        ple = eng.lm.project_per_layer_inputs(x, eng.lm.get_per_layer_inputs(tokens, x)) if eng.per_layer_inputs else None
        kv_sharing = eng.kv_sharing()  # Gemma 4's layers store keys and values there (none reuses them here)
        shared: dict = {}  # layers that hold the same prefill rows (and window, device) share one mask
        for layer_idx, layer in enumerate(eng.layers):
            window = eng.windows[layer_idx]
            dev = eng.layer_device(layer_idx)  # a device map may put each layer elsewhere: its inputs go there
            key_rows, held_rows = self.key_valid[layer_idx], self.row_valid[layer_idx]
            key = (id(key_rows), id(held_rows) if window is not None else None, window, dev)
            if key not in shared:
                old = torch.cat([key_rows, self.decoded_valid], dim=1)
                allowed = torch.cat([old[:, None, :].expand(bsz, n, -1), new], dim=2)
                if window is not None:
                    # each key's and query's rank among the tokens this layer of the sample holds (prefill rows,
                    # then decoded tokens), as the index a sample run alone would give it
                    held = torch.cat([held_rows, self.decoded_valid, valid], dim=1).long()
                    rank = held.cumsum(dim=1) - 1
                    q_rank = rank[:, -n:]
                    allowed = allowed & within(window, rank[:, None, :], q_rank[:, :, None])
                shared[key] = _on(eng.mask(allowed), dev)
            layer_type = eng.layer_types[layer_idx]
            if (layer_type, dev) not in shared:
                shared[layer_type, dev] = rotary_on(pe[layer_type], dev)
            if layer_type == LINEAR:
                x = _linear_step(layer, self.cache, layer_idx, _on(x, dev), _on(valid, dev), eng.cache_kwarg)
                continue
            x = layer(
                _on(x, dev),
                attention_mask=shared[key],
                position_ids=None if lpos is None else _on(lpos, dev),
                use_cache=True,
                position_embeddings=shared[layer_type, dev],
                **{eng.cache_kwarg: self.cache},
                **kv_sharing,
                **({} if ple is None else {"per_layer_input": _on(ple[:, :, layer_idx], dev)}),
            )
        self.decoded_valid = torch.cat([self.decoded_valid, valid], dim=1)
        self.next_position = self.next_position + valid.long().sum(dim=1)
        return eng.head(eng.norm(x))

    @torch.no_grad()
    def score(self, continuations: Sequence[Sequence[int]]) -> torch.Tensor:
        """Log-probability of each sample's continuation after the prompt (`[batch]`, float64).

        The cache is rolled back afterwards, so several candidates can be scored in turn.
        """
        return self.score_with_greedy(continuations)[0]

    @torch.no_grad()
    def score_with_greedy(self, continuations: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """`score`, and whether each continuation is the greedy one: every token the argmax at its position
        (`[batch]` bool; an empty continuation scores 0 and is greedy). The cache is rolled back afterwards."""
        bsz = self.hidden.shape[0]
        if len(continuations) != bsz:
            raise EmbedLensError(f"score needs one continuation per sample ({bsz}); got {len(continuations)}")
        n = max((len(c) for c in continuations), default=0)
        if n == 0:
            return torch.zeros(bsz, dtype=torch.float64), torch.ones(bsz, dtype=torch.bool)
        tokens = torch.zeros(bsz, n, dtype=torch.long)
        valid = torch.zeros(bsz, n, dtype=torch.bool)
        for b, c in enumerate(continuations):
            tokens[b, : len(c)] = torch.tensor(list(c), dtype=torch.long)
            valid[b, : len(c)] = True
        point = self.checkpoint()
        try:
            logits = self.step(tokens, valid)
        finally:
            self.rollback(point)
        # the logits that predict token t: the prompt's last position for t = 0, the step's t - 1 after
        pred = torch.cat([self.last_logits()[:, None], logits[:, :-1]], dim=1).double()
        tokens, valid = tokens.to(pred.device), valid.to(pred.device)
        picked = pred.log_softmax(-1).gather(2, tokens[..., None])[..., 0]
        hit = pred.argmax(-1) == tokens
        # [batch] scores and greedy flags leave the device together, not the [batch, n, vocab] log-probabilities
        host = torch.stack([(picked * valid).sum(dim=1), (hit | ~valid).all(dim=1).double()]).cpu()
        return host[0], host[1].bool()

    @torch.no_grad()
    def generate(self, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy continuation (`[batch, max_new_tokens]`); after EOS a sample repeats EOS.

        The cache is rolled back afterwards.
        """
        point = self.checkpoint()
        try:
            nxt = self.last_logits().argmax(dim=-1)
            out = [nxt]
            done = nxt == eos_token_id if eos_token_id is not None else torch.zeros_like(nxt, dtype=torch.bool)
            for t in range(1, max_new_tokens):
                # whether every sample has ended is read every few tokens, not every token (a host read each):
                # a step after all ended repeats EOS, so only the time differs
                if eos_token_id is not None and t % DONE_EVERY == 0 and bool(done.all()):
                    out += [nxt] * (max_new_tokens - t)
                    break
                logits = self.step(nxt[:, None], valid=~done[:, None])[:, 0]
                cand = logits.argmax(dim=-1)
                nxt = torch.where(done, nxt, cand)
                if eos_token_id is not None:
                    done = done | (nxt == eos_token_id)
                out.append(nxt)
        finally:
            self.rollback(point)
        return torch.stack(out, dim=1)


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` (itself, with no copy and no operator, when it is there already)."""
    return t if t.device == device else t.to(device)


def next_positions(positions: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """`[batch]`: the position of each sample's first decoded token: one past its largest prompt position
    (pruned tokens included, so decoding continues from the unpruned prompt). With M-RoPE ids
    (`[3, batch, seq]`) that is the largest over t, h and w: HF's ``rope_deltas`` continue text there."""
    p = positions if positions.dim() == 3 else positions[None]
    return p.masked_fill(padding[None], -1).amax(dim=(0, 2)) + 1


def _linear_step(layer, cache: RowCache, layer_idx: int, x: torch.Tensor, valid: torch.Tensor, cache_kwarg: str) -> torch.Tensor:
    """A linear-attention layer's output for new rows `x` (`[batch, n, d]`, `valid` False for padding): the layer
    run again over the rows it holds and these, each sample's present rows moved after its padding (a stable
    sort), so the scan and its short convolution start from zeros on zeroed rows, as for the sample alone. Rows
    hidden by mask keep their place with their input zeroed, as in the prefill. The new rows are then held."""
    cache.hold(layer_idx, x, valid, valid)
    held, flags = cache.keys[layer_idx], cache.values[layer_idx]
    order = torch.argsort(flags[..., 0].to(torch.int8), dim=1, stable=True)  # padding first, then the sample's rows
    rows = held.gather(1, order[..., None].expand_as(held))
    kept = flags[..., 1].gather(1, order)
    out = layer(rows, attention_mask=kept.to(rows.dtype), position_ids=None, use_cache=False,
                position_embeddings=None, **{cache_kwarg: None})
    back = torch.empty_like(out).scatter_(1, order[..., None].expand_as(out), out)
    return back[:, -x.shape[1]:]
