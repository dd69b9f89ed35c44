"""A third-party embedlens probe: is a visual token's patch position linearly readable from it, layer by layer?

Vision encoders add position embeddings; after the projector and some LLM
layers (which see the image through RoPE over a flattened sequence), how much
of the 2-D patch position survives in each visual token? The probe fits a
ridge regression from the token's hidden state to its (row, col) in the patch
grid, cross-validated over samples, and reports R^2 per layer.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from embedlens.errors import PlanError
from embedlens.probes.base import Probe
from embedlens.registry import probes
from embedlens.sites import Site

__all__ = ["PatchPosition", "ridge_r2"]


def ridge_r2(x: torch.Tensor, y: torch.Tensor, fold: torch.Tensor, alpha: float) -> list[float | None]:
    """Cross-validated R^2 of a ridge regression from `x` to each column of `y`.

    Args:
        x: `[n, d]` features; y: `[n, t]` targets; fold: `[n]` fold index of each row.
        alpha: ridge penalty on standardised features (intercept not penalised).

    Returns:
        One R^2 per target column over the pooled held-out predictions (None
        with fewer than two folds, or a target constant over the data).
    """
    x, y = x.double(), y.double()
    folds = fold.unique()
    if len(folds) < 2:
        return [None] * y.shape[1]
    pred = torch.empty_like(y)
    for f in folds:
        test, train = fold == f, fold != f
        mu, sd = x[train].mean(0), x[train].std(0).clamp_min(1e-8)
        xt = (x[train] - mu) / sd
        ym = y[train].mean(0)
        w = torch.linalg.solve(xt.T @ xt + alpha * torch.eye(x.shape[1], dtype=x.dtype), xt.T @ (y[train] - ym))
        pred[test] = ((x[test] - mu) / sd) @ w + ym
    ss_res = ((y - pred) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    return [None if float(t) == 0 else float(1 - r / t) for r, t in zip(ss_res, ss_tot)]


@probes.register("patch_position")
class PatchPosition(Probe):
    """Cross-validated R^2 of a ridge regression from each visual token to its patch row and column, per LLM layer.

    Rows and columns are scaled to 0..1 within their tile's grid. Samples are
    split into `folds` by a hash of their id (so the split does not depend on
    batching or padding); each layer keeps the first `max_tokens` visual
    tokens it sees. Writes the table ``layers`` (layer, r2_row, r2_col,
    n_tokens) at the end of the run.

    Args:
        layers: LLM layers to read (0 = the LLM input, l > 0 = after decoder layer l - 1).
        alpha: ridge penalty (on standardised features).
        folds: cross-validation folds over samples (at least 2).
        max_tokens: visual tokens kept per layer (bounds memory: max_tokens x hidden size floats).

    Example:
        >>> PatchPosition(layers=[0, 2]).layers
        [0, 2]
    """

    def __init__(self, layers: list[int] = [0], alpha: float = 1.0, folds: int = 2, max_tokens: int = 4096):  # noqa: B006
        if not layers:
            raise PlanError("patch_position.layers: name at least one layer")
        if alpha <= 0:
            raise PlanError(f"patch_position.alpha: expected a positive penalty; got {alpha}")
        if folds < 2:
            raise PlanError(f"patch_position.folds: expected at least 2 folds; got {folds}")
        if max_tokens < 1:
            raise PlanError(f"patch_position.max_tokens: expected at least 1; got {max_tokens}")
        self.layers = list(layers)
        self.alpha = float(alpha)
        self.folds = folds
        self.max_tokens = max_tokens
        self.features: list[list[torch.Tensor]] = [[] for _ in self.layers]  # per layer: [tokens, d] chunks
        self.targets: list[torch.Tensor] = []  # [tokens, 2] (row, col) in 0..1
        self.fold_of: list[torch.Tensor] = []  # [tokens]
        self.kept = 0

    def check(self, adapter) -> None:
        n = adapter.n_llm_layers
        bad = [layer for layer in self.layers if not 0 <= layer <= n]
        if bad:
            raise PlanError(f"patch_position.layers: layer {bad[0]} is out of range for this model (0..{n}; 0 is the LLM input)")

    def sites(self, adapter) -> list[Site]:
        return [Site("llm.embed") if layer == 0 else Site("llm.layers", layer - 1) for layer in self.layers]

    def update(self, adapter, batch, acts) -> dict[str, Any]:
        room = self.max_tokens - self.kept
        if room <= 0:
            return {}
        vt = batch.roles.visual_tokens()  # sample, position, image, tile, row, col per visual token
        take = slice(0, min(room, len(vt["sample"])))
        sample, position = vt["sample"][take], vt["position"][take]
        # the grid of each token's own tile (tiles and images of one sample may differ in size)
        key = torch.stack([sample, vt["image"][take], vt["tile"][take]], 1)
        rows, cols = vt["row"][take].double(), vt["col"][take].double()
        span_r, span_c = torch.ones_like(rows), torch.ones_like(cols)
        for k in key.unique(dim=0):
            m = (key == k).all(1)
            span_r[m] = max(float(rows[m].max()), 1.0)
            span_c[m] = max(float(cols[m].max()), 1.0)
        self.targets.append(torch.stack([rows / span_r, cols / span_c], 1).float())
        ids = [batch.samples[s].id for s in sample.tolist()]
        self.fold_of.append(torch.tensor([zlib.crc32(i.encode()) % self.folds for i in ids], dtype=torch.long))
        for j, site in enumerate(self.sites(adapter)):
            h = acts[site]
            self.features[j].append(h[sample.to(h.device), position.to(h.device)].float().cpu())
        self.kept += len(sample)
        return {}

    def _scores(self) -> list[dict[str, Any]]:
        if not self.targets:
            return []
        y, fold = torch.cat(self.targets), torch.cat(self.fold_of)
        out = []
        for layer, chunks in zip(self.layers, self.features):
            r2 = ridge_r2(torch.cat(chunks), y, fold, self.alpha)
            out.append({"layer": layer, "r2_row": r2[0], "r2_col": r2[1], "n_tokens": len(y)})
        return out

    def result(self) -> dict[str, Any]:
        scores = self._scores()
        best = max((s for s in scores if s["r2_row"] is not None), key=lambda s: s["r2_row"] + s["r2_col"], default=None)
        return {"layers": scores, "best_layer": best["layer"] if best else None}

    def final_tables(self) -> dict[str, dict[str, list]]:
        scores = self._scores()
        if not scores:
            return {}
        return {"layers": {k: [s[k] for s in scores] for k in ("layer", "r2_row", "r2_col", "n_tokens")}}
