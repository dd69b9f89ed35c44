"""Videos: a file (decoded with PyAV) or a list of frame images, sampled to the frames a model sees.

A `Video` is its frames as 8-bit RGB images plus where they came from (the
source frame index of each, and the rate they were sampled at). Which frames
are kept is set by `VideoOptions` (the plan's ``data.video``): ``fps`` samples
a file at that rate, ``num_frames`` then keeps at most that many, spread
evenly; each frame is downscaled to ``max_pixels`` as it is read.

A list of frame files is taken as frames already sampled (its rate is
unknown, so ``fps`` does not apply to it); ``num_frames`` thins it the same
way. Decoding a file needs the optional ``av`` package (``pip install
'embedlens[video]'``); lists of frames need nothing beyond Pillow.

Example:
    >>> from PIL import Image
    >>> frames = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(6)]
    >>> v = Video.from_frames(frames, VideoOptions(num_frames=3))
    >>> v.indices, len(v.frames)
    ([0, 2, 5], 3)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from embedlens.errors import InputError
from embedlens.images import REFUSE_FACTOR, open_image

#: Frames kept by default: the most a video gives unless the plan says otherwise (an even number: Qwen-VL
#: merges frames in pairs).
DEFAULT_NUM_FRAMES = 8
#: Pixels per frame by default: Qwen2-VL's video processor's own cap (768 tokens of 28 x 28 pixels).
DEFAULT_FRAME_PIXELS = 28 * 28 * 768
#: Video files are refused above this many frames before decoding (a header can claim anything).
MAX_SOURCE_FRAMES = 1_000_000


@dataclass(frozen=True)
class VideoOptions:
    """Which frames of a video are kept and how large.

    Attributes:
        fps: sample a video file at this many frames per second (None: every frame).
        num_frames: then keep at most this many, evenly spread, first and last included (None: all).
        max_pixels: each frame is downscaled (aspect kept) to at most this many pixels.
    """

    fps: float | None = None
    num_frames: int | None = DEFAULT_NUM_FRAMES
    max_pixels: int = DEFAULT_FRAME_PIXELS

    def __post_init__(self) -> None:
        if self.fps is not None and not (isinstance(self.fps, (int, float)) and 0 < self.fps < float("inf")):
            raise InputError(f"video fps must be a positive number; got {self.fps!r}")
        if self.num_frames is not None and not (isinstance(self.num_frames, int) and self.num_frames >= 1):
            raise InputError(f"video num_frames must be a whole number >= 1; got {self.num_frames!r}")
        if not (isinstance(self.max_pixels, int) and self.max_pixels >= 1):
            raise InputError(f"video max_pixels must be a whole number >= 1; got {self.max_pixels!r}")


def sample_indices(n_frames: int, source_fps: float | None, options: VideoOptions) -> list[int]:
    """The source frames kept: every ``source_fps / fps``-th (when both rates are known), then at most
    ``num_frames`` of those, evenly spread with the first and last kept.

    >>> sample_indices(10, 30.0, VideoOptions(fps=10, num_frames=None))
    [0, 3, 6, 9]
    >>> sample_indices(10, None, VideoOptions(num_frames=4))
    [0, 3, 6, 9]
    """
    if n_frames < 1:
        return []
    kept = list(range(n_frames))
    if options.fps is not None and source_fps:
        step = source_fps / options.fps
        if step > 1:
            kept = sorted({min(n_frames - 1, int(round(k * step))) for k in range(int((n_frames - 1) / step) + 1)})
    n = options.num_frames
    if n is not None and len(kept) > n:
        if n == 1:
            return [kept[0]]
        kept = [kept[round(j * (len(kept) - 1) / (n - 1))] for j in range(n)]
    return kept


@dataclass
class Video:
    """A video's kept frames, all the same size, and where they came from.

    Attributes:
        frames: the kept frames as RGB images, in time order.
        indices: the source frame index of each kept frame.
        fps: the rate of the kept frames (source rate / sampling step); None for a list of frames.
        source: where the frames came from, for messages.
        source_fps: the file's own frame rate (``indices / source_fps`` is each kept frame's time in seconds);
            None for a list of frames.
    """

    frames: list[Image.Image]
    indices: list[int] = field(default_factory=list)
    fps: float | None = None
    source: str = "<frames>"
    source_fps: float | None = None

    def __post_init__(self) -> None:
        if not self.frames:
            raise InputError(f"video {self.source}: no frames")
        if not self.indices:
            self.indices = list(range(len(self.frames)))
        if len(self.indices) != len(self.frames):
            raise InputError(f"video {self.source}: {len(self.indices)} indices for {len(self.frames)} frames")
        sizes = {f.size for f in self.frames}
        if len(sizes) > 1:
            raise InputError(f"video {self.source}: frames differ in size {sorted(sizes)}; a video's frames share one size")

    def __len__(self) -> int:
        return len(self.frames)

    @classmethod
    def from_frames(cls, frames: Sequence[Any], options: VideoOptions | None = None, source: str = "<frames>") -> "Video":
        """A video from frames in time order: images, or paths of image files (read with `open_image`).

        Raises:
            InputError: no frames, a frame that cannot be read (named by its index), or frames of different sizes.
        """
        options = options or VideoOptions()
        if not frames:
            raise InputError(f"video {source}: no frames")
        keep = sample_indices(len(frames), None, options)
        out = []
        for i in keep:
            try:
                im, _ = open_image(frames[i], options.max_pixels)
            except InputError as e:
                raise InputError(f"video {source}: frame {i}: {e}") from None
            out.append(im)
        return cls(out, keep, None, source)


def _av():
    try:
        import av
    except ImportError:
        raise InputError(
            "decoding a video file needs PyAV: pip install 'embedlens[video]' (or give the video as a list of frame image files)"
        ) from None
    return av


def read_video_file(path: str | Path, options: VideoOptions | None = None) -> Video:
    """Decode the frames `options` keeps from a video file with PyAV (the first video stream).

    Frames are counted from the container's packets first (a header's frame count can be missing or wrong),
    then only the kept frames are converted and downscaled.

    Raises:
        InputError: the file is missing, not a video, has no video stream, or needs PyAV that is not installed.
    """
    options = options or VideoOptions()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"video file not found: {path}")
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"video {path}: no video stream")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            if w * h > REFUSE_FACTOR * options.max_pixels:
                raise InputError(f"video {path}: frames are {w}x{h}, more than {REFUSE_FACTOR} x data.video.max_pixels "
                                 f"({options.max_pixels}); downscale it first")
            rate = stream.average_rate or stream.base_rate
            source_fps = float(rate) if rate else None
            n = sum(1 for p in container.demux(stream) if p.size)
            if n > MAX_SOURCE_FRAMES:
                raise InputError(f"video {path}: {n} frames, more than {MAX_SOURCE_FRAMES}; cut it first")
            keep = sample_indices(n, source_fps, options)
            wanted, frames = set(keep), {}
            container.seek(0)
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames[i] = open_image(frame.to_image(), options.max_pixels)[0]
                if i >= keep[-1]:
                    break
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"cannot read video {path}: {e}") from None
    keep = [i for i in keep if i in frames]  # a stream whose last packets decode to nothing
    if not keep:
        raise InputError(f"video {path}: no frame could be decoded")
    step = (source_fps / options.fps) if (options.fps and source_fps and source_fps > options.fps) else 1.0
    return Video([frames[i] for i in keep], keep, source_fps / step if source_fps else None, str(path), source_fps)


def resolve_inside(root: Path, name: str, where: str, key: str) -> Path:
    """`name` (a path from a data file) as a file inside the folder `root`.

    Absolute paths, ``..`` that leaves `root`, and symbolic links (the file or a folder on the way) that
    resolve outside `root` are refused: a data file names files of its own folder only.

    Raises:
        InputError: naming `where` (file:line) and `key`.
    """
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{where}: {key!r} must hold a file path; got {name!r}")
    if os.path.isabs(name):
        raise InputError(f"{where}: {key!r} is an absolute path ({name}); give it relative to the data folder {root}")
    base = root.resolve()
    full = (root / name).resolve()
    if not full.is_relative_to(base):
        raise InputError(f"{where}: {key!r} ({name}) resolves to {full}, outside the data folder {base}")
    if not full.is_file():
        raise InputError(f"{where}: {key!r}: file not found: {root / name}")
    return full
