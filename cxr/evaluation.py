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
    return model.predict(data.batches(images, None, batch_size, cache=False), verbose=0).astype(np.float64)


def _decision_point(y_pos: np.ndarray, called: np.ndarray) -> dict:
    """Operating point of an arbitrary yes/no decision (argmax), via the same function as thresholds."""
    op = metrics.operating_point(y_pos, called.astype(float), 0.5)
    op.pop("threshold")
    return op


def choose_threshold(y_pos: np.ndarray, score: np.ndarray, by: str, target: float) -> float:
    """The triage threshold on validation: the highest one whose sensitivity reaches `target` (by sensitivity),
    or the lowest one whose specificity does (by specificity)."""
    if by == "sensitivity":
        return metrics.threshold_for_sensitivity(y_pos, score, target)
    return metrics.threshold_for_specificity(np.asarray(score)[~np.asarray(y_pos, bool)], target)


def fixed_rates(labels: np.ndarray, proba: np.ndarray, pos: int, cfg: dict) -> dict:
    """Sensitivity of the positive class at each `evaluate.sensitivity_at_specificity` and specificity at each
    `evaluate.specificity_at_sensitivity`, read off this split's ROC curve, with bootstrap intervals."""
    stats = metrics.fixed_rate_statistics(pos, cfg["sensitivity_at_specificity"], cfg["specificity_at_sensitivity"])
    out = {name: metrics._clean(stat(labels, proba)) for name, stat in stats.items()}
    boot = cfg["bootstrap"]
    if boot["resamples"] and len(labels):
        out["ci"] = metrics.bootstrap_ci(labels, proba, stats, resamples=boot["resamples"], seed=boot["seed"], level=boot["level"])
    return out


def evaluate(proba: dict[str, np.ndarray], labels: dict[str, np.ndarray], classes: list[str], positive: str, cfg: dict) -> tuple[dict, float]:
    """Metrics for one model from its val and test probabilities. Returns (metrics dict, triage threshold)."""
    pos = classes.index(positive)
    pkey = metrics.class_key(positive)
    val_y, test_y = labels["val"] == pos, labels["test"] == pos
    op = cfg["operating_point"]
    try:
        threshold = choose_threshold(val_y, proba["val"][:, pos], op["by"], op["target"])
    except ValueError:
        warnings.warn(f"the validation split lacks {positive} cases or other cases: triage threshold falls back to 0.5")
        threshold = 0.5
    test = metrics.report(labels["test"], proba["test"], classes, ece_bins=cfg["ece_bins"])
    boot = cfg["bootstrap"]
    if boot["resamples"] and len(test_y):
        ci = metrics.bootstrap_ci(labels["test"], proba["test"], metrics.standard_statistics(pos),
                                  resamples=boot["resamples"], seed=boot["seed"], level=boot["level"])
        triage_ci = metrics.bootstrap_ci(labels["test"], proba["test"], metrics.standard_statistics(pos, threshold),
                                         resamples=boot["resamples"], seed=boot["seed"], level=boot["level"])
        test["ci"] = {"accuracy": ci["accuracy"], "balanced_accuracy": ci["balanced_accuracy"], "macro_roc_auc": ci["macro_roc_auc"],
                      f"{pkey}_sensitivity": ci["sensitivity"], f"{pkey}_specificity": ci["specificity"],
                      f"triage_{pkey}_sensitivity": triage_ci["sensitivity"], f"triage_{pkey}_specificity": triage_ci["specificity"]}
    val = metrics.report(labels["val"], proba["val"], classes, ece_bins=cfg["ece_bins"])
    out = {
        "test": test,
        "val": {"accuracy": val["accuracy"], "balanced_accuracy": val["balanced_accuracy"],
                "macro": {"roc_auc": val["macro"]["roc_auc"]}, "n": val["n"]},
        # The positive class under a dataset-independent key, so experiments on either dataset line up.
        "positive": {"class": positive,
                     "val": fixed_rates(labels["val"], proba["val"], pos, cfg),
                     "test": fixed_rates(labels["test"], proba["test"], pos, cfg)},
        "triage": {
            "class": positive,
            "by": op["by"],
            "target": op["target"],
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
