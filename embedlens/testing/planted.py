"""A tiny model with planted token structure, so that probes can be checked against a known answer.

On top of a tiny LLaVA (real Hugging Face classes), forward hooks plant:

- **projector**: background patches land exactly on the ``dead`` vocabulary
  row, one patch (``vit_patch``) on the ``sink`` row, and object patches on
  the row of their colour word (so they vary with the image);
- **vision tower**: ``vit_patch`` gets ``vit_scale`` added to one dimension at the
  feature layer (a ViT high-norm / register token);
- **LLM**: after layer ``massive_layer``, the token of ``massive_patch`` and
  the BOS token carry a massive activation in dimension ``massive_dim``.

Images are 32 x 32 (4 x 4 patches): white background with a 2 x 2-patch
square in one colour per image.

Example:
    >>> adapter, truth = planted_model()
    >>> batch = adapter.encode(planted_samples(2))
    >>> gt = truth.masks(batch)
    >>> [int(gt[g].sum()) for g in ("sink", "dead", "alive")]
    [2, 22, 8]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from embedlens.data import Sample
from embedlens.testing.tiny import GRID, IMAGE_SIZE, PATCH_SIZE

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (240, 200, 20), "purple": (150, 40, 180)}
OBJECT_PATCHES = (5, 6, 9, 10)  # rows 1-2, cols 1-2


@dataclass
class PlantedTruth:
    """What was planted; `masks` gives the expected groups of a batch."""

    sink_id: int
    dead_id: int
    colour_ids: dict[str, int]
    vit_patch: int = 15
    massive_patch: int = 0
    massive_dim: int = 7
    massive_layer: int = 1
    massive_value: float = 1000.0
    handles: list = field(default_factory=list, repr=False)

    def patch_masks(self, batch) -> dict[str, torch.Tensor]:
        """``[batch, seq]`` masks of the planted roles: object, vit (sink row + high norm), massive, background."""
        roles = batch.roles
        idx = roles.row * GRID + roles.col
        vis = roles.visual
        obj = vis & torch.isin(idx, torch.tensor(OBJECT_PATCHES))
        return {
            "object": obj,
            "vit": vis & (idx == self.vit_patch),
            "massive": vis & (idx == self.massive_patch),
            "background": vis & ~obj,
        }

    def masks(self, batch) -> dict[str, torch.Tensor]:
        """Expected anchor groups: sink = the sink-row patch, dead = other background, alive = objects."""
        p = self.patch_masks(batch)
        return {"sink": p["vit"], "dead": p["background"] & ~p["vit"], "alive": p["object"]}


def planted_image(colour: str) -> Image.Image:
    arr = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, dtype=np.uint8)
    arr[PATCH_SIZE : 3 * PATCH_SIZE, PATCH_SIZE : 3 * PATCH_SIZE] = COLOURS[colour]
    return Image.fromarray(arr)


def planted_samples(n: int, questions: tuple[str, ...] = ("what colour is the square?", "what is it?")) -> list[Sample]:
    """`n` samples cycling through the colours, with per-patch colour annotations in ``meta.patch_labels``."""
    names = list(COLOURS)
    out = []
    for i in range(n):
        c = names[i % len(names)]
        grid = [[c if r * GRID + col in OBJECT_PATCHES else "background" for col in range(GRID)] for r in range(GRID)]
        out.append(Sample([planted_image(c)], question=questions[i % len(questions)], answer=c, id=f"p{i}-{c}",
                          meta={"patch_labels": {"colour": grid}}))
    return out


def _colour_of(patch_pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> str:
    rgb = (patch_pixels.float() * std + mean).mean(dim=(1, 2)) * 255  # [3]
    dists = {name: float(((rgb - torch.tensor(c, dtype=torch.float32)) ** 2).sum()) for name, c in COLOURS.items()}
    return min(dists, key=dists.get)


def planted_model(tower: str = "clip", vit_scale: float = 300.0):
    """A tiny LLaVA (`tower` "clip" or "siglip") with planted sink, dead and alive tokens.

    Returns:
        (adapter, `PlantedTruth`).
    """
    from embedlens.adapters import load_model
    from embedlens.adapters.base import resolve_path

    adapter = load_model(f"tiny:llava-{tower}")
    model, tok = adapter.model, adapter.tokenizer
    ids = lambda w: tok.convert_tokens_to_ids(w)  # noqa: E731
    truth = PlantedTruth(sink_id=ids("corner"), dead_id=ids("empty"), colour_ids={c: ids(c) for c in COLOURS})
    emb = adapter.input_embeddings().detach()
    ip = adapter.processor.image_processor
    mean = torch.tensor(ip.image_mean)[:, None, None]
    std = torch.tensor(ip.image_std)[:, None, None]
    prefix = adapter.n_prefix_tokens
    state: dict[str, object] = {}
    marker = emb[truth.dead_id] * 1.01  # the massive patch: same direction as the dead row, findable in the sequence
    bos = emb[tok.bos_token_id]

    def capture_pixels(module, args, kwargs):
        state["pixels"] = kwargs.get("pixel_values", args[0] if args else None)

    # Hooks sit on the last submodule of each stage (an MLP, the projector's last linear) so that the
    # stage's own output, which is what a trace reads, already carries the planted values.
    def high_norm(module, args, output):
        out = output.clone()
        out[:, prefix + truth.vit_patch, 0] += vit_scale
        return out

    def project(module, args, output):
        out = output.clone()  # [images, patches, d]
        pix = state["pixels"]
        for i in range(out.shape[0]):
            for p in range(out.shape[1]):
                r, c = divmod(p, GRID)
                if p in OBJECT_PATCHES:
                    patch = pix[i, :, r * PATCH_SIZE : (r + 1) * PATCH_SIZE, c * PATCH_SIZE : (c + 1) * PATCH_SIZE]
                    out[i, p] = emb[truth.colour_ids[_colour_of(patch, mean, std)]]
                elif p == truth.vit_patch:
                    out[i, p] = emb[truth.sink_id]
                elif p == truth.massive_patch:
                    out[i, p] = marker
                else:
                    out[i, p] = emb[truth.dead_id]
        return out

    def find_rows(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        if x is not None:
            state["massive_rows"] = (x == marker.to(x.dtype)).all(-1) | (x == bos.to(x.dtype)).all(-1)  # [batch, seq]

    def massive(module, args, output):
        rows = state.get("massive_rows")
        if rows is None or rows.shape != output.shape[:2]:
            return output  # a run whose rows differ (e.g. pruned by the engine): plant where the marker is, else nothing
        out = output.clone()
        out[..., truth.massive_dim] += rows.to(out.dtype) * truth.massive_value
        return out

    vision_layers = resolve_path(model, adapter.paths.vision_layers)
    feature_layer = len(vision_layers) + model.config.vision_feature_layer if model.config.vision_feature_layer < 0 else model.config.vision_feature_layer
    truth.handles = [
        resolve_path(model, "model.vision_tower").register_forward_pre_hook(capture_pixels, with_kwargs=True),
        vision_layers[feature_layer].mlp.register_forward_hook(high_norm),
        resolve_path(model, adapter.paths.projector).linear_2.register_forward_hook(project),
        resolve_path(model, adapter.paths.language_model).register_forward_pre_hook(find_rows, with_kwargs=True),
        resolve_path(model, adapter.paths.llm_layers)[truth.massive_layer].mlp.register_forward_hook(massive),
    ]
    adapter.source = f"planted:llava-{tower}"
    return adapter, truth
