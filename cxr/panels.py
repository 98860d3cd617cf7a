"""Grad-CAM pictures: the one overlay renderer (image + heatmap -> titled RGB array) and the per-class panels.

`render` draws one image with its heatmap for both consumers: `python -m cxr predict --gradcam` writes it as
one PNG per file, and the gradcam stage lays several side by side (`figure`) under a panel title.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import atomic

MIN_SIDE = 256   # rendered overlays are upscaled to at least this many pixels across
GAP = 8          # pixels between the images of a panel


def pick(labels: np.ndarray, proba: np.ndarray, k: int, n: int) -> list[int]:
    """Up to n test images of true class k: misclassified ones first (at most half, the most confident
    errors), then the most confident correct ones."""
    idx = np.flatnonzero(labels == k)
    pred = proba[idx].argmax(axis=1)
    wrong = idx[pred != k][np.argsort(-proba[idx[pred != k]].max(axis=1), kind="stable")]
    right = idx[pred == k][np.argsort(-proba[idx[pred == k], k], kind="stable")]
    n_wrong = min(len(wrong), n // 2 if len(right) >= n - n // 2 else n - len(right))
    return [int(i) for i in list(wrong[:n_wrong]) + list(right[: n - n_wrong])]


OUTLINE = (0, 255, 0)   # the known lesion's outline (demo), drawn over the heatmap


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4, outline: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 at the image's size: the grayscale X-ray with the map (in [0, 1]) in a 'jet' colour scale on
    top, and the border of `outline` (a bool mask, e.g. the known lesion) in green."""
    from matplotlib import colormaps

    rgb = np.repeat(image[..., None].astype(np.float32) / 255.0, 3, axis=-1)
    heat = colormaps["jet"](cam)[..., :3]
    out = (np.clip((1 - alpha) * rgb + alpha * heat, 0, 1) * 255).astype(np.uint8)
    if outline is not None and outline.any():
        from scipy.ndimage import binary_erosion

        out[outline & ~binary_erosion(outline)] = OUTLINE
    return out


def colorbar(height: int, width: int = 18) -> np.ndarray:
    """A vertical 'jet' scale (RGB uint8), the map's maximum (1) at the top and 0 at the bottom, labelled."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    ramp = colormaps["jet"](np.linspace(1, 0, height))[:, :3]
    strip = (np.repeat(ramp[:, None, :], width, axis=1) * 255).astype(np.uint8)
    font = _font(max(10, height // 20))
    canvas = Image.new("RGB", (width + 8 + 7 * max(10, height // 20), height), "white")
    canvas.paste(Image.fromarray(strip, "RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((width + 4, 0), "max", fill="black", font=font)
    draw.text((width + 4, height - max(10, height // 20) - 4), "0", fill="black", font=font)
    return np.asarray(canvas)


def _font(px: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def titled(rgb: np.ndarray, title: str, font_px: int | None = None) -> np.ndarray:
    """An RGB array under a white bar holding `title` (one or more lines; font_px high, default 1/20 of the
    width), widened with white where the title is wider, as an RGB uint8 array."""
    from PIL import Image, ImageDraw

    h, w = rgb.shape[:2]
    font = _font(font_px or max(12, w // 20))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, _, right, bottom = probe.multiline_textbbox((0, 0), title or "Ag", font=font)
    bar, width = bottom + 10, max(w, right + 10)
    canvas = Image.new("RGB", (width, h + bar), "white")
    canvas.paste(Image.fromarray(rgb, "RGB"), ((width - w) // 2, bar))
    ImageDraw.Draw(canvas).multiline_text((5, 5), title, fill="black", font=font)
    return np.asarray(canvas)


def render(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4, title: str = "", min_side: int = MIN_SIDE,
           outline: np.ndarray | None = None) -> np.ndarray:
    """uint8 (S, S) X-ray + Grad-CAM map in [0, 1] (S, S) -> RGB uint8 (H, W, 3): the overlay (with `outline`'s
    border, see overlay()), upscaled to at least min_side pixels across, under a title bar. A pure function:
    same inputs, same array."""
    from PIL import Image

    rgb = Image.fromarray(overlay(image, cam, alpha, outline), "RGB")
    side = max(min_side, rgb.width)
    if rgb.width != side:
        rgb = rgb.resize((side, side), Image.Resampling.BILINEAR)
    return titled(np.asarray(rgb), title)


def save_png(path: Path, rgb: np.ndarray) -> None:
    """An RGB array as a PNG file, written atomically."""
    from PIL import Image

    with atomic.atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(rgb, "RGB").save(tmp, format="PNG")


def figure(path: Path, images: np.ndarray, cams: np.ndarray, titles: list[str], suptitle: str, alpha: float,
           outlines: np.ndarray | None = None) -> None:
    """One row of rendered X-ray + heatmap overlays (with each `outlines` mask's border where given) and the
    heatmap's colour scale, under the panel's title, saved atomically as PNG."""
    masks = outlines if outlines is not None else [None] * len(images)
    tiles = [render(img, cam, alpha, title, outline=m) for img, cam, title, m in zip(images, cams, titles, masks)]
    height = max((t.shape[0] for t in tiles), default=MIN_SIDE)
    bar = colorbar(min(t.shape[1] for t in tiles) if tiles else MIN_SIDE)
    width = sum(t.shape[1] for t in tiles) + GAP * len(tiles) + bar.shape[1]
    row = np.full((height, width, 3), 255, np.uint8)
    x = 0
    for t in tiles:
        row[: t.shape[0], x : x + t.shape[1]] = t
        x += t.shape[1] + GAP
    row[height - bar.shape[0] :, x : x + bar.shape[1]] = bar
    save_png(path, titled(row, suptitle, font_px=MIN_SIDE // 14))
