"""Sink detectors that need no vocabulary: ViT high-norm tokens, massive activations, visual attention sinks."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedlens.errors import PlanError
from embedlens.signals import vision_to_tokens
from embedlens.probes._util import FirstImage, frame_maps, token_groups, token_meta
from embedlens.probes.base import Probe, Table
from embedlens.registry import probes
from embedlens.roles import Role
from embedlens.signals import massive_entries, norm_outliers, rms_normalized
from embedlens.sites import Site

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch

FLAGS = ("vit_norm", "massive", "attention_sink")
#: Kang et al.'s tau, chosen for LLaMA-2-7B (d = 4096, where an RMS-normalised value reaches at most sqrt(d) = 64).
KANG_TAU = 20.0
#: The default tau is at most this share of sqrt(d): a small model's ceiling is far below 20 (8 at d = 64).
TAU_SHARE = 0.5
#: A dim found from the visual tokens (not BOS) is a sink dim when they pass tau in it in at least this many samples.
SHARED_SAMPLES = 2


def default_tau(d: int) -> float:
    """Kang et al.'s 20, or half the ceiling sqrt(d) where that is lower (an RMS-normalised value is at most sqrt(d),
    reached by a token with all its energy in one dimension; Gaussian noise reaches about sqrt(2 ln d))."""
    return min(KANG_TAU, TAU_SHARE * math.sqrt(d))


@probes.register("sink_detector")
class SinkDetector(Probe):
    """Flag sink visual tokens three ways and report how the detectors agree.

    - **ViT high-norm** (Darcet et al.): patch norm at ``vit_layer`` above
      mean + ``vit_sigma`` std over the image and at least ``vit_ratio`` x its median (or above ``vit_threshold``).
    - **Massive activations** (Sun et al.): an entry with |a| > ``massive_threshold``
      and > ``massive_ratio`` x the median |a| of that sample's hidden state, at
      any LLM layer; per-layer statistics and the dims where they sit are
      reported for every token, not only visual ones.
    - **Visual attention sinks** (Kang et al.): max over the sink dims of the
      RMS-normalised hidden state > ``tau``, at layers >= ``sink_from_layer``.
      Sink dims are given, or found per batch at each layer: the dims where
      the BOS token (else each sample's first token) has an RMS-normalised
      value above ``tau``, as in Kang et al., plus the dims where visual tokens
      pass ``tau`` in at least ``SHARED_SAMPLES`` (2) distinct samples of the
      batch (sink tokens share their dims; one token's outlier in a dim no
      other image uses is not a sink). A batch of one sample finds its dims
      from BOS alone. An RMS-normalised value is at most
      sqrt(d), so ``tau`` defaults to Kang et al.'s 20 or half of sqrt(d),
      whichever is lower (20 is out of reach below d = 400); a ``tau`` at or
      above sqrt(d) cannot fire, and the result says so (``attention_sink``)
      instead of reporting a disagreement.

    Agreement: for each pair of detectors, tokens flagged by both, by either
    and their Jaccard index; and, when the run has a partition, how many of
    each detector's tokens fall in each group.

    Layer numbering: the per-layer keys (``layers`` table, ``sink_from_layer``)
    are decoder layers: key l is `llm.layers[l]`, the output of decoder layer
    l, before the final norm. That is Hugging Face's ``hidden_states[l + 1]``
    for l < n - 1, but not for the last layer: ``hidden_states[-1]`` is after
    the final norm (`llm.norm`). The lenses count one higher (their layer 0 is
    the LLM input), so sink_detector key l is lens layer l + 1.

    Args:
        vit_layer: vision layer of the norm test (-2: LLaVA's feature layer).
        vit_sigma: sigma of the per-image norm rule.
        vit_threshold: absolute norm threshold instead.
        vit_ratio: a flagged norm is also at least this many times the image's median.
        massive_threshold: |a| above this ...
        massive_ratio: ... and this many times the median |a|.
        tau: attention-sink threshold on the RMS-normalised value; None: `default_tau` of the hidden size.
        sink_from_layer: first LLM layer of the attention-sink test.
        sink_dims: sink dimensions; None finds them from BOS and the dims visual tokens share across samples.

    Example:
        >>> from embedlens.testing import tiny_batch
        >>> from embedlens.tracing import collect
        >>> adapter, batch = tiny_batch("llava-clip", n=2, padding_side="left")
        >>> probe = SinkDetector()
        >>> rows = probe.update(adapter, batch, collect(adapter, batch, probe.sites(adapter)))["tokens"]
        >>> len(rows["vit_norm_flag"]) == int(batch.roles.visual.sum())
        True
    """

    def __init__(
        self,
        vit_layer: int = -2,
        vit_sigma: float = 2.0,
        vit_threshold: float | None = None,
        vit_ratio: float = 2.0,
        massive_threshold: float = 100.0,
        massive_ratio: float = 1000.0,
        tau: float | None = None,
        sink_from_layer: int = 2,
        sink_dims: list[int] | None = None,
    ):
        if vit_sigma <= 0:
            raise PlanError(f"sink_detector.vit_sigma: must be > 0; got {vit_sigma}")
        if not vit_ratio >= 0:
            raise PlanError(f"sink_detector.vit_ratio: must be >= 0; got {vit_ratio}")
        if tau is not None and not (math.isfinite(tau) and tau > 0):
            raise PlanError(f"sink_detector.tau: must be a finite number > 0, or null for the default scaled to the hidden size; got {tau}")
        self.vit_layer, self.vit_sigma, self.vit_threshold, self.vit_ratio = vit_layer, vit_sigma, vit_threshold, vit_ratio
        self.massive_threshold, self.massive_ratio, self.tau = massive_threshold, massive_ratio, tau
        self.sink_from_layer, self.sink_dims = sink_from_layer, sink_dims
        self._layer_stats: dict[int, dict[str, Any]] = {}
        self._dims_found: Counter = Counter()
        self._flag_counts = {f: 0 for f in FLAGS}
        self._pairs = {(a, b): [0, 0] for i, a in enumerate(FLAGS) for b in FLAGS[i + 1 :]}  # [both, either]
        self._by_group: dict[str, dict[str, int]] = {}
        self._n = 0
        self._first = FirstImage()
        self._d: int | None = None  # the hidden size seen: tau's ceiling is sqrt(d)

    def tau_for(self, d: int) -> float:
        """The threshold used on a model of hidden size `d`."""
        return self.tau if self.tau is not None else default_tau(d)

    def cannot_fire(self) -> str | None:
        """Why the attention-sink test cannot flag any token here, or None."""
        if self._d is None:
            return None
        tau, ceiling = self.tau_for(self._d), math.sqrt(self._d)
        if tau >= ceiling:
            return (f"cannot fire: tau={tau:g} is at or above sqrt(d)={ceiling:.3g}, the largest RMS-normalised value any token "
                    f"can have at hidden size {self._d} (the default would be {default_tau(self._d):.3g})")
        return None

    def check(self, adapter: "Adapter") -> None:
        self.sites(adapter)
        n = adapter.n_llm_layers
        if not 0 <= self.sink_from_layer < n:
            raise PlanError(f"sink_detector.sink_from_layer: layer {self.sink_from_layer} is out of range for this model (0..{n - 1})")
        d = adapter.input_embeddings().shape[1]
        bad = [x for x in self.sink_dims or [] if not 0 <= x < d]
        if bad:
            raise PlanError(f"sink_detector.sink_dims: {bad} are outside the hidden size (0..{d - 1})")

    def sites(self, adapter: "Adapter") -> list[Site]:
        try:
            vit = adapter.resolve(Site("vision.layers", self.vit_layer))
        except Exception as e:
            raise PlanError(f"sink_detector.vit_layer: {e}") from None
        return [vit, *(Site("llm.layers", i) for i in range(adapter.n_llm_layers))]

    def update(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor]) -> dict[str, Table]:
        vt = batch.roles.visual_tokens()
        s, p = vt["sample"], vt["position"]
        feats = acts[adapter.resolve(Site("vision.layers", self.vit_layer))]
        prefix = adapter.n_prefix_tokens
        norms = feats[:, prefix:].float().norm(dim=-1)
        images = adapter.tower_images(batch.inputs)  # a packed tower's rows hold several images: each its own statistics
        vit_flag = vision_to_tokens(norm_outliers(norms, self.vit_sigma, self.vit_threshold, self.vit_ratio, images), vt, adapter, batch.inputs).cpu()
        vit_norm = vision_to_tokens(norms, vt, adapter, batch.inputs).cpu()
        n_tok = len(s)
        self._d = int(acts[Site("llm.layers", 0)].shape[-1])
        tau = self.tau_for(self._d)
        layer_out = self._layer_pass(adapter, batch, acts, s, p, tau)
        massive, max_abs, sink_score = (t.cpu() for t in layer_out.pop("tokens"))
        self._fold_layer_stats(layer_out)
        attn_flag = sink_score > tau
        flags = {"vit_norm": vit_flag, "massive": massive, "attention_sink": attn_flag}
        for f, v in flags.items():
            self._flag_counts[f] += int(v.sum())
        for (a, b), acc in self._pairs.items():
            acc[0] += int((flags[a] & flags[b]).sum())
            acc[1] += int((flags[a] | flags[b]).sum())
        groups = token_groups(batch, s, p)
        for f, v in flags.items():
            for g, hit in zip(groups, v.tolist()):
                if hit:
                    d = self._by_group.setdefault(f, {})
                    d[g] = d.get(g, 0) + 1
        self._n += n_tok
        rows = token_meta(batch, vt)
        rows["group"] = groups
        rows["vit_norm"] = vit_norm.tolist()
        rows["vit_norm_flag"] = vit_flag.tolist()
        rows["max_abs_activation"] = max_abs.tolist()
        rows["massive_flag"] = massive.tolist()
        rows["attention_sink_score"] = sink_score.tolist()
        rows["attention_sink_flag"] = attn_flag.tolist()
        self._first.offer(adapter, batch, vt, norm=vit_norm.tolist(),
                          label=["V" * a + "M" * b + "A" * c for a, b, c in zip(vit_flag.tolist(), massive.tolist(), attn_flag.tolist())])
        return {"tokens": rows}

    def _layer_pass(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor], s: torch.Tensor,
                    p: torch.Tensor, tau: float) -> dict[str, Any]:
        """Every LLM layer's flags and statistics on the device, stacked: nothing is copied to the host per layer."""
        import torch

        n_layers = adapter.n_llm_layers
        dev = acts[Site("llm.layers", 0)].device
        valid_h = ~batch.roles.padding
        ref = batch.roles.bos if batch.roles.bos.any() else _first_valid(valid_h)
        valid, ref, kind = valid_h.to(dev), ref.to(dev), batch.roles.kind.to(dev)
        s, p = s.to(dev), p.to(dev)
        visual = torch.zeros_like(valid)
        visual[s, p] = True  # the tokens the test looks at
        linear = torch.arange(valid.numel(), device=dev).view(valid.shape)  # [batch, seq]: nonzero()'s order
        big = valid.numel()
        n_roles = len(Role)
        massive = torch.zeros(len(s), dtype=torch.bool, device=dev)
        max_abs = torch.zeros(len(s), device=dev)
        sink_score = torch.zeros(len(s), device=dev)
        given = None
        stats: dict[str, list] = {k: [] for k in ("n_massive", "max_abs", "median", "dim_count", "dim_first", "role_count",
                                                  "role_first", "dims")}
        for layer in range(n_layers):
            h = acts[Site("llm.layers", layer)].to(dev).float()
            flags, med = massive_entries(h, valid, self.massive_threshold, self.massive_ratio)  # [b, seq, d], [b]
            massive |= flags.any(-1)[s, p]
            a = h.abs()
            max_abs = torch.maximum(max_abs, a.amax(-1)[s, p])
            per_pos = flags.sum(-1)  # [b, seq]
            stats["n_massive"].append(per_pos.sum())
            stats["max_abs"].append((a * valid[..., None]).amax())
            stats["median"].append(med)
            stats["dim_count"].append(flags.sum((0, 1)))  # [d]
            stats["dim_first"].append(torch.where(flags, linear[..., None], big).amin((0, 1)))  # [d]
            stats["role_count"].append(torch.zeros(n_roles, dtype=torch.long, device=dev).index_add_(0, kind.flatten(), per_pos.flatten()))
            first = torch.where(per_pos > 0, linear, big).flatten()
            stats["role_first"].append(torch.full((n_roles,), big, device=dev).scatter_reduce(0, kind.flatten(), first, "amin"))
            if layer >= self.sink_from_layer:
                rn = rms_normalized(h).abs()  # [b, seq, d]
                if self.sink_dims is not None:
                    if given is None:
                        given = torch.zeros(h.shape[-1], dtype=torch.bool, device=dev)
                        given[list(self.sink_dims)] = True
                    dims = given
                else:  # `sink_dims` as a mask [d]: BOS's dims above tau, and dims visual tokens share across samples
                    over = rn > tau
                    from_ref = (over & ref[..., None]).flatten(0, 1).any(0)
                    shared = (over & visual[..., None]).any(1).sum(0) >= SHARED_SAMPLES  # [d]: samples passing in it
                    dims = from_ref | shared
                stats["dims"].append(dims)
                sink_score = torch.maximum(sink_score, (rn * dims).amax(-1)[s, p])
        out = {k: torch.stack(v).cpu() for k, v in stats.items() if v}  # [layers, ...]: the one copy of the statistics
        out["tokens"] = (massive, max_abs, sink_score)
        return out

    def _fold_layer_stats(self, got: dict[str, Any]) -> None:
        """Add one batch's per-layer statistics (host tensors from `_layer_pass`) to the running ones, in the order
        the flagged entries come in (`most_common` breaks ties by it)."""
        roles = [Role(r).name.lower() for r in range(len(Role))]
        for layer in range(got["n_massive"].shape[0]):
            st = self._layer_stats.setdefault(layer, {"n_massive": 0, "max_abs": 0.0, "median_abs": [], "dims": Counter(), "roles": Counter()})
            st["n_massive"] += int(got["n_massive"][layer])
            st["max_abs"] = max(st["max_abs"], float(got["max_abs"][layer]))
            st["median_abs"] += got["median"][layer].tolist()
            count, first = got["dim_count"][layer], got["dim_first"][layer]
            hit = (count > 0).nonzero().flatten().tolist()
            st["dims"].update({d: int(count[d]) for d in sorted(hit, key=lambda d: (int(first[d]), d))})
            count, first = got["role_count"][layer], got["role_first"][layer]
            hit = (count > 0).nonzero().flatten().tolist()
            st["roles"].update({roles[r]: int(count[r]) for r in sorted(hit, key=lambda r: int(first[r]))})
        for dims in got.get("dims", []):
            self._dims_found.update(dims.nonzero().flatten().tolist())

    def result(self) -> dict[str, Any]:
        import torch

        layers = {}
        for layer, st in sorted(self._layer_stats.items()):
            med = torch.tensor(st["median_abs"]).median().item() if st["median_abs"] else 0.0
            layers[str(layer)] = {
                "n_massive": st["n_massive"],
                "max_abs": st["max_abs"],
                "median_abs": med,
                "top_dims": st["dims"].most_common(5),
                "roles": dict(st["roles"]),
            }
        why = self.cannot_fire()
        agreement = {}
        for (a, b), (both, either) in self._pairs.items():
            mute = why is not None and "attention_sink" in (a, b)  # no verdict, not a disagreement
            agreement[f"{a}&{b}"] = {"both": both, "either": either, "jaccard": None if mute or not either else both / either}
            if mute:
                agreement[f"{a}&{b}"]["note"] = "attention_sink " + why
        return {
            "n_visual_tokens": self._n,
            "flag_counts": dict(self._flag_counts),
            "attention_sink": {"tau": self.tau_for(self._d) if self._d else self.tau, "ceiling": math.sqrt(self._d) if self._d else None,
                               "status": why or "can fire"},
            "warnings": [f"sink_detector: the attention-sink test {why}; set sink_detector.tau below the ceiling"] if why else [],
            "agreement": agreement,
            "flags_by_group": self._by_group,
            "sink_dims": sorted(self._dims_found) if self.sink_dims is None else list(self.sink_dims),
            "layers": layers,
        }

    def figures(self, out_dir: Path) -> list[Path]:
        from embedlens.figures import layer_curves, token_map

        out = []
        if self._layer_stats:
            r = self.result()["layers"]
            xs = [int(k) + 1 for k in r]
            out.append(layer_curves({"max |a|": (xs, [v["max_abs"] for v in r.values()]),
                                     "median |a|": (xs, [v["median_abs"] for v in r.values()])},
                                    Path(out_dir) / "sink_detector_layers.png", xlabel="LLM hidden state (1: the first layer's output, as the lenses number them)",
                                    ylabel="|activation| over every token\nand dimension", legend_title="statistic",
                                    title="Largest and median hidden-state magnitude after each LLM layer"))
        out += frame_maps(self._first, out_dir, "sink_detector_map", lambda f, path, where: token_map(
            f["pixels"], f["row"], f["col"], [f"{n:.0f}{(' ' + lab) if lab else ''}" for n, lab in zip(f["norm"], f["label"])], path,
            title=f"ViT norm per patch; V = high norm, M = massive activation, A = attention sink - {f['sample_id']}{where}"))
        return out


def _first_valid(valid: torch.Tensor) -> torch.Tensor:
    import torch

    out = torch.zeros_like(valid)
    out[torch.arange(valid.shape[0]), valid.long().argmax(dim=1)] = True
    return out
