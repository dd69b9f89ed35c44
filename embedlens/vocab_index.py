"""Approximate vocabulary search: candidates from an IVF index, then an exact re-rank.

An exact vocabulary search scores every token against every row of the
matrix (``[tokens, vocab]``); with a 152k vocabulary that dominates an
all-layer lens. The approximate search asks an inverted-file index (k-means
cells from FAISS, inner product on the unit-normalised rows, scanned cell by
cell in matrix products) for `n_candidates` rows per token from the
`n_probe` lists nearest to it, then
scores those candidates exactly, from the matrix itself, as the exact search
does. The top-k returned is therefore the exact top-k whenever the true
neighbours are among the candidates; it can only miss a neighbour whose list
was not probed. How often that happens depends on the matrix and the
queries, so it is measured (`recall_at_k`), never assumed: on a matrix with
no cluster structure (a random Gaussian one) no IVF index can be both fast
and complete.

The index is built once per matrix and kept in a small cache keyed by the
tensor's storage, shape, dtype, version counter and a fingerprint of its
values, so a lens reading every layer of every batch builds it once. It holds
a float32 copy of the normalised matrix (``vocab x d x 4`` bytes).

FAISS is an optional dependency: ``pip install 'embedlens[fast]'``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

from embedlens.errors import EmbedLensError, PlanError

SEARCHES = ("exact", "approximate")
_CACHE_SIZE = 4
_CACHE: "OrderedDict[tuple, VocabIndex]" = OrderedDict()


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise EmbedLensError(
            "search: 'approximate' needs FAISS, which is not installed; install it with "
            "pip install 'embedlens[fast]' (or pip install faiss-cpu), or use search: exact"
        ) from None
    return faiss


def check_search(owner: str, search: str, n_probe: int | None) -> None:
    """Validate a probe's `search` / `n_probe` parameters (and that FAISS is there when needed).

    Args:
        owner: the probe's name, for the message (``embedding_lens``).
        search: ``"exact"`` or ``"approximate"``.
        n_probe: inverted lists probed per token (None: `default_n_probe`).

    Raises:
        PlanError: an unknown `search`, `n_probe` < 1, or FAISS missing for an approximate search.
    """
    if search not in SEARCHES:
        raise PlanError(f"{owner}.search must be one of {list(SEARCHES)}; got {search!r}")
    if n_probe is not None and n_probe < 1:
        raise PlanError(f"{owner}.n_probe must be >= 1; got {n_probe}")
    if search == "approximate":
        try:
            _faiss()
        except EmbedLensError as e:
            raise PlanError(f"{owner}.{e}") from None


def default_n_lists(n_rows: int) -> int:
    """Inverted lists for a matrix of `n_rows`: about 2 sqrt(rows), with >= 39 training rows per list (FAISS's minimum)."""
    return max(1, min(round(2 * math.sqrt(n_rows)), n_rows // 39))


def default_n_probe(n_lists: int) -> int:
    """Lists probed per query by default: about 1 in 45 of them (a fixed share of the rows, so recall holds as
    the vocabulary grows), at least 8. With `default_n_lists` that is 8 for 32k rows and 18 for 152k; measured
    recall@3 on a clustered matrix with queries near its rows: >= 0.99 at both (`benchmarks/`)."""
    return min(n_lists, max(8, math.ceil(n_lists / 45)))


class VocabIndex:
    """An inverted-file inner-product index over the unit-normalised rows of one matrix.

    FAISS's k-means (seeded) finds the `n_lists` cells; each row belongs to the cell of highest inner
    product with its centroid, and the rows are stored grouped by cell (``[vocab, d]`` float32). A search
    scans cell by cell rather than query by query: the queries that probe a cell are scored against its
    rows in one matrix product, so the scan runs at matrix-product speed, like the exact search it
    replaces, over a fraction (about `n_probe` / `n_lists`) of the rows.

    Args:
        vocab: `[vocab, d]` matrix (any float dtype, any device; the index lives on the CPU).
        n_lists: inverted lists (k-means cells); default `default_n_lists`.
        chunk_size: rows normalised and assigned at a time.
    """

    def __init__(self, vocab: torch.Tensor, n_lists: int | None = None, chunk_size: int = 8192):
        import torch
        import torch.nn.functional as F

        faiss = _faiss()
        n, d = vocab.shape
        self.n_lists = default_n_lists(n) if n_lists is None else n_lists
        if not 1 <= self.n_lists <= n:
            raise EmbedLensError(f"vocab index: n_lists must be in 1..{n} (the vocabulary size); got {self.n_lists}")
        rows = F.normalize(vocab.detach().to("cpu", torch.float32), dim=-1)  # [vocab, d]
        # k-means on a sample of 40 rows per list, 10 iterations: a 152k x 1024 matrix trains in
        # seconds, not minutes; rougher cells cost recall only through n_probe, which is measured
        kmeans = faiss.Kmeans(d, self.n_lists, niter=10, seed=1234, spherical=False,
                              max_points_per_centroid=40, verbose=False)
        faiss.omp_set_num_threads(torch.get_num_threads())
        kmeans.train(rows.numpy())
        self.centroids = torch.from_numpy(kmeans.centroids).clone()  # [n_lists, d]
        cell = torch.cat([(rows[i : i + chunk_size] @ self.centroids.T).argmax(dim=-1) for i in range(0, n, chunk_size)])
        self.row_ids = torch.argsort(cell, stable=True)  # row ids grouped by cell, ascending within a cell
        self.rows = rows[self.row_ids]  # [vocab, d], cell by cell
        sizes = torch.bincount(cell, minlength=self.n_lists)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).tolist()
        self.n_rows = n

    def candidates(self, xn: torch.Tensor, n_candidates: int, n_probe: int | None = None) -> torch.Tensor:
        """The `n_candidates` rows of highest cosine among the `n_probe` lists nearest each query.

        Args:
            xn: `[tokens, d]` unit-normalised queries.
            n_candidates: rows returned per query.
            n_probe: lists probed per query (all of them when >= `n_lists`: then the search is exhaustive;
                None: `default_n_probe`).

        Returns:
            `[tokens, n_candidates]` row ids, best first, -1 where the probed lists held fewer rows.
        """
        import torch

        q = xn.detach().to("cpu", torch.float32)
        n_probe = default_n_probe(self.n_lists) if n_probe is None else n_probe
        t, p, c = q.shape[0], min(n_probe, self.n_lists), min(n_candidates, self.n_rows)
        probe = (q @ self.centroids.T).topk(p, dim=-1).indices  # [tokens, p] cells, nearest first
        best = torch.full((t, p, c), float("-inf"))  # per query and probed cell: its top rows' scores
        best_ids = torch.full((t, p, c), -1, dtype=torch.long)
        flat = probe.flatten()
        order = torch.argsort(flat, stable=True)
        cells, counts = torch.unique_consecutive(flat[order], return_counts=True)
        for cell, pairs in zip(cells.tolist(), order.split(counts.tolist())):
            lo, hi = self.offsets[cell], self.offsets[cell + 1]
            if hi == lo:
                continue
            tok, slot = pairs // p, pairs % p
            scores = q[tok] @ self.rows[lo:hi].T  # [queries probing the cell, its rows]
            top, at = scores.topk(min(c, hi - lo), dim=-1)
            best[tok, slot, : top.shape[1]] = top
            best_ids[tok, slot, : top.shape[1]] = self.row_ids[lo + at]
        top, at = best.view(t, p * c).topk(c, dim=-1)
        ids = best_ids.view(t, p * c).gather(1, at)
        return ids.masked_fill_(top == float("-inf"), -1)


def _key(vocab: torch.Tensor, n_lists: int | None) -> tuple:
    """Identity of a matrix: storage, layout, version counter, and a fingerprint of some of its values.

    The fingerprint guards against a freed matrix whose memory a new one of the same shape reuses.
    """
    import torch

    n = vocab.shape[0]
    probe_rows = torch.linspace(0, n - 1, steps=min(n, 16)).long().to(vocab.device)
    fingerprint = vocab[probe_rows].double().sum(dim=-1).tolist()
    return (vocab.data_ptr(), tuple(vocab.shape), tuple(vocab.stride()), vocab.dtype, str(vocab.device),
            vocab._version, n_lists, tuple(fingerprint))


def vocab_index(vocab: torch.Tensor, n_lists: int | None = None) -> VocabIndex:
    """The (cached) index of `vocab`: built on first use, then reused while the matrix is unchanged."""
    key = _key(vocab, n_lists)
    index = _CACHE.get(key)
    if index is None:
        index = _CACHE[key] = VocabIndex(vocab, n_lists)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return index


def clear_cache() -> None:
    """Forget every cached index (frees their memory)."""
    _CACHE.clear()


def approximate_nearest(
    xn: torch.Tensor,
    vocab: torch.Tensor,
    k: int,
    n_probe: int | None,
    n_candidates: int,
    normalized_vocab: bool = False,
    token_chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine of unit-normalised queries: index candidates, re-ranked exactly from `vocab`.

    Args:
        xn: `[tokens, d]` unit-normalised float32 queries, on `vocab`'s device.
        vocab: `[vocab, d]` matrix.
        k: neighbours to keep.
        n_probe: inverted lists probed per query (None: `default_n_probe`).
        n_candidates: rows re-ranked per query (at least `k`).
        normalized_vocab: `vocab` rows already have unit norm.
        token_chunk: queries re-ranked at a time (bounds the ``[tokens, candidates, d]`` gather).

    Returns:
        (scores `[tokens, k]`, ids `[tokens, k]`), best first; a query whose probed lists
        held fewer than `k` rows gets -inf scores and id -1 in the missing places.
    """
    import torch

    cand = vocab_index(vocab).candidates(xn, max(n_candidates, k), n_probe).to(vocab.device)  # [tokens, c]
    scores, ids = [], []
    for start in range(0, xn.shape[0], token_chunk):
        c = cand[start : start + token_chunk]
        rows = vocab[c.clamp_min(0)].float()  # [t, c, d]
        s = torch.einsum("td,tcd->tc", xn[start : start + token_chunk], rows)
        if not normalized_vocab:
            s.div_(rows.norm(dim=-1).clamp_min(1e-12))
        s.masked_fill_(c < 0, float("-inf"))
        top_s, order = s.topk(min(k, s.shape[1]), dim=-1)
        scores.append(top_s)
        ids.append(c.gather(1, order))
    return torch.cat(scores), torch.cat(ids)


def recall_at_k(approximate_ids: torch.Tensor, exact_ids: torch.Tensor) -> float:
    """Mean share of each query's exact top-k that the approximate top-k found.

    Example:
        >>> import torch
        >>> recall_at_k(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[3, 2, 1], [4, 5, 7]]))
        0.8333333333333334
    """
    k = exact_ids.shape[1]
    hits = (approximate_ids[:, :, None] == exact_ids[:, None, :]).any(dim=1).sum().item()  # exact ids found
    return hits / (k * exact_ids.shape[0])
