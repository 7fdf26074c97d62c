"""Screen new images: files, folders and globs (PNG, JPEG, TIFF, DICOM) -> a CSV of decisions.

Everything that defines the model's behaviour comes from the model artifact,
never from flags: architecture, variant, preprocessing (the shard stage's own
`preprocess_bytes` / `preprocess_array`), the calibration and the operating
threshold the trainer fitted on validation. With `onnx_path` they come from the metadata that
`cxr export` stored in the .onnx file (see train/export.py). From a checkpoint,
the engine is ONNX Runtime when it matches PyTorch (train/inference.py); each
row's `engine` column says which one scored it. Either way the checkpoint's
calibration is applied to the engine's probabilities here, once.

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
import glob
import hashlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.dicom import DICOM_SUFFIXES, looks_like_dicom
from pipeline.errors import CxrError
from pipeline.ownership import claim_folder
from pipeline.preprocess import PreprocessConfig, preprocess_bytes
from pipeline.shard_format import CLASS_NAMES
from train.calibration import PROB_COLUMN
from train.calibration import apply as calibrate
from train.checkpoint import load_checkpoint
from train.gradcam import gradcam_heatmaps, write_overlay
from train.inference import Engine, batched, ordered_prefetch
from train.metrics import predict_labels
from train.models import model_input

# The probability column is calibrated (Platt, fitted on validation): P(COVID-19) at the validation prevalence.
CSV_COLUMNS = ("path", PROB_COLUMN, "decision", "threshold", "model", "engine", "error")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", *DICOM_SUFFIXES})
_GLOB_CHARS = frozenset("*?[")
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

    def line(self) -> str:
        return (
            f"{self.total} input(s): {self.positive} positive, {self.negative} negative, {self.failed} failed "
            f"(model {self.model}, threshold {self.threshold:.4g}, {self.device})"
        )


def collect_inputs(args: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders (recursive) and glob patterns into a sorted list of files.

    Named files and glob matches are always tried (a wrong one gets an error
    row); inside folders only image suffixes, or DICOM's magic for files named
    otherwise, are taken, and hidden entries are skipped. Returns (files,
    [(argument, reason)] for arguments that matched nothing).
    """
    files: set[Path] = set()
    unmatched: list[tuple[str, str]] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = list(_images_under(path))
            if not found:
                unmatched.append((arg, "folder contains no images"))
            files.update(found)
        elif path.exists():
            files.add(path)
        elif _GLOB_CHARS & set(arg):
            matches = map(Path, glob.glob(arg, recursive=True))
            found = [f for m in matches for f in (_images_under(m) if m.is_dir() else [m])]
            if not found:
                unmatched.append((arg, "pattern matched no images"))
            files.update(found)
        else:
            unmatched.append((arg, "no such file or directory"))
    return sorted(files, key=str), unmatched


def _images_under(folder: Path) -> Iterator[Path]:
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            path = Path(root) / name
            if not name.startswith(".") and (path.suffix.lower() in IMAGE_SUFFIXES or _has_dicom_magic(path)):
                yield path


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return looks_like_dicom(path, fh.read(132))
    except OSError:
        return False


def load_image(path: Path, cfg: PreprocessConfig) -> np.ndarray:
    """One input file -> the model's uint8 (size, size) input, by the shard stage's functions."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > cfg.max_decoded_bytes:  # checked before reading: the file itself must fit the bound
                raise CxrError(f"file is {size / 2**20:.0f} MiB, over the bound of {cfg.max_decoded_bytes / 2**20:.0f} MiB")
            data = fh.read(size + 1)  # not the bound + 1: read() would allocate all of it first
    except OSError as exc:
        raise CxrError(f"cannot read file: {exc.strerror or exc}") from None
    if len(data) > size:
        raise CxrError("file grew while it was being read")
    return preprocess_bytes(data, cfg, str(path))


def _load_or_reason(path: Path, cfg: PreprocessConfig) -> np.ndarray | str:
    try:
        return load_image(path, cfg)
    except CxrError as exc:
        return str(exc)
    except Exception as exc:  # a decoder bug on one hostile file must not end a 10 000-image run; it is recorded
        return f"unexpected {type(exc).__name__} while reading: {exc}"


def heatmap_name(path: Path) -> str:
    """Input's stem + a hash of its full path: readable, and unique when basenames repeat."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
    return f"{path.stem}-{digest}.png"


@dataclass
class _Model:
    meta: dict[str, Any]
    identity: str
    probabilities: Callable[[np.ndarray], np.ndarray]  # uint8 (B, H, W) -> float64 (B,)
    cam_model: torch.nn.Module | None  # for Grad-CAM; None when no heatmaps are asked for
    engine: Callable[[], str]  # which engine scored the rows so far (auto settles on the first batch)


def _open_model(
    checkpoint: Path, onnx_path: Path | None, heatmaps: bool, device: torch.device, engine: str
) -> _Model:
    if onnx_path is None:
        ckpt = load_checkpoint(checkpoint)
        runner = Engine(ckpt, engine, device)
        identity = f"{ckpt.model_name}/{ckpt.variant}@{ckpt.file_sha256()[:12]}"
        cam_model = runner.model if heatmaps else None
        return _Model(ckpt.meta, identity, runner.probabilities, cam_model, lambda: f"{runner.path}-{device.type}")

    from train.export import onnx_meta, onnx_probabilities, onnx_session

    session = onnx_session(onnx_path)
    meta = onnx_meta(session, onnx_path)
    sha = meta["checkpoint_sha256"]
    cam_model = None
    if heatmaps:  # Grad-CAM needs gradients, hence the PyTorch weights -- the very ones exported
        ckpt = load_checkpoint(checkpoint)
        if ckpt.file_sha256() != sha:
            raise CxrError(
                f"{onnx_path} was exported from checkpoint sha256 {sha[:12]}, but {checkpoint} is "
                f"{ckpt.file_sha256()[:12]}; heatmaps must come from the same weights"
            )
        cam_model = ckpt.build().to(device)
    identity = f"{meta['model']}/{meta['variant']}@{sha[:12]}+onnx"
    provider = session.get_providers()[0].replace("ExecutionProvider", "").lower()
    return _Model(meta, identity, partial(onnx_probabilities, session), cam_model, lambda: f"onnxruntime-{provider}")


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
    model = _open_model(checkpoint, onnx_path, heatmaps_dir is not None, device, engine)
    cfg = PreprocessConfig.from_dict(model.meta["preprocess"])
    if cfg.size != int(model.meta["input_size"]):
        raise CxrError(
            f"model meta is inconsistent: preprocess size {cfg.size} != input_size {model.meta['input_size']}"
        )
    threshold = float(model.meta["threshold"]["value"])

    def row(path: str, probability: float | None = None, error: str = "") -> dict[str, Any]:
        decided = probability is not None
        return {
            "path": path,
            PROB_COLUMN: repr(probability) if decided else "",  # repr: exact, so CSV decisions re-check exactly
            "decision": CLASS_NAMES[int(predict_labels(np.array([probability]), threshold)[0])] if decided else "",
            "threshold": repr(threshold),
            "model": model.identity,
            "engine": model.engine() if decided else "",
            "error": error,
        }

    if heatmaps_dir is not None:
        claim_folder(heatmaps_dir, "predict-heatmaps", [HEATMAP_NAME])
    rows = [row(arg, error=reason) for arg, reason in unmatched]
    # Decoding releases the GIL (OpenCV, Pillow, numpy), so threads decode the next
    # images while the model scores this batch.
    loaded = ordered_prefetch(files, lambda p: _load_or_reason(p, cfg), workers or os.cpu_count() or 1, 2 * batch_size)
    with _csv_rows(out_csv) as write_rows, tqdm(
        total=len(files), unit="img", desc="predict", disable=not progress
    ) as bar:
        write_rows(rows)
        for chunk in batched(loaded, batch_size):
            ok = [(path, img) for path, img in chunk if not isinstance(img, str)]
            raw = model.probabilities(np.stack([img for _, img in ok])) if ok else np.empty(0)
            probs = calibrate(raw, model.meta.get("calibration"))  # the same mapping for PyTorch and ONNX
            by_path = {path: float(p) for (path, _), p in zip(ok, probs)}
            batch_rows = [row(str(p), by_path.get(p), "" if p in by_path else img) for p, img in chunk]
            write_rows(batch_rows)
            rows += batch_rows
            if heatmaps_dir is not None and ok:
                _write_heatmaps(model.cam_model, ok, heatmaps_dir, device)
            bar.update(len(chunk))
    decided = [r for r in rows if not r["error"]]
    positives = sum(r["decision"] == CLASS_NAMES[1] for r in decided)
    return PredictSummary(
        total=len(rows),
        positive=positives,
        negative=len(decided) - positives,
        failed=len(rows) - len(decided),
        model=model.identity,
        threshold=threshold,
        device=model.engine(),
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
    if path.exists():
        try:
            with open(path, encoding="utf-8", errors="replace", newline="") as fh:
                first = fh.readline(len(header) + 2).rstrip("\r\n")
        except OSError as exc:
            raise CxrError(f"cannot read {path}: {exc.strerror or exc}") from None
        if first != header:
            raise CxrError(f"refusing to overwrite {path}: it is not a CSV written by `cxr predict`")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Opened without truncating, locked, then emptied: a second run on the same CSV stops
        # with a clear line instead of interleaving its rows (flock: the kernel drops it with the process).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError as exc:
        raise CxrError(f"cannot write {path}: {exc.strerror or exc}") from None
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
                writer.writerows(rows) if rows is not None else writer.writeheader()
                fh.flush()
            except OSError as exc:  # a full disk mid-run: one clean line, the rows so far stay
                raise CxrError(f"cannot write {path}: {exc.strerror or exc}") from None

        write()
        yield write
