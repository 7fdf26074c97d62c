"""Which epoch becomes best.pt (`train.select`), and how much the validation split can tell.

- val_loss: the lowest class-weighted validation loss (the study's rule);
- val_auc: the highest validation ROC AUC; ties (common on a small split, where
  several epochs rank it perfectly) go to the lower validation loss.

A score is a pair compared lexicographically, higher is better, so both rules
share one comparison. The checkpoint records the chosen epoch's validation
metric with a patient-level bootstrap interval: with ~20 validation images
that interval is wide, and a user should see that before trusting the choice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from pipeline.errors import CxrError
from train import intervals

SELECT_RULES = ("val_loss", "val_auc")
WORST = [float("-inf"), float("-inf")]


def val_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """ROC AUC of a validation pass; None when the split holds one class."""
    return float(roc_auc_score(labels, probs)) if labels.min() != labels.max() else None


def check_rule(select: str, val_class_counts: dict[str, int]) -> None:
    if select not in SELECT_RULES:
        raise CxrError(f"unknown train.select {select!r}; valid: {', '.join(SELECT_RULES)}")
    if select == "val_auc" and min(val_class_counts.values(), default=0) == 0:
        raise CxrError(f"train.select val_auc needs both classes in validation, got {val_class_counts}")


def score(select: str, loss: float, auc: float | None) -> list[float]:
    if select == "val_loss":
        return [-loss, 0.0]
    return [float("-inf") if auc is None else auc, -loss]


def improved(new: list[float], best: list[float]) -> bool:
    return tuple(new) > tuple(best)


def per_image_loss(labels: np.ndarray, probs: np.ndarray, class_weights: list[float]) -> np.ndarray:
    """The class-weighted BCE of each image, as training's validation loss averages it."""
    p = np.clip(probs, 1e-12, 1 - 1e-12)
    w = np.asarray(class_weights, dtype=np.float64)[labels]
    return -w * np.where(labels == 1, np.log(p), np.log1p(-p))


def selection_report(
    select: str, epoch: int, labels: np.ndarray, probs: np.ndarray, patients: list[str],
    class_weights: list[float], n_boot: int, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """The chosen epoch's validation loss and AUC, each with a patient-bootstrap 95% interval."""
    codes = intervals.patient_codes(patients, len(labels))
    losses = per_image_loss(labels, probs, class_weights)
    auc = val_auc(labels, probs)
    auc_ci = intervals.percentile_ci(intervals.bootstrap_auc(labels, probs, codes, n_boot, seed)) if auc else None
    return {
        "rule": select,
        "epoch": int(epoch),
        "metric": select,
        "value": float(losses.mean()) if select == "val_loss" else auc,
        "val_loss": float(losses.mean()),
        "val_loss_ci95": intervals.percentile_ci(intervals.bootstrap_mean(losses, codes, n_boot, seed)),
        "val_auc": auc,
        "val_auc_ci95": auc_ci,
        "ci95_method": intervals.BOOT_METHOD,
        "resamples": int(n_boot),
        "seed": int(seed),
        "n_patients": int(codes.max()) + 1,
        "n_images": int(len(labels)),
    }
