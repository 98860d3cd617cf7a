"""The evaluate stage: clinical metrics, the triage operating point, the test predictions and plot data.

Metrics come with bootstrap CIs; the operating point is chosen on validation and saved beside each model
(modelinfo); the predictions table is inference.prediction_table's; plot data is for `dvc plots`."""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np

from . import atomic, data, inference, metrics, modelinfo, paths
from .errors import UserError

log = logging.getLogger("evaluate")


def _decision_point(y_pos: np.ndarray, called: np.ndarray) -> dict:
    """Operating point of an arbitrary yes/no decision (argmax), via the same function as thresholds."""
    op = metrics.operating_point(y_pos, called.astype(float), 0.5)
    op.pop("threshold")
    return op


def choose_threshold(y_pos: np.ndarray, score: np.ndarray, by: str, target: float, rule: str = "validation") -> float:
    """The triage threshold on validation. rule `validation`: the highest one whose sensitivity on these cases
    reaches `target` (by sensitivity), or the lowest one whose specificity does (by specificity). rule
    `conformal`: the same, but reaching `target` on average on new cases (metrics.conformal_threshold), which
    leaves one or two validation cases more on the safe side; with too few cases for that, a warning and the
    strictest threshold that still misses none of them."""
    if rule == "conformal":
        pick = metrics.conformal_threshold(y_pos, score, by, target)
        if not pick.reachable:
            kind = "positive" if by == "sensitivity" else "negative"
            warnings.warn(f"the validation split has {pick.cases} {kind} cases: {by} {target:g} on new cases needs at least "
                          f"{metrics.conformal_minimum(target)}; the triage threshold misses none of them "
                          f"({by} {1 - 1 / (pick.cases + 1):.3f} on average on new cases)")
        return pick.threshold
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
        threshold = choose_threshold(val_y, proba["val"][:, pos], op["by"], op["target"], op["rule"])
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
                     "val": {"roc_auc": val[pkey]["roc_auc"], **fixed_rates(labels["val"], proba["val"], pos, cfg)},
                     "test": {"roc_auc": test[pkey]["roc_auc"], **fixed_rates(labels["test"], proba["test"], pos, cfg)}},
        "triage": {
            "class": positive,
            "by": op["by"],
            "target": op["target"],
            "rule": op["rule"],
            "threshold": round(threshold, 6),
            # the `by` rate this threshold reaches on average on new cases like the validation ones (conformal)
            "expected": {op["by"]: metrics.new_case_rate(val_y, proba["val"][:, pos], threshold, op["by"])},
            "val": metrics.operating_point(val_y, proba["val"][:, pos], threshold),
            "test": metrics.operating_point(test_y, proba["test"][:, pos], threshold),
            "test_argmax": _decision_point(test_y, proba["test"].argmax(axis=1) == pos),
        },
    }
    return out, threshold


def prediction_table(subset: data.Subset, proba: np.ndarray, classes: list[str], operating_point: dict):
    """One row per test image: file, label, then predict's columns (argmax_class, argmax_p, p_<class>...,
    positive_p, triage, triage_rule) at the saved operating point: inference.prediction_table keyed by `file`,
    with the true label added, the always empty `error` column left out and probabilities rounded to 6 decimals."""
    table = inference.prediction_table(subset.files, proba, classes, operating_point, key="file")
    table.insert(1, "label", [classes[i] for i in subset.labels])
    for c in ["argmax_p", *[f"p_{c}" for c in classes], "positive_p"]:
        table[c] = table[c].astype(np.float64).round(6)
    return table.drop(columns="error")


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


def calibration_bins(y: np.ndarray, score: np.ndarray, n_bins: int = 10) -> list[dict]:
    """Reliability diagram data for one class: per non-empty bin of equal width, the mean predicted
    probability, the observed frequency (sklearn.calibration.calibration_curve) and how many images fell in it."""
    from sklearn.calibration import calibration_curve

    prob_true, prob_pred = calibration_curve(y, score, n_bins=n_bins, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], score), minlength=n_bins)
    counts = counts[counts > 0]   # calibration_curve leaves out the empty bins
    return [{"prob_pred": round(float(p), 5), "prob_true": round(float(t), 5), "count": int(c)}
            for p, t, c in zip(prob_pred, prob_true, counts)]


def write_plots(live, proba: np.ndarray, labels: np.ndarray, classes: list[str], positive: str, ece_bins: int = 10) -> None:
    """Plot data read by the top-level `plots:` in dvc.yaml: the confusion matrix through dvclive's
    `log_sklearn_plot`; the positive class's calibration with each bin's image count; ROC and precision-recall
    per class; recall per class."""
    names = np.array(classes)
    live.log_sklearn_plot("confusion_matrix", names[labels].tolist(), names[proba.argmax(axis=1)].tolist(), name="confusion_matrix.json")
    pos = classes.index(positive)
    y = (labels == pos).astype(int)
    out = Path(live.plots_dir)
    if 0 < y.sum() < len(y):
        atomic.write_json(out / "calibration.json",
                          [{"class": positive, **b} for b in calibration_bins(y, proba[:, pos], ece_bins)])
    roc, pr = curves(proba, labels, classes)
    atomic.write_json(out / "roc.json", roc)
    atomic.write_json(out / "precision_recall.json", pr)
    recall = [{"class": c, "recall": float(((proba.argmax(axis=1) == k) & (labels == k)).sum() / max(1, (labels == k).sum()))}
              for k, c in enumerate(classes)]
    atomic.write_json(out / "recall.json", recall)


def headline(result: dict) -> dict:
    """The figures a reviewer compares (metrics/evaluate/<model>.json, what `dvc metrics diff` and `dvc exp show`
    list), with short keys that are the same on every dataset: `pos` is the dataset's positive class, whatever
    it is called. val and test: balanced accuracy, macro ROC-AUC, the positive class's ROC-AUC, its sensitivity
    and specificity at the triage threshold (`sens`, `spec`), sensitivity at specificity 0.95 / 0.98
    (`sens_spec95`, ...) and specificity at sensitivity 0.95 (`spec_sens95`) as `evaluate` lists them; test
    also ECE. The full report (per class, CIs, PPV/NPV, confusion) is reports/evaluate/<model>.json."""
    def figures(split: str) -> dict:
        rep, pos, triage = result[split], result["positive"][split], result["triage"][split]
        out = {"bal_acc": rep["balanced_accuracy"], "auc": rep["macro"]["roc_auc"], "pos_auc": pos["roc_auc"],
               "sens": triage["sensitivity"], "spec": triage["specificity"]}
        out.update({k.replace("_at_", "_"): v for k, v in pos.items() if k not in ("ci", "roc_auc")})
        return out

    head = {"threshold": result["triage"]["threshold"], "val": figures("val"), "test": figures("test")}
    head["test"]["ece"] = result["test"]["ece"]
    return head


def run(classes: list[str], positive: str, cfg: dict, models_to_evaluate: dict[str, Path] | None = None) -> dict[str, dict]:
    """The evaluate stage (`cfg`: params `evaluate`): each model on the val and test splits -> its headline
    figures in metrics/evaluate/<name>.json, the full report in reports/evaluate/<name>.json,
    plots/evaluate/<name>/, its operating point sidecar, and for the fine-tuned model
    reports/test_predictions.csv. Returns the full reports by model name."""
    from dvclive import Live

    from . import models

    t0 = time.perf_counter()
    splits = data.load_splits(classes, only=("val", "test"), masks=False)
    labels = {s: splits[s].labels for s in ("val", "test")}
    results = {}
    for name, path in (models_to_evaluate or {"baseline": paths.BASELINE, "finetuned": paths.FINETUNED}).items():
        info = modelinfo.read_info(path)
        if info["classes"] != classes:
            raise UserError(f"{path} was trained on classes {info['classes']}, the data has {classes}: rerun `dvc repro`")
        model = models.load(path)
        run_model = inference.forward(model)
        proba = {s: inference.probabilities(model, splits[s].images, forward_fn=run_model, desc=f"{name} on {s}").astype(np.float64)
                 for s in ("val", "test")}
        result, threshold = evaluate(proba, labels, classes, positive, cfg)
        # Headline figures are metrics (what `dvc metrics diff` shows); everything else goes to the report.
        # The fine-tuned model's keys are bare (test.auc); the others' carry the model's name (baseline.test.auc),
        # so every key is unique and `dvc exp show` can name its column by the key alone.
        head = headline(result)
        atomic.write_json(paths.METRICS / "evaluate" / f"{name}.json", head if name == "finetuned" else {name: head})
        atomic.write_json(paths.REPORTS / "evaluate" / f"{name}.json", result)
        op = cfg["operating_point"]
        modelinfo.write_operating_point(path, positive, threshold, op["by"], op["target"], op["rule"])
        if name == "finetuned":  # at the operating point as predict reads it back, so both tables agree
            saved = modelinfo.read_operating_point(path, classes)
            atomic.write_csv(paths.TEST_PREDICTIONS, prediction_table(splits["test"], proba["test"], classes, saved))
        live = Live(dir=str(paths.PLOTS / "evaluate" / name), dvcyaml=False, save_dvc_exp=False, report=None)
        write_plots(live, proba["test"], labels["test"], classes, positive, cfg["ece_bins"])
        t = result["triage"]
        log.info("%s: test balanced accuracy %.3f, macro ROC-AUC %s; %s sensitivity/specificity %s/%s at argmax, %s/%s at threshold %.4f; "
                 "val/test %s", name, result["test"]["balanced_accuracy"], result["test"]["macro"]["roc_auc"], positive,
                 t["test_argmax"]["sensitivity"], t["test_argmax"]["specificity"], t["test"]["sensitivity"], t["test"]["specificity"], threshold,
                 {k: (result["positive"]["val"][k], result["positive"]["test"][k]) for k in result["positive"]["test"] if k != "ci"})
        results[name] = result
    log.info("done in %.1fs", time.perf_counter() - t0)
    return results
