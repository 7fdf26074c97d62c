"""A trained model opened for screening: the one object `cxr predict`, the Python API and the server share.

Everything that defines the model's behaviour comes from the artifact, never from flags:
architecture, variant, preprocessing (the shard stage's own, `config`), the calibration and the
operating threshold the trainer fitted on validation. From a checkpoint the engine is ONNX Runtime
when it matches PyTorch (train/inference.py); from an ONNX file (`cxr export`) everything comes
from its metadata and onnxruntime runs it. Either way the checkpoint's calibration is applied to
the engine's probabilities here, once, and the decision is taken here, once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import CxrError
from pipeline.preprocess import PreprocessConfig
from pipeline.shard_format import CLASS_NAMES
from train.calibration import apply as calibrate
from train.checkpoint import load_checkpoint, operating_threshold
from train.inference import Engine
from train.metrics import predict_labels
from train import ood


@dataclass(frozen=True)
class Scores:
    """One batch's numbers: the network's own sigmoid output and the calibrated probability, float64 (B,);
    per image why its numbers are no basis for a decision ("" when they are); with an
    out-of-distribution gate, its score ((B,) float64) and verdict ((B,) bool), else None."""

    uncalibrated: np.ndarray
    calibrated: np.ndarray
    errors: list[str] = field(default_factory=list)
    ood_score: np.ndarray | None = None
    out_of_distribution: np.ndarray | None = None


def output_error(raw: float, calibrated: float) -> str:
    """Why a model output is no basis for a decision ("" when it is): a NaN compares false with any
    threshold, so without this a broken model (NaN weights, a crafted graph) calls everyone negative."""
    for name, value in (("output", raw), ("calibrated output", calibrated)):
        if not np.isfinite(value):
            return f"the model's {name} is {value} (not finite): the model is broken; no decision"
        if not 0.0 <= value <= 1.0:
            return f"the model's {name} {value!r} is not a probability in [0, 1]; no decision"
    return ""


class ScreeningModel:
    """Open with `ScreeningModel.open(...)`; `score` a batch of preprocessed images, `decide` on a probability."""

    def __init__(self, meta: dict[str, Any], identity: str,
                 probabilities: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]],
                 cam_model: torch.nn.Module | None, engine: Callable[[], str], where: str):  # fmt: skip
        self.meta = meta
        self.identity = identity  # model/variant@checkpoint sha256 prefix (+onnx): predict's `model` column
        self._probabilities = probabilities  # uint8 (B, H, W) -> float64 (B,), gate scores (B,) or None
        self.cam_model = cam_model  # for Grad-CAM; None when no heatmaps were asked for
        self._engine = engine
        self.config = PreprocessConfig.from_dict(meta["preprocess"])
        if self.config.size != int(meta["input_size"]):
            raise CxrError(f"model meta is inconsistent: preprocess size {self.config.size} "
                           f"!= input_size {meta['input_size']}")  # fmt: skip
        self.threshold = operating_threshold(meta, where)
        self.calibration = meta.get("calibration")
        self.ood_gate = ood.describe(meta)  # None: this model has no out-of-distribution gate

    @classmethod
    def open(cls, checkpoint: Path, onnx_path: Path | None, heatmaps: bool, device: torch.device,
             engine: str) -> ScreeningModel:  # fmt: skip
        """From `checkpoint`, or from `onnx_path` (then `checkpoint` is read only for heatmaps, and must be
        the very weights the ONNX file was exported from)."""
        if onnx_path is None:
            ckpt = load_checkpoint(checkpoint)
            runner = Engine(ckpt, engine, device)
            identity = f"{ckpt.model_name}/{ckpt.variant}@{ckpt.file_sha256()[:12]}"
            return cls(ckpt.meta, identity, runner.probabilities_and_ood, runner.model if heatmaps else None,
                       lambda: f"{runner.path}-{device.type}", str(checkpoint))  # fmt: skip

        from train.export import onnx_meta, onnx_probabilities_and_ood, onnx_session

        session = onnx_session(onnx_path)
        meta = onnx_meta(session, onnx_path)
        operating_threshold(meta, str(onnx_path))  # before the heatmap weights are read
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
        gated = ood.describe(meta) is not None
        return cls(meta, identity, partial(onnx_probabilities_and_ood, session, gated=gated), cam_model, lambda: f"onnxruntime-{provider}",
                   str(onnx_path))  # fmt: skip

    @property
    def engine(self) -> str:
        """What scored the images so far (auto settles on the first batch): predict's `engine` column."""
        return self._engine()

    def stack(self, images: list[np.ndarray]) -> np.ndarray:
        """Preprocessed images -> the uint8 (B, size, size) batch `score` takes (B may be 0)."""
        return np.stack(images) if images else np.empty((0, self.config.size, self.config.size), np.uint8)

    def score(self, images: np.ndarray) -> Scores:
        """uint8 (B, size, size) preprocessed images -> their scores, the same mapping for PyTorch and ONNX."""
        if len(images) == 0:
            return Scores(np.empty(0), np.empty(0), [])
        raw, ood_scores = self._probabilities(images)
        raw = np.asarray(raw, np.float64)
        if raw.shape != (len(images),):  # a graph checked at open cannot do this; a wrapped engine could
            raise CxrError(f"the model returned shape {raw.shape} for {len(images)} images; expected one output each")
        calibrated = calibrate(raw, self.calibration)
        errors = [output_error(r, c) for r, c in zip(raw, calibrated)]
        if self.ood_gate is None:
            return Scores(raw, calibrated, errors)
        if ood_scores is None or np.shape(ood_scores) != raw.shape:
            raise CxrError("the model has an out-of-distribution gate but returned no score per image")
        ood_scores = np.asarray(ood_scores, np.float64)
        return Scores(raw, calibrated, errors, ood_scores, ood.verdicts(ood_scores, self.ood_gate))

    def decide(self, probability: float) -> str:
        """The decision at the operating threshold, on the calibrated probability."""
        return CLASS_NAMES[int(predict_labels(np.array([probability]), self.threshold)[0])]

    def decide_gated(self, probability: float, out_of_distribution: bool | None) -> str | None:
        """`decide`, withheld (None) for an image the out-of-distribution gate flags: its probability is
        reported, but the model has no basis for a decision on an image unlike its training data."""
        return None if out_of_distribution else self.decide(probability)
