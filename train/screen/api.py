"""Screen chest X-rays from Python: the same model, preprocessing, threshold and numbers as `cxr predict`.

    from train import Screener
    screener = Screener("models/best.pt")  # or an ONNX file from `cxr export`
    for r in screener.predict(["scans/"], heatmaps=True):
        print(r.path, r.probability, r.decision)

Inputs are files, folders (searched recursively), glob patterns, or numpy
arrays of decoded pixels ((H, W) or (H, W, 1/3/4), any depth; e.g. a DICOM's
pixel_array after its rescale/VOI transforms), checked as files are (minimum
side, size bounds, pixel type, finite values in range). Files go through exactly what
`cxr predict` runs (train/screen/inputs.py: the shard stage's decoding and
preprocessing; train/screen/screening_model.py: the model opened from its
artifact; batches of the same size),
so a file scores the same here and in the CLI's CSV: the same engine choice
(train/inference.py: ONNX Runtime when it matches PyTorch, `engine="auto"`),
then the checkpoint's calibration (train/calibration.py), then its threshold.
An unreadable input gets a result with its `error` instead of stopping the
others, as in the CLI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from pipeline.errors import CxrError
from train.gradcam import gradcam_heatmaps
from train.models import model_input
from train.runtime import pick_device
from train.screen.inputs import array_or_reason, collect_inputs, load_or_reason
from train.screen.screening_model import ScreeningModel

Input = Union[str, Path, np.ndarray]


@dataclass(frozen=True)
class Screening:
    path: str  # the file, or "array[i]" for the i-th array given
    # P(COVID-19) at the validation split's prevalence: the network's output through the checkpoint's
    # calibration, `cxr predict`'s p_covid_calibrated_at_val_prevalence; None when the input could not be read
    probability: float | None
    uncalibrated: float | None  # the network's own sigmoid output (the study's 0.5 rule applies to it)
    # "positive" or "negative" at `threshold`; None when unreadable or out of distribution (no basis for one)
    decision: str | None
    threshold: float  # the model's operating threshold, chosen on validation when it was trained
    error: str  # why the input could not be read; "" otherwise
    heatmap: np.ndarray | None  # Grad-CAM, float32 (size, size) in [0, 1], when asked for
    image: np.ndarray | None  # the preprocessed uint8 (size, size) image the model saw
    # the out-of-distribution gate's verdict and score (train/ood.py); None when the model has no gate
    out_of_distribution: bool | None = None
    ood_score: float | None = None


class Screener:
    """A trained model, ready to screen images.

    `model`: a checkpoint (.pt from `cxr train`) or an ONNX file (from `cxr
    export`, run by onnxruntime). With ONNX, heatmaps need the PyTorch weights
    it was exported from: pass them as `checkpoint` (checked by sha256).
    `device`: "auto" (CUDA when present), "cpu", "cuda", "cuda:N".
    `engine` (checkpoints only): "auto" (ONNX Runtime when it matches PyTorch
    on the first batch, as `cxr predict` does), "onnxruntime" or "eager".
    """

    def __init__(self, model: str | Path, *, checkpoint: str | Path | None = None, device: str = "auto",
                 engine: str = "auto"):  # fmt: skip
        model = Path(model)
        self.device = pick_device(device)
        onnx = model.suffix.lower() == ".onnx"
        self._can_explain = not onnx or checkpoint is not None
        self._model = ScreeningModel.open(Path(checkpoint) if onnx and checkpoint else model, model if onnx else None,
                                          self._can_explain, self.device, engine)  # fmt: skip
        self.config = self._model.config
        self.threshold = self._model.threshold
        self.calibration = self._model.calibration  # applied to every probability, as by predict

    @property
    def identity(self) -> str:
        """model/variant@checkpoint sha256 prefix: the `model` column of `cxr predict`."""
        return self._model.identity

    @property
    def engine(self) -> str:
        """What scored the images so far: `cxr predict`'s engine column (auto settles on the first batch)."""
        return self._model.engine

    @property
    def ood_gate(self) -> dict[str, Any] | None:
        """The out-of-distribution gate's summary (threshold, quantile, dims), None for a model without one."""
        return self._model.ood_gate

    @property
    def meta(self) -> dict[str, Any]:
        """Everything the artifact says about itself: network, variant, init, preprocessing, params."""
        return self._model.meta

    def predict(
        self, inputs: Input | Sequence[Input], *, heatmaps: bool = False, batch_size: int = 32
    ) -> list[Screening]:
        """One Screening per image: files and folders in `cxr predict`'s sorted order, then arrays in order."""
        if heatmaps and not self._can_explain:
            raise CxrError("heatmaps need the PyTorch weights: Screener(onnx_file, checkpoint='models/best.pt')")
        if batch_size < 1:
            raise CxrError(f"batch size must be >= 1, got {batch_size}")
        items = [inputs] if isinstance(inputs, (str, Path, np.ndarray)) else list(inputs)
        if not items:
            raise CxrError("no inputs given")
        files, unmatched = collect_inputs([str(x) for x in items if not isinstance(x, np.ndarray)])
        sources: list[tuple[str, Path | np.ndarray]] = [(str(path), path) for path in files]
        sources += [(f"array[{i}]", x) for i, x in enumerate(x for x in items if isinstance(x, np.ndarray))]
        results = [self._result(arg, reason) for arg, reason in unmatched]
        for start in range(0, len(sources), batch_size):  # the CLI's batches: same images, same numbers
            chunk = [(name, load_or_reason(src, self.config) if isinstance(src, Path)
                      else array_or_reason(src, self.config)) for name, src in sources[start : start + batch_size]]
            results += self._score(chunk, heatmaps)
        return results

    def _score(self, chunk: list[tuple[str, np.ndarray | str]], heatmaps: bool) -> list[Screening]:
        ok = [(name, img) for name, img in chunk if not isinstance(img, str)]
        images = self._model.stack([img for _, img in ok])
        scores = self._model.score(images)
        raw, probs = scores.uncalibrated, scores.calibrated
        maps: list[np.ndarray | None] = [None] * len(ok)
        good = [i for i, why in enumerate(scores.errors) if not why]  # Grad-CAM of a broken output explains nothing
        if heatmaps and good:
            x = model_input(images[good], self.device)
            for i, m in zip(good, gradcam_heatmaps(self._model.cam_model, x)):
                maps[i] = m
        gates: list[tuple[float, bool] | None] = [None] * len(ok) if scores.ood_score is None else [
            (float(v), bool(f)) for v, f in zip(scores.ood_score, scores.out_of_distribution)]
        scored = {name: (float(p), float(r), img, m, why, g)
                  for (name, img), p, r, m, why, g in zip(ok, probs, raw, maps, scores.errors, gates)}  # fmt: skip
        out = []
        for name, img in chunk:
            if name not in scored:
                out.append(self._result(name, img))
                continue
            p, r, image, heatmap, why, gate = scored[name]
            if why:  # a non-finite or out-of-range output: an error, never a decision
                out.append(self._result(name, why, image=image, gate=gate))
            else:
                out.append(self._result(name, "", p, r, image, heatmap, gate))
        return out

    def _result(self, name: str, error: str, probability: float | None = None, uncalibrated: float | None = None,
                image=None, heatmap=None, gate: tuple[float, bool] | None = None) -> Screening:  # fmt: skip
        flagged = None if gate is None else gate[1]
        decision = None
        if probability is not None:
            decision = self._model.decide_gated(probability, flagged)
        return Screening(name, probability, uncalibrated, decision, self.threshold, error, heatmap, image,
                         flagged, None if gate is None else gate[0])  # fmt: skip

