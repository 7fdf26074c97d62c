"""Stage `evaluate`: a checkpoint over the test and validation shards -> metrics, predictions, plots.

Every probability below is CALIBRATED (the checkpoint's `calibration`, fitted
on validation, train/calibration.py): P(COVID-19) at the validation prevalence.
Layout of the metrics JSON (`metrics/eval.json`):

- top level: the TEST split at the operating threshold the trainer chose on
  (calibrated) validation scores (`threshold` = the checkpoint's {value, rule, split, ...}):
  `accuracy`, `negative`/`positive` {precision, recall, f1, support}, `macro`
  {precision, recall, f1}, `confusion` {tn, fp, fn, tp}, `sensitivity`,
  `specificity`, `ppv`, `npv` (each {value, ci95, ci95_wilson, count}),
  `accuracy_ci95`, `positive_f1_ci95`, `macro_f1_ci95`, `at_prevalence`
  (PPV/NPV at evaluate.prevalence), `by_source`; the threshold-free `roc_auc`,
  `roc_auc_ci95`, `pr_auc`; `calibration` (Brier and ECE before and after);
  `intervals` (each interval's method, resamples, seed, patients, images);
  `n_test`, `n_patients`, `positives`, `negatives`;
- `at_0_5`: the same threshold-dependent block at 0.5 on the UNCALIBRATED
  output (the study's rule);
- `val`: the validation split in the same layout (its own `at_0_5` included);
- `model`: checkpoint identity (path, sha256, model, variant, epoch);
  `calibration_model`: the mapping applied.

External testing scores another COVIDx-layout root's test split through the
checkpoint's own preprocessing, without shards, into a separate file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.errors import CxrError
from pipeline.fileio import atomic_write_csv, atomic_write_json, atomic_write_text
from pipeline.imageio import ImageRejected
from pipeline.labels import open_inside, parse_label_file
from pipeline.ownership import claim_folder
from pipeline.params import EvaluateParams
from pipeline.preprocess import PreprocessConfig, preprocess_bytes
from pipeline.rejects import check_reject_fraction
from pipeline.shard_format import CLASS_NAMES, ShardSummary, read_summary
from train import calibration as calibration_mod
from train import metrics
from train.checkpoint import Checkpoint, load_checkpoint
from train.data import eval_batches
from train.inference import Engine, batched, ordered_prefetch
from train.runtime import pick_device


@dataclass(frozen=True)
class Predictions:
    keys: list[str]
    labels: np.ndarray  # int64 (N,)
    probs: np.ndarray  # float64 (N,), calibrated P(positive) (at the validation prevalence)
    meta: list[dict[str, Any]]  # per image: source, patient_id, filename, ...
    raw: np.ndarray  # float64 (N,), the network's own sigmoid output, before calibration

    @property
    def sources(self) -> list[str]:
        return [str(m.get("source", "unknown")) for m in self.meta]

    @property
    def patients(self) -> list[str]:
        # an image without a patient id is its own patient (never pooled with another)
        return [str(m.get("patient_id") or f"<image {k}>") for k, m in zip(self.keys, self.meta)]


@dataclass(frozen=True)
class EvalResult:
    report: dict[str, Any]
    test: Predictions
    val: Predictions | None = None  # None for an external set (no validation split)


def predict_batches(
    engine: Engine, batches: Iterable[dict[str, Any]], progress: tqdm | None = None, calibration: dict | None = None
) -> Predictions:
    """Probabilities for uint8 (B, 1, H, W) batches, in the order given: raw and calibrated
    (`calibration`, the checkpoint's); `progress` counts images."""
    keys, labels, probs, meta = [], [], [], []
    for batch in batches:
        probs.append(engine.probabilities(batch["image"]))
        if progress is not None:
            progress.update(len(batch["key"]))
        labels.append(batch["label"].numpy())
        keys += list(batch["key"])
        meta += list(batch["meta"])
    if not keys:  # the caller says why (no shards, every image rejected)
        return Predictions([], np.empty(0, np.int64), np.empty(0, np.float64), [], np.empty(0, np.float64))
    raw = np.concatenate(probs).astype(np.float64)
    return Predictions(keys, np.concatenate(labels).astype(np.int64), calibration_mod.apply(raw, calibration), meta, raw)


def identity(ckpt: Checkpoint) -> dict[str, Any]:
    return {
        "name": ckpt.model_name,
        "variant": ckpt.variant,
        "checkpoint": str(ckpt.path),
        "checkpoint_sha256": ckpt.file_sha256(),
        "epoch": ckpt.meta.get("epoch"),
        "input_size": ckpt.input_size,
        # what training started from (scratch, imagenet or a checkpoint; train/pretrained.py)
        "init": ckpt.meta.get("init", {"kind": "scratch", "freeze": "none"}),
    }


def split_report(pred: Predictions, threshold: float, params: EvaluateParams, seed: int) -> dict[str, Any]:
    """The metrics layout described in the module docstring, for one split."""
    report = metrics.split_metrics(pred.labels, pred.probs, threshold, params.bootstrap, seed, groups=pred.patients,
                                   prevalence=params.prevalence, probs_at_0_5=pred.raw)  # fmt: skip
    report["by_source"] = metrics.by_source(pred.labels, pred.probs, pred.sources, threshold)
    report["at_0_5"]["threshold"] = 0.5
    report["at_0_5"]["applied_to"] = "uncalibrated network output (the study's rule)"
    report["at_0_5"]["by_source"] = metrics.by_source(pred.labels, pred.raw, pred.sources, 0.5)
    report["calibration"] = calibration_mod.calibration_report(pred.labels, pred.raw, pred.probs)
    return report


def _check_compatible(ckpt: Checkpoint, summary: ShardSummary) -> None:
    if summary.variant != ckpt.variant:
        raise CxrError(
            f"{summary.location} holds the {summary.variant!r} variant but the checkpoint was trained on "
            f"{ckpt.variant!r}: pass --shards shards/{ckpt.variant}"
        )
    if summary.preprocess != ckpt.preprocess:
        raise CxrError(
            f"{summary.location} was preprocessed with {summary.preprocess}, the checkpoint with {ckpt.preprocess}: "
            "re-shard or pass the matching --shards"
        )


def evaluate_shards(
    checkpoint_path: Path,
    shards_dir: Path | str | None,
    params: EvaluateParams,
    seed: int,
    num_workers: int,
    engine: str = "auto",
    show_progress: bool = False,
) -> EvalResult:
    """Test and validation metrics of a checkpoint on the shards of its own variant (a folder or URL).

    `engine`: auto (ONNX Runtime when it matches PyTorch, see train/inference.py), onnxruntime or eager.
    """
    ckpt = load_checkpoint(checkpoint_path)
    summary = read_summary(shards_dir or Path("shards") / ckpt.variant)
    _check_compatible(ckpt, summary)
    runner = Engine(ckpt, engine, pick_device())
    threshold = ckpt.threshold_record
    cal = ckpt.meta.get("calibration")
    preds = {}
    for split in ("test", "val"):
        batches = eval_batches(summary, split, params.batch_size, num_workers)
        with tqdm(total=summary.split(split).count, desc=f"evaluate {split}", unit="img", disable=not show_progress,
                  leave=False) as bar:  # fmt: skip
            preds[split] = predict_batches(runner, batches, bar, cal)
    for split, pred in preds.items():  # eval_batches asserts this too; a metric over a partial split is wrong
        if len(pred.keys) != summary.split(split).count:
            expected = summary.split(split).count
            raise CxrError(f"scored {len(pred.keys)} {split} images, the shard summary says {expected}")
    test = split_report(preds["test"], ckpt.threshold, params, seed)
    n_test = test.pop("n")
    report = {
        "model": identity(ckpt),
        "threshold": threshold,
        "n_test": n_test,
        **test,
        "val": split_report(preds["val"], ckpt.threshold, params, seed),
        "calibration_model": cal or calibration_mod.IDENTITY,
        "shards": summary.location,
        # Images shared between label files (ingest's data.leaks): nonzero means test may overlap training.
        "leaks_between_splits": summary.raw.get("leak_count", 0),
        "device": str(runner.device),
        "inference": runner.describe(),
    }
    return EvalResult(report, preds["test"], preds["val"])


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
                "label": line.label,
                "source": line.source,
                "patient_id": line.patient_id,
                "filename": line.filename,
            }
        )
    return items, rejects


def _load_external(item: dict[str, Any], cfg: PreprocessConfig) -> np.ndarray | str:
    """Preprocessed image, or the reason it was rejected."""
    try:
        data = Path(item["path"]).read_bytes()
    except OSError as exc:
        return f"cannot read {item['path']}: {exc.strerror or exc}"
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
    params: EvaluateParams,
    seed: int,
    max_reject_fraction: float,
    workers: int,
    root: str,
    engine: str = "auto",
    show_progress: bool = False,
    rejects_path: Path | None = None,
) -> EvalResult:
    """Score an external test set: `items` = [{key, path, label, source, patient_id, filename}].

    Images go through the checkpoint's own preprocessing (the shards' code path),
    so an external number measures the model, not a preprocessing mismatch. A
    rejected image is listed with its reason; too many rejects is an error, and
    then every reject is written to `rejects_path`.
    """
    ckpt = load_checkpoint(checkpoint_path)
    cfg = PreprocessConfig.from_dict(ckpt.preprocess)
    runner = Engine(ckpt, engine, pick_device())
    rejects = list(label_rejects)
    total = len(items) + len(label_rejects)
    threads = max(1, workers or os.cpu_count() or 1)  # decoding releases the GIL (OpenCV, Pillow): threads suffice
    with tqdm(total=len(items), desc="score external", unit="img", disable=not show_progress, leave=False) as bar:
        pred = predict_batches(runner, _external_batches(items, cfg, params.batch_size, threads, rejects), bar,
                               ckpt.meta.get("calibration"))
    if total == 0:
        raise CxrError(f"{root}: test.txt lists no images")

    def write_rejects(message: str) -> Path:
        if rejects_path is None:
            return Path("(not written: no rejects path given)")
        atomic_write_json(rejects_path, {"failed": message, "root": root, "label_lines": total,
                                         "reject_count": len(rejects), "rejects": rejects})  # fmt: skip
        return rejects_path

    check_reject_fraction(rejects, total, max_reject_fraction, "test images", root, write_rejects)
    if not pred.keys:
        raise CxrError(f"{root}: no readable test images to evaluate")
    threshold = ckpt.threshold_record
    test = split_report(pred, ckpt.threshold, params, seed)
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


def write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, indent=1)


def write_predictions(path: Path, pred: Predictions, threshold: float) -> None:
    predicted = metrics.predict_labels(pred.probs, threshold)
    rows = [["key", "source", "patient_id", "filename", "label", calibration_mod.PROB_COLUMN,
             calibration_mod.RAW_COLUMN, "predicted_at_operating_threshold"]]  # fmt: skip
    for key, meta, label, prob, raw, hat in zip(pred.keys, pred.meta, pred.labels, pred.probs, pred.raw, predicted):
        where = [meta.get(k, "") for k in ("source", "patient_id", "filename")]
        rows.append([key, *where, int(label), f"{prob:.6f}", f"{raw:.6f}", int(hat)])
    atomic_write_csv(path, rows)


PLOT_NAMES = tuple(re.compile(re.escape(name)) for name in
                   ("roc.json", "pr.json", "confusion.csv", "reliability_test.json", "reliability_val.json"))


def write_plots(plots_dir: Path, pred: Predictions, threshold: float, val: Predictions | None = None) -> None:
    """ROC and PR points (JSON lists), reliability diagrams (test, and val when given) and one
    (actual, predicted) row per image for DVC's confusion template."""
    claim_folder(plots_dir, "evaluate-plots", PLOT_NAMES)
    write_json(plots_dir / "roc.json", metrics.roc_points(pred.labels, pred.probs))
    write_json(plots_dir / "reliability_test.json", calibration_mod.reliability(pred.labels, pred.probs))
    if val is not None:
        write_json(plots_dir / "reliability_val.json", calibration_mod.reliability(val.labels, val.probs))
    write_json(plots_dir / "pr.json", metrics.pr_points(pred.labels, pred.probs))
    predicted = metrics.predict_labels(pred.probs, threshold)
    rows = "".join(f"{CLASS_NAMES[a]},{CLASS_NAMES[b]}\n" for a, b in zip(pred.labels, predicted))
    atomic_write_text(plots_dir / "confusion.csv", "actual,predicted\n" + rows)


def write_outputs(result: EvalResult, out: Path, predictions: Path | None, plots_dir: Path | None) -> None:
    threshold = float(result.report["threshold"]["value"])
    if predictions is not None:
        write_predictions(predictions, result.test, threshold)
    if plots_dir is not None:
        write_plots(plots_dir, result.test, threshold, result.val)
    write_json(out, result.report)


def human_summary(r: dict[str, Any], out: Path) -> str:
    """A few lines a person reads after `evaluate`, beside the JSON a machine reads."""

    def pct(block) -> str:
        value = block.get("value") if isinstance(block, dict) else block
        return "n/a" if value is None else f"{100 * value:.1f}%"

    c = r.get("confusion", {})
    auc = "n/a" if r.get("roc_auc") is None else f"{r['roc_auc']:.3f}"
    ci = r.get("roc_auc_ci95")
    auc += f" (95% CI {ci['low']:.3f}-{ci['high']:.3f}, patients resampled)" if ci else ""
    return "\n".join([
        f"{r['model']['name']}/{r['model']['variant']} on {r['n_test']} test images, threshold "
        f"{r['threshold']['value']:.3g} (chosen on validation by {r['threshold'].get('rule', '?')}):",
        f"  sensitivity {pct(r.get('sensitivity'))}  specificity {pct(r.get('specificity'))}  "
        f"accuracy {pct(r.get('accuracy'))}  ROC AUC {auc}",
        f"  missed COVID-19 (FN) {c.get('fn', '?')}, false alarms (FP) {c.get('fp', '?')}; details in {out}",
    ])  # fmt: skip
