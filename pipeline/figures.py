"""Stage `figures`: the study's data figures, drawn from the user's own data, as PNGs for `dvc plots`.

- Fig. 1: frequency of the raw image dimensions (log scale), from the sizes
  `ingest` read in each header (no image is decoded for it);
- Figs. 2-3: per class, a few examples per split: the raw image (the top crop
  marked), its cumulative histogram, and the plain and equalized shard images
  side by side, i.e. exactly what the two model variants are trained on;
- one contact sheet per shard variant (the same images in both);
- `training_curves` (stage `curves`): train and validation loss on one chart,
  validation ROC AUC beside it, from dvclive's per-epoch files.

Matplotlib's object API (`Figure`, no pyplot) keeps no global state and needs
no display; sizes are fixed (no tight bounding box) so every PNG has a
known pixel size.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from skimage import exposure, util

from pipeline.errors import CxrError
from pipeline.fileio import save_figure
from pipeline.imageio import DecodeLimits
from pipeline.manifest import ManifestEntry, iter_manifest
from pipeline.preprocess import decode_image, to_grey_u8
from pipeline.shard_format import CLASS_NAMES, SPLITS, head_images, read_summary

WIDTH_IN = 16.0
EXAMPLE_ROW_IN = 3.0  # height of one example row in Figs. 2-3
TITLE_IN = 0.6
VARIANTS = ("plain", "equalized")
FIGURE_NAMES = {
    "dimensions": "fig1_dimensions.png",
    "negative": "fig2_negative_examples.png",
    "positive": "fig3_positive_examples.png",
    "plain": "contact_sheet_plain.png",
    "equalized": "contact_sheet_equalized.png",
}
CURVES_NAME = "training_curves.png"


def dimensions_figure(entries: Iterable[ManifestEntry], out: Path, top: int = 25) -> Path:
    """Fig. 1 for the images of train.txt (train and the validation carved from it), as the study's."""
    sizes = Counter((e.width, e.height) for e in entries if e.path.startswith("train/") and e.width)
    if not sizes:
        raise CxrError("the manifest records no image sizes: rerun `ingest` (older manifests lack them)")
    fig = Figure(figsize=(WIDTH_IN, 6.0), layout="constrained")
    bars, scatter = fig.subplots(1, 2, width_ratios=(3, 2))
    shown = sizes.most_common(top)
    bars.bar([f"{w}x{h}" for (w, h), _ in shown], [n for _, n in shown], color="#4477aa")
    bars.set_yscale("log")
    bars.set_ylabel("images (log scale)")
    bars.tick_params(axis="x", labelrotation=70, labelsize=8)
    rest = sum(sizes.values()) - sum(n for _, n in shown)
    bars.set_title(f"{len(sizes)} distinct sizes among {sum(sizes.values())} training images; "
                   f"the {len(shown)} most frequent shown ({rest} images in the others)")  # fmt: skip
    (ws, hs), counts = zip(*sizes.keys()), np.array(list(sizes.values()))
    scatter.scatter(ws, hs, s=12 + 60 * np.log10(counts), alpha=0.6, color="#cc6677")
    scatter.set_xscale("log")
    scatter.set_yscale("log")
    scatter.set_xlabel("width (px, log)")
    scatter.set_ylabel("height (px, log)")
    scatter.set_title("every size (marker area ~ log frequency)")
    fig.suptitle("Fig. 1: raw image dimensions (from the headers read by ingest)")
    return save_figure(fig, out)


def pick_examples(entries: list[ManifestEntry], label: int, per_split: int, usable: set[str]) -> list[ManifestEntry]:
    """The first `per_split` images of a class in each split (manifest order), among those in both variants."""
    chosen = []
    for split in SPLITS:
        chosen += [e for e in entries if e.split == split and e.label == label and e.key in usable][:per_split]
    return chosen


def raw_grey(root: Path, entry: ManifestEntry) -> np.ndarray:
    data = (root / entry.path).read_bytes()
    _, image = decode_image(data, DecodeLimits(max_pixels=1 << 31, min_side=1), entry.path)
    return to_grey_u8(image)


def examples_figure(
    examples: list[ManifestEntry], root: Path, shards: dict[str, dict[str, np.ndarray]], label: int, top_crop: float,
    out: Path,
) -> Path:  # fmt: skip
    """Figs. 2-3: one row per example: raw (top crop marked), cumulative histograms, plain, equalized."""
    if not examples:
        raise CxrError(f"no {CLASS_NAMES[label]} images in both shard variants to show")
    rows = len(examples)
    fig = Figure(figsize=(WIDTH_IN, TITLE_IN + EXAMPLE_ROW_IN * rows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, 4, width_ratios=(1.3, 1.4, 1, 1)))
    for row, entry in zip(axes, examples):
        raw = raw_grey(root, entry)
        row[0].imshow(raw, cmap="gray", vmin=0, vmax=255)
        row[0].axhline(raw.shape[0] * top_crop, color="#ee7733", linewidth=1.2)
        row[0].set_title(f"{entry.split} · {raw.shape[1]}x{raw.shape[0]} · {entry.source}", fontsize=9)
        row[0].set_ylabel(entry.filename[:28], fontsize=8)
        for name, img, colour in (("raw", raw, "#000000"), ("plain", shards["plain"][entry.key], "#4477aa"),
                                  ("equalized", shards["equalized"][entry.key], "#cc6677")):  # fmt: skip
            cdf, centres = exposure.cumulative_distribution(img, nbins=256)
            row[1].plot(centres, cdf, color=colour, label=name)
        row[1].set_xlim(0, 255)
        row[1].set_ylim(0, 1.01)
        row[1].legend(fontsize=8, loc="lower right")
        row[1].set_title("cumulative histogram", fontsize=9)
        for ax, variant in zip(row[2:], VARIANTS):
            ax.imshow(shards[variant][entry.key], cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{variant} shard image", fontsize=9)
        for ax in (row[0], row[2], row[3]):
            ax.set_xticks([])
            ax.set_yticks([])
    number = 3 if label else 2
    fig.suptitle(f"Fig. {number}: COVID-19 {CLASS_NAMES[label]} examples per split; orange line: the top crop "
                 f"({top_crop:.0%}, burned-in text)")  # fmt: skip
    return save_figure(fig, out)


def contact_sheet(images: list[np.ndarray], labels: list[int], variant: str, out: Path) -> Path:
    """skimage's montage of a variant's images, each tagged N/P in its corner."""
    per_row = int(np.ceil(np.sqrt(len(images))))
    rows = -(-len(images) // per_row)
    sheet = util.montage(np.stack(images), fill=0, padding_width=2, grid_shape=(rows, per_row))
    side = images[0].shape[0] + 2
    fig = Figure(figsize=(10.0, TITLE_IN + 10.0 * rows / per_row), layout="constrained")
    ax = fig.subplots()
    ax.imshow(sheet, cmap="gray", vmin=0, vmax=255)
    for i, label in enumerate(labels):
        y, x = divmod(i, per_row)
        ax.text(x * side + 6, y * side + 18, "P" if label else "N", fontsize=7, fontweight="bold",
                color="#ff5555" if label else "#55ccff")  # fmt: skip
    ax.set_axis_off()
    ax.set_title(f"{variant} shards: the first {len(images)} training images (N negative, P positive)")
    return save_figure(fig, out)


def write_data_figures(
    manifest: Path, ingest_report: Path, shards_root: Path, out_dir: Path, per_split: int = 2, sheet: int = 36
) -> dict[str, Any]:
    """Fig. 1, Figs. 2-3 and the two contact sheets into `out_dir`; returns {figure: path}."""
    root = Path(json.loads(ingest_report.read_text())["root"])
    summaries = {v: read_summary(shards_root / v) for v in VARIANTS}
    top_crop = float(summaries["equalized"].preprocess["top_crop"])
    # Examples and sheets come from the leading shards of each split (a seeded shuffle of it): picking
    # them in manifest order would read every shard of both variants, gigabytes at COVIDx CXR-4 size.
    shards = {v: head_images(shards_root / v, max(sheet, 3 * per_split)) for v in VARIANTS}
    usable = set(shards["plain"]) & set(shards["equalized"])
    # One pass over the manifest: Fig. 1 counts every image's size; only the entries shown are kept.
    shown: list[ManifestEntry] = []

    def every_entry() -> Iterator[ManifestEntry]:
        for e in iter_manifest(manifest):
            if e.key in usable:
                shown.append(e)
            yield e

    written = {"dimensions": dimensions_figure(every_entry(), out_dir / FIGURE_NAMES["dimensions"])}
    for label in (0, 1):
        chosen = pick_examples(shown, label, per_split, usable)
        name = CLASS_NAMES[label]
        written[name] = examples_figure(chosen, root, shards, label, top_crop, out_dir / FIGURE_NAMES[name])
    train = [e for e in shown if e.split == "train"][:sheet]
    for variant in VARIANTS:
        images = [shards[variant][e.key] for e in train]
        written[variant] = contact_sheet(images, [e.label for e in train], variant, out_dir / FIGURE_NAMES[variant])
    return {k: str(v) for k, v in written.items()}


def _read_series(path: Path) -> dict[int, float]:
    """A dvclive metric file (TSV: step, value, ...) -> {epoch (1-based): value}."""
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    name = path.stem
    return {int(r["step"]) + 1: float(r[name]) for r in rows if r.get(name) not in (None, "")}


def training_curves(live_dir: Path, out: Path) -> Path:
    """Train and validation loss on one chart, validation ROC AUC and accuracy beside it."""
    metrics = Path(live_dir) / "plots" / "metrics"
    series = {name: _read_series(metrics / f"{name}.tsv") for name in ("train_loss", "val_loss", "val_auc",
                                                                       "val_accuracy")}  # fmt: skip
    if not series["train_loss"] or not series["val_loss"]:
        raise CxrError(f"no training curves in {metrics} (train_loss.tsv, val_loss.tsv): run the train stage first")
    fig = Figure(figsize=(WIDTH_IN, 5.0), layout="constrained")
    loss_ax, score_ax = fig.subplots(1, 2)
    for name, colour in (("train_loss", "#4477aa"), ("val_loss", "#cc6677")):
        epochs, values = zip(*sorted(series[name].items()))
        loss_ax.plot(epochs, values, marker="o", markersize=3, color=colour, label=name.replace("_", " "))
    best = min(series["val_loss"], key=series["val_loss"].get)
    loss_ax.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"best val loss (epoch {best})")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("class-weighted BCE")
    loss_ax.legend()
    loss_ax.set_title("loss")
    for name, colour in (("val_auc", "#228833"), ("val_accuracy", "#aa7733")):
        if series[name]:
            epochs, values = zip(*sorted(series[name].items()))
            score_ax.plot(epochs, values, marker="o", markersize=3, color=colour, label=name.replace("_", " "))
    score_ax.axvline(best, color="grey", linestyle="--", linewidth=1)
    score_ax.set_ylim(0, 1.01)
    score_ax.set_xlabel("epoch")
    score_ax.legend()
    score_ax.set_title("validation ROC AUC (accuracy at 0.5)")
    fig.suptitle("Training curves")
    return save_figure(fig, out)
