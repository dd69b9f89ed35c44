"""Molmo2 (`Molmo2ForConditionalGeneration`): overlapping crops, a ViT, attention pooling over patches of possibly
several crops, an MLP projector whose rows are *added* to the image tokens' embeddings, a Qwen3-style LM in which all
image tokens attend to each other.

Images. The image processor (`embedlens.adapters.molmo2_crops`: HF's rule without torchvision) gives each image a
low-resolution view (the whole image resized to one crop) and a high-resolution canvas cut into overlapping crops;
``pixel_values`` is ``[crops, patches, patch_size**2 * 3]`` over the batch (each image's low-res crop first). Each
image token pools a block of ``pooling_size`` patches (``image_token_pooling``): of the low-res crop, or of the
high-res canvas, where a block on a seam between crops pools patches of each (each crop contributes the patches
inside its overlap margins). In the prompt an image is (`Molmo2Processor.replace_image_token`) ``<low_res_im_start>``,
the low-res tokens row by row, each row followed by ``<im_col>``, ``<im_end>``, then ``<im_start>``, the high-res
tokens likewise, ``<im_end>``. The ``<im_patch>`` tokens (``config.image_patch_id``) are VISUAL in the role map, the
markers SPECIAL. Role map: ``tile`` 0 is the low-res view, 1 the high-res one; ``row`` / ``col`` the token's place in
that view's token grid.

Vision sites. The tower runs every crop as one row (``[crops, patches, d]``); ``vision.embed`` (the patch embedding
plus the position table: the first layer's input) and ``vision.layers[i]`` are read as the batch's crops packed into
one sequence, ``[1, crops * patches, d]``, crop after crop (`site_value`). The adapter's attention pooling
(``image_pooling_2d``: each token's query is the mean of its patches, which it attends over) merges the patches of
the layers ``adapter_config.vision_feature_layer`` (concatenated) into one row per token: that is
``vision.features`` (``[1, tokens, d]``, the input of the MLP ``image_projector``: the merge comes before the
projector), and ``projector`` is the MLP's output, ``[1, tokens, d_text]``. So every visual token has
``feature_row = 0``, ``feature_col`` its row of the batch's projector output, and `patch_indices` names the rows of the
packed patch sequence its pooling reads (possibly of several crops; a block cut by the grid's edge repeats one of its
patches in place of the missing ones).

``llm.embed``: Molmo2 *adds* each image token's projector row to the embedding of its ``<im_patch>`` token; the site
is what the language model receives, so at a visual token it is ``embed_tokens[<im_patch>] + projector[0, feature_col]``.

The language model. Every token HF's processor marks as image (``mm_token_type_ids``: the ``<im_patch>`` tokens and
the markers, of all the sample's images) is in one bidirectional block; everything else is causal (`block_ids`). The
model rotates the layers of ``rope_scaling_layers`` with its scaled rotary table and the others with an unscaled one;
the intervention engine runs one table per layer type, so it refuses a model whose two tables differ on some layers
(`embedlens.attention.check_rotary`); with the default (every layer scaled) or an unscaled ``rope_type``, both are
one. Supported: the pre-norm, per-head query/key norm LM (``norm_after=False``, ``qk_norm_type="qwen3"``: Molmo2's
Qwen3 models); the post-norm OLMo variant is refused by name.

Example:
    >>> from embedlens import Sample, load_model
    >>> from embedlens.testing.images import noise
    >>> adapter = load_model("tiny:molmo2")
    >>> batch = adapter.encode([Sample([noise(40, 70)], question="what is it?")])
    >>> adapter.image_grids(batch.inputs), batch.inputs["image_grids"].tolist()
    ([(4, 4)], [[4, 4, 4, 8]])
"""

from __future__ import annotations

import torch
from transformers import BatchFeature, Molmo2ForConditionalGeneration, PreTrainedModel, ProcessorMixin
from transformers.models.molmo2.processing_molmo2 import Molmo2Processor

from embedlens.adapters.base import Adapter, ModulePaths
from embedlens.adapters.capabilities import Capability
from embedlens.adapters.molmo2_crops import Molmo2ImageProcessorNoTorchvision
from embedlens.errors import AdapterError
from embedlens.registry import adapters
from embedlens.sites import Site

#: `Molmo2Processor`'s constructor arguments a saved processor_config.json may hold
_PROCESSOR_KEYS = ("chat_template", "image_use_col_tokens", "use_single_crop_col_tokens", "use_single_crop_start_token",
                   "video_use_col_tokens", "use_frame_special_tokens")


class Molmo2ImageProcessor(Molmo2Processor):
    """`Molmo2Processor` for images and text only: the stock one needs a video processor (torchvision) to construct.

    Its ``__init__`` is HF's, but for handing `ProcessorMixin` the image processor and tokenizer only."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]

    def __init__(self, image_processor, tokenizer, chat_template=None, image_use_col_tokens=True,
                 use_single_crop_col_tokens=None, use_single_crop_start_token=True, video_use_col_tokens=False,
                 use_frame_special_tokens=True, **kwargs):
        self.image_use_col_tokens = image_use_col_tokens
        self.use_single_crop_col_tokens = use_single_crop_col_tokens
        self.use_single_crop_start_token = use_single_crop_start_token
        self.video_use_col_tokens = video_use_col_tokens
        self.use_frame_special_tokens = use_frame_special_tokens
        self.image_token = getattr(tokenizer, "image_token", "<|image|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video|>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.image_token_ids = tokenizer.convert_tokens_to_ids(list(MARKERS))
        ProcessorMixin.__init__(self, image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


#: the tokens HF's processor marks as image (``mm_token_type_ids`` 1), ``<im_patch>`` first
MARKERS = ("<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>", "<im_end>", "<frame_end>",
           "<im_low>")


@adapters.register("molmo2")
class Molmo2Adapter(Adapter):
    """Molmo2: overlapping crops + a low-res view, attention pooling across crops, features added to the image tokens,
    one bidirectional image block in the LM. See the module docstring for the image span and the sites."""

    architectures = ("Molmo2ForConditionalGeneration",)
    model_class = Molmo2ForConditionalGeneration
    paths = ModulePaths(vision_embed="model.vision_tower.patch_embedding", vision_layers="model.vision_tower.layers",
                        projector="model.multi_modal_projector.image_projector")
    capabilities = frozenset({Capability.PACKED_TOWER, Capability.PRE_PROJECTOR_MERGE})
    image_only_processor = Molmo2ImageProcessor  # where the stock processor cannot be built (HF's image processor needs torchvision)
    image_only_keys = _PROCESSOR_KEYS
    image_processor_port = Molmo2ImageProcessorNoTorchvision

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, source: str | None = None):
        super().__init__(model, processor, source)
        text = self.config.get_text_config()
        if text.norm_after or text.qk_norm_type != "qwen3":
            raise AdapterError(f"{self.name}: this Molmo2 language model norms each update after its sublayer "
                               f"(norm_after={text.norm_after}) or its queries over all heads (qk_norm_type="
                               f"{text.qk_norm_type!r}); the adapter serves the pre-norm one with per-head query/key "
                               "norms (norm_after=False, qk_norm_type='qwen3')")

    # -- the image span --------------------------------------------------------------------------------------------
    @property
    def patch_block(self) -> tuple[int, int]:
        h, w = self.processor.image_processor.pooling_size
        return int(h), int(w)

    @property
    def n_prefix_tokens(self) -> int:
        return 0

    @property
    def n_cls_tokens(self) -> int:
        return 0

    @property
    def patches_per_side(self) -> int:
        v = self.config.vision_config
        return int(v.image_size[0]) // int(v.patch_size)

    def grid(self) -> tuple[int, int]:
        """The low-res view's token grid (the whole image in one crop): the crop's patches pooled, rounded up."""
        bh, bw = self.patch_block
        n = self.patches_per_side
        return -(-n // bh), -(-n // bw)

    def image_grids(self, inputs: BatchFeature) -> list[tuple[int, int]]:
        return [(int(r), int(c)) for r, c in inputs["image_grids"][:, :2].tolist()]

    def image_layouts(self, inputs: BatchFeature) -> list[torch.Tensor]:
        out, first = [], 0
        for lr, lc, hr, hc in inputs["image_grids"].tolist():
            views = []
            for tile, (h, w) in enumerate(((lr, lc), (hr, hc))):
                t = torch.arange(h * w)
                views.append(torch.stack([torch.full_like(t, tile), t // w, t % w, torch.zeros_like(t), first + t], 1))
                first += h * w
            out.append(torch.cat(views))
        return out

    def _pooling(self, inputs: BatchFeature) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's ``image_token_pooling`` as indices into the packed patch sequence (each image's after the
        crops before it, as `Molmo2Model.get_image_features` offsets them), and which rows pool any patch."""
        pool = torch.as_tensor(inputs["image_token_pooling"]).long()
        grids = torch.as_tensor(inputs["image_grids"]).long()
        per_image = torch.as_tensor(inputs["image_num_crops"]).long() * int(inputs["pixel_values"].shape[-2])
        tokens = grids[:, 0] * grids[:, 1] + grids[:, 2] * grids[:, 3]
        offsets = torch.repeat_interleave(per_image.cumsum(0) - per_image, tokens, output_size=len(pool))
        pool = torch.where(pool >= 0, pool + offsets[:, None], -1)
        return pool, (pool >= 0).any(-1)

    def patch_indices(self, feature_col: torch.Tensor, inputs: BatchFeature | None = None) -> torch.Tensor:
        """`[tokens, pool_h * pool_w]`: the rows of the packed patch sequence (``vision.embed``, ``vision.layers[i]``)
        the token's pooling reads, possibly of two or more crops; a slot the grid's edge leaves empty repeats the
        token's first patch."""
        if inputs is None:
            raise AdapterError(f"{self.name}: a token's patches depend on the batch's crops; pass the batch's inputs")
        pool, valid = self._pooling(inputs)
        pool = pool[valid].to(feature_col.device)[feature_col]
        first = pool.gather(1, (pool >= 0).long().argmax(1, keepdim=True))
        return torch.where(pool >= 0, pool, first)

    def _marker_ids(self) -> set[int]:
        ids = set(self.tokenizer.convert_tokens_to_ids(list(MARKERS)))
        return ids - {None, self.tokenizer.unk_token_id}

    def special_token_ids(self) -> set[int]:
        return super().special_token_ids() | self._marker_ids()

    def processor_text(self, text: str) -> tuple[str, list[tuple[int, int]]]:
        # Molmo2Processor puts the BOS token (the EOS one where there is none) in front of a prompt without it
        bos = self.tokenizer.bos_token or self.tokenizer.eos_token
        return (text, []) if text.startswith(bos) else (bos + text, [(0, len(bos))])

    def placeholder_text(self, inputs: BatchFeature, image: int, n_tokens: int) -> str:
        lr, lc, hr, hc = inputs["image_grids"][image].tolist()
        if n_tokens != lr * lc + hr * hc:
            raise AdapterError(f"{self.name}: image {image} has {n_tokens} image tokens; its grids give {lr * lc + hr * hc}")
        return self.processor.replace_image_token(inputs, image)

    def block_ids(self, inputs: BatchFeature) -> torch.Tensor | None:
        """Every image token of a sample (``mm_token_type_ids`` 1: the ``<im_patch>`` tokens and the markers, of
        all its images) in one block, as `Molmo2Model.forward` builds its mask."""
        types = inputs.get("mm_token_type_ids")
        if types is None:
            ids = inputs["input_ids"]
            types = torch.isin(ids, torch.tensor(sorted(self._marker_ids()), device=ids.device)).long()
        return torch.where(types == 1, 0, -1)

    # -- the tower -------------------------------------------------------------------------------------------------
    def tower_images(self, inputs: BatchFeature) -> torch.Tensor:
        per_image = torch.as_tensor(inputs["image_num_crops"]).long() * int(inputs["pixel_values"].shape[-2])
        return torch.repeat_interleave(torch.arange(len(per_image)), per_image)[None]

    def site_value(self, site: Site, value: torch.Tensor, inputs: BatchFeature) -> torch.Tensor:
        # the tower's rows are crops: packed into one sequence; the patch embedding gets its positions added (the
        # first layer's input); the pooled features and the projector's rows have no batch dimension
        if site.component == "vision.embed":
            value = value + self.model.model.vision_tower.positional_embedding.to(value)
        if site.component in ("vision.embed", "vision.layers") and value.dim() == 3:
            return value.reshape(1, -1, value.shape[-1])
        if site.component in ("vision.features", "projector") and value.dim() == 2:
            _, valid = self._pooling(inputs)
            return value[valid.to(value.device)][None]
        return value

    def display_pixels(self, inputs: BatchFeature, image: int, feature_row: int) -> torch.Tensor:
        """`[3, S, S]` normalised pixels of image `image`'s low-res crop (the whole image, resized)."""
        crop = int(torch.as_tensor(inputs["image_num_crops"])[:image].sum())
        n, p = self.patches_per_side, int(self.config.vision_config.patch_size)
        patches = inputs["pixel_values"][crop].reshape(n, n, p, p, 3)
        return patches.permute(4, 0, 2, 1, 3).reshape(3, n * p, n * p)
