"""Fig. 8 of `cxr report --misclassified`: test images wrong for every model of an experiment set."""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import CxrError
from pipeline.fileio import spreadsheet_value
from pipeline.shard_format import shard_images
from train.calibration import PROB_COLUMN
from train.checkpoint import load_checkpoint
from train.misclassified import draw, overlays_for, select_misses
from train.report.experiments import Run, get, run_artifact


def _predictions(data: bytes, label: str) -> dict[str, dict[str, str]]:
    """key -> row, with `probability` the score the run's threshold applies to: the calibrated
    column of current runs, or the `probability` column of runs from before calibration."""
    rows = [{k: spreadsheet_value(v) for k, v in r.items()} for r in csv.DictReader(io.StringIO(data.decode()))]
    column = next((c for c in (PROB_COLUMN, "probability") if rows and c in rows[0]), None)
    if not rows or column is None or not {"key", "label"} <= set(rows[0]):
        raise CxrError(f"run {label}: its predictions CSV lacks key/label/{PROB_COLUMN} columns")
    return {r["key"]: {**r, "probability": r[column]} for r in rows}


def report_figure(runs: Sequence[Run], repo: Path, shards_root: Path, out: Path, per_kind: int = 4,
                  device: torch.device | None = None) -> dict[str, int]:  # fmt: skip
    """The study's Fig. 8 over an experiment set: test images wrong for EVERY run, one Grad-CAM per run.

    Each run's overlay is drawn on the shard image of its own variant (what
    that model saw); the first column shows the equalized image, as the study's.
    """
    if not runs:
        raise CxrError("no runs with evaluation metrics to compare")
    device = device or torch.device("cpu")
    preds = [_predictions(run_artifact(run, "predictions", repo), run.label) for run in runs]
    keys = sorted(preds[0])
    if any(set(p) != set(keys) for p in preds[1:]):
        raise CxrError("the runs were evaluated on different test sets (their prediction keys differ)")
    labels = np.array([int(preds[0][k]["label"]) for k in keys])
    probs = np.array([[float(p[k]["probability"]) for k in keys] for p in preds])
    thresholds = [float(get(run.eval, "threshold.value")) for run in runs]
    captions = [f"{preds[0][k].get('source', '')} {preds[0][k].get('filename', '')}".strip() for k in keys]
    misses = select_misses(keys, labels, probs, thresholds, captions, per_kind)
    wanted = {m.key for m in misses}
    variants = {run.variant for run in runs} | {"equalized"}
    images = {v: shard_images(shards_root / v, wanted) for v in sorted(variants)}
    overlays = []
    for run in runs:
        with tempfile.TemporaryDirectory() as tmp:  # load_checkpoint reads a file; dvc.api gives bytes
            path = Path(tmp) / "best.pt"
            path.write_bytes(run_artifact(run, "checkpoint", repo))
            model = load_checkpoint(path).build()
        overlays.append(overlays_for(model, images[run.variant], device))
    names = [f"{run.model}/{run.variant} ({run.label})" for run in runs]
    both = int(((probs >= np.asarray(thresholds)[:, None]) != labels.astype(bool)).all(axis=0).sum())
    title = (f"Fig. 8: {both} of {len(keys)} test images are misclassified by all {len(runs)} models; the most "
             "confidently wrong false negatives and false positives, with each model's Grad-CAM")  # fmt: skip
    draw(misses, images["equalized"], overlays, names, title, out)
    return {"images_wrong_for_every_model": both, "shown": len(misses), "models": len(runs)}
