"""The study's preprocessing as pure functions: array in, array out.

decode (PNG/JPEG/TIFF by OpenCV/Pillow, DICOM by pipeline.dicom) -> grey
(8-bit) -> crop the top rows (burned-in text) -> centre square -> bicubic
resize -> optional histogram equalization. The shard stage and `predict` both
call `preprocess_bytes` / `preprocess_array`, so training and screening can
never drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
from PIL import Image

from pipeline.dicom import DICOM_MAGIC_OFFSET, looks_like_dicom, read_dicom_with_header
from pipeline.errors import CxrError
from pipeline.imageio import DEFAULT_MAX_DECODED_BYTES, DecodeLimits, Header, ImageRejected, decode_with_header
from pipeline.names import EQUALIZE_METHODS, VARIANTS
from pipeline.params import EqualizeMethod, PreprocessParams


@dataclass(frozen=True)
class PreprocessConfig(PreprocessParams):
    """`preprocess.*` as one variant applies it: the same fields, `equalize` None for 'plain'.

    A subclass, so a new field in PreprocessParams is a field here too, with no copy to update.
    """

    equalize: EqualizeMethod | None  # None: the 'plain' variant (keeps its place among the fields)

    # Fields added after artifacts were first written, each with the value that reproduces what
    # those older artifacts did: `from_dict` fills them in, so adding a field to PreprocessParams
    # (and here) leaves every existing shard summary, checkpoint and ONNX file readable.
    # max_decoded_bytes bounds memory only: the default decodes every image those artifacts decoded.
    ADDED_FIELDS: ClassVar[dict[str, Any]] = {"max_decoded_bytes": DEFAULT_MAX_DECODED_BYTES}

    @classmethod
    def for_variant(cls, params: PreprocessParams, variant: str) -> PreprocessConfig:
        if variant not in VARIANTS:
            raise CxrError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
        cfg = cls(**asdict(params))
        return cfg if variant == "equalized" else replace(cfg, equalize=None)

    @classmethod
    def from_dict(cls, raw: Any) -> PreprocessConfig:
        """Rebuild from the dict stored in a shard summary, checkpoint or ONNX file, checked against bounds.

        These dicts come from files that may have been edited or crafted; a
        `size` of 10**6 would make `predict` allocate until the kernel kills it.
        """
        if not isinstance(raw, dict):
            raise CxrError(f"preprocess config must be a mapping, got {type(raw).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(names), key=str)
        if unknown:
            raise CxrError(f"preprocess config has unknown key(s) {unknown}: it was written by a newer version")
        values = {**cls.ADDED_FIELDS, **raw}
        missing = [n for n in names if n not in values]
        if missing:
            raise CxrError(f"preprocess config lacks key(s) {missing}; was it written by an older version?")
        cfg = cls(**values)
        _check_bounds(cfg)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def limits(self) -> DecodeLimits:
        return DecodeLimits(self.max_pixels, self.min_side, self.max_decoded_bytes)


MAX_SIZE = 1024  # model input side; the study uses 224


def _check_bounds(cfg: PreprocessConfig) -> None:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    checks = (
        (is_int(cfg.size) and 32 <= cfg.size <= MAX_SIZE, f"size must be an integer in [32, {MAX_SIZE}]"),
        (is_num(cfg.top_crop) and 0.0 <= cfg.top_crop < 0.5, "top_crop must be in [0, 0.5)"),
        (cfg.equalize in (None, "global", "clahe"), "equalize must be null, 'global' or 'clahe'"),
        (is_num(cfg.clahe_clip) and 0.0 < cfg.clahe_clip <= 1000.0, "clahe_clip must be in (0, 1000]"),
        (isinstance(cfg.reduced_decode, bool), "reduced_decode must be true or false"),
        (is_int(cfg.max_pixels) and cfg.max_pixels > 0, "max_pixels must be a positive integer"),
        (is_int(cfg.min_side) and 1 <= cfg.min_side <= MAX_SIZE * 64, "min_side must be a positive integer"),
        (is_int(cfg.max_decoded_bytes) and 0 < cfg.max_decoded_bytes <= 2**40, "max_decoded_bytes out of range"),
    )
    for ok, message in checks:
        if not ok:
            raise CxrError(f"preprocess config: {message}")


# Pixel types an image may hold: booleans, integers and real floats (numpy kinds). Complex values
# would lose their imaginary part in the float32 cast, strings and objects are no pixels at all.
PIXEL_KINDS = "buif"
# Float pixels must lie within +-2**64, the range integer pixel types cover. Far wider than any
# detector's values (a DICOM's rescaled values come from at most 32-bit integers), and far below
# float32's 3.4e38, where the min..max stretch below would overflow to inf and score garbage.
MAX_FLOAT_PIXEL = 2.0**64


def check_pixel_values(img: np.ndarray) -> None:
    """Refuse what `to_grey_u8` cannot stretch faithfully: other pixel types, non-finite or huge floats."""
    if img.dtype.kind not in PIXEL_KINDS:
        raise ImageRejected(f"unsupported pixel type {img.dtype}: pixels must be booleans, integers or real floats")
    if img.dtype.kind != "f" or img.size == 0:
        return
    if not np.isfinite(img).all():
        raise ImageRejected("image contains non-finite values")
    low, high = float(img.min()), float(img.max())
    if max(-low, high) > MAX_FLOAT_PIXEL:
        raise ImageRejected(f"float pixel values span {low:.3g}..{high:.3g}, outside the accepted +-2^64")


def to_grey_u8(img: np.ndarray) -> np.ndarray:
    """Any-channel, any-depth image -> 2-D uint8.

    Colour (e.g. blue-tinted radiographs) goes through luma weights; deeper
    than 8-bit data is stretched over its actual min..max range, because
    12-bit radiographs stored in 16-bit containers would come out nearly black
    with a blind `>> 8`.
    """
    check_pixel_values(img)
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = img[:, :, :3]
        if img.shape[2] == 3 and img.dtype == np.uint8:
            img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
        elif img.shape[2] == 3:
            img = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        elif img.shape[2] == 1:
            img = img[:, :, 0]
        else:
            raise ImageRejected(f"unsupported channel count {img.shape[2]}")
    if img.ndim != 2:
        raise ImageRejected(f"unsupported image shape {img.shape}")
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return _stretch_u16(img)
    img = img.astype(np.float32)
    low, high = float(img.min()), float(img.max())
    if high <= low:
        return np.zeros(img.shape, np.uint8)
    return np.round((img - low) * (255.0 / (high - low))).astype(np.uint8)


def _stretch_u16(img: np.ndarray) -> np.ndarray:
    """uint16 -> uint8 over the image's min..max through a 64 Ki-entry lookup table.

    Same values as the float32 formula below (the table is computed with it),
    without a 4-bytes-a-pixel float copy of a possibly 300 MB image.
    """
    low, high = int(img.min()), int(img.max())
    if high <= low:
        return np.zeros(img.shape, np.uint8)
    levels = np.arange(low, high + 1, dtype=np.float32)
    table = np.zeros(65536, np.uint8)
    table[low : high + 1] = np.round((levels - low) * (255.0 / (high - low))).astype(np.uint8)
    return table[img]


def crop_top(img: np.ndarray, fraction: float) -> np.ndarray:
    rows = int(round(img.shape[0] * fraction))
    return img[rows:]


def center_square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return img[top : top + side, left : left + side]


# Pillow first box-reduces by an integer factor while the image stays over
# twice the target, then runs bicubic (its `thumbnail` default). A 2000-px PNG
# resizes 5x faster; the 224x224 result is within 0.03 grey levels (mean
# absolute) of a plain bicubic on covidx-mini, and a test holds it under 0.1.
RESIZE_REDUCING_GAP = 2.0


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    # Pillow's bicubic widens its kernel when downsampling (antialiasing, as in
    # torchvision's Resize); OpenCV's INTER_CUBIC does not and aliases badly
    # from 3000 px to 224.
    resized = Image.fromarray(img).resize(
        (size, size), Image.Resampling.BICUBIC, reducing_gap=RESIZE_REDUCING_GAP
    )
    return np.asarray(resized)


def equalize(img: np.ndarray, method: str, clahe_clip: float) -> np.ndarray:
    if method == "global":
        return cv2.equalizeHist(img)
    if method == "clahe":
        return cv2.createCLAHE(clipLimit=clahe_clip, tileGridSize=(8, 8)).apply(img)
    raise CxrError(f"unknown equalization {method!r}; valid: {', '.join(EQUALIZE_METHODS)}")


def preprocess_array(img: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Decoded image (any dtype/channels) -> uint8 (size, size)."""
    grey = to_grey_u8(img)
    square = center_square(crop_top(grey, cfg.top_crop))
    if min(square.shape) < 1:
        raise ImageRejected(f"nothing left after cropping a {img.shape} image")
    out = resize_square(np.ascontiguousarray(square), cfg.size)
    if cfg.equalize is not None:
        out = equalize(out, cfg.equalize, cfg.clahe_clip)
    return out


def preprocess_bytes(data: bytes, cfg: PreprocessConfig, name: str = "") -> np.ndarray:
    """Encoded image file contents -> uint8 (size, size); ImageRejected with a reason otherwise.

    `name` (the file's name or path) lets a preamble-less DICOM be known by its
    .dcm suffix; files with the DICOM magic are recognised without it.
    """
    return decode_and_preprocess(data, cfg, name)[1]


def decode_and_preprocess(data: bytes, cfg: PreprocessConfig, name: str = "") -> tuple[Header, np.ndarray]:
    """`preprocess_bytes` that also returns the source header (original width/height, format)."""
    reduce_to = (cfg.top_crop, cfg.size) if cfg.reduced_decode else None
    header, image = decode_image(data, cfg.limits, name, reduce_to)
    return header, preprocess_array(image, cfg)


def decode_image(
    data: bytes, limits: DecodeLimits, name: str = "", reduce_to: tuple[float, int] | None = None
) -> tuple[Header, np.ndarray]:
    """Any input file's bytes -> (header, decoded array): DICOM by pipeline.dicom, the rest by imageio."""
    if looks_like_dicom(Path(name), data[: DICOM_MAGIC_OFFSET + 4]):
        return read_dicom_with_header(data, limits)
    return decode_with_header(data, limits, reduce_to)
