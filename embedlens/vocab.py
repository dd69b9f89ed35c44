"""Nearest vocabulary rows by cosine: the one vocabulary search every lens, the partition and anchor discovery use."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from embedlens.vocab_index import approximate_nearest, check_search


def nearest_vocab(
    x: torch.Tensor,
    vocab: torch.Tensor,
    k: int,
    chunk_size: int = 8192,
    normalized_vocab: bool = False,
    search: Literal["exact", "approximate"] = "exact",
    n_probe: int = 8,
    n_candidates: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarity of each row of `x` against the vocabulary rows.

    Exact search scans the vocabulary in chunks of `chunk_size` rows (each
    normalised on the fly, in float32), so peak extra memory is about
    ``[tokens, chunk_size]`` plus one chunk, whatever the vocabulary size; no
    normalised copy of the matrix is ever made.

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
        n_probe: approximate search: inverted lists probed per token.
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
