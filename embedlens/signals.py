"""Per-token signals that flag sink and dead visual tokens without a vocabulary rule.

Each function is a plain tensor computation, shared by the partition
(`embedlens.groups`) and the probes that report these signals.

Example:
    >>> import torch
    >>> feats = torch.ones(1, 5, 4); feats[0, 3] *= 30
    >>> vit_norm_outliers(feats, sigma=1.5)[0].tolist()
    [False, False, False, True, False]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedlens.sites import Site

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch


def vit_norm_outliers(
    feats: torch.Tensor, sigma: float = 2.0, threshold: float | None = None, prefix: int = 0, ratio: float = 2.0,
    images: torch.Tensor | None = None,
) -> torch.Tensor:
    """High-norm vision-tower tokens (registers / ViT sinks).

    Args:
        feats: ``[images, tokens, d]`` vision-layer output.
        sigma: flag norms above mean + sigma * std of that image's patch norms ...
        threshold: (an absolute norm threshold instead of the per-image rule)
        prefix: tokens before the first patch (CLIP's CLS) left out of the statistics.
        ratio: ... and at least `ratio` times the image's median patch norm (see `norm_outliers`).
        images: ``[rows, tokens - prefix]`` image of each patch where one row holds several images
            (`Adapter.tower_images`: Qwen-VL's packed tower); the statistics are then each image's.

    Returns:
        ``[images, tokens - prefix]`` bool, one entry per patch.
    """
    return norm_outliers(feats[:, prefix:].float().norm(dim=-1), sigma, threshold, ratio, images)


def norm_outliers(
    norms: torch.Tensor, sigma: float = 2.0, threshold: float | None = None, ratio: float = 2.0,
    images: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[images, patches]`` norms -> bool: above `threshold`, else above mean + sigma * std of their row
    and at least `ratio` x their row's median. With `images` (``[rows, patches]`` ids, for a row that packs
    several images), the statistics are those of each patch's own image.

    The sigma rule alone (the study's) flags the upper tail of *any* image, about
    one patch in 40 at sigma 2, registers or not; registers are several times the
    typical norm (Darcet et al.), so the ratio keeps the tail out: on the zoo
    models (no registers) the flagged patches sit at 1.2-1.4x the median, the
    planted register at 11x.
    """
    if threshold is not None:
        return norms > threshold
    if images is not None:
        return _segment_outliers(norms, images.to(norms.device), sigma, ratio)
    mean, std = norms.mean(dim=1, keepdim=True), norms.std(dim=1, keepdim=True, unbiased=False)
    return (norms > mean + sigma * std) & (norms >= ratio * norms.median(dim=1, keepdim=True).values)


def _segment_outliers(norms: torch.Tensor, images: torch.Tensor, sigma: float, ratio: float) -> torch.Tensor:
    """`norm_outliers`'s per-row rule with each image's statistics, where `images` (ids 0..n-1) says which image
    each entry belongs to: sums by scatter, the lower median from one sort by (image, norm); no host sync."""
    import torch

    v, ids = norms.flatten().float(), images.flatten().long()
    m = v.numel()
    count = torch.zeros(m, device=v.device).index_add_(0, ids, torch.ones_like(v))  # [m]: ids < m
    mean = torch.zeros(m, device=v.device).index_add_(0, ids, v) / count.clamp_min(1)
    var = torch.zeros(m, device=v.device).index_add_(0, ids, (v - mean[ids]) ** 2) / count.clamp_min(1)
    order = torch.sort(v, stable=True).indices
    order = order[torch.sort(ids[order], stable=True).indices]  # by image, then by norm
    start = torch.cumsum(count, 0) - count  # [m] first sorted slot of each image
    median = v[order[(start + (count - 1).clamp_min(0) // 2).long().clamp_max(m - 1)]]
    out = (v > mean[ids] + sigma * var.sqrt()[ids]) & (v >= ratio * median[ids])
    return out.reshape(norms.shape)


def massive_entries(
    h: torch.Tensor, valid: torch.Tensor, threshold: float = 100.0, ratio: float = 1000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Massive activations (Sun et al. 2402.17762): |a| > threshold and > ratio x the median |a|.

    Args:
        h: ``[batch, seq, d]`` hidden states of one layer.
        valid: ``[batch, seq]`` bool, positions that count (not padding).

    Returns:
        (``[batch, seq, d]`` bool flags, ``[batch]`` median |a| over each sample's valid entries).
    """
    import torch

    a = h.float().abs()
    # each sample's lower median over its valid entries (as `median`), for the whole batch at once: no host sync
    med = a.masked_fill(~valid[..., None], float("nan")).flatten(1).nanmedian(dim=1).values
    med = torch.where(valid.any(dim=1), med, torch.zeros_like(med))
    flags = (a > threshold) & (a > ratio * med[:, None, None]) & valid[..., None]
    return flags, med


def rms_normalized(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``h / RMS(h)`` over the last dim, in float32 (the final-norm style normalisation, without weights)."""
    import torch

    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def sink_dims(h: torch.Tensor, reference: torch.Tensor, tau: float) -> list[int]:
    """Dimensions where the reference tokens (e.g. BOS) have an RMS-normalised |value| above `tau`.

    Args:
        h: ``[batch, seq, d]``; reference: ``[batch, seq]`` bool.
    """
    if not reference.any():
        return []
    phi = rms_normalized(h[reference]).abs()  # [n, d]
    return sorted(set((phi > tau).nonzero()[:, 1].tolist()))


def attention_sink_scores(h: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """Kang et al. (2503.03321): max over the sink dims of |RMS-normalised h|; ``[batch, seq]``.

    Zero everywhere when there are no sink dims.
    """
    import torch

    if not dims:
        return h.new_zeros(h.shape[:-1], dtype=torch.float32)
    return rms_normalized(h)[..., dims].abs().amax(dim=-1)


def similarity_entropy(
    x: torch.Tensor, vocab: torch.Tensor, temperature: float, chunk_size: int = 4096, normalized_vocab: bool = False
) -> torch.Tensor:
    """Entropy (nats) of ``softmax(cos(x, vocab) / temperature)`` for each row of `x`.

    The vocabulary is scanned in chunks with a running log-sum-exp, so extra
    memory is ``[tokens, chunk_size]`` whatever the vocabulary size.

    Args:
        x: ``[tokens, d]``; vocab: ``[vocab, d]``.

    Returns:
        ``[tokens]`` float32; divide by ``log(vocab)`` for a 0..1 scale.
    """
    import torch
    import torch.nn.functional as F

    xn = F.normalize(x.to(vocab.device, torch.float32), dim=-1)
    n = x.shape[0]
    m = torch.full((n,), float("-inf"), device=vocab.device)
    z = torch.zeros(n, device=vocab.device)  # running sum of exp(l - m)
    s = torch.zeros(n, device=vocab.device)  # running sum of exp(l - m) * l
    for start in range(0, vocab.shape[0], chunk_size):
        chunk = vocab[start : start + chunk_size].float()
        cos = xn @ chunk.T  # [tokens, chunk]
        if not normalized_vocab:
            cos.div_(chunk.norm(dim=-1).clamp_min(1e-12))
        logits = cos.div_(temperature)
        m_new = torch.maximum(m, logits.max(dim=-1).values)
        scale = torch.exp(m - m_new)
        e = torch.exp(logits - m_new[:, None])
        z = z * scale + e.sum(-1)
        s = s * scale + (e * logits).sum(-1)
        m = m_new
    return m + z.log() - s / z


# -- per visual token, from a batch's activations ------------------------------------
def _one_patch_each(adapter: "Adapter", inputs) -> bool:
    """Whether each visual token of the batch `inputs` stands for one tower patch: a family whose image tokens do can
    pool patches in its video batches (LLaVA-NeXT-Video, LLaVA-OneVision), which `patch_indices` names per batch."""
    import torch

    return adapter.patch_indices(torch.zeros(1, dtype=torch.long), inputs).shape[1] == 1


def vision_to_tokens(flags: torch.Tensor, vt: dict[str, torch.Tensor], adapter: "Adapter | None" = None, inputs=None) -> torch.Tensor:
    """Per-patch values of the vision batch (``[rows, patches]``) read at each visual token; ``[tokens]``.

    Where a token stands for a block of patches (`adapter.patch_block`, e.g.
    Idefics3's pixel shuffle), it takes the block's largest value (for flags:
    any patch of the block flagged); `inputs`, the batch's processor output, names
    the block's patches where they depend on the batch (`Adapter.patch_indices`).
    """
    rows = vt["feature_row"].to(flags.device)
    if adapter is None or (adapter.patch_block == (1, 1) and (inputs is None or _one_patch_each(adapter, inputs))):
        return flags[rows, vt["feature_col"].to(flags.device)]
    return flags[rows[:, None], adapter.patch_indices(vt["feature_col"], inputs).to(flags.device)].amax(dim=1)


def vit_norm_token_flags(
    adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor], layer: int = -2, sigma: float = 2.0,
    threshold: float | None = None, ratio: float = 2.0,
) -> torch.Tensor:
    """``[visual tokens]`` bool, on the tower's device: the token's patch (any of its block's) is a ViT high-norm
    outlier at vision layer `layer`."""
    site = adapter.resolve(Site("vision.layers", layer))
    flags = vit_norm_outliers(acts[site], sigma, threshold, adapter.n_prefix_tokens, ratio, adapter.tower_images(batch.inputs))
    return vision_to_tokens(flags, batch.roles.visual_tokens(), adapter, batch.inputs)  # on the device: the caller copies


def massive_token_flags(
    batch: "Batch", acts: dict[Site, torch.Tensor], layers: list[int], threshold: float = 100.0, ratio: float = 1000.0
) -> torch.Tensor:
    """``[visual tokens]`` bool, on the device of the LLM layers: the token has a massive activation at the output of
    any LLM layer in `layers` (flags combined on the device, no host copy per layer)."""
    import torch

    vt = batch.roles.visual_tokens()
    hit = torch.zeros(len(vt["sample"]), dtype=torch.bool)
    on: dict = {}  # device -> (valid, sample, position), moved once
    for layer in layers:  # flags stay on the device; one copy to the host at the end
        h = acts[Site("llm.layers", layer)]
        if h.device not in on:
            on[h.device] = ((~batch.roles.padding).to(h.device), vt["sample"].to(h.device), vt["position"].to(h.device))
        valid, s, p = on[h.device]
        flags, _ = massive_entries(h, valid, threshold, ratio)
        hit = hit.to(h.device) | flags.any(-1)[s, p]
    return hit  # on the device: the caller copies
