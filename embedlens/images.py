"""Reading one image from disk or memory as 8-bit RGB, with the size checks that keep decoding safe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from embedlens.errors import InputError

#: Images with more pixels than this are downscaled (aspect kept) when read; see `open_image`.
DEFAULT_MAX_PIXELS = 4096 * 4096
#: Images with more than this many times `max_pixels` are refused unread (decoding them could exhaust memory).
REFUSE_FACTOR = 16
#: Longer side / shorter side above which an image is refused unread: processors resize the short side up,
#: so a 200000x1 strip of a few hundred bytes would become gigabytes of pixels.
MAX_ASPECT = 50.0


def open_image(source: "str | Path | Image.Image | Any", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, list[str]]:
    """Open an image as 8-bit RGB and say what was converted.

    Grayscale and palette images are converted; RGBA is composited on white
    (so transparent areas do not turn black); 16/32-bit integer and float
    images are scaled to 8 bit instead of clipped; images with more than
    `max_pixels` pixels are downscaled (decoded at reduced size where the
    format allows). Images too large for Pillow to open safely are refused.

    Returns:
        (image, notes): notes name each conversion, e.g. ``"mode I;16 -> RGB (scaled to 8 bit)"``.

    Raises:
        InputError: the file is missing or is not a readable image.
    """
    import numpy as np

    notes: list[str] = []
    if isinstance(source, Image.Image):
        im, name = source, "<image>"
    else:
        file_like = hasattr(source, "read")  # encoded bytes, e.g. from a data set
        name = "image bytes" if file_like else f"image {source}"
        if not file_like and not Path(source).is_file():
            raise InputError(f"image file not found: {source}")
        try:
            if file_like:
                source.seek(0)
            im = Image.open(source)
        except Image.DecompressionBombError as e:
            raise InputError(f"{name} is too large to open safely: {e}") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise InputError(f"cannot read {name}: {e}") from None
    w, h = im.size  # read from the header: nothing is decoded yet
    if w < 1 or h < 1:
        raise InputError(f"{name} has no pixels ({w}x{h})")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise InputError(f"{name} is {w}x{h}: aspect ratio {max(w, h) / min(w, h):.0f}:1 is above {MAX_ASPECT:.0f}:1, which no vision tower sees usefully; crop it")
    if max_pixels is not None and w * h > REFUSE_FACTOR * max_pixels:
        raise InputError(f"{name} is {w}x{h} ({w * h} pixels), more than {REFUSE_FACTOR} x data.max_pixels ({max_pixels}); downscale it first")
    try:
        if max_pixels is not None and im.width * im.height > max_pixels:
            scale = (max_pixels / (im.width * im.height)) ** 0.5
            size = (max(1, int(im.width * scale)), max(1, int(im.height * scale)))
            if hasattr(im, "draft") and im.format == "JPEG":
                im.draft("RGB", size)
            notes.append(f"downscaled from {im.width}x{im.height} to {size[0]}x{size[1]} (max_pixels {max_pixels})")
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                im = im.convert("F")  # resized in float, scaled below by the original mode's range
            im = im.resize(size, Image.Resampling.BILINEAR) if im.size != size else im
        else:
            im.load()
            mode = im.mode
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, (255, 255, 255))
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            notes.append(f"mode {mode} -> RGB (alpha composited on white)")
            return canvas, notes
        if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
            hi = float(arr.max()) if arr.size else 0.0
            if mode.startswith("I;16") or (mode == "I" and 0 <= arr.min() and hi <= 65535):
                arr = arr / 65535.0  # 16-bit range (PNG 16-bit opens as I or I;16)
            elif not (mode == "F" and 0 <= arr.min() and hi <= 1.0):  # float already in 0..1 stays; else its own range
                lo = float(arr.min())
                arr = (arr - lo) / ((hi - lo) or 1.0)
            notes.append(f"mode {mode} -> RGB (scaled to 8 bit)")
            return Image.fromarray((arr * 255).round().astype("uint8")).convert("RGB"), notes
        if mode != "RGB":
            notes.append(f"mode {mode} -> RGB")
            return im.convert("RGB"), notes
        return im, notes
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read {name}: {e}") from None
    except (MemoryError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read {name}: too large to decode ({type(e).__name__})") from None


def load_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image as RGB (see `open_image` for the conversions).

    Raises:
        InputError: the file is missing or is not a readable image.
    """
    return open_image(path, max_pixels)[0]
