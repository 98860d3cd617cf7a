"""Shortcut probes: the test split scored again with the lung region hidden, and with everything but it hidden.

A model that reads the lungs loses most of its skill when they are hidden and keeps much of it when only they
are shown; one that reads text markers, borders or the image's source does the opposite. The region is a fixed
box (params `external.probes.box`: x0, y0, x1, y1 as fractions of the square image; default 15-85% both
ways, where the lungs of a padded frontal radiograph lie), filled with the image's own mean gray level or a
constant (`external.probes.fill`).
"""
from __future__ import annotations

import logging

import numpy as np

from . import data, inference, metrics

log = logging.getLogger("probes")

PROBES = {"lungs_hidden": "inside", "lungs_only": "outside"}   # probe name -> which side of the box is filled


def box_slices(size: tuple[int, int], box: list[float]) -> tuple[slice, slice]:
    """Rows and columns of the box (fractions x0, y0, x1, y1) in an image of (height, width): from
    round(y0 * height) up to (not including) round(y1 * height), likewise for x."""
    h, w = size
    x0, y0, x1, y1 = box
    return slice(int(round(y0 * h)), int(round(y1 * h))), slice(int(round(x0 * w)), int(round(x1 * w)))


def occlude(images: np.ndarray, box: list[float], fill: str | int, side: str) -> np.ndarray:
    """A copy of uint8 images (N, H, W) with the pixels inside the box (`side="inside"`) or outside it
    (`"outside"`) replaced by `fill`: each image's own mean gray level (rounded, over the whole image) with
    "mean", else that gray level. Pixels on the other side are unchanged."""
    if side not in ("inside", "outside"):
        raise ValueError(f"side must be inside or outside, got {side!r}")
    images = np.asarray(images, dtype=np.uint8)
    rows, cols = box_slices(images.shape[1:3], box)
    inside = np.zeros(images.shape[1:3], dtype=bool)
    inside[rows, cols] = True
    region = inside if side == "inside" else ~inside
    if fill == "mean":
        level = np.round(images.reshape(len(images), -1).mean(axis=1)).astype(np.uint8)
    else:
        level = np.full(len(images), int(fill), dtype=np.uint8)
    out = images.copy()
    out[:, region] = level[:, None]
    return out


def scores(labels: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict:
    rep = metrics.report(labels, proba, classes)
    return {"accuracy": rep["accuracy"], "balanced_accuracy": rep["balanced_accuracy"], "macro_roc_auc": rep["macro"]["roc_auc"]}


def run(model, forward_fn, classes: list[str], cfg: dict) -> dict:
    """The probes (`cfg`: params `external.probes`) on the test split: accuracy, balanced accuracy and macro
    ROC-AUC of the unchanged images and of each probe, next to chance (balanced accuracy 1/k, AUC 0.5)."""
    test = data.load_splits(classes)["test"]

    def score(images: np.ndarray, name: str) -> dict:
        proba = inference.probabilities(model, images, forward_fn=forward_fn, desc=f"probe {name}").astype(np.float64)
        return scores(test.labels, proba, classes)

    out = {"n": len(test), "box": list(cfg["box"]), "fill": cfg["fill"],
           "chance": {"balanced_accuracy": round(1 / len(classes), 4), "macro_roc_auc": 0.5},
           "unchanged": score(test.images, "unchanged")}
    for name, side in PROBES.items():
        out[name] = score(occlude(test.images, cfg["box"], cfg["fill"], side), name)
    log.info("probes on %d test images (balanced accuracy; chance %.3f): unchanged %s, lungs hidden %s, lungs only %s",
             len(test), 1 / len(classes), out["unchanged"]["balanced_accuracy"], out["lungs_hidden"]["balanced_accuracy"],
             out["lungs_only"]["balanced_accuracy"])
    return out
