"""Idefics3 and SmolVLM: SigLIP-style tower, pixel shuffle, sub-image splitting with row/col marker tokens.

An image is resized, cut into a grid of square sub-images and followed by a
global (downscaled whole) image; each sub-image goes through the tower on
its own. The connector's pixel shuffle folds every `scale_factor` x
`scale_factor` block of patches into one token, so a visual token stands for
a block of patches (`patch_block`). In the prompt each sub-image is
``<fake_token_around_image><row_i_col_j>`` + its image tokens, a newline ends
each row of sub-images, and the global image comes last, tagged
``<global-img>``.

Role map: tile 0 is the global image, tile ``1 + i * cols + j`` the
sub-image at grid cell (i, j); row/col are the token's cell in its tile's
token grid; feature_row is the tile's row in the vision batch (padding
sub-images dropped, as the model drops them).
"""

from __future__ import annotations

import torch
from transformers import (
    BatchFeature,
    Idefics3ForConditionalGeneration,
    ProcessorMixin,
    SmolVLMForConditionalGeneration,
    SmolVLMProcessor,
)

from embedlens.adapters.base import Adapter, ModulePaths
from embedlens.errors import AdapterError
from embedlens.registry import adapters

GLOBAL_TAG = "<global-img>"
FAKE_TOKEN = "<fake_token_around_image>"


def row_col_tag(i: int, j: int) -> str:
    """The marker token of the sub-image at grid cell (i, j), counted from 0."""
    return f"<row_{i + 1}_col_{j + 1}>"


class SmolVLMImageProcessor(SmolVLMProcessor):
    """`SmolVLMProcessor` without its video processor.

    The stock processor will not construct without torchvision (its video
    processor needs it); images alone need only the PIL image processor.
    """

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]

    def __init__(self, image_processor, tokenizer, image_seq_len: int = 169, chat_template: str | None = None):
        super().__init__(image_processor, tokenizer, video_processor=None, image_seq_len=image_seq_len, chat_template=chat_template)

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        # Images only: the stock method first reads the video processor's frame defaults.
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


@adapters.register("idefics3")
class Idefics3Adapter(Adapter):
    """Idefics3: SigLIP-style tower (NaViT embeddings), pixel-shuffle connector, Llama LLM; sub-images + a global image."""

    architectures = ("Idefics3ForConditionalGeneration",)
    model_class = Idefics3ForConditionalGeneration
    paths = ModulePaths(
        vision_embed="model.vision_model.embeddings",
        vision_layers="model.vision_model.encoder.layers",
        projector="model.connector",
        language_model="model.text_model",
        llm_layers="model.text_model.layers",
        llm_norm="model.text_model.norm",
    )

    @property
    def patch_block(self) -> tuple[int, int]:
        s = int(self.config.scale_factor)
        return s, s

    @property
    def image_seq_len(self) -> int:
        """Image tokens per sub-image."""
        rows, cols = self.grid()
        return rows * cols

    def _token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise AdapterError(f"{self.name}: the tokenizer has no {token!r} token; it does not fit this family's processor")
        return int(tid)

    def _tag_ids(self) -> dict[int, tuple[int, int]]:
        """Marker-token id -> the sub-image grid cell it tags, for the tags the tokenizer has."""
        tags = {}
        for i in range(6):  # the processor's marker vocabulary: <row_1_col_1> .. <row_6_col_6>
            for j in range(6):
                tid = self.tokenizer.convert_tokens_to_ids(row_col_tag(i, j))
                if tid is not None and tid != self.tokenizer.unk_token_id:
                    tags[int(tid)] = (i, j)
        return tags

    def special_token_ids(self) -> set[int]:
        # The processor re-registers its special tokens and leaves the sub-image tags as plain
        # added tokens; they are image structure, not text.
        return super().special_token_ids() | set(self._tag_ids()) | {self._token_id(GLOBAL_TAG), self._token_id(FAKE_TOKEN)}

    def image_splits(self, inputs: BatchFeature) -> list[tuple[int, int]]:
        """(rows, cols) of the sub-image grid of each image of the batch, read off the
        marker tokens the processor wrote ((0, 0): the image was not split)."""
        flat = inputs["input_ids"].flatten()  # sample-major, so images stay in batch order
        tags = self._tag_ids()
        tag_ids = torch.tensor(sorted(tags), dtype=flat.dtype)
        cells = torch.tensor([tags[t] for t in sorted(tags)], dtype=torch.long).reshape(-1, 2)
        # each image ends with its global image's tag; the tags before it, after the previous one, are its sub-images
        is_global = flat == self._token_id(GLOBAL_TAG)
        image_of = torch.cumsum(is_global.long(), 0) - is_global.long()
        hit = torch.isin(flat, tag_ids)
        cell = cells[torch.searchsorted(tag_ids, flat[hit])] + 1  # [tags seen, 2]: (row + 1, col + 1)
        grid = torch.zeros(int(is_global.sum()), 2, dtype=torch.long)
        grid = grid.scatter_reduce(0, image_of[hit][:, None].expand(-1, 2), cell, reduce="amax")
        return [(int(r), int(c)) for r, c in grid.tolist()]

    def image_layouts(self, inputs: BatchFeature) -> list[torch.Tensor]:
        gh, gw = self.grid()
        r, c = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        r, c = r.flatten(), c.flatten()
        out, first_row = [], 0
        for rows, cols in self.image_splits(inputs):
            # sub-images in the processor's order (row-major grid, then the global image)
            tiles = [1 + i * cols + j for i in range(rows) for j in range(cols)] + [0]
            parts = []
            for k, tile in enumerate(tiles):
                parts.append(torch.stack([torch.full_like(r, tile), r, c, torch.full_like(r, first_row + k), r * gw + c], dim=1))
            out.append(torch.cat(parts))
            first_row += len(tiles)
        return out

    def placeholder_text(self, inputs: BatchFeature, image: int, n_tokens: int) -> str:
        # As the processor's replacement text (Idefics3Processor.replace_image_token).
        rows, cols = self.image_splits(inputs)[image]
        ph, seq = self.image_placeholder, self.image_seq_len
        if n_tokens != (rows * cols + 1) * seq:
            raise AdapterError(f"{self.name}: image {image} has {n_tokens} image tokens; a {rows}x{cols} split gives {(rows * cols + 1) * seq}")
        text = ""
        for i in range(rows):
            text += "".join(FAKE_TOKEN + row_col_tag(i, j) + ph * seq for j in range(cols)) + "\n"
        prefix = "\n" if rows else ""
        return text + prefix + FAKE_TOKEN + GLOBAL_TAG + ph * seq + FAKE_TOKEN


@adapters.register("smolvlm")
class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM: Idefics3's architecture (SigLIP tower, pixel shuffle, sub-images + global image) with SmolLM2."""

    architectures = ("SmolVLMForConditionalGeneration",)
    model_class = SmolVLMForConditionalGeneration

    image_only_processor = SmolVLMImageProcessor
    image_only_keys = ("image_seq_len", "chat_template")
