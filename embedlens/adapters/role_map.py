"""The role map of an encoded batch (`Adapter.encode`): template, visual, newline, question, answer, ... per token.

Functions of the adapter (its layouts, placeholders and tokenizer), kept apart from the contract in
`embedlens.adapters.base`; `Adapter._build_roles` and `_mark_spans` call them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from embedlens.adapters.capabilities import Capability
from embedlens.data import Sample
from embedlens.errors import AdapterError, InputError
from embedlens.roles import Role, TokenRoles

if TYPE_CHECKING:
    from transformers import BatchFeature


@dataclass
class PromptText:
    """The text a processor receives for one sample, and where its parts are.

    `spans` are character ranges in `text` (before the processor expands image
    placeholders). `suffix` is an answer a family passes separately (PaliGemma).
    """

    text: str
    spans: dict[Role, list[tuple[int, int]]] = field(default_factory=dict)
    suffix: str | None = None


def build_roles(self: Any, inputs: BatchFeature, prompts: list[PromptText], samples: Sequence[Sample]) -> TokenRoles:
    """The batch's role map: each token's role, and for visual tokens their image, tile, patch and feature row.

    `self` is the `embedlens.adapters.base.Adapter` encoding the batch (not imported: it imports this module)."""
    import torch

    ids = inputs["input_ids"]
    attn = inputs["attention_mask"].bool()
    bsz, seq = ids.shape
    kind = torch.full((bsz, seq), int(Role.TEMPLATE), dtype=torch.long)
    kind[~attn] = int(Role.PAD)
    meta = {k: torch.full((bsz, seq), -1, dtype=torch.long) for k in ("image", "tile", "row", "col", "feature_row", "feature_col", "frame")}
    layouts = self.image_layouts(inputs)
    # a video sample (the family declares Capability.VIDEO): one layout, its tokens are video tokens; a batch may
    # mix video and image samples, the layouts in the samples' order
    video = any(s.video is not None for s in samples)
    n_visual = [1 if s.video is not None else len(s.images) for s in samples]
    if len(layouts) != sum(n_visual):
        raise AdapterError(f"{self.name}: layout has {len(layouts)} images and videos, batch has {sum(n_visual)}")
    special_ids = self.special_token_ids() - {self.image_token_id, self.tokenizer.unk_token_id} - ({self.video_token_id} if video else set())
    next_image = 0
    for b, (sample, prompt) in enumerate(zip(samples, prompts)):
        token_id = self.video_token_id if sample.video is not None else self.image_token_id
        pos = ((ids[b] == token_id) & attn[b]).nonzero().flatten()
        mine = layouts[next_image : next_image + n_visual[b]]
        next_image += n_visual[b]
        counts = [len(l) for l in mine]
        if len(pos) != sum(counts):
            raise AdapterError(
                f"sample {sample.id!r}: {len(pos)} image-token positions but the images give "
                f"{sum(counts)} features ({counts})"
            )
        start = 0
        for i, lay in enumerate(mine):
            p = pos[start : start + len(lay)]
            start += len(lay)
            not_patch = lay[:, 1] < 0
            kind[b, p] = torch.where(
                not_patch,
                torch.where(lay[:, 4] < 0, int(Role.IMAGE_NEWLINE), int(Role.IMAGE_CLS)),
                int(Role.VISUAL),
            )
            meta["image"][b, p] = i
            for j, name in enumerate(("tile", "row", "col", "feature_row", "feature_col")):
                meta[name][b, p] = lay[:, j]
            if lay.shape[1] > 5:  # a video's layout: its sixth column is each token's frame (temporal index)
                meta["frame"][b, p] = torch.where(not_patch, -1, lay[:, 5])
        free = attn[b] & (kind[b] == Role.TEMPLATE)
        bos = free & (ids[b] == self.tokenizer.bos_token_id)
        kind[b, bos] = int(Role.BOS)
        kind[b, free & ~bos & torch.isin(ids[b], torch.tensor(sorted(special_ids)))] = int(Role.SPECIAL)
        # the sample's first image (or its video) counted among the batch's images (or videos): a mixed batch's
        # processor inputs hold each kind apart
        first = sum(n for s, n in zip(samples[:b], n_visual) if (s.video is None) == (sample.video is None))
        self._mark_spans(kind[b], ids[b], attn[b], prompt, counts, sample, inputs, b, first)
    return TokenRoles(kind=kind, **meta)

def mark_spans(self: Any, kind, ids, attn, prompt: PromptText, counts, sample, inputs, b, first_image: int = 0) -> None:
    """Mark question/answer tokens by aligning the processor's ids with a tokenization
    (with offsets) of the same text, image placeholders expanded as the processor does."""
    import torch

    video = sample.video is not None
    ph = self.video_placeholder if video else self.image_placeholder
    text, insertions = self.processor_text(prompt.text)
    pieces = text.split(ph)
    if len(pieces) - 1 != len(counts):
        raise AdapterError(f"sample {sample.id!r}: cannot align {len(pieces) - 1} placeholders with {len(counts)} images")
    # Original offset -> expanded offset, piece by piece.
    expanded, anchors = "", []
    orig = 0
    for k, piece in enumerate(pieces):
        anchors.append((orig, len(expanded), len(piece)))
        expanded += piece
        orig += len(piece)
        if k < len(counts):
            expanded += (self.video_placeholder_text(sample.video, inputs, first_image + k, counts[k]) if video
                         else self.placeholder_text(inputs, first_image + k, counts[k]))
            orig += len(ph)
    enc = self.tokenizer(expanded, return_offsets_mapping=True, add_special_tokens=self._adds_special_tokens())
    mine = ids[attn]
    n = len(enc["input_ids"])
    if self.has(Capability.ANSWER_SUFFIX) and "token_type_ids" in inputs:
        types = inputs["token_type_ids"][b][attn]
        mine = mine[types == 0]
    if n != len(mine) or not torch.equal(torch.tensor(enc["input_ids"]), mine.cpu()):
        raise AdapterError(
            f"sample {sample.id!r}: could not align the processor's tokens with the prompt text; "
            "question/answer spans would be wrong"
        )
    positions = attn.nonzero().flatten()[:n]

    def expand(x: int, end: bool = False) -> int:
        # Text inserted exactly at a span's end belongs after the span.
        x += sum(n for at, n in insertions if (at < x if end else at <= x))
        for o, e, ln in anchors:
            if o <= x <= o + ln:
                return e + (x - o)
        return len(expanded)

    for role, spans in prompt.spans.items():
        for s, e in spans:
            s_, e_ = expand(s), expand(e, end=True)
            for t, (ts, te) in enumerate(enc["offset_mapping"]):
                if te > ts and ts >= s_ and te <= e_ and kind[positions[t]] == Role.TEMPLATE:
                    kind[positions[t]] = int(role)
    if self.has(Capability.ANSWER_SUFFIX) and "token_type_ids" in inputs:
        types = inputs["token_type_ids"][b]
        ans = (types == 1) & attn & (kind == Role.TEMPLATE)
        kind[ans] = int(Role.ANSWER)


def video_prompt(adapter: Any, sample: Sample, render: Callable[[Sample], PromptText]) -> PromptText:
    """A video sample's prompt: rendered by `render` (the family's image prompt) as a one-image prompt whose image
    placeholder then becomes the video's; a full `prompt` holds one video placeholder and no image placeholder."""
    iph, vph = adapter.image_placeholder, adapter.video_placeholder
    if sample.prompt is not None:
        if sample.prompt.count(vph) != 1 or iph in sample.prompt:
            raise InputError(f"sample {sample.id!r}: a video prompt holds one video placeholder {vph!r} and no "
                             f"image placeholder {iph!r}: {sample.prompt!r}")
        stand_in = dataclasses.replace(sample, images=[None], video=None, prompt=sample.prompt.replace(vph, iph))
    else:
        stand_in = dataclasses.replace(sample, images=[None], video=None)
    p = render(stand_in)
    at, delta = p.text.index(iph), len(vph) - len(iph)
    text = p.text[:at] + vph + p.text[at + len(iph):]
    spans = {r: [(s + (delta if s > at else 0), e + (delta if e > at else 0)) for s, e in v] for r, v in p.spans.items()}
    return PromptText(text, spans, p.suffix)
