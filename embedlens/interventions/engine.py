"""The prefill engine: runs the LLM layer by layer so that interventions can
change which tokens are in the sequence, what they attend to and which updates
they receive.

Why not an nnsight trace: pruning, injection, withdrawal and FastV change the
sequence *between* layers, so every later layer needs its own attention mask,
rotary embeddings and key/value cache. The engine calls the model's own
decoder layers, final norm and head (nothing is re-implemented), and builds
those per-layer arguments itself:

- tokens are addressed by their index in the encoded batch; a token is
  *present* in layer ``l`` when ``enter <= l < exit`` (interventions set
  ``enter``/``exit``); the present tokens of each sample are packed left, the
  rest of the row is padding that nothing attends to;
- position ids are the ones each sample gets alone (padding does not count),
  so a kept token keeps its original position and decoding continues from the
  unpruned length; for M-RoPE families (Qwen-VL, `Adapter.mrope`) they are
  `[3, batch, seq]` (t, h, w) ids, gathered per axis, and decoding continues
  one past each sample's largest id (HF's ``rope_deltas``);
- DeepStack features (Qwen3-VL, `Adapter.deepstack`), taken from the model's
  own call of its language model, are added after their decoder layers to the
  visual tokens present there, as the text model does;
- the attention mask is causal in the original order (plus the family's
  bidirectional blocks, e.g. PaliGemma's prefix, Gemma 3's images), minus what
  knockouts block;
- a sliding-window layer (one whose attention module applies a window,
  `embedlens.attention.attention_window`: Gemma 2/3, Mistral, Qwen2's sliding
  layers; a stray ``sliding_window`` in a Llama config is ignored, as Llama
  ignores it) also masks every key
  ``sliding_window`` or more *rows* before the query (bidirectional blocks
  included or not, as the family's `Adapter.window_bounds_blocks` says). Rows, not position ids:
  Hugging Face measures the window in sequence index (``kv_idx > q_idx -
  sliding_window`` in ``masking_utils.sliding_window_overlay``, indices into
  the cache, whatever the position ids say), so a hand-cut run of the kept
  tokens at their original position ids measures it over the kept tokens.
  The engine counts the tokens present in that layer of that sample (padding
  never counts); a token pruned by *removal* frees its place in the window,
  one pruned by *mask* keeps it (as Hugging Face with a 0 in the 2-D
  attention mask). On sliding layers removal and mask therefore differ once
  the window is shorter than the sequence; each equals its Hugging Face run.
  Decoding continues the count (`Outcome.step`).

With no interventions the engine reproduces the model's forward pass (tests
compare it with Hugging Face's logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from embedlens.adapters.base import resolve_path
from embedlens.adapters.placement import module_device
from embedlens.attention import attention_rows, layer_windows, rotary_embeddings
from embedlens.errors import AdapterError, EmbedLensError, InterventionError
from embedlens.interventions.select import Selection, SelectionSpec

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch
    from embedlens.interventions.base import Intervention
    from embedlens.roles import TokenRoles

SUPPORTED_ATTENTION = ("eager", "sdpa")


class _Stop(Exception):
    """Raised by a hook to end the model's forward once the LLM input is captured."""


class RowCache:
    """Key/value cache where each layer holds its own rows.

    Layers may hold different tokens (pruned after layer K, injected at k), so
    each layer's length is its own. Implements the `update` call Hugging Face
    attention modules make.
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

    def lengths(self) -> list[int]:
        return [0 if k is None else int(k.shape[-2]) for k in self.keys]

    def crop(self, lengths: Sequence[int]) -> None:
        for i, n in enumerate(lengths):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i][..., :n, :]
                self.values[i] = self.values[i][..., :n, :]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths()[layer_idx]


@dataclass
class Rows:
    """The tokens present in one layer: `index[b, r]` is the batch position of
    row r of sample b; `valid[b, r]` is False for the packing's padding rows."""

    index: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def pack(cls, present: torch.Tensor) -> "Rows":
        seq = present.shape[1]
        pos = torch.arange(seq, device=present.device).expand_as(present)
        order = torch.where(present, pos, pos + seq).argsort(dim=1)
        n = int(present.sum(dim=1).max().item()) if present.numel() else 0
        index = order[:, : max(n, 1)]
        return cls(index=index, valid=present.gather(1, index))

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """`[batch, seq, ...]` -> `[batch, rows, ...]`."""
        if values.dim() == 2:
            return values.gather(1, self.index)
        idx = self.index.reshape(*self.index.shape, *([1] * (values.dim() - 2)))
        return values.gather(1, idx.expand(*self.index.shape, *values.shape[2:]))

    def scatter(self, target: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Write `rows` (`[batch, rows, d]`) back into `target` (`[batch, seq, d]`) at the valid rows."""
        out = target.clone()
        b, r = self.valid.nonzero(as_tuple=True)
        out[b, self.index[b, r]] = rows[b, r]
        return out

    def same(self, other: "Rows | None") -> bool:
        return other is not None and torch.equal(self.index, other.index) and torch.equal(self.valid, other.valid)


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
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    attention_requests: set[int] = field(default_factory=set)
    #: `[batch, seq]` bool, set by the run: tokens whose LLM input an intervention edited (`edit_embeds`).
    edited: torch.Tensor | None = None

    @property
    def valid(self) -> torch.Tensor:
        return ~self.roles.padding

    def select(self, spec: "SelectionSpec | Selection", *, within: torch.Tensor | None = None) -> torch.Tensor:
        """Evaluate a selection on this batch, optionally restricted to `within`."""
        mask = Selection.parse(spec).evaluate(self.roles, self.groups)
        return mask if within is None else mask & within

    def present(self, layer: int) -> torch.Tensor:
        return (self.enter <= layer) & (layer < self.exit) & self.valid

    def request_last_attention(self, layer: int) -> None:
        """Ask the engine to record the last prompt token's attention in `layer`."""
        self.attention_requests.add(layer)

    def sample_ids(self, mask: torch.Tensor) -> list[str]:
        return [self.batch.samples[int(b)].id for b in mask.nonzero().flatten()]


class Outcome:
    """What a run produced: final hidden states, token counts per layer, and
    (when run with ``cache=True``) a decoder that continues from the prefill."""

    def __init__(self, engine: "Engine", ctx: Context, hidden: torch.Tensor, present: torch.Tensor, counts: dict):
        self.engine = engine
        self.context = ctx
        self.hidden = hidden
        self.present = present
        self.counts = counts  # {"rows": [L, B], "visual": [L, B], "keys": [L, B]}
        self.memo: dict = {}  # per-run values metrics keep (e.g. the baseline's generation)
        self.cache: RowCache | None = None
        self.key_valid: list[torch.Tensor] = []
        self.row_valid: list[torch.Tensor] = []  # per layer: the prefill's present rows (sliding windows count them)
        self.decoded_valid: torch.Tensor | None = None
        self.next_position: torch.Tensor | None = None

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
        x = eng.adapter.model.get_input_embeddings()(tokens)
        pos = self.next_position[:, None] + (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        if self.context.positions.dim() == 3:  # M-RoPE: decoded text has t = h = w (HF: text position + rope_deltas)
            pos = pos[None].expand(self.context.positions.shape[0], -1, -1)
        pe = eng.rotaries(x, pos)
        causal = torch.ones(n, n, dtype=torch.bool, device=eng.device).tril()
        new = causal[None] & valid[:, None, :]
        new = new | torch.eye(n, dtype=torch.bool, device=eng.device)[None]
        for layer_idx, layer in enumerate(eng.layers):
            old = torch.cat([self.key_valid[layer_idx], self.decoded_valid], dim=1)
            allowed = torch.cat([old[:, None, :].expand(bsz, n, -1), new], dim=2)
            window = eng.windows[layer_idx]
            if window is not None:
                # each key's and query's rank among the tokens this layer of the sample holds (prefill rows, then
                # decoded tokens), as the index a sample run alone would give it
                held = torch.cat([self.row_valid[layer_idx], self.decoded_valid, valid], dim=1).long()
                rank = held.cumsum(dim=1) - 1
                q_rank = rank[:, -n:]
                allowed = allowed & (rank[:, None, :] > q_rank[:, :, None] - window)
            dev = eng.layer_device(layer_idx)  # a device map may put each layer elsewhere: its inputs go there
            lpos = _layer_positions(pos)
            x = layer(
                x.to(dev),
                attention_mask=eng.mask(allowed.to(dev)),
                position_ids=None if lpos is None else lpos.to(dev),
                use_cache=True,
                position_embeddings=tuple(t.to(dev) for t in pe[eng.layer_types[layer_idx]]),
                **{eng.cache_kwarg: self.cache},
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
        logp = pred.log_softmax(-1).cpu()
        picked = logp.gather(2, tokens[..., None])[..., 0]
        hit = pred.argmax(-1).cpu() == tokens
        return (picked * valid).sum(dim=1), (hit | ~valid).all(dim=1)

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
            for _ in range(max_new_tokens - 1):
                if bool(done.all()):
                    out.append(nxt)
                    continue
                logits = self.step(nxt[:, None], valid=~done[:, None])[:, 0]
                cand = logits.argmax(dim=-1)
                nxt = torch.where(done, nxt, cand)
                if eos_token_id is not None:
                    done = done | (nxt == eos_token_id)
                out.append(nxt)
        finally:
            self.rollback(point)
        return torch.stack(out, dim=1)


def cache_kwarg(layer: torch.nn.Module) -> str:
    """The keyword a decoder layer takes its KV cache under: ``cache`` from transformers 5.24 on (where
    ``past_key_values`` is deprecated, to go in 5.40), ``past_key_values`` before."""
    import inspect

    params = inspect.signature(layer.forward).parameters  # follows the deprecation wrapper's __wrapped__
    return "cache" if "cache" in params else "past_key_values"


class Engine:
    """Runs an adapter's language model with interventions.

    Example:
        >>> import embedlens
        >>> from embedlens.testing import tiny_batch
        >>> adapter, batch = tiny_batch("llava-clip", n=2)
        >>> eng = Engine(adapter)
        >>> out = eng.run(batch)
        >>> out.last_logits().shape[0]
        2
    """

    def __init__(self, adapter: "Adapter"):
        self.adapter = adapter
        p = adapter.paths
        self.lm = resolve_path(adapter.model, p.language_model)
        self.layers = list(resolve_path(adapter.model, p.llm_layers))
        self._norm = resolve_path(adapter.model, p.llm_norm)
        self._head = resolve_path(adapter.model, p.unembed)
        cfg = self.lm.config
        impl = getattr(cfg, "_attn_implementation", None) or "eager"
        if impl not in SUPPORTED_ATTENTION:
            raise AdapterError(
                f"interventions need attention implementation {' or '.join(SUPPORTED_ATTENTION)} "
                f"(they pass their own masks); the model runs {impl!r}. Load it with attn_implementation='sdpa'"
            )
        self.eager = impl == "eager"
        self.layer_types, self.windows = layer_windows(cfg, [resolve_path(layer, adapter.paths.attn) for layer in self.layers], adapter.name)
        self.cache_kwarg = cache_kwarg(self.layers[0]) if self.layers else "past_key_values"
        self._layer_devices: list[torch.device] | None = None

    @property
    def device(self) -> torch.device:
        """Where the engine keeps its masks and the residual stream between layers (the input embeddings' device)."""
        return self.adapter.device

    def layer_device(self, index: int) -> torch.device:
        """Where decoder layer `index` computes (its own device under a device map, offloaded or not)."""
        if self._layer_devices is None:
            self._layer_devices = [module_device(layer) for layer in self.layers]
        return self._layer_devices[index]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    # -- the model's own pieces ----------------------------------------------------
    def rotary(self, x: torch.Tensor, positions: torch.Tensor):
        return self.lm.rotary_emb(x, position_ids=positions)

    def rotaries(self, x: torch.Tensor, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The rotary embeddings of each layer type (Gemma 3 rotates sliding and full layers with different bases)."""
        return rotary_embeddings(self.lm, x, positions, self.layer_types)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        # the model's own logits: lm_head, then its final-logit softcapping (as `llm.unembed`)
        return self.adapter.softcap_logits(self._head(x))

    def mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """`[batch, q, k]` bool -> the 4-D mask the attention implementation takes."""
        allowed = allowed[:, None]
        if not self.eager:
            return allowed
        dtype = self._head.weight.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)

    @torch.no_grad()
    def embed(self, batch: "Batch") -> torch.Tensor:
        """The language model's input embeddings for `batch` (images merged in), as the model builds them."""
        return self._lm_inputs(batch)["x"]

    @torch.no_grad()
    def deepstack(self, batch: "Batch") -> list[torch.Tensor] | None:
        """Qwen3-VL's DeepStack features as the model hands them to its language model, scattered to
        `[batch, seq, d]` (zero off the visual positions): entry i is added after decoder layer i. None for a
        family without them."""
        return _scatter_deepstack(self._lm_inputs(batch))

    @torch.no_grad()
    def _lm_inputs(self, batch: "Batch") -> dict:
        captured = {}

        def hook(module, args, kwargs):
            captured.update(kwargs)
            captured["x"] = kwargs["inputs_embeds"] if "inputs_embeds" in kwargs else args[4]
            raise _Stop

        handle = self.lm.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with self.adapter.unused_vision_layers_skipped():
                self.adapter.model(**self.adapter.model_inputs(batch))
        except _Stop:
            pass  # the hook stopped the forward on purpose
        finally:
            handle.remove()
        return captured

    def context(self, batch: "Batch", condition: str = "baseline", groups=None, embeds=None) -> Context:
        inputs = batch.inputs
        roles = batch.roles.to(self.device)
        if embeds is None:
            captured = self._lm_inputs(batch)
            embeds, deep = captured["x"], _scatter_deepstack(captured)
        else:  # precomputed embeddings; DeepStack features still need the tower
            deep = self.deepstack(batch) if self.adapter.deepstack else None
        if hasattr(groups, "label"):  # a partition: label this batch's tokens once
            groups = _lookup({g: m.to(self.device) for g, m in groups.label(self.adapter, batch, embeds=embeds).items()})
        elif isinstance(groups, dict):
            groups = _lookup(groups)
        positions = self.adapter.position_ids(inputs)
        if positions.dim() != (3 if self.adapter.mrope else 2):
            raise AdapterError(
                f"{self.adapter.name}: position_ids gave shape {tuple(positions.shape)}; the adapter declares "
                f"{'[3, batch, seq] M-RoPE' if self.adapter.mrope else '[batch, seq]'} positions (Adapter.mrope)"
            )
        blocks = self.adapter.block_ids(inputs)
        if blocks is None:
            blocks = torch.full_like(roles.kind, -1)
        valid = ~roles.padding
        return Context(
            adapter=self.adapter,
            batch=batch,
            condition=condition,
            roles=roles,
            embeds=embeds,
            positions=positions.to(self.device),
            blocks=blocks.to(self.device),
            n_layers=self.n_layers,
            enter=torch.zeros_like(roles.kind),
            exit=torch.where(valid, self.n_layers, 0),
            groups=groups,
            deepstack=deep,
        )

    # -- the run ---------------------------------------------------------------
    @torch.no_grad()
    def run(
        self,
        batch: "Batch",
        interventions: Sequence["Intervention"] = (),
        *,
        condition: str = "baseline",
        groups: Callable[[str], torch.Tensor] | None = None,
        embeds: torch.Tensor | None = None,
        cache: bool = False,
    ) -> Outcome:
        """Prefill `batch` with `interventions` applied together.

        Args:
            batch: from `adapter.encode`.
            interventions: instances; applied in order where order matters.
            condition: the condition's name (errors name it).
            groups: token groups for selections that name a group: a partition
                (an object with ``label(adapter, batch, embeds=)``, e.g.
                `embedlens.groups.Partition`), a dict of `[batch, seq]`
                masks, or a function from group name to mask.
            embeds: precomputed input embeddings (skips the vision tower).
            cache: keep a key/value cache so the outcome can decode.
        """
        ctx = self.context(batch, condition, groups, embeds)
        for i, iv in enumerate(interventions):
            with _naming(condition, i, iv):
                iv.setup(ctx)
        x_full = ctx.embeds
        for i, iv in enumerate(interventions):
            with _naming(condition, i, iv):
                x_full = iv.edit_embeds(ctx, x_full)
        ctx.edited = (x_full != ctx.embeds).any(dim=-1) & ctx.valid

        n_layers, bsz, seq = self.n_layers, *ctx.roles.kind.shape
        kv = RowCache(n_layers) if cache else None
        image = ctx.roles.image_span
        counts = {k: torch.zeros(n_layers, bsz, dtype=torch.long) for k in ("rows", "visual", "keys")}
        key_valid: list[torch.Tensor] = []
        row_valid: list[torch.Tensor] = []
        order = torch.arange(seq, device=self.device)
        rows: Rows | None = None
        x = None
        for layer_idx, layer in enumerate(self.layers):
            for i, iv in enumerate(interventions):
                with _naming(condition, i, iv):
                    iv.before_layer(ctx, layer_idx)
            new_rows = Rows.pack(ctx.present(layer_idx))
            if not new_rows.same(rows):
                if rows is not None:
                    x_full = rows.scatter(x_full, x)
                rows = new_rows
                x = rows.gather(x_full)
                pos = _gather_positions(rows, ctx.positions)
                pe = self.rotaries(x, pos)
                o, blk = rows.gather(order[None].expand(bsz, -1)), rows.gather(ctx.blocks)
                causal = o[:, None, :] <= o[:, :, None]
                block = (blk[:, :, None] == blk[:, None, :]) & (blk[:, :, None] >= 0)
                base = (causal | block) & rows.valid[:, None, :]
                # sliding layers: the window counted in rows (the present tokens, packed left), as HF counts sequence
                # index; it bounds the blocks too (Gemma 3: AND(window, OR(causal, blocks))) or only the causal part
                # (PaliGemma 2: OR(AND(window, causal), blocks)), as the adapter declares
                r = torch.arange(base.shape[1], device=self.device)
                near = {}
                for w in {w for w in self.windows if w is not None}:
                    inside = r[None, None, :] > r[None, :, None] - w
                    near[w] = ((causal | block) & inside if self.adapter.window_bounds_blocks else (causal & inside) | block) & rows.valid[:, None, :]
            window = self.windows[layer_idx]
            allowed = base if window is None else near[window]
            for i, iv in enumerate(interventions):
                with _naming(condition, i, iv):
                    blocked = iv.blocked(ctx, layer_idx)
                if blocked is not None:
                    src, dst = rows.gather(blocked[0]), rows.gather(blocked[1])
                    allowed = allowed & ~(src[:, :, None] & dst[:, None, :])
            # a key no prompt query may attend to (e.g. pruned by mask) stays hidden from decoded tokens too
            seen = (allowed & rows.valid[:, :, None]).any(dim=1)  # padding queries do not count
            empty = ~allowed.any(dim=-1)
            if bool(empty.any()):
                allowed = allowed | (torch.eye(allowed.shape[1], dtype=torch.bool, device=self.device)[None] & empty[..., None])
            counts["rows"][layer_idx] = rows.valid.sum(dim=1).cpu()
            counts["visual"][layer_idx] = (rows.valid & rows.gather(image)).sum(dim=1).cpu()
            counts["keys"][layer_idx] = (allowed & rows.valid[:, :, None]).sum(dim=(1, 2)).cpu()
            zero = {}
            for sub in ("attn", "mlp"):
                z = torch.zeros_like(ctx.valid)
                for i, iv in enumerate(interventions):
                    with _naming(condition, i, iv):
                        m = iv.zero_update(ctx, layer_idx, sub)
                    if m is not None:
                        z = z | m
                zero[sub] = rows.gather(z) & rows.valid
            zero["attn"] = zero["attn"] | (empty & rows.valid)
            hooks = self._hooks(layer, layer_idx, ctx, rows, allowed, zero, interventions)
            dev = self.layer_device(layer_idx)  # under a device map each layer computes on its own device
            lpos = _layer_positions(pos)
            try:
                x = layer(
                    x.to(dev),
                    attention_mask=self.mask(allowed.to(dev)),
                    position_ids=None if lpos is None else lpos.to(dev),
                    use_cache=cache,
                    position_embeddings=tuple(t.to(dev) for t in pe[self.layer_types[layer_idx]]),
                    **{self.cache_kwarg: kv},
                )
            finally:
                for h in hooks:
                    h.remove()
            x = x.to(self.device)  # interventions edit the residual stream where the masks are (device to device)
            for i, iv in enumerate(interventions):
                with _naming(condition, i, iv):
                    x = iv.after_layer(ctx, layer_idx, x, rows)
            if ctx.deepstack is not None and layer_idx < len(ctx.deepstack):
                # as the model's text model does after this layer, for the visual tokens present (a pruned
                # token's features go with it; padding rows gather a zero)
                x = x + rows.gather(ctx.deepstack[layer_idx]) * rows.valid[..., None]
            key_valid.append(rows.valid & seen)
            row_valid.append(rows.valid)
        x_full = rows.scatter(x_full, x)
        present = ctx.present(n_layers - 1)
        out = Outcome(self, ctx, self.norm(x_full), present, counts)
        if cache:
            out.cache = kv
            out.key_valid = key_valid
            out.row_valid = row_valid
            out.decoded_valid = torch.zeros(bsz, 0, dtype=torch.bool, device=self.device)
            out.next_position = next_positions(ctx.positions, ctx.roles.padding)
        return out

    def _hooks(self, layer, layer_idx, ctx, rows, allowed, zero, interventions) -> list:
        attn = resolve_path(layer, self.adapter.paths.attn)
        mlp = resolve_path(layer, self.adapter.paths.mlp)
        hooks = []

        def zero_attn(module, args, output):
            return (output[0].masked_fill(zero["attn"][..., None].to(output[0].device), 0.0), *output[1:])

        def zero_mlp(module, args, output):
            return output.masked_fill(zero["mlp"][..., None].to(output.device), 0.0)

        hooks.append(attn.register_forward_hook(zero_attn))
        hooks.append(mlp.register_forward_hook(zero_mlp))
        if layer_idx in ctx.attention_requests:
            last = ctx.roles.last_index
            # the row holding each sample's last prompt token
            qrow = (rows.index == last[:, None]).float().argmax(dim=1)

            def record(module, args, kwargs):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                q = qrow.to(hidden.device)
                probs = attention_rows(module, hidden, kwargs["position_embeddings"], q[:, None],
                                       allowed.to(hidden.device).gather(1, q[:, None, None].expand(-1, 1, allowed.shape[2])))
                full = torch.zeros(hidden.shape[0], probs.shape[1], ctx.roles.kind.shape[1], device=self.device)
                b, r = rows.valid.nonzero(as_tuple=True)
                full[b, :, rows.index[b, r]] = probs.to(self.device)[b, :, 0, r]
                ctx.attention[layer_idx] = full

            hooks.append(attn.register_forward_pre_hook(record, with_kwargs=True))
        return hooks


def _scatter_deepstack(captured: dict) -> list[torch.Tensor] | None:
    """The DeepStack features among the language model's captured inputs, each scattered to `[batch, seq, d]`."""
    feats = captured.get("deepstack_visual_embeds")
    if feats is None:
        return None
    x, where = captured["x"], captured["visual_pos_masks"].to(captured["x"].device)
    out = []
    for f in feats:
        full = torch.zeros_like(x)
        full[where] = f.to(x)
        out.append(full)
    return out


def _gather_positions(rows: Rows, positions: torch.Tensor) -> torch.Tensor:
    """The position ids of the present rows: `[batch, rows]` from `[batch, seq]`, or `[3, batch, rows]` from M-RoPE's
    `[3, batch, seq]` (each kept token keeps its original (t, h, w) ids)."""
    if positions.dim() == 3:
        return torch.stack([rows.gather(p) for p in positions])
    return rows.gather(positions)


def _layer_positions(pos: torch.Tensor) -> torch.Tensor | None:
    """What a decoder layer takes as ``position_ids`` (only flash-attention kernels read them): the 1-D ids,
    or None for M-RoPE ids, as the model's own text model passes (its rotary embeddings carry the positions)."""
    return pos if pos.dim() == 2 else None


def next_positions(positions: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """`[batch]`: the position of each sample's first decoded token: one past its largest prompt position
    (pruned tokens included, so decoding continues from the unpruned prompt). With M-RoPE ids
    (`[3, batch, seq]`) that is the largest over t, h and w: HF's ``rope_deltas`` continue text there."""
    p = positions if positions.dim() == 3 else positions[None]
    return p.masked_fill(padding[None], -1).amax(dim=(0, 2)) + 1


def _lookup(masks: dict[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        if name not in masks:
            raise InterventionError(f"unknown group {name!r}; the partition defines {', '.join(masks)}")
        return masks[name]

    return get


class _naming:
    """Prefix errors raised by an intervention with the condition and its place in it."""

    def __init__(self, condition: str, index: int, iv: "Intervention"):
        self.where = f"condition {condition!r}, interventions[{index}] ({getattr(iv, 'registered_name', '') or type(iv).__name__})"

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, InterventionError) and not getattr(exc, "_named", False):
            err = InterventionError(f"{self.where}: {exc}")
            err._named = True
            raise err from None
        return False
