"""Self-describing checkpoints.

A checkpoint is a plain dict of tensors and primitives so that it loads with
`torch.load(..., weights_only=True)` (no pickled code runs). It carries
everything later stages need to rebuild the model and its preprocessing:
model name, input size, variant, class names, the operating threshold chosen
on validation, the preprocessing params and the full params it was trained
with. Evaluation, latency, prediction and export read these, never params.yaml.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import CxrError
from pipeline.shard_format import CLASS_NAMES
from train.models import ScreeningNet, build_model

FORMAT = "cxr-screen-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    meta: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    extra: dict[str, Any]  # optimizer/scheduler/RNG state etc. for resume; empty for best.pt

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
        return float(self.meta["threshold"]["value"])

    @property
    def preprocess(self) -> dict[str, Any]:
        return self.meta["preprocess"]

    def build(self) -> ScreeningNet:
        model = build_model(self.model_name)
        model.load_state_dict(self.state_dict)
        model.eval()
        return model

    def file_sha256(self) -> str:
        return file_sha256(self.path)


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
) -> dict[str, Any]:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"meta": meta, "state_dict": state_dict, "extra": extra or {}}, tmp)
    os.replace(tmp, path)


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
    if not isinstance(raw, dict) or raw.get("meta", {}).get("format") != FORMAT:
        raise CxrError(f"{path} is not a cxr-screen checkpoint (expected format {FORMAT})")
    return Checkpoint(path=path, meta=raw["meta"], state_dict=raw["state_dict"], extra=raw.get("extra", {}))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
