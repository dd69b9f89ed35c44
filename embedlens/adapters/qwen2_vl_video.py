"""The Qwen2-VL / Qwen2.5-VL / Qwen3-VL video path: frames to ``pixel_values_videos`` / ``video_grid_thw`` without
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

A batch may mix image samples and video samples, in every Qwen family here (HF's forward takes
``pixel_values`` and ``pixel_values_videos`` together). The tower then runs twice, as HF runs it: the batch's images as one packed
sequence, then its videos as another. Its sites in such a batch are the two passes' sequences concatenated,
images first (`[1, image patches + video patches, d]`; `projector`: image tokens, then video tokens), so a
video token's ``feature_col`` counts on past the batch's image tokens, and the block and tower rules of
`embedlens.adapters.qwen2_vl` hold unchanged over the concatenation (`vision_passes`).

Qwen3-VL (and Qwen3-VL-MoE and Qwen3.5, which share its processor and positions; `Qwen3Video`) writes each
temporal patch into the prompt apart: ``<{t:.1f} seconds><|vision_start|>`` + its ``(h / 2) * (w / 2)`` video
tokens + ``<|vision_end|>``, the template's own ``<|vision_start|>``/``<|vision_end|>`` around the video dropped,
as HF's ``Qwen3VLProcessor`` does. ``t`` is the patch's time in seconds (`frame_timestamps`): the mean of its two
frames' source index over the file's own rate, or over 24 fps (HF's default) for a list of frames, whose
indices are their places in the list. The timestamps are text (template tokens, ``frame`` -1); the model's
``get_rope_index`` gives each temporal patch its own ``t = 1`` grid, so the text between patches counts on and a
patch's tokens get (start, start + row, start + col). The frames are the ones embedlens keeps (`VideoOptions`),
taken as HF's processor takes pre-sampled frames (``do_sample_frames=False``), and sized as HF's Qwen3-VL video
processor sizes a clip (`Qwen3Video.video_size`: ``frames * h * w`` within its ``size``) when the checkpoint gives
its settings, else by the image processor per frame.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image
from transformers import BatchFeature

from embedlens.adapters.role_map import PromptText, video_prompt
from embedlens.data import Sample
from embedlens.errors import InputError
from embedlens.video import Video

#: HF's Qwen2.5-VL processor's rate when a video's own is unknown (a list of frames): seconds per temporal patch
#: = temporal_patch_size / fps.
DEFAULT_FPS = 2.0


def frames_to_patches(image_processor: Any, video: Video, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """A video's ``[grid_t * h * w, C * 2 * p * p]`` patch rows in HF's video layout, and its (t, h, w) grid.

    Each frame is processed as an image (its rows repeat the frame over the temporal axis); the rows of frames
    ``2t`` and ``2t + 1`` are then interleaved on that axis, so row ``(t, block, y, x)`` holds both frames.
    `size` ((height, width), multiples of ``patch_size * merge_size``): each frame resized to it (bicubic) instead
    of by the image processor's own bounds.
    """
    if size is None:
        out = image_processor(images=list(video.frames), return_tensors="pt")
    else:
        h, w = size
        frames = [f if f.size == (w, h) else f.resize((w, h), Image.BICUBIC) for f in video.frames]
        out = image_processor(images=frames, do_resize=False, return_tensors="pt")
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
        return video_prompt(self, sample, super().prompt)

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
        ph = self.video_placeholder
        n_tokens = (vin["video_grid_thw"].prod(-1) // self.merge_size**2).tolist()
        at = [sum(videos[:b]) for b in range(len(samples))]  # each video sample's index among the batch's videos
        texts = [p.text.replace(ph, self.video_placeholder_text(s.video, vin, at[b], n_tokens[at[b]]), 1) if videos[b] else p.text
                 for b, (s, p) in enumerate(zip(samples, prompts))]
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


#: HF's Qwen3-VL processor's source rate when a video's own is unknown (a list of frames): timestamps in seconds are
#: source frame index / this.
TIMESTAMP_FPS = 24.0


def frame_timestamps(video: Video, temporal_patch_size: int) -> list[float]:
    """Each temporal patch's time in seconds, as HF's ``Qwen3VLProcessor._calculate_timestamps``: the source
    indices padded to whole patches with the last one, each index over the file's own rate (`TIMESTAMP_FPS` for a
    list of frames), and a patch's time the mean of its first and last frame's.

    >>> from PIL import Image
    >>> frame_timestamps(Video([Image.new("RGB", (8, 8))] * 3, [0, 12, 24], source_fps=24.0), 2)
    [0.25, 1.0]
    """
    idx = list(video.indices) + [video.indices[-1]] * (-len(video) % temporal_patch_size)
    fps = video.source_fps or TIMESTAMP_FPS
    return [(idx[i] / fps + idx[i + temporal_patch_size - 1] / fps) / 2 for i in range(0, len(idx), temporal_patch_size)]


class Qwen3Video(QwenVideo):
    """The video path of Qwen3-VL, Qwen3-VL-MoE and Qwen3.5: Qwen2-VL's, with a timestamp and its own
    ``<|vision_start|>…<|vision_end|>`` before each temporal patch's tokens (see the module)."""

    @classmethod
    def load_processor(cls, path: str):
        """The checkpoint's processor, holding (as ``video_sizing``) its video processor's settings when the stock
        processor could not be built: HF's `Qwen3VLVideoProcessor` reads them without torchvision."""
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        from embedlens.adapters._remote_code import NO_REMOTE_CODE

        processor = super().load_processor(path)
        if getattr(processor, "video_processor", None) is None:
            try:
                processor.video_sizing = Qwen3VLVideoProcessor.from_pretrained(path, **NO_REMOTE_CODE)
            except OSError:  # no video processor in the checkpoint: frames are sized by the image processor
                processor.video_sizing = None
        return processor

    def video_size(self, video: Video) -> tuple[int, int] | None:
        """(height, width) HF's Qwen3-VL video processor resizes `video`'s frames to (its ``smart_resize``: the
        clip's ``frames * h * w`` within its ``size`` bounds, optionally capped per frame), or None when the
        processor holds no video processor settings (then the image processor sizes each frame)."""
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        vp = getattr(self.processor, "video_processor", None)
        vp = getattr(self.processor, "video_sizing", None) if vp is None else vp
        if vp is None:
            return None
        ip = self.processor.image_processor
        if (int(vp.patch_size), int(vp.merge_size)) != (int(ip.patch_size), int(ip.merge_size)):
            raise InputError(f"{self.name}: the video processor's patch_size x merge_size ({vp.patch_size} x "
                             f"{vp.merge_size}) differs from the image processor's ({ip.patch_size} x {ip.merge_size})")
        factor, tp = int(vp.patch_size) * int(vp.merge_size), int(vp.temporal_patch_size)
        shortest, longest = vp.size["shortest_edge"], vp.size["longest_edge"]
        if not (shortest and longest):
            raise InputError(f"{self.name}: the video processor's size needs shortest_edge and longest_edge (pixels of "
                             f"a clip); got {dict(vp.size)}")
        shortest, longest = int(shortest), int(longest)
        n = max(len(video), tp)  # HF refuses a single frame; embedlens pads it to a temporal patch
        if vp.cap_pixels_per_frame:
            per_frame = max(min(int(vp.max_video_tokens) * factor * factor, longest // n), int(shortest * 1.05))
            longest = per_frame * n
        w, h = video.frames[0].size
        return smart_resize(n, h, w, temporal_factor=tp, factor=factor, min_pixels=shortest, max_pixels=longest)

    def video_inputs(self, videos: Sequence[Video]) -> BatchFeature:
        """``pixel_values_videos`` and ``video_grid_thw``, each video's frames at HF's video processor's size
        (`video_size`) when the checkpoint gives its settings."""
        ip = self.processor.image_processor
        rows, grids = zip(*(frames_to_patches(ip, v, self.video_size(v)) for v in videos))
        return BatchFeature({"pixel_values_videos": torch.cat(rows), "video_grid_thw": torch.tensor(grids)})

    def prompt(self, sample: Sample) -> PromptText:
        """Qwen2-VL's video prompt, the template's ``<|vision_start|><|video_pad|><|vision_end|>`` collapsed into
        the bare placeholder, as HF's ``Qwen3VLProcessor.get_text_with_replacements`` does (each temporal patch
        brings its own pair)."""
        p = super().prompt(sample)
        if sample.video is None:
            return p
        vs, ve, ph = self.processor.vision_start_token, self.processor.vision_end_token, self.video_placeholder
        at = p.text.index(ph)
        if not (p.text[:at].endswith(vs) and p.text[at + len(ph):].startswith(ve)):
            return p
        cuts = [(at - len(vs), len(vs)), (at + len(ph), len(ve))]
        text = p.text[: at - len(vs)] + ph + p.text[at + len(ph) + len(ve):]

        def shift(x: int) -> int:
            return x - sum(n for c, n in cuts if c + n <= x)

        spans = {r: [(shift(s), shift(e)) for s, e in v] for r, v in p.spans.items()}
        return PromptText(text, spans, p.suffix)

    def video_placeholder_text(self, video: Video, inputs: BatchFeature, index: int, n_tokens: int) -> str:
        """HF's ``Qwen3VLProcessor.replace_video_token``: per temporal patch ``<{t:.1f} seconds>`` (its time,
        `frame_timestamps`), ``<|vision_start|>``, its tokens, ``<|vision_end|>``."""
        grid_t = int(inputs["video_grid_thw"][index][0])
        vs, ve = self.processor.vision_start_token, self.processor.vision_end_token
        per_patch = self.video_placeholder * (n_tokens // grid_t)
        times = frame_timestamps(video, int(self.processor.image_processor.temporal_patch_size))
        return "".join(f"<{t:.1f} seconds>{vs}{per_patch}{ve}" for t in times)
