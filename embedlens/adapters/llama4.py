"""Llama 4 (`Llama4ForConditionalGeneration`): tiled images, a ViT whose class token comes last, pixel shuffle in the
vision adapter, a Llama 4 LM (chunked attention, NoPE layers, mixture-of-experts feed-forwards).

Images. The image processor (`embedlens.adapters.llama4_tiles`: HF's rule on PIL) fits each image to a grid of at
most ``max_patches`` square tiles of the tower's ``image_size``; with more than one tile, the whole image resized to
one tile (the global tile) follows them. ``pixel_values`` is ``[tiles, 3, s, s]`` over the batch. In the prompt an
image is (`Llama4Processor._prompt_split_image`) ``<|image_start|>``, then per row of tiles each tile's
``<|patch|>`` tokens, ``<|tile_x_separator|>`` between the tiles of a row and ``<|tile_y_separator|>`` after it,
then ``<|image|>`` and the global tile's tokens, then ``<|image_end|>`` (a single tile: ``<|image_start|><|image|>``,
its tokens, ``<|image_end|>``). The model fills the ``<|patch|>`` tokens (``config.image_token_id``) with the
projector's rows in order; the markers are SPECIAL in the role map. Each image's grid of tiles is read back from
those markers in ``input_ids`` (the processor drops its ``aspect_ratios``). Role map: tile 0 is the global tile
(or the only one), tiles 1.. the crops row-major (as InternVL's and Idefics3's); ``feature_row`` is the tile's row
of ``pixel_values``.

Vision sites. The tower embeds each tile's patches (row-major), appends the class token *last*, adds positions and
runs its layers on ``[tiles, patches + 1, d]``; the model drops the class row after them. ``vision.embed`` (the
pre-layer norm's output) and ``vision.layers[i]`` are read without that last row (`site_value`), so their rows are
the tile's patches, row-major (``n_prefix_tokens`` is 0). The vision adapter (``Llama4VisionPixelShuffleMLP``)
folds every 2 x 2 block of patches into one token (pixel shuffle with ratio 0.5) and runs its MLP: its output, the
projector's input, is ``vision.features`` (``[tiles, tokens, d]``: the merge comes before the projector), and
``projector`` (one linear map) gives each tile's tokens, row-major over the blocks.

The language model: on ``chunked_attention`` layers a token sees the tokens of its own chunk of
``attention_chunk_size`` only; NoPE layers (``no_rope_layers``) attend over the whole prompt without rotary
embeddings, and scale their queries by sequence index (``attn_temperature_tuning``, from ``floor_scale`` tokens: HF's
left-padded batch counts the padding in that index, the engine each sample's own tokens, as HF's run of the sample
alone; the two agree wherever prompts are shorter than ``floor_scale``, 8192 in the released models);
the MoE layers' ``feed_forward`` (a routed expert plus a shared one) returns its update flattened to
``[batch * seq, d]`` with the router's logits: the ``.mlp`` site is read as ``[batch, seq, d]``. The site
``llm.layers[i].experts`` of an MoE layer (``moe_layers``; a dense layer refuses it) gives each token's routed
experts, ``[batch, seq, top_k]`` ids: the top-k of its router's logits, as the router picks them. The intervention
engine runs the model's own layers (`embedlens.interventions.engine`), so a modified sequence is routed anew.

Example:
    >>> from embedlens import Sample, load_model
    >>> from embedlens.testing.images import noise
    >>> adapter = load_model("tiny:llama4")
    >>> batch = adapter.encode([Sample([noise(40, 70)], question="what is it?")])
    >>> adapter.tile_grids(batch.inputs).tolist(), batch.inputs["pixel_values"].shape[0]  # 2 x 2 tiles + the global
    ([[2, 2]], 5)
"""

from __future__ import annotations

import torch
from transformers import BatchFeature, Llama4ForConditionalGeneration
from transformers.models.llama4.processing_llama4 import Llama4Processor

from embedlens.adapters.base import Adapter, Batch, ModulePaths
from embedlens.adapters.capabilities import Capability
from embedlens.adapters.llama4_tiles import Llama4ImageProcessorPil
from embedlens.errors import AdapterError
from embedlens.registry import adapters
from embedlens.sites import Site

#: `Llama4Processor`'s constructor arguments a saved processor_config.json may hold
_PROCESSOR_KEYS = ("patch_size", "pixel_shuffle_ratio", "fake_image_token", "image_token", "start_of_image_token",
                   "end_of_image_token", "patch_token", "tile_x_separator_token", "tile_y_separator_token", "chat_template")


@adapters.register("llama4")
class Llama4Adapter(Adapter):
    """Llama 4: tiles + a global tile, class token last, pixel shuffle before the projector, chunked / NoPE / MoE LM.

    See the module docstring for the image span and the sites."""

    architectures = ("Llama4ForConditionalGeneration",)
    model_class = Llama4ForConditionalGeneration
    paths = ModulePaths(vision_embed="vision_model.layernorm_pre", vision_layers="vision_model.model.layers",
                        projector="multi_modal_projector", language_model="language_model.model",
                        llm_layers="language_model.model.layers", llm_norm="language_model.model.norm",
                        unembed="language_model.lm_head", mlp="feed_forward", router="feed_forward.router")
    router_output = 1  # Llama4Router returns (scores, logits): the site takes the top-k of the logits, as the router does
    capabilities = frozenset({Capability.PRE_PROJECTOR_MERGE})
    image_only_processor = Llama4Processor  # where the stock processor cannot be built (HF's image processor needs torchvision)
    image_only_keys = _PROCESSOR_KEYS
    image_processor_port = Llama4ImageProcessorPil

    @property
    def shuffle(self) -> int:
        """Patches a side of one token's block: 1 / ``pixel_shuffle_ratio`` (2)."""
        return int(round(1 / float(self.config.vision_config.pixel_shuffle_ratio)))

    @property
    def patch_block(self) -> tuple[int, int]:
        return self.shuffle, self.shuffle

    @property
    def n_prefix_tokens(self) -> int:
        return 0  # the class token comes after the patches, and the vision sites leave it out

    @property
    def n_cls_tokens(self) -> int:
        return 0  # none before the patches (the one after them is not in the vision sites)

    def _token_ids(self, *names: str) -> torch.Tensor:
        ids = []
        for name in names:
            token = getattr(self.processor, name)
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == self.tokenizer.unk_token_id:
                raise AdapterError(f"{self.name}: the tokenizer has no {token!r} token; it does not fit this family's processor")
            ids.append(int(tid))
        return torch.tensor(ids)

    def tile_grids(self, inputs: BatchFeature) -> torch.Tensor:
        """`[images, 2]`: (rows, cols) of crop tiles of each image of the batch, in order, read from its markers in
        ``input_ids`` (``<|tile_y_separator|>`` ends each row, ``<|tile_x_separator|>`` parts the tiles of a row;
        an image of one tile has neither)."""
        ids = inputs["input_ids"][inputs["attention_mask"].bool()]  # every sample's tokens, in batch order
        start, x_sep, y_sep = (ids == t for t in self._token_ids("start_of_img_token", "tile_token", "tile_global_token"))
        image = start.long().cumsum(0) - 1  # the image each token follows
        n = int(start.sum())
        if n and int(image.min()) < 0 and bool((x_sep | y_sep)[image < 0].any()):
            raise AdapterError(f"{self.name}: a tile separator before any {self.processor.start_of_img_token!r}")
        count = lambda m: torch.zeros(n, dtype=torch.long).scatter_add_(0, image[m], torch.ones_like(image[m]))  # noqa: E731
        rows, xs = count(y_sep).clamp(min=1), count(x_sep)
        return torch.stack([rows, xs // rows + 1], dim=1)

    def image_layouts(self, inputs: BatchFeature) -> list[torch.Tensor]:
        gh, gw = self.grid()
        t = torch.arange(gh * gw)  # the pixel shuffle's blocks, row-major: the order of a tile's <|patch|> tokens
        out, first = [], 0
        for rows, cols in self.tile_grids(inputs).tolist():
            n = rows * cols
            tiles = list(range(1, n + 1)) + [0] if n > 1 else [0]  # crops row-major, then the global tile (tile 0)
            out.append(torch.cat([torch.stack([torch.full_like(t, tile), t // gw, t % gw, torch.full_like(t, first + k), t], 1)
                                  for k, tile in enumerate(tiles)]))
            first += len(tiles)
        return out

    def special_token_ids(self) -> set[int]:
        # the image's markers: structure the model does not fill, not text
        names = ("start_of_img_token", "end_of_img_token", "image_token", "tile_token", "tile_global_token")
        return super().special_token_ids() | set(self._token_ids(*names).tolist())

    def placeholder_text(self, inputs: BatchFeature, image: int, n_tokens: int) -> str:
        # As Llama4Processor._prompt_split_image
        rows, cols = self.tile_grids(inputs)[image].tolist()
        gh, gw = self.grid()
        n = rows * cols
        if n_tokens != (n + (n > 1)) * gh * gw:
            raise AdapterError(f"{self.name}: image {image} has {n_tokens} image tokens; its {rows} x {cols} tiles give "
                               f"{(n + (n > 1)) * gh * gw}")
        p = self.processor
        tile = p.img_patch_token * (gh * gw)
        crops = (p.tile_token.join([tile] * cols) + p.tile_global_token) * rows if n > 1 else ""
        return f"{p.start_of_img_token}{crops}{p.image_token}{tile}{p.end_of_img_token}"

    def model_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """As `Adapter.model_inputs`, ``pixel_values`` in the tower's dtype: the model does not cast them (its
        values are bfloat16's, so a bfloat16 tower loses nothing)."""
        inputs = super().model_inputs(batch)
        if isinstance(inputs.get("pixel_values"), torch.Tensor):
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.vision_model.patch_embedding.linear.weight.dtype)
        return inputs

    def site_value(self, site: Site, value: torch.Tensor, inputs: BatchFeature) -> torch.Tensor:
        # the tower's rows end with the class token, which the model drops: the vision sites are the patches; the
        # pre-layer norm sees [tiles, 1, patches + 1, d]; an MoE feed-forward's update comes flattened
        if site.component in ("vision.embed", "vision.layers"):
            return value.reshape(value.shape[0], -1, value.shape[-1])[:, :-1]
        if site.sub == "mlp" and value.dim() == 2:
            return value.reshape(*inputs["input_ids"].shape, -1)
        if site.sub == "experts":  # the router's logits, `[batch, seq, experts]`: its top-k are the experts it picks
            return value.topk(int(self.config.get_text_config().num_experts_per_tok), dim=-1).indices
        return value
