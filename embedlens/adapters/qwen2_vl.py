"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: native-resolution tower, 2 x 2 patch merger, 3-D M-RoPE positions.

Each image keeps (about) its own aspect ratio: the image processor resizes it
to multiples of ``patch_size * spatial_merge_size`` and cuts it into a
``(t, h, w)`` grid of patches (``image_grid_thw``; ``t = 1`` for an image).
``pixel_values`` holds *every* patch of the batch as one row each, already in
*merge-window order*: for each 2 x 2 block of patches in row-major order of
blocks, its four patches in row-major order. The tower runs all images as one
packed sequence (attention kept inside each image), and its merger folds
every 4 consecutive rows (one block) into one visual token. In the prompt an
image is ``<|vision_start|>`` + ``(h / 2) * (w / 2)`` image tokens +
``<|vision_end|>``.

Vision sites. The tower has no batch dimension: each vision site is the
batch's packed sequence as HF gives it, with a leading dimension of 1
(``[1, patches, d]``; ``projector`` is ``[1, tokens, d]``). So every visual
token has ``feature_row = 0`` and ``feature_col`` = its row of the packed
merger output, and a token's patch block is rows ``4 * feature_col ..
4 * feature_col + 3`` of ``vision.layers[i]`` / ``vision.features``.
Per-image statistics of the tower (the ViT-norm rule of ``sink_detector`` and
the partition) are taken over each image's own patches (`tower_images`).
A batch of images and videos runs the tower twice (images, then videos, as HF
does); its vision sites are the two runs joined in that order
(`vision_passes`), so the same mapping holds with ``feature_col`` counted over
both (`embedlens.adapters.qwen2_vl_video`).

Qwen2.5-VL's tower attends within windows (all but ``fullatt_block_indexes``)
and, to do so, permutes whole 2 x 2 blocks into window order right after the
patch embedding; it restores the order only after the merger. Its per-layer
hidden states (HF's ``output_hidden_states``), the merger's input and output
are therefore in *window order*, and embedlens reads them as they are: a
token's ``feature_col`` is its block's place in window order, so the block
mapping above holds at every vision site. ``vision.embed`` is the patch
embedding *as the blocks receive it*, permuted into window order by the
model's own window index, so it too follows that mapping.

Qwen3-VL adds DeepStack: the outputs of vision layers
``deepstack_visual_indexes`` go through their own mergers and are added to
the LLM hidden states at the visual positions after each of the first
``len(deepstack_visual_indexes)`` decoder layers. ``llm.layers[i]`` reads the
decoder layer's output *before* that addition (the module's own output, HF's
``hidden_states[i + 1]``), ``llm.layers[i + 1].in`` after it; the features
themselves are no site (read them with `Engine.deepstack`, scattered onto the
sequence, or the model's ``get_image_features``). The intervention engine adds
the features of the visual tokens present in a layer (a pruned token's
features are dropped with it; an injected token gets those of the layers it
is present in).

Positions: the language model takes ``[3, batch, seq]`` (t, h, w) position
ids from the model's ``get_rope_index``: text tokens count on, an image's
tokens get (start, start + row, start + col) and the text after it resumes at
``start + max(h, w) / 2``. `position_ids` returns exactly those, each sample
numbered alone (padding excluded).

Example:
    >>> from embedlens import Sample, load_model
    >>> from embedlens.testing.images import shapes
    >>> adapter = load_model("tiny:qwen2_vl")
    >>> batch = adapter.encode([Sample([shapes(64)], question="what is it?")])
    >>> batch.inputs["image_grid_thw"].tolist(), adapter.image_grids(batch.inputs)  # 8 x 8 patches, 4 x 4 tokens
    ([[1, 8, 8]], [(4, 4)])
    >>> adapter.position_ids(batch.inputs).shape[0]  # (t, h, w)
    3
"""

from __future__ import annotations

import torch
from transformers import (
    BatchFeature,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)

from embedlens.adapters.base import Adapter, ModulePaths
from embedlens.adapters.capabilities import Capability
from embedlens.adapters.qwen2_vl_video import Qwen3Video, QwenVideo
from embedlens.errors import AdapterError
from embedlens.registry import adapters
from embedlens.sites import Site


def _image_only(base: type) -> type:
    """`base` (a Qwen processor) without its video processor, which needs torchvision."""

    class ImageOnly(base):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

        def __init__(self, image_processor, tokenizer, chat_template: str | None = None):
            super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template)

    ImageOnly.__name__ = ImageOnly.__qualname__ = base.__name__.replace("Processor", "ImageProcessor")
    ImageOnly.__doc__ = f"`{base.__name__}` without its video processor (which will not construct without torchvision)."
    return ImageOnly


Qwen2VLImageProcessor = _image_only(Qwen2VLProcessor)
Qwen2_5_VLImageProcessor = _image_only(Qwen2_5_VLProcessor)
Qwen3VLImageProcessor = _image_only(Qwen3VLProcessor)

_QWEN_PATHS = ModulePaths(
    vision_embed="model.visual.patch_embed",
    vision_layers="model.visual.blocks",
    projector="model.visual.merger",
    language_model="model.language_model",
    llm_layers="model.language_model.layers",
    llm_norm="model.language_model.norm",
)


@adapters.register("qwen2_vl")
class Qwen2VLAdapter(QwenVideo, Adapter):
    """Qwen2-VL: native-resolution ViT (2-D RoPE), 2 x 2 patch merger, Qwen2 LLM with 3-D M-RoPE."""

    architectures = ("Qwen2VLForConditionalGeneration",)
    model_class = Qwen2VLForConditionalGeneration
    paths = _QWEN_PATHS
    # VIDEO: samples with a video (`embedlens.adapters.qwen2_vl_video`: a token's frame is its temporal patch)
    capabilities = frozenset({Capability.PACKED_TOWER, Capability.MROPE, Capability.VIDEO})

    image_only_processor = Qwen2VLImageProcessor
    image_only_keys = ("chat_template",)
    # the pixel bounds an image is resized within (so its visual tokens: pixels / (patch x merge)^2)
    processor_options = {"min_pixels": ("size.shortest_edge", int), "max_pixels": ("size.longest_edge", int)}

    @property
    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    @property
    def patch_block(self) -> tuple[int, int]:
        m = self.merge_size
        return m, m

    @property
    def n_prefix_tokens(self) -> int:
        return 0  # no CLS: every tower row is a patch

    def grid(self) -> tuple[int, int]:
        """The token grid of the largest square image the image processor keeps (``size.longest_edge`` pixels).

        Images keep their own resolution, so a batch's grids differ (`image_grids`); this one sizes
        synthetic data's per-patch labels (``patch_grid: auto``).
        """
        ip = self.processor.image_processor
        factor = int(ip.patch_size) * int(ip.merge_size)
        side = int(int(ip.size["longest_edge"]) ** 0.5) // factor
        return side, side

    def image_grids(self, inputs: BatchFeature) -> list[tuple[int, int]]:
        m = self.merge_size
        thw = _thw(inputs)
        return [(int(thw[j, 1]) // m, int(thw[j, 2]) // m) for j in _batch_order(self, inputs)]

    def patch_indices(self, feature_col: torch.Tensor, inputs: BatchFeature | None = None) -> torch.Tensor:
        # the packed sequence is in merge-window order: a token's block is its merge unit's consecutive rows
        unit = self.merge_size**2
        return feature_col[:, None] * unit + torch.arange(unit, device=feature_col.device)

    def token_order(self, inputs: BatchFeature) -> torch.Tensor:
        """`[tokens]`: for each visual token of the batch in the tower's order (images, then videos), its row of the
        packed merger output (the identity here; Qwen2.5-VL's window order differs)."""
        return torch.arange(int(self._tokens_per_image(inputs).sum()))

    def _tokens_per_image(self, inputs: BatchFeature) -> torch.Tensor:
        return _thw(inputs).prod(-1) // self.merge_size**2

    def image_layouts(self, inputs: BatchFeature) -> list[torch.Tensor]:
        """One layout per image or video, in the samples' order: a video's tokens come temporal patch by temporal
        patch, each a row-major grid of 2 x 2 blocks, so token k is at frame ``k // (h w)`` (its temporal patch:
        see `embedlens.adapters.qwen2_vl_video`), the sixth column; ``feature_col`` counts over the tower's order,
        the batch's images, then its videos."""
        if "video_grid_thw" not in inputs and "image_grid_thw" not in inputs:
            raise AdapterError(f"{self.name}: the processor gave no image_grid_thw; it does not fit this family")
        order = self.token_order(inputs)
        thw, n_tokens = _thw(inputs).tolist(), self._tokens_per_image(inputs)
        first, n_images = (torch.cumsum(n_tokens, 0) - n_tokens).tolist(), _n_images(inputs)
        out = []
        for j in _batch_order(self, inputs):
            (t, h, w), n, video = thw[j], int(n_tokens[j]), j >= n_images
            if t != 1 and not video:
                raise AdapterError(f"{self.name}: an image with {t} temporal patches; images have one")
            gw, per_frame = w // self.merge_size, (h // self.merge_size) * (w // self.merge_size)
            k = torch.arange(n)
            cols = order[first[j] : first[j] + n]
            s = k % per_frame
            columns = [torch.zeros_like(k), s // gw, s % gw, torch.zeros_like(k), cols] + ([k // per_frame] if video else [])
            out.append(torch.stack(columns, dim=1))
        return out

    def special_token_ids(self) -> set[int]:
        # <|vision_start|> / <|vision_end|> frame each image: image structure, not text
        ids = {int(self.config.vision_start_token_id), int(self.config.vision_end_token_id)}
        return super().special_token_ids() | ids

    def position_ids(self, inputs: BatchFeature) -> torch.Tensor:
        """`[3, batch, seq]` (t, h, w) M-RoPE position ids from the model's own `get_rope_index`, each sample
        numbered as if it ran alone (padding excluded; padding positions hold 0)."""
        ids, _ = self.model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=inputs["attention_mask"],
            **{k: inputs[k] for k in ("video_grid_thw", "second_per_grid_ts") if k in inputs},
        )
        return ids

    def tower_kwargs(self, inputs: BatchFeature) -> dict:
        return {"grid_thw": _thw(inputs)}

    def tower_images(self, inputs: BatchFeature) -> torch.Tensor:
        # images are contiguous in the packed sequence (Qwen2.5-VL's windows reorder within an image only); in a batch
        # of images and videos, each is numbered in the samples' order (as `image_layouts`)
        n = _thw(inputs).prod(-1)
        order = torch.tensor(_batch_order(self, inputs))
        number = torch.empty_like(order).scatter_(0, order, torch.arange(len(order)))
        return torch.repeat_interleave(number, n)[None]

    def vision_passes(self, inputs: dict) -> list[dict] | None:
        """In a batch of images and videos, the model's inputs for each of the tower's two runs (HF's order: the
        images, then the videos), each without the other's pixels, for reading the vision sites (concatenated in
        that order); None otherwise (one run)."""
        if "image_grid_thw" not in inputs or "video_grid_thw" not in inputs:
            return None
        videos, images = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"), ("pixel_values", "image_grid_thw")
        return [{k: v for k, v in inputs.items() if k not in videos}, {k: v for k, v in inputs.items() if k not in images}]

    def site_value(self, site: Site, value: torch.Tensor, inputs: BatchFeature) -> torch.Tensor:
        if site.component in ("vision.embed", "vision.layers", "vision.features", "projector") and value.dim() == 2:
            return value[None]
        return value

    def display_pixels(self, inputs: BatchFeature, image: int, feature_row: int, frame: int = 0) -> torch.Tensor:
        """`[3, H, W]` normalised pixels of image `image` of the batch (counted in the samples' order, a video as one),
        its patch rows put back in place; of a video, the first frame of temporal patch `frame` (kept frame
        ``2 * frame``)."""
        j, n_images = _batch_order(self, inputs)[image], _n_images(inputs)
        video = j >= n_images
        grids = inputs["video_grid_thw"] if video else inputs["image_grid_thw"]
        i = j - n_images if video else j
        n = grids.prod(-1)
        t, h, w = grids[i].tolist()
        if not 0 <= frame < t:
            raise IndexError(f"display_pixels: frame {frame} of image {image}, which has {t} temporal patch(es)")
        start = int(n[:i].sum()) + frame * h * w
        ip = self.processor.image_processor
        p, m, tp = int(ip.patch_size), self.merge_size, int(ip.temporal_patch_size)
        pv = inputs["pixel_values_videos"] if video else inputs["pixel_values"]
        rows = pv[start : start + h * w].reshape(h // m, w // m, m, m, 3, tp, p, p)[..., 0, :, :]
        return rows.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, h * p, w * p)


def _thw(inputs: BatchFeature) -> torch.Tensor:
    """`[n, 3]` (t, h, w) patch grids of what the tower runs, in its order: the batch's images, then its videos (a
    batch may hold both: `embedlens.adapters.qwen2_vl_video`)."""
    grids = [inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None]
    return torch.cat(grids) if len(grids) > 1 else grids[0] if grids else inputs["image_grid_thw"]


def _n_images(inputs: BatchFeature) -> int:
    """How many of `_thw`'s grids are images (the rest are videos)."""
    return len(inputs["image_grid_thw"]) if inputs.get("image_grid_thw") is not None else 0


def _batch_order(adapter: Adapter, inputs: BatchFeature) -> list[int]:
    """For each image or video of the batch in the samples' order (a sample holds images or one video), its row of
    `_thw`: the identity unless the batch holds both, where each sample's placeholder tokens say which it holds."""
    n_images = _n_images(inputs)
    if n_images == 0 or inputs.get("video_grid_thw") is None:
        return list(range(len(_thw(inputs))))
    ids, attn = inputs["input_ids"], inputs["attention_mask"].bool()
    per_image = (inputs["image_grid_thw"].prod(-1) // adapter.merge_size**2).tolist()
    n_img = ((ids == adapter.image_token_id) & attn).sum(1).tolist()
    has_video = ((ids == adapter.video_token_id) & attn).any(1).tolist()
    order, i, v = [], 0, n_images
    for left, video in zip(n_img, has_video):  # encoding time, on the host: one pass over the samples
        if video:
            order.append(v)
            v += 1
        while left > 0 and i < n_images:
            order.append(i)
            left -= per_image[i]
            i += 1
    return order


def _window_index(adapter: Adapter, inputs: BatchFeature) -> torch.Tensor:
    """The model's own window order of the batch's merge units (`vision_utils.get_vision_window_index`)."""
    from transformers.vision_utils import get_vision_window_index

    v = adapter.config.vision_config
    index, _ = get_vision_window_index(_thw(inputs), spatial_merge_size=v.spatial_merge_size,
                                       window_size=v.window_size, patch_size=v.patch_size)
    return index


@adapters.register("qwen2_5_vl")
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: Qwen2-VL's layout with window attention in the tower (sites in window order, see the module)."""

    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    model_class = Qwen2_5_VLForConditionalGeneration
    image_only_processor = Qwen2_5_VLImageProcessor
    seconds_per_patch = True  # M-RoPE spaces temporal patches by second_per_grid_ts

    def token_order(self, inputs: BatchFeature) -> torch.Tensor:
        # the merger's row w holds merge unit window_index[w]: unit k sits at row argsort(window_index)[k]
        return torch.argsort(_window_index(self, inputs))

    def site_value(self, site: Site, value: torch.Tensor, inputs: BatchFeature) -> torch.Tensor:
        if site.component == "vision.embed":
            # as the blocks receive it: whole merge units permuted into window order
            unit = self.merge_size**2
            value = value.reshape(-1, unit, value.shape[-1])[_window_index(self, inputs).to(value.device)].reshape(-1, value.shape[-1])
        return super().site_value(site, value, inputs)


@adapters.register("qwen3_vl")
class Qwen3VLAdapter(Qwen3Video, Qwen2VLAdapter):
    """Qwen3-VL: Qwen2-VL's layout, a tower with learned (interpolated) position embeddings, DeepStack features."""

    architectures = ("Qwen3VLForConditionalGeneration",)
    model_class = Qwen3VLForConditionalGeneration
    image_only_processor = Qwen3VLImageProcessor
    # VIDEO: a timestamp before each temporal patch (`embedlens.adapters.qwen2_vl_video.Qwen3Video`)
    capabilities = Qwen2VLAdapter.capabilities | {Capability.DEEPSTACK}
