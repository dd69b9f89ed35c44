"""Anchor discovery: which vocabulary ids mark sink and dead visual tokens, and the evidence for each verdict.

An anchor is defined by what lands on it, not by how often it occurs
(`../shared/METHOD.md`, "Anchor discovery"). Tokens that land on a *dead*
anchor carry no image-specific information: wherever they come from, they
collapse onto nearly one point. Tokens that land on a content word (a colour,
a shape, a position) differ from image to image, because they still encode
the rest of the patch (shape, position, context), even when that word occurs
in every image. *Sink* anchors are where outlier tokens land: ViT high-norm
patches (registers) and tokens with a massive LLM activation.

For every vocabulary id that is the nearest row of some visual token, the
evidence collected over the data is, streamed batch by batch:

- ``images`` / ``image_fraction`` and ``tokens`` / ``token_share``;
- ``cos_between``: the mean cosine between two of its tokens taken from
  *different* images (so a word repeated inside one image cannot look
  collapsed), and ``cos_within`` for pairs from the same image;
- ``dispersion`` = 1 - ``cos_between``; ``others_dispersion``, the same
  statistic over every visual token *not* on the id; and
  ``relative_dispersion``, their ratio (how much tighter the id's tokens are
  than the rest of the data; the dispersion itself when no other token
  exists);
- ``outlier_fraction``: the share of its tokens that are ViT-norm or
  massive-activation outliers, and ``norm_ratio``, their mean norm over the
  mean norm of all visual tokens.

The verdict (`AnchorRule`): an id seen in fewer than ``min_image_fraction``
of the images (and in fewer than two) is ``rare``; one whose tokens are
mostly outliers is a ``sink`` anchor; one whose tokens collapse
(``relative_dispersion <= max_dispersion``) is a ``dead`` anchor; anything
else is ``content``. The defaults were calibrated on data where frequency
alone fails (`embedlens.testing.planted` with a content word in every
image, no dead tokens at all, an anchor absent from some images, two dead
anchors and a sink; and the zoo models, where colour and position words
occur in 60-94% of the images): see the README, "Anchor discovery".

Example:
    >>> import torch
    >>> ev = AnchorEvidence()
    >>> g = torch.Generator().manual_seed(0)
    >>> dead = torch.tensor([1.0, 0, 0, 0]) + 0.01 * torch.randn(6, 4, generator=g)  # one point, 6 images
    >>> alive = torch.randn(6, 4, generator=g)                                        # spread
    >>> x = torch.cat([dead, alive]); ids = torch.tensor([7] * 6 + [3] * 6)
    >>> ev.add(x, ids, image=torch.arange(12) % 6, outlier=torch.zeros(12, dtype=torch.bool))
    >>> [(r["id"], r["verdict"]) for r in ev.table(AnchorRule())]
    [(7, 'dead'), (3, 'content')]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from embedlens._torch import no_grad
from embedlens.errors import ParameterError
from embedlens.signals import massive_token_flags, vit_norm_token_flags
from embedlens.sites import Site
from embedlens.state import Stateful, rebuildable, value_type
from embedlens.vocab import nearest_vocab

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch

N_COUNTERS = 8
#: The columns of the evidence table, in order.
EVIDENCE_COLUMNS = (
    "id", "token", "verdict", "reason", "tokens", "token_share", "images", "image_fraction",
    "cos_between", "cos_within", "dispersion", "others_dispersion", "relative_dispersion", "outlier_fraction", "norm_ratio",
    "threshold_ratio", "separation",
)
#: An accepted dead anchor within this factor of ``max_dispersion`` (or a frequent content word within it above) is a
#: marginal decision, and is warned about with its evidence.
MARGIN = 1.2
#: The lowest frequent content word's relative dispersion over the highest dead anchor's: below this, the two are
#: not clearly apart and discovery warns (the zoo checkpoints measure about 3 at background 0.4, 15 at 0.85).
MIN_SEPARATION = 2.0


@value_type
@dataclass(frozen=True)
class AnchorRule:
    """When an id is a sink or dead anchor (see the module docstring).

    Args:
        min_image_fraction: an anchor is the nearest id of some token in at least this share of the
            images (and in at least two): a word repeated in one or two images is not evidence.
        max_dispersion: a dead anchor's tokens spread at most this share of the other tokens' spread
            (`relative_dispersion`); see the README for the calibration behind the default.
        sink_fraction: share of an id's tokens that must be outliers (ViT norm, massive) to call it a sink.
        max_anchors: anchors kept per verdict, most tokens first (more is reported as degenerate).
    """

    min_image_fraction: float = 0.3
    max_dispersion: float = 0.2
    sink_fraction: float = 0.5
    max_anchors: int = 10

    def __post_init__(self):
        for name in ("min_image_fraction", "max_dispersion", "sink_fraction"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= 1):
                raise ParameterError("", name, f"must be a number in (0, 1]; got {v!r}")
        if not isinstance(self.max_anchors, int) or self.max_anchors < 1:
            raise ParameterError("", "max_anchors", f"must be an integer >= 1; got {self.max_anchors!r}")


@rebuildable
class AnchorEvidence(Stateful):
    """Streaming per-id statistics of the visual tokens that land on each nearest vocabulary id.

    Memory: one float32 vector per distinct nearest id (ids x hidden size), plus a few counters.
    """

    def __init__(self) -> None:
        import torch

        self.ids: list[int] = []  # row -> vocabulary id
        self._row: dict[int, int] = {}
        self.sum = torch.zeros(0, 0)  # [rows, d] sum of unit vectors
        # [rows, (N, Q, M, images, outliers, norm sum, X, Y)]: per id, with s_img / n_img its sum / count in one
        # image and a_img / m_img those of all tokens of that image: N = sum n, Q = sum |s|^2, M = sum n^2,
        # X = sum s.a, Y = sum n m (X and Y give the statistics of every *other* token: the reference)
        self.counters = torch.zeros(0, N_COUNTERS, dtype=torch.float64)
        self.total = torch.zeros(0)  # [d] sum of all unit vectors
        self.total_q = 0.0  # sum over images of |a|^2
        self.total_m = 0.0  # sum over images of m^2
        self.n_images = 0
        self.n_tokens = 0
        self.norm_sum = 0.0

    def _rows_for(self, ids: list[int], d: int) -> torch.Tensor:
        import torch

        new = [i for i in ids if i not in self._row]
        if new:
            for i in new:
                self._row[i] = len(self.ids)
                self.ids.append(i)
            if self.sum.numel() == 0:
                self.sum = torch.zeros(0, d)
            self.sum = torch.cat([self.sum, torch.zeros(len(new), d)])
            self.counters = torch.cat([self.counters, torch.zeros(len(new), N_COUNTERS, dtype=torch.float64)])
        return torch.tensor([self._row[i] for i in ids], dtype=torch.long)

    @no_grad
    def add(self, x: torch.Tensor, ids: torch.Tensor, image: torch.Tensor, outlier: torch.Tensor) -> None:
        """Add one batch.

        Args:
            x: ``[tokens, d]`` the visual tokens.
            ids: ``[tokens]`` each token's nearest vocabulary id.
            image: ``[tokens]`` an image key, equal for tokens of the same image (within this call).
            outlier: ``[tokens]`` bool, the token is a ViT-norm or massive-activation outlier.
        """
        import torch

        if x.shape[0] == 0:
            return
        x = x.detach().to(torch.float64).cpu()
        ids, image, outlier = ids.cpu().long(), image.cpu().long(), outlier.cpu()
        norms = x.norm(dim=-1)
        u = x / norms.clamp_min(1e-12)[:, None]  # [tokens, d]
        # one group per (image, id): its sum of unit vectors and its count
        pairs, inv = torch.unique(torch.stack([image, ids], 1), dim=0, return_inverse=True)
        s = torch.zeros(len(pairs), u.shape[1], dtype=torch.float64).index_add_(0, inv, u)  # [pairs, d]
        c = torch.zeros(len(pairs), dtype=torch.float64).index_add_(0, inv, torch.ones(len(u), dtype=torch.float64))
        uid, pid = torch.unique(pairs[:, 1], return_inverse=True)  # ids of this batch; each pair's id
        img, iid = torch.unique(pairs[:, 0], return_inverse=True)  # images of this batch; each pair's image
        a = torch.zeros(len(img), u.shape[1], dtype=torch.float64).index_add_(0, iid, s)  # [images, d]
        m = torch.zeros(len(img), dtype=torch.float64).index_add_(0, iid, c)
        rows = self._rows_for(uid.tolist(), u.shape[1])
        per_id = torch.zeros(len(uid), N_COUNTERS, dtype=torch.float64)
        per_id[:, 0].index_add_(0, pid, c)
        per_id[:, 1].index_add_(0, pid, (s * s).sum(-1))
        per_id[:, 2].index_add_(0, pid, c * c)
        per_id[:, 3].index_add_(0, pid, torch.ones(len(pairs), dtype=torch.float64))
        tok_id = torch.searchsorted(uid, ids)
        per_id[:, 4].index_add_(0, tok_id, outlier.to(torch.float64))
        per_id[:, 5].index_add_(0, tok_id, norms)
        per_id[:, 6].index_add_(0, pid, (s * a[iid]).sum(-1))
        per_id[:, 7].index_add_(0, pid, c * m[iid])
        id_sum = torch.zeros(len(uid), u.shape[1], dtype=torch.float64).index_add_(0, pid, s)
        self.sum[rows] += id_sum.to(self.sum.dtype)
        self.counters[rows] += per_id
        self.total = (self.total if self.total.numel() else torch.zeros(u.shape[1], dtype=torch.float64)) + a.sum(0)
        self.total_q += float((a * a).sum())
        self.total_m += float((m * m).sum())
        self.n_images += int(image.unique().numel())
        self.n_tokens += int(x.shape[0])
        self.norm_sum += float(norms.sum())

    # -- the statistics and the verdicts --------------------------------------------
    def stats(self) -> list[dict[str, Any]]:
        """Per id: tokens, images, cos_between, cos_within, dispersion, outlier_fraction, norm_ratio."""
        import torch

        if not self.ids:
            return []
        S = self.sum.to(torch.float64)
        n, q, m, imgs, outl, nsum, x, y = self.counters.unbind(-1)
        ss = (S * S).sum(-1)
        nan = torch.full_like(ss, math.nan)
        between_pairs = n * n - m
        within_pairs = m - n
        cos_b = torch.where(between_pairs > 0, (ss - q) / between_pairs.clamp_min(1), nan)
        cos_w = torch.where(within_pairs > 0, (q - n) / within_pairs.clamp_min(1), nan)
        # the same between-image cosine over every token *not* on the id: the reference it is compared with
        rest = self.total[None, :] - S
        rest_n = self.n_tokens - n
        rest_q = self.total_q - 2 * x + q
        rest_m = self.total_m - 2 * y + m
        rest_pairs = rest_n * rest_n - rest_m
        # ... counting only pairs of tokens on *different* ids: pairs of one word (above all the collapsed pairs of a
        # dead anchor) would make the reference depend on how many such tokens the data holds
        same_sum, same_pairs = ss - q, between_pairs  # per id: its own between-image pairs
        cross_sum = (rest * rest).sum(-1) - rest_q - (same_sum.sum() - same_sum)
        cross_pairs = rest_pairs - (same_pairs.sum() - same_pairs)
        cos_rest = torch.where(cross_pairs > 0.5, cross_sum / cross_pairs.clamp_min(1), nan)
        mean_norm = self.norm_sum / max(self.n_tokens, 1)
        out = []
        for r, i in enumerate(self.ids):
            out.append({
                "id": i,
                "tokens": int(n[r]),
                "token_share": float(n[r]) / max(self.n_tokens, 1),
                "images": int(imgs[r]),
                "image_fraction": float(imgs[r]) / max(self.n_images, 1),
                "cos_between": float(cos_b[r]),
                "cos_within": float(cos_w[r]),
                # identical tokens give 1 - cos a rounding error below zero: a spread is never negative
                "dispersion": max(0.0, 1.0 - float(cos_b[r])) if not math.isnan(float(cos_b[r])) else math.nan,
                "others_dispersion": max(0.0, 1.0 - float(cos_rest[r])) if not math.isnan(float(cos_rest[r])) else math.nan,
                "outlier_fraction": float(outl[r]) / max(float(n[r]), 1.0),
                "norm_ratio": float(nsum[r]) / max(float(n[r]), 1.0) / mean_norm if mean_norm > 0 else math.nan,
            })
        return out

    def table(self, rule: AnchorRule, decode: Callable[[int], str] | None = None, max_rows: int = 40) -> list[dict[str, Any]]:
        """Every id seen in two images or more (and the anchors), with its verdict and the reason; anchors first.

        Args:
            rule: the thresholds.
            decode: id -> token string, for the ``token`` column.
            max_rows: rows kept besides the anchors (most tokens first).
        """
        stats = self.stats()
        floor = max(2, math.ceil(rule.min_image_fraction * self.n_images - 1e-9))
        rows = []
        for s in stats:
            s = dict(s, token=decode(s["id"]) if decode else str(s["id"]))
            ref = s["others_dispersion"] if not math.isnan(s["others_dispersion"]) else 1.0  # no other token: absolute
            s["relative_dispersion"] = s["dispersion"] / max(ref, 1e-12) if not math.isnan(s["dispersion"]) else math.nan
            if s["images"] < floor:
                s["verdict"] = "rare"
                s["reason"] = f"nearest id in {s['images']} of {self.n_images} images (an anchor needs {floor})"
            elif s["outlier_fraction"] >= rule.sink_fraction:
                s["verdict"] = "sink"
                s["reason"] = f"{s['outlier_fraction']:.0%} of its tokens are ViT-norm / massive-activation outliers"
            elif s["relative_dispersion"] <= rule.max_dispersion:
                s["verdict"] = "dead"
                s["reason"] = (f"its tokens collapse: dispersion {s['dispersion']:.3g} is {s['relative_dispersion']:.2f}x "
                               f"that of the other tokens ({ref:.3g}; an anchor's is at most {rule.max_dispersion}x)")
            else:
                s["verdict"] = "content"
                s["reason"] = (f"its tokens differ between images: dispersion {s['dispersion']:.3g} is "
                               f"{s['relative_dispersion']:.2f}x that of the other tokens (> {rule.max_dispersion})")
            rows.append(s)
        rows.sort(key=lambda s: (s["verdict"] not in ("sink", "dead"), -s["tokens"], s["id"]))
        for kind in ("sink", "dead"):
            extra = [s for s in rows if s["verdict"] == kind][rule.max_anchors:]
            for s in extra:
                s["verdict"] = "excess"
                s["reason"] += f"; beyond max_anchors={rule.max_anchors} {kind} anchors (most tokens first)"
        _separation(rows, rule)
        anchors = [s for s in rows if s["verdict"] in ("sink", "dead")]
        others = [s for s in rows if s["verdict"] not in ("sink", "dead") and s["images"] >= 2]
        return [{c: s[c] for c in EVIDENCE_COLUMNS} for s in anchors + others[:max_rows]]

    def anchors(self, rule: AnchorRule) -> dict[str, list[int]]:
        """``{"sink": [...], "dead": [...]}``: the ids the rule calls anchors, most tokens first."""
        out: dict[str, list[int]] = {"sink": [], "dead": []}
        for s in self.table(rule, max_rows=0):
            out[s["verdict"]].append(s["id"])
        return out


def _separation(rows: list[dict[str, Any]], rule: AnchorRule) -> None:
    """Fill ``threshold_ratio`` (relative dispersion over ``max_dispersion``: below 1 collapses) and ``separation``:
    for a dead anchor, the lowest frequent content word's relative dispersion over its own; for a content word, its
    own over the highest dead anchor's (NaN where there is nothing to compare). The smallest is how far apart the
    run's two sides are."""
    dead = [s["relative_dispersion"] for s in rows if s["verdict"] == "dead"]
    content = [s["relative_dispersion"] for s in rows if s["verdict"] == "content" and not math.isnan(s["relative_dispersion"])]
    for s in rows:
        rel = s["relative_dispersion"]
        s["threshold_ratio"] = rel / rule.max_dispersion if not math.isnan(rel) else math.nan
        s["separation"] = math.nan
        if s["verdict"] == "dead" and content:
            s["separation"] = min(content) / max(rel, 1e-12)
        elif s["verdict"] == "content" and dead and not math.isnan(rel):
            s["separation"] = rel / max(max(dead), 1e-12)


def _fmt(r: dict[str, Any]) -> str:
    return (f"{r['token']!r} (nearest id in {r['image_fraction']:.0%} of the images, dispersion {r['dispersion']:.3g}, "
            f"relative dispersion {r['relative_dispersion']:.3g})")


def discovery_warnings(table: list[dict[str, Any]], rule: AnchorRule, key: str = "max_dispersion") -> list[str]:
    """What looks degenerate or marginal in a discovery, each with its evidence and the setting that produced it.

    Args:
        table: the evidence table (`AnchorEvidence.table`).
        rule: the thresholds it was decided with.
        key: how the user sets ``rule.max_dispersion`` where this is shown (``partition.discover_max_dispersion``,
            ``anchor_discovery.max_dispersion``), so a warning names the setting.
    """
    out = []
    default = AnchorRule.max_dispersion
    setting = f"{key}={rule.max_dispersion:g}" + ("" if rule.max_dispersion == default else f" (default {default:g})")
    n = {k: sum(r["verdict"] == k for r in table) for k in ("sink", "dead", "excess")}
    dead = [r for r in table if r["verdict"] == "dead"]
    loosened = [r for r in dead if r["relative_dispersion"] > default]
    if loosened:
        out.append(f"anchor discovery: {', '.join(_fmt(r) for r in loosened)} passed as dead only because {setting} is above "
                   f"the default: their tokens spread more than a collapsed anchor's; check the evidence table")
    if n["excess"]:
        spread = max((r["relative_dispersion"] for r in table if r["verdict"] == "excess"), default=math.nan)
        why = (f"with {setting} the rule itself lets spread-out ids pass (the largest relative dispersion accepted is "
               f"{spread:.3g})" if rule.max_dispersion > default else
               "many collapsed ids usually mean an untrained or broken projector")
        out.append(f"anchor discovery: {n['excess']} more ids passed the anchor tests than max_anchors={rule.max_anchors} keeps; "
                   f"{why}: check the evidence table")
    if n["dead"] > 3:
        names = ", ".join(repr(r["token"]) for r in dead)
        out.append(f"anchor discovery: {n['dead']} dead anchors ({names}) with {setting}; a real vocabulary usually has one "
                   "to three. Check the evidence table (dispersion, images) before trusting the partition")
    near = [r for r in dead if r not in loosened and r["relative_dispersion"] * MARGIN > rule.max_dispersion]
    near += [r for r in table if r["verdict"] == "content" and r["relative_dispersion"] < rule.max_dispersion * MARGIN]
    if near:
        out.append(f"anchor discovery: marginal decision: {', '.join(_fmt(r) + ' -> ' + r['verdict'] for r in near)} "
                   f"within a factor {MARGIN:g} of {setting}; the verdict could flip with other data")
    seps = [r["separation"] for r in table if r["verdict"] == "dead" and not math.isnan(r["separation"])]
    if seps and min(seps) < MIN_SEPARATION:
        worst = max(dead, key=lambda r: r["relative_dispersion"])
        closest = min((r for r in table if r["verdict"] == "content"), key=lambda r: r["relative_dispersion"], default=None)
        other = f"content word {_fmt(closest)}" if closest is not None else "the closest content word"
        out.append(f"anchor discovery: marginal decision: dead anchor {_fmt(worst)} and {other} are only "
                   f"{min(seps):.2g}x apart in relative dispersion (a clear case is {MIN_SEPARATION:g}x or more): the "
                   "dead anchors may include content words; check the evidence table")
    return out


def discovery_sites(adapter: "Adapter", vit_layer: int, massive_layers: "list[int] | None") -> list[Site]:
    """The sites a discovery reads: the tower's `vit_layer`, the LLM input and the `massive_layers` (resolved)."""
    out = [adapter.resolve(Site("vision.layers", vit_layer)), Site("llm.embed")]
    out += [Site("llm.layers", i) for i in massive_layers or ()]
    return sorted(set(out), key=Site.order_key)


@rebuildable
@dataclass
class Discoverer(Stateful):
    """Collects `AnchorEvidence` from a model's batches: the one discovery the partition and the probes share.

    Each visual token at the LLM input is counted under its nearest vocabulary
    row (k = 1: with larger k an anchor's own close neighbours would inherit its
    tokens), with its ViT-norm outlier flag and, when `massive_layers` is given,
    its massive-activation flag (the sink evidence).

    Args:
        rule: the verdict thresholds.
        matrix: "input" embeddings or "output" (unembedding) for the neighbours.
        chunk_size: vocabulary rows compared at once.
        search: "exact" or "approximate" nearest-row search (`embedlens.vocab.nearest_vocab`).
        vit_layer, vit_sigma, vit_threshold, vit_ratio: the ViT high-norm test (`embedlens.signals.vit_norm_outliers`).
        massive_layers: resolved LLM layers searched for massive activations, or None to skip that evidence
            (the pass then stops at the LLM input).
        massive_threshold, massive_ratio: |a| > threshold and > ratio x the median |a|.
    """

    rule: AnchorRule = AnchorRule()
    matrix: str = "input"
    chunk_size: int = 4096
    search: str = "exact"
    vit_layer: int = -2
    vit_sigma: float = 2.0
    vit_threshold: float | None = None
    vit_ratio: float = 2.0
    massive_layers: list[int] | None = None
    massive_threshold: float = 100.0
    massive_ratio: float = 1000.0

    def __post_init__(self):
        self.evidence = AnchorEvidence()

    def sites(self, adapter: "Adapter") -> list[Site]:
        return discovery_sites(adapter, self.vit_layer, self.massive_layers)

    def vocab(self, adapter: "Adapter") -> torch.Tensor:
        return (adapter.input_embeddings() if self.matrix == "input" else adapter.output_embeddings()).detach()

    def update(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor]) -> None:
        vt = batch.roles.visual_tokens()
        vocab = self.vocab(adapter)
        x = acts[Site("llm.embed")][vt["sample"], vt["position"]]  # [tokens, d]
        _, ids = nearest_vocab(x, vocab, 1, self.chunk_size, search=self.search)
        outlier = vit_norm_token_flags(adapter, batch, acts, self.vit_layer, self.vit_sigma, self.vit_threshold, self.vit_ratio).cpu()
        if self.massive_layers:
            outlier = outlier | massive_token_flags(batch, acts, self.massive_layers, self.massive_threshold, self.massive_ratio).cpu()
        self.evidence.add(x, ids[:, 0], vt["sample"] * 10_000 + vt["image"], outlier)

    def table(self, adapter: "Adapter", max_rows: int = 40) -> list[dict[str, Any]]:
        """The evidence table with decoded tokens (see `AnchorEvidence.table`)."""
        tok = adapter.tokenizer
        return self.evidence.table(self.rule, decode=lambda i: str(tok.convert_ids_to_tokens(int(i))), max_rows=max_rows)

    def anchors(self) -> dict[str, list[int]]:
        return self.evidence.anchors(self.rule)
