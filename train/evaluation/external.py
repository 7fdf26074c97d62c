"""Stage `external`: a checkpoint over another COVIDx-layout root's test split, without shards.

Images go through the checkpoint's own preprocessing (the shard stage's code path) and are
scored into the metrics layout of train/evaluation/evaluate.py, plus a `dataset` block: the root, its
label lines and every rejected line or image with its reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.errors import CxrError
from pipeline.fileio import atomic_write_json
from pipeline.imageio import ImageRejected
from pipeline.labels import open_inside, parse_label_file, read_image_file
from pipeline.params import DataParams, EvaluateParams, TrainParams
from pipeline.preprocess import PreprocessConfig, preprocess_bytes
from pipeline.rejects import check_reject_fraction
from train import calibration as calibration_mod
from train.checkpoint import load_checkpoint
from train.evaluation.evaluate import EvalResult, identity, predict_batches, split_report
from train.inference import Engine, batched, ordered_prefetch
from train.runtime import pick_device


def external_test_items(root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """ROOT/test.txt -> images to score (ROOT/test/<filename>) and label lines rejected with reasons.

    Filenames that would escape ROOT are rejected by the label parser; a file that
    is a symlink out of ROOT, a folder or unreadable is rejected here with its reason.
    """
    lines, bad = parse_label_file(root / "test.txt")
    rejects = [{"line": r.line_no, "text": r.text, "reason": r.reason} for r in bad]
    items, seen = [], set()
    for line in lines:
        if line.filename in seen:
            rejects.append({"line": line.line_no, "filename": line.filename, "reason": "duplicate filename in test.txt"})
            continue
        seen.add(line.filename)
        opened = open_inside(root, f"test/{line.filename}")
        if isinstance(opened, str):
            rejects.append({"line": line.line_no, "filename": line.filename, "reason": opened})
            continue
        os.close(opened[0])
        items.append(
            {
                "key": f"ext_{line.line_no:06d}",
                "path": root / "test" / line.filename,
                "root": str(root),
                "relative": f"test/{line.filename}",
                "label": line.label,
                "source": line.source,
                "patient_id": line.patient_id,
                "filename": line.filename,
            }
        )
    return items, rejects


def _load_external(item: dict[str, Any], cfg: PreprocessConfig) -> np.ndarray | str:
    """Preprocessed image, or the reason it was rejected."""
    # Re-checked inside ROOT when read (a link swapped in since the listing is refused), and a file
    # over the decode bound is refused from its size before a byte of it is read.
    data = read_image_file(item["root"], item["relative"], cfg.max_decoded_bytes)
    if isinstance(data, str):
        return data
    try:
        return preprocess_bytes(data, cfg, str(item["path"]))
    except ImageRejected as exc:
        return str(exc)


def _external_batches(
    items: list[dict[str, Any]], cfg: PreprocessConfig, batch_size: int, workers: int, rejects: list[dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    """Batches of the readable images, decoded in threads while the model scores the batch before;
    each unreadable one is appended to `rejects` with its reason."""
    loaded = ordered_prefetch(items, lambda item: _load_external(item, cfg), workers, ahead=2 * batch_size)
    for chunk in batched(loaded, batch_size):
        rejects += [{"filename": item["filename"], "reason": img} for item, img in chunk if isinstance(img, str)]
        chunk = [(item, img) for item, img in chunk if not isinstance(img, str)]
        if not chunk:
            continue
        yield {
            "image": torch.from_numpy(np.stack([img for _, img in chunk])[:, None]),
            "label": torch.tensor([int(item["label"]) for item, _ in chunk], dtype=torch.int64),
            "key": [item["key"] for item, _ in chunk],
            "meta": [{k: item[k] for k in ("source", "patient_id", "filename")} for item, _ in chunk],
        }


def evaluate_external(
    checkpoint_path: Path,
    items: list[dict[str, Any]],
    label_rejects: list[dict[str, Any]],
    root: str,
    evaluate: EvaluateParams,
    data: DataParams,
    train: TrainParams,
    seed: int,
    engine: str = "auto",
    show_progress: bool = False,
    rejects_path: Path | None = None,
) -> EvalResult:
    """Score an external test set: `items` = [{key, path, label, source, patient_id, filename}].

    Images go through the checkpoint's own preprocessing (the shards' code path),
    so an external number measures the model, not a preprocessing mismatch. A
    rejected image is listed with its reason; too many rejects is an error, and
    then every reject is written to `rejects_path`. Params: evaluate.*, data.max_reject_fraction,
    train.num_workers (decoding threads) and seed.
    """
    ckpt = load_checkpoint(checkpoint_path)
    ckpt.threshold  # a resume checkpoint (last.pt) is refused before any image is scored
    cfg = PreprocessConfig.from_dict(ckpt.preprocess)
    runner = Engine(ckpt, engine, pick_device())
    rejects = list(label_rejects)
    total = len(items) + len(label_rejects)
    # decoding releases the GIL (OpenCV, Pillow): threads suffice
    threads = max(1, train.num_workers or os.cpu_count() or 1)
    with tqdm(total=len(items), desc="score external", unit="img", disable=not show_progress, leave=False) as bar:
        pred = predict_batches(runner, _external_batches(items, cfg, evaluate.batch_size, threads, rejects), bar,
                               ckpt.meta.get("calibration"))
    if total == 0:
        raise CxrError(f"{root}: test.txt lists no images")

    def write_rejects(message: str) -> Path:
        if rejects_path is None:
            return Path("(not written: no rejects path given)")
        atomic_write_json(rejects_path, {"failed": message, "root": root, "label_lines": total,
                                         "reject_count": len(rejects), "rejects": rejects})  # fmt: skip
        return rejects_path

    check_reject_fraction(rejects, total, data.max_reject_fraction, "test images", root, write_rejects)
    if not pred.keys:
        raise CxrError(f"{root}: no readable test images to evaluate")
    threshold = ckpt.threshold_record
    test = split_report(pred, ckpt.threshold, evaluate, seed)
    n_test = test.pop("n")
    report = {
        "model": identity(ckpt),
        "threshold": threshold,
        "n_test": n_test,
        **test,
        "dataset": {"root": root, "label_lines": total, "reject_count": len(rejects), "rejects": rejects},
        "calibration_model": ckpt.meta.get("calibration") or calibration_mod.IDENTITY,
        "device": str(runner.device),
        "inference": runner.describe(),
    }
    return EvalResult(report, pred)
