"""The Qwen2-VL / Qwen2.5-VL video path: frames to ``pixel_values_videos`` / ``video_grid_thw`` without
torchvision, video prompts, and what a video token's ``frame`` is.

Qwen's tower embeds a video in *temporal patches of 2 frames* (``temporal_patch_size``): patch row
``(t, y, x)`` holds frames ``2t`` and ``2t + 1`` of the kept frames at patch ``(y, x)``, stacked on the
channel axis, and the 3-D patch embedding (a Conv3d over 2 frames) mixes them. Every visual token therefore
stands for **two frames**: a token's ``frame`` in the role map is its temporal patch index ``t``, and it
covers kept frames ``2t`` and ``2t + 1`` (source frames ``video.indices[2t]`` and ``video.indices[2t + 1]``).
A video with an odd number of frames gets its last frame repeated (as HF's video processor pads), so its
last temporal patch covers that frame twice. Tokens come temporal patch by temporal patch, each a row-major
grid of 2 x 2 patch blocks, as in HF's ``Qwen2VLVideoProcessor``.

HF's video processor needs torchvision; this one runs each frame through the family's (PIL) image processor
(the same resize, rescale and normalisation as for images, so frames of one video share one size) and
regroups the patches into HF's video layout (`frames_to_patches`). Pixel values can differ from the
torchvision processor's where a frame is resized (different interpolation code); frames whose sides are
multiples of ``patch_size * merge_size`` within the pixel bounds are not resized.

A batch may mix image samples and video samples (HF's forward takes ``pixel_values`` and
``pixel_values_videos`` together). The tower then runs twice, as HF runs it: the batch's images as one packed
sequence, then its videos as another. Its sites in such a batch are the two passes' sequences concatenated,
images first (`[1, image patches + video patches, d]`; `projector`: image tokens, then video tokens), so a
video token's ``feature_col`` counts on past the batch's image tokens, and the block and tower rules of
`embedlens.adapters.qwen2_vl` hold unchanged over the concatenation (`vision_passes`). Qwen3-VL's video
prompts carry per-frame timestamps and are not supported here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from transformers import BatchFeature

from embedlens.adapters.role_map import PromptText
from embedlens.data import Sample
from embedlens.errors import InputError
from embedlens.video import Video

#: HF's Qwen2.5-VL processor's rate when a video's own is unknown (a list of frames): seconds per temporal patch
#: = temporal_patch_size / fps.
DEFAULT_FPS = 2.0


def frames_to_patches(image_processor: Any, video: Video) -> tuple[torch.Tensor, list[int]]:
    """A video's ``[grid_t * h * w, C * 2 * p * p]`` patch rows in HF's video layout, and its (t, h, w) grid.

    Each frame is processed as an image (its rows repeat the frame over the temporal axis); the rows of frames
    ``2t`` and ``2t + 1`` are then interleaved on that axis, so row ``(t, block, y, x)`` holds both frames.
    """
    out = image_processor(images=list(video.frames), return_tensors="pt")
    pv, thw = out["pixel_values"], out["image_grid_thw"]
    if not bool((thw == thw[0]).all()):
        raise InputError(f"video {video.source}: frames were resized to different grids {thw.tolist()}")
    _, gh, gw = (int(v) for v in thw[0])
    p, tp = int(image_processor.patch_size), int(image_processor.temporal_patch_size)
    n, c = gh * gw, pv.shape[-1] // (tp * p * p)
    frames = pv.reshape(len(video), n, c, tp, p, p)[:, :, :, 0]  # [T, N, C, p, p]: one copy of each frame
    if pad := -len(video) % tp:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1, -1)])
    grid_t = frames.shape[0] // tp
    rows = frames.reshape(grid_t, tp, n, c, p, p).permute(0, 2, 3, 1, 4, 5).reshape(grid_t * n, c * tp * p * p)
    return rows, [grid_t, gh, gw]


class QwenVideo:
    """The video path of `Qwen2VLAdapter` (mixed in ahead of `Adapter`; see the module)."""

    # set by Qwen2.5-VL, whose M-RoPE spaces temporal patches by seconds
    seconds_per_patch: bool = False

    @property
    def video_token_id(self) -> int:
        return int(self.config.video_token_id)

    @property
    def video_placeholder(self) -> str:
        return getattr(self.processor, "video_token", None) or "<|video_pad|>"

    def prompt(self, sample: Sample) -> PromptText:
        """A video sample's prompt: rendered as a one-image prompt whose image placeholder becomes the video's
        (Qwen frames both as ``<|vision_start|>…<|vision_end|>``); a full `prompt` holds one video placeholder."""
        if sample.video is None:
            return super().prompt(sample)
        iph, vph = self.image_placeholder, self.video_placeholder
        if sample.prompt is not None:
            if sample.prompt.count(vph) != 1 or iph in sample.prompt:
                raise InputError(f"sample {sample.id!r}: a video prompt holds one video placeholder {vph!r} and no "
                                 f"image placeholder {iph!r}: {sample.prompt!r}")
            stand_in = dataclasses.replace(sample, images=[None], video=None, prompt=sample.prompt.replace(vph, iph))
        else:
            stand_in = dataclasses.replace(sample, images=[None], video=None)
        p = super().prompt(stand_in)
        at, delta = p.text.index(iph), len(vph) - len(iph)
        text = p.text[:at] + vph + p.text[at + len(iph):]
        spans = {r: [(s + (delta if s > at else 0), e + (delta if e > at else 0)) for s, e in v] for r, v in p.spans.items()}
        return PromptText(text, spans, p.suffix)

    def video_inputs(self, videos: Sequence[Video]) -> BatchFeature:
        """``pixel_values_videos`` and ``video_grid_thw`` (and Qwen2.5-VL's ``second_per_grid_ts``) of the videos."""
        ip = self.processor.image_processor
        rows, grids = zip(*(frames_to_patches(ip, v) for v in videos))
        data = {"pixel_values_videos": torch.cat(rows), "video_grid_thw": torch.tensor(grids)}
        if self.seconds_per_patch:
            tp = int(ip.temporal_patch_size)
            data["second_per_grid_ts"] = torch.tensor([tp / (v.fps or DEFAULT_FPS) for v in videos])
        return BatchFeature(data)

    def encode(self, samples: Sequence[Sample], padding_side: str = "right"):
        """`Adapter.encode`, with video samples; a batch may mix image samples and video samples (see the module)."""
        from embedlens.adapters.base import Batch

        from embedlens.adapters.capabilities import Capability

        videos = [s.video is not None for s in samples]
        if not any(videos) or not self.has(Capability.VIDEO):  # Adapter.encode refuses video without the capability
            return super().encode(samples, padding_side)
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
        for s in samples:
            if s.video is None and not s.images:
                raise InputError(f"sample {s.id!r} has no image")
        prompts = [self.prompt(s) for s in samples]
        vin = self.video_inputs([s.video for s in samples if s.video is not None])
        n_tokens = iter((vin["video_grid_thw"].prod(-1) // self.merge_size**2).tolist())
        ph = self.video_placeholder
        texts = [p.text.replace(ph, ph * next(n_tokens), 1) if v else p.text for p, v in zip(prompts, videos)]
        if not all(videos):
            # images too: the image processor on every image of the batch, and each image placeholder expanded to its
            # image's tokens, as the processor does (which refuses video tokens without its torchvision processor)
            vin.update(self.processor.image_processor(images=[im for s in samples for im in s.images], return_tensors="pt"))
            per_image = iter((vin["image_grid_thw"].prod(-1) // self.merge_size**2).tolist())
            iph = self.image_placeholder
            texts = [t if v else "".join(piece + (iph * next(per_image) if k < t.count(iph) else "")
                                         for k, piece in enumerate(t.split(iph)))
                     for t, v in zip(texts, videos)]
        tok = self.tokenizer
        old_side = tok.padding_side
        tok.padding_side = padding_side
        try:
            # the tokenizer, as the processor runs it on the text, and the processor's own modality types (image: 1,
            # video: 2)
            inputs = BatchFeature(dict(tok(texts, return_tensors="pt", padding=True, padding_side=padding_side)))
        finally:
            tok.padding_side = old_side
        inputs["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids(inputs["input_ids"]))
        inputs.update(vin)
        roles = self._build_roles(inputs, prompts, samples)
        return Batch(inputs=inputs, roles=roles, samples=list(samples))
