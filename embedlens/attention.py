"""Attention rows recomputed from a layer's queries and keys, and what each LLM layer's mask and rotary
embeddings depend on (its type: full or sliding-window attention).

Only the rows asked for are computed, never the full pattern, so this works
whatever attention implementation (SDPA, eager) runs the model.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys

import torch

from embedlens.errors import AdapterError


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
        position_embeddings: the layer's ``(cos, sin)``, ``[batch, rows, head_dim]``.
        query_rows: ``[batch, q]`` row indices of the queries.
        allowed: ``[batch, q, rows]`` bool, what each query may attend to.
    """
    bsz, n_rows, _ = hidden.shape
    hd = attn.head_dim
    cos, sin = position_embeddings
    q_in = hidden.gather(1, query_rows[..., None].expand(-1, -1, hidden.shape[-1]))
    q = attn.q_proj(q_in).view(bsz, query_rows.shape[1], -1, hd)
    k = attn.k_proj(hidden).view(bsz, n_rows, -1, hd)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    rope = _rotary_fn(attn)
    qc = cos.gather(1, query_rows[..., None].expand(-1, -1, cos.shape[-1]))
    qs = sin.gather(1, query_rows[..., None].expand(-1, -1, sin.shape[-1]))
    q = rope(q, q, qc, qs)[0]
    k = rope(k, k, cos, sin)[1]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling
    cap = getattr(attn.config, "attn_logit_softcapping", None)
    if cap and applies_softcap(type(attn)):
        scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(dim=-1)


@functools.cache
def applies_softcap(attention_class: type) -> bool:
    """Whether the attention module really caps its scores with ``config.attn_logit_softcapping``: it passes
    ``softcap=`` to its attention function (Gemma 2 does; Gemma 3 keeps the value from the config but never
    uses it). Read from the module's own source, so the rows follow the model rather than the config."""
    try:
        return re.search(r"\bsoftcap\s*=", inspect.getsource(attention_class.forward)) is not None
    except (OSError, TypeError):  # no source to read: trust the config, as before
        return True


LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_windows(cfg, n_layers: int, name: str) -> tuple[list[str], list[int | None]]:
    """Each decoder layer's type and sliding window (None: full attention), read as the model reads them.

    ``config.layer_types`` when the config has it (Gemma 2/3, Qwen2, Mistral in recent transformers); without
    it, every layer slides when ``sliding_window`` is set (older Mistral configs), unless
    ``use_sliding_window`` is False (Qwen2's switch).

    Raises:
        AdapterError: a layer type the engine cannot mask (chunked or linear attention), or a sliding layer
            without a window.
    """
    types = list(getattr(cfg, "layer_types", None) or ())
    window = getattr(cfg, "sliding_window", None)
    if not types:
        slides = window is not None and getattr(cfg, "use_sliding_window", True)
        types = ["sliding_attention" if slides else "full_attention"] * n_layers
    bad = sorted(set(types) - set(LAYER_TYPES))
    if bad:
        raise AdapterError(
            f"{name}: config.layer_types has {', '.join(map(repr, bad))}; the intervention engine masks "
            f"{' and '.join(LAYER_TYPES)} layers only"
        )
    if len(types) < n_layers:
        raise AdapterError(f"{name}: config.layer_types names {len(types)} layers; the language model has {n_layers}")
    if "sliding_attention" in types and not (isinstance(window, int) and window > 0):
        raise AdapterError(f"{name}: config.layer_types has sliding_attention layers but config.sliding_window is {window!r}; expected a positive int")
    types = types[:n_layers]
    return types, [window if t == "sliding_attention" else None for t in types]


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


def window_keys(valid: torch.Tensor, query_pos: torch.Tensor, window: int) -> torch.Tensor:
    """``[batch, q, seq]`` bool: keys within `window` tokens before each query, counted over the tokens that are
    there (`valid`, ``[batch, seq]``; padding does not count), as Hugging Face counts a sliding window in sequence
    index for a sample run alone."""
    rank = valid.long().cumsum(dim=1) - 1
    return rank[:, None, :] > rank.gather(1, query_pos)[..., None] - window
