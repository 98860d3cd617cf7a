"""Image decoding: one function turns any file the pipeline meets into the pixels every model sees.

Convention: 8-bit grayscale (0 = black, 255 = white), square `size` x `size`, EXIF orientation applied.
`clean` stores these pixels; `predict` calls the same function, so training and prediction cannot disagree.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class DecodeError(Exception):
    """An image that cannot be used. `reason` is a short machine-readable drop reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _to_gray(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 grayscale array."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float data: stretch the image's own range to 8 bits (Pillow's convert('L') would clip).
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if hi <= lo:
            return np.zeros(arr.shape, np.uint8)
        return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    if img.mode in ("LA", "RGBA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become black, the colour of an X-ray's background.
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba)
    return np.asarray(img.convert("L"), dtype=np.uint8)


def square(gray: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    """Make a grayscale array square (pad: letterbox with black, keeping all anatomy; crop: centre crop)
    and resize it to size x size with one filter for every image."""
    h, w = gray.shape
    if mode == "crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        gray = gray[top : top + s, left : left + s]
    elif h != w:
        s = max(h, w)
        canvas = np.zeros((s, s), np.uint8)
        top, left = (s - h) // 2, (s - w) // 2
        canvas[top : top + h, left : left + w] = gray
        gray = canvas
    img = Image.fromarray(gray, mode="L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(img, dtype=np.uint8)


DEFAULT_MAX_PIXELS = 60_000_000
DEFAULT_MAX_ASPECT_RATIO = 4.0   # chest radiographs are at most ~1:2.3 in both collections
DEFAULT_MIN_SIDE = 1


def limit_name(key: str, style: str = "clean") -> str:
    """How the user sets a decoding limit: `clean.max_pixels` in params.yaml, or `--max-pixels` on the command line."""
    return f"clean.{key}" if style == "clean" else "--" + key.replace("_", "-")


def check_size(w: int, h: int, max_pixels: int, max_aspect_ratio: float, min_side: int, style: str = "clean") -> None:
    """Refuse, from the header alone, images too large, too small or too elongated to be worth decoding.
    Bounds the work: padding an image to a square costs (long side)^2, at most max_pixels * max_aspect_ratio."""
    if w <= 0 or h <= 0:
        raise DecodeError("unreadable", f"image is {w}x{h} pixels")
    if w * h > max_pixels:
        raise DecodeError("decompression_bomb", f"{w}x{h} = {w * h} pixels exceeds {limit_name('max_pixels', style)}={max_pixels}")
    if min(w, h) < min_side:
        raise DecodeError("too_small", f"{w}x{h} pixels: shorter side under {limit_name('min_side', style)}={min_side}")
    if max(w, h) > max_aspect_ratio * min(w, h):
        raise DecodeError("extreme_aspect_ratio", f"{w}x{h} pixels: aspect ratio {max(w, h) / min(w, h):.4g}:1 exceeds "
                                                  f"{limit_name('max_aspect_ratio', style)}={max_aspect_ratio:g}")


def _bomb_detail(err: Exception, max_pixels: int, style: str) -> str:
    """Pillow's own guard fires above its limit (and errors at twice it): say it in our words, with our limit."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{found.group(1)} pixels" if found else "image size"
    return f"{size} exceeds {limit_name('max_pixels', style)}={max_pixels}"


def decode(path: str | Path, size: int, mode: str = "pad", max_pixels: int = DEFAULT_MAX_PIXELS, *,
           max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO, min_side: int = DEFAULT_MIN_SIDE,
           style: str = "clean") -> np.ndarray:
    """Decode an image file to uint8 (size, size) grayscale. Raises DecodeError with a drop reason.
    Size limits are checked on the header, before any pixel is decoded; `style` names them in messages
    as params (`clean.max_pixels`) or as command-line options (`--max-pixels`)."""
    path = Path(path)
    try:
        nbytes = path.stat().st_size
    except OSError as err:
        raise DecodeError("unreadable", err.strerror or str(err)) from None
    if nbytes == 0:
        raise DecodeError("empty_file", "zero bytes")
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own guard, at the same limit (process-wide, set per call)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                check_size(*img.size, max_pixels, max_aspect_ratio, min_side, style)
                img = ImageOps.exif_transpose(img)
                img.load()
                gray = _to_gray(img)
        except DecodeError:
            raise
        except UnidentifiedImageError:
            raise DecodeError("not_an_image", "Pillow cannot identify the file as an image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise DecodeError("decompression_bomb", _bomb_detail(err, max_pixels, style)) from None
        except MemoryError:
            raise DecodeError("unreadable", "out of memory while decoding") from None
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            raise DecodeError("unreadable", " ".join((str(err) or type(err).__name__).split())) from None
    if gray.size == 0:
        raise DecodeError("unreadable", "image has no pixels")
    return square(gray, size, mode)
