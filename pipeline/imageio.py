"""Safe decoding of untrusted image bytes into a 2-D greyscale array.

The header is read first (Pillow parses it without decoding pixels), so an
image that declares a huge size is refused before a byte of it is decoded.
Memory is bounded by decoded BYTES, not pixels: a 16-bit or RGB image costs
two or three times a greyscale one of the same size, and `max_decoded_bytes`
(default sized for the largest real radiographs, 3670x3308 RGB = 36 MB in
covidx-mini, with 3.5x headroom) holds for every format. Multi-frame files
(multi-page TIFF, animated GIF/PNG/WebP, multi-frame DICOM) are refused
everywhere: a radiograph is one frame, and silently using frame 0 would screen
a picture nobody chose. A JPEG whose entropy-coded data libjpeg flags as
corrupt ("Corrupt JPEG data: ...", a warning it prints and otherwise ignores)
is a reject, not a silently grey-smeared image.
Pixels are then decoded by OpenCV, which is about twice as fast as Pillow here
and can decode JPEG at 1/2, 1/4 or 1/8 scale straight from the DCT
coefficients: for a 3000-px radiograph that is most of the preprocessing cost.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
import threading
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import cv2
import numpy as np
import pyspng
from PIL import Image, UnidentifiedImageError

from pipeline.errors import CxrError

# What Pillow's format parsers raise on hostile bytes besides OSError (found by tests/test_fuzz_decode.py:
# a TIFF without dimensions raises TypeError, a short EXIF block struct.error, ...).
PARSER_ERRORS = (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, EOFError, struct.error,
                 ZeroDivisionError, OverflowError)  # fmt: skip
_REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
_EXIF_ORIENTATION = 0x0112


class ImageRejected(CxrError):
    """An input image that cannot or must not be used; the message is the recorded reason."""


# 128 MiB: 8192x8192 16-bit grey or 6500x6500 RGB, 3.5x the largest covidx-mini image. Two shard
# workers each holding file + decoded + greyscale copies then stay well under the 1.5 GB budget.
DEFAULT_MAX_DECODED_BYTES = 128 * 1024 * 1024
# Bytes per pixel of a full decode, by Pillow mode (what the decoder allocates before any
# conversion; a palette image is expanded to colour first).
_MODE_BYTES = {"1": 1, "L": 1, "P": 3, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
               "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4}  # fmt: skip


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int
    min_side: int
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES


@dataclass(frozen=True)
class Header:
    format: str
    width: int
    height: int
    mode: str
    orientation: int
    frames: int = 1

    @property
    def decoded_bytes(self) -> int:
        per_pixel = 2 if self.mode.startswith("I;16") else _MODE_BYTES.get(self.mode, 4)
        return self.width * self.height * per_pixel


def check_limits(header: Header, limits: DecodeLimits, data_len: int) -> None:
    """Everything that can be refused from the header alone, before a pixel is decoded."""
    if header.frames > 1:
        raise ImageRejected(f"multi-frame image ({header.format}, {header.frames} frames): one radiograph is one frame")
    if header.width * header.height > limits.max_pixels:
        raise ImageRejected(
            f"image declares {header.width}x{header.height} pixels, over the bound of {limits.max_pixels}"
        )
    if header.decoded_bytes > limits.max_decoded_bytes or data_len > limits.max_decoded_bytes:
        size = max(header.decoded_bytes, data_len)
        raise ImageRejected(
            f"image needs {size / 2**20:.0f} MiB to decode ({header.width}x{header.height} {header.mode}), over the "
            f"bound of {limits.max_decoded_bytes / 2**20:.0f} MiB (preprocess.max_decoded_bytes)"
        )
    if min(header.width, header.height) < limits.min_side:
        raise ImageRejected(f"image too small: {header.width}x{header.height} (min side {limits.min_side})")


def read_header(data: bytes | BinaryIO) -> Header:
    """Format, size, mode and EXIF orientation from the header; pixels are not decoded.

    `data` is the file's bytes or a binary file object (Pillow then reads only
    as far as the header).
    """
    if isinstance(data, bytes):
        if not data:
            raise ImageRejected("empty file")
        data = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            # Our own pixel bound is checked below; Pillow's bomb warning/error is
            # about its default bound, which we neither want nor rely on.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(data) as img:
                frames = int(getattr(img, "n_frames", 1)) if getattr(img, "is_animated", False) else 1
                return Header(img.format or "unknown", img.width, img.height, img.mode, _orientation(img), frames)
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"image declares too many pixels, over the bound (decompression bomb refused): {exc}") from None
    except UnidentifiedImageError:
        raise ImageRejected("not a readable image (unrecognised format)") from None
    except PARSER_ERRORS as exc:
        raise ImageRejected(f"not a readable image ({type(exc).__name__}: {exc})") from None


def _orientation(img: Image.Image) -> int:
    try:
        if img.format == "PNG":
            # Pillow's PNG getexif() decodes the whole image to look for a late
            # eXIf chunk (13 ms a file here); one before IDAT is already parsed.
            raw = img.info.get("exif")
            exif = Image.Exif()
            if raw:
                exif.load(raw)
        else:
            exif = img.getexif()
        return int(exif.get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # malformed EXIF blocks are common and harmless: keep the image as stored
        return 1


def reduction_factor(width: int, height: int, top_crop: float, size: int) -> int:
    """Largest JPEG DCT scale (1, 2, 4, 8) that keeps the cropped square >= size.

    The square side after the top crop is min(width, height * (1 - top_crop));
    decoding at 1/r keeps it at least `size` so the final resize still
    downsamples, which is what keeps the result within ~1.3 grey levels of a
    full decode.
    """
    side = min(width, int(height * (1.0 - top_crop)))
    for factor in (8, 4, 2):
        if side // factor >= size:
            return factor
    return 1


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip per the EXIF orientation tag (values 1-8)."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1, :],
        5: lambda a: a.T,
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].T,
        8: lambda a: np.rot90(a, 1),
    }
    op = ops.get(orientation)
    return np.ascontiguousarray(op(img)) if op else img


def decode_grey(data: bytes, limits: DecodeLimits, reduce_to: tuple[float, int] | None = None) -> np.ndarray:
    """Decode image bytes to a 2-D greyscale array (uint8, or uint16 for 16-bit sources).

    `reduce_to=(top_crop, size)` allows reduced-resolution JPEG decoding.
    Raises ImageRejected with the reason for anything unusable.
    """
    return decode_with_header(data, limits, reduce_to)[1]


def decode_with_header(
    data: bytes, limits: DecodeLimits, reduce_to: tuple[float, int] | None = None
) -> tuple[Header, np.ndarray]:
    """`decode_grey` that also returns the parsed header (original size, format)."""
    header = read_header(data)
    check_limits(header, limits, len(data))

    buf = np.frombuffer(data, np.uint8)
    # Orientation is applied by us for every path: OpenCV honours EXIF on a full
    # decode but not on a reduced one, and the two must give the same picture.
    flags = cv2.IMREAD_IGNORE_ORIENTATION
    factor = 1
    if reduce_to is not None and header.format == "JPEG":
        factor = reduction_factor(header.width, header.height, *reduce_to)
    img = _decode_png(data, header.mode) if header.format == "PNG" else None
    if img is None:
        mode = (_REDUCED_FLAGS[factor] if factor > 1 else cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH) | flags
        try:
            img = _imdecode_jpeg_strict(buf, mode) if header.format == "JPEG" else cv2.imdecode(buf, mode)
        except cv2.error as exc:
            raise ImageRejected(f"unreadable image (OpenCV: {' '.join(str(exc).split())[:200]})") from None
    if img is None:
        img = _decode_with_pillow(data)
    if img.ndim != 2 or img.size == 0:
        raise ImageRejected(f"decoded to an unexpected shape {img.shape}")
    return header, apply_orientation(img, header.orientation)


_STDERR_LOCK = threading.Lock()


def _imdecode_jpeg_strict(buf: np.ndarray, mode: int) -> np.ndarray | None:
    """cv2.imdecode for JPEG, with libjpeg's corrupt-data warnings turned into a reject.

    libjpeg reports recoverable corruption only by printing to stderr and
    OpenCV offers no hook for it, so fd 2 is pointed at a temp file for the
    call. The lock keeps decoding threads (predict, external evaluation) from
    reading each other's warnings; shard workers are single-threaded processes.
    """
    with _STDERR_LOCK, tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)
            img = cv2.imdecode(buf, mode)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        warning = sink.read(4096).decode("utf-8", "replace").strip()
    if "Corrupt JPEG data" in warning or "Premature end of JPEG file" in warning:
        raise ImageRejected(f"corrupt JPEG data (libjpeg: {warning.splitlines()[0]})")
    return img


# Pillow modes of the 8-bit PNGs that pyspng decodes right; it returns 16-bit grey
# as two channels and refuses grey + alpha, so those stay with OpenCV.
_SPNG_MODES = {"L": 2, "P": 3, "RGB": 3, "RGBA": 3}


def _decode_png(data: bytes, mode: str) -> np.ndarray | None:
    """8-bit PNG by libspng (pyspng): about 1.6x faster than OpenCV's libpng on covidx-mini's PNGs,
    the stage's largest cost. Colour goes to grey with OpenCV's luma weights, as OpenCV's own grey
    decode does; None (OpenCV, then Pillow, try next) for other modes or anything libspng refuses."""
    if mode not in _SPNG_MODES:
        return None
    try:
        img = pyspng.load(data, format="L" if mode == "L" else "RGB")
    except Exception:  # libspng reports a truncated or corrupt file as a plain RuntimeError
        return None
    if img.ndim != _SPNG_MODES[mode] or img.dtype != np.uint8:
        return None
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img


def _decode_with_pillow(data: bytes) -> np.ndarray:
    """Fallback for what OpenCV cannot read; also turns truncation into a reject.

    16-bit data stays uint16 (no float copy: `to_grey_u8` scales it through a
    lookup table); only 32-bit integer/float modes become float32.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode.startswith("I;16"):
                return np.asarray(img).astype(np.uint16, copy=False)
            if img.mode in ("I", "F"):
                return np.asarray(img).astype(np.float32, copy=False)
            return np.asarray(img.convert("L"))
    except PARSER_ERRORS as exc:
        raise ImageRejected(f"unreadable or truncated image ({type(exc).__name__}: {exc})") from None
