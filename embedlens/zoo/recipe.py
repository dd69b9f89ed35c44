"""What a zoo model is made of: the recipe (sizes, data, stages), the model and processor, and the training corpus.

Everything here is deterministic given the recipe: the corpus is rendered
from seeded synthetic specs, the models are built from real Hugging Face
configs (`LlavaForConditionalGeneration` with a `CLIPVisionModel` or
`SiglipVisionModel` tower and a Llama LM) and initialised under the seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from embedlens.errors import InputError
from embedlens.synthetic import SyntheticSpec, all_questions, every_question, patch_truth, position_names, render

VARIANTS = ("clip", "siglip")
FILLER = "background"  # the word a background patch reads as in the grid text


@dataclass
class Recipe:
    """Sizes, data and schedule of one zoo model. The defaults are what the shipped checkpoints used.

    Stages (LLaVA's recipe, preceded by the tower's own pretraining):
      0. vision tower + a small text tower, contrastive on image/caption pairs
         (softmax for CLIP, sigmoid for SigLIP);
      1. the LM alone on the data set's text, each image given as *grid
         tokens*: per patch half of each content word's embedding (see
         `patch_words`) plus the cell's position words at
         `grid_position_weight` (`filler_position_weight` on background,
         0: a background patch is exactly the filler word), so the LM learns
         to read a patch that means "red circle, top left" before any pixels
         are involved;
      2. the projector alone (tower and LM frozen) on captioning, plus
         `align_weight` x the distance of each projected token from its
         patch's grid token (`train.alignment`): LLaVA's "feature alignment"
         stage with the alignment made explicit;
      3. projector + LM (+ the tower at `vision_lr`), answers as targets, the
         alignment kept at `finetune_align_weight`.
    Stages 1 and 3 train on conversations: an image's questions and caption as
    chat turns, at most `turns` per conversation (`train.make_conversations`).
    """

    variant: str = "clip"
    seed: int = 0
    threads: int = 1
    # data
    image_size: int = 96
    patch_size: int = 16
    grid: int = 3
    backgrounds: tuple[float, ...] = (0.4, 0.55, 0.7, 0.85)
    train_images: int = 10000
    heldout_images: int = 300
    word_rate: float = 0.3
    grid_position_weight: float = 1.0  # weight of the cell's position words in a patch's grid token (stage 1)
    filler_position_weight: float = 0.0  # the same for background patches: 0 makes every one exactly emb(background)
    turns: int = 6  # questions per training conversation (an image's questions and caption, split into conversations)
    # model
    vision_hidden: int = 96
    vision_layers: int = 4
    vision_heads: int = 4
    text_tower_hidden: int = 64
    text_tower_layers: int = 2
    lm_hidden: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    lm_kv_heads: int = 2
    # schedule: steps, batch size, learning rate per stage
    contrastive_steps: int = 600
    contrastive_batch: int = 128
    contrastive_lr: float = 1e-3
    lm_steps: int = 5000
    lm_batch: int = 16
    lm_lr: float = 1e-3
    projector_steps: int = 300
    projector_batch: int = 32
    projector_lr: float = 2e-3
    align_weight: float = 1.0  # stage 2: weight of the per-patch alignment of projected tokens onto their grid tokens
    finetune_steps: int = 2400
    finetune_batch: int = 16
    finetune_lr: float = 1e-3
    vision_lr: float = 2e-4
    finetune_align_weight: float = 1.0  # stage 3: the same alignment term, kept beside the answers' loss
    weight_decay: float = 0.01
    warmup: float = 0.05

    def check(self) -> None:
        if self.variant not in VARIANTS:
            raise InputError(f"recipe.variant: expected one of {list(VARIANTS)}; got {self.variant!r}")
        if self.image_size % self.patch_size:
            raise InputError(f"recipe.patch_size: {self.patch_size} does not divide image_size {self.image_size}")
        if self.vision_lr > 3e-4:
            raise InputError(f"recipe.vision_lr: above 3e-4 the tower's fine-tuning stalls QA at chance; got {self.vision_lr}")
        for key in ("grid_position_weight", "filler_position_weight", "align_weight", "finetune_align_weight"):
            if getattr(self, key) < 0:
                raise InputError(f"recipe.{key}: must be >= 0; got {getattr(self, key)}")
        if self.turns < 1:
            raise InputError(f"recipe.turns: must be >= 1; got {self.turns}")
        if self.threads < 1:
            raise InputError(f"recipe.threads: must be >= 1; got {self.threads}")

    def with_override(self, kv: str) -> "Recipe":
        """A copy with one ``KEY=VALUE`` applied (tuples as comma-separated lists); InputError names a bad key or value."""
        import dataclasses

        if "=" not in kv:
            raise InputError(f"recipe override {kv!r}: expected KEY=VALUE")
        key, value = kv.split("=", 1)
        if key not in self.__dataclass_fields__:
            raise InputError(f"recipe override {kv!r}: unknown key {key!r}; known: {sorted(self.__dataclass_fields__)}")
        cur = getattr(self, key)
        try:
            new = tuple(float(x) for x in value.split(",")) if isinstance(cur, tuple) else type(cur)(value)
        except ValueError:
            raise InputError(f"recipe override {kv!r}: {value!r} is not a {type(cur).__name__}") from None
        return dataclasses.replace(self, **{key: new})

    @property
    def patch_grid(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["backgrounds"] = list(self.backgrounds)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        d = dict(d)
        if "backgrounds" in d:
            d["backgrounds"] = tuple(d["backgrounds"])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError(f"recipe: unknown keys {sorted(unknown)}")
        return cls(**d)

    def specs(self, split: str) -> list[SyntheticSpec]:
        """The synthetic specs of a split ("train" or "heldout"): one per background level, disjoint seeds."""
        n = self.train_images if split == "train" else self.heldout_images
        base = {"train": 1000, "heldout": 2000}[split]
        per = [n // len(self.backgrounds) + (i < n % len(self.backgrounds)) for i in range(len(self.backgrounds))]
        return [
            SyntheticSpec(n=k, seed=self.seed * 10_000 + base + i, size=self.image_size, grid=self.grid, background=b,
                          word_rate=self.word_rate, patch_grid=self.patch_grid)
            for i, (k, b) in enumerate(zip(per, self.backgrounds))
        ]


# -- model and processor ----------------------------------------------------------


def _vision_kwargs(r: Recipe) -> dict[str, Any]:
    return dict(
        hidden_size=r.vision_hidden, intermediate_size=2 * r.vision_hidden, num_hidden_layers=r.vision_layers,
        num_attention_heads=r.vision_heads, image_size=r.image_size, patch_size=r.patch_size,
    )


def build_llava(r: Recipe):
    """(model, processor) of a fresh zoo LLaVA, initialised under `r.seed`."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              SiglipVisionConfig)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from embedlens.tokenizer import build_tokenizer

    tok = build_tokenizer()
    norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    S = r.image_size
    if r.variant == "clip":
        vision = CLIPVisionConfig(**_vision_kwargs(r))
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S}, **norm)
        strategy, extra = "default", 1
    else:
        vision = SiglipVisionConfig(**_vision_kwargs(r))
        image_processor = SiglipImageProcessorPil(size={"height": S, "width": S}, **norm)
        strategy, extra = "full", 0
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=r.lm_hidden, intermediate_size=2 * r.lm_hidden, num_hidden_layers=r.lm_layers,
        num_attention_heads=r.lm_heads, num_key_value_heads=r.lm_kv_heads, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.image_token_id, vision_feature_layer=-2,
        vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
    )
    torch.manual_seed(r.seed)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=r.patch_size, vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra, chat_template=tok.chat_template,
    )
    return model, processor


def build_contrastive(r: Recipe, vocab_size: int, special: dict[str, int]):
    """A CLIPModel or SiglipModel whose vision half has the LLaVA tower's config, for stage 0."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, SiglipConfig, SiglipModel, SiglipTextConfig
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    text = dict(vocab_size=vocab_size, hidden_size=r.text_tower_hidden, intermediate_size=2 * r.text_tower_hidden,
                num_hidden_layers=r.text_tower_layers, num_attention_heads=4, max_position_embeddings=TEXT_LEN, **special)
    torch.manual_seed(r.seed + 1)
    if r.variant == "clip":
        cfg = CLIPConfig(text_config=CLIPTextConfig(**text).to_dict(), vision_config=CLIPVisionConfig(**_vision_kwargs(r)).to_dict(),
                         projection_dim=64)
        return CLIPModel(cfg)
    cfg = SiglipConfig(text_config=SiglipTextConfig(**text, projection_size=r.vision_hidden).to_dict(),
                       vision_config=SiglipVisionConfig(**_vision_kwargs(r)).to_dict())
    model = SiglipModel(cfg)
    with torch.no_grad():  # HF's default (random ~0) does not train; SigLIP's paper: t = log 10, b = -log(batch)
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-math.log(r.contrastive_batch))
    return model


TEXT_LEN = 48  # contrastive text length (captions padded to it)


# -- corpus -----------------------------------------------------------------------


def caption(objects: list[dict[str, Any]], word: str | None) -> str:
    """The scene as text: objects in reading order, then the word ("red circle top left , blue square centre , word cat")."""
    parts = [f"{o['colour']} {o['shape']} {o['position']}" for o in sorted(objects, key=lambda o: (o["row"], o["col"]))]
    if word is not None:
        parts.append(f"word {word}")
    return " , ".join(parts) if parts else "nothing"


@dataclass
class Corpus:
    """A rendered split: pixels, per-patch grid words, captions, QA pairs and the ground truth."""

    pixel_values: torch.Tensor  # [N, 3, H, W] uint8 RGB (the processor's input at the model's size)
    grid_ids: torch.Tensor  # [N, P, K] vocabulary ids of each patch's grid token (content words, then position words)
    grid_weights: torch.Tensor  # [N, P, K] their weights: the grid token is the weighted sum of their embeddings
    captions: list[str]
    qa: list[tuple[int, str, str, str]]  # (image index, question, answer, qtype): one of each type (`all_questions`)
    every_qa: list[list[tuple[str, str, str]]]  # per image, every unambiguous (question, answer, qtype) (`every_question`)
    candidates: list[list[str]] = field(default_factory=list)  # the candidate answers of each qa item
    truth: list[dict[str, Any]] = field(default_factory=list)  # patch_truth per image
    images: list[Any] = field(default_factory=list)

    def pixels(self, idx) -> torch.Tensor:
        """Pixel values of images `idx` as the processor makes them (rescale to [0, 1], normalise by 0.5 / 0.5)."""
        return (self.pixel_values[idx].float() / 255.0 - 0.5) / 0.5


def patch_words(truth: dict[str, list[list[Any]]], r: int, c: int, word: str | None) -> tuple[str, str]:
    """The two content words a patch reads as in the grid tokens: (colour, shape) on an object, the written word
    (twice) on text, the filler (twice) on background."""
    kind = truth["kind"][r][c]
    if kind == "object":
        return truth["colour"][r][c], truth["shape"][r][c]
    if kind == "text" and word is not None:
        return word, word
    return FILLER, FILLER


def cell_words(recipe: Recipe) -> list[list[str]]:
    """Per patch (row-major), the words of the position name of the layout cell its centre lies in."""
    P, G = recipe.patch_grid, recipe.grid
    names = position_names(G)
    out = []
    for r in range(P):
        for c in range(P):
            name = names[int((r + 0.5) * G / P)][int((c + 0.5) * G / P)]
            out.append(name.split())
    return out


def build_corpus(r: Recipe, split: str, processor, keep_images: bool = False) -> Corpus:
    """Render a split: every image with its caption and every question type it can answer."""
    tok = processor.tokenizer
    ip = processor.image_processor
    pixels, grid_ids, grid_w, caps, qa, every, cands, truths, images = [], [], [], [], [], [], [], [], []
    P = r.patch_grid
    pos_words = cell_words(r)
    K = 2 + max(len(w) for w in pos_words)
    pos_ids = [tok.convert_tokens_to_ids(w) for w in pos_words]
    for spec in r.specs(split):
        for i in range(spec.n):
            scene = render(spec, i)
            truth = patch_truth(scene, P)
            ids, ws = [], []
            for k in range(P * P):
                words = patch_words(truth, k // P, k % P, scene.word)
                content = tok.convert_tokens_to_ids(list(words))
                pad = K - 2 - len(pos_ids[k])
                pw = r.filler_position_weight if words == (FILLER, FILLER) else r.grid_position_weight
                ids.append(content + pos_ids[k] + [tok.pad_token_id] * pad)
                ws.append([0.5, 0.5] + [pw / len(pos_ids[k])] * len(pos_ids[k]) + [0.0] * pad)
            if tok.unk_token_id in {t for row in ids for t in row}:
                raise InputError(f"grid words of image {i} are not all in the tokenizer's vocabulary")
            idx = len(caps)
            grid_ids.append(ids)
            grid_w.append(ws)
            caps.append(caption(scene.objects, scene.word))
            for qtype, q, a, c in all_questions(spec, i, scene):
                qa.append((idx, q, a, qtype))
                cands.append(c)
            every.append([(q, a, qtype) for qtype, q, a, _ in every_question(scene, r.grid)])
            arr = torch.from_numpy(np.array(scene.image.convert("RGB"))).permute(2, 0, 1).contiguous()
            if not pixels:  # the stored pixels normalise exactly as the saved processor does
                ref = ip(scene.image, return_tensors="pt")["pixel_values"][0]
                if not torch.allclose((arr.float() / 255.0 - 0.5) / 0.5, ref, atol=1e-5):
                    raise RuntimeError("the training pixels differ from the processor's; check the image processor settings")
            pixels.append(arr)
            truths.append(truth)
            if keep_images:
                images.append(scene.image)
    return Corpus(torch.stack(pixels), torch.tensor(grid_ids), torch.tensor(grid_w), caps, qa, every, cands, truths, images)


__all__ = ["Recipe", "VARIANTS", "Corpus", "build_llava", "build_contrastive", "build_corpus", "caption"]
