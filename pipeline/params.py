"""Typed, frozen view of params.yaml.

The file is read once (by the CLI) and the resulting objects are passed down,
so no deep code reads params.yaml or carries a hidden default. Unknown and
missing keys are errors: a typo in `dvc exp run -S` must not be silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from pipeline.errors import CxrError
from pipeline.names import EQUALIZE_METHODS, FREEZE_MODES, MODEL_NAMES, THRESHOLD_RULES, VARIANTS

_NAME = re.compile(r"[A-Za-z0-9_-]+")
# Literal[tuple] is Literal[*tuple]: the checks below come from the one list of names.
ModelName = Literal[MODEL_NAMES]  # type: ignore[valid-type]
Variant = Literal[VARIANTS]  # type: ignore[valid-type]
EqualizeMethod = Literal[EQUALIZE_METHODS]  # type: ignore[valid-type]
ThresholdRule = Literal[THRESHOLD_RULES]  # type: ignore[valid-type]
FreezeMode = Literal[FREEZE_MODES]  # type: ignore[valid-type]


@dataclass(frozen=True)
class LabelFiles:
    """Which label file, in the dataset root, holds each split (images under ROOT/<split>/).

    COVIDx CXR-2 and CXR-4 ship train.txt/val.txt/test.txt; CXR-3 ships
    train_COVIDx_CXR-3B.txt and test_COVIDx_CXR-3B.txt (or the 3-class _CXR-3A
    files) and no val file. val is used when that file exists and carved from
    train by patient otherwise; null always carves.
    """

    train: str = "train.txt"
    val: str | None = "val.txt"
    test: str = "test.txt"


@dataclass(frozen=True)
class DataParams:
    root: str
    val_fraction: float
    max_reject_fraction: float
    leaks: Literal["report", "drop", "fail"]
    labels: LabelFiles = LabelFiles()  # the published names; params.yaml always states them


@dataclass(frozen=True)
class SampleParams:
    train_per_class: int
    test_per_class: int
    shifted_test_per_class: int  # the `sample_shifted` external set (test split only)


@dataclass(frozen=True)
class PreprocessParams:
    top_crop: float
    size: int
    equalize: EqualizeMethod
    clahe_clip: float
    reduced_decode: bool
    max_pixels: int
    max_decoded_bytes: int
    min_side: int


@dataclass(frozen=True)
class ShardParams:
    max_count: int
    max_bytes: int
    workers: int


@dataclass(frozen=True)
class AugmentParams:
    scale: tuple[float, float]
    translate: float
    rotate: float


@dataclass(frozen=True)
class TrainParams:
    epochs: int
    patience: int
    batch_size: int
    lr: float | None
    max_steps: int | None
    num_workers: int
    shuffle_buffer: int
    compile: bool
    aux_weight: float
    select: Literal["val_loss", "val_auc"]  # which epoch's weights become best.pt
    augment: AugmentParams
    init: str  # scratch | imagenet | path of a cxr-screen checkpoint to fine-tune (train/fit/starting_weights.py)
    freeze: FreezeMode  # backbone: train the final classifier layer(s) only


@dataclass(frozen=True)
class EvaluateParams:
    threshold_rule: ThresholdRule
    target_sensitivity: float
    bootstrap: int
    batch_size: int
    prevalence: float  # PPV/NPV are also reported at this prevalence (screening population)
    external: dict[str, str]  # name -> COVIDx-layout root scored by the `external` stage


@dataclass(frozen=True)
class LatencyParams:
    threads: int
    warmup: int
    runs: int
    batch: int


@dataclass(frozen=True)
class Params:
    seed: int
    model: ModelName
    variant: Variant
    data: DataParams
    sample: SampleParams
    preprocess: PreprocessParams
    shard: ShardParams
    train: TrainParams
    evaluate: EvaluateParams
    latency: LatencyParams

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is Literal:
        if value not in get_args(hint):
            raise CxrError(f"params: {where} must be one of {list(get_args(hint))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            raise CxrError(f"params: {where} must not be null")
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise CxrError(f"params: {where} must be a mapping, got {value!r}")
        key_hint, value_hint = get_args(hint)
        return {_convert(k, key_hint, f"{where} key"): _convert(v, value_hint, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        args = get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise CxrError(f"params: {where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise CxrError(f"params: {where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CxrError(f"params: {where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CxrError(f"params: {where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise CxrError(f"params: {where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported params type {hint!r} at {where}")  # programming error


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise CxrError(f"params: {where or 'top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    missing = [n for n in names if n not in raw]
    prefix = f"{where}." if where else ""
    if unknown:
        raise CxrError(f"params: unknown key(s) {', '.join(prefix + u for u in unknown)}")
    if missing:
        raise CxrError(f"params: missing key(s) {', '.join(prefix + m for m in missing)}")
    return cls(**{n: _convert(raw[n], hints[n], prefix + n) for n in names})


def params_from_dict(raw: dict[str, Any]) -> Params:
    params = _build(Params, raw, "")
    _check_ranges(params)
    return params


def load_params(path: Path | str = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise CxrError(f"params file not found: {path}: run from the repository root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CxrError(f"params file {path} is not valid YAML: {exc}") from exc
    return params_from_dict(raw)


def _plain_file_name(name: str) -> bool:
    # A label file name comes from -S on the command line: it must not lead out of the dataset root.
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\x00") and ":" not in name


def _check_ranges(p: Params) -> None:
    checks = [
        (0.0 < p.data.val_fraction < 1.0, "data.val_fraction must be in (0, 1)"),
        (0.0 <= p.data.max_reject_fraction <= 1.0, "data.max_reject_fraction must be in [0, 1]"),
        (all(_plain_file_name(n) for n in (p.data.labels.train, p.data.labels.val or "v", p.data.labels.test)),
         "data.labels must name files directly in the dataset root (no folders, no '..')"),
        (0.0 <= p.preprocess.top_crop < 0.5, "preprocess.top_crop must be in [0, 0.5)"),
        (p.preprocess.size >= 32, "preprocess.size must be >= 32"),
        (p.preprocess.max_pixels > 0, "preprocess.max_pixels must be > 0"),
        (p.preprocess.max_decoded_bytes > 0, "preprocess.max_decoded_bytes must be > 0"),
        (p.shard.max_count > 0 and p.shard.max_bytes > 0, "shard.max_count and shard.max_bytes must be > 0"),
        (p.shard.workers >= 0, "shard.workers must be >= 0"),
        (p.train.epochs > 0, "train.epochs must be > 0"),
        (p.train.batch_size > 0, "train.batch_size must be > 0"),
        (p.train.lr is None or p.train.lr > 0, "train.lr must be > 0 or null"),
        (p.train.max_steps is None or p.train.max_steps > 0, "train.max_steps must be > 0 or null"),
        (p.train.augment.scale[0] <= p.train.augment.scale[1], "train.augment.scale must be [low, high]"),
        (p.train.init.strip() != "", "train.init must be scratch, imagenet or a checkpoint path"),
        (p.train.freeze == "none" or p.train.init != "scratch",
         "train.freeze=backbone keeps the backbone as it starts: it needs train.init imagenet or a checkpoint"),
        (0.0 < p.evaluate.target_sensitivity <= 1.0, "evaluate.target_sensitivity must be in (0, 1]"),
        (0.0 < p.evaluate.prevalence < 1.0, "evaluate.prevalence must be in (0, 1)"),
        (p.evaluate.bootstrap >= 0, "evaluate.bootstrap must be >= 0"),
        (all(_NAME.fullmatch(n) for n in p.evaluate.external),
         "evaluate.external names must be letters, digits, '_' or '-' (they name output files)"),
    ]
    for ok, message in checks:
        if not ok:
            raise CxrError(f"params: {message}")
