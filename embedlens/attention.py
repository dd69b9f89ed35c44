"""Attention rows recomputed from a layer's queries and keys.

Only the rows asked for are computed, never the full pattern, so this works
whatever attention implementation (SDPA, eager) runs the model.
"""

from __future__ import annotations

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
    if cap:
        scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(dim=-1)
