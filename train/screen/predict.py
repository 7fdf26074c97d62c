"""Screen new images: files, folders and globs (PNG, JPEG, TIFF, DICOM) -> a CSV of decisions.

Everything that defines the model's behaviour comes from the model artifact,
never from flags (train/screen/screening_model.py: preprocessing, engine,
calibration, threshold, decision); each row's `engine` column says which engine
scored it. Inputs are read as train/screen/inputs.py reads them.

An input that cannot be read gets a row with its reason and the run goes on;
the caller turns `PredictSummary.failed` into the exit code. Rows are streamed
to the CSV batch by batch (flushed), so a crash or kill keeps every row
decided so far; the CSV and the heatmap folder are replaced only when they are
this command's own (pipeline.ownership).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.errors import CxrError
from pipeline.fileio import check_output_path, spreadsheet_safe
from pipeline.ownership import claim_folder
from pipeline.shard_format import CLASS_NAMES
from train.calibration import PROB_COLUMN
from train.gradcam import gradcam_heatmaps, write_overlay
from train.inference import batched, ordered_prefetch
from train.models import model_input
from train.screen.inputs import collect_inputs, load_or_reason
from train.screen.screening_model import ScreeningModel

# The probability column is calibrated (Platt, fitted on validation): P(COVID-19) at the validation prevalence.
# out_of_distribution: true/false by the model's gate (train/ood.py), empty when the model has none; a flagged
# image keeps its probability but gets no decision.
CSV_COLUMNS = ("path", PROB_COLUMN, "decision", "threshold", "out_of_distribution", "ood_score", "model", "engine",
               "error")  # fmt: skip
# headers of CSVs an older `cxr predict` wrote: still this command's own, so still replaceable
_OLD_HEADERS = (f"path,{PROB_COLUMN},decision,threshold,model,engine,error",)
HEATMAP_NAME = re.compile(r".+-[0-9a-f]{10}\.png")  # heatmap_name's pattern: all a heatmap folder may hold


@dataclass(frozen=True)
class PredictSummary:
    total: int
    positive: int
    negative: int
    failed: int
    model: str
    threshold: float
    device: str
    out_of_distribution: int = 0  # scored, flagged by the gate, so not decided

    def line(self) -> str:
        return (
            f"{self.total} input(s): {self.positive} positive, {self.negative} negative, "
            f"{self.out_of_distribution} out of distribution (no decision), {self.failed} failed "
            f"(model {self.model}, threshold {self.threshold:.4g}, {self.device})"
        )


def heatmap_name(path: Path) -> str:
    """Input's stem + a hash of its full path: readable, and unique when basenames repeat."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
    return f"{path.stem}-{digest}.png"


def predict(
    inputs: Sequence[str],
    *,
    checkpoint: Path,
    out_csv: Path,
    onnx_path: Path | None = None,
    heatmaps_dir: Path | None = None,
    batch_size: int,
    workers: int,
    device: torch.device,
    engine: str = "auto",
    progress: bool = True,
) -> PredictSummary:
    """Score `inputs` and write `out_csv` (columns CSV_COLUMNS) and, optionally, one overlay PNG per image.

    `engine` (with a checkpoint, not with `onnx_path`): auto, onnxruntime or eager; see train/inference.py.
    """
    if batch_size < 1:
        raise CxrError(f"batch size must be >= 1, got {batch_size}")
    files, unmatched = collect_inputs(inputs)
    if not files and not unmatched:
        raise CxrError("no inputs given")
    model = ScreeningModel.open(checkpoint, onnx_path, heatmaps_dir is not None, device, engine)
    threshold = model.threshold

    def row(path: str, probability: float | None = None, error: str = "",
            gate: tuple[float, bool] | None = None) -> dict[str, Any]:  # fmt: skip
        decided = probability is not None
        flagged = gate[1] if gate is not None else None
        return {
            "path": path,
            PROB_COLUMN: repr(probability) if decided else "",  # repr: exact, so CSV decisions re-check exactly
            "decision": (model.decide_gated(probability, flagged) or "") if decided else "",
            "threshold": repr(threshold),
            "out_of_distribution": "" if flagged is None else str(flagged).lower(),
            "ood_score": "" if gate is None else repr(gate[0]),
            "model": model.identity,
            "engine": model.engine if decided else "",
            "error": error,
        }

    if heatmaps_dir is not None:
        claim_folder(heatmaps_dir, "predict-heatmaps", [HEATMAP_NAME])
    rows = [row(arg, error=reason) for arg, reason in unmatched]
    # Decoding releases the GIL (OpenCV, Pillow, numpy), so threads decode the next
    # images while the model scores this batch.
    loaded = ordered_prefetch(files, lambda p: load_or_reason(p, model.config), workers or os.cpu_count() or 1,
                              2 * batch_size)  # fmt: skip
    with _csv_rows(out_csv) as write_rows, tqdm(
        total=len(files), unit="img", desc="predict", disable=not progress
    ) as bar:
        write_rows(rows)
        for chunk in batched(loaded, batch_size):
            ok = [(path, img) for path, img in chunk if not isinstance(img, str)]
            scores = model.score(model.stack([img for _, img in ok]))
            # a non-finite or out-of-range output is that image's error, as an unreadable file is
            failed = {path: why for (path, _), why in zip(ok, scores.errors) if why}
            by_path = {path: float(p) for (path, _), p, why in zip(ok, scores.calibrated, scores.errors) if not why}
            gates = {} if scores.ood_score is None else {
                path: (float(v), bool(f)) for (path, _), v, f in zip(ok, scores.ood_score, scores.out_of_distribution)}
            batch_rows = [row(str(p), by_path.get(p), "" if p in by_path else failed.get(p, img), gates.get(p))
                          for p, img in chunk]  # fmt: skip
            write_rows(batch_rows)
            rows += batch_rows
            explained = [(path, img) for path, img in ok if path in by_path]
            if heatmaps_dir is not None and explained:
                _write_heatmaps(model.cam_model, explained, heatmaps_dir, device)
            bar.update(len(chunk))
    scored = [r for r in rows if not r["error"]]
    return PredictSummary(
        total=len(rows),
        positive=sum(r["decision"] == CLASS_NAMES[1] for r in scored),
        negative=sum(r["decision"] == CLASS_NAMES[0] for r in scored),
        out_of_distribution=sum(r["out_of_distribution"] == "true" for r in scored),
        failed=len(rows) - len(scored),
        model=model.identity,
        threshold=threshold,
        device=model.engine,
    )


def _write_heatmaps(model: torch.nn.Module, ok: list[tuple[Path, np.ndarray]], out_dir: Path, device: torch.device):
    x = model_input(np.stack([img for _, img in ok]), device)
    for (path, img), heatmap in zip(ok, gradcam_heatmaps(model, x)):
        write_overlay(out_dir / heatmap_name(path), img, heatmap)


@contextlib.contextmanager
def _csv_rows(path: Path) -> Iterator[Callable[..., None]]:
    """A row writer on `path`, flushed after every batch so a killed run keeps its decided rows.

    An existing file is replaced only if it is one of ours (our header on its
    first line): `--out notes.csv` must not destroy a user's spreadsheet.
    """
    header = ",".join(CSV_COLUMNS)
    check_output_path(path)  # a link (even a dangling one) or a FIFO under --out's name is refused
    if path.exists():
        try:
            with open(path, encoding="utf-8", errors="replace", newline="") as fh:
                first = fh.readline(len(header) + 2).rstrip("\r\n")
        except OSError as exc:
            raise CxrError(f"cannot read {path}: {exc.strerror or exc}") from None
        if first != header and first not in _OLD_HEADERS:
            raise CxrError(f"refusing to overwrite {path}: it is not a CSV written by `cxr predict`")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Opened without truncating, locked, then emptied: a second run on the same CSV stops
        # with a clear line instead of interleaving its rows (flock: the kernel drops it with the process).
        # O_NOFOLLOW | O_NONBLOCK: a link or FIFO swapped in since the check is refused, not followed or waited on.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        raise CxrError(f"cannot write {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CxrError(f"refusing to write {path}: it is not a regular file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CxrError(f"another run is writing {path}; wait for it to finish or pass another --out") from None
    os.ftruncate(fd, 0)
    fh = os.fdopen(fd, "w", newline="", encoding="utf-8")
    with fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)

        def write(rows: list[dict[str, Any]] | None = None) -> None:
            try:
                if rows is None:
                    writer.writeheader()
                else:  # file names come from users: `=1+2.png` must not run in a spreadsheet
                    writer.writerows({k: spreadsheet_safe(v) for k, v in r.items()} for r in rows)
                fh.flush()
            except OSError as exc:  # a full disk mid-run: one clean line, the rows so far stay
                raise CxrError(f"cannot write {path}: {exc.strerror or exc}") from None

        write()
        yield write
