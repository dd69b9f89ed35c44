"""The LLaVA-OneVision video path: frames to ``pixel_values_videos`` without torchvision, video prompts, and where
each video token sits (its frame, and the patches it pools).

The model runs every frame through the tower as one image (``[videos * frames, patches, d]``), projects it, and
pools each frame's patch grid 2 x 2 (`LlavaOnevisionModel.apply_pooling`: bilinear down to ``ceil(h / 2) x
ceil(w / 2)``); a video's tokens are its frames one after another, each a row-major pooled grid, then **one**
newline token (the learned ``image_newline``) after the last frame. So a token's ``frame`` is its kept frame
(no temporal merge, unlike Qwen), ``row`` / ``col`` its place in the pooled grid, ``feature_row`` the tower's row
of its frame (video ``v``, frame ``f``: ``v * frames + f``) and ``feature_col`` its index in that frame's pooled
grid. `patch_indices` names the 2 x 2 patches the pooling reads for a token (on an even grid: the block it
averages); in a video batch the ``projector`` site is the pooled output, the features the model scatters.

HF's `LlavaOnevisionVideoProcessor` needs torchvision; `frames_to_pixels` does its math on PIL frames: resize to
the tower's size (bicubic), rescale and normalise with the video processor's settings (`VideoSettings`), fused
as HF fuses them. A batch holds image samples or video samples, and its videos have one frame count (HF stacks
them into one tensor).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from embedlens.adapters._remote_code import NO_REMOTE_CODE
from embedlens.adapters.role_map import PromptText, video_prompt
from embedlens.data import Sample
from embedlens.errors import InputError
from embedlens.sites import Site
from embedlens.video import Video

#: The video processor's keys `frames_to_pixels` reads (HF's `LlavaOnevisionVideoProcessor` attributes).
SETTING_KEYS = ("resample", "image_mean", "image_std", "rescale_factor", "do_resize", "do_rescale", "do_normalize")


@dataclass(frozen=True)
class VideoSettings:
    """How frames become pixel values: HF's `LlavaOnevisionVideoProcessor` settings (the size is the tower's)."""

    resample: int = int(Image.Resampling.BICUBIC)
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True


def _defaults() -> dict[str, Any]:
    """`LlavaOnevisionVideoProcessor`'s class defaults (importable without torchvision), else `VideoSettings`'."""
    try:
        from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor as V
    except ImportError:  # pragma: no cover - the class ships with every transformers that has the model
        return dataclasses.asdict(VideoSettings())
    return {k: getattr(V, k) for k in SETTING_KEYS}


def video_settings(processor: Any) -> VideoSettings:
    """The settings HF's video processor would use with `processor`.

    In order: the processor's own video processor (the stock processor, where torchvision is installed); the
    checkpoint's video processor config as HF resolves it (`video_config`, kept by `load_processor`); for a
    processor built in code without one, its image processor's normalisation, as HF falls back to the image
    processor's config. Keys none of these give are `LlavaOnevisionVideoProcessor`'s class defaults.
    """
    values = _defaults()
    own = getattr(processor, "video_processor", None)
    given = getattr(processor, "video_config", None)
    if own is not None:
        source = {k: getattr(own, k) for k in SETTING_KEYS if getattr(own, k, None) is not None}
    elif given is not None:
        source = {k: given[k] for k in SETTING_KEYS if given.get(k) is not None}
    else:
        ip = processor.image_processor
        source = {k: getattr(ip, k) for k in SETTING_KEYS if getattr(ip, k, None) is not None}
    values.update(source)
    mean, std = values["image_mean"], values["image_std"]
    return VideoSettings(
        resample=int(values["resample"]),
        image_mean=tuple(float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean] * 3)),
        image_std=tuple(float(s) for s in (std if isinstance(std, (list, tuple)) else [std] * 3)),
        rescale_factor=float(values["rescale_factor"]),
        do_resize=bool(values["do_resize"]),
        do_rescale=bool(values["do_rescale"]),
        do_normalize=bool(values["do_normalize"]),
    )


def frames_to_pixels(video: Video, settings: VideoSettings, size: int) -> torch.Tensor:
    """``[frames, 3, size, size]`` float32: HF's `LlavaOnevisionVideoProcessor` on `video`, on PIL frames.

    Each frame is resized to ``size x size`` (aspect not kept, as HF's ``{height, width}`` size) with the
    processor's filter, then rescaled and normalised as HF fuses them: ``(x - mean / r) / (std / r)`` on the 8-bit
    values. Frames already ``size x size`` are not resized; others can differ from torchvision's resize by its
    interpolation code.
    """
    frames = [f.convert("RGB") if f.mode != "RGB" else f for f in video.frames]
    if settings.do_resize:
        frames = [f if f.size == (size, size) else f.resize((size, size), Image.Resampling(settings.resample)) for f in frames]
    x = torch.from_numpy(np.stack([np.asarray(f) for f in frames])).permute(0, 3, 1, 2).float()  # [F, 3, H, W]
    mean = torch.tensor(settings.image_mean)[:, None, None]
    std = torch.tensor(settings.image_std)[:, None, None]
    if settings.do_rescale and settings.do_normalize:
        return (x - mean * (1.0 / settings.rescale_factor)) / (std * (1.0 / settings.rescale_factor))
    if settings.do_normalize:
        return (x - mean) / std
    return x * settings.rescale_factor if settings.do_rescale else x


def pooled_support(n: int) -> tuple[int, torch.Tensor]:
    """The pooled size ``ceil(n / 2)`` of an ``n``-patch side and, for each pooled index, the two patch indices
    bilinear interpolation (``align_corners=False``, as `apply_pooling`) reads with a nonzero weight: ``[pooled, 2]``."""
    m = math.ceil(n / 2)
    # torch's source coordinate, in float32 as it computes it; an integer one reads one patch (given twice)
    scale = torch.tensor(n, dtype=torch.float32) / torch.tensor(m, dtype=torch.float32)
    src = (scale * (torch.arange(m, dtype=torch.float32) + 0.5) - 0.5).clamp(min=0)
    lo = src.floor()
    hi = torch.where(src > lo, lo + 1, lo).clamp(max=n - 1)
    return m, torch.stack([lo, hi], dim=1).long()


class OnevisionVideo:
    """The video path of `LlavaOnevisionAdapter` (mixed in ahead of `Adapter`; see the module)."""

    @property
    def video_token_id(self) -> int:
        return int(self.config.video_token_id)

    @property
    def video_placeholder(self) -> str:
        return getattr(self.processor, "video_token", None) or "<video>"

    @classmethod
    def load_processor(cls, path: str):
        """The checkpoint's processor; without its video processor (no torchvision), with the video processor's
        config as HF resolves it kept as ``video_config`` (for `video_settings`), when the checkpoint has one."""
        processor = super().load_processor(path)
        if getattr(processor, "video_processor", None) is None:
            from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

            try:
                processor.video_config = LlavaOnevisionVideoProcessor.get_video_processor_dict(path, **NO_REMOTE_CODE)[0]
            except OSError:  # no video (or image) processor config: the image processor's settings apply
                processor.video_config = None
        return processor

    @property
    def pooled_grid(self) -> tuple[int, int]:
        """(rows, cols) of one frame's video tokens: the tower's patch grid pooled 2 x 2 (rounded up)."""
        h, w = self.grid()
        return math.ceil(h / 2), math.ceil(w / 2)

    def prompt(self, sample: Sample) -> PromptText:
        if sample.video is None:
            return super().prompt(sample)
        return video_prompt(self, sample, super().prompt)

    def encode(self, samples: Sequence[Sample], padding_side: str = "right"):
        """`Adapter.encode`, with video samples: a batch holds image samples or video samples (of one frame count)."""
        from embedlens.adapters.base import Batch
        from transformers import BatchFeature

        videos = [s.video is not None for s in samples]
        if not any(videos):
            return super().encode(samples, padding_side)
        if not all(videos):
            raise InputError(f"{self.name}: a batch holds image samples or video samples, not both; images: "
                             f"{[s.id for s, v in zip(samples, videos) if not v]}, videos: {[s.id for s, v in zip(samples, videos) if v]} "
                             "(set batch_size: 1, or give the images and the videos in separate data sets)")
        counts = {s.id: len(s.video) for s in samples}
        if len(set(counts.values())) > 1:
            raise InputError(f"{self.name} takes the videos of a batch as one tensor: they need one frame count; got "
                             f"{counts} (set data.video.num_frames, or batch_size: 1)")
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
        prompts = [self.prompt(s) for s in samples]
        settings = video_settings(self.processor)
        size = int(self.config.vision_config.image_size)
        pixels = torch.stack([frames_to_pixels(s.video, settings, size) for s in samples])  # [videos, F, 3, S, S]
        ph, pw = self.pooled_grid
        n = pixels.shape[1] * ph * pw + 1  # + the newline after the last frame
        vph = self.video_placeholder
        texts = [p.text.replace(vph, vph * n, 1) for p in prompts]
        tok = self.tokenizer
        old_side = tok.padding_side
        tok.padding_side = padding_side
        try:  # the tokenizer, as the processor runs it on the expanded text
            inputs = BatchFeature(dict(tok(texts, return_tensors="pt", padding=True, padding_side=padding_side)))
        finally:
            tok.padding_side = old_side
        inputs["pixel_values_videos"] = pixels
        roles = self._build_roles(inputs, prompts, samples)
        return Batch(inputs=inputs, roles=roles, samples=list(samples))

    def video_layouts(self, inputs) -> list[torch.Tensor]:
        """One ``[frames * ph * pw + 1, 6]`` layout per video: (tile 0, row, col, feature_row, feature_col, frame)
        for frame by frame row-major pooled tokens, then the newline (all -1)."""
        n_videos, n_frames = inputs["pixel_values_videos"].shape[:2]
        ph, pw = self.pooled_grid
        k = torch.arange(n_frames * ph * pw)
        frame, local = k // (ph * pw), k % (ph * pw)
        out = []
        for v in range(n_videos):
            tokens = torch.stack([torch.zeros_like(k), local // pw, local % pw, v * n_frames + frame, local, frame], dim=1)
            out.append(torch.cat([tokens, torch.full((1, 6), -1)]))
        return out

    def patch_indices(self, feature_col: torch.Tensor, inputs=None) -> torch.Tensor:
        """In a video batch, ``[tokens, 4]``: the patches of its frame the pooling interpolates a token from (the
        2 x 2 block it averages, on an even grid); else the image tokens' (`Layout.patch_indices`)."""
        if inputs is None or "pixel_values_videos" not in inputs:
            return super().patch_indices(feature_col, inputs)
        h, w = self.grid()
        _, rows = pooled_support(h)
        pw, cols = pooled_support(w)
        r, c = rows.to(feature_col.device)[feature_col // pw], cols.to(feature_col.device)[feature_col % pw]  # [tokens, 2]
        return (r[:, :, None] * w + c[:, None, :]).flatten(1)

    def site_value(self, site: Site, value: torch.Tensor, inputs) -> torch.Tensor:
        """In a video batch the ``projector`` site is pooled as the model pools it (`apply_pooling`): one row per
        video token of each frame, the features the model scatters (without the newline)."""
        if site.component == "projector" and "pixel_values_videos" in inputs:
            value = self.model.model.apply_pooling(value)
        return super().site_value(site, value, inputs)

    def display_pixels(self, inputs, image: int, feature_row: int, frame: int = 0) -> torch.Tensor:
        """The tower's row `feature_row`; in a video batch, that frame's pixels, put in the image processor's
        normalisation (which the figures undo) from the video processor's."""
        if "pixel_values_videos" not in inputs:
            return super().display_pixels(inputs, image, feature_row)
        pv = inputs["pixel_values_videos"]
        x = pv.reshape(-1, *pv.shape[-3:])[feature_row].float().cpu()
        s = video_settings(self.processor)
        if s.do_normalize:
            x = x * torch.tensor(s.image_std)[:, None, None] + torch.tensor(s.image_mean)[:, None, None]
            x = x * s.rescale_factor if not s.do_rescale else x  # normalised 8-bit values: back to 0..1
        elif not s.do_rescale:
            x = x * s.rescale_factor
        ip = self.processor.image_processor  # x is in 0..1 now
        mean = torch.tensor(getattr(ip, "image_mean", None) or [0.0, 0.0, 0.0])[:, None, None]
        std = torch.tensor(getattr(ip, "image_std", None) or [1.0, 1.0, 1.0])[:, None, None]
        return (x - mean) / std
