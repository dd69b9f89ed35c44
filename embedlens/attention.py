"""Attention rows recomputed from a layer's queries and keys, and what each LLM layer's mask and rotary
embeddings depend on (its type: full, sliding-window or chunked attention).

Only the rows asked for are computed, never the full pattern, so this works
whatever attention implementation (SDPA, eager) runs the model.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from embedlens.errors import AdapterError, InterventionError


def _rotary_fn(attn: torch.nn.Module):
    fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise AdapterError(f"{type(attn).__name__}: cannot find the module's apply_rotary_pos_emb to recompute attention rows")
    return fn


def attention_rows(
    attn: torch.nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_rows: torch.Tensor,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """Attention probabilities of chosen query rows, recomputed from queries and keys.

    Only the requested rows are computed (``[batch, heads, q, keys]``), never the
    full pattern, so this works whatever attention implementation runs the model.

    Args:
        attn: the layer's attention module (``q_proj``, ``k_proj``, ``scaling``).
        hidden: ``[batch, rows, d]`` input of the attention module (after its norm).
        position_embeddings: the layer's ``(cos, sin)``, ``[batch, rows, head_dim]``, or Llama 4's complex
            frequencies (``[batch, rows, head_dim / 2]``; its NoPE layers skip them and scale their queries by
            row index, as the module does by sequence index).
        query_rows: ``[batch, q]`` row indices of the queries.
        allowed: ``[batch, q, rows]`` bool, what each query may attend to.
    """
    import torch

    bsz, n_rows, _ = hidden.shape
    hd = attn.head_dim
    if getattr(attn, "is_kv_shared_layer", False):
        raise AdapterError(f"{type(attn).__name__} of layer {attn.layer_idx} reuses an earlier layer's keys and values "
                           "(num_kv_shared_layers): its attention rows are not recomputed from its input")
    q_in = hidden.gather(1, query_rows[..., None].expand(-1, -1, hidden.shape[-1]))
    q = attn.q_proj(q_in).view(bsz, query_rows.shape[1], -1, hd)
    if q.shape[2] == 2 * attn.config.num_attention_heads:
        # gated attention (Qwen3.5, Qwen3-Next): each head's q_proj rows are its query, then its output gate
        q = q.view(bsz, query_rows.shape[1], -1, 2 * hd)[..., :hd]
    k = attn.k_proj(hidden).view(bsz, n_rows, -1, hd)
    if _complex_rotary(position_embeddings):
        q, k = _llama4_qk(attn, q, k, position_embeddings, query_rows)
    else:
        cos, sin = position_embeddings
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        rope = _rotary_fn(attn)
        qc = cos.gather(1, query_rows[..., None].expand(-1, -1, cos.shape[-1]))
        qs = sin.gather(1, query_rows[..., None].expand(-1, -1, sin.shape[-1]))
        if _rotates_one_tensor(rope):  # Gemma 4: apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim), on [batch, rows, heads, d]
            q = rope(q, qc, qs, unsqueeze_dim=2).transpose(1, 2)
            k = rope(k, cos, sin, unsqueeze_dim=2).transpose(1, 2)
        else:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            q = rope(q, q, qc, qs)[0]
            k = rope(k, k, cos, sin)[1]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling
    cap = getattr(attn.config, "attn_logit_softcapping", None)
    if cap and applies_softcap(type(attn)):
        scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(dim=-1)


def attention_keys(attn: torch.nn.Module, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The keys a layer's attention compares queries with, after its key norm and rotary embedding.

    Args:
        attn: the layer's attention module (``k_proj``, an optional ``k_norm``).
        hidden: ``[batch, rows, d]`` input of the attention module (after its norm).
        position_embeddings: the layer's ``(cos, sin)``, ``[batch, rows, head_dim]``.

    Returns:
        ``[batch, kv_heads, rows, head_dim]``.
    """
    if getattr(attn, "is_kv_shared_layer", False):
        raise AdapterError(f"{type(attn).__name__} of layer {attn.layer_idx} reuses an earlier layer's keys and values "
                           "(num_kv_shared_layers): its keys are not recomputed from its input")
    bsz, n_rows, _ = hidden.shape
    k = attn.k_proj(hidden).view(bsz, n_rows, -1, attn.head_dim)
    if _complex_rotary(position_embeddings):
        return _llama4_qk(attn, None, k, position_embeddings, None)[1]
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    cos, sin = position_embeddings
    rope = _rotary_fn(attn)
    if _rotates_one_tensor(rope):  # Gemma 4: apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim), on [batch, rows, heads, d]
        return rope(k, cos, sin, unsqueeze_dim=2).transpose(1, 2)
    k = k.transpose(1, 2)
    return rope(k, k, cos, sin)[1]


def _complex_rotary(position_embeddings) -> bool:
    import torch

    return isinstance(position_embeddings, torch.Tensor) and position_embeddings.is_complex()


def _llama4_qk(attn: torch.nn.Module, q: torch.Tensor | None, k: torch.Tensor, freqs: torch.Tensor,
               query_rows: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Llama 4's queries and keys as its attention module makes them (``Llama4TextAttention.forward``): the complex
    rotary frequencies on a RoPE layer (``use_rope``), then the weightless ``qk_norm`` where the layer has one; on a
    NoPE layer with ``attn_temperature_tuning`` the queries scaled by ``log1p(floor((i + 1) / floor_scale)) *
    attn_scale + 1``, `i` the query's row (HF: its sequence index). `q` ``[batch, q, heads, hd]`` (None: keys only),
    `k` ``[batch, rows, kv_heads, hd]``; returned as ``[batch, heads, ., hd]``."""
    import torch

    use_rope = getattr(attn, "use_rope", True)
    if use_rope:
        rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_emb", None)
        if rope is None:
            raise AdapterError(f"{type(attn).__name__}: cannot find the module's apply_rotary_emb to recompute attention rows")
        k = rope(k, k, freqs)[1]
        if q is not None:
            q = rope(q, q, freqs.gather(1, query_rows[..., None].expand(-1, -1, freqs.shape[-1])))[0]
    if hasattr(attn, "qk_norm"):
        k = attn.qk_norm(k)
        q = None if q is None else attn.qk_norm(q)
    if q is not None and getattr(attn, "attn_temperature_tuning", False) and not use_rope:
        scale = torch.log1p(torch.floor((query_rows.float() + 1.0) / attn.floor_scale)) * attn.attn_scale + 1.0
        q = (q * scale[..., None, None]).to(q.dtype)
    return (None if q is None else q.transpose(1, 2)), k.transpose(1, 2)


@functools.cache
def _rotates_one_tensor(rope) -> bool:
    """Whether the family's ``apply_rotary_pos_emb`` rotates one tensor, ``(x, cos, sin, unsqueeze_dim)`` (Gemma 4),
    instead of a (q, k) pair (whose function transformers may wrap in a kernel hub's ``(*args, **kwargs)``)."""
    try:
        params = inspect.signature(rope).parameters
    except (TypeError, ValueError):
        return False
    return "x" in params and "k" not in params


@functools.cache
def applies_softcap(attention_class: type) -> bool:
    """Whether the attention module really caps its scores with ``config.attn_logit_softcapping``: it passes
    ``softcap=`` to its attention function (Gemma 2 does; Gemma 3 keeps the value from the config but never
    uses it). Read from the module's own source, so the rows follow the model rather than the config."""
    try:
        return re.search(r"\bsoftcap\s*=", inspect.getsource(attention_class.forward)) is not None
    except (OSError, TypeError):  # no source to read: trust the config, as before
        return True


LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
CHUNKED = "chunked_attention"  # Llama 4: a query attends to the earlier keys of its own chunk only


@dataclass(frozen=True)
class Chunk:
    """The window of a chunked-attention layer (Llama 4): the sequence is cut into chunks of `size` tokens, counted
    from each sample's first token, and a query attends to the keys of its own chunk only (HF's
    ``masking_utils.chunked_overlay``: ``(kv_idx - left_padding) // chunk_size == (q_idx - left_padding) //
    chunk_size``). An int window is a sliding one; None is full attention."""

    size: int


def within(window: int | Chunk | None, key_rank: torch.Tensor, query_rank: torch.Tensor) -> torch.Tensor:
    """Whether a key is inside a query's window, both given by their rank among the tokens that are there (padding
    and tokens pruned by removal do not count, as HF counts a sample run alone): ``key_rank`` and ``query_rank``
    broadcast against each other. A sliding window keeps the `window` ranks up to the query; a `Chunk`, the
    query's chunk; None (full attention) everything."""
    import torch

    if window is None:
        shape = torch.broadcast_shapes(key_rank.shape, query_rank.shape)
        return torch.ones(shape, dtype=torch.bool, device=key_rank.device)
    if isinstance(window, Chunk):
        return key_rank.div(window.size, rounding_mode="floor") == query_rank.div(window.size, rounding_mode="floor")
    return key_rank > query_rank - window
LINEAR = "linear_attention"  # a recurrent token mixer (Qwen3.5's Gated DeltaNet): no attention matrix, no window
ENGINE_LAYER_TYPES = (*LAYER_TYPES, LINEAR)


def linear_layers(types: Sequence[str]) -> list[int]:
    """The indices of the linear-attention layers among `types` (each layer's type, `layer_windows`)."""
    return [i for i, t in enumerate(types) if t == LINEAR]


def llm_layer_types(adapter) -> list[str]:
    """Each LLM decoder layer's type as far as attention readings care: ``linear_attention`` where the layer's mixer
    is a linear-attention one (`Adapter.paths.linear_attn`), else ``attention``."""
    from embedlens.adapters.base import mixer_path, resolve_path

    layers = resolve_path(adapter.model, adapter.paths.llm_layers)
    linear = getattr(adapter.paths, "linear_attn", "")
    return [LINEAR if linear and mixer_path(layer, adapter.paths) == linear else "attention" for layer in layers]


def refuse_linear(layers, types: Sequence[str], what: str) -> None:
    """Refuse, by name, an attention reading or mask asked of linear-attention layers.

    Args:
        layers: the decoder layers asked for.
        types: each decoder layer's type (`layer_windows`).
        what: who asks (``"attention_knockout.layers"``), for the message.

    Raises:
        InterventionError: some of `layers` are linear-attention layers; the message lists them and the layers
            where attention applies.
    """
    bad = sorted(i for i in set(layers) if types[i] == LINEAR)
    if bad:
        attends = [i for i, t in enumerate(types) if t != LINEAR]
        raise InterventionError(
            f"{what}: decoder layer{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} "
            f"{'are' if len(bad) > 1 else 'is a'} linear-attention (Gated DeltaNet) layer{'s' if len(bad) > 1 else ''}: "
            f"a recurrent state, no attention matrix to read or mask. Attention applies in layers "
            f"{', '.join(map(str, attends)) or '(none)'}")


def attention_window(attn: torch.nn.Module, cfg) -> int | None:
    """The sliding window one attention module applies (None: full attention), read from the module itself.

    A config may carry a ``sliding_window`` that its model never uses: Hugging Face's Idefics3 tester gives the text
    model a ``LlamaConfig(sliding_window=32)`` and ``LlamaModel`` attends over every key whatever it says. So the
    window comes from what the attention does, in this order:

    - the module's own ``sliding_window`` attribute, set per layer when it is built (Qwen2/3, Gemma 2/3: the value
      for a sliding layer, None for a full one);
    - else, whether its forward passes ``sliding_window=`` to its attention function (Mistral, Phi-3 slide every
      layer by ``config.sliding_window``; their model builds the matching sliding mask from the same value);
    - else full attention (Llama and every family whose attention has no window).

    When the forward's source cannot be read (a compiled or C-extension module), the config decides, as the engine
    did before.
    """
    if "sliding_window" in vars(attn):
        return vars(attn)["sliding_window"]
    window = getattr(cfg, "sliding_window", None)
    if window is None or getattr(cfg, "use_sliding_window", True) is False:
        return None
    return window if _passes_window(type(attn)) else None


@functools.cache
def _passes_window(attention_class: type) -> bool:
    try:
        return re.search(r"\bsliding_window\s*=", inspect.getsource(attention_class.forward)) is not None
    except (OSError, TypeError):  # no source to read: trust the config
        return True


def check_layer_types(cfg, name: str, types: Sequence[str] = (), allowed: Sequence[str] = LAYER_TYPES) -> None:
    """Refuse a model whose config (or `types`, the modules' own) names a layer type the engine cannot mask.

    Called before each layer's attention module is looked up: a linear-attention layer's mixer is found only where
    the adapter names it (`ModulePaths.linear_attn`, Qwen3.5).

    Args:
        allowed: the layer types accepted: full, sliding and chunked attention, plus linear attention where the adapter
            names the linear mixer (`ENGINE_LAYER_TYPES`).

    Raises:
        AdapterError: another layer type (linear attention without a named mixer, or one the engine does not know).
    """
    bad = sorted((set(types) | set(getattr(cfg, "layer_types", None) or ())) - set(allowed))
    if bad:
        raise AdapterError(
            f"{name}: config.layer_types has {', '.join(map(repr, bad))}; the intervention engine masks "
            f"{', '.join(allowed[:-1])} and {allowed[-1]} layers only"
        )


def layer_windows(cfg, attention: Sequence[torch.nn.Module], name: str) -> tuple[list[str], list[int | None]]:
    """Each decoder layer's type and sliding window (None: full attention), read as the model reads them.

    The window is what each layer's attention module applies (`attention_window`), never a config attribute the
    model ignores. The type is the module's ``layer_type`` when it has one (Gemma 3 rotates sliding and full
    layers with different bases), else the one its window implies.

    Args:
        cfg: the language model's config.
        attention: each decoder layer's attention module, in order.
        name: the adapter's name, for errors.

    A linear-attention mixer (its ``layer_type`` says so: Qwen3.5's Gated DeltaNet) has type ``linear_attention``
    and no window.

    A chunked-attention layer (the config's ``layer_types`` says so: Llama 4) has type ``chunked_attention`` and a
    `Chunk` of ``config.attention_chunk_size`` tokens as its window.

    Raises:
        AdapterError: a layer type the engine cannot run, a sliding layer without a window, or a chunked layer
            without a positive ``attention_chunk_size``.
    """
    cfg_types = list(getattr(cfg, "layer_types", None) or ())
    types = [getattr(attn, "layer_type", None) for attn in attention]
    # a chunked layer's module says nothing of it (Llama 4): the config's layer_types does, as its model reads it
    types = [CHUNKED if i < len(cfg_types) and cfg_types[i] == CHUNKED else t for i, t in enumerate(types)]
    windows = [None if t == LINEAR else _chunk(cfg, name, i) if t == CHUNKED else attention_window(attn, cfg)
               for i, (attn, t) in enumerate(zip(attention, types))]
    types = [t or ("sliding_attention" if w is not None else "full_attention") for t, w in zip(types, windows)]
    check_layer_types(cfg, name, types, ENGINE_LAYER_TYPES if LINEAR in types else LAYER_TYPES)
    for i, (attn, t, w) in enumerate(zip(attention, types, windows)):
        if t == CHUNKED:
            continue  # `_chunk` checked its size
        if (t == "sliding_attention") != (w is not None) or (w is not None and not (isinstance(w, int) and w > 0)):
            own = vars(attn).get("sliding_window", "unset")
            raise AdapterError(
                f"{name}: decoder layer {i} ({type(attn).__name__}, layer type {t!r}) has window {w!r} (its own "
                f"sliding_window: {own!r}, config.sliding_window: {getattr(cfg, 'sliding_window', None)!r}); expected "
                f"a positive int window on sliding_attention layers and none on full_attention layers")
    return types, windows


def _chunk(cfg, name: str, layer: int) -> Chunk:
    size = getattr(cfg, "attention_chunk_size", None)
    if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        raise AdapterError(f"{name}: decoder layer {layer} is a chunked_attention layer and config.attention_chunk_size is "
                           f"{size!r}; expected a positive int")
    return Chunk(size)


def check_rotary(lm: torch.nn.Module, name: str) -> None:
    """Refuse a language model whose layers rotate with tables other than the one per layer type the engine builds:
    Molmo2 rotates its ``rope_scaling_layers`` with ``rotary_emb`` and the others with ``rotary_emb_unscaled``; where
    the two tables differ (a scaled ``rope_type`` on some layers only), the engine cannot give each layer its own.

    Raises:
        AdapterError: the two tables differ and both are in use.
    """
    import torch

    other, kinds = getattr(lm, "rotary_emb_unscaled", None), set(getattr(lm, "rope_types", None) or ())
    if other is None or len(kinds) < 2:
        return
    scaled = lm.rotary_emb
    if torch.equal(scaled.inv_freq, other.inv_freq) and scaled.attention_scaling == other.attention_scaling:
        return
    raise AdapterError(f"{name}: its language model rotates layers {list(lm.config.rope_scaling_layers)} with a scaled "
                       f"rotary table ({lm.config.rope_parameters.get('rope_type')!r}) and the others with an unscaled "
                       "one; the intervention engine builds one table per layer type, so it does not run this model "
                       "(traces, which run the model's own forward, do)")


def rotary_embeddings(lm: torch.nn.Module, x: torch.Tensor, positions: torch.Tensor, layer_types) -> dict:
    """``{layer type: (cos, sin)}`` from the language model's own ``rotary_emb``; Gemma 3's takes the layer type
    (sliding and global layers rotate with different bases), the others one set for every layer."""
    if not _takes_layer_type(type(lm.rotary_emb)):
        pe = lm.rotary_emb(x, position_ids=positions)
        return {t: pe for t in set(layer_types)}
    return {t: lm.rotary_emb(x, positions, layer_type=t) for t in set(layer_types)}


@functools.cache
def _takes_layer_type(rotary_class: type) -> bool:
    return "layer_type" in inspect.signature(rotary_class.forward).parameters


def window_keys(valid: torch.Tensor, query_pos: torch.Tensor, window: int | Chunk) -> torch.Tensor:
    """``[batch, q, seq]`` bool: keys within `window` tokens before each query (or in its `Chunk`), counted over the
    tokens that are there (`valid`, ``[batch, seq]``; padding does not count), as Hugging Face counts a sliding
    window (and a chunk) in sequence index for a sample run alone."""
    rank = valid.long().cumsum(dim=1) - 1
    return within(window, rank[:, None, :], rank.gather(1, query_pos)[..., None])
