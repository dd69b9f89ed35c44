"""Anchor discovery: vocabulary ids visual tokens land near whatever the image shows."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from embedlens.errors import EmbedLensError, PlanError
from embedlens.groups import Partition
from embedlens.probes.base import Probe, Table
from embedlens.probes.embedding_lens import nearest_vocab
from embedlens.registry import probes
from embedlens.sites import Site

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch


@probes.register("anchor_discovery")
class AnchorDiscovery(Probe):
    """Find the vocabulary ids visual tokens land near in most images, and say which look like sinks.

    For every vocabulary id it counts, over the data set, the images in which
    some visual token has it among its top-k nearest input embeddings, and
    those tokens. Ids present in at least ``min_image_fraction`` of the images
    do not depend on content: they are anchor candidates, ranked by image
    frequency, then token share. A candidate whose tokens are mostly outliers
    (ViT high-norm at ``vit_layer``, or a massive LLM activation) is called a
    sink anchor, the others dead anchors. The result feeds
    ``token_partition(discover: true)``.

    Args:
        k: neighbours per token counted (1: the nearest only; larger k also
            counts the anchors' own close neighbours).
        min_image_fraction: share of images an id must occur in to be a candidate.
        max_anchors: candidates kept.
        sink_fraction: share of a candidate's tokens that must be outliers to call it a sink.
        matrix: "input" or "output" embeddings.
        vit_layer: vision layer of the norm test.
        vit_sigma: norm > mean + vit_sigma * std over the image.
        massive_threshold: |a| above this ...
        massive_ratio: ... and this many times the median |a| (any LLM layer).
        chunk_size: vocabulary rows compared at once.

    Example:
        >>> from embedlens.testing import tiny_batch
        >>> from embedlens.tracing import collect
        >>> adapter, batch = tiny_batch("llava-clip", n=3)
        >>> probe = AnchorDiscovery(min_image_fraction=0.5)
        >>> _ = probe.update(adapter, batch, collect(adapter, batch, probe.sites(adapter)))
        >>> probe.result()["n_images"]
        3
    """

    def __init__(
        self,
        k: int = 1,
        min_image_fraction: float = 0.5,
        max_anchors: int = 10,
        sink_fraction: float = 0.5,
        matrix: Literal["input", "output"] = "input",
        vit_layer: int = -2,
        vit_sigma: float = 2.0,
        massive_threshold: float = 100.0,
        massive_ratio: float = 1000.0,
        chunk_size: int = 8192,
    ):
        if k < 1:
            raise PlanError(f"anchor_discovery.k: must be >= 1; got {k}")
        for name, v in (("min_image_fraction", min_image_fraction), ("sink_fraction", sink_fraction)):
            if not 0 < v <= 1:
                raise PlanError(f"anchor_discovery.{name}: must be in (0, 1]; got {v}")
        if max_anchors < 1:
            raise PlanError(f"anchor_discovery.max_anchors: must be >= 1; got {max_anchors}")
        self.k, self.min_image_fraction, self.max_anchors, self.sink_fraction = k, min_image_fraction, max_anchors, sink_fraction
        self.matrix, self.vit_layer, self.vit_sigma = matrix, vit_layer, vit_sigma
        self.massive_threshold, self.massive_ratio, self.chunk_size = massive_threshold, massive_ratio, chunk_size
        # the outlier tests are the partition's own ViT-norm and massive-activation rules
        self._outliers_rule = Partition(vit_norm="sink", vit_layer=vit_layer, vit_sigma=vit_sigma, massive="sink",
                                        massive_threshold=massive_threshold, massive_ratio=massive_ratio)
        self._images: torch.Tensor | None = None  # [vocab] images containing the id
        self._tokens: torch.Tensor | None = None  # [vocab] tokens with the id in their top-k
        self._outliers: torch.Tensor | None = None  # [vocab] of those, outlier tokens
        self._n_images = 0
        self._n_tokens = 0
        self._vocab_tokens: list[str] = []

    def sites(self, adapter: "Adapter") -> list[Site]:
        try:
            outlier_sites = self._outliers_rule.sites(adapter)
        except EmbedLensError as e:
            raise PlanError(str(e).replace("partition.", "anchor_discovery.", 1)) from None
        return sorted({Site("llm.embed"), *outlier_sites}, key=Site.order_key)

    def update(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor]) -> dict[str, Table]:
        vocab = (adapter.input_embeddings() if self.matrix == "input" else adapter.output_embeddings()).detach()
        v = vocab.shape[0]
        if self._images is None:
            self._images, self._tokens, self._outliers = (torch.zeros(v, dtype=torch.long) for _ in range(3))
            self._vocab_tokens = adapter.tokenizer.convert_ids_to_tokens(list(range(v)))
        vt = batch.roles.visual_tokens()
        x = acts[Site("llm.embed")][vt["sample"], vt["position"]]
        _, ids = nearest_vocab(x, vocab, self.k, self.chunk_size)  # [tokens, k]
        ids = ids.cpu()
        rules = self._outliers_rule.rules(adapter, batch, acts)
        outlier = rules["vit_norm"] | rules["massive"]
        key = vt["sample"] * 10_000 + vt["image"]
        for img in key.unique().tolist():
            sel = key == img
            present = ids[sel].flatten().unique()
            self._images[present] += 1
            self._n_images += 1
        per_token = [row.unique() for row in ids]  # an id counted once per token even if k > 1 repeats it
        for row, out in zip(per_token, outlier.tolist()):
            self._tokens[row] += 1
            if out:
                self._outliers[row] += 1
        self._n_tokens += ids.shape[0]
        return {}

    def candidates(self) -> list[dict[str, Any]]:
        """Anchor candidates, best first: id, token, image_fraction, token_share, outlier_fraction, kind."""
        if self._images is None or self._n_images == 0:
            return []
        frac = self._images.double() / self._n_images
        ok = (frac >= self.min_image_fraction).nonzero().flatten().tolist()
        ok.sort(key=lambda i: (-float(frac[i]), -int(self._tokens[i]), i))
        out = []
        for i in ok[: self.max_anchors]:
            n = int(self._tokens[i])
            of = int(self._outliers[i]) / max(n, 1)
            out.append(
                {
                    "id": i,
                    "token": self._vocab_tokens[i],
                    "image_fraction": float(frac[i]),
                    "token_share": n / max(self._n_tokens, 1),
                    "outlier_fraction": of,
                    "kind": "sink" if of >= self.sink_fraction else "dead",
                }
            )
        return out

    def anchors(self) -> dict[str, list[int]]:
        """``{"sink": [...], "dead": [...]}`` from the candidates."""
        out: dict[str, list[int]] = {"sink": [], "dead": []}
        for c in self.candidates():
            out[c["kind"]].append(c["id"])
        return out

    def result(self) -> dict[str, Any]:
        return {
            "n_images": self._n_images,
            "n_visual_tokens": self._n_tokens,
            "candidates": self.candidates(),
            "anchors": self.anchors(),
        }

    def final_tables(self) -> dict[str, Table]:
        cands = self.candidates()
        return {"candidates": {k: [c[k] for c in cands] for k in ("id", "token", "image_fraction", "token_share", "outlier_fraction", "kind")}}

    def figures(self, out_dir: Path) -> list[Path]:
        if self._images is None or self._n_images == 0:
            return []
        from embedlens.figures import _plt, _save

        plt = _plt()
        frac = (self._images.double() / self._n_images)
        top = frac.topk(min(20, int((frac > 0).sum()))).indices.tolist()
        fig, ax = plt.subplots(figsize=(7, 3.6))
        labels = [f"{self._vocab_tokens[i]!s} ({i})" for i in top]
        kinds = {c["id"]: c["kind"] for c in self.candidates()}
        colours = ["#d62728" if kinds.get(i) == "sink" else "#7f7f7f" if i in kinds else "#2ca02c" for i in top]
        ax.bar(range(len(top)), [float(frac[i]) for i in top], color=colours)
        ax.axhline(self.min_image_fraction, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(top)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("fraction of images")
        ax.set_title("Nearest-vocabulary ids by image frequency (red: sink, grey: dead anchors, green: content)", fontsize=9)
        return [_save(fig, Path(out_dir) / "anchor_discovery.png")]
