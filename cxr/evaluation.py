"""The evaluate stage's logic: clinical metrics with bootstrap CIs, the triage operating point chosen on
validation, and plot data for `dvc plots`."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from . import atomic, data, metrics

log = logging.getLogger("evaluate")


def predict_proba(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Class probabilities for uint8 (N, S, S) images, through the same tf.data path as training."""
    if len(images) == 0:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    return model.predict(data.dataset(images, None, batch_size, cache=False), verbose=0).astype(np.float64)


def _decision_point(y_pos: np.ndarray, called: np.ndarray) -> dict:
    """Operating point of an arbitrary yes/no decision (argmax), via the same function as thresholds."""
    op = metrics.operating_point(y_pos, called.astype(float), 0.5)
    op.pop("threshold")
    return op


def evaluate(proba: dict[str, np.ndarray], labels: dict[str, np.ndarray], classes: list[str], positive: str, cfg: dict) -> tuple[dict, float]:
    """Metrics for one model from its val and test probabilities. Returns (metrics dict, triage threshold)."""
    pos = classes.index(positive)
    pkey = metrics.class_key(positive)
    val_y, test_y = labels["val"] == pos, labels["test"] == pos
    try:
        threshold = metrics.threshold_for_sensitivity(val_y, proba["val"][:, pos], cfg["target_sensitivity"])
    except ValueError:
        warnings.warn(f"no {positive} case in the validation split: triage threshold falls back to 0.5")
        threshold = 0.5
    test = metrics.report(labels["test"], proba["test"], classes, ece_bins=cfg["ece_bins"])
    boot = cfg["bootstrap"]
    if boot["resamples"] and len(test_y):
        ci = metrics.bootstrap_ci(labels["test"], proba["test"], metrics.standard_statistics(pos),
                                  resamples=boot["resamples"], seed=boot["seed"], level=boot["level"])
        triage_ci = metrics.bootstrap_ci(labels["test"], proba["test"], metrics.standard_statistics(pos, threshold),
                                         resamples=boot["resamples"], seed=boot["seed"], level=boot["level"])
        test["ci"] = {"accuracy": ci["accuracy"], "macro_roc_auc": ci["macro_roc_auc"],
                      f"{pkey}_sensitivity": ci["sensitivity"], f"{pkey}_specificity": ci["specificity"],
                      f"triage_{pkey}_sensitivity": triage_ci["sensitivity"], f"triage_{pkey}_specificity": triage_ci["specificity"]}
    val = metrics.report(labels["val"], proba["val"], classes, ece_bins=cfg["ece_bins"])
    out = {
        "test": test,
        "val": {"accuracy": val["accuracy"], "macro": {"roc_auc": val["macro"]["roc_auc"]}, "n": val["n"]},
        "triage": {
            "class": positive,
            "target_sensitivity": cfg["target_sensitivity"],
            "threshold": round(threshold, 6),
            "val": metrics.operating_point(val_y, proba["val"][:, pos], threshold),
            "test": metrics.operating_point(test_y, proba["test"][:, pos], threshold),
            "test_argmax": _decision_point(test_y, proba["test"].argmax(axis=1) == pos),
        },
    }
    return out, threshold


def prediction_table(subset: data.Subset, proba: np.ndarray, classes: list[str], positive: str, threshold: float):
    """One row per image: file, label, prediction, p_<class>..., triage decision at the threshold."""
    import pandas as pd

    from .predict import triage_labels

    table = pd.DataFrame({"file": subset.files, "label": [classes[i] for i in subset.labels],
                          "prediction": [classes[i] for i in proba.argmax(axis=1)]})
    for k, c in enumerate(classes):
        table[f"p_{c}"] = proba[:, k].round(6)
    table["triage"] = np.where(proba[:, classes.index(positive)] >= threshold, *triage_labels(positive))
    return table


def curves(proba: np.ndarray, labels: np.ndarray, classes: list[str]) -> tuple[list[dict], list[dict]]:
    """One-vs-rest ROC and precision-recall points (sklearn.metrics) for every class present, in long
    format with a `class` field, so one chart shows all classes (template .dvc/plots/by_class.json)."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    roc, pr = [], []
    for k, c in enumerate(classes):
        y = (labels == k).astype(int)
        if not 0 < y.sum() < len(y):
            continue
        fpr, tpr, _ = roc_curve(y, proba[:, k])
        roc += [{"class": c, "point": i, "fpr": round(float(a), 5), "tpr": round(float(b), 5)} for i, (a, b) in enumerate(zip(fpr, tpr))]
        prec, rec, _ = precision_recall_curve(y, proba[:, k])
        pr += [{"class": c, "point": i, "recall": round(float(a), 5), "precision": round(float(b), 5)} for i, (a, b) in enumerate(zip(rec, prec))]
    return roc, pr


def write_plots(live, proba: np.ndarray, labels: np.ndarray, classes: list[str], positive: str) -> None:
    """Plot data read by the top-level `plots:` in dvc.yaml: confusion matrix and calibration of the
    positive class through dvclive's `log_sklearn_plot`; ROC and precision-recall per class; recall per class."""
    names = np.array(classes)
    live.log_sklearn_plot("confusion_matrix", names[labels].tolist(), names[proba.argmax(axis=1)].tolist(), name="confusion_matrix.json")
    pos = classes.index(positive)
    y = (labels == pos).astype(int)
    if 0 < y.sum() < len(y):
        live.log_sklearn_plot("calibration", y, proba[:, pos], name="calibration.json", n_bins=10)
    roc, pr = curves(proba, labels, classes)
    out = Path(live.plots_dir)
    atomic.write_json(out / "roc.json", roc)
    atomic.write_json(out / "precision_recall.json", pr)
    recall = [{"class": c, "recall": float(((proba.argmax(axis=1) == k) & (labels == k)).sum() / max(1, (labels == k).sum()))}
              for k, c in enumerate(classes)]
    atomic.write_json(out / "recall.json", recall)
