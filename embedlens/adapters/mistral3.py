"""Mistral 3 (`Mistral3ForConditionalGeneration`): Pixtral tower at native resolution, patch merger, Mistral LLM.

Each image keeps its aspect ratio: the image processor shrinks it (never
enlarges it) to fit ``size.longest_edge`` and rounds each side up to a
multiple of ``patch_size * spatial_merge_size``; ``image_sizes`` holds each
image's resized (height, width), and ``pixel_values`` the images padded to the
batch's largest (``[images, 3, H, W]``). In the prompt an image is one row of
``[IMG]`` tokens per row of merged patch blocks, each row ended by
``[IMG_BREAK]``, the last one by ``[IMG_END]`` instead
(``PixtralProcessor.replace_image_token``). The model fills only the ``[IMG]``
tokens (``masked_scatter`` at ``image_token_id``); ``[IMG_BREAK]`` and
``[IMG_END]`` keep their own embeddings and are SPECIAL in the role map.

Vision sites. The Pixtral tower embeds each image's real patches (padding
cut off by ``image_sizes``), row-major, and runs all images of the batch as
one packed sequence (``[1, patches, d]``; attention kept inside each image by
a block mask, 2-D RoPE on each patch's (row, col)). ``vision.embed`` is that
sequence as the layers receive it (after ``ln_pre``). The projector
(``Mistral3MultiModalProjector``) takes the selected hidden state without its
batch dimension and the image sizes: it norms each patch, then its patch
merger folds every ``spatial_merge_size`` x ``spatial_merge_size`` block of an
image's patch grid into one token (``unfold``: blocks in row-major order, the
order of the ``[IMG]`` tokens), then the MLP. So ``vision.features`` is one
row per patch (``[1, patches, d]``) and ``projector`` one row per token
(``[1, tokens, d]``): every visual token has ``feature_row = 0``,
``feature_col`` its row of the packed projector output, and its block is the
``m x m`` patches of its image's grid that `patch_indices` names (these need
the batch's ``image_sizes``).

The language model is Mistral: plain 1-D positions, and sliding-window
attention on every layer when ``text_config.sliding_window`` is set (its
attention passes the window to the attention function; read by
`embedlens.attention.layer_windows`).

Example:
    >>> from embedlens import Sample, load_model
    >>> from embedlens.testing.images import noise
    >>> adapter = load_model("tiny:mistral3")
    >>> batch = adapter.encode([Sample([noise(40, 70)], question="what is it?")])
    >>> batch.inputs["image_sizes"].tolist(), adapter.image_grids(batch.inputs)  # 6 x 8 patches, 3 x 4 tokens
    ([[48, 64]], [(3, 4)])
"""

from __future__ import annotations

import sys
import types

import torch
from transformers import BatchFeature, Mistral3ForConditionalGeneration, ProcessorMixin

from embedlens.adapters.base import Adapter, ModulePaths
from embedlens.adapters.capabilities import Capability, packed_block_patches
from embedlens.errors import AdapterError
from embedlens.registry import adapters
from embedlens.sites import Site


def _pixtral_processor() -> type[ProcessorMixin]:
    """HF's own `PixtralProcessor` class, importable without torchvision.

    Its module imports one helper, ``get_resize_output_image_size``, from the torchvision image processor's module,
    which will not import without torchvision; the PIL image processor's module has the same function. Where the
    import fails, that module is stood in for by one holding the PIL helper for the time of the import only.
    """
    try:
        from transformers.models.pixtral.processing_pixtral import PixtralProcessor
    except ImportError:
        from transformers.models.pixtral import image_processing_pil_pixtral

        name = "transformers.models.pixtral.image_processing_pixtral"
        stand_in = types.ModuleType(name)
        stand_in.get_resize_output_image_size = image_processing_pil_pixtral.get_resize_output_image_size
        sys.modules[name] = stand_in
        try:
            from transformers.models.pixtral.processing_pixtral import PixtralProcessor
        finally:
            del sys.modules[name]
    return PixtralProcessor


PixtralProcessor = _pixtral_processor()


@adapters.register("mistral3")
class Mistral3Adapter(Adapter):
    """Mistral 3 / Pixtral: native-resolution Pixtral tower (2-D RoPE), patch merger in the projector, Mistral LLM.

    See the module docstring for the image span (``[IMG]`` rows ended by ``[IMG_BREAK]`` / ``[IMG_END]``) and sites.
    """

    architectures = ("Mistral3ForConditionalGeneration",)
    model_class = Mistral3ForConditionalGeneration
    vision_towers = ("pixtral",)
    paths = ModulePaths(vision_embed="model.vision_tower.ln_pre", vision_layers="model.vision_tower.transformer.layers")
    capabilities = frozenset({Capability.PACKED_TOWER, Capability.VISION_FEATURE_LAYER})

    image_only_processor = PixtralProcessor
    image_only_keys = ("patch_size", "spatial_merge_size", "image_token", "image_break_token", "image_end_token", "chat_template")

    @property
    def merge_size(self) -> int:
        return int(self.config.spatial_merge_size)

    @property
    def patch_size(self) -> int:
        return int(self.config.vision_config.patch_size)

    @property
    def patch_block(self) -> tuple[int, int]:
        m = self.merge_size
        return m, m

    @property
    def n_prefix_tokens(self) -> int:
        return 0  # no CLS: every tower row is a patch

    def grid(self) -> tuple[int, int]:
        """The token grid of the largest square image the image processor gives (``size.longest_edge`` pixels, each
        side rounded up to whole merged blocks, as ``get_resize_output_image_size``). Images keep their own
        resolution (`image_grids`); this one sizes synthetic data's per-patch labels (``patch_grid: auto``)."""
        factor = self.patch_size * self.merge_size
        side = -(-int(self.processor.image_processor.size["longest_edge"]) // factor)
        return side, side

    def _sizes(self, inputs: BatchFeature) -> torch.Tensor:
        """`[images, 2]` (height, width) of each image of the batch in patches, as the tower cuts them."""
        if "image_sizes" not in inputs:
            raise AdapterError(f"{self.name}: the processor gave no image_sizes; it does not fit this family")
        return torch.as_tensor(inputs["image_sizes"]).long().reshape(-1, 2) // self.patch_size

    def image_grids(self, inputs: BatchFeature) -> list[tuple[int, int]]:
        m = self.merge_size
        return [(int(h) // m, int(w) // m) for h, w in self._sizes(inputs).tolist()]

    def image_layouts(self, inputs: BatchFeature) -> list[torch.Tensor]:
        out, first = [], 0
        for gh, gw in self.image_grids(inputs):
            k = torch.arange(gh * gw)  # the merger's blocks, row-major: the order of the [IMG] tokens
            out.append(torch.stack([torch.zeros_like(k), k // gw, k % gw, torch.zeros_like(k), first + k], dim=1))
            first += gh * gw
        return out

    def patch_indices(self, feature_col: torch.Tensor, inputs: BatchFeature | None = None) -> torch.Tensor:
        """`[tokens, m * m]`: the rows of the packed tower sequence (``vision.layers[i]``, ``vision.features``) that
        each token's block of patches holds: its image's patches are row-major after the images before it."""
        if inputs is None:
            raise AdapterError(f"{self.name}: a token's patches depend on the batch's image sizes; pass the batch's inputs")
        return packed_block_patches(feature_col, self._sizes(inputs).to(feature_col.device), self.merge_size)

    def _marker_ids(self) -> set[int]:
        ids = set()
        for token in (self.processor.image_break_token, self.processor.image_end_token):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == self.tokenizer.unk_token_id:
                raise AdapterError(f"{self.name}: the tokenizer has no {token!r} token; it does not fit this family's processor")
            ids.add(int(tid))
        return ids

    def special_token_ids(self) -> set[int]:
        # [IMG_BREAK] / [IMG_END] end each row and the image: image structure the model does not fill, not text
        return super().special_token_ids() | self._marker_ids()

    def placeholder_text(self, inputs: BatchFeature, image: int, n_tokens: int) -> str:
        # As PixtralProcessor.replace_image_token: a row of [IMG] then [IMG_BREAK] per token row, the last break [IMG_END]
        rows, cols = self.image_grids(inputs)[image]
        if n_tokens != rows * cols:
            raise AdapterError(f"{self.name}: image {image} has {n_tokens} image tokens; its {rows} x {cols} grid gives {rows * cols}")
        p = self.processor
        text = (self.image_placeholder * cols + p.image_break_token) * rows
        return text[: -len(p.image_break_token)] + p.image_end_token

    def tower_kwargs(self, inputs: BatchFeature) -> dict:
        return {"image_sizes": inputs["image_sizes"]}

    def projector_args(self, inputs: BatchFeature) -> tuple:
        return (inputs["image_sizes"],)

    def tower_images(self, inputs: BatchFeature) -> torch.Tensor:
        n = self._sizes(inputs).prod(-1)
        return torch.repeat_interleave(torch.arange(len(n)), n)[None]

    def site_value(self, site: Site, value: torch.Tensor, inputs: BatchFeature) -> torch.Tensor:
        # the projector's input and output have no batch dimension (the tower's states have a leading 1)
        if site.component in ("vision.features", "projector") and value.dim() == 2:
            return value[None]
        return value

    def display_pixels(self, inputs: BatchFeature, image: int, feature_row: int) -> torch.Tensor:
        """`[3, H, W]` normalised pixels of image `image` of the batch, its padding cut off."""
        h, w = (int(v) for v in torch.as_tensor(inputs["image_sizes"])[image])
        return inputs["pixel_values"][image, :, :h, :w]
