"""Image decoding: one function turns any file the pipeline meets into the pixels every model sees.

Convention: 8-bit grayscale (0 = black, 255 = white), square `size` x `size`, EXIF orientation applied.
`clean` stores these pixels; `predict` calls the same function, so training and prediction cannot disagree.
"""
from __future__ import annotations

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


def decode(path: str | Path, size: int, mode: str = "pad", max_pixels: int = 60_000_000) -> np.ndarray:
    """Decode an image file to uint8 (size, size) grayscale. Raises DecodeError with a drop reason."""
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
                w, h = img.size
                if w * h > max_pixels:
                    raise DecodeError("decompression_bomb", f"{w}x{h} pixels exceeds clean.max_pixels={max_pixels}")
                img = ImageOps.exif_transpose(img)
                img.load()
                gray = _to_gray(img)
        except DecodeError:
            raise
        except UnidentifiedImageError:
            raise DecodeError("not_an_image", "Pillow cannot identify the file as an image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise DecodeError("decompression_bomb", f"over clean.max_pixels={max_pixels}: {str(err).split(',')[0]}") from None
        except (OSError, ValueError, SyntaxError) as err:
            raise DecodeError("unreadable", str(err) or type(err).__name__) from None
    if gray.size == 0:
        raise DecodeError("unreadable", "image has no pixels")
    return square(gray, size, mode)
