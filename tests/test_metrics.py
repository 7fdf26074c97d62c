"""train/metrics.py against hand-computed small cases and scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import classification_report, precision_score, recall_score, roc_auc_score

from pipeline.errors import CxrError
from train import intervals, metrics

# 4 negatives, 4 positives; at 0.5: tn=2 fp=2 fn=1 tp=3 (checked by hand).
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1])
PROBS = np.array([0.1, 0.4, 0.55, 0.8, 0.2, 0.7, 0.9, 0.6])


def test_class_metrics_hand_checked():
    m = metrics.class_metrics(LABELS, PROBS, 0.5)
    assert m["confusion"] == {"tn": 2, "fp": 2, "fn": 1, "tp": 3}
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["positive"]["precision"] == pytest.approx(3 / 5)
    assert m["positive"]["recall"] == pytest.approx(3 / 4)
    assert m["positive"]["f1"] == pytest.approx(2 / 3)
    assert m["negative"]["precision"] == pytest.approx(2 / 3)
    assert m["negative"]["recall"] == pytest.approx(1 / 2)
    assert m["negative"]["f1"] == pytest.approx(4 / 7)
    assert m["macro"]["precision"] == pytest.approx((3 / 5 + 2 / 3) / 2)
    assert m["macro"]["recall"] == pytest.approx(5 / 8)
    assert m["macro"]["f1"] == pytest.approx((2 / 3 + 4 / 7) / 2)
    assert m["positive"]["support"] == 4 and m["negative"]["support"] == 4


def test_class_metrics_match_sklearn_report():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.3 * y + rng.random(300) * 0.7, 0, 1)
    m = metrics.class_metrics(y, p, 0.42)
    ref = classification_report(y, (p >= 0.42).astype(int), output_dict=True)
    for name, key in (("negative", "0"), ("positive", "1")):
        for metric, ref_metric in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert m[name][metric] == pytest.approx(ref[key][ref_metric])
    assert m["macro"]["f1"] == pytest.approx(ref["macro avg"]["f1-score"])
    assert m["accuracy"] == pytest.approx(ref["accuracy"])


def test_screening_rates_hand_checked():
    r = metrics.screening_rates(LABELS, PROBS, 0.5, n_boot=200, seed=0)
    assert r["sensitivity"]["value"] == pytest.approx(3 / 4)
    assert r["specificity"]["value"] == pytest.approx(2 / 4)
    assert r["ppv"]["value"] == pytest.approx(3 / 5)
    assert r["npv"]["value"] == pytest.approx(2 / 3)
    for k in metrics.RATES:
        lo, hi = r[k]["ci95"]["low"], r[k]["ci95"]["high"]
        assert 0.0 <= lo <= r[k]["value"] <= hi <= 1.0


def test_vectorised_rates_equal_sklearn():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 500)
    yhat = rng.integers(0, 2, 500)
    tn, fp, fn, tp = (float(((y == a) & (yhat == b)).sum()) for a, b in ((0, 0), (0, 1), (1, 0), (1, 1)))
    rates = intervals.rates_from_counts(np.array([tn]), np.array([fp]), np.array([fn]), np.array([tp]))
    assert rates["sensitivity"][0] == pytest.approx(recall_score(y, yhat, pos_label=1))
    assert rates["specificity"][0] == pytest.approx(recall_score(y, yhat, pos_label=0))
    assert rates["ppv"][0] == pytest.approx(precision_score(y, yhat, pos_label=1))
    assert rates["npv"][0] == pytest.approx(precision_score(y, yhat, pos_label=0))


def test_bootstrap_is_seeded_and_contains_the_estimate():
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.35 * y + 0.65 * rng.random(200), 0, 1)
    a = metrics.split_metrics(y, p, 0.5, n_boot=300, seed=7)
    b = metrics.split_metrics(y, p, 0.5, n_boot=300, seed=7)
    c = metrics.split_metrics(y, p, 0.5, n_boot=300, seed=8)
    assert a == b
    assert a["sensitivity"]["ci95"] != c["sensitivity"]["ci95"]
    for k in metrics.RATES:
        lo, hi = a[k]["ci95"]["low"], a[k]["ci95"]["high"]
        assert lo < a[k]["value"] < hi
    lo, hi = a["roc_auc_ci95"]["low"], a["roc_auc_ci95"]["high"]
    assert lo < a["roc_auc"] < hi
    assert a["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert a["at_0_5"]["accuracy"] == a["accuracy"]  # same threshold, same numbers


def test_auc_hand_checked():
    r = metrics.ranking_metrics(LABELS, PROBS, n_boot=50, seed=0)
    assert r["roc_auc"] == pytest.approx(11 / 16)  # 11 of 16 (positive, negative) pairs ranked right
    assert 0 < r["pr_auc"] <= 1


def test_one_class_split_is_null_with_reason_not_a_crash():
    y = np.zeros(10, dtype=int)
    p = np.linspace(0, 1, 10)
    m = metrics.split_metrics(y, p, 0.5, n_boot=50, seed=0)
    assert m["roc_auc"] is None and m["pr_auc"] is None and "only negative" in m["auc_undefined"]
    assert m["sensitivity"]["value"] is None and m["sensitivity"]["ci95"] is None
    assert m["sensitivity"]["undefined"] == "no positive images"
    assert m["specificity"]["value"] == pytest.approx(0.5)
    assert metrics.roc_points(y, p) == [] and metrics.pr_points(y, p) == []
    json.dumps(m, allow_nan=False)  # no NaN leaks into the metrics file


def test_ppv_undefined_when_nothing_called_positive():
    r = metrics.screening_rates(LABELS, PROBS, 0.95, n_boot=20, seed=0)
    assert r["ppv"]["value"] is None and r["ppv"]["undefined"] == "no image called positive"
    assert r["sensitivity"]["value"] == 0.0


def test_choose_threshold_max_f1_hand_checked():
    t = metrics.choose_threshold(LABELS, PROBS, "max_f1", 0.95)
    # F1 by threshold (hand): 0.2 -> 8/11, 0.6 -> 0.75 (tp 3, fp 1, fn 1), every other lower.
    assert t["value"] == pytest.approx(0.6)
    assert t["f1"] == pytest.approx(0.75)
    assert t["rule"] == "max_f1" and t["split"] == "val"
    again = metrics.class_metrics(LABELS, PROBS, t["value"])["positive"]["f1"]
    assert again == pytest.approx(t["f1"])


@pytest.mark.parametrize("target, expected", [(0.95, 0.2), (0.75, 0.6), (0.5, 0.7), (0.25, 0.9)])
def test_choose_threshold_target_sensitivity_is_highest_reaching(target, expected):
    t = metrics.choose_threshold(LABELS, PROBS, "target_sensitivity", target)
    assert t["value"] == pytest.approx(expected)
    assert t["sensitivity"] >= target
    sens = metrics.screening_rates(LABELS, PROBS, t["value"], 0, 0)["sensitivity"]["value"]
    assert sens == pytest.approx(t["sensitivity"])


def test_choose_threshold_degenerate_and_bad_rule():
    t = metrics.choose_threshold(np.ones(5, int), np.linspace(0, 1, 5), "max_f1", 0.95)
    assert t["value"] == 0.5 and t["rule"] == "fixed" and "only positive" in t["reason"]
    with pytest.raises(CxrError, match="unknown threshold rule"):
        metrics.choose_threshold(LABELS, PROBS, "youden", 0.95)


def test_by_source_counts_and_undefined_rates():
    sources = ["a", "a", "b", "b", "a", "a", "c", "c"]
    out = metrics.by_source(LABELS, PROBS, sources, 0.5)
    assert sorted(out) == ["a", "b", "c"]
    assert out["a"] == {
        "n": 4, "positives": 2, "negatives": 2, "accuracy": 0.75, "error_rate": 0.25,
        "false_negatives": 1, "false_positives": 0, "sensitivity": 0.5, "specificity": 1.0,
    }  # fmt: skip
    assert out["b"]["sensitivity"] is None and out["b"]["specificity"] == 0.0
    assert out["c"]["specificity"] is None and out["c"]["error_rate"] == 0.0


def test_curves_are_json_and_span_the_unit_square():
    roc = metrics.roc_points(LABELS, PROBS)
    pr = metrics.pr_points(LABELS, PROBS)
    json.dumps(roc, allow_nan=False)
    json.dumps(pr, allow_nan=False)
    assert (roc[0]["fpr"], roc[0]["tpr"]) == (0.0, 0.0) and (roc[-1]["fpr"], roc[-1]["tpr"]) == (1.0, 1.0)
    assert pr[0]["recall"] == 1.0 and pr[-1]["recall"] == 0.0


@pytest.mark.parametrize(
    "labels, probs, match",
    [
        ([0, 2], [0.1, 0.2], "0 or 1"),
        ([0, 1], [0.1, 1.2], "within"),
        ([0, 1], [0.1], "equal length"),
        ([], [], "no samples"),
    ],
)
def test_bad_inputs_raise_cxr_error(labels, probs, match):
    with pytest.raises(CxrError, match=match):
        metrics.class_metrics(labels, probs, 0.5)
