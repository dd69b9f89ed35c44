"""LLaVA-NeXT-Video (`LlavaNextVideoForConditionalGeneration`): LLaVA-NeXT's anyres images, and videos whose frames'
patch grids are pooled before the projector.

Images are LLaVA-NeXT's (`embedlens.adapters.llava_next`): base image + unpadded tile grid with newline tokens.

A video is its kept frames, each resized and centre-cropped to the tower's ``image_size`` (``pixel_values_videos``:
``[videos, frames, 3, H, W]``). The tower runs every frame as one row of its batch; the model drops CLIP's CLS token
(``vision_feature_select_strategy: default``), pools each frame's ``g x g`` patch grid with a ``s x s`` kernel and
stride ``s`` (``spatial_pool_stride``; average, max or a convolution: ``spatial_pool_mode``), projects the pooled
grid and puts the frames' tokens one after another, each frame row-major, no newline tokens. So a video token
stands for one frame (its ``frame`` in the role map is the kept frame's index: source frame ``video.indices[frame]``)
and one ``s x s`` block of that frame's patches (``row`` / ``col``: the block's place in the pooled ``g/s x g/s``
grid).

Vision sites of a video batch: ``vision.embed`` and ``vision.layers[i]`` are ``[frames, 1 + g*g, d]`` (all frames
of the batch, video after video; CLS first), ``vision.features`` (the pooled grid, what the projector takes) and
``projector`` are ``[frames, (g/s)**2, d]``. A video token's ``feature_row`` is its frame's row of that batch and
its ``feature_col`` its row of the pooled grid, so `vision.features` has one row per token
(`Layout.features_per_token`) and its patches are the ``s x s`` block `patch_indices` names.

HF's video processor needs torchvision; here each frame goes through a PIL image processor with the video
processor's own settings (`frame_processor`: resize the shortest edge, centre crop, rescale, normalise: the same
steps, sizes and crop offsets). Pixel values can differ from the torchvision processor's where a frame is resized
(different interpolation code); frames already at the crop size are not resized. The token count per frame is the
model's pooling rule, ``(g // s) ** 2`` (HF's processor assumes ``s = 2``).

A batch holds image samples or video samples, not both. Videos of one batch with different frame counts are packed
into one row of ``pixel_values_videos`` (``[1, all frames, ...]``): the model scatters its video features over the
video tokens in order, so each sample's tokens get its own frames' features, as when they are stacked.

Example:
    >>> from embedlens import Sample, load_model
    >>> from PIL import Image
    >>> adapter = load_model("tiny:llava_next_video")
    >>> frames = [Image.new("RGB", (32, 32), (40 * i, 0, 0)) for i in range(3)]
    >>> batch = adapter.encode([Sample(video=frames, question="what moves?")])
    >>> tuple(batch.inputs["pixel_values_videos"].shape), batch.roles.frame[batch.roles.visual].tolist()
    ((1, 3, 3, 32, 32), [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import BatchFeature, LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor, ProcessorMixin
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next_video.video_processing_llava_next_video import LlavaNextVideoVideoProcessor

from embedlens.adapters._remote_code import NO_REMOTE_CODE
from embedlens.adapters.base import Batch
from embedlens.adapters.capabilities import Capability
from embedlens.adapters.llava_next import LlavaNextAdapter
from embedlens.adapters.role_map import PromptText, video_prompt
from embedlens.data import Sample
from embedlens.errors import AdapterError, InputError
from embedlens.registry import adapters
from embedlens.video import Video

#: The video processor's settings a frame's processing reads (`LlavaNextVideoVideoProcessor`'s, whose class
#: defaults fill what a checkpoint leaves out).
FRAME_SETTINGS = ("do_convert_rgb", "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
                  "rescale_factor", "do_normalize", "image_mean", "image_std")


def frame_processor(settings: dict[str, Any] | None = None) -> CLIPImageProcessorPil:
    """A PIL image processor that runs HF's `LlavaNextVideoVideoProcessor` steps on each frame, from that processor's
    settings (a checkpoint's video processor config; its class defaults where a key is missing): convert to RGB,
    resize the shortest edge to ``size`` (aspect kept), centre-crop ``crop_size``, rescale, normalise."""
    vp = LlavaNextVideoVideoProcessor(**{k: v for k, v in (settings or {}).items() if k in FRAME_SETTINGS})
    return CLIPImageProcessorPil(**{k: getattr(vp, k) for k in FRAME_SETTINGS})


class LlavaNextVideoImageProcessor(LlavaNextVideoProcessor):
    """`LlavaNextVideoProcessor` without its video processor (which will not construct without torchvision); the
    video path reads `frame_processor`, a PIL processor with the video processor's settings."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, patch_size=None,
                 vision_feature_select_strategy=None, video_token="<video>", image_token="<image>",
                 num_additional_image_tokens=0, frame_processor: CLIPImageProcessorPil | None = None, **kwargs):
        # `LlavaNextVideoProcessor.__init__`'s settings; its own call passes the processors positionally, video first
        self.patch_size = patch_size
        self.num_additional_image_tokens = num_additional_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.video_token = getattr(tokenizer, "video_token", None) or video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.frame_processor = frame_processor


@adapters.register("llava_next_video")
class LlavaNextVideoAdapter(LlavaNextAdapter):
    """LLaVA-NeXT-Video: LLaVA-NeXT's anyres images; video frames' patch grids pooled s x s before the projector."""

    architectures = ("LlavaNextVideoForConditionalGeneration",)
    model_class = LlavaNextVideoForConditionalGeneration
    capabilities = LlavaNextAdapter.capabilities | {Capability.VIDEO}
    image_only_processor = LlavaNextVideoImageProcessor
    image_only_keys = ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens", "video_token",
                       "image_token", "chat_template")

    @classmethod
    def load_processor(cls, path: str):
        """The checkpoint's processor (without its video processor where torchvision is missing), and the PIL
        `frame_processor` built from the checkpoint's video processor settings."""
        processor = super().load_processor(path)
        try:
            settings = LlavaNextVideoVideoProcessor.get_video_processor_dict(path, **NO_REMOTE_CODE)[0]
        except OSError:  # no video processor config: the class defaults
            settings = {}
        processor.frame_processor = frame_processor(settings)
        return processor

    # -- the model's video shape -------------------------------------------------------------------------------
    @property
    def video_token_id(self) -> int:
        return int(self.config.video_token_id)

    @property
    def video_placeholder(self) -> str:
        return getattr(self.processor, "video_token", None) or "<video>"

    @property
    def pool_stride(self) -> int:
        return int(self.config.spatial_pool_stride)

    def video_grid(self) -> tuple[int, int]:
        """(rows, cols) of one frame's video tokens: the tower's patch grid pooled with stride `pool_stride`."""
        h, w = self.grid()
        s = self.pool_stride
        return h // s, w // s

    def _frame_processor(self) -> CLIPImageProcessorPil:
        fp = getattr(self.processor, "frame_processor", None)
        if fp is None:  # a stock processor (torchvision installed): its video processor's settings
            vp = getattr(self.processor, "video_processor", None)
            fp = frame_processor({k: getattr(vp, k) for k in FRAME_SETTINGS if hasattr(vp, k)} if vp is not None else None)
            self.processor.frame_processor = fp
        return fp

    def video_inputs(self, videos: Sequence[Video]) -> BatchFeature:
        """``pixel_values_videos`` of the videos: ``[videos, frames, 3, H, W]``, or ``[1, all frames, 3, H, W]`` where
        the videos have different frame counts (see the module).

        Raises:
            AdapterError: the frames come out at another size than the tower's ``image_size``, or the model's
                feature rule keeps a CLS token the pooling cannot place.
        """
        if self.n_prefix_tokens != self.n_cls_tokens:
            raise AdapterError(f"{self.name}: vision_feature_select_strategy {self.feature_select_strategy!r} keeps the "
                               "tower's CLS token, which the model's video pooling cannot place; video needs 'default'")
        fp = self._frame_processor()
        per_video = [fp(images=list(v.frames), return_tensors="pt")["pixel_values"] for v in videos]  # [frames, 3, H, W]
        side = int(self.config.vision_config.image_size)
        if tuple(per_video[0].shape[-2:]) != (side, side):
            h, w = per_video[0].shape[-2:]
            raise AdapterError(f"{self.name}: the video processor makes {h} x {w} frames; the vision tower takes {side} x {side} "
                               "(the video processor's crop_size must be the tower's image_size)")
        same = len({len(p) for p in per_video}) == 1
        return BatchFeature({"pixel_values_videos": torch.stack(per_video) if same else torch.cat(per_video)[None]})

    # -- prompts and encoding ----------------------------------------------------------------------------------
    def prompt(self, sample: Sample) -> PromptText:
        """A video sample's prompt: rendered as a one-image prompt whose image placeholder becomes the video's; a
        full `prompt` holds one video placeholder and no image placeholder."""
        if sample.video is None:
            return super().prompt(sample)
        return video_prompt(self, sample, super().prompt)

    def encode(self, samples: Sequence[Sample], padding_side: str = "right") -> Batch:
        """`Adapter.encode`, with video samples: a batch holds image samples or video samples, not both."""
        videos = [s.video is not None for s in samples]
        if not any(videos):
            return super().encode(samples, padding_side)
        if not all(videos):
            raise InputError(f"{self.name}: a batch holds image samples or video samples, not both; images: "
                             f"{[s.id for s, v in zip(samples, videos) if not v]}, videos: {[s.id for s, v in zip(samples, videos) if v]} "
                             "(set batch_size: 1, or give the images and the videos in separate data sets)")
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
        prompts = [self.prompt(s) for s in samples]
        vin = self.video_inputs([s.video for s in samples])
        gh, gw = self.video_grid()
        ph = self.video_placeholder
        texts = [p.text.replace(ph, ph * (len(s.video) * gh * gw), 1) for p, s in zip(prompts, samples)]
        tok = self.tokenizer
        old_side = tok.padding_side
        tok.padding_side = padding_side
        try:  # the tokenizer, as the processor runs it on text whose video placeholders it has expanded
            inputs = BatchFeature(dict(tok(texts, return_tensors="pt", padding=True, padding_side=padding_side)))
        finally:
            tok.padding_side = old_side
        inputs.update(vin)
        roles = self._build_roles(inputs, prompts, samples)
        return Batch(inputs=inputs, roles=roles, samples=list(samples))

    # -- layout ------------------------------------------------------------------------------------------------
    def image_layouts(self, inputs: BatchFeature) -> list[torch.Tensor]:
        """LLaVA-NeXT's anyres layouts of the images; in a video batch one layout per video, its sixth column the
        frame: token k of a video is at frame ``k // (gh * gw)``, block ``k % (gh * gw)`` of the pooled grid,
        row-major (`video_grid`)."""
        if "pixel_values_videos" not in inputs:
            return super().image_layouts(inputs)
        gh, gw = self.video_grid()
        per_frame = gh * gw
        tokens = ((inputs["input_ids"] == self.video_token_id) & inputs["attention_mask"].bool()).sum(1)
        pv = inputs["pixel_values_videos"]
        frames = (tokens // per_frame).tolist()  # host side: the role map is built there
        if bool((tokens % per_frame).any()) or sum(frames) != pv.shape[0] * pv.shape[1]:
            raise AdapterError(f"{self.name}: {tokens.tolist()} video tokens per sample do not fill "
                               f"{pv.shape[0] * pv.shape[1]} frames of {per_frame} tokens")
        out, first = [], 0
        for n in frames:
            k = torch.arange(n * per_frame)
            f, t = k // per_frame, k % per_frame
            out.append(torch.stack([torch.zeros_like(k), t // gw, t % gw, first + f, t, f], dim=1))
            first += n
        return out

    def image_grids(self, inputs: BatchFeature) -> list[tuple[int, int]]:
        if "pixel_values_videos" in inputs:
            return [self.video_grid()] * len(self.image_layouts(inputs))
        return super().image_grids(inputs)

    def features_per_token(self, inputs: BatchFeature | None) -> bool:
        return (inputs is not None and "pixel_values_videos" in inputs) or super().features_per_token(inputs)

    def patch_indices(self, feature_col: torch.Tensor, inputs: BatchFeature | None = None) -> torch.Tensor:
        """Images: the token's own patch. Video: the ``s x s`` block of the frame's ``g x g`` patch grid the token
        pools (row-major), ``g`` the tower's patch grid."""
        if inputs is None or "pixel_values_videos" not in inputs:
            return super().patch_indices(feature_col, inputs)
        s, (_, gw), (_, w) = self.pool_stride, self.video_grid(), self.grid()
        r, c = feature_col // gw, feature_col % gw
        i, j = torch.meshgrid(torch.arange(s, device=feature_col.device), torch.arange(s, device=feature_col.device), indexing="ij")
        return (r[:, None] * s + i.flatten()) * w + c[:, None] * s + j.flatten()

    def display_pixels(self, inputs: BatchFeature, image: int, feature_row: int, frame: int = 0) -> torch.Tensor:
        """`[3, H, W]` normalised pixels of row `feature_row` of the tower's batch: in a video batch, that frame."""
        if "pixel_values_videos" in inputs:
            pv = inputs["pixel_values_videos"]
            return pv.reshape(-1, *pv.shape[-3:])[feature_row]
        return super().display_pixels(inputs, image, feature_row)
