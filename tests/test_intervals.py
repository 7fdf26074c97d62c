"""Patient-level intervals: each case below is worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.errors import CxrError
from train import intervals, metrics

Z2 = 1.959963984540054**2  # the 97.5% normal quantile, squared


def test_all_correct_bootstrap_collapses_but_wilson_keeps_a_lower_bound():
    y = np.array([0] * 6 + [1] * 10)
    p = np.where(y == 1, 0.9, 0.1)
    r = metrics.screening_rates(y, p, 0.5, n_boot=200, seed=0, groups=[f"p{i // 2}" for i in range(16)])
    assert r["sensitivity"]["value"] == 1.0 and r["sensitivity"]["ci95"] == {"low": 1.0, "high": 1.0}
    # Wilson at k = n: lower bound n / (n + z^2), upper 1.
    assert r["sensitivity"]["ci95_wilson"] == pytest.approx({"low": 10 / (10 + Z2), "high": 1.0})
    assert r["specificity"]["ci95_wilson"] == pytest.approx({"low": 6 / (6 + Z2), "high": 1.0})
    assert r["sensitivity"]["count"] == [10, 10] and r["npv"]["count"] == [6, 6]
    assert r["accuracy_ci95"] == r["macro_f1_ci95"] == {"low": 1.0, "high": 1.0}


def test_wilson_matches_the_textbook_value():
    lo, hi = intervals.wilson_ci(8, 10).values()  # Newcombe (1998): 8/10 -> 0.490 to 0.943
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    assert intervals.wilson_ci(0, 0) is None


def test_one_patient_with_many_images_widens_the_interval():
    # Patient A: one positive image, missed. Patient B: nine positive images, all found.
    # Resampling two patients: {A,A} p=1/4 -> sensitivity 0; {B,B} 1/4 -> 1; {A,B} 1/2 -> 0.9.
    y = np.ones(10, dtype=int)
    p = np.array([0.1] + [0.9] * 9)
    groups = ["A"] + ["B"] * 9
    tn, fp, fn, tp = intervals.bootstrap_counts(y, (p >= 0.5).astype(int), intervals.patient_codes(groups, 10), 4000, 3)
    sens = tp / (tp + fn)
    assert np.mean(sens == 0.0) == pytest.approx(0.25, abs=0.03)
    assert np.mean(sens == 1.0) == pytest.approx(0.25, abs=0.03)
    assert np.mean(np.isclose(sens, 0.9)) == pytest.approx(0.5, abs=0.03)
    by_patient = metrics.screening_rates(y, p, 0.5, n_boot=1000, seed=1, groups=groups)["sensitivity"]
    by_image = metrics.screening_rates(y, p, 0.5, n_boot=1000, seed=1)["sensitivity"]
    assert by_patient["value"] == by_image["value"] == pytest.approx(0.9)
    assert by_patient["ci95"] == {"low": 0.0, "high": 1.0}
    assert by_image["ci95"]["low"] > 0.6  # images as independent trials: far too narrow here


def test_single_class_split_has_nulls_not_numbers():
    y = np.zeros(8, dtype=int)
    p = np.linspace(0.05, 0.95, 8)
    m = metrics.split_metrics(y, p, 0.5, n_boot=100, seed=0, groups=list("aabbccdd"), prevalence=0.05)
    assert m["sensitivity"]["ci95_wilson"] is None and m["sensitivity"]["ci95"] is None
    assert m["specificity"]["count"] == [4, 8]
    assert m["specificity"]["ci95_wilson"] == pytest.approx(intervals.wilson_ci(4, 8))
    assert m["roc_auc"] is None and m["roc_auc_ci95"] is None
    assert m["at_prevalence"]["ppv"]["value"] is None  # needs a sensitivity
    assert m["n_patients"] == 4 and m["intervals"]["n_patients"] == 4 and m["intervals"]["n_images"] == 8
    json.dumps(m, allow_nan=False)


def test_intervals_block_names_each_method_and_the_seed():
    y = np.array([0, 1, 0, 1, 1, 0])
    m = metrics.split_metrics(y, np.array([0.2, 0.7, 0.4, 0.9, 0.3, 0.1]), 0.5, 50, 9, groups=list("xxyyzz"))
    block = m["intervals"]
    assert block["ci95"] == intervals.BOOT_METHOD and "patients" in block["ci95"]
    assert block["ci95_wilson"] == intervals.WILSON_METHOD and "Wilson" in block["ci95_wilson"]
    assert (block["resamples"], block["seed"], block["n_patients"], block["n_images"]) == (50, 9, 3, 6)


def test_prevalence_adjusted_ppv_npv_hand_checked():
    # sensitivity 0.9, specificity 0.8 at 5% prevalence:
    # PPV = .9*.05 / (.9*.05 + .2*.95) = .045/.235; NPV = .8*.95 / (.8*.95 + .1*.05) = .76/.765
    out = intervals.at_prevalence(0.9, 0.8, 0.05)
    assert float(out["ppv"]) == pytest.approx(0.045 / 0.235)
    assert float(out["npv"]) == pytest.approx(0.76 / 0.765)
    y = np.array([1] * 10 + [0] * 10)
    p = np.array([0.9] * 9 + [0.1] + [0.1] * 8 + [0.9] * 2)  # sensitivity 9/10, specificity 8/10
    r = metrics.screening_rates(y, p, 0.5, n_boot=100, seed=0, prevalence=0.05)["at_prevalence"]
    assert r["prevalence"] == 0.05 and r["ppv"]["value"] == pytest.approx(0.045 / 0.235)
    lo, hi = r["ppv"]["ci95"]["low"], r["ppv"]["ci95"]["high"]
    assert lo <= r["ppv"]["value"] <= hi


def test_weighted_auc_equals_auc_of_repeated_images():
    rng = np.random.default_rng(4)
    y, p = rng.integers(0, 2, 30), rng.random(30)
    w = rng.integers(0, 4, 30).astype(float)
    keep = w > 0
    repeated = roc_auc_score(np.repeat(y, w.astype(int)), np.repeat(p, w.astype(int)))
    assert roc_auc_score(y[keep], p[keep], sample_weight=w[keep]) == pytest.approx(repeated)


def test_each_image_its_own_patient_without_groups():
    codes = intervals.patient_codes(None, 5)
    assert codes.tolist() == [0, 1, 2, 3, 4]
    assert intervals.patient_codes(["b", "a", "b"], 3).tolist() == [1, 0, 1]
    with pytest.raises(CxrError, match="2 patient ids for 3 images"):
        intervals.patient_codes(["a", "b"], 3)


def test_weights_draw_whole_patients():
    codes = intervals.patient_codes(["a", "a", "a", "b"], 4)
    for w in next(intervals.resample_weights(codes, 50, 0)):
        assert w[0] == w[1] == w[2]  # a patient's images are drawn together
        assert w.sum() in (2, 4, 6)  # two patient draws: b+b, a+b or a+a


@pytest.mark.parametrize("n, patients, levels", [(40, 12, 5), (301, 90, 1000), (7, 3, 2)])
def test_bootstrap_auc_equals_sklearn_on_every_resample(n, patients, levels):
    """The vectorised weighted Mann-Whitney AUC is sklearn's weighted ROC AUC, resample by resample,
    with tied scores (few levels), duplicated patients and resamples that drew one class (NaN)."""
    rng = np.random.default_rng(n)
    labels = rng.integers(0, 2, n)
    probs = rng.integers(0, levels, n) / levels  # ties on purpose
    codes = intervals.patient_codes(rng.integers(0, patients, n).astype(str), n)
    got = intervals.bootstrap_auc(labels, probs, codes, 300, seed=5)
    expected = []
    for w in np.concatenate(list(intervals.resample_weights(codes, 300, seed=5))):
        keep = w > 0
        one_class = labels[keep].min() == labels[keep].max()
        expected.append(np.nan if one_class else roc_auc_score(labels[keep], probs[keep], sample_weight=w[keep]))
    np.testing.assert_allclose(got, np.asarray(expected), rtol=0, atol=1e-12)  # NaN where sklearn has none
    assert got.shape == (300,) and (n != 7 or np.isnan(got).any())


def test_large_test_sets_are_resampled_in_smaller_chunks_with_the_same_draws(monkeypatch):
    rng = np.random.default_rng(4)
    codes = np.repeat(np.arange(300), 2)  # 600 images of 300 patients
    labels = rng.integers(0, 2, 600)
    probs = rng.random(600)
    whole = intervals.bootstrap_auc(labels, probs, codes, 70, seed=9)
    monkeypatch.setattr(intervals, "_CHUNK_ELEMENTS", 600 * 16)  # 16 resamples a chunk, not 128
    shapes = [w.shape for w in intervals.resample_weights(codes, 70, seed=9)]
    assert shapes == [(16, 600)] * 4 + [(6, 600)]
    np.testing.assert_array_equal(intervals.bootstrap_auc(labels, probs, codes, 70, seed=9), whole)
