"""Layer alignment: which LLM layer's text hidden states the layer-0 visual tokens resemble most."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedlens.errors import PlanError
from embedlens.probes._util import Reservoir, group_masks, resolve_layers, token_groups
from embedlens.probes.base import Probe, Table
from embedlens.probes.embedding_lens import lens_site
from embedlens.registry import probes
from embedlens.sites import Site

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between paired rows ``x: [n, d1]`` and ``y: [n, d2]`` (Kornblith et al. 2019), in float64."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    k, l_ = x @ x.T, y @ y.T
    denom = k.norm() * l_.norm()
    return float((k * l_).sum() / denom) if denom > 0 else float("nan")


@probes.register("layer_alignment")
class LayerAlignment(Probe):
    """For each token group, the LLM layer whose text hidden states the layer-0 visual tokens match best.

    Two measures per layer l, for each group of the run's partition (or all
    visual tokens):

    - **mean best cosine**: for every visual token at the LLM input, the
      highest cosine similarity to any text hidden state at layer l (a
      reservoir sample of the run's text tokens: template and question),
      averaged over the group's tokens;
    - **linear CKA over samples**: between each sample's mean visual token
      of the group (layer 0) and its mean text hidden state at layer l.

    The recommended injection layer is the argmax of the mean best cosine of
    the alive group (all visual tokens without a partition). The study's
    claim is that it is a middle layer.

    Args:
        layers: text layers compared (default: all, 0..n).
        max_text: text tokens kept (reservoir) per layer.
        max_visual: visual tokens kept (reservoir).
        max_samples: samples kept (reservoir) for CKA.
        seed: seed of the reservoirs.

    Example:
        >>> from embedlens.testing import tiny_batch
        >>> from embedlens.tracing import collect
        >>> adapter, batch = tiny_batch("llava-clip", n=3)
        >>> probe = LayerAlignment()
        >>> _ = probe.update(adapter, batch, collect(adapter, batch, probe.sites(adapter)))
        >>> 0 <= probe.result()["recommended_layer"] <= adapter.n_llm_layers
        True
    """

    def __init__(
        self,
        layers: list[int] | None = None,
        max_text: int = 512,
        max_visual: int = 2048,
        max_samples: int = 256,
        seed: int = 0,
    ):
        for name, v in (("max_text", max_text), ("max_visual", max_visual), ("max_samples", max_samples)):
            if v < 1:
                raise PlanError(f"layer_alignment.{name}: must be >= 1; got {v}")
        self.layers, self.max_text, self.max_visual, self.max_samples, self.seed = layers, max_text, max_visual, max_samples, seed
        self._text = Reservoir(max_text, seed)  # rows: [n_layers * d] flattened
        self._visual = Reservoir(max_visual, seed + 1)
        self._samples = Reservoir(max_samples, seed + 2)  # rows: per-sample means, flattened
        self._resolved: list[int] = []
        self._shape: tuple[int, int] | None = None

    def _layers(self, adapter: "Adapter") -> list[int]:
        n = adapter.n_llm_layers
        return list(range(n + 1)) if self.layers is None else resolve_layers("layer_alignment", "layers", self.layers, n)

    def sites(self, adapter: "Adapter") -> list[Site]:
        return [lens_site(x) for x in sorted(set(self._layers(adapter)) | {0})]

    def update(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor]) -> dict[str, Table]:
        import torch

        layers = self._layers(adapter)
        roles = batch.roles
        vt = roles.visual_tokens()
        x0 = acts[Site("llm.embed")][vt["sample"], vt["position"]].float().cpu()
        groups = token_groups(batch, vt["sample"], vt["position"])
        self._visual.add(x0, group=groups)
        text = roles.text & ~roles.padding
        ts, tp = text.nonzero(as_tuple=True)
        stack = torch.stack([acts[lens_site(x)][ts, tp].float().cpu() for x in layers], dim=1)  # [text tokens, L, d]
        self._shape = (len(layers), stack.shape[-1])
        self._text.add(stack.flatten(1).half())
        self._resolved = layers
        for b in range(len(batch.samples)):
            tsel, vsel = ts == b, vt["sample"] == b
            if not tsel.any() or not vsel.any():
                continue
            means = {"visual": x0[vsel].mean(0)}
            for g, gsel in group_masks(groups).items():
                sel = vsel & gsel
                if sel.any():
                    means[g] = x0[sel].mean(0)
            self._samples.add(stack[tsel].mean(0).flatten()[None], visual=[means])
        return {}

    def result(self) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        if self._shape is None or len(self._visual) == 0:
            return {"layers": [], "mean_best_cosine": {}, "cka": {}, "recommended_layer": None}
        n_l, d = self._shape
        text = self._text.rows().float().view(-1, n_l, d)
        vis = F.normalize(self._visual.rows(), dim=-1)
        vgroups = self._visual.labels["group"]
        best: dict[str, list[float]] = {}
        for li in range(n_l):
            sims = vis @ F.normalize(text[:, li], dim=-1).T  # [visual, text]
            top = sims.max(dim=1).values
            for g, sel in {"visual": torch.ones(len(vgroups), dtype=torch.bool), **group_masks(vgroups)}.items():
                best.setdefault(g, []).append(float(top[sel].mean()))
        cka: dict[str, list[float]] = {}
        if len(self._samples) >= 2:
            t = self._samples.rows().view(-1, n_l, d)
            means = self._samples.labels["visual"]
            for g in dict.fromkeys(k for m in means for k in m):
                ok = [i for i, m in enumerate(means) if g in m]
                if len(ok) >= 2:
                    v = torch.stack([means[i][g] for i in ok])
                    cka[g] = [linear_cka(v, t[ok, li]) for li in range(n_l)]
        key = "alive" if "alive" in best else "visual"
        layer_ids = self._resolved
        rec = layer_ids[int(torch.tensor(best[key]).argmax())]
        return {
            "layers": layer_ids,
            "mean_best_cosine": best,
            "cka": cka,
            "recommended_layer": rec,
            "recommended_by": key,
            "cka_best_layer": {g: layer_ids[int(torch.tensor(c).nan_to_num(-1).argmax())] for g, c in cka.items()},
        }

    def figures(self, out_dir: Path) -> list[Path]:
        from embedlens.figures import layer_curves

        res = self.result()
        if not res["layers"]:
            return []
        xs = res["layers"]
        out = [layer_curves({g: (xs, v) for g, v in res["mean_best_cosine"].items()}, Path(out_dir) / "layer_alignment_cosine.png",
                            xlabel="LLM layer of the text states", ylabel="mean best cosine of the group's\nlayer-0 visual tokens", legend_title="token group",
                            title=f"Layer-0 visual tokens vs text states per layer (recommended injection layer: {res['recommended_layer']})")]
        if res["cka"]:
            out.append(layer_curves({g: (xs, v) for g, v in res["cka"].items()}, Path(out_dir) / "layer_alignment_cka.png",
                                    xlabel="LLM layer of the text states", ylabel="linear CKA over samples\n(the group's mean token)", legend_title="token group",
                                    title="Per-sample mean visual token (layer 0) vs mean text state per layer"))
        return out
