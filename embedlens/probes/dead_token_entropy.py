"""Dead-token entropy test: flat vocabulary similarities and image-independent neighbours."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from embedlens.errors import PlanError
from embedlens.probes._util import FirstImage, Histogram, frame_maps, group_masks, resolve_layers, token_groups, token_meta
from embedlens.probes.base import Probe, Table
from embedlens.probes.embedding_lens import lens_site
from embedlens.vocab import nearest_vocab
from embedlens.registry import probes
from embedlens.signals import similarity_entropy
from embedlens.sites import Site

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch


@probes.register("dead_token_entropy")
class DeadTokenEntropy(Probe):
    """Per visual token, the entropy of softmax(cosine to every vocabulary row / temperature).

    Dead tokens have flat similarity distributions (normalised entropy near
    1) and land on the same ids whatever the image; alive tokens have peaked,
    image-dependent neighbours. Per token the table gives the entropy, its
    normalised value (entropy / log vocab), the top-1 id and the threshold
    verdict. The summary gives, per group of the run's partition, the
    entropy distribution, the share above the threshold, and how
    image-specific the top-1 ids are: 1 - (share of images in which that id
    is some token's top-1), averaged over the group's tokens.

    Args:
        temperature: softmax temperature over cosine similarities.
        threshold: normalised entropy above which a token is called dead.
        layer: LLM layer (0 = the LLM input).
        matrix: "input" or "output" embeddings.
        chunk_size: vocabulary rows compared at once.
        bins: histogram bins over 0..1.

    Example:
        >>> from embedlens.testing import tiny_batch
        >>> from embedlens.tracing import collect
        >>> adapter, batch = tiny_batch("llava-siglip", n=2)
        >>> probe = DeadTokenEntropy(temperature=0.05)
        >>> rows = probe.update(adapter, batch, collect(adapter, batch, probe.sites(adapter)))["tokens"]
        >>> all(0 <= e <= 1 for e in rows["normalized_entropy"])
        True
    """

    def __init__(
        self,
        temperature: float = 0.05,
        threshold: float = 0.9,
        layer: int = 0,
        matrix: Literal["input", "output"] = "input",
        chunk_size: int = 4096,
        bins: int = 40,
    ):
        if temperature <= 0:
            raise PlanError(f"dead_token_entropy.temperature: must be > 0; got {temperature}")
        if not 0 < threshold <= 1:
            raise PlanError(f"dead_token_entropy.threshold: must be in (0, 1]; got {threshold}")
        self.temperature, self.threshold, self.layer, self.matrix, self.chunk_size, self.bins = (
            temperature, threshold, layer, matrix, chunk_size, bins)
        self._hist: dict[str, Histogram] = {}
        self._sum: dict[str, list[float]] = {}  # group -> [sum entropy, n, n above]
        self._top1: dict[str, torch.Tensor] = {}  # group -> [vocab] top-1 counts
        self._df: torch.Tensor | None = None  # [vocab] images where the id is some token's top-1
        self._n_images = 0
        self._first = FirstImage()

    def _layer(self, adapter: "Adapter") -> int:
        return resolve_layers("dead_token_entropy", "layer", [self.layer], adapter.n_llm_layers)[0]

    def sites(self, adapter: "Adapter") -> list[Site]:
        return [lens_site(self._layer(adapter))]

    def update(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor]) -> dict[str, Table]:
        import torch

        vocab = (adapter.input_embeddings() if self.matrix == "input" else adapter.output_embeddings()).detach()
        vt = batch.roles.visual_tokens()
        x = acts[lens_site(self._layer(adapter))][vt["sample"], vt["position"]].to(vocab.device)
        ent = similarity_entropy(x, vocab, self.temperature, self.chunk_size).cpu()
        norm = ent / math.log(vocab.shape[0])
        top1 = nearest_vocab(x, vocab, 1, self.chunk_size)[1][:, 0].cpu()
        groups = token_groups(batch, vt["sample"], vt["position"])
        if self._df is None:
            self._df = torch.zeros(vocab.shape[0], dtype=torch.long)
        key = vt["sample"] * 10_000 + vt["image"]
        for img in key.unique().tolist():
            self._df[top1[key == img].unique()] += 1
            self._n_images += 1
        for g, sel in group_masks(groups).items():
            self._hist.setdefault(g, Histogram(0.0, 1.0, self.bins)).add(norm[sel])
            s = self._sum.setdefault(g, [0.0, 0, 0])
            s[0] += float(norm[sel].sum())
            s[1] += int(sel.sum())
            s[2] += int((norm[sel] > self.threshold).sum())
            self._top1[g] = self._top1.get(g, torch.zeros(vocab.shape[0], dtype=torch.long)) + torch.bincount(
                top1[sel], minlength=vocab.shape[0])
        rows = token_meta(batch, vt)
        rows["group"] = groups
        rows["entropy"] = ent.tolist()
        rows["normalized_entropy"] = norm.tolist()
        rows["top1_id"] = top1.tolist()
        rows["top1_token"] = adapter.tokenizer.convert_ids_to_tokens(rows["top1_id"])
        rows["dead_by_entropy"] = (norm > self.threshold).tolist()
        self._first.offer(adapter, batch, vt, value=norm.tolist())
        return {"tokens": rows}

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"temperature": self.temperature, "threshold": self.threshold, "n_images": self._n_images, "groups": {}}
        for g, (s, n, above) in self._sum.items():
            counts = self._top1[g].double()
            spec = float((counts * (1 - self._df.double() / max(self._n_images, 1))).sum() / max(counts.sum(), 1))
            out["groups"][g] = {
                "n_tokens": n,
                "mean_normalized_entropy": s / max(n, 1),
                "fraction_above_threshold": above / max(n, 1),
                "image_specificity": spec,
                "histogram": self._hist[g].to_dict(),
            }
        return out

    def figures(self, out_dir: Path) -> list[Path]:
        from embedlens.figures import histograms, value_map

        out = []
        if self._hist:
            out.append(histograms({g: h.to_dict() for g, h in self._hist.items()}, Path(out_dir) / "dead_token_entropy_hist.png",
                                  xlabel="normalised entropy of vocabulary similarities",
                                  title=f"Vocabulary-similarity entropy by group (T={self.temperature}; threshold {self.threshold})"))
        out += frame_maps(self._first, out_dir, "dead_token_entropy_map", lambda f, path, where: value_map(
            f["pixels"], f["row"], f["col"], f["value"], path, title=f"Normalised similarity entropy - {f['sample_id']}{where}",
            label="entropy / log V", vmin=0.0, vmax=1.0))  # its whole range: the same scale in every run (and frame)
        return out
