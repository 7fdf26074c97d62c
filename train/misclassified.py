"""Fig. 8: the test images a model gets wrong, with Grad-CAM overlays of what drove its score.

`evaluate` draws it for its one checkpoint; `cxr report --misclassified`
draws the images wrong for EVERY model of an experiment set (the study's
Fig. 8: wrong for both ResNet50 and DenseNet121), one overlay per model.
False negatives (COVID-19 missed) come first, the most confidently wrong of
each kind; the images are the shard images the models actually saw.
"""

from __future__ import annotations

import csv
import io
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.figure import Figure

from pipeline.errors import CxrError
from pipeline.fileio import save_figure
from pipeline.shard_format import read_summary, shard_images
from train.calibration import PROB_COLUMN
from train.checkpoint import load_checkpoint
from train.gradcam import gradcam_heatmaps, overlay
from train.models import model_input

if TYPE_CHECKING:
    from train.runs import Run

FIGURE_NAME = "fig8_misclassified.png"
CELL_IN = 2.4  # inches per image cell


@dataclass(frozen=True)
class Miss:
    key: str
    kind: str  # "FN" (positive called negative) or "FP"
    probs: tuple[float, ...]  # P(COVID-19) by each model, in model order
    caption: str  # source / filename


def select_misses(
    keys: Sequence[str], labels: np.ndarray, probs: np.ndarray, thresholds: Sequence[float], captions: Sequence[str],
    per_kind: int,
) -> list[Miss]:  # fmt: skip
    """Images wrong for every model (probs: (models, N)); the `per_kind` most confident FNs, then FPs."""
    probs = np.atleast_2d(probs)
    predicted = probs >= np.asarray(thresholds, dtype=np.float64)[:, None]
    wrong = (predicted != labels.astype(bool)[None, :]).all(axis=0)
    mean = probs.mean(axis=0)
    out = []
    for kind, label, order in (("FN", 1, np.argsort(mean, kind="stable")), ("FP", 0, np.argsort(-mean, kind="stable"))):
        picked = [i for i in order if wrong[i] and labels[i] == label][:per_kind]
        out += [Miss(keys[i], kind, tuple(float(p) for p in probs[:, i]), captions[i]) for i in picked]
    return out


def draw(misses: list[Miss], images: dict[str, np.ndarray], overlays: list[dict[str, np.ndarray]],
         model_names: Sequence[str], title: str, out: Path) -> Path:  # fmt: skip
    """One row per image: the shard image, then one Grad-CAM overlay per model."""
    cols = 1 + len(model_names)
    rows = max(len(misses), 1)
    fig = Figure(figsize=(CELL_IN * cols + 0.4, CELL_IN * rows + 0.8), layout="constrained")  # title: 3 lines
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    if not misses:
        for ax in axes.ravel():
            ax.set_axis_off()
        axes[0, 0].text(0.0, 0.5, "no test image is misclassified\nby every model", fontsize=12, va="center")
    for row, miss in zip(axes, misses):
        row[0].imshow(images[miss.key], cmap="gray", vmin=0, vmax=255)
        row[0].set_title(f"{miss.kind} · {miss.caption[:30]}", fontsize=8)
        for ax, name, maps, prob in zip(row[1:], model_names, overlays, miss.probs):
            ax.imshow(maps[miss.key])
            ax.set_title(f"{name}\nP(COVID-19) = {prob:.2f}", fontsize=8)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(textwrap.fill(title, width=int(11 * (CELL_IN * cols + 0.4))), fontsize=9)
    return save_figure(fig, out)


def overlays_for(model: torch.nn.Module, images: dict[str, np.ndarray], device: torch.device) -> dict[str, np.ndarray]:
    """Grad-CAM of the COVID-19 logit over each image, as RGB overlays."""
    if not images:
        return {}
    keys = sorted(images)
    x = model_input(np.stack([images[k] for k in keys]), device)
    model = model.to(device)
    return {k: overlay(images[k], heat) for k, heat in zip(keys, gradcam_heatmaps(model, x))}


def model_figure(model: torch.nn.Module, name: str, shards_dir: Path | str, keys: Sequence[str], labels: np.ndarray,
                 probs: np.ndarray, threshold: float, captions: Sequence[str], out: Path, per_kind: int = 4,
                 device: torch.device | None = None) -> Path:  # fmt: skip
    """`evaluate`'s Fig. 8: one checkpoint's most confident false negatives and false positives on test."""
    misses = select_misses(keys, labels, probs[None, :], [threshold], captions, per_kind)
    summary = read_summary(shards_dir)
    images = shard_images(summary.location, {m.key for m in misses})
    maps = overlays_for(model, images, device or torch.device("cpu"))
    n_fn = int(((probs < threshold) & (labels == 1)).sum())
    n_fp = int(((probs >= threshold) & (labels == 0)).sum())
    title = (f"Fig. 8: {name} on test ({summary.variant} shards), threshold {threshold:.3g}: {n_fn} false negatives, "
             f"{n_fp} false positives; the most confident shown with Grad-CAM of the COVID-19 logit")  # fmt: skip
    return draw(misses, images, [maps], [name], title, out)


def evaluate_figure(checkpoint_path: Path, result, out: Path, device: torch.device | None = None) -> Path:
    """Fig. 8 for an `evaluate_shards` result (train.evaluate.EvalResult) of the checkpoint at `checkpoint_path`."""
    ckpt = load_checkpoint(checkpoint_path)
    test = result.test
    captions = [f"{m.get('source', '')} {m.get('filename', '')}".strip() for m in test.meta]
    threshold = float(result.report["threshold"]["value"])
    # the shards as evaluate read them: a folder or a URL (Path() would fold a URL's "//")
    return model_figure(ckpt.build(), ckpt.model_name, result.report["shards"], test.keys, test.labels,
                        test.probs, threshold, captions, out, device=device)  # fmt: skip


def _predictions(data: bytes, label: str) -> dict[str, dict[str, str]]:
    """key -> row, with `probability` the score the run's threshold applies to: the calibrated
    column of current runs, or the `probability` column of runs from before calibration."""
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    column = next((c for c in (PROB_COLUMN, "probability") if rows and c in rows[0]), None)
    if not rows or column is None or not {"key", "label"} <= set(rows[0]):
        raise CxrError(f"run {label}: its predictions CSV lacks key/label/{PROB_COLUMN} columns")
    return {r["key"]: {**r, "probability": r[column]} for r in rows}


def report_figure(runs: Sequence["Run"], repo: Path, shards_root: Path, out: Path, per_kind: int = 4,
                  device: torch.device | None = None) -> dict[str, int]:  # fmt: skip
    """The study's Fig. 8 over an experiment set: test images wrong for EVERY run, one Grad-CAM per run.

    Each run's overlay is drawn on the shard image of its own variant (what
    that model saw); the first column shows the equalized image, as the study's.
    """
    # Imported here: the evaluate stage runs this module but not the report's run collection.
    from train.runs import get, run_artifact

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
