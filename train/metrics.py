"""Screening metrics on plain numpy arrays: labels (0/1), P(positive) and a threshold.

Every formula comes from scikit-learn; this module only arranges the results
into the JSON the `evaluate` stage writes. Conventions:

- an image is called positive when `prob >= threshold` (sklearn's curve
  convention, so a threshold read off a curve reproduces that curve's point);
- per-class and macro precision/recall/F1 follow sklearn's
  `classification_report` (an undefined ratio counts as 0), the convention the
  study's Tables II-IV were produced with;
- the screening rates (sensitivity, specificity, PPV, NPV) and the AUCs are
  `null` with a reason when undefined (e.g. a split holding one class), never 0;
- confidence intervals (train/intervals.py) are 95% percentile cluster
  bootstraps over PATIENTS from a seeded generator, plus Wilson score
  intervals for the four rates; each split's `intervals` block names them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from pipeline.errors import CxrError
from pipeline.names import THRESHOLD_RULES
from pipeline.shard_format import CLASS_NAMES
from train import intervals

RATES = ("sensitivity", "specificity", "ppv", "npv")


def _num(x: Any) -> float | None:
    """JSON-safe float: NaN (undefined) becomes null."""
    x = float(x)
    return None if math.isnan(x) else x


def check_arrays(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1 or len(y) != len(p):
        raise CxrError(f"metrics: labels and probabilities must be 1-D of equal length, got {y.shape} and {p.shape}")
    if len(y) == 0:
        raise CxrError("metrics: no samples to score")
    if not np.isin(y, (0, 1)).all():
        raise CxrError(f"metrics: labels must be 0 or 1, got {sorted(set(np.unique(y).tolist()))}")
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise CxrError("metrics: probabilities must be finite and within [0, 1]")
    return y.astype(np.int64), p


def predict_labels(probs: np.ndarray, threshold: float) -> np.ndarray:
    return (np.asarray(probs) >= threshold).astype(np.int64)


def _both_classes(y: np.ndarray) -> bool:
    return bool(y.min() == 0 and y.max() == 1)


def class_metrics(labels: Any, probs: Any, threshold: float) -> dict[str, Any]:
    """Tables II-IV: per-class and macro precision/recall/F1, accuracy and confusion counts."""
    y, p = check_arrays(labels, probs)
    yhat = predict_labels(p, threshold)
    prec, rec, f1, support = precision_recall_fscore_support(y, yhat, labels=[0, 1], zero_division=0)
    macro = precision_recall_fscore_support(y, yhat, labels=[0, 1], average="macro", zero_division=0)
    tn, fp, fn, tp = confusion_matrix(y, yhat, labels=[0, 1]).ravel()
    out: dict[str, Any] = {"accuracy": float(accuracy_score(y, yhat))}
    for c, name in enumerate(CLASS_NAMES):
        out[name] = {
            "precision": float(prec[c]),
            "recall": float(rec[c]),
            "f1": float(f1[c]),
            "support": int(support[c]),
        }
    out["macro"] = {"precision": float(macro[0]), "recall": float(macro[1]), "f1": float(macro[2])}
    out["confusion"] = {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}
    return out


def _rate_counts(tn, fp, fn, tp) -> dict[str, tuple[int, int]]:
    """(successes, trials) behind each screening rate, for its Wilson interval."""
    return {"sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp), "ppv": (tp, tp + fp), "npv": (tn, tn + fn)}


def screening_rates(
    labels: Any, probs: Any, threshold: float, n_boot: int, seed: int,
    groups: Any = None, prevalence: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Sensitivity, specificity, PPV, NPV, each `{"value", "ci95", "ci95_wilson", "count"}`
    (null + reason when undefined); CIs of accuracy and F1; PPV/NPV at `prevalence`.

    `groups` (patient id per image) makes the bootstrap resample patients; None
    treats each image as its own patient.
    """
    y, p = check_arrays(labels, probs)
    yhat = predict_labels(p, threshold)
    prec, rec, _, _ = precision_recall_fscore_support(y, yhat, labels=[0, 1], zero_division=np.nan)
    point = {"sensitivity": rec[1], "specificity": rec[0], "ppv": prec[1], "npv": prec[0]}
    why = {
        "sensitivity": "no positive images",
        "specificity": "no negative images",
        "ppv": "no image called positive",
        "npv": "no image called negative",
    }
    tn, fp, fn, tp = (int(c) for c in confusion_matrix(y, yhat, labels=[0, 1]).ravel())
    codes = intervals.patient_codes(groups, len(y))
    boot = intervals.rates_from_counts(*intervals.bootstrap_counts(y, yhat, codes, n_boot, seed))
    out: dict[str, Any] = {}
    for k, (hits, trials) in _rate_counts(tn, fp, fn, tp).items():
        value = _num(point[k])
        entry: dict[str, Any] = {
            "value": value,
            "ci95": intervals.percentile_ci(boot[k]) if value is not None else None,
            "ci95_wilson": intervals.wilson_ci(hits, trials),
            "count": [hits, trials],
        }
        if value is None:
            entry["undefined"] = why[k]
        out[k] = entry
    for k in ("accuracy", "positive_f1", "macro_f1"):
        out[f"{k}_ci95"] = intervals.percentile_ci(boot[k])
    if prevalence is not None:
        sens, spec = out["sensitivity"]["value"], out["specificity"]["value"]
        adjusted = intervals.at_prevalence(np.nan if sens is None else sens, np.nan if spec is None else spec,
                                           prevalence)  # fmt: skip
        boot_adj = intervals.at_prevalence(boot["sensitivity"], boot["specificity"], prevalence)
        out["at_prevalence"] = {
            "prevalence": float(prevalence),
            "method": intervals.PREVALENCE_METHOD,
            **{k: {"value": _num(adjusted[k]), "ci95": intervals.percentile_ci(boot_adj[k])} for k in ("ppv", "npv")},
        }
    return out


def ranking_metrics(labels: Any, probs: Any, n_boot: int, seed: int, groups: Any = None) -> dict[str, Any]:
    """Threshold-free: ROC AUC (with a patient bootstrap CI) and PR AUC (average precision)."""
    y, p = check_arrays(labels, probs)
    if not _both_classes(y):
        reason = f"undefined: the split holds only {CLASS_NAMES[int(y[0])]} images"
        return {"roc_auc": None, "roc_auc_ci95": None, "pr_auc": None, "auc_undefined": reason}
    boot = intervals.bootstrap_auc(y, p, intervals.patient_codes(groups, len(y)), n_boot, seed)
    return {
        "roc_auc": float(roc_auc_score(y, p)),
        "roc_auc_ci95": intervals.percentile_ci(boot),
        "pr_auc": float(average_precision_score(y, p)),
    }


def threshold_metrics(
    labels: Any, probs: Any, threshold: float, n_boot: int, seed: int,
    groups: Any = None, prevalence: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Everything that depends on the operating threshold."""
    rates = screening_rates(labels, probs, threshold, n_boot, seed, groups, prevalence)
    return {**class_metrics(labels, probs, threshold), **rates}


def by_source(labels: Any, probs: Any, sources: list[str], threshold: float) -> dict[str, Any]:
    """Per data source: counts and error rates, so a source-specific bias is visible."""
    y, p = check_arrays(labels, probs)
    src = np.asarray(sources, dtype=object)
    if len(src) != len(y):
        raise CxrError(f"metrics: {len(src)} sources for {len(y)} samples")
    yhat = predict_labels(p, threshold)
    out: dict[str, Any] = {}
    for name in sorted(set(src.tolist())):
        m = src == name
        ys, yh = y[m], yhat[m]
        tn, fp, fn, tp = confusion_matrix(ys, yh, labels=[0, 1]).ravel()
        pos, neg = int(tp + fn), int(tn + fp)
        acc = float(accuracy_score(ys, yh))
        out[name] = {
            "n": int(m.sum()),
            "positives": pos,
            "negatives": neg,
            "accuracy": acc,
            "error_rate": 1.0 - acc,
            "false_negatives": int(fn),
            "false_positives": int(fp),
            "sensitivity": float(tp / pos) if pos else None,
            "specificity": float(tn / neg) if neg else None,
        }
    return out


def split_metrics(
    labels: Any, probs: Any, threshold: float, n_boot: int, seed: int,
    groups: Any = None, prevalence: float | None = None, probs_at_0_5: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """A split's full report: at the operating threshold (top level), at 0.5 (`at_0_5`), and AUCs.

    `probs_at_0_5` are the scores the 0.5 rule is applied to (the study's rule is
    on the network's own, uncalibrated output); by default `probs`.
    """
    y, p = check_arrays(labels, probs)
    p05 = p if probs_at_0_5 is None else check_arrays(y, probs_at_0_5)[1]
    codes = intervals.patient_codes(groups, len(y))
    return {
        "n": int(len(y)),
        "n_patients": int(codes.max()) + 1,
        "positives": int(y.sum()),
        "negatives": int(len(y) - y.sum()),
        **threshold_metrics(y, p, threshold, n_boot, seed, groups, prevalence),
        **ranking_metrics(y, p, n_boot, seed, groups),
        "at_0_5": threshold_metrics(y, p05, 0.5, n_boot, seed, groups, prevalence),
        "intervals": intervals.describe(n_boot, seed, codes),
    }


def choose_threshold(labels: Any, probs: Any, rule: str, target_sensitivity: float) -> dict[str, Any]:
    """Pick the operating threshold on VALIDATION arrays (the caller passes val only).

    - max_f1: the threshold maximising the positive-class F1; ties go to the
      lowest such threshold (the more sensitive one: a screening tool).
    - target_sensitivity: the HIGHEST threshold whose sensitivity reaches the
      target, i.e. the most specific operating point meeting it (any lower
      threshold reaches it too, trivially so at 0).
    A split lacking a class cannot rank anything: 0.5 is returned with rule
    "fixed" and the reason, rather than a number fitted to nothing.
    """
    if rule not in THRESHOLD_RULES:
        raise CxrError(f"unknown threshold rule {rule!r}; valid: {', '.join(THRESHOLD_RULES)}")
    y, p = check_arrays(labels, probs)
    base = {"split": "val", "n": int(len(y))}
    if not _both_classes(y):
        return {
            "value": 0.5,
            "rule": "fixed",
            "requested_rule": rule,
            "reason": f"validation split holds only {CLASS_NAMES[int(y[0])]} images",
            **base,
        }
    if rule == "max_f1":
        precision, recall, thresholds = precision_recall_curve(y, p)
        precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
        i = int(np.argmax(f1))  # first maximum = lowest threshold among ties
        return {
            "value": float(thresholds[i]),
            "rule": rule,
            "f1": float(f1[i]),
            "precision": float(precision[i]),
            "sensitivity": float(recall[i]),
            **base,
        }
    if not 0.0 < target_sensitivity <= 1.0:
        raise CxrError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    i = int(np.argmax(tpr >= target_sensitivity))  # thresholds decrease, so the first hit is the highest
    return {
        "value": float(thresholds[i]),
        "rule": rule,
        "target_sensitivity": float(target_sensitivity),
        "sensitivity": float(tpr[i]),
        "specificity": float(1.0 - fpr[i]),
        **base,
    }


def roc_points(labels: Any, probs: Any) -> list[dict[str, float]]:
    """ROC curve for `dvc plots` (x: fpr, y: tpr); empty when undefined."""
    y, p = check_arrays(labels, probs)
    if not _both_classes(y):
        return []
    fpr, tpr, thr = roc_curve(y, p)
    # roc_curve's first threshold is +inf (nothing called positive); JSON has no inf.
    thr = np.minimum(thr, 1.0)
    return [{"fpr": float(a), "tpr": float(b), "threshold": float(t)} for a, b, t in zip(fpr, tpr, thr)]


def pr_points(labels: Any, probs: Any) -> list[dict[str, float]]:
    """Precision-recall curve for `dvc plots` (x: recall, y: precision); empty when undefined."""
    y, p = check_arrays(labels, probs)
    if not _both_classes(y):
        return []
    precision, recall, thr = precision_recall_curve(y, p)
    thr = np.append(thr, 1.0)  # the final (recall 0, precision 1) point has no threshold
    return [
        {"recall": float(r), "precision": float(q), "threshold": float(t)} for r, q, t in zip(recall, precision, thr)
    ]
