"""The inference engine behind `predict`, `evaluate` and external scoring: ONNX Runtime when it is correct.

ONNX Runtime runs our CNNs about 3-4x faster than eager PyTorch on a CPU (batch
32, measured by `cxr bench-screen`), so `engine="auto"` uses it by default:

1. the checkpoint is exported once by `train/export.py` into a private cache
   (`$XDG_CACHE_HOME/cxr-screen/onnx/<checkpoint sha256>.onnx`, a folder
   that must belong to this user and be writable by no one else, since a
   model planted there would be run);
2. the first batch is scored by both engines and ONNX Runtime is kept only
   if it agrees with eager PyTorch within the project's one ONNX tolerance
   (`train.export.TOLERANCE`, 1e-4);
3. anything else (no ONNX Runtime provider for the device, a failed export,
   an unsafe cache, a disagreement) falls back to eager PyTorch with a
   one-line warning, and `describe()` records which engine ran and why.

`ordered_prefetch` decodes the next images in threads while the model runs
(OpenCV, Pillow and ONNX Runtime release the GIL), in input order and with a
bounded number of images in flight.
"""

from __future__ import annotations

import logging
import os
import stat
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from pipeline.errors import CxrError
from train.checkpoint import Checkpoint
from train.models import model_input
from train.ood import GatedNet, ood_agreement

log = logging.getLogger(__name__)

ENGINES = ("auto", "onnxruntime", "eager")
# The first-batch check runs eager PyTorch, the slow path: 8 images cost about
# 1 s for DenseNet121 on 2 cores where a whole batch of 64 would cost 8 s.
CHECK_IMAGES = 8

T = TypeVar("T")
R = TypeVar("R")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cxr-screen" / "onnx"


def _check_private(path: Path, kind: str) -> None:
    """Refuse a cache entry another user could have written: we would run its model."""
    st = os.lstat(path)
    wanted = stat.S_ISDIR if kind == "folder" else stat.S_ISREG
    if not wanted(st.st_mode):
        raise CxrError(f"ONNX cache {kind} {path} is not a plain {kind} (a symlink?)")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise CxrError(f"ONNX cache {kind} {path} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CxrError(f"ONNX cache {kind} {path} is writable by others (mode {stat.S_IMODE(st.st_mode):o})")


def cached_onnx(ckpt: Checkpoint, cache_dir: Path) -> Path:
    """The checkpoint's ONNX file in `cache_dir`, exported (and verified) on first use."""
    from train.export import export_onnx, onnx_meta, onnx_session

    cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(cache_dir, "folder")
    sha = ckpt.file_sha256()
    path = cache_dir / f"{sha}.onnx"
    if os.path.lexists(path):
        _check_private(path, "file")
        try:
            if onnx_meta(onnx_session(path, providers=["CPUExecutionProvider"]), path)["checkpoint_sha256"] == sha:
                return path
        except CxrError:
            pass  # unreadable or foreign: exported again below
    # A unique name, then one atomic rename: two runs exporting the same checkpoint never mix their bytes.
    tmp = export_onnx(ckpt, cache_dir / f".{sha}.{uuid.uuid4().hex}.onnx")
    os.replace(tmp, path)
    return path


class Engine:
    """uint8 preprocessed images -> float64 P(COVID-19), by ONNX Runtime or eager PyTorch."""

    def __init__(self, ckpt: Checkpoint, requested: str, device: torch.device, cache_dir: Path | None = None):
        if requested not in ENGINES:
            raise CxrError(f"unknown engine {requested!r}; valid: {', '.join(ENGINES)}")
        self.requested, self.device = requested, device
        self.model = ckpt.build().to(device).eval()
        # with an out-of-distribution gate, one forward gives the logit and the gate's score
        self.gated = GatedNet(self.model, ckpt.meta["ood_params"]).eval() if ckpt.meta.get("ood") else None
        self.session = None
        self.path = "eager"
        self.note = ""
        self.check: dict[str, Any] | None = None
        if requested == "eager":
            return
        try:
            self.session = self._session(ckpt, cache_dir or default_cache_dir())
            self.path = "onnxruntime"
        except CxrError as exc:
            self._fall_back(f"ONNX Runtime unavailable ({exc})")

    def _session(self, ckpt: Checkpoint, cache_dir: Path):
        try:
            import onnxruntime as ort
        except ImportError as exc:  # a declared dependency, but an image built without it still screens
            raise CxrError(f"onnxruntime is not installed ({exc})") from None

        from train.export import onnx_session

        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise CxrError("this onnxruntime has no CUDA provider, and eager CUDA beats ONNX Runtime on the CPU")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        # Same thread count as PyTorch would use, so `torch.set_num_threads` and
        # the two engines' numbers compare like for like.
        return onnx_session(cached_onnx(ckpt, cache_dir), threads=torch.get_num_threads(), providers=providers)

    def _fall_back(self, why: str) -> None:
        if self.requested == "onnxruntime":
            raise CxrError(f"engine onnxruntime was asked for: {why}")
        self.session, self.path = None, "eager"
        self.note = f"{why}; running eager PyTorch"
        log.warning("%s", self.note)

    def _eager_outputs(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        x = model_input(images, self.device)
        with torch.inference_mode():
            if self.gated is None:
                return self.model(x).float().cpu().numpy().astype(np.float64), None
            logits, ood_scores = self.gated(x)
            return logits.float().cpu().numpy().astype(np.float64), ood_scores.cpu().numpy().astype(np.float64)

    def _onnx_outputs(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        from train.export import onnx_outputs

        return onnx_outputs(self.session, model_input(images).numpy(), gated=self.gated is not None)

    def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 (B, H, W) or (B, 1, H, W) -> float64 logits (B,) and the gate's scores (B,) (None: no gate)."""
        if self.session is None:
            return self._eager_outputs(images)
        got = self._onnx_outputs(images)
        if self.check is None:
            self._first_batch_check(images, got)
            if self.session is None:
                return self._eager_outputs(images)
        return got

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W) or (B, 1, H, W) -> float64 logits (B,)."""
        return self.outputs(images)[0]

    def _first_batch_check(self, images: np.ndarray, onnx: tuple[np.ndarray, np.ndarray | None]) -> None:
        from train.export import TOLERANCE, logit_agreement

        n = min(len(images), CHECK_IMAGES)
        eager = self._eager_outputs(images[:n])
        self.check = logit_agreement(eager[0], onnx[0][:n], TOLERANCE)
        if eager[1] is not None:
            self.check["ood_agreement"] = ood_agreement(eager[1], onnx[1][:n])
            self.check["ok"] = self.check["ok"] and self.check["ood_agreement"]["ok"]
        if not self.check["ok"]:
            self._fall_back(
                f"ONNX Runtime differs from PyTorch on the first batch (probability "
                f"{self.check['max_abs_diff_probability']:.3g}, tolerance {self.check['tolerance']}; "
                f"gate {self.check.get('ood_agreement')})"
            )

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(images)))

    def probabilities_and_ood(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """P(COVID-19) (B,) and the gate's scores (B,) or None, from one forward."""
        logits, ood_scores = self.outputs(images)
        return 1.0 / (1.0 + np.exp(-logits)), ood_scores

    def describe(self) -> dict[str, Any]:
        """What ran: recorded in every output, so a number can be traced to its engine."""
        return {"engine": self.path, "requested": self.requested, "device": str(self.device),
                "first_batch_check": self.check, "note": self.note}  # fmt: skip


def ordered_prefetch(items: Iterable[T], load: Callable[[T], R], workers: int, ahead: int) -> Iterator[tuple[T, R]]:
    """(item, load(item)) in input order, with up to `ahead` loads running or done in `workers` threads.

    The bound keeps memory flat on a 100 000-image folder while the consumer
    (the model) works on the batch before.
    """
    if workers < 1 or ahead < 1:
        raise CxrError(f"prefetch needs workers >= 1 and ahead >= 1, got {workers} and {ahead}")
    source = iter(items)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in source:
            pending.append((item, pool.submit(load, item)))
            if len(pending) >= ahead:
                break
        while pending:
            item, future = pending.popleft()
            nxt = next(source, _END)
            if nxt is not _END:
                pending.append((nxt, pool.submit(load, nxt)))
            yield item, future.result()


def batched(pairs: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for pair in pairs:
        chunk.append(pair)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_END = object()
