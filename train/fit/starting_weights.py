"""Where a training run's weights start (`train.init`) and what it trains (`train.freeze`).

- `scratch`: torchvision's random initialisation, seeded (the study).
- `imagenet`: torchvision's ImageNet weights for the network, read from the
  local torch hub cache (`$TORCH_HOME/hub/checkpoints/<torchvision's file
  name>`), never downloaded: a missing file is an error saying where to put
  which file. The first convolution is adapted to one channel and the
  classifier replaced by a fresh one-logit head.
- a path: a cxr-screen checkpoint (e.g. models/best.pt) of the same network,
  variant and preprocessing, fine-tuned on new data: all its weights, head included.

`train.freeze: backbone` then trains only the final classifier layer(s).
What a run started from is recorded (`describe`) in the checkpoint meta and the
run fingerprint, with the sha256 of the file it read, so a changed file never
resumes a run begun from the old one. Every file loads with weights_only=True.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torchvision import models as tvm

from pipeline.errors import CxrError
from pipeline.shard_format import ShardSummary
from train.checkpoint import load_checkpoint
from pipeline.networks import Network
from train.models import INPUT_MEAN, INPUT_STD, ScreeningNet, model_spec

SCRATCH = "scratch"
IMAGENET = "imagenet"


@dataclass(frozen=True)
class Init:
    record: dict[str, Any]  # JSON-able: kind, file, sha256, ... (checkpoint meta "init", run fingerprint)
    state_dict: dict[str, torch.Tensor] | None  # ScreeningNet keys; None for scratch

    def apply(self, net: ScreeningNet, freeze: str) -> None:
        """Load the starting weights into `net` (skip when resuming: call with a fresh net only)."""
        if self.state_dict is not None:
            expected_missing = net.head_parameter_names() if self.record["kind"] == IMAGENET else set()
            try:
                missing, unexpected = net.load_state_dict(self.state_dict, strict=False)
            except RuntimeError as exc:  # shape mismatches
                raise CxrError(f"{self.record['file']} does not fit {net.name}: {exc}") from None
            if set(missing) != expected_missing or unexpected:
                raise CxrError(f"{self.record['file']} does not fit {net.name}: missing "
                               f"{sorted(set(missing) - expected_missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        set_freeze(net, freeze)


def set_freeze(net: ScreeningNet, freeze: str) -> None:
    if freeze == "backbone":
        net.freeze_backbone()
    elif freeze != "none":
        raise CxrError(f"train.freeze must be 'none' or 'backbone', got {freeze!r}")


def imagenet_file(model: str) -> tuple[str, Path, str]:
    """(torchvision weights name, where the hub cache keeps its file, the URL it is published at)."""
    name = model_spec(model).weights
    url = tvm.get_weight(name).url
    return name, Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name, url


def resolve(init: str, model: str, summary: ShardSummary) -> Init:
    """Check and read what `train.init` names for training `model` on `summary`'s shards."""
    if init == SCRATCH:
        return Init({"kind": SCRATCH}, None)
    if init == IMAGENET:
        return _imagenet(model)
    return _checkpoint(Path(init), model, summary)


def _imagenet(model: str) -> Init:
    name, path, url = imagenet_file(model)
    if not path.is_file():
        raise CxrError(
            f"train.init=imagenet needs torchvision's {name} weights in {path} and this run does not download. "
            f"Copy {url} there (on a machine with internet, `python -c \"import torchvision; "
            f"torchvision.models.get_model('{model_spec(model).torchvision}', weights='{name.split('.')[-1]}')\"` puts it in "
            f"that machine's ~/.cache/torch/hub/checkpoints), or set TORCH_HOME to a folder holding "
            f"hub/checkpoints/{path.name}"
        )
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CxrError(f"cannot load {path}: {exc}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CxrError(f"{path} is not a state dict of tensors (torchvision's weight files are)")
    # torch.hub names its files <name>-<first hex digits of the sha256>.pth; a file that
    # does not hash to its name is not the one torchvision published (it is still used: recorded).
    prefix = torch.hub.HASH_REGEX.search(path.name)
    published = bool(prefix) and sha256.startswith(prefix.group(1))
    record = {"kind": IMAGENET, "weights": name, "file": str(path), "sha256": sha256, "published_file": published}
    return Init(record, adapt_imagenet_state(raw, model_spec(model)))


def adapt_imagenet_state(state: dict[str, torch.Tensor], spec: Network) -> dict[str, torch.Tensor]:
    """torchvision ImageNet state dict -> ScreeningNet keys: one input channel, no ImageNet head.

    A grey radiograph is what an RGB net sees as three equal channels, so the
    1-channel kernel is the sum of the RGB kernels, each scaled from the
    normalisation the weights expect (per-channel mean m_c, std s_c) to ours
    ((x - INPUT_MEAN) / INPUT_STD): W = sum_c W_c * INPUT_STD / s_c, and a conv
    bias, where there is one (AlexNet, VGG16), takes the mean offsets
    b += sum_c sum(W_c) * (INPUT_MEAN - m_c) / s_c. The first conv then computes
    on our input what the ImageNet conv computed on the equivalent RGB image
    (away from the zero-padded border); the nets without that bias are followed
    by a BatchNorm, and their offsets, at most 0.07 of a std, are left to it.
    """
    for pattern, replacement in spec.key_renames:
        state = {re.sub(pattern, replacement, k): v for k, v in state.items()}
    state = dict(state)
    key = f"{spec.first_conv}.weight"
    if key not in state or state[key].ndim != 4 or state[key].shape[1] != 3:
        raise CxrError(f"not {spec.name}'s ImageNet weights: no 3-channel {key}")
    weight = state[key].float()
    mean, std = (torch.tensor(v, dtype=torch.float32) for v in spec.weights_norm)
    state[key] = (weight * (INPUT_STD / std)[None, :, None, None]).sum(1, keepdim=True)
    bias = f"{spec.first_conv}.bias"
    if bias in state:
        state[bias] = state[bias] + (weight.sum((2, 3)) * ((INPUT_MEAN - mean) / std)).sum(1)
    heads = tuple(f"{h}." for h in spec.heads)
    return {f"backbone.{k}": v for k, v in state.items() if not k.startswith(heads)}


def _checkpoint(path: Path, model: str, summary: ShardSummary) -> Init:
    if not path.is_file():
        raise CxrError(f"train.init must be 'scratch', 'imagenet' or a checkpoint file; {path} is none of these")
    ckpt = load_checkpoint(path)
    mismatch = [
        f"{what}: checkpoint {theirs!r}, this run {ours!r}"
        for what, theirs, ours in (("model", ckpt.model_name, model), ("variant", ckpt.variant, summary.variant),
                                   ("preprocess", ckpt.preprocess, summary.preprocess))
        if theirs != ours
    ]  # fmt: skip
    if mismatch:
        raise CxrError(f"cannot fine-tune from {path}: " + "; ".join(mismatch)
                       + " (set model/variant to the checkpoint's, and shard with its preprocess params)")
    record = {"kind": "checkpoint", "file": str(path), "sha256": ckpt.file_sha256(), "epoch": ckpt.meta.get("epoch"),
              "init": ckpt.meta.get("init", {"kind": SCRATCH})}  # fmt: skip
    return Init(record, ckpt.state_dict)
