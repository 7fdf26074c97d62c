"""Confidence intervals that respect patients: a cluster bootstrap and closed-form score intervals.

Test sets hold several images of one patient, so images are not independent: a
bootstrap over images understates the spread. Here every resample draws PATIENTS
with replacement and keeps all images of each drawn patient (a cluster
bootstrap); a patient drawn twice counts twice. One set of resamples (one seed)
serves every metric of a split, so their intervals describe the same draws.

A resample is a weight per image (its patient's draw count). Counts of the
confusion cells are weighted sums, so the rates, accuracy and F1 of 1000
resamples are a few matrix products; so is ROC AUC, as the weighted Mann-Whitney
statistic, which equals the AUC of the data with each image repeated `weight` times.

At a 100% estimate every resample gives 1.0 too, so the bootstrap interval
collapses to [1, 1]. Sensitivity, specificity, PPV and NPV therefore also get a
Wilson score interval (scipy), whose lower bound stays below 1. It counts
images as independent trials (it cannot see patients): read it as a floor on
the uncertainty, the cluster bootstrap as the patient-aware estimate.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from scipy.stats import binomtest

from pipeline.errors import CxrError

BOOT_METHOD = "percentile 95% interval of a cluster bootstrap resampling patients (all images of a drawn patient)"
WILSON_METHOD = "Wilson score 95% interval on image counts (scipy.stats.binomtest), images as independent trials"
PREVALENCE_METHOD = "Bayes' rule from sensitivity and specificity at the named prevalence; ci95 from the same bootstrap"
_CHUNK = 128  # resamples per vectorised chunk at most
# ...and at most this many (resample, image) weights per chunk: several float64 arrays of that shape are
# alive at once (weights, their reordering, the per-class products), so a chunk stays under 1 MB whatever
# the test set; 128 full rows of a COVIDx CXR-4 test split (8,482 images) would be ~55 MB.
_CHUNK_ELEMENTS = 1 << 13


def patient_codes(groups: Any, n: int) -> np.ndarray:
    """Integer patient index per image; `None` makes every image its own patient."""
    if groups is None:
        return np.arange(n)
    g = np.asarray(groups, dtype=object).astype(str)
    if len(g) != n:
        raise CxrError(f"intervals: {len(g)} patient ids for {n} images")
    return np.unique(g, return_inverse=True)[1].reshape(-1)


def resample_weights(codes: np.ndarray, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """(chunk, n_images) float weights: how often each image's patient was drawn."""
    n_patients = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    # The draws are the same whatever the chunking (the generator's stream is consumed row by row).
    step = max(1, min(_CHUNK, _CHUNK_ELEMENTS // max(len(codes), n_patients)))
    for start in range(0, n_boot, step):
        rows = min(step, n_boot - start)
        draws = rng.integers(0, n_patients, size=(rows, n_patients))
        counts = np.zeros((rows, n_patients))
        np.add.at(counts, (np.repeat(np.arange(rows), n_patients), draws.reshape(-1)), 1.0)
        yield counts[:, codes]


def percentile_ci(samples: np.ndarray) -> dict[str, float] | None:
    """{"low", "high"}: scalars, because `dvc exp show` / `metrics diff` drop lists from metrics."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return None
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return {"low": float(lo), "high": float(hi)}


def wilson_ci(successes: int, trials: int) -> dict[str, float] | None:
    if trials == 0:
        return None
    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=0.95, method="wilson")
    return {"low": float(ci.low), "high": float(ci.high)}


def rates_from_counts(tn, fp, fn, tp) -> dict[str, np.ndarray]:
    """Every count-based metric, vectorised over resamples (NaN where a ratio is undefined)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "accuracy": (tp + tn) / (tn + fp + fn + tp),
            "positive_f1": 2 * tp / (2 * tp + fp + fn),
            # sklearn's macro F1 counts an undefined class F1 as 0 (zero_division=0)
            "macro_f1": (np.nan_to_num(2 * tp / (2 * tp + fp + fn)) + np.nan_to_num(2 * tn / (2 * tn + fn + fp))) / 2,
        }


def at_prevalence(sensitivity, specificity, prevalence: float) -> dict[str, np.ndarray]:
    """PPV and NPV of a test with these rates in a population with this prevalence."""
    sens, spec, pi = np.asarray(sensitivity, float), np.asarray(specificity, float), float(prevalence)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "ppv": sens * pi / (sens * pi + (1 - spec) * (1 - pi)),
            "npv": spec * (1 - pi) / (spec * (1 - pi) + (1 - sens) * pi),
        }


def bootstrap_counts(labels: np.ndarray, predicted: np.ndarray, codes: np.ndarray, n_boot: int, seed: int):
    """(n_boot,) weighted tn, fp, fn, tp of each resample."""
    cells = 2 * labels + predicted  # 0 tn, 1 fp, 2 fn, 3 tp
    onehot = np.stack([(cells == k).astype(np.float64) for k in range(4)], axis=1)  # (n, 4)
    if n_boot == 0:
        return [np.empty(0)] * 4
    counts = np.concatenate([w @ onehot for w in resample_weights(codes, n_boot, seed)])
    return [counts[:, k] for k in range(4)]


def bootstrap_auc(labels: np.ndarray, probs: np.ndarray, codes: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """ROC AUC of each resample; NaN for one that drew a single class.

    The weighted Mann-Whitney statistic, P(positive scores above negative) + 1/2 P(tie), with each
    image weighted by its draw count: exactly the area sklearn's weighted `roc_auc_score` gives, for
    a whole chunk of resamples in a few array operations. Hand-written because 1000 sklearn calls
    took 6.8 s on 320 images (longer than ONNX Runtime took to score them), this about 0.1 s.
    """
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    order = np.argsort(probs, kind="stable")
    sorted_probs = probs[order]
    # One column per distinct score, in increasing order: tied images share a column.
    starts = np.flatnonzero(np.r_[True, sorted_probs[1:] != sorted_probs[:-1]])
    positive = (labels[order] == 1).astype(np.float64)
    out = []
    for chunk in resample_weights(codes, n_boot, seed):
        w = chunk[:, order]
        pos = np.add.reduceat(w * positive, starts, axis=1)  # (resamples, distinct scores)
        neg = np.add.reduceat(w * (1.0 - positive), starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each score
        pairs = pos.sum(axis=1) * neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(pairs > 0, (pos * (below + 0.5 * neg)).sum(axis=1) / pairs, np.nan))
    return np.concatenate(out) if out else np.empty(0)


def describe(n_boot: int, seed: int, codes: np.ndarray) -> dict[str, Any]:
    """What eval.json says about how its intervals were drawn."""
    return {
        "ci95": BOOT_METHOD,
        "ci95_wilson": WILSON_METHOD,
        "resamples": int(n_boot),
        "seed": int(seed),
        "n_patients": int(codes.max()) + 1,
        "n_images": int(len(codes)),
    }


def bootstrap_mean(values: Any, codes: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Mean of per-image `values` (e.g. losses) in each patient resample."""
    v = np.asarray(values, dtype=np.float64)
    out = [(w @ v) / w.sum(axis=1) for w in resample_weights(codes, n_boot, seed)]
    return np.concatenate(out) if out else np.empty(0)
