"""Platt scaling, Brier score, ECE and reliability bins, with hand-checked values."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import CxrError
from train import calibration


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_platt_recovers_a_known_mapping():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 40000)
    y = (rng.random(z.size) < _sigmoid(2.0 * z - 1.0)).astype(int)
    cal = calibration.fit_platt(y, _sigmoid(z))
    assert cal["method"] == "platt" and cal["fitted_on"] == "val" and cal["n"] == z.size
    assert cal["a"] == pytest.approx(2.0, rel=0.05) and cal["b"] == pytest.approx(-1.0, abs=0.05)


def test_platt_stays_finite_on_a_separated_split_and_keeps_the_order():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.01, 0.2, 0.3, 0.7, 0.8, 0.99])
    cal = calibration.fit_platt(y, p)
    assert np.isfinite(cal["a"]) and cal["a"] > 0
    q = calibration.apply(p, cal)
    assert np.all(np.diff(q) > 0)  # calibration never reorders images, so AUC is unchanged
    # Platt's smoothed targets: a positive is pulled towards (3+1)/(3+2) = 0.8, not 1.
    assert q.max() < 0.95 and q.min() > 0.05


def test_platt_undoes_a_class_weighted_shift():
    # Scores from a model trained as if classes were balanced, on data with 20% positives:
    # the logit is shifted by +log(4). Platt finds b close to -log(4) and a close to 1.
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.5, 40000) - np.log(4)
    y = (rng.random(z.size) < _sigmoid(z)).astype(int)
    cal = calibration.fit_platt(y, _sigmoid(z + np.log(4)))
    assert cal["b"] == pytest.approx(-np.log(4), abs=0.06) and cal["a"] == pytest.approx(1.0, abs=0.05)
    assert cal["prevalence"] == pytest.approx(y.mean())


def test_one_class_validation_is_identity_with_reason():
    cal = calibration.fit_platt(np.zeros(4, int), [0.1, 0.2, 0.3, 0.4])
    assert cal["method"] == "identity" and "one class" in cal["reason"]
    assert calibration.apply([0.1, 0.7], cal).tolist() == [0.1, 0.7]
    assert calibration.apply([0.1, 0.7], None).tolist() == [0.1, 0.7]  # an older checkpoint


def test_apply_hand_checked_and_unknown_method():
    cal = {"method": "platt", "a": 2.0, "b": 1.0}
    # p = 0.5 -> logit 0 -> sigmoid(1); p = sigmoid(1) -> logit 1 -> sigmoid(3)
    out = calibration.apply([0.5, _sigmoid(1.0)], cal)
    assert out == pytest.approx([_sigmoid(1.0), _sigmoid(3.0)])
    assert calibration.apply([0.0, 1.0], cal).tolist() == pytest.approx([0.0, 1.0], abs=1e-9)
    with pytest.raises(CxrError, match="unknown calibration method"):
        calibration.apply([0.5], {"method": "isotonic"})
    for bad in ({"a": -1.0, "b": 0.0}, {"a": float("nan"), "b": 0.0}, {"a": 1.0, "b": "0"}, {"a": True, "b": 0.0}):
        with pytest.raises(CxrError, match="invalid calibration"):
            calibration.apply([0.5], {"method": "platt", **bad})


def test_brier_and_ece_hand_checked():
    assert calibration.brier([0, 1], [0.2, 0.6]) == pytest.approx((0.04 + 0.16) / 2)
    y, p = [0, 0, 1, 1], [0.1, 0.15, 0.8, 0.95]
    # bins: [0.1,0.2): mean .125, observed 0 -> 2/4*.125; [0.8,0.9): .8 vs 1 -> 1/4*.2; [0.9,1]: .95 vs 1 -> 1/4*.05
    assert calibration.ece(y, p) == pytest.approx(0.0625 + 0.05 + 0.0125)
    rows = calibration.reliability(y, p)
    assert [(r["bin"], r["count"]) for r in rows] == [(1, 2), (8, 1), (9, 1)]
    assert calibration.reliability([1], [1.0])[0]["bin"] == 9  # p == 1 lands in the last bin
    assert calibration.ece([0, 1], [0.0, 1.0]) == 0.0


def test_report_says_how_it_binned():
    r = calibration.calibration_report([0, 1], [0.3, 0.6], [0.1, 0.9])
    assert r["brier_uncalibrated"] == pytest.approx((0.09 + 0.16) / 2) and r["brier"] == pytest.approx(0.01)
    assert "10 equal-width bins" in r["ece_binning"]
