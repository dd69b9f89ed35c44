"""A tiny model with planted token structure, so that probes can be checked against a known answer.

On top of a tiny LLaVA (real Hugging Face classes), forward hooks plant:

- **projector**: background patches land on the ``dead`` vocabulary row
  (nearly one point: the row plus a small deviation), one patch
  (``vit_patch``) on the ``sink`` row, and object patches on the row of their
  colour word *plus image-specific content* (a fixed projection of the
  patch's own pixel texture, as large as 0.6 of the row), so that tokens on a
  content word differ between images as real ones do;
- **vision tower**: ``vit_patch`` gets ``vit_scale`` added to one dimension at the
  feature layer (a ViT high-norm / register token);
- **LLM**: after layer ``massive_layer``, the token of ``massive_patch`` and
  the BOS token carry a massive activation in dimension ``massive_dim``.

Images are 32 x 32 (4 x 4 patches): a light textured background (the texture
drawn per image) with a 2 x 2-patch square in one colour per image.

Scenarios for anchor discovery (`planted_model` arguments), each with a known
answer: ``content_word`` sends the square's top-left patch of *every* image
to that word (a content word present in every image), ``dead_words`` splits
the background between several dead anchors, ``background="content"``
gives background patches content like objects (no dead tokens at all), and
``planted_samples(full_every=n)`` fills every n-th image with the square
(no background there: the dead anchor is absent from those images).

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
CONTENT = 0.6  # image-specific content of an alive token, relative to its word's row
DEAD_JITTER = 0.03  # how far a dead token strays from its anchor row, relative to the row


@dataclass
class PlantedTruth:
    """What was planted; `masks` gives the expected groups of a batch.

    `dead_ids` are the dead anchors (the background is split between them by
    patch row); `content_id` is the word every image's square sends one patch
    to, if any; with ``background == "content"`` there are no dead tokens.
    """

    sink_id: int
    dead_ids: list[int]
    colour_ids: dict[str, int]
    content_id: int | None = None
    background: str = "dead"
    vit_patch: int = 15
    massive_patch: int = 0
    massive_dim: int = 7
    massive_layer: int = 1
    massive_value: float = 1000.0
    handles: list = field(default_factory=list, repr=False)

    @property
    def dead_id(self) -> int:
        """The first dead anchor."""
        return self.dead_ids[0]

    def anchors(self) -> dict[str, list[int]]:
        """The anchors a discovery must find: ``{"sink": [...], "dead": [...]}``."""
        return {"sink": [self.sink_id], "dead": list(self.dead_ids) if self.background == "dead" else []}

    def patch_masks(self, batch) -> dict[str, torch.Tensor]:
        """``[batch, seq]`` masks of the planted roles: object, vit (sink row + high norm), massive, background."""
        roles = batch.roles
        idx = roles.row * GRID + roles.col
        vis = roles.visual
        full = torch.tensor([bool(s.meta.get("planted_full")) for s in batch.samples])[:, None]
        obj = vis & (torch.isin(idx, torch.tensor(OBJECT_PATCHES)) | full)
        return {
            "object": obj,
            "vit": vis & (idx == self.vit_patch),
            "massive": vis & (idx == self.massive_patch),
            "background": vis & ~obj,
        }

    def masks(self, batch) -> dict[str, torch.Tensor]:
        """Expected anchor groups: sink = the sink-row patch, dead = other background, alive = objects."""
        p = self.patch_masks(batch)
        if self.background != "dead":
            return {"sink": p["vit"], "dead": torch.zeros_like(p["vit"]), "alive": p["object"] | (p["background"] & ~p["vit"])}
        return {"sink": p["vit"], "dead": p["background"] & ~p["vit"], "alive": p["object"] & ~p["vit"]}


def planted_image(colour: str, index: int = 0, full: bool = False) -> Image.Image:
    """A light background with a texture drawn from `index`, and a square of `colour` (the whole image if `full`)."""
    rng = np.random.default_rng(1000 + index)
    arr = (235 + rng.integers(-12, 13, size=(IMAGE_SIZE, IMAGE_SIZE, 3))).astype(np.uint8)
    lo, hi = (0, IMAGE_SIZE) if full else (PATCH_SIZE, 3 * PATCH_SIZE)
    square = np.array(COLOURS[colour])[None, None] + rng.integers(-12, 13, size=(hi - lo, hi - lo, 3))
    arr[lo:hi, lo:hi] = np.clip(square, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def planted_samples(
    n: int, questions: tuple[str, ...] = ("what colour is the square?", "what is it?"), full_every: int | None = None,
    colours: tuple[str, ...] | None = None,
) -> list[Sample]:
    """`n` samples cycling through the colours, with per-patch colour annotations in ``meta.patch_labels``.

    Args:
        full_every: every `full_every`-th image (1st, (n+1)-th, ...) is filled by the square: no background.
        colours: cycle through these (names of `COLOURS`) instead of all five; with three, each colour word is the
            nearest id in a third of the images, frequent enough to be an anchor candidate.
    """
    names = list(colours or COLOURS)
    out = []
    for i in range(n):
        c = names[i % len(names)]
        full = full_every is not None and i % full_every == 0
        grid = [[c if full or r * GRID + col in OBJECT_PATCHES else "background" for col in range(GRID)] for r in range(GRID)]
        out.append(Sample([planted_image(c, i, full)], question=questions[i % len(questions)], answer=c, id=f"p{i}-{c}",
                          meta={"patch_labels": {"colour": grid}, "planted_full": full}))
    return out


def _colour_of(patch_pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> str | None:
    rgb = (patch_pixels.float() * std + mean).mean(dim=(1, 2)) * 255  # [3]
    dists = {name: float(((rgb - torch.tensor(c, dtype=torch.float32)) ** 2).sum()) for name, c in COLOURS.items()}
    best = min(dists, key=dists.get)
    return best if dists[best] < 60.0**2 * 3 else None  # the light background is none of the colours


def planted_model(
    tower: str = "clip",
    vit_scale: float = 300.0,
    dead_words: tuple[str, ...] = ("empty",),
    content_word: str | None = None,
    background: str = "dead",
    anisotropy: float = 0.0,
):
    """A tiny LLaVA (`tower` "clip" or "siglip") with planted sink, dead and alive tokens.

    Args:
        tower: "clip" or "siglip".
        vit_scale: added to one dimension of `vit_patch` at the feature layer (its ViT norm).
        dead_words: the dead anchors; background patch row r goes to ``dead_words[r % len(dead_words)]``.
        content_word: every square's top-left patch goes to this word (plus content), in every image.
        background: "dead" (background patches are dead tokens) or "content" (they carry content: no dead tokens).
        anisotropy: every dead and content token also gets this share of its row's norm along one fixed direction, so
            that tokens cluster around it as real checkpoints' do (two tokens of different words are then far from
            orthogonal, and a content word's tokens are close in absolute terms although they still differ).

    Returns:
        (adapter, `PlantedTruth`).
    """
    from embedlens.adapters import load_model
    from embedlens.adapters.base import resolve_path

    if background not in ("dead", "content"):
        raise ValueError(f"background: expected 'dead' or 'content'; got {background!r}")
    adapter = load_model(f"tiny:llava-{tower}")
    model, tok = adapter.model, adapter.tokenizer
    ids = lambda w: tok.convert_tokens_to_ids(w)  # noqa: E731
    truth = PlantedTruth(sink_id=ids("corner"), dead_ids=[ids(w) for w in dead_words], colour_ids={c: ids(c) for c in COLOURS},
                         content_id=ids(content_word) if content_word else None, background=background)
    emb = adapter.input_embeddings().detach()
    ip = adapter.processor.image_processor
    mean = torch.tensor(ip.image_mean)[:, None, None]
    std = torch.tensor(ip.image_std)[:, None, None]
    prefix = adapter.n_prefix_tokens
    # the content of a patch: a fixed projection of its pixel texture (its deviation from the patch mean)
    proj = torch.randn(3 * PATCH_SIZE * PATCH_SIZE, emb.shape[1], generator=torch.Generator().manual_seed(0))
    common = torch.nn.functional.normalize(torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(1)), dim=0)
    state: dict[str, object] = {}
    # the massive patch: same direction as a dead token, findable in the sequence
    marker = (emb[truth.dead_id] + anisotropy * emb[truth.dead_id].norm() * common) * 1.01
    bos = emb[tok.bos_token_id]

    def capture_pixels(module, args, kwargs):
        state["pixels"] = kwargs.get("pixel_values", args[0] if args else None)

    def with_content(row: torch.Tensor, patch: torch.Tensor, amount: float) -> torch.Tensor:
        texture = (patch - patch.mean(dim=(1, 2), keepdim=True)).flatten().float() @ proj
        return row + amount * row.norm() * texture / texture.norm().clamp_min(1e-12) + anisotropy * row.norm() * common

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
                patch = pix[i, :, r * PATCH_SIZE : (r + 1) * PATCH_SIZE, c * PATCH_SIZE : (c + 1) * PATCH_SIZE]
                colour = _colour_of(patch, mean, std)
                if p == truth.vit_patch:
                    out[i, p] = emb[truth.sink_id]
                elif colour is not None:  # an object patch: its colour (or the content word) plus content
                    word = truth.content_id if truth.content_id is not None and p == OBJECT_PATCHES[0] else truth.colour_ids[colour]
                    out[i, p] = with_content(emb[word], patch, CONTENT)
                elif p == truth.massive_patch:
                    out[i, p] = marker
                elif truth.background == "content":
                    out[i, p] = with_content(emb[truth.dead_ids[r % len(truth.dead_ids)]], patch, CONTENT)
                else:
                    out[i, p] = with_content(emb[truth.dead_ids[r % len(truth.dead_ids)]], patch, DEAD_JITTER)
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
