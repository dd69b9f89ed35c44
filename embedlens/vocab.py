"""Nearest vocabulary rows by cosine: the one vocabulary search every lens, the partition and anchor discovery use."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from embedlens.vocab_index import approximate_nearest, check_search

if TYPE_CHECKING:
    from embedlens.adapters.base import Batch
    from embedlens.sites import Site


def nearest_vocab(
    x: torch.Tensor,
    vocab: torch.Tensor,
    k: int,
    chunk_size: int = 4096,
    normalized_vocab: bool = False,
    search: Literal["exact", "approximate"] = "exact",
    n_probe: int | None = None,
    n_candidates: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarity of each row of `x` against the vocabulary rows.

    Exact search scans the vocabulary in chunks of `chunk_size` rows (each
    normalised on the fly, in float32), so peak extra memory is about
    ``[tokens, chunk_size]`` plus one chunk, whatever the vocabulary size; no
    normalised copy of the matrix is ever made. The default 4096 rows keeps the
    ``[tokens, chunk]`` block of a few hundred tokens in cache: on one CPU core it
    measured 11-19% faster than 8192 for 576-2304 tokens x 32k x 1024.

    Approximate search (`embedlens.vocab_index`, needs FAISS) takes
    `n_candidates` rows per token from the `n_probe` nearest lists of an IVF
    index built once per matrix, and scores them exactly: the result is the
    exact top-k whenever the true neighbours are among the candidates. Its
    recall depends on the matrix; measure it with `vocab_index.recall_at_k`.

    Args:
        x: `[tokens, d]` vectors.
        vocab: `[vocab, d]` embedding (or unembedding) matrix.
        k: neighbours to keep.
        chunk_size: vocabulary rows per chunk.
        normalized_vocab: `vocab` rows already have unit norm.
        search: ``"exact"`` or ``"approximate"``.
        n_probe: approximate search: inverted lists probed per token (default
            `vocab_index.default_n_probe`: about 1 in 45 of the lists, at least 8).
        n_candidates: approximate search: rows re-ranked per token (default ``max(2k, 16)``).

    Returns:
        (scores `[tokens, k]`, ids `[tokens, k]`), best first.

    Raises:
        EmbedLensError: an unknown `search`, or FAISS missing for an approximate one.

    Example:
        >>> v = torch.eye(4)
        >>> scores, ids = nearest_vocab(torch.tensor([[0.0, 2.0, 1.0, 0.0]]), v, k=2, chunk_size=3)
        >>> ids.tolist()
        [[1, 2]]
    """
    n = x.shape[0]
    k = min(k, vocab.shape[0])
    xn = F.normalize(x.to(vocab.device, torch.float32), dim=-1)
    if search != "exact":
        check_search("nearest_vocab", search, n_probe)
        c = max(2 * k, 16) if n_candidates is None else n_candidates
        return approximate_nearest(xn, vocab, k, n_probe, c, normalized_vocab)
    best_s = torch.full((n, 0), float("-inf"), device=vocab.device)
    best_i = torch.zeros((n, 0), dtype=torch.long, device=vocab.device)
    for start in range(0, vocab.shape[0], chunk_size):
        chunk = vocab[start : start + chunk_size].float()
        sims = xn @ chunk.T  # [tokens, chunk]
        if not normalized_vocab:
            sims.div_(chunk.norm(dim=-1).clamp_min(1e-12))  # as F.normalize, without a normalised copy
        s, i = sims.topk(min(k, sims.shape[1]), dim=-1)
        cand_s = torch.cat([best_s, s], dim=1)
        cand_i = torch.cat([best_i, i + start], dim=1)
        best_s, order = cand_s.topk(min(k, cand_s.shape[1]), dim=-1)
        best_i = cand_i.gather(1, order)
    return best_s, best_i


def visual_nearest(
    batch: "Batch",
    site: "Site",
    h: torch.Tensor,
    vocab: torch.Tensor,
    k: int,
    chunk_size: int = 4096,
    search: Literal["exact", "approximate"] = "exact",
    n_probe: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`nearest_vocab` of the batch's visual tokens at one site, computed once per pass.

    The layer-0 lens and the partition of an EmbedLens plan read the same
    activations and search the same matrix with the same `k`: the first caller
    computes the search, the next one of the same pass gets the same tensors
    back. The memo lives on the batch and is keyed by the site, the very
    activation tensor `h` (identity, through a weak reference, so a later pass
    over the same batch with new activations never reads a stale result and
    the memo never keeps activations alive), the
    matrix (storage, shape and version counter), `k`, `search` and `n_probe`;
    `chunk_size` changes only the memory a search takes, not its result.

    Args:
        batch: the batch whose visual tokens (`TokenRoles.visual_tokens` order) are searched.
        site: the site `h` was read at.
        h: `[batch, seq, d]` activations at `site`.
        vocab, k, chunk_size, search, n_probe: as `nearest_vocab`.

    Returns:
        (scores `[tokens, k]`, ids `[tokens, k]`), on `vocab`'s device, best first.
    """
    key = (site, vocab.data_ptr(), tuple(vocab.shape), vocab._version, k, search, n_probe)
    hit = batch.memo.get(key)
    if hit is not None and hit[0]() is h:
        return hit[1], hit[2]
    vt = batch.roles.visual_tokens()
    x = h[vt["sample"].to(h.device), vt["position"].to(h.device)].to(vocab.device)  # [tokens, d]
    scores, ids = nearest_vocab(x, vocab, k, chunk_size, search=search, n_probe=n_probe)
    batch.memo[key] = (weakref.ref(h), scores, ids)  # weak: the memo never keeps a pass's activations alive
    return scores, ids
