"""train.select: which epoch becomes best.pt, and the interval recorded with it."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import CxrError
from train.fit import best_epoch


def _pick(rule: str, epochs: list[tuple[float, float | None]]) -> int:
    """1-based epoch the trainer keeps, given (val_loss, val_auc) per epoch."""
    best, chosen = list(best_epoch.WORST), 0
    for i, (loss, auc) in enumerate(epochs, start=1):
        s = best_epoch.score(rule, loss, auc)
        if best_epoch.improved(s, best):
            best, chosen = s, i
    return chosen


def test_val_loss_keeps_the_lowest_loss_and_val_auc_the_highest_auc():
    epochs = [(0.70, 0.60), (0.50, 0.80), (0.45, 0.75), (0.60, 0.90)]
    assert _pick("val_loss", epochs) == 3
    assert _pick("val_auc", epochs) == 4


def test_auc_ties_go_to_the_lower_loss_and_the_first_of_equals():
    assert _pick("val_auc", [(0.6, 1.0), (0.4, 1.0), (0.5, 1.0)]) == 2
    assert _pick("val_auc", [(0.4, 1.0), (0.4, 1.0)]) == 1
    assert _pick("val_loss", [(0.4, None), (0.4, None)]) == 1


def test_val_auc_needs_both_classes():
    best_epoch.check_rule("val_auc", {"negative": 3, "positive": 1})
    best_epoch.check_rule("val_loss", {"negative": 3, "positive": 0})
    with pytest.raises(CxrError, match="needs both classes"):
        best_epoch.check_rule("val_auc", {"negative": 3, "positive": 0})
    with pytest.raises(CxrError, match="unknown train.select"):
        best_epoch.check_rule("val_f1", {"negative": 3, "positive": 3})


def test_per_image_loss_is_the_class_weighted_bce():
    y = np.array([0, 1])
    p = np.array([0.2, 0.6])
    # weights (1, 3): -1*log(0.8), -3*log(0.6)
    assert best_epoch.per_image_loss(y, p, [1.0, 3.0]) == pytest.approx([-np.log(0.8), -3 * np.log(0.6)])


def test_report_holds_the_metric_and_a_patient_interval():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    r = best_epoch.selection_report("val_auc", 7, y, p, list("aabbcc"), [1.0, 1.0], n_boot=200, seed=0)
    assert r["value"] == r["val_auc"] == pytest.approx(8 / 9)  # 8 of 9 (pos, neg) pairs ordered right
    assert (r["epoch"], r["n_patients"], r["n_images"], r["resamples"]) == (7, 3, 6, 200)
    lo, hi = r["val_auc_ci95"]["low"], r["val_auc_ci95"]["high"]
    assert lo <= r["val_auc"] <= hi <= 1.0
    one_class = best_epoch.selection_report("val_loss", 1, np.zeros(3, int), np.full(3, 0.3), list("abc"), [1.0, 1.0],
                                           n_boot=50, seed=0)  # fmt: skip
    assert one_class["val_auc"] is None and one_class["val_auc_ci95"] is None
    assert one_class["value"] == pytest.approx(-np.log(0.7))
