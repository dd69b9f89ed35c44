"""Gemma 4 (`Gemma4ForConditionalGeneration`): its own vision encoder (2-D RoPE, a pooler), Gemma 4 LM (sliding and
global layers, per-layer inputs, shared key/values, mixture-of-experts blocks).

The image processor keeps each image's aspect ratio: it resizes it to the largest size whose sides are whole
``pooling_kernel_size * patch_size`` blocks within ``max_soft_tokens * k**2`` patches, cuts it into patches
row-major (``pixel_values``: ``[images, max_patches, p * p * 3]``, padded) and gives each patch its (x, y) in
``image_position_ids`` (``(-1, -1)`` for padding). In the prompt an image is ``<|image>``, one ``<|image|>`` per
token, ``<image|>`` (`Gemma4Processor.replace_image_token`); the model fills the ``<|image|>`` tokens, and the two
markers are SPECIAL in the role map.

Vision sites. The encoder runs each image in its own row, its padding masked; ``vision.embed`` (the patch
embedder: pixels and the 2-D position table) and ``vision.layers[i]`` are read as the batch's real patches packed
into one sequence, ``[1, patches, d]``, each image's row-major after the images before it (`site_value` drops the
padding rows, as the pooler does). The pooler averages every ``k x k`` block of an image's patch grid into one token
(row-major over the blocks, the order of the ``<|image|>`` tokens) and scales it; its output, without padding, is
``vision.features`` (``[1, tokens, d]``: the merge comes before the projector), and the projector
(``embed_vision``: a norm and a linear map) gives ``projector``, ``[1, tokens, d_text]``. So every visual token has
``feature_row = 0``, ``feature_col`` its row of the packed projector output, and its block is the ``k x k`` patches
`patch_indices` names.

The language model. Sliding-window layers interleave with global ones, rotated with different bases; where
``use_bidirectional_attention == "vision"`` each image's tokens see each other on *sliding* layers only
(AND(window, OR(causal, image blocks))), while global layers stay causal (`Capability.SLIDING_BLOCKS_ONLY`). Each
decoder layer adds, after its attention and MLP updates, a per-layer-input update (where
``hidden_size_per_layer_input`` is set) and scales its output by ``layer_scalar``; the MLP update is the dense MLP
plus the experts' (``post_feedforward_layernorm`` of their sum), so the ``.mlp`` site and MLP interventions read
and zero that norm's output. The last ``num_kv_shared_layers`` layers reuse the keys and values of the last
earlier layer of their type. The intervention engine runs all of this through the model's own layers
(`embedlens.interventions.engine`), so a modified sequence is routed anew. The site ``llm.layers[i].experts`` gives
the experts each token is routed to, ``[batch, seq, top_k]`` ids, as the layer's router chose them.

Example:
    >>> from embedlens import Sample, load_model
    >>> from embedlens.testing.images import noise
    >>> adapter = load_model("tiny:gemma4")
    >>> batch = adapter.encode([Sample([noise(40, 70)], question="what is it?")])
    >>> adapter.image_grids(batch.inputs)
    [(6, 11)]
"""

from __future__ import annotations

import torch
from transformers import BatchFeature, Gemma4ForConditionalGeneration, PreTrainedModel, ProcessorMixin
from transformers.models.gemma4.modeling_gemma4 import get_block_sequence_ids_for_mask
from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

from embedlens.adapters.base import Adapter, ModulePaths
from embedlens.adapters.capabilities import Capability, packed_block_patches
from embedlens.errors import AdapterError
from embedlens.registry import adapters
from embedlens.sites import Site


class Gemma4ImageProcessor(Gemma4Processor):
    """`Gemma4Processor` for images and text only: the stock one needs an audio feature extractor and a video
    processor (torchvision) to construct.

    Its ``__init__`` is rewritten, not called: the stock one hands those two to `ProcessorMixin`. HF's input
    check reads ``boa_token`` / ``eoa_token`` even without audio (an operator-precedence slip in
    ``validate_inputs``), so they are set, empty; no audio or video token is ever written.
    """

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]

    def __init__(self, image_processor, tokenizer, chat_template=None, image_seq_length: int = 280, **kwargs):
        self.image_seq_length = image_seq_length
        self.image_token_id = tokenizer.image_token_id
        self.image_token, self.boi_token, self.eoi_token = tokenizer.image_token, tokenizer.boi_token, tokenizer.eoi_token
        self.video_token = self.video_token_id = self.audio_token = self.audio_token_id = None
        self.boa_token = self.eoa_token = ""
        ProcessorMixin.__init__(self, image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


@adapters.register("gemma4")
class Gemma4Adapter(Adapter):
    """Gemma 4: native-resolution encoder with a k x k pooler, Gemma 4 LM (per-layer inputs, shared KV, experts).

    See the module docstring for the image span and the sites."""

    architectures = ("Gemma4ForConditionalGeneration",)
    model_class = Gemma4ForConditionalGeneration
    _paths = dict(vision_embed="model.vision_tower.patch_embedder", vision_layers="model.vision_tower.encoder.layers",
                  projector="model.embed_vision", mlp="post_feedforward_layernorm", attn_out="post_attention_layernorm")
    capabilities = frozenset({Capability.PACKED_TOWER, Capability.PRE_PROJECTOR_MERGE, Capability.WINDOWED_BLOCKS,
                              Capability.SLIDING_BLOCKS_ONLY})

    image_only_processor = Gemma4ImageProcessor
    image_only_keys = ("image_seq_length", "chat_template")

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, source: str | None = None):
        super().__init__(model, processor, source)
        if self.config.get_text_config().use_bidirectional_attention == "all":
            raise AdapterError(f"{self.name}: use_bidirectional_attention='all' (an encoder, not a causal LM) is not supported")

    @property
    def paths(self) -> ModulePaths:
        """The layout; a layer with per-layer inputs adds their update after the MLP's (`ModulePaths.per_layer_out`)."""
        text = self.config.get_text_config()
        return ModulePaths(**self._paths, per_layer_out="post_per_layer_input_norm" if text.hidden_size_per_layer_input else "",
                           router="router" if text.enable_moe_block else "")

    @property
    def pool(self) -> int:
        return int(self.config.vision_config.pooling_kernel_size)

    @property
    def patch_size(self) -> int:
        return int(self.config.vision_config.patch_size)

    @property
    def patch_block(self) -> tuple[int, int]:
        return self.pool, self.pool

    @property
    def n_prefix_tokens(self) -> int:
        return 0

    def grid(self) -> tuple[int, int]:
        """The token grid of the largest square image the processor gives (``max_soft_tokens`` tokens, floored to a
        square); images keep their own (`image_grids`). Sizes synthetic data's labels (``patch_grid: auto``)."""
        side = int(int(self.processor.image_processor.max_soft_tokens) ** 0.5)
        return side, side

    def _patch_grids(self, inputs: BatchFeature) -> torch.Tensor:
        """`[images, 2]` (rows, cols) of each image's patch grid, from its patches' (x, y) positions."""
        if "image_position_ids" not in inputs:
            raise AdapterError(f"{self.name}: the processor gave no image_position_ids; it does not fit this family")
        pos = torch.as_tensor(inputs["image_position_ids"]).long()
        return torch.stack([pos[..., 1].amax(-1) + 1, pos[..., 0].amax(-1) + 1], dim=-1)

    def image_grids(self, inputs: BatchFeature) -> list[tuple[int, int]]:
        k = self.pool
        return [(int(h) // k, int(w) // k) for h, w in self._patch_grids(inputs).tolist()]

    def image_layouts(self, inputs: BatchFeature) -> list[torch.Tensor]:
        out, first = [], 0
        for gh, gw in self.image_grids(inputs):
            t = torch.arange(gh * gw)  # the pooler's blocks, row-major: the order of the <|image|> tokens
            out.append(torch.stack([torch.zeros_like(t), t // gw, t % gw, torch.zeros_like(t), first + t], dim=1))
            first += gh * gw
        return out

    def patch_indices(self, feature_col: torch.Tensor, inputs: BatchFeature | None = None) -> torch.Tensor:
        """`[tokens, k * k]`: the rows of the packed patch sequence (``vision.embed``, ``vision.layers[i]``) that each
        token's block holds: its image's patches are row-major after the real patches of the images before it."""
        if inputs is None:
            raise AdapterError(f"{self.name}: a token's patches depend on the batch's image sizes; pass the batch's inputs")
        return packed_block_patches(feature_col, self._patch_grids(inputs).to(feature_col.device), self.pool)

    def _marker_ids(self) -> set[int]:
        return {int(self.config.boi_token_id), int(self.config.eoi_token_id)}

    def special_token_ids(self) -> set[int]:
        return super().special_token_ids() | self._marker_ids()

    def placeholder_text(self, inputs: BatchFeature, image: int, n_tokens: int) -> str:
        p = self.processor
        return f"{p.boi_token}{p.image_token * n_tokens}{p.eoi_token}"

    def block_ids(self, inputs: BatchFeature) -> torch.Tensor | None:
        """Each image's tokens (and only they: the markers are text) as one block, by the model's own
        `get_block_sequence_ids_for_mask`, where ``use_bidirectional_attention == "vision"``; else None."""
        if self.config.get_text_config().use_bidirectional_attention != "vision":
            return None
        return get_block_sequence_ids_for_mask(inputs["mm_token_type_ids"], device=inputs["input_ids"].device)

    def text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        # Gemma4Model embeds every image, video and audio placeholder id as padding before it scatters features
        # (a generated one included)
        cfg = self.config
        placeholders = torch.tensor([cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id], device=ids.device)
        return torch.where(torch.isin(ids, placeholders), cfg.get_text_config().pad_token_id, ids)

    def tower_kwargs(self, inputs: BatchFeature) -> dict:
        return {"pixel_position_ids": inputs["image_position_ids"]}

    def _real(self, inputs: BatchFeature, device: torch.device) -> torch.Tensor:
        return (torch.as_tensor(inputs["image_position_ids"]) >= 0).all(-1).to(device)

    def tower_images(self, inputs: BatchFeature) -> torch.Tensor:
        n = self._real(inputs, torch.device("cpu")).sum(-1)
        return torch.repeat_interleave(torch.arange(len(n)), n)[None]

    def site_value(self, site: Site, value: torch.Tensor, inputs: BatchFeature) -> torch.Tensor:
        # the encoder's rows are padded images: keep the real patches, packed; the pooled features and the
        # projector's output have no batch dimension
        if site.component in ("vision.embed", "vision.layers") and value.dim() == 3:
            return value[self._real(inputs, value.device)][None]
        if site.component in ("vision.features", "projector") and value.dim() == 2:
            return value[None]
        return value

    def display_pixels(self, inputs: BatchFeature, image: int, feature_row: int) -> torch.Tensor:
        """`[3, H, W]` pixels of image `image` (0..1, as the processor gives them), its patches put back in place."""
        (h, w), p = self._patch_grids(inputs)[image].tolist(), self.patch_size
        patches = inputs["pixel_values"][image, : h * w].reshape(h, w, p, p, 3)
        return patches.permute(4, 0, 2, 1, 3).reshape(3, h * p, w * p)
