"""Attention analyses: where chosen queries attend among the visual groups, FastV's and VisionZip's criteria.

Attention rows are recomputed from each layer's queries and keys
(`embedlens.attention.attention_rows`) for the queries asked for only, so the
model can run with SDPA and no full pattern is ever materialised.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedlens.adapters.base import mixer_path, resolve_path
from embedlens.adapters.capabilities import Capability
from embedlens.attention import (LINEAR, attention_rows, check_layer_types, layer_windows, llm_layer_types, refuse_linear,
                                  rotary_embeddings, window_keys)
from embedlens.errors import EmbedLensError, PlanError
from embedlens.probes._util import FirstImage, frame_maps, group_masks, parse_selections, selection_masks, token_groups, token_meta
from embedlens.probes.base import Probe, Table
from embedlens.registry import probes
from embedlens.sites import Site

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch


def allowed_keys(
    batch: "Batch", block_ids: torch.Tensor | None, query_pos: torch.Tensor, window: int | None = None, window_bounds_blocks: bool = False
) -> torch.Tensor:
    """``[batch, q, seq]`` bool: keys each query may attend (causal, no padding, plus bidirectional blocks).

    Args:
        window: on a sliding-window layer, its window (counted over the tokens present, as `window_keys`).
        window_bounds_blocks: the window bounds the blocks too (Gemma 3), or only the causal part (PaliGemma 2).
    """
    import torch

    roles = batch.roles
    seq = roles.kind.shape[1]
    key = torch.arange(seq)
    present = ~roles.padding[:, None, :]
    causal = key[None, None, :] <= query_pos[..., None]
    block = torch.zeros_like(causal)
    if block_ids is not None:
        qb = block_ids.gather(1, query_pos)
        block = (qb[..., None] >= 0) & (qb[..., None] == block_ids[:, None, :])
    if window is None:
        return (causal | block) & present
    near = window_keys(~roles.padding, query_pos, window)
    return ((causal | block) & near if window_bounds_blocks else (causal & near) | block) & present


def llm_attention_rows(adapter: "Adapter", batch: "Batch", layer: int, h_in: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """``[batch, heads, q, seq]`` attention probabilities of LLM layer `layer` for the queries at `query_pos`.

    Args:
        h_in: ``[batch, seq, d]`` residual stream entering the layer (site ``llm.layers[i].in``).
        query_pos: ``[batch, q]`` sequence positions of the queries.
    """
    import torch

    lm = resolve_path(adapter.model, adapter.paths.language_model)
    if getattr(adapter.paths, "linear_attn", ""):  # a hybrid model: its linear-attention layers are refused by name
        refuse_linear([layer], llm_layer_types(adapter), "attention_flow.layers")
    else:  # before the lookup: a linear-attention layer has no attention module
        check_layer_types(lm.config, adapter.name)
    blocks = resolve_path(adapter.model, adapter.paths.llm_layers)
    block = blocks[layer]
    attn = resolve_path(block, adapter.paths.attn)
    norm = resolve_path(block, adapter.paths.attn_norm)
    dev = h_in.device
    pos_ids = adapter.position_ids(batch.inputs).to(dev)
    types, windows = layer_windows(lm.config, [resolve_path(b, mixer_path(b, adapter.paths)) for b in blocks], adapter.name)
    block_ids = adapter.block_ids(batch.inputs)
    with torch.no_grad():
        cos_sin = rotary_embeddings(lm, h_in, pos_ids, types[layer : layer + 1])[types[layer]]
        hidden = norm(h_in)
        allowed = allowed_keys(batch, block_ids, query_pos.cpu(), windows[layer], adapter.has(Capability.WINDOWED_BLOCKS))
        return attention_rows(attn, hidden, cos_sin, query_pos.to(dev), allowed.to(dev))


def vit_cls_attention(adapter: "Adapter", layer: int, x_in: torch.Tensor) -> torch.Tensor:
    """``[images, heads, tokens]`` attention of the CLS token in vision layer `layer` (CLIP towers).

    Args:
        x_in: ``[images, tokens, d]`` input of that layer (after CLIP's pre-layernorm for layer 0).
    """
    import torch

    block = resolve_path(adapter.model, adapter.paths.vision_layers)[layer]
    attn = block.self_attn
    with torch.no_grad():
        x = block.layer_norm1(x_in)
        n, t, _ = x.shape
        q = attn.q_proj(x[:, :1]).view(n, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(n, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        return ((q.float() @ k.float().transpose(-1, -2)) * attn.scale).softmax(-1)[:, :, 0]


def has_cls(adapter: "Adapter") -> bool:
    return hasattr(resolve_path(adapter.model, adapter.paths.vision_embed), "class_embedding")


@probes.register("attention_flow")
class AttentionFlow(Probe):
    """Attention mass from query roles to each visual group, per layer and head; FastV and VisionZip criteria.

    - For every LLM layer in `layers`, head and query selection in `queries`
      (e.g. ``last``, ``question``, ``answer``), the attention mass each
      query puts on each group of visual tokens (the run's partition, or all
      visual tokens as ``visual``) and on text, averaged over queries.
    - Per visual token and layer, the head-averaged attention it receives
      from the last prompt token (FastV's criterion).
    - With `vit_cls_layer`, the head-averaged attention from the ViT's CLS
      token to each patch at that vision layer (VisionZip's criterion); CLIP
      towers only (SigLIP has no CLS token).

    Args:
        layers: LLM layers (default: all; on a hybrid model such as Qwen3.5, its attention layers: a
            linear-attention layer has no attention and is refused by name).
        queries: selections of query tokens, by name (roles or any selection expression).
        vit_cls_layer: vision layer for CLS attention, or None.

    Example:
        >>> from embedlens.testing import tiny_batch
        >>> from embedlens.tracing import collect
        >>> adapter, batch = tiny_batch("llava-clip", n=2, padding_side="left")
        >>> probe = AttentionFlow(layers=[0, 3], vit_cls_layer=-2)
        >>> rows = probe.update(adapter, batch, collect(adapter, batch, probe.sites(adapter)))["tokens"]
        >>> sorted(set(rows["layer"]))
        [0, 3]
    """

    def __init__(
        self,
        layers: list[int] | None = None,
        queries: list[str] = ["last", "question"],  # noqa: B006 - never mutated
        vit_cls_layer: int | None = None,
    ):
        self._selections = parse_selections("attention_flow", "queries", queries)
        self.layers, self.queries, self.vit_cls_layer = layers, list(queries), vit_cls_layer
        self._mass: dict[tuple[str, str], torch.Tensor] = {}  # (query, target) -> [layers, heads] sum
        self._n_queries: dict[str, int] = {q: 0 for q in queries}
        self._last_sum: dict[str, torch.Tensor] = {}  # group -> [layers] sum of last-token attention
        self._last_n: dict[str, int] = {}
        self._first = FirstImage()
        self._first_layer: int | None = None
        self._layer_ids: list[int] = []  # the model's numbers of the layers probed, in order (the figures' x)

    def _layers(self, adapter: "Adapter") -> list[int]:
        n = adapter.n_llm_layers
        types = llm_layer_types(adapter) if getattr(adapter.paths, "linear_attn", "") else ["attention"] * n
        if self.layers is None:  # a hybrid model's attention layers only (linear-attention layers have no attention)
            return [i for i, t in enumerate(types) if t != LINEAR]
        out = []
        for layer in self.layers:
            idx = layer + n if layer < 0 else layer
            if not 0 <= idx < n:
                raise PlanError(f"attention_flow.layers: layer {layer} is out of range for this model (0..{n - 1})")
            out.append(idx)
        try:
            refuse_linear(out, types, "attention_flow.layers")
        except EmbedLensError as e:
            raise PlanError(str(e)) from None
        return out

    def _vit_layer(self, adapter: "Adapter") -> int | None:
        if self.vit_cls_layer is None:
            return None
        if not has_cls(adapter):
            raise PlanError(
                f"attention_flow.vit_cls_layer: this model's vision tower ({type(adapter.model.config.vision_config).__name__}) "
                "has no CLS token, so there is no CLS attention (VisionZip's criterion needs a CLIP-style tower); drop the option"
            )
        try:
            return adapter.resolve(Site("vision.layers", self.vit_cls_layer)).layer
        except EmbedLensError as e:
            raise PlanError(f"attention_flow.vit_cls_layer: {e}") from None

    def check(self, adapter: "Adapter") -> None:
        self.sites(adapter)

    def sites(self, adapter: "Adapter") -> list[Site]:
        out = []
        vl = self._vit_layer(adapter)
        if vl is not None:
            out.append(Site("vision.layers", vl - 1) if vl > 0 else Site("vision.embed"))
        return out + [Site("llm.layers", i, "in") for i in self._layers(adapter)]

    def update(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor]) -> dict[str, Table]:
        import torch

        roles = batch.roles
        layers = self._layers(adapter)
        self._layer_ids = list(layers)
        vt = roles.visual_tokens()
        groups = token_groups(batch, vt["sample"], vt["position"])
        by_group = group_masks(groups)  # group -> [tokens]
        targets = {}
        for g, sel in by_group.items():
            targets[g] = torch.zeros_like(roles.visual)
            targets[g][vt["sample"][sel], vt["position"][sel]] = True
        targets["text"] = roles.text
        qmasks = selection_masks("attention_flow", "queries", self._selections, batch)
        # one attention computation per layer over the union of all queries and the last token
        union = roles.last.clone()
        for m in qmasks.values():
            union |= m
        n_q = int(union.sum(1).max())
        pos = torch.zeros(union.shape[0], n_q, dtype=torch.long)
        ok = torch.zeros(union.shape[0], n_q, dtype=torch.bool)
        for b in range(union.shape[0]):
            idx = union[b].nonzero().flatten()
            pos[b, : len(idx)], ok[b, : len(idx)] = idx, True
            pos[b, len(idx) :] = idx[-1]
        meta = token_meta(batch, vt)
        rows: Table = {k: [] for k in (*meta, "group", "layer", "last_token_attention")}
        last_pos = roles.last_index
        for li, layer in enumerate(layers):
            h = acts[Site("llm.layers", layer, "in")]
            probs = llm_attention_rows(adapter, batch, layer, h, pos).cpu()  # [B, H, q, S]
            heads = probs.shape[1]
            for q, qm in qmasks.items():
                is_q = qm.gather(1, pos) & ok  # [B, q]
                if not is_q.any():
                    continue
                if li == 0:
                    self._n_queries[q] += int(is_q.sum())
                for g, tm in targets.items():
                    mass = (probs * tm[:, None, None, :]).sum(-1)  # [B, H, q]
                    acc = self._mass.setdefault((q, g), torch.zeros(len(layers), heads, dtype=torch.float64))
                    acc[li] += (mass * is_q[:, None, :]).sum(dim=(0, 2)).double()
            qi = (pos == last_pos[:, None]).float().argmax(dim=1)  # column of the last token
            last = probs[torch.arange(pos.shape[0]), :, qi].mean(1)  # [B, S] head-averaged
            vals = last[vt["sample"], vt["position"]]
            for k, v in meta.items():
                rows[k] += v
            rows["group"] += groups
            rows["layer"] += [layer] * len(groups)
            rows["last_token_attention"] += vals.tolist()
            for g, sel in by_group.items():
                self._last_sum.setdefault(g, torch.zeros(len(layers), dtype=torch.float64))[li] += float(vals[sel].sum())
                if li == 0:
                    self._last_n[g] = self._last_n.get(g, 0) + int(sel.sum())
            if li == 0 and self._first.data is None:
                self._first.offer(adapter, batch, vt, value=vals.tolist())
                self._first_layer = layer
        out = {"tokens": rows}
        vl = self._vit_layer(adapter)
        if vl is not None:
            x = acts[Site("vision.layers", vl - 1)] if vl > 0 else _vision_layer0_input(adapter, acts[Site("vision.embed")])
            cls = vit_cls_attention(adapter, vl, x).mean(1).cpu()  # [images, tokens]
            out["vit_cls"] = {**meta, "group": groups, "vit_layer": [vl] * len(groups),
                              "cls_attention": cls[vt["feature_row"], vt["feature_col"] + adapter.n_prefix_tokens].tolist()}
        return out

    def result(self) -> dict[str, Any]:
        mass = {}
        for (q, g), acc in self._mass.items():
            n = max(self._n_queries[q], 1)
            per = acc / n
            mass.setdefault(q, {})[g] = {"per_layer": per.mean(1).tolist(), "per_layer_head": per.tolist()}
        last = {g: (s / max(self._last_n[g], 1)).tolist() for g, s in self._last_sum.items()}
        return {"n_queries": dict(self._n_queries), "layers": list(self._layer_ids), "attention_mass": mass, "last_token_attention_mean": last}

    def figures(self, out_dir: Path) -> list[Path]:
        from embedlens.figures import layer_curves, value_map

        out = []
        res = self.result()
        for q, per_target in res["attention_mass"].items():
            curves = {g: (res["layers"] or list(range(len(v["per_layer"]))), v["per_layer"]) for g, v in per_target.items()}
            out.append(layer_curves(curves, Path(out_dir) / f"attention_flow_{q.replace(' ', '_')}.png",
                                    xlabel="LLM layer (its attention)" if res["layers"] else "position among the layers probed",
                                    ylabel=f"attention mass from '{q}' queries\nto the group's tokens", legend_title="token group",
                                    title=f"Attention mass from '{q}' queries to each token group (head average)"))
        values = [v for f in self._first.frames for v in f["value"]]  # a video's frames share one colour scale
        out += frame_maps(self._first, out_dir, "attention_flow_last_token", lambda f, path, where: value_map(
            f["pixels"], f["row"], f["col"], f["value"], path, label="attention from the last token (head mean)",
            title=f"Attention from the last token, LLM layer {self._first_layer} (FastV) - {f['sample_id']}{where}",
            vmin=min(values, default=None), vmax=max(values, default=None)))
        return out


def _vision_layer0_input(adapter: "Adapter", embed: torch.Tensor) -> torch.Tensor:
    import torch

    tower = resolve_path(adapter.model, adapter.paths.vision_embed.rsplit(".", 1)[0])
    pre = getattr(tower, "pre_layrnorm", None)
    with torch.no_grad():
        return pre(embed) if pre is not None else embed
