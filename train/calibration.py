"""Post-hoc calibration (Platt scaling) and how calibrated a probability is (Brier, ECE, reliability).

The class-weighted loss trains the network as if both classes were equally
common, so its sigmoid output is not P(COVID-19). Platt scaling maps the
network's logit z to sigmoid(a*z + b), fitted on the VALIDATION split only; the
result is a probability at the validation prevalence. `a` is kept positive
(fitted as exp(s)), so calibration never reorders images: AUC is unchanged and
the operating threshold, chosen after calibration, is the same cut in rank.

The fit uses Platt's (1999) smoothed targets, (N+ + 1)/(N+ + 2) for positives
and 1/(N- + 2) for negatives, rather than 0/1: on a perfectly separated
validation split a 0/1 fit drives `a` to infinity, the smoothed one stays finite.

The mapping is a few numbers in the checkpoint meta (`calibration`), carried into
the ONNX metadata by export, and applied by `apply` wherever a probability leaves
the model: evaluate, predict and the ONNX path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize

from pipeline.errors import CxrError

METHOD = "platt"
ECE_BINS = 10
ECE_BINNING = f"{ECE_BINS} equal-width bins over [0, 1]; ECE = sum over bins of (images in bin / N) * |mean p - fraction positive|"
# CSV column names say what the number is (evaluate's predictions and `cxr predict` alike)
PROB_COLUMN = "p_covid_calibrated_at_val_prevalence"
RAW_COLUMN = "p_covid_uncalibrated"
IDENTITY = {"method": "identity", "a": 1.0, "b": 0.0}
_EPS = 1e-12  # probabilities this close to 0 or 1 are clipped before the logit (float64 sigmoid saturates)


def logit(probs: Any) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


def fit_platt(labels: Any, probs: Any) -> dict[str, Any]:
    """Platt scaling fitted on these (validation) labels and uncalibrated probabilities."""
    y = np.asarray(labels, dtype=np.int64)
    z = logit(probs)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        return {**IDENTITY, "fitted_on": "val", "n": int(len(y)),
                "reason": "validation split holds one class: nothing to fit"}  # fmt: skip
    t = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1.0 / (n_neg + 2))

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = np.exp(theta[0]), theta[1]
        s = a * z + b
        # mean cross-entropy against smoothed targets, written with logaddexp for stability
        nll = np.mean(t * np.logaddexp(0, -s) + (1 - t) * np.logaddexp(0, s))
        r = _sigmoid(s) - t
        return float(nll), np.array([np.mean(r * z) * a, np.mean(r)])

    res = minimize(loss, np.zeros(2), jac=True, method="L-BFGS-B", bounds=[(-10.0, 10.0), (-50.0, 50.0)])
    if not np.all(np.isfinite(res.x)):
        raise CxrError(f"calibration: Platt fit did not converge ({res.message})")
    return {
        "method": METHOD,
        "a": float(np.exp(res.x[0])),
        "b": float(res.x[1]),
        "fitted_on": "val",
        "n": int(len(y)),
        "positives": n_pos,
        "prevalence": n_pos / len(y),
    }


def apply(probs: Any, calibration: dict[str, Any] | None) -> np.ndarray:
    """Calibrated probabilities; a model without `calibration` (an older checkpoint) is left as is."""
    p = np.asarray(probs, dtype=np.float64)
    if not calibration or calibration.get("method") == "identity":
        return p
    if calibration.get("method") != METHOD:
        raise CxrError(f"unknown calibration method {calibration.get('method')!r}; this code knows {METHOD!r}")
    a, b = calibration.get("a"), calibration.get("b")
    # model meta travels (checkpoints, ONNX files): a crafted mapping must fail as one clear line
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in (a, b)) or a <= 0:
        raise CxrError(f"invalid calibration in model meta: need finite a > 0 and b, got a={a!r} b={b!r}")
    return _sigmoid(float(a) * logit(p) + float(b))


def brier(labels: Any, probs: Any) -> float:
    y, p = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    return float(np.mean((p - y) ** 2))


def reliability(labels: Any, probs: Any, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per non-empty bin: mean predicted probability, observed fraction positive, image count."""
    y, p = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    index = np.minimum((p * bins).astype(np.int64), bins - 1)  # p == 1 falls in the last bin
    rows = []
    for k in range(bins):
        m = index == k
        if m.any():
            rows.append({"bin": k, "bin_low": k / bins, "bin_high": (k + 1) / bins, "count": int(m.sum()),
                         "mean_predicted": float(p[m].mean()), "observed": float(y[m].mean())})  # fmt: skip
    return rows


def ece(labels: Any, probs: Any, bins: int = ECE_BINS) -> float:
    n = len(np.asarray(labels))
    return float(sum(r["count"] / n * abs(r["mean_predicted"] - r["observed"]) for r in reliability(labels, probs, bins)))


def calibration_report(labels: Any, raw: Any, calibrated: Any) -> dict[str, Any]:
    """Brier and ECE of one split before and after calibration."""
    return {
        "brier_uncalibrated": brier(labels, raw),
        "brier": brier(labels, calibrated),
        "ece_uncalibrated": ece(labels, raw),
        "ece": ece(labels, calibrated),
        "ece_binning": ECE_BINNING,
    }
