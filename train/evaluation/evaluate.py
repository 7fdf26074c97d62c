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

External testing (train/evaluation/external.py) scores another COVIDx-layout root's test split
through the checkpoint's own preprocessing, without shards, into a separate file.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.errors import CxrError
from pipeline.fileio import atomic_write_csv, atomic_write_json, atomic_write_text
from pipeline.ownership import claim_folder
from pipeline.params import EvaluateParams, TrainParams
from pipeline.shard_format import CLASS_NAMES, ShardSummary, audit_shards, read_summary
from train import calibration as calibration_mod
from train import metrics
from train.checkpoint import Checkpoint, load_checkpoint
from train.data import eval_batches
from train.inference import Engine
from train.runtime import pick_device


# What evaluation reads of a sample's metadata: the predictions CSV, the patient-level intervals,
# the per-source table and Fig. 8's captions.
FACT_FIELDS = ("source", "patient_id", "filename")
_ABSENT = object()  # a field the sample's metadata did not have (kept apart from an explicit None)


class ImageFacts(Sequence):
    """Per image, the fields of FACT_FIELDS its metadata has, kept in columns; item i is its dict.

    The shard's whole metadata dict per image, held until the metrics were computed, was about half
    of what the metrics stage held per test image (`cxr bench-scale`: 488-518 bytes an image); here
    an image costs three list slots, its file name, and strings that repeat (source, patient id)
    interned. Built a batch at a time, so the batches' dicts never all exist at once.
    """

    __slots__ = ("_columns",)

    def __init__(self, metas: Iterable[Mapping[str, Any]] = ()):
        self._columns: dict[str, list[Any]] = {field: [] for field in FACT_FIELDS}
        self.extend(metas)

    def extend(self, metas: Iterable[Mapping[str, Any]]) -> None:
        for meta in metas:
            for field, column in self._columns.items():
                value = meta.get(field, _ABSENT)
                column.append(sys.intern(value) if isinstance(value, str) and field != "filename" else value)

    def __len__(self) -> int:
        return len(self._columns[FACT_FIELDS[0]])

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return {field: column[index] for field, column in self._columns.items() if column[index] is not _ABSENT}


@dataclass(frozen=True)
class Predictions:
    keys: list[str]
    labels: np.ndarray  # int64 (N,)
    probs: np.ndarray  # float64 (N,), calibrated P(positive) (at the validation prevalence)
    meta: Sequence[Mapping[str, Any]]  # per image: source, patient_id, filename (ImageFacts)
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
    keys, labels, probs, meta = [], [], [], ImageFacts()
    for batch in batches:
        probs.append(engine.probabilities(batch["image"]))
        if progress is not None:
            progress.update(len(batch["key"]))
        labels.append(batch["label"].numpy())
        keys += list(batch["key"])
        meta.extend(batch["meta"])
    if not keys:  # the caller says why (no shards, every image rejected)
        return Predictions([], np.empty(0, np.int64), np.empty(0, np.float64), ImageFacts(), np.empty(0, np.float64))
    raw = np.concatenate(probs).astype(np.float64)
    broken = ~np.isfinite(raw) | (raw < 0) | (raw > 1)
    if broken.any():  # every metric over a NaN is wrong (a NaN is "negative" at any threshold): stop here
        first = keys[int(np.argmax(broken))]
        raise CxrError(f"the model gave a non-finite or out-of-range probability for {int(broken.sum())} of "
                       f"{len(keys)} images (first: {first}); the model is broken, no metrics computed")  # fmt: skip
    return Predictions(keys, np.concatenate(labels).astype(np.int64), calibration_mod.apply(raw, calibration), meta, raw)


def identity(ckpt: Checkpoint) -> dict[str, Any]:
    return {
        "name": ckpt.model_name,
        "variant": ckpt.variant,
        "checkpoint": str(ckpt.path),
        "checkpoint_sha256": ckpt.file_sha256(),
        "epoch": ckpt.meta.get("epoch"),
        "input_size": ckpt.input_size,
        # what training started from (scratch, imagenet or a checkpoint; train/fit/starting_weights.py)
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
    evaluate: EvaluateParams,
    train: TrainParams,
    seed: int,
    engine: str = "auto",
    show_progress: bool = False,
) -> EvalResult:
    """Test and validation metrics of a checkpoint on the shards of its own variant (a folder or URL).

    `engine`: auto (ONNX Runtime when it matches PyTorch, see train/inference.py), onnxruntime or eager.
    """
    ckpt = load_checkpoint(checkpoint_path)
    ckpt.threshold  # a resume checkpoint (last.pt) is refused before any image is scored
    summary = read_summary(shards_dir or Path("shards") / ckpt.variant)
    _check_compatible(ckpt, summary)
    # Every split, train too: a test key that is also a train (or val) key is a leak the metrics would hide.
    audit_shards(summary)
    runner = Engine(ckpt, engine, pick_device())
    threshold = ckpt.threshold_record
    cal = ckpt.meta.get("calibration")
    preds = {}
    for split in ("test", "val"):
        batches = eval_batches(summary, split, evaluate.batch_size, train.num_workers)
        with tqdm(total=summary.split(split).count, desc=f"evaluate {split}", unit="img", disable=not show_progress,
                  leave=False) as bar:  # fmt: skip
            preds[split] = predict_batches(runner, batches, bar, cal)
    for split, pred in preds.items():  # eval_batches asserts this too; a metric over a partial split is wrong
        if len(pred.keys) != summary.split(split).count:
            expected = summary.split(split).count
            raise CxrError(f"scored {len(pred.keys)} {split} images, the shard summary says {expected}")
    test = split_report(preds["test"], ckpt.threshold, evaluate, seed)
    n_test = test.pop("n")
    report = {
        "model": identity(ckpt),
        "threshold": threshold,
        "n_test": n_test,
        **test,
        "val": split_report(preds["val"], ckpt.threshold, evaluate, seed),
        "calibration_model": cal or calibration_mod.IDENTITY,
        "shards": summary.location,
        # Images shared between label files (ingest's data.leaks): nonzero means test may overlap training.
        "leaks_between_splits": summary.raw.get("leak_count", 0),
        "device": str(runner.device),
        "inference": runner.describe(),
    }
    return EvalResult(report, preds["test"], preds["val"])


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


PLOT_FILES = ("roc.json", "pr.json", "confusion.csv", "reliability_test.json", "reliability_val.json")
PLOT_NAMES = tuple(re.compile(re.escape(name)) for name in PLOT_FILES)


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


def headline(r: dict[str, Any], out: Path) -> dict[str, Any]:
    """The few numbers `cxr evaluate` prints on stdout (as JSON); the full report is in OUT."""
    calibration = {k: r["calibration"][k] for k in ("brier", "brier_uncalibrated", "ece", "ece_uncalibrated")}
    return {"out": str(out), "n_test": r["n_test"], "threshold": r["threshold"]["value"], "accuracy": r["accuracy"],
            "macro_f1": r["macro"]["f1"], "roc_auc": r["roc_auc"], "roc_auc_ci95": r["roc_auc_ci95"],
            "sensitivity": r["sensitivity"], "specificity": r["specificity"], "engine": r["inference"]["engine"],
            "calibration": calibration}  # fmt: skip


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
