"""SToP's temporal sink score: which places of a video's frame grid draw the tower's attention in every frame.

Kim et al. (2026), "Sink-Token-Aware Pruning for Fine-Grained Video Understanding in Efficient Video LLMs"
(arXiv:2604.20937, code github.com/rlqja1107/SToP) find *sink tokens* in video LLMs: tokens at the same spatial
place that draw high attention across the temporal dimension while carrying little meaning. Their score,
as their reference code computes it (``sink_score = minmax_norm(attn_weights.mean(0) ** gamma)`` in
``pruning/holitom/llava_arch.py``, ``fastvid/llava_arch.py``, ``flashvid/token_selection.py``):

- ``attn_weights[t, i]``: the attention token ``i`` of frame ``t`` *receives* in the vision tower's feature
  layer (the layer whose output the model takes), averaged over heads and over every query of that frame
  (the tower attends within a frame); where the projector pools patches into one token (LLaVA-OneVision's
  2-D pooling, Qwen's 2 x 2 merge) the attention map is pooled the same way: here, the mean over the token's
  patches;
- averaged over the frames, raised to ``gamma`` (1.1 there), then min-max normalised over the video's places:
  ``(x - min) / (max - min + 1e-12)``, in 0..1, one score per place, the same for each of its frames.

Here the attention is recomputed from the feature layer's own queries and keys (its input is hooked), so the
tower can run with SDPA or flash attention. Towers read: Qwen-VL's packed blocks (``attn.qkv``, rotary
``position_embeddings``, one attention sequence per temporal patch in ``cu_seqlens``) and CLIP / SigLIP
encoder layers (``self_attn.q_proj`` / ``k_proj``, one frame per tower row).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedlens._torch import no_grad, run_to
from embedlens.adapters.base import resolve_path
from embedlens.adapters.capabilities import Capability
from embedlens.errors import AdapterError, EmbedLensError, PlanError
from embedlens.probes._util import FirstImage, frame_maps, token_meta, visual_rows
from embedlens.probes.base import Probe, Table
from embedlens.probes.over_time import CONTENT, place_content, sink_persistence
from embedlens.registry import probes
from embedlens.sites import Site

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch

#: SToP's exponent (``--gamma`` default of its evaluation code).
STOP_GAMMA = 1.1
#: Places listed in the result, most sink-like first.
TOP_PLACES = 10


def _attention_module(adapter: "Adapter", layer: int) -> torch.nn.Module:
    block = resolve_path(adapter.model, adapter.paths.vision_layers)[layer]
    attn = getattr(block, "attn", None) or getattr(block, "self_attn", None)
    if attn is not None and hasattr(attn, "qkv") and hasattr(attn, "num_heads"):
        return attn
    if attn is not None and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "head_dim")):
        return attn
    raise AdapterError(f"{adapter.name}'s tower layers ({type(block).__name__}) are neither Qwen-VL blocks (attn.qkv) nor "
                       "CLIP/SigLIP encoder layers (self_attn.q_proj/k_proj): their attention cannot be recomputed")


def _received(q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """``[sequences, L]`` float32: the attention each key of each sequence receives, averaged over the heads and
    the sequence's queries (softmax over its own keys). `q`, `k`: ``[sequences, L, heads, head_dim]``, rows past
    ``lengths`` padding."""
    import torch

    n_seq, width, heads, _ = q.shape
    valid = torch.arange(width, device=q.device)[None, :] < lengths[:, None]  # [sequences, L]
    out = torch.zeros(n_seq, width, device=q.device)
    for h in range(heads):  # one head at a time: [sequences, L, L] at most
        s = (q[:, :, h].float() @ k[:, :, h].float().transpose(1, 2)) * scale
        p = s.masked_fill(~valid[:, None, :], -torch.inf).softmax(-1) * valid[:, :, None]
        out += p.sum(1)
    return out / (heads * lengths[:, None].clamp(min=1))


@no_grad
def tower_attention_received(adapter: "Adapter", batch: "Batch", layer: int) -> torch.Tensor:
    """``[rows, positions]`` float32, as the tower's `vision.layers[layer]` site is laid out: the attention each
    position receives in that layer, head mean, mean over the queries of its own attention sequence (a frame).

    The model runs up to that layer's attention (its input is hooked, then the forward stops); where one forward
    runs the tower more than once (`Adapter.vision_passes`: Qwen-VL on a batch of images and videos), each run is
    read alone and the runs are joined on the patch axis, as the vision sites are."""
    import torch

    attn = _attention_module(adapter, layer)
    inputs = adapter.model_inputs(batch)
    passes = adapter.vision_passes(inputs) or [inputs]
    return torch.cat([_received_in_run(adapter, attn, layer, p) for p in passes], dim=1)


def _received_in_run(adapter: "Adapter", attn: torch.nn.Module, layer: int, inputs: dict) -> torch.Tensor:
    """`tower_attention_received` of one run of the tower (the model's `inputs`, stopped at `attn`)."""
    import torch

    reached = run_to(attn, lambda: adapter.model(**inputs))  # the model stops at that layer's attention
    if reached is None:
        raise AdapterError(f"{adapter.name}: vision layer {layer} did not run for this batch")
    x, kw = reached.hidden(), reached.kwargs
    if hasattr(attn, "qkv"):  # Qwen-VL: [patches, d], one attention sequence per cu_seqlens span (a temporal patch)
        cu, pe = kw.get("cu_seqlens"), kw.get("position_embeddings")
        if cu is None or pe is None:
            raise AdapterError(f"{type(attn).__name__}: expected cu_seqlens and position_embeddings among its inputs")
        n = x.shape[0]
        q, k, _ = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb_vision")
        q, k = rope(q, k, *pe)
        cu = cu.to(x.device).long()
        lengths = cu[1:] - cu[:-1]
        width = int(lengths.max())  # the one host read of the batch: the padded sequence length
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths, output_size=n)
        pos = torch.arange(n, device=x.device) - cu[:-1][seq]
        qp = q.new_zeros(len(lengths), width, *q.shape[1:])
        kp = k.new_zeros(len(lengths), width, *k.shape[1:])
        qp[seq, pos], kp[seq, pos] = q, k
        return _received(qp, kp, lengths, attn.scaling)[seq, pos][None]  # [1, patches]
    n, t, _ = x.shape  # CLIP / SigLIP: [frames, positions, d], each row its own sequence
    q = attn.q_proj(x).view(n, t, -1, attn.head_dim)
    k = attn.k_proj(x).view(n, t, -1, attn.head_dim)
    scale = getattr(attn, "scale", None) or attn.scaling
    return _received(q, k, torch.full((n,), t, device=x.device), scale)


@probes.register("temporal_sinks")
class TemporalSinks(Probe):
    """SToP's temporal sink score of every place of a video's frame grid: attention persistent across frames.

    Per video token, the attention it receives in the vision tower's feature layer within its own frame
    (head mean, query mean; a token standing for several patches takes their mean); per place (sample, image,
    row, col), that attention averaged over its frames, raised to ``gamma`` and min-max normalised over the
    video's places (Kim et al. 2026, SToP's sink score: 1 for the place drawing the most attention over the
    whole video, 0 for the least). A token that draws attention in every frame outscores one that draws as
    much in one frame only. Image samples are left out (one frame has no persistence); a run without video
    writes nothing.

    Tables: ``tokens`` (each video token's ``attention`` in its frame and its place's ``sink_score``) and
    ``places`` (``n_frames``, ``mean_attention``, ``sink_score`` and, where the data has per-frame truth,
    ``content``: static background, static object or moving). Figures: the attention map of each frame of
    the first video and its sink scores.

    Args:
        vision_layer: tower layer whose attention is read (negative counts from the end); None: the feature
            layer, the last one the model's image features depend on (SToP's choice).
        gamma: the exponent applied to the mean attention before normalising (SToP: 1.1).

    Example:
        >>> from embedlens import load_model
        >>> from embedlens.data import Sample
        >>> from PIL import Image
        >>> adapter = load_model("tiny:qwen2_vl")
        >>> frames = [Image.new("RGB", (32, 32), (40 * i, 90, 200)) for i in range(4)]
        >>> batch = adapter.encode([Sample(video=frames, question="what moves?", id="v")])
        >>> probe = TemporalSinks()
        >>> places = probe.update(adapter, batch, {})["places"]
        >>> len(places["sink_score"]), round(max(places["sink_score"]), 3), min(places["sink_score"])
        (16, 1.0, 0.0)
    """

    def __init__(self, vision_layer: int | None = None, gamma: float = STOP_GAMMA):
        if not (math.isfinite(gamma) and gamma > 0):
            raise PlanError(f"temporal_sinks.gamma: must be a finite number > 0; got {gamma}")
        self.vision_layer, self.gamma = vision_layer, gamma
        self._n_videos = 0
        self._n_places = 0
        self._score_sum = 0.0
        self._by_content = {c: [0, 0.0, 0.0] for c in CONTENT}  # places, summed score, summed mean attention
        self._top: list[dict[str, Any]] = []
        self._layer_used: int | None = None
        self._first = FirstImage()

    def _layer(self, adapter: "Adapter") -> int:
        n = adapter.n_vision_layers
        if self.vision_layer is None:
            return adapter.vision_layers_needed - 1
        idx = self.vision_layer + n if self.vision_layer < 0 else self.vision_layer
        if not 0 <= idx < n:
            raise PlanError(f"temporal_sinks.vision_layer: layer {self.vision_layer} is out of range for this model (0..{n - 1})")
        return idx

    def check(self, adapter: "Adapter") -> None:
        layer = self._layer(adapter)
        if adapter.has(Capability.VIDEO):  # a family without video never gives this probe a token to score
            try:
                _attention_module(adapter, layer)
            except EmbedLensError as e:
                raise PlanError(f"temporal_sinks: {e}") from None

    def sites(self, adapter: "Adapter") -> list[Site]:
        """None: `update` runs the tower up to the layer's attention itself (`tower_attention_received`), so a
        traced activation of that layer would be a second tower run per batch that nothing reads."""
        return []

    def update(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor]) -> dict[str, Table]:
        all_vt = batch.roles.visual_tokens()
        video = all_vt["frame"] >= 0
        if not bool(video.any()):
            return {}
        vt = {c: v[video] for c, v in all_vt.items()}  # the video tokens, once per batch
        layer = self._layer(adapter)
        self._layer_used = layer
        received = tower_attention_received(adapter, batch, layer)
        site = Site("vision.layers", layer)
        attention = visual_rows(adapter, site, received[..., None], vt, batch.inputs)[:, 0]  # [tokens]
        keys, n_frames, mean, score, inverse = sink_persistence(vt, attention, self.gamma)
        content = place_content(batch, keys)
        token_score = score[inverse]
        # one copy of the batch's results to the host
        attention_h, token_score_h, keys_h, n_frames_h, mean_h, score_h, content_h = (
            t.cpu() for t in (attention, token_score, keys, n_frames, mean, score, content))
        rows = token_meta(batch, vt)
        rows["attention"] = attention_h.tolist()
        rows["sink_score"] = token_score_h.tolist()
        names = list(CONTENT) + ["unknown"]  # -1 indexes the last
        places: Table = {"sample_id": [batch.samples[i].id for i in keys_h[:, 0].tolist()], "image": keys_h[:, 1].tolist(),
                         "row": keys_h[:, 2].tolist(), "col": keys_h[:, 3].tolist(), "n_frames": n_frames_h.tolist(),
                         "mean_attention": mean_h.tolist(), "sink_score": score_h.tolist(),
                         "content": [names[c] for c in content_h.tolist()]}
        self._fold(places, content_h, score_h, mean_h, keys_h)
        self._first.offer(adapter, batch, vt, attention=rows["attention"], sink_score=rows["sink_score"])
        return {"tokens": rows, "places": places}

    def _fold(self, places: Table, content: torch.Tensor, score: torch.Tensor, mean: torch.Tensor, keys: torch.Tensor) -> None:
        import torch

        self._n_videos += len(torch.unique(keys[:, :2], dim=0))
        self._n_places += len(score)
        self._score_sum += float(score.sum())
        for i, c in enumerate(CONTENT):
            mine = content == i
            acc = self._by_content[c]
            acc[0] += int(mine.sum())
            acc[1] += float(score[mine].sum())
            acc[2] += float(mean[mine].sum())
        top = score.topk(min(TOP_PLACES, len(score))).indices.tolist()
        self._top += [{k: places[k][i] for k in ("sample_id", "row", "col", "n_frames", "mean_attention", "sink_score", "content")}
                      for i in top]
        self._top = sorted(self._top, key=lambda r: (-r["sink_score"], -r["mean_attention"]))[:TOP_PLACES]

    def result(self) -> dict[str, Any]:
        by_content = {c: {"places": n, "mean_sink_score": s / n, "mean_attention": a / n} for c, (n, s, a) in self._by_content.items() if n}
        return {
            "gamma": self.gamma,
            "vision_layer": self._layer_used,
            "n_videos": self._n_videos,
            "n_places": self._n_places,
            "mean_sink_score": self._score_sum / self._n_places if self._n_places else None,
            **({"by_content": by_content} if by_content else {}),
            "top_places": list(self._top),
        }

    def figures(self, out_dir: Path) -> list[Path]:
        from embedlens.figures import value_map

        frames = self._first.frames
        if not frames:
            return []
        layer = self._layer_used
        values = [a for e in frames for a in e["attention"]]  # one colour scale for every frame: they are compared
        out = frame_maps(self._first, out_dir, "temporal_sinks_map", lambda e, path, where: value_map(
            e["pixels"], e["row"], e["col"], e["attention"], path, label="attention received in the frame (head, query mean)",
            title=f"Attention each token draws at vision layer {layer} - {e['sample_id']}{where}", vmin=min(values), vmax=max(values)))
        e = frames[0]
        out.append(value_map(e["pixels"], e["row"], e["col"], e["sink_score"], Path(out_dir) / "temporal_sinks_score.png",
                             vmin=0.0, vmax=1.0, label="SToP sink score (0..1)",
                             title=f"SToP sink score of each place over {len(frames)} frames (gamma {self.gamma:g}) - {e['sample_id']}"))
        return out
