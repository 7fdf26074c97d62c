"""Fig. 8, the drawing shared by its two users: test images that models get wrong, with Grad-CAM overlays.

`evaluate` draws it for its one checkpoint (train/evaluation/misclassified.py); `cxr report
--misclassified` draws the images wrong for EVERY model of an experiment set (the study's Fig. 8:
wrong for both ResNet50 and DenseNet121), one overlay per model (train/report/misclassified.py).
False negatives (COVID-19 missed) come first, the most confidently wrong of each kind; the images
are the shard images the models actually saw.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from pipeline.fileio import save_figure
from train.gradcam import gradcam_heatmaps, overlay
from train.models import model_input

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
