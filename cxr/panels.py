"""Grad-CAM panels: which test images to show, and the PNG figure for each class."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import atomic, gradcam


def pick(labels: np.ndarray, proba: np.ndarray, k: int, n: int) -> list[int]:
    """Up to n test images of true class k: misclassified ones first (at most half, the most confident
    errors), then the most confident correct ones."""
    idx = np.flatnonzero(labels == k)
    pred = proba[idx].argmax(axis=1)
    wrong = idx[pred != k][np.argsort(-proba[idx[pred != k]].max(axis=1), kind="stable")]
    right = idx[pred == k][np.argsort(-proba[idx[pred == k], k], kind="stable")]
    n_wrong = min(len(wrong), n // 2 if len(right) >= n - n // 2 else n - len(right))
    return [int(i) for i in list(wrong[:n_wrong]) + list(right[: n - n_wrong])]


def figure(path: Path, images: np.ndarray, cams: np.ndarray, titles: list[str], suptitle: str, alpha: float) -> None:
    """One row of X-ray + heatmap overlays, saved atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(3.2 * max(n, 1), 3.8), squeeze=False, layout="constrained")
    for ax, img, cam, title in zip(axes[0], images, cams, titles):
        ax.imshow(gradcam.overlay(img, cam, alpha))
        ax.set_title(title, fontsize=9)
    for ax in axes[0]:
        ax.axis("off")
    fig.suptitle(suptitle, fontsize=11)
    with atomic.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
