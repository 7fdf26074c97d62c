"""Fig. 8 of `evaluate`: one checkpoint's most confidently wrong test images, with Grad-CAM."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.shard_format import read_summary, shard_images
from train.checkpoint import load_checkpoint
from train.misclassified import FIGURE_NAME, draw, overlays_for, select_misses

__all__ = ["FIGURE_NAME", "evaluate_figure", "model_figure"]


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
    """Fig. 8 for an `evaluate_shards` result (train.evaluation.evaluate.EvalResult) of the checkpoint at `checkpoint_path`."""
    ckpt = load_checkpoint(checkpoint_path)
    test = result.test
    captions = [f"{m.get('source', '')} {m.get('filename', '')}".strip() for m in test.meta]
    threshold = float(result.report["threshold"]["value"])
    # the shards as evaluate read them: a folder or a URL (Path() would fold a URL's "//")
    return model_figure(ckpt.build(), ckpt.model_name, result.report["shards"], test.keys, test.labels,
                        test.probs, threshold, captions, out, device=device)  # fmt: skip
