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
  unpruned length; for M-RoPE families (Qwen-VL, `Capability.MROPE`) they are
  `[3, batch, seq]` (t, h, w) ids, gathered per axis, and decoding continues
  one past each sample's largest id (HF's ``rope_deltas``);
- DeepStack features (Qwen3-VL, `Capability.DEEPSTACK`), taken from the model's
  own call of its language model, are added after their decoder layers to the
  visual tokens present there, as the text model does;
- per-layer inputs (Gemma 4's ``hidden_size_per_layer_input``): the token
  identities the model hands its language model, combined with the (edited)
  input embeddings by the text model's own ``project_per_layer_inputs``, and
  given to each layer for the tokens present; layers that reuse an earlier
  layer's keys and values (Gemma 4's ``num_kv_shared_layers``) get them through
  one ``shared_kv_states`` per run, so tokens may leave or enter only before the
  first layer that stores them (an intervention that moves tokens later is
  refused), and such a model does not decode from the engine's cache;
- mixture-of-experts layers route the tokens they hold: running the model's
  own layers on the modified sequence recomputes the routing;
- the attention mask is causal in the original order (plus the family's
  bidirectional blocks, e.g. PaliGemma's prefix, Gemma 3's images), minus what
  knockouts block;
- a sliding-window layer (one whose attention module applies a window,
  `embedlens.attention.attention_window`: Gemma 2/3, Mistral, Qwen2's sliding
  layers; a stray ``sliding_window`` in a Llama config is ignored, as Llama
  ignores it) also masks every key
  ``sliding_window`` or more *rows* before the query (bidirectional blocks
  included or not, as the family's `Capability.WINDOWED_BLOCKS` says). Rows, not position ids:
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
- a chunked-attention layer (Llama 4: ``chunked_attention`` in the config's
  ``layer_types``) lets a query attend to the earlier keys of its own chunk of
  ``attention_chunk_size`` tokens only. Hugging Face counts chunks from each
  sample's first non-padding token in sequence index
  (``masking_utils.chunked_overlay``), so the engine counts them over the rows
  a layer holds, as it counts a sliding window: removal frees a token's place,
  masking keeps it.
- a linear-attention layer (Qwen3.5's Gated DeltaNet, type ``linear_attention``)
  has no attention matrix: its recurrent state is a scan over the rows it is
  given. The engine hands it the packed rows and, as Hugging Face's
  ``create_recurrent_attention_mask``, a 2-D mask that zeroes the mixer's input
  on every row no query may attend to: the padding after each sample's packed
  tokens (after its last token, so no token's state sees it) and the tokens
  pruned by *mask* (as Hugging Face with a 0 in the 2-D attention mask: the
  token keeps its step of the scan, with nothing written into the state).
  Pruning, injection and withdrawal change the rows, so the state follows from
  the sequence each layer holds, as a Hugging Face run of that sequence.
  Attention knockout and the attention readings (FastV, ``attention_flow``)
  refuse these layers by name (`embedlens.attention.refuse_linear`);
  ``skip_sublayer``'s attention update is the mixer's. Decoding from the
  prefill (``cache=True``) keeps such a layer's *input rows* instead of a
  key/value cache and runs the layer again over them and the new tokens, each
  sample's rows moved after its padding (`RowCache.hold`): the scan then starts
  from a zero state on zeroed rows, as a run of the sample alone.

All of this is built on the device once per *packing* (the set of tokens a
layer holds; `embedlens.interventions.layout`) and reused by every layer that
holds it, so the layer loop never waits for the device: the host reads the
packings' widths once per run (again only from a layer where an intervention
moves tokens, e.g. FastV).

With no interventions the engine reproduces the model's forward pass (tests
compare it with Hugging Face's logits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch

from embedlens._torch import run_to
from embedlens.adapters.base import mixer_path, resolve_path
from embedlens.adapters.capabilities import Capability
from embedlens.adapters.placement import module_device
from embedlens.attention import (ENGINE_LAYER_TYPES, LAYER_TYPES, LINEAR, attention_rows, check_layer_types,
                                  check_rotary, layer_windows, linear_layers, rotary_embeddings)
from embedlens.errors import AdapterError, InterventionError
from embedlens.interventions.context import AttentionInput, Context, Rows
from embedlens.interventions.layout import Layout, schedule
from embedlens.interventions.outcome import DONE_EVERY, Outcome, RowCache, _on, next_positions
from embedlens.interventions.timing import Stopwatch

__all__ = ["DONE_EVERY", "SUPPORTED_ATTENTION", "Engine", "Outcome", "RowCache", "cache_kwarg", "next_positions"]

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch
    from embedlens.interventions.base import Intervention

SUPPORTED_ATTENTION = ("eager", "sdpa")


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
        # before the lookup: a linear-attention layer has no attention module, only the mixer the adapter names
        check_layer_types(cfg, adapter.name, allowed=ENGINE_LAYER_TYPES if getattr(adapter.paths, "linear_attn", "") else LAYER_TYPES)
        self.mixers = [resolve_path(layer, mixer_path(layer, adapter.paths)) for layer in self.layers]
        self.layer_types, self.windows = layer_windows(cfg, self.mixers, adapter.name)
        self.linear = linear_layers(self.layer_types)
        check_rotary(self.lm, adapter.name)  # Molmo2: a scaled and an unscaled table on different layers
        self.cache_kwarg = cache_kwarg(self.layers[0]) if self.layers else "past_key_values"
        modes = list(getattr(cfg, "kv_sharing_modes", None) or ())
        #: Gemma 4's layers write keys and values to a ``shared_kv_states`` they take (the last layers may reuse them)
        self.shares_kv = bool(set(modes) & {"store", "reuse"})
        #: first layer that stores keys and values later layers reuse, None where none reuses them
        self.kv_store = modes.index("store") if "reuse" in modes and "store" in modes else None
        self.per_layer_inputs = bool(getattr(cfg, "hidden_size_per_layer_input", 0))
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

    def kv_sharing(self) -> dict:
        """The keyword Gemma 4's layers take their shared keys and values under: a fresh store for one pass."""
        if not self.shares_kv:
            return {}
        from transformers.cache_utils import KVSharingDict

        return {"shared_kv_states": KVSharingDict()}

    @torch.no_grad()
    def per_layer_token_inputs(self, batch: "Batch") -> torch.Tensor | None:
        """Gemma 4: the token-identity part of the per-layer inputs, as the model hands it to its language model
        (`[batch, seq, layers, d]`); None for a model without per-layer inputs."""
        return self._lm_inputs(batch).get("per_layer_inputs") if self.per_layer_inputs else None

    @torch.no_grad()
    def _lm_inputs(self, batch: "Batch") -> dict:
        def forward():
            with self.adapter.unused_vision_layers_skipped():
                self.adapter.model(**self.adapter.model_inputs(batch))

        reached = run_to(self.lm, forward)  # the model stops at its language model's input
        if reached is None:
            return {}
        return {**reached.kwargs, "x": reached.hidden("inputs_embeds", 4)}

    def context(self, batch: "Batch", condition: str = "baseline", groups=None, embeds=None) -> Context:
        inputs = batch.inputs
        roles = batch.roles.to(self.device)
        positions = None
        if embeds is None:
            captured = self._lm_inputs(batch)
            embeds, deep = captured["x"], _scatter_deepstack(captured)
            given = captured.get("position_ids")
            if self.adapter.has(Capability.MROPE) and isinstance(given, torch.Tensor) and tuple(given.shape) == (3, *roles.kind.shape):
                # the M-RoPE ids the model itself computed for its language model (Qwen-VL): asking the adapter
                # would run the same per-image host loop (get_rope_index) a second time
                positions = given
            per_layer = captured.get("per_layer_inputs")
        else:  # precomputed embeddings; DeepStack features and per-layer inputs still need the model's own call
            deep = self.deepstack(batch) if self.adapter.has(Capability.DEEPSTACK) else None
            per_layer = self._lm_inputs(batch).get("per_layer_inputs") if self.per_layer_inputs else None
        if hasattr(groups, "label"):  # a partition: label this batch's tokens once
            groups = _lookup({g: m.to(self.device) for g, m in groups.label(self.adapter, batch, embeds=embeds).items()})
        elif isinstance(groups, dict):
            groups = _lookup(groups)
        if positions is None:
            positions = self.adapter.position_ids(inputs)
        if positions.dim() != (3 if self.adapter.has(Capability.MROPE) else 2):
            raise AdapterError(
                f"{self.adapter.name}: position_ids gave shape {tuple(positions.shape)}; the adapter declares "
                f"{'[3, batch, seq] M-RoPE' if self.adapter.has(Capability.MROPE) else '[batch, seq]'} positions (Capability.MROPE)"
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
            per_layer=per_layer,
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

        The host waits on the device a fixed number of times per run, whatever the model's depth: once to learn
        every layer's packing (`embedlens.interventions.layout.schedule`), and again only from a layer where an
        intervention moved tokens in or out (FastV); the per-layer loop only launches work, and the token counts
        leave the device when first read (`Outcome.counts`). The model's own code before its language model (the
        vision tower, Qwen-VL's M-RoPE ids) and the interventions' `setup` may wait too, once per batch.

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
        # timed from the LLM's input embeddings on (the vision tower, which no condition changes, is left out):
        # `select` is the interventions' own code, `prefill` the layers (with any in-LLM selection they host)
        watch = Stopwatch(self.device)
        t_select = watch.mark()
        for i, iv in enumerate(interventions):
            with _naming(condition, i, iv):
                iv.setup(ctx)
        x_full = ctx.embeds
        for i, iv in enumerate(interventions):
            with _naming(condition, i, iv):
                x_full = iv.edit_embeds(ctx, x_full)
        t_prefill = watch.mark()
        watch.add("select", t_select, t_prefill)
        edited = x_full is not ctx.embeds
        ctx.edited = (x_full != ctx.embeds).any(dim=-1) & ctx.valid if edited else torch.zeros_like(ctx.valid)

        n_layers, bsz = self.n_layers, ctx.roles.kind.shape[0]
        home = self.device
        extra = self.kv_sharing()
        if self.kv_store is not None and cache:
            raise InterventionError(
                f"{self.adapter.name}: decoding from the engine's cache is not supported for a model whose last "
                f"layers reuse earlier layers' keys and values (num_kv_shared_layers={self.lm.config.num_kv_shared_layers})")
        # Gemma 4: the text model's own projection of its input embeddings, with the tokens' identities
        ple = self.lm.project_per_layer_inputs(x_full, ctx.per_layer) if ctx.per_layer is not None else None
        kv = RowCache(n_layers) if cache else None
        per_layer_counts: list[torch.Tensor] = []
        key_valid: list[torch.Tensor] = []
        row_valid: list[torch.Tensor] = []
        layout: Layout | None = None
        x = None
        stamp, widths, changes = None, [], []
        for layer_idx, layer in enumerate(self.layers):
            if interventions:
                t_hook = watch.mark()  # selection: reading attention ahead of the layer, and the before_layer hooks
            if layer_idx in ctx.attention_probes_ahead:
                self._probe_ahead(layer, layer_idx, ctx, layout, x, interventions, condition)
            for i, iv in enumerate(interventions):
                with _naming(condition, i, iv):
                    iv.before_layer(ctx, layer_idx)
            if interventions:
                watch.add("select", t_hook, watch.mark())
            # which tokens each layer holds follows from enter/exit: read once, again only if an intervention
            # changed them (a new tensor, or one edited in place: its version counter moves)
            if stamp is None or _moved(stamp, ctx):
                widths, changes = schedule(ctx.enter, ctx.exit, ctx.valid, n_layers)
                stamp = (ctx.enter, ctx.enter._version, ctx.exit, ctx.exit._version)
                changes[layer_idx] = True
            if changes[layer_idx]:
                if self.kv_store is not None and layer_idx > self.kv_store:
                    raise InterventionError(
                        f"{condition}: tokens leave or enter the sequence at decoder layer {layer_idx}, after layer "
                        f"{self.kv_store}, whose keys and values the last {self.lm.config.num_kv_shared_layers} layers of "
                        f"{self.adapter.name} reuse; here tokens may be removed or added only up to layer {self.kv_store}")
                if layout is not None:
                    x_full = layout.rows.scatter(x_full, x)
                rows = Rows.pack(ctx.present(layer_idx), widths[layer_idx])
                x = rows.gather(x_full)
                layout = Layout(ctx, rows, x, rotaries=self.rotaries, mask=self.mask,
                                window_bounds_blocks=self.adapter.has(Capability.WINDOWED_BLOCKS),
                                full_layers_see_blocks=not self.adapter.has(Capability.SLIDING_BLOCKS_ONLY))
            rows = layout.rows
            blocked, zero_attn, zero_mlp = [], [], []
            for i, iv in enumerate(interventions):
                with _naming(condition, i, iv):
                    b = iv.blocked(ctx, layer_idx)
                    za = iv.zero_update(ctx, layer_idx, "attn")
                    zm = iv.zero_update(ctx, layer_idx, "mlp")
                if b is not None:
                    blocked.append(b)
                if za is not None:
                    zero_attn.append(za)
                if zm is not None:
                    zero_mlp.append(zm)
            entry = layout.entry(self.windows[layer_idx], blocked, zero_attn, zero_mlp)
            per_layer_counts.append(entry.counts)
            dev = self.layer_device(layer_idx)  # under a device map each layer computes on its own device
            hooks = self._hooks(layer, layer_idx, ctx, layout, entry)
            linear = self.layer_types[layer_idx] == LINEAR
            if linear:
                # the recurrent mixer takes a 2-D mask: rows no query attends to (padding, pruned by mask) are zeroed
                # before the scan, as HF's create_recurrent_attention_mask does for padding
                mask = entry.key_valid.to(device=dev, dtype=x.dtype)
                if kv is not None:  # decoding re-runs the layer over its input rows (RowCache.hold)
                    kv.hold(layer_idx, x, rows.valid, entry.key_valid)
            else:
                mask = layout.mask(entry, dev)
            try:
                x = layer(
                    _on(x, dev),
                    attention_mask=mask,
                    position_ids=layout.position_ids(dev),
                    use_cache=cache and not linear,
                    position_embeddings=layout.rotary(self.layer_types[layer_idx], dev),
                    **{self.cache_kwarg: None if linear else kv},
                    **extra,
                    **({} if ple is None else {"per_layer_input": _on(rows.gather(ple[:, :, layer_idx]), dev)}),
                )
            finally:
                for h in hooks:
                    h.remove()
            x = _on(x, home)  # interventions edit the residual stream where the masks are (device to device)
            for i, iv in enumerate(interventions):
                with _naming(condition, i, iv):
                    x = iv.after_layer(ctx, layer_idx, x, rows)
            if ctx.deepstack is not None and layer_idx < len(ctx.deepstack):
                # as the model's text model does after this layer, for the visual tokens present (a pruned
                # token's features go with it; padding rows gather a zero)
                x = x + rows.gather(ctx.deepstack[layer_idx]) * rows.valid[..., None]
            key_valid.append(entry.key_valid)
            row_valid.append(rows.valid)
        x_full = layout.rows.scatter(x_full, x)
        present = ctx.present(n_layers - 1)
        hidden = self.norm(x_full)
        watch.add("prefill", t_prefill, watch.mark())
        watch.stop()
        out = Outcome(self, ctx, hidden, present, per_layer_counts)
        out.stopwatch = watch
        if cache:
            out.cache = kv
            out.key_valid = key_valid
            out.row_valid = row_valid
            out.decoded_valid = torch.zeros(bsz, 0, dtype=torch.bool, device=home)
            out.next_position = next_positions(ctx.positions, ctx.roles.padding)
        return out

    def _probe_ahead(self, layer, layer_idx: int, ctx: Context, layout: Layout, x: torch.Tensor, interventions,
                     condition: str) -> None:
        """Hand `ctx.attention_probes_ahead[layer_idx]` the input of `layer`'s attention on the tokens the previous
        layer held: `layer` runs its own norm on them and is stopped at its attention module (nothing else runs)."""
        blocked = []
        for i, iv in enumerate(interventions):
            with _naming(condition, i, iv):
                b = iv.blocked(ctx, layer_idx)
            if b is not None:
                blocked.append(b)
        entry = layout.entry(self.windows[layer_idx], blocked, [], [])
        dev = self.layer_device(layer_idx)
        fns = ctx.attention_probes_ahead[layer_idx]

        attn = resolve_path(layer, self.adapter.paths.attn)
        reached = run_to(attn, lambda: layer(  # the layer stops at its attention's input
            _on(x, dev), attention_mask=layout.mask(entry, dev), position_ids=layout.position_ids(dev), use_cache=False,
            position_embeddings=layout.rotary(self.layer_types[layer_idx], dev), **{self.cache_kwarg: None}))
        hidden = reached.hidden()
        seen = AttentionInput(attn, hidden, reached.kwargs["position_embeddings"], layout.rows, entry.allowed.to(hidden.device))
        for fn in fns:
            fn(seen)

    def _hooks(self, layer, layer_idx: int, ctx: Context, layout: Layout, entry) -> list:
        """Forward hooks for this layer, only where needed: zeroing the updates of `entry`'s rows, and recording
        the last prompt token's attention where an intervention asked for it."""
        hooks = []
        if entry.zero_attn is not None:
            zero_attn = entry.zero_attn[..., None]

            def zero_attn_hook(module, args, output):
                update = output if isinstance(output, torch.Tensor) else output[0]  # a linear mixer returns a tensor
                z = zero_attn if zero_attn.device == update.device else zero_attn.to(update.device)
                return update.masked_fill(z, 0.0) if isinstance(output, torch.Tensor) else (update.masked_fill(z, 0.0), *output[1:])

            hooks.append(self.mixers[layer_idx].register_forward_hook(zero_attn_hook))
        if entry.zero_mlp is not None:
            zero_mlp = entry.zero_mlp[..., None]

            def zero_mlp_hook(module, args, output):
                # a mixture of experts returns (update, router logits), its update flattened to [batch * rows, d]
                # (Llama 4); the rows' mask follows the update's shape
                update = output if isinstance(output, torch.Tensor) else output[0]
                z = zero_mlp.to(update.device).reshape(*update.shape[:-1], 1)
                return update.masked_fill(z, 0.0) if isinstance(output, torch.Tensor) else (update.masked_fill(z, 0.0), *output[1:])

            hooks.append(resolve_path(layer, self.adapter.paths.mlp).register_forward_hook(zero_mlp_hook))
        if layer_idx in ctx.attention_requests:
            rows, allowed, home = layout.rows, entry.allowed, self.device
            last = ctx.roles.last_index
            qrow = (rows.index == last[:, None]).float().argmax(dim=1)  # the row holding each sample's last prompt token

            def record(module, args, kwargs):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                q = qrow.to(hidden.device)
                probs = attention_rows(module, hidden, kwargs["position_embeddings"], q[:, None],
                                       allowed.to(hidden.device).gather(1, q[:, None, None].expand(-1, 1, allowed.shape[2])))
                probs = probs.to(home)[:, :, 0].masked_fill(~rows.valid[:, None, :], 0.0)  # [batch, heads, rows]
                full = torch.zeros(hidden.shape[0], probs.shape[1], ctx.roles.kind.shape[1], device=home, dtype=probs.dtype)
                # each position is in at most one row of its sample, so the scatter writes every present token once
                ctx.attention[layer_idx] = full.scatter(2, rows.index[:, None, :].expand_as(probs), probs)

            hooks.append(self.mixers[layer_idx].register_forward_pre_hook(record, with_kwargs=True))
        if layer_idx in ctx.attention_probes:
            fns, allowed_all = ctx.attention_probes[layer_idx], entry.allowed

            def probe(module, args, kwargs):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                seen = AttentionInput(module, hidden, kwargs["position_embeddings"], layout.rows, allowed_all.to(hidden.device))
                for fn in fns:
                    fn(seen)

            hooks.append(self.mixers[layer_idx].register_forward_pre_hook(probe, with_kwargs=True))
        return hooks


def _scatter_deepstack(captured: dict) -> list[torch.Tensor] | None:
    """The DeepStack features among the language model's captured inputs, each scattered to `[batch, seq, d]`."""
    feats = captured.get("deepstack_visual_embeds")
    if feats is None:
        return None
    x, where = captured["x"], captured["visual_pos_masks"].to(captured["x"].device)
    where = where[..., None].expand_as(x)
    # masked_scatter fills the visual positions in sequence order, as boolean indexing would, without the
    # host learning how many there are (which boolean indexing waits for)
    return [torch.zeros_like(x).masked_scatter(where, f.to(x)) for f in feats]


def _moved(stamp: tuple, ctx: Context) -> bool:
    """Whether `ctx.enter` / `ctx.exit` are other tensors than, or were edited in place since, `stamp`."""
    enter, v_enter, exit_, v_exit = stamp
    return ctx.enter is not enter or ctx.exit is not exit_ or ctx.enter._version != v_enter or ctx.exit._version != v_exit


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
