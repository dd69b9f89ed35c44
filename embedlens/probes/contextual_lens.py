"""Contextual lens (LatentLens): nearest contextual text hidden states of each visual token."""

from __future__ import annotations

from collections import Counter
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedlens.errors import PlanError
from embedlens.probes._util import FIGURE_SAMPLES, FirstImage, resolve_layers, token_groups, token_meta
from embedlens.probes.base import Probe, Table
from embedlens.probes.embedding_lens import lens_site
from embedlens.vocab import nearest_vocab
from embedlens.registry import probes
from embedlens.sites import Site
from embedlens.tracing import collect_text

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch


def default_corpus() -> list[str]:
    """The small reference corpus that ships with embedlens (captions of simple scenes, one per line)."""
    text = resources.files("embedlens").joinpath("resources/corpus.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


@probes.register("contextual_lens")
class ContextualLens(Probe):
    """Nearest neighbours of visual tokens among contextual text hidden states (LatentLens, 2602.00462).

    The reference corpus (a text file, one passage per line; a small default
    ships) runs through the LLM alone once; its token hidden states at
    `text_layer` form the bank. Each visual token's state at `layer` is
    compared (cosine) with every bank entry; the table gives the top-k
    neighbours with the word and the passage it came from.

    Args:
        layer: LLM layer of the visual tokens (0 = the LLM input; default the middle layer).
        text_layer: LLM layer of the corpus states (default: `layer`).
        corpus: a text file, one passage per line; None uses the shipped corpus.
        k: neighbours kept per token.
        batch_size: corpus passages per forward pass.
        max_bank: at most this many corpus tokens are kept (in corpus order).

    Example:
        >>> from embedlens.testing import tiny_batch
        >>> from embedlens.tracing import collect
        >>> adapter, batch = tiny_batch("llava-clip", n=1)
        >>> probe = ContextualLens(layer=2, k=2)
        >>> rows = probe.update(adapter, batch, collect(adapter, batch, probe.sites(adapter)))["tokens"]
        >>> len(rows["neighbour_1"]) == int(batch.roles.visual.sum())
        True
    """

    def __init__(
        self,
        layer: int | None = None,
        text_layer: int | None = None,
        corpus: str | None = None,
        k: int = 5,
        batch_size: int = 16,
        max_bank: int = 100_000,
    ):
        if k < 1:
            raise PlanError(f"contextual_lens.k: must be >= 1; got {k}")
        if corpus is not None and not Path(corpus).is_file():
            raise PlanError(f"contextual_lens.corpus: file not found: {corpus}")
        self.layer, self.text_layer, self.corpus, self.k, self.batch_size, self.max_bank = layer, text_layer, corpus, k, batch_size, max_bank
        self._bank: torch.Tensor | None = None  # [entries, d], unit norm
        self._labels: list[tuple[str, int, int]] = []  # (token, passage, token index)
        self._passages: list[str] = []
        self._top1 = Counter()
        self._score: dict[str, list[float]] = {}
        self._first = FirstImage(n=FIGURE_SAMPLES)

    def _layers(self, adapter: "Adapter") -> tuple[int, int]:
        n = adapter.n_llm_layers
        layer = n // 2 if self.layer is None else resolve_layers("contextual_lens", "layer", [self.layer], n)[0]
        tl = layer if self.text_layer is None else resolve_layers("contextual_lens", "text_layer", [self.text_layer], n)[0]
        return layer, tl

    def check(self, adapter: "Adapter") -> None:
        self._layers(adapter)

    def sites(self, adapter: "Adapter") -> list[Site]:
        return [lens_site(self._layers(adapter)[0])]

    def passages(self) -> list[str]:
        if self.corpus is None:
            return default_corpus()
        lines = [ln.strip() for ln in Path(self.corpus).read_text().splitlines() if ln.strip()]
        if not lines:
            raise PlanError(f"contextual_lens.corpus: {self.corpus} has no non-empty line")
        return lines

    def build_bank(self, adapter: "Adapter") -> None:
        """Run the corpus through the LLM and keep its token states at `text_layer`."""
        import torch
        import torch.nn.functional as F

        _, tl = self._layers(adapter)
        site = lens_site(tl)
        self._passages = self.passages()
        special = set(adapter.tokenizer.all_special_ids)
        rows, labels = [], []
        # a token after the same prefix has the same state in every passage (causal attention): keep the first, so
        # that the bank holds no exact ties whose order float noise would decide (a mixture-of-experts layer's
        # grouped matmuls differ in the last bits with the batch's shape)
        seen: set[tuple[int, ...]] = set()
        for start in range(0, len(self._passages), self.batch_size):
            chunk = self._passages[start : start + self.batch_size]
            acts, ids, mask = collect_text(adapter, chunk, [site])
            h = acts[site].float().cpu()
            for b in range(len(chunk)):
                real = ids[b][mask[b].bool()].tolist()
                for t in range(ids.shape[1]):
                    tid = int(ids[b, t])
                    if mask[b, t] and tid not in special:
                        prefix = tuple(real[: int(mask[b, : t + 1].sum())])
                        if prefix in seen:
                            continue
                        seen.add(prefix)
                        rows.append(h[b, t])
                        labels.append((adapter.tokenizer.convert_ids_to_tokens(tid), start + b, t))
        rows, labels = rows[: self.max_bank], labels[: self.max_bank]
        self._bank = F.normalize(torch.stack(rows), dim=-1)
        self._labels = labels

    def update(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor]) -> dict[str, Table]:
        if self._bank is None:
            self.build_bank(adapter)
        layer, _ = self._layers(adapter)
        vt = batch.roles.visual_tokens()
        x = acts[lens_site(layer)][vt["sample"], vt["position"]].float().cpu()
        scores, idx = nearest_vocab(x, self._bank, self.k, chunk_size=4096, normalized_vocab=True)
        groups = token_groups(batch, vt["sample"], vt["position"])
        rows = token_meta(batch, vt)
        rows["group"] = groups
        rows["layer"] = [layer] * len(groups)
        for j in range(idx.shape[1]):
            lab = [self._labels[i] for i in idx[:, j].tolist()]
            rows[f"neighbour_{j + 1}"] = [tok for tok, _, _ in lab]
            rows[f"context_{j + 1}"] = [self._passages[p] for _, p, _ in lab]
            rows[f"score_{j + 1}"] = scores[:, j].tolist()
        self._top1.update(rows["neighbour_1"])
        for g, s in zip(groups, scores[:, 0].tolist()):
            acc = self._score.setdefault(g, [0.0, 0])
            acc[0] += s
            acc[1] += 1
        self._first.offer(adapter, batch, vt, label=rows["neighbour_1"])
        return {"tokens": rows}

    def result(self) -> dict[str, Any]:
        return {
            "bank_size": len(self._labels),
            "n_passages": len(self._passages),
            "most_common_top1": self._top1.most_common(10),
            "mean_top1_score": {g: s / n for g, (s, n) in self._score.items()},
        }

    def figures(self, out_dir: Path) -> list[Path]:
        images = self._first.images
        if not images:
            return []
        from embedlens.figures import word_map

        return [word_map([{**im, "labels": im["label"]} for im in images], Path(out_dir) / "contextual_lens_map.png",
                         title="Nearest contextual text token per patch (coloured by word; the most frequent words in the legend)")]
