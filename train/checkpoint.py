"""Self-describing checkpoints.

A checkpoint is a plain dict of tensors and primitives so that it loads with
`torch.load(..., weights_only=True)` (no pickled code runs). It carries
everything later stages need to rebuild the model and its preprocessing:
model name, input size, variant, class names, the operating threshold chosen
on validation, the calibration fitted there, how the epoch was selected, the
preprocessing params and the full params it was trained with. Evaluation, latency, prediction and export read these, never params.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import CxrError
from pipeline.fileio import atomic_output, sha256_file
from pipeline.names import FREEZE_MODES, INIT_KINDS, MODEL_NAMES, VARIANTS
from pipeline.params import INPUT_SIZE_RANGE
from pipeline.shard_format import CLASS_NAMES
from train.models import ScreeningNet, build_model
from train.ood import validate_gate

FORMAT = "cxr-screen-checkpoint/1"
# Meta keys added after format 1, each with the value that reproduces what older checkpoints
# did: load_checkpoint fills them in, so adding a key leaves every existing checkpoint readable.
META_DEFAULTS: dict[str, Any] = {
    "calibration": None, "selection": None,  # None: identity calibration; not recorded
    "ood": None, "ood_params": None,  # None: no out-of-distribution gate (train/ood.py): verdicts are null
}


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    meta: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    extra: dict[str, Any]  # last.pt: the trainer's resume state (optimizer, best weights, history); best.pt: {}

    @property
    def model_name(self) -> str:
        return self.meta["model"]

    @property
    def variant(self) -> str:
        return self.meta["variant"]

    @property
    def input_size(self) -> int:
        return int(self.meta["input_size"])

    @property
    def threshold(self) -> float:
        """The operating threshold; CxrError for a resume checkpoint (last.pt), which has none yet."""
        return operating_threshold(self.meta, str(self.path))

    @property
    def threshold_record(self) -> dict[str, Any]:
        """How the threshold was chosen: {"value", "rule", "split": "val", "n", ...}."""
        return self.meta["threshold"]

    @property
    def preprocess(self) -> dict[str, Any]:
        return self.meta["preprocess"]

    def build(self) -> ScreeningNet:
        model = build_model(self.model_name)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:  # torch lists every missing/unexpected key over many lines
            first = str(exc).strip().splitlines()
            raise CxrError(f"{self.path}: weights do not fit a {self.model_name}: "
                           f"{' '.join(line.strip() for line in first[:2])[:300]}") from None  # fmt: skip
        model.eval()
        return model

    def file_sha256(self) -> str:
        return sha256_file(self.path)


@dataclass
class TrainState:
    """The trainer's resume state, saved as last.pt's `extra` (a plain dict, so weights_only loads it).

    A run resumes at an epoch boundary: randomness is re-derived from (seed, epoch, rank), so the
    optimizer, the best weights so far and the early-stopping counters are all it needs.
    """

    fingerprint: str  # the params and data it belongs to (trainer.run_fingerprint)
    epoch: int = 0  # epochs completed
    optimizer: dict[str, Any] | None = None
    best_state: dict[str, torch.Tensor] | None = None  # rank 0 only
    best_epoch: int = 0
    best_val_loss: float = float("inf")
    best_score: list[float] = field(default_factory=lambda: [float("-inf")] * 2)  # selection.WORST: none scored yet
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    finished: bool = False
    early_stopped: bool = False

    def to_dict(self) -> dict[str, Any]:
        # not dataclasses.asdict: it would deep-copy the optimizer state and the best weights
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainState:
        """Keys a newer trainer added fall back to their defaults; the fingerprint is required."""
        if "fingerprint" not in raw:
            raise CxrError("resume state lacks its fingerprint")
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


def make_meta(
    *,
    model: str,
    variant: str,
    input_size: int,
    preprocess: dict[str, Any],
    params: dict[str, Any],
    threshold: dict[str, Any],
    epoch: int,
    val_loss: float | None,
    calibration: dict[str, Any] | None = None,
    selection: dict[str, Any] | None = None,
    init: dict[str, Any] | None = None,
    ood: dict[str, Any] | None = None,
    ood_params: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """`init`: what training started from (train/fit/starting_weights.py's record plus `freeze`);
    `ood`, `ood_params`: the out-of-distribution gate (train/ood.py)."""
    return {
        "format": FORMAT,
        "model": model,
        "variant": variant,
        "input_size": input_size,
        "class_names": list(CLASS_NAMES),
        "threshold": threshold,  # {"value": float, "rule": str, "split": "val", ...}
        "preprocess": preprocess,
        "params": params,
        "epoch": epoch,
        "val_loss": val_loss,
        # Platt scaling fitted on validation (train/calibration.py); the threshold is on its scale
        "calibration": calibration,
        # how best.pt's epoch was chosen, and how sure the validation split can be of it
        "selection": selection,
        "init": init if init is not None else {"kind": "scratch", "freeze": "none"},
        "ood": ood,
        "ood_params": ood_params,
    }


def detached_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A real copy of the weights.

    `state_dict()` returns views of the live parameters; keeping it as the
    'best' model silently turns best into last (the study's own code did this).
    """
    module = getattr(model, "module", model)  # unwrap DDP
    module = getattr(module, "_orig_mod", module)  # unwrap torch.compile
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def save_checkpoint(
    path: Path, meta: dict[str, Any], state_dict: dict[str, torch.Tensor], extra: dict[str, Any] | None = None
) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint."""
    with atomic_output(path) as stream:
        torch.save({"meta": meta, "state_dict": state_dict, "extra": extra or {}}, stream)


def load_checkpoint(path: Path | str) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CxrError(
            f"checkpoint not found: {path}. Train one with `dvc repro` (the whole pipeline) or `cxr train`, "
            "or pass --model PATH to an existing checkpoint"
        )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CxrError(f"cannot load checkpoint {path}: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("meta"), dict) or raw["meta"].get("format") != FORMAT:
        raise CxrError(f"{path} is not a cxr-screen checkpoint (expected format {FORMAT})")
    validate_meta(raw["meta"], str(path))
    state = raw.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CxrError(f"{path}: state_dict must map parameter names to tensors")
    extra = raw.get("extra", {})
    meta = {**META_DEFAULTS, **raw["meta"]}
    return Checkpoint(path=path, meta=meta, state_dict=state, extra=extra if isinstance(extra, dict) else {})


MIN_INPUT_SIZE, MAX_INPUT_SIZE = INPUT_SIZE_RANGE  # the bound params.yaml's preprocess.size is held to


def operating_threshold(meta: dict[str, Any], where: str) -> float:
    """meta's threshold value (validated by validate_meta), or one clear line when it is None: last.pt
    is saved during training, before a threshold is chosen on validation, so it cannot take decisions."""
    value = meta["threshold"]["value"]
    if value is None:
        raise CxrError(f"{where} is a resume checkpoint written during training; screen with best.pt "
                       "(no operating threshold is chosen before training ends)")  # fmt: skip
    return float(value)


def validate_meta(meta: Any, where: str) -> dict[str, Any]:
    """Checkpoint meta (also stored in ONNX files) checked against its schema and bounds.

    Run before anything is built or allocated from it: these files travel, and a
    crafted `input_size` or threshold must be one clear line, not an OOM or a
    KeyError traceback.
    """
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CxrError(f"{where}: invalid model meta: {what}")

    need(isinstance(meta, dict), "not a mapping")
    need(meta.get("model") in MODEL_NAMES, f"model must be one of {list(MODEL_NAMES)}, got {meta.get('model')!r}")
    need(meta.get("variant") in VARIANTS, f"variant must be one of {list(VARIANTS)}")
    size = meta.get("input_size")
    need(isinstance(size, int) and not isinstance(size, bool) and MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE,
         f"input_size must be an integer in [{MIN_INPUT_SIZE}, {MAX_INPUT_SIZE}], got {size!r}")  # fmt: skip
    need(meta.get("class_names") == list(CLASS_NAMES), f"class_names must be {list(CLASS_NAMES)}")
    threshold = meta.get("threshold")
    value = threshold.get("value") if isinstance(threshold, dict) else None
    # None in last.pt: the resume state is saved before a threshold is chosen on validation.
    need(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0),
         "threshold.value must be a number in [0, 1]")  # fmt: skip
    # The rest of preprocess is bounds-checked by PreprocessConfig.from_dict wherever images are decoded.
    preprocess = meta.get("preprocess")
    need(isinstance(preprocess, dict) and preprocess.get("size") == size, "preprocess.size must equal input_size")
    # Absent in checkpoints from before train.init existed: those all started from scratch.
    init = meta.get("init", {"kind": "scratch", "freeze": "none"})
    need(isinstance(init, dict) and init.get("kind") in INIT_KINDS and init.get("freeze", "none") in FREEZE_MODES,
         f"init must be {{kind: one of {list(INIT_KINDS)}, freeze: one of {list(FREEZE_MODES)}}}")  # fmt: skip
    validate_gate(meta, where)
    return meta

