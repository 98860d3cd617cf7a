"""Classification metrics: per-class reports, operating points, calibration, selection scores and bootstrap CIs.

Every public function takes numpy arrays and returns JSON-ready values:
plain Python ints/floats, and ``None`` (never NaN/inf) where a metric is undefined.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Callable, NamedTuple

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

Statistic = Callable[[np.ndarray, np.ndarray], "float | None"]


# --------------------------------------------------------------------------- helpers

def class_key(name: str) -> str:
    """JSON/DVC-friendly key: "Viral Pneumonia" -> "viral_pneumonia", "COVID-19" -> "covid_19"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _clean(x, digits: int | None = 4) -> float | None:
    """Plain float rounded to ``digits``; None for None/NaN/inf."""
    if x is None or not math.isfinite(float(x)):
        return None
    return round(float(x), digits) if digits is not None else float(x)


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def _nan_average(values: np.ndarray, weights: np.ndarray | None = None) -> float:
    """(Weighted) mean over the finite entries; NaN if there are none."""
    ok = np.isfinite(values)
    if weights is not None:
        ok &= weights > 0
    if not ok.any():
        return math.nan
    return float(np.average(values[ok], weights=None if weights is None else weights[ok]))


def _per_class(y_true: np.ndarray, proba: np.ndarray, score_fn) -> np.ndarray:
    """One-vs-rest ``score_fn(is_k, proba[:, k])`` per class; NaN where the class has no positives or no negatives."""
    out = np.full(proba.shape[1], math.nan)
    for k in range(proba.shape[1]):
        is_k = y_true == k
        if 0 < is_k.sum() < len(y_true):
            out[k] = score_fn(is_k, proba[:, k])
    return out


def _roc_auc_average(y_true: np.ndarray, proba: np.ndarray, average: str) -> float:
    """sklearn's binary / one-vs-rest AUC when every class occurs, else the average over classes where defined."""
    k = proba.shape[1]
    support = np.bincount(y_true, minlength=k)
    if (support > 0).all():
        if k == 2:
            return float(roc_auc_score(y_true, proba[:, 1]))
        return float(roc_auc_score(y_true, proba, multi_class="ovr", average=average, labels=range(k)))
    per_class_auc = _per_class(y_true, proba, roc_auc_score)
    return _nan_average(per_class_auc, support if average == "weighted" else None)


def _fast_macro_roc_auc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Same value as report()'s macro roc_auc via Mann-Whitney ranks; sklearn costs ~8 ms a call, too slow to bootstrap."""
    k = proba.shape[1]
    cols = [1] if k == 2 else range(k)  # binary: the plain AUC of P(class 1)
    ranks = rankdata(proba[:, cols], axis=0)  # average ranks for ties == sklearn's trapezoids
    aucs = []
    for j, c in enumerate(cols):
        is_c = y_true == c
        n_pos = int(is_c.sum())
        n_neg = len(y_true) - n_pos
        if n_pos and n_neg:
            aucs.append((ranks[is_c, j].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs)) if aucs else math.nan


# --------------------------------------------------------------------------- calibration

def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE with ``bins`` equal-width confidence bins (lo, hi]."""
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(float)
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    gap = np.bincount(idx, weights=correct, minlength=bins) - np.bincount(idx, weights=conf, minlength=bins)
    return float(np.abs(gap).sum() / len(y_true))


def brier_score(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Multi-class Brier: mean over samples of sum_k (p_k - onehot_k)^2 (range 0..2)."""
    onehot = np.eye(proba.shape[1])[y_true]
    return float(((proba - onehot) ** 2).sum(axis=1).mean())


# --------------------------------------------------------------------------- report

def _warn_undefined(class_names: list[str], support: np.ndarray) -> None:
    n = support.sum()
    for name, s in zip(class_names, support):
        if s == 0:
            warnings.warn(f"class {name!r} is absent from y_true: its sensitivity, roc_auc and pr_auc are None",
                          UserWarning, stacklevel=3)
        elif s == n:
            warnings.warn(f"every sample is class {name!r}: its specificity and roc_auc are None",
                          UserWarning, stacklevel=3)


def report(y_true: np.ndarray, proba: np.ndarray, class_names: list[str], *, ece_bins: int = 10) -> dict:
    """Full metrics dict (overall, macro/weighted, per class, confusion) for argmax predictions."""
    y_true = np.asarray(y_true, dtype=int)
    proba = np.asarray(proba, dtype=float)
    # a float32 softmax sums to 1 within ~1e-7, beyond sklearn's float64 tolerance (it warns "y_prob values do
    # not sum to one"); renormalising in float64 changes no figure beyond that noise
    proba = proba / np.where(proba.sum(axis=1, keepdims=True) > 0, proba.sum(axis=1, keepdims=True), 1.0)
    n, k = proba.shape
    if len(y_true) != n or len(class_names) != k:
        raise ValueError(f"shape mismatch: y_true {y_true.shape}, proba {proba.shape}, {len(class_names)} class names")
    keys = [class_key(c) for c in class_names]
    labels = list(range(k))
    pred = proba.argmax(axis=1)

    cm = confusion_matrix(y_true, pred, labels=labels)
    support = cm.sum(axis=1)
    _warn_undefined(class_names, support)
    with warnings.catch_warnings():  # undefined values become NaN -> None; we warned above
        warnings.simplefilter("ignore")
        prec, rec, f1, _ = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=np.nan)
        bal_acc = balanced_accuracy_score(y_true, pred)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    tn = n - support - fp
    spec = np.array([_ratio(tn[i], tn[i] + fp[i]) for i in labels])
    roc = _per_class(y_true, proba, roc_auc_score)
    pr = _per_class(y_true, proba, average_precision_score)

    def averaged(average: str) -> dict:
        w = support if average == "weighted" else None
        return {
            "precision": _clean(_nan_average(prec, w)),
            "recall": _clean(_nan_average(rec, w)),
            "f1": _clean(_nan_average(f1, w)),
            "roc_auc": _clean(_roc_auc_average(y_true, proba, average)),
            "pr_auc": _clean(_nan_average(pr, w)),
        }

    out = {
        "n": int(n),
        "accuracy": _clean(accuracy_score(y_true, pred)),
        "balanced_accuracy": _clean(bal_acc),
        "log_loss": _clean(log_loss(y_true, proba, labels=labels)),
        "brier": _clean(brier_score(y_true, proba)),
        "ece": _clean(expected_calibration_error(y_true, proba, ece_bins)),
        "macro": averaged("macro"),
        "weighted": averaged("weighted"),
    }
    for i, key in enumerate(keys):
        out[key] = {
            "precision": _clean(prec[i]),
            "sensitivity": _clean(rec[i]),
            "specificity": _clean(spec[i]),
            "f1": _clean(f1[i]),
            "support": int(support[i]),
            "roc_auc": _clean(roc[i]),
            "pr_auc": _clean(pr[i]),
        }
    out["confusion"] = {kt: {kp: int(cm[i, j]) for j, kp in enumerate(keys)} for i, kt in enumerate(keys)}
    return out


# --------------------------------------------------------------------------- operating points

def headline(rep: dict) -> dict:
    """The figures every summary leads with, from a report(): accuracy, balanced accuracy, macro ROC-AUC."""
    return {"accuracy": rep["accuracy"], "balanced_accuracy": rep["balanced_accuracy"],
            "macro_roc_auc": rep["macro"]["roc_auc"]}


def _threshold_with_wrong(cases: np.ndarray, by: str, m: int) -> float:
    """The threshold on the positive class's score that puts the m most extreme of these cases (the scores of
    one kind) on the wrong side, fewer where scores tie. By sensitivity (the positives' scores): the (m+1)-th
    lowest of them, so m lie below it and those tied at it are not below it. By specificity (the negatives'
    scores): just above the (m+1)-th highest, so only the m above it are called positive; -inf when m covers
    them all."""
    if by == "sensitivity":
        return float(np.sort(cases)[min(m, len(cases) - 1)])
    neg = np.sort(cases)[::-1]
    if m >= len(neg):
        return -math.inf
    return float(np.nextafter(neg[m], math.inf))


def threshold_for_sensitivity(y_pos: np.ndarray, score: np.ndarray, target: float) -> float:
    """Highest positive-class score t such that sensitivity of (score >= t) is >= target."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target sensitivity must be in [0, 1], got {target}")
    pos = np.asarray(score, dtype=float)[np.asarray(y_pos, dtype=bool)]
    if len(pos) == 0:
        raise ValueError("threshold_for_sensitivity: no positive samples, sensitivity is undefined")
    # calling the j+1 highest positive: sensitivity (j+1)/n; the fewest that reach target leave n-1-j below
    called = int(np.argmax(np.arange(1, len(pos) + 1) / len(pos) >= target)) + 1
    return _threshold_with_wrong(pos, "sensitivity", len(pos) - called)


def threshold_for_specificity(y_neg_score: np.ndarray, target: float) -> float:
    """Lowest threshold t (on the negatives' scores) such that specificity of (score >= t) is >= target:
    at most floor((1 - target) * n_negatives) negatives score >= t."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target specificity must be in [0, 1], got {target}")
    neg = np.asarray(y_neg_score, dtype=float)
    if len(neg) == 0:
        raise ValueError("threshold_for_specificity: no negative samples, specificity is undefined")
    return _threshold_with_wrong(neg, "specificity", int(math.floor((1.0 - target) * len(neg) + 1e-9)))


def conformal_allowance(n: int, target: float) -> int:
    """How many of n validation cases of one kind a threshold may put on the wrong side so that its rate
    (sensitivity for positives, specificity for negatives) still reaches `target` on average on new cases from
    the same source: m with (m + 1) / (n + 1) <= 1 - target (split-conformal; see new_case_rate). -1 when even
    m = 0 is too many: n is below target / (1 - target) (conformal_minimum)."""
    return int(math.floor((1.0 - target) * (n + 1) + 1e-9)) - 1


def conformal_minimum(target: float) -> int:
    """The fewest cases of one kind for which conformal_allowance(n, target) is not -1."""
    return math.ceil(target / (1.0 - target) - 1e-9)


class ConformalThreshold(NamedTuple):
    threshold: float
    cases: int        # validation cases of the kind `by` counts (positives or negatives)
    reachable: bool   # False: too few cases for the target; the threshold misses none of them


def conformal_threshold(y_pos: np.ndarray, score: np.ndarray, by: str, target: float) -> ConformalThreshold:
    """The threshold on the positive class's score whose `by` rate (sensitivity or specificity) reaches
    `target` on average on new cases, not just on these validation cases: by sensitivity, the highest one that
    misses at most conformal_allowance(n_positives) of them; by specificity, the lowest one that calls at most
    conformal_allowance(n_negatives) negatives. When there are too few cases for the target (allowance -1), the
    strictest threshold that misses none of them, not reachable."""
    y = np.asarray(y_pos, dtype=bool)
    score = np.asarray(score, dtype=float)
    cases = score[y] if by == "sensitivity" else score[~y]
    if len(cases) == 0:
        raise ValueError(f"conformal_threshold: no {'positive' if by == 'sensitivity' else 'negative'} samples, {by} is undefined")
    allowed = conformal_allowance(len(cases), target)
    return ConformalThreshold(_threshold_with_wrong(cases, by, max(allowed, 0)), len(cases), allowed >= 0)


def new_case_rate(y_pos: np.ndarray, score: np.ndarray, threshold: float, by: str) -> float | None:
    """The `by` rate (sensitivity or specificity) that `threshold`, chosen on these validation cases, reaches
    on average on a new case from the same source: 1 - (m + 1) / (n + 1), where m of the n validation cases of
    that kind fall on the wrong side. By exchangeability (split-conformal), a new case is equally likely to rank
    anywhere among the n + 1, so the expectation over validation draws is exact for untied scores and a lower
    bound otherwise. None without such cases."""
    y = np.asarray(y_pos, dtype=bool)
    score = np.asarray(score, dtype=float)
    wrong = (score[y] < threshold) if by == "sensitivity" else (score[~y] >= threshold)
    if len(wrong) == 0:
        return None
    return 1.0 - (int(wrong.sum()) + 1) / (len(wrong) + 1)


def sensitivity_at_specificity(y_pos: np.ndarray, score: np.ndarray, specificity: float) -> float | None:
    """Best sensitivity of any threshold whose specificity is >= `specificity` (a point read off the ROC curve)."""
    y = np.asarray(y_pos, dtype=bool)
    score = np.asarray(score, dtype=float)
    if y.all() or not y.any():
        return None
    t = threshold_for_specificity(score[~y], specificity)
    return float((score[y] >= t).mean())


def specificity_at_sensitivity(y_pos: np.ndarray, score: np.ndarray, sensitivity: float) -> float | None:
    """Best specificity of any threshold whose sensitivity is >= `sensitivity`."""
    y = np.asarray(y_pos, dtype=bool)
    score = np.asarray(score, dtype=float)
    if y.all() or not y.any():
        return None
    t = threshold_for_sensitivity(y, score, sensitivity)
    return float((score[~y] < t).mean())


def rate_key(kind: str, value: float) -> str:
    """Metric key of a fixed-rate reading: ("sens_at_spec", 0.95) -> "sens_at_spec95", 0.975 -> "sens_at_spec97_5"."""
    return f"{kind}{100 * value:.10g}".replace(".", "_")


def fixed_rate_statistics(positive: int, specificities: list[float], sensitivities: list[float]) -> dict[str, Statistic]:
    """Sensitivity of class `positive` at each fixed specificity, and specificity at each fixed sensitivity,
    as (labels, proba) statistics (for bootstrap_ci)."""
    def at_spec(s):
        return lambda y, p: sensitivity_at_specificity(y == positive, p[:, positive], s)

    def at_sens(s):
        return lambda y, p: specificity_at_sensitivity(y == positive, p[:, positive], s)

    return {**{rate_key("sens_at_spec", s): at_spec(s) for s in specificities},
            **{rate_key("spec_at_sens", s): at_sens(s) for s in sensitivities}}


def selection_scores(y_true: np.ndarray, proba: np.ndarray, positive: int, specificity: float,
                     class_weight: dict[int, float] | None = None) -> dict[str, float]:
    """What checkpoint selection can monitor on validation: loss (cross-entropy, weighted per class by
    `class_weight` when training used it, so selection and training optimise the same thing), accuracy,
    balanced accuracy, macro ROC-AUC, and sensitivity of class `positive` at the given specificity."""
    y_true = np.asarray(y_true, dtype=int)
    proba = np.asarray(proba, dtype=float)
    eps = 1e-7
    w = np.ones(len(y_true)) if class_weight is None else np.array([class_weight.get(int(c), 1.0) for c in y_true])
    nll = -np.log(np.clip(proba[np.arange(len(y_true)), y_true], eps, 1.0))
    loss = float((w * nll).sum() / w.sum())
    pred = proba.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bal = float(balanced_accuracy_score(y_true, pred))
    sens = sensitivity_at_specificity(y_true == positive, proba[:, positive], specificity)
    return {"loss": loss, "accuracy": float((pred == y_true).mean()), "balanced_accuracy": bal,
            "macro_roc_auc": _fast_macro_roc_auc(y_true, proba), "sensitivity_at_specificity": math.nan if sens is None else sens}


def operating_point(y_pos: np.ndarray, score: np.ndarray, threshold: float) -> dict:
    """Confusion counts and rates for the decision ``score >= threshold``."""
    y = np.asarray(y_pos, dtype=bool)
    called = np.asarray(score, dtype=float) >= threshold
    tp, fp = int((called & y).sum()), int((called & ~y).sum())
    fn, tn = int((~called & y).sum()), int((~called & ~y).sum())
    return {
        "threshold": float(threshold),
        "sensitivity": _clean(_ratio(tp, tp + fn)),
        "specificity": _clean(_ratio(tn, tn + fp)),
        "ppv": _clean(_ratio(tp, tp + fp)),
        "npv": _clean(_ratio(tn, tn + fn)),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


# --------------------------------------------------------------------------- bootstrap

def bootstrap_ci(y_true: np.ndarray, proba: np.ndarray, statistics: dict[str, Statistic], *,
                 resamples: int, seed: int, level: float = 0.95) -> dict:
    """Percentile-bootstrap CIs; resamples where a statistic is undefined are skipped for it."""
    y_true = np.asarray(y_true)
    proba = np.asarray(proba, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(y_true), size=(resamples, len(y_true)))
    values = {name: np.full(resamples, math.nan) for name in statistics}
    for r, ix in enumerate(idx):
        y, p = y_true[ix], proba[ix]
        for name, stat in statistics.items():
            v = stat(y, p)
            values[name][r] = math.nan if v is None else v
    tail = 100 * (1 - level) / 2
    out = {}
    for name, v in values.items():
        v = v[np.isfinite(v)]
        if len(v) < resamples / 2:
            out[name] = {"low": None, "high": None}
        else:
            low, high = np.percentile(v, [tail, 100 - tail])
            out[name] = {"low": _clean(low), "high": _clean(high)}
    return out


def positive_roc_auc(positive: int) -> Statistic:
    """ROC-AUC of class `positive`'s probability, that class against every other label (labels outside the
    model's classes, such as -1 for "not positive", count as other); None where either side is empty."""

    def auc(y, proba):
        score = np.asarray(proba, dtype=float)[:, positive]
        value = _fast_macro_roc_auc((np.asarray(y) == positive).astype(int), np.stack([1 - score, score], axis=1))
        return None if math.isnan(value) else value

    return auc


def standard_statistics(positive: int, threshold: float | None = None) -> dict[str, Statistic]:
    """accuracy, sensitivity/specificity of class ``positive`` (argmax, or score >= threshold), macro_roc_auc."""

    def decide(proba: np.ndarray) -> np.ndarray:
        if threshold is None:
            return proba.argmax(axis=1) == positive
        return proba[:, positive] >= threshold

    def sensitivity(y, proba):
        is_pos = y == positive
        return float(decide(proba)[is_pos].mean()) if is_pos.any() else None

    def specificity(y, proba):
        is_neg = y != positive
        return float((~decide(proba)[is_neg]).mean()) if is_neg.any() else None

    def balanced_accuracy(y, proba):
        pred = proba.argmax(axis=1)
        recalls = [(pred[y == k] == k).mean() for k in np.unique(y)]
        return float(np.mean(recalls))

    return {
        "accuracy": lambda y, proba: float((proba.argmax(axis=1) == y).mean()),
        "balanced_accuracy": balanced_accuracy,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "macro_roc_auc": _fast_macro_roc_auc,
    }
