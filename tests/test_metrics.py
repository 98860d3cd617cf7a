import json
import math
import time
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr.metrics import (
    bootstrap_ci,
    brier_score,
    class_key,
    expected_calibration_error,
    operating_point,
    report,
    standard_statistics,
    threshold_for_sensitivity,
)

NAMES3 = ["COVID", "Normal", "Viral Pneumonia"]


def one_hot_proba(pred, k, hi=0.6):
    """Rows with `hi` on the predicted class and the rest split evenly."""
    p = np.full((len(pred), k), (1 - hi) / (k - 1))
    p[np.arange(len(pred)), pred] = hi
    return p


def synthetic(n=500, k=3, signal=1.5, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def test_class_key():
    assert class_key("COVID") == "covid"
    assert class_key("Viral Pneumonia") == "viral_pneumonia"
    assert class_key("COVID-19") == "covid_19"
    assert class_key("non-COVID") == "non_covid"


# ---------------------------------------------------------------- report

# y_true  0 0 0 1 1 1 2 2
# pred    0 0 1 1 1 2 2 0
# confusion (rows true, cols pred): [[2,1,0],[0,2,1],[1,0,1]]
# covid:  TP=2 FN=1 FP=1 TN=4 -> sens 2/3, spec 4/5, prec 2/3, f1 2/3
# normal: TP=2 FN=1 FP=1 TN=4 -> sens 2/3, spec 4/5, prec 2/3, f1 2/3
# viral:  TP=1 FN=1 FP=1 TN=5 -> sens 1/2, spec 5/6, prec 1/2, f1 1/2
Y3 = np.array([0, 0, 0, 1, 1, 1, 2, 2])
P3 = one_hot_proba(np.array([0, 0, 1, 1, 1, 2, 2, 0]), 3)  # 0.6 / 0.2 / 0.2


def test_report_three_class_by_hand():
    r = report(Y3, P3, NAMES3)
    assert r["n"] == 8
    assert r["accuracy"] == 0.625
    assert r["balanced_accuracy"] == round((2 / 3 + 2 / 3 + 1 / 2) / 3, 4)
    assert r["covid"] == {
        "precision": 0.6667, "sensitivity": 0.6667, "specificity": 0.8, "f1": 0.6667, "support": 3,
        # covid scores: positives 0.6,0.6,0.2; negatives 0.2,0.2,0.2,0.2,0.6
        # 15 pairs: 8 wins + (2 + 4) ties / 2 -> 11/15
        "roc_auc": round(11 / 15, 4), "pr_auc": r["covid"]["pr_auc"],
    }
    assert r["viral_pneumonia"]["sensitivity"] == 0.5
    assert r["viral_pneumonia"]["specificity"] == round(5 / 6, 4)
    assert r["viral_pneumonia"]["precision"] == 0.5
    assert r["confusion"]["covid"] == {"covid": 2, "normal": 1, "viral_pneumonia": 0}
    assert r["confusion"]["viral_pneumonia"] == {"covid": 1, "normal": 0, "viral_pneumonia": 1}
    assert r["macro"]["recall"] == r["balanced_accuracy"]
    assert r["macro"]["roc_auc"] == round(roc_auc_score(Y3, P3, multi_class="ovr"), 4)
    assert r["weighted"]["roc_auc"] == round(roc_auc_score(Y3, P3, multi_class="ovr", average="weighted"), 4)
    # correct rows: 0.4^2 + 2*0.2^2 = 0.24; wrong rows: 0.6^2 + 0.8^2 + 0.2^2 = 1.04
    assert r["brier"] == round((5 * 0.24 + 3 * 1.04) / 8, 4)
    assert r["ece"] == 0.025  # one bin: confidence 0.6, accuracy 0.625
    assert r["log_loss"] == round((5 * -math.log(0.6) + 3 * -math.log(0.2)) / 8, 4)
    json.dumps(r, allow_nan=False)


def test_report_binary():
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    p1 = np.array([0.2, 0.4, 0.7, 0.6, 0.8, 0.3, 0.9])
    r = report(y, np.c_[1 - p1, p1], ["COVID-19", "non-COVID"])
    # pred = [0,0,1,1,1,0,1] -> covid_19: TP=2 FN=1 FP=1 TN=3
    assert r["covid_19"]["sensitivity"] == 0.6667
    assert r["covid_19"]["specificity"] == 0.75
    assert r["non_covid"]["sensitivity"] == r["covid_19"]["specificity"]
    auc = round(roc_auc_score(y, p1), 4)
    assert r["macro"]["roc_auc"] == r["weighted"]["roc_auc"] == auc
    assert r["covid_19"]["roc_auc"] == r["non_covid"]["roc_auc"] == auc
    json.dumps(r, allow_nan=False)


def test_report_absent_class_warns_and_stays_json_clean():
    y = np.array([0, 0, 1, 1, 0, 1])  # no Viral Pneumonia
    p = one_hot_proba(np.array([0, 2, 1, 1, 0, 0]), 3)
    with pytest.warns(UserWarning, match="Viral Pneumonia"):
        r = report(y, p, NAMES3)
    viral = r["viral_pneumonia"]
    assert viral["support"] == 0
    assert viral["sensitivity"] is None and viral["roc_auc"] is None and viral["pr_auc"] is None
    assert viral["precision"] == 0.0  # predicted once, wrongly
    assert r["macro"]["recall"] == round((2 / 3 + 2 / 3) / 2, 4)  # over defined classes only
    assert r["macro"]["roc_auc"] == round((r["covid"]["roc_auc"] + r["normal"]["roc_auc"]) / 2, 4)
    json.dumps(r, allow_nan=False)


def test_report_never_predicted_class_has_no_precision():
    y = np.array([0, 1, 2, 2])
    p = one_hot_proba(np.array([0, 1, 1, 1]), 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: every class is present
        r = report(y, p, NAMES3)
    assert r["viral_pneumonia"]["precision"] is None
    json.dumps(r, allow_nan=False)


# ---------------------------------------------------------------- calibration

def test_ece_perfectly_calibrated_and_overconfident():
    y = np.array([1] * 8 + [0] * 2)
    calibrated = np.tile([0.2, 0.8], (10, 1))  # confidence 0.8, 80 % right
    assert expected_calibration_error(y, calibrated) == pytest.approx(0.0)
    y_half = np.array([1] * 5 + [0] * 5)
    overconfident = np.tile([0.1, 0.9], (10, 1))  # confidence 0.9, 50 % right
    assert expected_calibration_error(y_half, overconfident) == pytest.approx(0.4)


def test_brier():
    y = np.array([0, 2, 1])
    assert brier_score(y, np.eye(3)[y]) == 0.0
    assert brier_score(y, np.eye(3)[[1, 0, 2]]) == 2.0  # confidently wrong everywhere


# ---------------------------------------------------------------- thresholds

def test_threshold_for_sensitivity():
    y = np.array([1, 1, 1, 1, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.3, 0.2, 0.85, 0.1, 0.25])
    assert threshold_for_sensitivity(y, s, 0.75) == 0.3
    assert threshold_for_sensitivity(y, s, 1.0) == 0.2
    assert threshold_for_sensitivity(y, s, 0.5) == 0.8
    assert threshold_for_sensitivity(np.ones(10), np.arange(10) / 10, 0.7) == 0.3  # 7/10 exactly, no float slop


def test_threshold_for_sensitivity_errors():
    with pytest.raises(ValueError, match="no positive"):
        threshold_for_sensitivity(np.zeros(3), np.array([0.1, 0.2, 0.3]), 0.9)
    with pytest.raises(ValueError):
        threshold_for_sensitivity(np.ones(3), np.array([0.1, 0.2, 0.3]), 1.5)


def test_operating_point():
    y = np.array([1, 1, 1, 1, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.3, 0.2, 0.85, 0.1, 0.25])
    op = operating_point(y, s, 0.3)  # called: 0.9 0.8 0.3 | 0.85
    assert op == {"threshold": 0.3, "sensitivity": 0.75, "specificity": 0.6667, "ppv": 0.75, "npv": 0.6667,
                  "tp": 3, "fp": 1, "tn": 2, "fn": 1}
    none_called = operating_point(y, s, 2.0)
    assert none_called["ppv"] is None and none_called["npv"] == round(3 / 7, 4)
    assert operating_point(np.zeros(3), np.array([0.1, 0.5, 0.9]), 0.5)["sensitivity"] is None


# ---------------------------------------------------------------- bootstrap

def test_bootstrap_deterministic_and_seed_dependent():
    y, p = synthetic()
    stats = standard_statistics(positive=0)
    a = bootstrap_ci(y, p, stats, resamples=200, seed=1)
    assert a == bootstrap_ci(y, p, stats, resamples=200, seed=1)
    assert a != bootstrap_ci(y, p, stats, resamples=200, seed=2)
    assert set(a) == {"accuracy", "balanced_accuracy", "sensitivity", "specificity", "macro_roc_auc"}


def test_bootstrap_ci_contains_point_estimate():
    y, p = synthetic()
    r = report(y, p, NAMES3)
    ci = bootstrap_ci(y, p, standard_statistics(positive=0), resamples=300, seed=0)
    for name, point in [("accuracy", r["accuracy"]), ("sensitivity", r["covid"]["sensitivity"]),
                        ("specificity", r["covid"]["specificity"]), ("macro_roc_auc", r["macro"]["roc_auc"])]:
        assert ci[name]["low"] <= point <= ci[name]["high"], name
        assert ci[name]["high"] - ci[name]["low"] < 0.2


def test_standard_statistics_match_report():
    y, p = synthetic(k=3)
    r = report(y, p, NAMES3)
    stats = standard_statistics(positive=2)
    assert stats["accuracy"](y, p) == pytest.approx(r["accuracy"], abs=1e-4)
    assert stats["sensitivity"](y, p) == pytest.approx(r["viral_pneumonia"]["sensitivity"], abs=1e-4)
    assert stats["specificity"](y, p) == pytest.approx(r["viral_pneumonia"]["specificity"], abs=1e-4)
    assert stats["macro_roc_auc"](y, p) == pytest.approx(roc_auc_score(y, p, multi_class="ovr"), abs=1e-12)
    pq = np.round(p, 1) + 1e-3  # many ties
    pq /= pq.sum(axis=1, keepdims=True)
    assert stats["macro_roc_auc"](y, pq) == pytest.approx(roc_auc_score(y, pq, multi_class="ovr"), abs=1e-12)
    yb, pb = synthetic(k=2)
    assert standard_statistics(1)["macro_roc_auc"](yb, pb) == pytest.approx(roc_auc_score(yb, pb[:, 1]), abs=1e-12)


def test_standard_statistics_threshold():
    y = np.array([1, 1, 1, 1, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.3, 0.2, 0.85, 0.1, 0.25])
    p = np.c_[1 - s, s]
    stats = standard_statistics(positive=1, threshold=0.3)
    op = operating_point(y, s, 0.3)
    assert stats["sensitivity"](y, p) == op["sensitivity"]
    assert stats["specificity"](y, p) == pytest.approx(op["specificity"], abs=1e-4)


def test_bootstrap_undefined_statistic_gives_none():
    y = np.zeros(100, dtype=int)  # no positives at all
    p = np.tile([0.7, 0.3], (100, 1))
    ci = bootstrap_ci(y, p, standard_statistics(positive=1), resamples=100, seed=0)
    assert ci["sensitivity"] == {"low": None, "high": None}
    assert ci["macro_roc_auc"] == {"low": None, "high": None}
    assert ci["specificity"]["low"] is not None
    json.dumps(ci, allow_nan=False)


def test_bootstrap_benchmark():
    # a benchmark, not a pass/fail bound: the figure is printed (pytest -s), the machine may be shared
    y, p = synthetic(n=2000)
    start = time.perf_counter()
    ci = bootstrap_ci(y, p, standard_statistics(positive=0), resamples=1000, seed=0)
    print(f"bootstrap, 1000 resamples of 2000 cases: {time.perf_counter() - start:.2f}s")
    assert ci["macro_roc_auc"]["low"] is not None


from cxr import metrics as m  # noqa: E402


def _roc_reading(y, score, spec):
    """Brute force over every threshold: the best sensitivity whose specificity is >= spec."""
    best = 0.0
    for t in np.concatenate([np.unique(score), [np.inf]]):
        called = score >= t
        if (~called[~y]).mean() >= spec - 1e-12:
            best = max(best, called[y].mean())
    return best


@pytest.mark.parametrize("seed", range(5))
def test_fixed_rate_readings_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(120) < 0.35
    score = np.round(rng.random(120) * 0.6 + 0.4 * y, 2)  # ties on purpose
    for spec in (0.9, 0.95, 0.98):
        assert m.sensitivity_at_specificity(y, score, spec) == pytest.approx(_roc_reading(y, score, spec))
        t = m.threshold_for_specificity(score[~y], spec)
        assert (score[~y] < t).mean() >= spec
    for sens in (0.9, 0.95):
        got = m.specificity_at_sensitivity(y, score, sens)
        t = m.threshold_for_sensitivity(y, score, sens)
        assert (score[y] >= t).mean() >= sens and got == pytest.approx((score[~y] < t).mean())
    assert m.sensitivity_at_specificity(np.ones(3, bool), np.ones(3), 0.95) is None


def test_fixed_rate_statistics_keys_and_bootstrap():
    assert m.rate_key("sens_at_spec", 0.95) == "sens_at_spec95"
    assert m.rate_key("spec_at_sens", 0.975) == "spec_at_sens97_5"
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    proba = rng.dirichlet(np.ones(3), 200) + np.eye(3)[y]
    proba /= proba.sum(axis=1, keepdims=True)
    stats = m.fixed_rate_statistics(0, [0.95, 0.98], [0.95])
    assert set(stats) == {"sens_at_spec95", "sens_at_spec98", "spec_at_sens95"}
    ci = m.bootstrap_ci(y, proba, stats, resamples=100, seed=0)
    for name, stat in stats.items():
        assert ci[name]["low"] <= stat(y, proba) <= ci[name]["high"]


def test_operating_point_by_specificity_reaches_the_target_on_validation():
    from cxr import evaluation

    rng = np.random.default_rng(1)
    y = rng.random(300) < 0.3
    score = rng.random(300) * 0.7 + 0.3 * y
    for target in (0.9, 0.95, 0.99):
        t = evaluation.choose_threshold(y, score, "specificity", target)
        assert m.operating_point(y, score, t)["specificity"] >= target
        # the lowest such threshold: one step lower would miss the target
        lower = np.max(score[~y][score[~y] < t]) if (score[~y] < t).any() else -np.inf
        assert m.operating_point(y, score, lower)["specificity"] < target or lower == -np.inf
        t = evaluation.choose_threshold(y, score, "sensitivity", target)
        assert m.operating_point(y, score, t)["sensitivity"] >= target


def test_selection_loss_is_weighted_like_training():
    y = np.array([0, 0, 0, 1])
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    plain = m.selection_scores(y, proba, 1, 0.95)["loss"]
    weighted = m.selection_scores(y, proba, 1, 0.95, {0: 4 / 6, 1: 2.0})["loss"]
    assert plain == pytest.approx(-(3 * np.log(0.9) + np.log(0.6)) / 4)
    assert weighted == pytest.approx(-(3 * 4 / 6 * np.log(0.9) + 2.0 * np.log(0.6)) / (3 * 4 / 6 + 2.0))


def test_report_of_a_float32_softmax_does_not_warn():
    import warnings

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 3)).astype(np.float32)
    proba = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    proba[:, 0] += 2e-7  # what float32 rounding leaves
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = report(np.arange(200) % 3, proba, ["a", "b", "c"])
    assert 0 < out["log_loss"] < 5


def test_calibration_bins_count_every_image_and_match_sklearn():
    from sklearn.calibration import calibration_curve

    from cxr.evaluation import calibration_bins

    rng = np.random.default_rng(0)
    score = np.concatenate([rng.uniform(0, 1, 200), [0.0, 1.0, 0.5, 0.1, 0.2]])   # bin edges included
    y = (rng.uniform(0, 1, len(score)) < score).astype(int)
    bins = calibration_bins(y, score, 10)
    prob_true, prob_pred = calibration_curve(y, score, n_bins=10)
    assert sum(b["count"] for b in bins) == len(score)
    assert [b["prob_true"] for b in bins] == pytest.approx(prob_true, abs=1e-5)
    assert [b["prob_pred"] for b in bins] == pytest.approx(prob_pred, abs=1e-5)
    # each bin's count is the number of scores whose mean is its prob_pred
    edges = np.linspace(0, 1, 11)
    for b in bins:
        k = min(int(np.searchsorted(edges[1:-1], b["prob_pred"])), 9)
        members = score[np.searchsorted(edges[1:-1], score) == k]
        assert b["count"] == len(members) and b["prob_pred"] == pytest.approx(members.mean(), abs=1e-5)
    # empty bins are left out, as sklearn leaves them out
    assert len(calibration_bins(np.array([0, 1]), np.array([0.05, 0.95]), 10)) == 2


def test_conformal_allowance():
    # (m + 1) / (n + 1) <= 1 - target: the largest m
    assert m.conformal_allowance(89, 0.95) == 3      # 4/90 = 0.044; the validation rule would allow 4 (5/90 = 0.056)
    assert m.conformal_allowance(19, 0.95) == 0      # 1/20 = 0.05 exactly
    assert m.conformal_allowance(18, 0.95) == -1     # too few cases: even none missed gives 1/19 > 0.05
    assert m.conformal_allowance(180, 0.98) == 2     # 3/181 = 0.0166 <= 0.02 < 4/181
    # conformal_minimum is where the allowance first reaches 0
    for target in (0.5, 0.8, 0.9, 0.95, 0.975, 0.98, 0.99):
        n = m.conformal_minimum(target)
        assert m.conformal_allowance(n - 1, target) == -1 and m.conformal_allowance(n, target) == 0, target
    assert m.conformal_minimum(0.95) == 19 and m.conformal_minimum(0.99) == 99


@pytest.mark.parametrize("by, n, wrong_side", [("sensitivity", 89, lambda s, t: s < t), ("specificity", 110, lambda s, t: s >= t)])
def test_conformal_threshold_reaches_the_target_on_new_cases_where_validation_s_does_not(by, n, wrong_side):
    """Scores of the cases that matter are uniform on (0, 1), so a threshold's true rate on new cases is known
    exactly (sensitivity 1 - t, specificity t). Over many validation draws, the conformal threshold reaches the
    target on average; the threshold that just reaches it on the validation cases falls short (0.944 and 0.946)."""
    from cxr import evaluation

    rng = np.random.default_rng(0)
    target, true_rate = 0.95, (lambda t: 1 - t) if by == "sensitivity" else (lambda t: t)
    y = np.arange(n + 40) < n if by == "sensitivity" else np.arange(n + 40) >= n   # the other kind: 40 cases
    rates = {"conformal": [], "validation": []}
    for _ in range(4000):
        score = rng.random(len(y))
        for rule in rates:
            t = evaluation.choose_threshold(y, score, by, target, rule)
            rates[rule].append(true_rate(t))
            cases = score[y] if by == "sensitivity" else score[~y]
            if rule == "conformal":
                assert wrong_side(cases, t).sum() == m.conformal_allowance(n, target)
                assert m.new_case_rate(y, score, t, by) >= target
    assert np.mean(rates["conformal"]) >= target + 0.003
    assert np.mean(rates["validation"]) <= target - 0.003
    # new_case_rate is that average: exact for untied scores
    assert np.mean(rates["conformal"]) == pytest.approx(1 - (m.conformal_allowance(n, target) + 1) / (n + 1), abs=0.002)


def test_conformal_threshold_with_too_few_cases_warns_and_misses_none():
    from cxr import evaluation

    y = np.array([1] * 10 + [0] * 30, bool)
    score = np.linspace(0, 1, 40)[::-1].copy()
    with pytest.warns(UserWarning, match="10 positive cases: sensitivity 0.95 on new cases needs at least 19"):
        t = evaluation.choose_threshold(y, score, "sensitivity", 0.95, "conformal")
    assert t == score[y].min() and m.new_case_rate(y, score, t, "sensitivity") == pytest.approx(1 - 1 / 11)
    with pytest.warns(UserWarning, match="30 negative cases: specificity 0.99 on new cases needs at least 99"):
        t = evaluation.choose_threshold(y, score, "specificity", 0.99, "conformal")
    assert t > score[~y].max() and m.new_case_rate(y, score, t, "specificity") == pytest.approx(1 - 1 / 31)
    pick = m.conformal_threshold(y, score, "sensitivity", 0.95)
    assert (pick.cases, pick.reachable, pick.threshold) == (10, False, score[y].min())
    # specificity 0.9 on 30 negatives: 2 may be called positive (3/31 <= 0.1), so just above the third highest
    assert m.conformal_threshold(y, score, "specificity", 0.9) == (np.nextafter(score[~y][2], 1.0), 30, True)
    with pytest.raises(ValueError, match="no positive samples"):
        m.conformal_threshold(np.zeros(3, bool), np.array([0.1, 0.2, 0.3]), "sensitivity", 0.9)
