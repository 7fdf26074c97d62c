"""Typed, frozen view of params.yaml.

The file is read once (by the CLI) and the resulting objects are passed down,
so no deep code reads params.yaml or carries a hidden default. Unknown and
missing keys are errors: a typo in `dvc exp run -S` must not be silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
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
    ood_dim: int  # PCA components of the out-of-distribution gate (train/ood.py)
    ood_quantile: float  # share of validation images the gate's threshold lets pass
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


# The checkpoint's input_size bound (train/checkpoint.py) is this one: a size the shard stage
# accepts must be one a later stage can load.
INPUT_SIZE_RANGE = (32, 1024)
# The shard summary's bound on every count and byte size it records (pipeline/shard_format.py).
MAX_RECORDED_COUNT = 10**9
_BIG = 2**31 - 1  # counts with no natural bound: only a typo or a hostile value exceeds it
_INF = float("inf")

# key -> (kind, low, high, low_open, high_open); open ends exclude the bound (ints: both ends inclusive).
# Every key of params.yaml that holds a number is here (tests/test_params.py checks the file against it).
_INT = "int"
_NUM = "number"
RANGES: dict[str, tuple[str, float, float, bool, bool]] = {
    "seed": (_INT, 0, 2**63 - 1, False, False),
    "data.val_fraction": (_NUM, 0.0, 1.0, True, True),
    "data.max_reject_fraction": (_NUM, 0.0, 1.0, False, False),
    "sample.train_per_class": (_INT, 2, 10**6, False, False),  # pipeline/sample.py needs two per class
    "sample.test_per_class": (_INT, 2, 10**6, False, False),
    "sample.shifted_test_per_class": (_INT, 2, 10**6, False, False),
    "preprocess.top_crop": (_NUM, 0.0, 0.5, False, True),
    "preprocess.size": (_INT, *INPUT_SIZE_RANGE, False, False),
    "preprocess.clahe_clip": (_NUM, 0.0, 1000.0, True, False),
    "preprocess.max_pixels": (_INT, 1, 2**40, False, False),
    "preprocess.max_decoded_bytes": (_INT, 1, 2**40, False, False),
    "preprocess.min_side": (_INT, 1, INPUT_SIZE_RANGE[1], False, False),
    "shard.max_count": (_INT, 1, MAX_RECORDED_COUNT, False, False),
    "shard.max_bytes": (_INT, 1, MAX_RECORDED_COUNT, False, False),
    "shard.workers": (_INT, 0, 1024, False, False),
    "train.epochs": (_INT, 1, 10**6, False, False),
    "train.patience": (_INT, 0, 10**6, False, False),
    "train.batch_size": (_INT, 1, 65536, False, False),
    "train.lr": (_NUM, 0.0, 10.0, True, False),
    "train.max_steps": (_INT, 1, _BIG, False, False),
    "train.num_workers": (_INT, 0, 1024, False, False),
    "train.shuffle_buffer": (_INT, 1, 10**7, False, False),
    "train.aux_weight": (_NUM, 0.0, 100.0, False, False),
    "train.augment.scale[0]": (_NUM, 0.0, 10.0, True, False),
    "train.augment.scale[1]": (_NUM, 0.0, 10.0, True, False),
    "train.augment.translate": (_NUM, 0.0, 1.0, False, True),
    "train.augment.rotate": (_NUM, 0.0, 180.0, False, False),
    "evaluate.target_sensitivity": (_NUM, 0.0, 1.0, True, False),
    "evaluate.bootstrap": (_INT, 0, 10**7, False, False),
    "evaluate.batch_size": (_INT, 1, 65536, False, False),
    "evaluate.prevalence": (_NUM, 0.0, 1.0, True, True),
    "evaluate.ood_dim": (_INT, 1, 1024, False, False),
    "evaluate.ood_quantile": (_NUM, 0.5, 1.0, False, False),
    "latency.threads": (_INT, 0, 1024, False, False),
    "latency.warmup": (_INT, 0, 10**6, False, False),
    "latency.runs": (_INT, 1, 10**6, False, False),
    "latency.batch": (_INT, 1, 65536, False, False),
}
NULLABLE = {"train.lr", "train.max_steps"}  # null means the per-model default / no cap


def _range_message(key: str, spec: tuple[str, float, float, bool, bool], value: Any) -> str | None:
    """None when `value` is in the key's range, else the one-line reason naming the key and range."""
    kind, low, high, low_open, high_open = spec
    if kind == _INT:
        ok = low <= value <= high
        upper = "2**63)" if high == 2**63 - 1 else f"{high}]"
        allowed = f"an integer in [{low}, {upper}"
    else:
        ok = math.isfinite(value) and (low < value if low_open else low <= value) and (
            value < high if high_open else value <= high)
        allowed = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if ok:
        return None
    null = "null or " if key in NULLABLE else ""
    return f"{key} must be {null}{allowed}, got {value!r}"


def _lookup(p: Params, key: str) -> Any:
    node: Any = p
    for part in key.split("."):
        name, _, index = part.partition("[")
        node = getattr(node, name)
        if index:
            node = node[int(index.rstrip("]"))]
    return node


def _plain_file_name(name: str) -> bool:
    # A label file name comes from -S on the command line: it must not lead out of the dataset root.
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\x00") and ":" not in name


def _check_ranges(p: Params) -> None:
    for key, spec in RANGES.items():
        value = _lookup(p, key)
        if value is None and key in NULLABLE:
            continue
        message = _range_message(key, spec, value)
        if message:
            raise CxrError(f"params: {message}")
    checks = [
        (p.preprocess.min_side <= p.preprocess.size,
         f"preprocess.min_side must be <= preprocess.size ({p.preprocess.size}), got {p.preprocess.min_side}"),
        (p.train.augment.scale[0] <= p.train.augment.scale[1],
         f"train.augment.scale must be [low, high] with low <= high, got {list(p.train.augment.scale)}"),
        (p.data.root.strip() != "", "data.root must be a non-empty path"),
        (all(_plain_file_name(n) for n in (p.data.labels.train, p.data.labels.val or "v", p.data.labels.test)),
         "data.labels must name files directly in the dataset root (no folders, no '..')"),
        (p.train.init.strip() != "", "train.init must be scratch, imagenet or a checkpoint path"),
        (p.train.freeze == "none" or p.train.init != "scratch",
         "train.freeze=backbone keeps the backbone as it starts: it needs train.init imagenet or a checkpoint"),
        (all(_NAME.fullmatch(n) for n in p.evaluate.external),
         "evaluate.external names must be letters, digits, '_' or '-' (they name output files)"),
    ]
    checks += [(root.strip() != "", f"evaluate.external.{name} must be a non-empty path")
               for name, root in p.evaluate.external.items()]
    for ok, message in checks:
        if not ok:
            raise CxrError(f"params: {message}")
