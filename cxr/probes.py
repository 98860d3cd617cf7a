"""Shortcut probes: the test split scored again with the lungs hidden, and with everything but the lungs hidden.

A model that reads the lungs loses most of its skill when they are hidden and keeps much of it when only they
are shown; one that reads text markers, borders or the image's source does the opposite. The lung region of
each image is its lung-field mask where the dataset ships one (the radiography archive's `masks/`, the demo's
`lungs/`), else a fixed box (params `external.probes.box`: x0, y0, x1, y1 as fractions of the square image;
default 15-85% both ways, where the lungs of a padded frontal radiograph lie). Hidden pixels are filled with
the image's own mean gray level or a constant (`external.probes.fill`).

Each probe reports `retained`: the share of the unchanged images' skill above chance that it keeps,
(AUC_probe - 0.5) / (AUC_unchanged - 0.5), for the macro and the positive class's ROC-AUC. With the lungs
hidden, a model that reads the lungs retains little; one that retains most of it relies on something else.
"""
from __future__ import annotations

import logging

import numpy as np

from . import data, inference, metrics

log = logging.getLogger("probes")

PROBES = {"lungs_hidden": "inside", "lungs_only": "outside"}   # probe name -> which side of the region is filled


def box_slices(size: tuple[int, int], box: list[float]) -> tuple[slice, slice]:
    """Rows and columns of the box (fractions x0, y0, x1, y1) in an image of (height, width): from
    round(y0 * height) up to (not including) round(y1 * height), likewise for x."""
    h, w = size
    x0, y0, x1, y1 = box
    return slice(int(round(y0 * h)), int(round(y1 * h))), slice(int(round(x0 * w)), int(round(x1 * w)))


def box_mask(size: tuple[int, int], box: list[float]) -> np.ndarray:
    """The box as a bool (height, width) mask."""
    inside = np.zeros(size, dtype=bool)
    inside[box_slices(size, box)] = True
    return inside


def lung_regions(shape: tuple[int, int, int], box: list[float], lungs: np.ndarray | None = None
                 ) -> tuple[np.ndarray, dict[str, int]]:
    """The lung region of each of `shape` = (N, H, W) images, bool (N, H, W): its lung mask where `lungs` has
    a non-empty one, else the box; and how many images got each ({"lung_mask": a, "box": b})."""
    n, h, w = shape
    regions = np.broadcast_to(box_mask((h, w), box), (n, h, w)).copy()
    lungs = None if lungs is None else np.asarray(lungs, bool)   # read once (a split's lungs are data.Rows)
    has = np.zeros(n, dtype=bool) if lungs is None else lungs.reshape(n, -1).any(axis=1)
    if has.any():
        regions[has] = lungs[has]
    return regions, {"lung_mask": int(has.sum()), "box": int(n - has.sum())}


def occlude(images: np.ndarray, region: np.ndarray, fill: str | int, side: str) -> np.ndarray:
    """A copy of uint8 images (N, H, W) with the pixels inside the region (`side="inside"`) or outside it
    (`"outside"`) replaced by `fill`: each image's own mean gray level (rounded, over the whole image) with
    "mean", else that gray level. `region`: bool, one (H, W) mask for all images or one per image (N, H, W).
    Pixels on the other side are unchanged."""
    if side not in ("inside", "outside"):
        raise ValueError(f"side must be inside or outside, got {side!r}")
    images = np.asarray(images, dtype=np.uint8)
    region = np.broadcast_to(np.asarray(region, dtype=bool), images.shape)
    filled = region if side == "inside" else ~region
    if fill == "mean":
        level = np.round(images.reshape(len(images), -1).mean(axis=1)).astype(np.uint8)
    else:
        level = np.full(len(images), int(fill), dtype=np.uint8)
    return np.where(filled, level[:, None, None], images)


def scores(labels: np.ndarray, proba: np.ndarray, classes: list[str], positive: str) -> dict:
    rep = metrics.report(labels, proba, classes)
    return {**metrics.headline(rep), "positive_roc_auc": rep[metrics.class_key(positive)]["roc_auc"]}


def retained(probe: float | None, unchanged: float | None) -> float | None:
    """The share of the skill above chance (ROC-AUC 0.5) a probe keeps, (probe - 0.5) / (unchanged - 0.5);
    None when either is undefined or the unchanged images are at chance or below."""
    if probe is None or unchanged is None or unchanged <= 0.5:
        return None
    return round((probe - 0.5) / (unchanged - 0.5), 4)


def run(model, forward_fn, classes: list[str], positive: str, cfg: dict) -> dict:
    """The probes (`cfg`: params `external.probes`) on the test split: accuracy, balanced accuracy, macro and
    positive-class ROC-AUC of the unchanged images and of each probe, each probe's retained skill, next to
    chance (balanced accuracy 1/k, AUC 0.5), and which lung region each image had."""
    test = data.load_splits(classes, only=("test",))["test"]
    images = np.asarray(test.images)   # every probe changes every image: read the split once
    regions, region_counts = lung_regions(images.shape, cfg["box"], test.lungs)

    def score(images: np.ndarray, name: str) -> dict:
        proba = inference.probabilities(model, images, forward_fn=forward_fn, desc=f"probe {name}").astype(np.float64)
        return scores(test.labels, proba, classes, positive)

    out = {"n": len(test), "positive": positive, "region": region_counts, "box": list(cfg["box"]), "fill": cfg["fill"],
           "chance": {"balanced_accuracy": round(1 / len(classes), 4), "macro_roc_auc": 0.5},
           "unchanged": score(images, "unchanged")}
    for name, side in PROBES.items():
        out[name] = score(occlude(images, regions, cfg["fill"], side), name)
        out[name]["retained"] = {k: retained(out[name][f"{k}_roc_auc"], out["unchanged"][f"{k}_roc_auc"])
                                 for k in ("macro", "positive")}
    log.info("probes on %d test images (lung region: %s), macro ROC-AUC (chance 0.5): unchanged %s, lungs hidden %s "
             "(retains %s), lungs only %s (retains %s)", len(test), region_counts, out["unchanged"]["macro_roc_auc"],
             out["lungs_hidden"]["macro_roc_auc"], out["lungs_hidden"]["retained"]["macro"],
             out["lungs_only"]["macro_roc_auc"], out["lungs_only"]["retained"]["macro"])
    return out
