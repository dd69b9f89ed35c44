"""Nearest vocabulary rows by cosine: the one vocabulary search every lens, the partition and anchor discovery use."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Literal

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
    fast: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarity of each row of `x` against the vocabulary rows.

    Exact search scans the vocabulary in chunks of `chunk_size` rows (each
    normalised on the fly, in float32), so peak extra memory is about
    ``[tokens, chunk_size]`` plus one chunk, whatever the vocabulary size; no
    normalised copy of the matrix is ever made. The default 4096 rows keeps the
    ``[tokens, chunk]`` block of a few hundred tokens in cache: on one CPU core it
    measured 11-19% faster than 8192 for 576-2304 tokens x 32k x 1024.

    With `fast` (the default on a GPU), the exact search takes candidates from
    a bf16 product and re-ranks them in float32, with a proof that it returns
    the float32 top-k (`certified_nearest`); on the CPU the float32 product is
    the faster exact search and stays the default.

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
        fast: exact search: bf16 candidates re-ranked in float32 (same top-k); default: on a CUDA device.

    Returns:
        (scores `[tokens, k]`, ids `[tokens, k]`), best first.

    Raises:
        EmbedLensError: an unknown `search`, or FAISS missing for an approximate one.

    Example:
        >>> import torch
        >>> v = torch.eye(4)
        >>> scores, ids = nearest_vocab(torch.tensor([[0.0, 2.0, 1.0, 0.0]]), v, k=2, chunk_size=3)
        >>> ids.tolist()
        [[1, 2]]
    """
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    k = min(k, vocab.shape[0])
    xn = F.normalize(x.to(vocab.device, torch.float32), dim=-1)
    if search != "exact":
        check_search("nearest_vocab", search, n_probe)
        c = max(2 * k, 16) if n_candidates is None else n_candidates
        return approximate_nearest(xn, vocab, k, n_probe, c, normalized_vocab)
    if fast is None:
        fast = vocab.device.type == "cuda"
    if fast and vocab.shape[0] > k + FAST_CANDIDATES:
        return certified_nearest(xn, vocab, k, chunk_size, normalized_vocab)
    return _exact_f32(xn, vocab, k, chunk_size, normalized_vocab)


def _exact_f32(xn: torch.Tensor, vocab: torch.Tensor, k: int, chunk_size: int, normalized_vocab: bool = False,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 search: `[tokens, d]` unit rows `xn` against every vocabulary row, chunk by chunk."""
    import torch

    n = xn.shape[0]
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


#: Candidates per token, beyond k, that the bf16 pass of the fast exact search keeps for the float32 re-rank.
FAST_CANDIDATES = 64
#: Relative error of one bf16 rounding, doubled (round-to-nearest is within 2^-9; 2^-8 also covers the float32
#: division that follows).
_BF16_REL = 2.0**-8


class _NoReducedBf16Reduction:
    """cuBLAS may add bf16 products in bf16 (split-K) unless told not to; the error bound assumes float32 sums."""

    def __init__(self, device: torch.device):
        self.on = device.type == "cuda"

    def __enter__(self):
        import torch

        if self.on:
            self.saved = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False

    def __exit__(self, *exc):
        import torch

        if self.on:
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = self.saved


def certified_candidates(
    xn: torch.Tensor, vocab: torch.Tensor, k: int, chunk_size: int = 4096, normalized_vocab: bool = False,
    n_extra: int = FAST_CANDIDATES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 candidates re-ranked in float32, and for each token whether they provably hold the float32 top-k.

    The bf16 pass scores every row as ``fl(xq . vq) / |v|`` (``xq``, ``vq``: the
    unit query and the row rounded to bf16; products summed in float32) and
    keeps the ``c = k + n_extra`` best rows per token. Its error against the
    exact cosine is bounded per token (Cauchy-Schwarz on the rounding errors
    actually made, and the classic ``gamma_d = d u / (1 - d u)`` bound on a
    float32 sum of d products in any order):

        |s_hat - s| <= |x - xq| A + |xq| E + gamma_d |xq| Q + 2^-8 |s_hat|

    with A, E, Q the largest ``|v| / n``, ``|v - vq| / n``, ``|vq| / n`` over the
    rows (n: the norm divided by; E = 0 when the matrix is bf16 already). Every
    row outside the candidates has ``s_hat`` at most the (c+1)-th best bf16
    score, so its float32 score is at most that plus the bound (plus the float32
    search's own rounding, ``rho = gamma_d A``). A token is certified when this is
    below the k-th re-ranked score minus ``2 rho``: then the float32 search's
    top-k is among the candidates, and the re-rank (float32, as that search)
    returns it.

    Args:
        xn: `[tokens, d]` unit queries (float32).
        vocab: `[vocab, d]` matrix, any float dtype, more than ``k + n_extra`` rows.
        k, chunk_size, normalized_vocab: as `nearest_vocab`.
        n_extra: candidates kept beyond k.

    Returns:
        (scores `[tokens, k]`, ids `[tokens, k]`, certified `[tokens]` bool), on the device; nothing is copied to the host.
    """
    import torch

    n, d = xn.shape
    c = k + n_extra
    if vocab.shape[0] <= c:
        raise ValueError(f"certified_candidates: {vocab.shape[0]} vocabulary rows; needs more than k + n_extra = {c}")
    xq = xn.to(torch.bfloat16)
    xqf = xq.float()
    ex = (xn - xqf).norm(dim=-1)  # [tokens]
    nq = xqf.norm(dim=-1)  # [tokens]
    a = xn.new_zeros(())
    e = xn.new_zeros(())
    q = xn.new_zeros(())
    norms = []
    best_s = torch.full((n, 0), float("-inf"), device=vocab.device)
    best_i = torch.zeros((n, 0), dtype=torch.long, device=vocab.device)
    with _NoReducedBf16Reduction(vocab.device):
        for start in range(0, vocab.shape[0], chunk_size):
            chunk = vocab[start : start + chunk_size]
            cf = chunk.float()
            vnorm = cf.norm(dim=-1)
            div = torch.ones_like(vnorm) if normalized_vocab else vnorm.clamp_min(1e-12)
            norms.append(div)
            cq = chunk if chunk.dtype == torch.bfloat16 else chunk.to(torch.bfloat16)
            if cq is not chunk:
                e = torch.maximum(e, ((cf - cq.float()).norm(dim=-1) / div).max())
                q = torch.maximum(q, (cq.float().norm(dim=-1) / div).max())
            else:
                q = torch.maximum(q, (vnorm / div).max())
            a = torch.maximum(a, (vnorm / div).max())
            sims = (xq @ cq.T).float().div_(div)  # [tokens, chunk]
            s, i = sims.topk(min(c + 1, sims.shape[1]), dim=-1)
            cand_s = torch.cat([best_s, s], dim=1)
            cand_i = torch.cat([best_i, i + start], dim=1)
            best_s, order = cand_s.topk(min(c + 1, cand_s.shape[1]), dim=-1)
            best_i = cand_i.gather(1, order)
    norms_all = torch.cat(norms)  # [vocab]
    cand = best_i[:, :c]  # [tokens, c]
    nxt = best_s[:, c]  # [tokens] best bf16 score outside the candidates
    # float32 re-rank, a few tokens at a time: [t, c, d] gathered rows stay under ~256 MB
    step = max(1, (1 << 26) // (c * d))
    scores, ids = [], []
    for t0 in range(0, n, step):
        rows = vocab[cand[t0 : t0 + step]].float()  # [t, c, d]
        s = torch.bmm(rows, xn[t0 : t0 + step, :, None]).squeeze(-1) / norms_all[cand[t0 : t0 + step]]  # [t, c]
        top_s, order = s.topk(k, dim=-1)
        scores.append(top_s)
        ids.append(cand[t0 : t0 + step].gather(1, order))
    scores_t, ids_t = torch.cat(scores), torch.cat(ids)
    u = 2.0**-24
    gamma = d * u / (1 - d * u)
    rho = gamma * a * (1 + 2 * u) + 2 * u
    bound = nxt + nxt.abs() * _BF16_REL + ex * a + nq * e + gamma * nq * q + rho
    certified = bound < scores_t[:, k - 1] - 2 * rho
    return scores_t, ids_t, certified


def certified_nearest(
    xn: torch.Tensor, vocab: torch.Tensor, k: int, chunk_size: int = 4096, normalized_vocab: bool = False,
    n_extra: int = FAST_CANDIDATES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 top-k by way of bf16 candidates (`certified_candidates`); tokens whose candidates are not
    proven to hold it are searched again in float32.

    The one host synchronisation is the question whether any token needs that (once per call, whatever the
    number of tokens or layers searched in it).
    """
    scores, ids, certified = certified_candidates(xn, vocab, k, chunk_size, normalized_vocab, n_extra)
    if not bool(certified.all()):
        redo = (~certified).nonzero().flatten()
        s, i = _exact_f32(xn[redo], vocab, k, chunk_size, normalized_vocab)
        scores[redo], ids[redo] = s, i
    return scores, ids


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


#: Elements of the ``[queries, chunk]`` similarity block one search of several layers may hold at once (1 GiB of
#: float32): layers are searched together up to this, so a deep model's all-layer lens stays within it.
LAYERS_BLOCK = 1 << 28


def visual_nearest_layers(
    batch: "Batch",
    sites: "list[Site]",
    acts: "dict[Site, torch.Tensor]",
    vocab: torch.Tensor,
    k: int,
    chunk_size: int = 4096,
    search: Literal["exact", "approximate"] = "exact",
    n_probe: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`visual_nearest` of the batch's visual tokens at several sites, searched together.

    The visual tokens are gathered at every site not already searched in this
    pass (the memo of `visual_nearest`, which this fills too) with index tensors
    moved to the device once, and searched as one query matrix (in groups of
    sites whose ``[queries, chunk_size]`` block stays under `LAYERS_BLOCK`
    elements; one site at a time on the CPU): no host synchronisation per layer.

    Returns:
        (scores `[sites, tokens, k]`, ids `[sites, tokens, k]`) on `vocab`'s device, best first.
    """
    import torch

    keys = [(site, vocab.data_ptr(), tuple(vocab.shape), vocab._version, k, search, n_probe) for site in sites]
    found: dict = {}
    for site, key in zip(sites, keys):
        hit = batch.memo.get(key)
        if hit is not None and hit[0]() is acts[site]:
            found[site] = (hit[1], hit[2])
    missing = [s for s in sites if s not in found]
    if missing:
        vt = batch.roles.visual_tokens()
        index: dict = {}  # device -> (sample, position) index tensors, moved once

        def rows(site):
            h = acts[site]
            if h.device not in index:
                index[h.device] = (vt["sample"].to(h.device), vt["position"].to(h.device))
            s, p = index[h.device]
            return h[s, p].to(vocab.device)  # [tokens, d]

        n_tok = len(vt["sample"])
        # on the CPU a search per site costs nothing more and keeps `nearest_vocab`'s memory bound of one site
        per = 1 if vocab.device.type == "cpu" else max(1, LAYERS_BLOCK // max(1, n_tok * min(chunk_size, vocab.shape[0])))
        for g in range(0, len(missing), per):
            group = missing[g : g + per]
            x = torch.cat([rows(site) for site in group])  # [sites * tokens, d]
            sc, ids = nearest_vocab(x, vocab, k, chunk_size, search=search, n_probe=n_probe)
            for j, site in enumerate(group):
                found[site] = (sc[j * n_tok : (j + 1) * n_tok], ids[j * n_tok : (j + 1) * n_tok])
                batch.memo[keys[sites.index(site)]] = (weakref.ref(acts[site]), *found[site])
    return torch.stack([found[s][0] for s in sites]), torch.stack([found[s][1] for s in sites])


_STRINGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def vocab_strings(tokenizer, n: int):
    """``[n]`` numpy array of the token string of every id 0..n-1 (`convert_ids_to_tokens`; None where the
    tokenizer has no token for an id), built once per tokenizer and size: tables index it with whole id arrays."""
    import numpy as np

    try:
        cached = _STRINGS.get(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: built every time
        cached = {}
    if n not in cached:
        out = np.empty(n, dtype=object)
        out[:] = tokenizer.convert_ids_to_tokens(list(range(n)))
        cached[n] = out
        try:
            _STRINGS[tokenizer] = cached
        except TypeError:
            pass
    return cached[n]
