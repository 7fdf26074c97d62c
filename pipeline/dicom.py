"""DICOM radiographs -> a display-ready greyscale array for `pipeline.preprocess.preprocess_array`.

A DICOM stores raw detector values, not a picture: the modality transform
(rescale slope/intercept or a Modality LUT) gives physical values, the VOI
transform (a VOI LUT or window centre/width) says which range of them the
radiologist looks at, and MONOCHROME1 means "bright = low value". The PNG/JPEG
exports the models were trained on had all three baked in, so we apply them
here with pydicom's own implementations and hand over an 8-bit array in which
white means dense, exactly like a decoded PNG. (8-bit, not float: for deeper
data `preprocess_array` stretches the image's own min..max, which would undo
the VOI window whenever the image does not reach both ends of it.)

Compressed transfer syntaxes are decoded only when pydicom has a working
plugin for them; otherwise the file is refused with a message naming the
syntax (rather than a pydicom traceback about missing plugins).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import UID, ImplicitVRLittleEndian

from pipeline.imageio import DecodeLimits, ImageRejected

DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"
DICOM_SUFFIXES = (".dcm", ".dicom")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


def looks_like_dicom(path: Path, head: bytes) -> bool:
    """True for a .dcm/.dicom name or the Part 10 preamble magic ('DICM' at offset 128).

    `head` needs only the first 132 bytes of the file.
    """
    return path.suffix.lower() in DICOM_SUFFIXES or head[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC


def read_dicom(data: bytes, limits: DecodeLimits) -> np.ndarray:
    """Decode one DICOM image to uint8, shape (H, W), white = dense, ready for `preprocess_array`.

    Raises ImageRejected (a CxrError) with the reason for anything that is not a
    single-frame greyscale image we can decode: not DICOM, no pixel data,
    multi-frame, a colour/palette photometric interpretation, a size outside
    `limits` (checked before decoding), or a compressed transfer syntax without
    a working decoder.
    """
    try:
        # force=True accepts files without the 128-byte preamble (older exports);
        # a non-DICOM blob then fails the PixelData check below.
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
        raise ImageRejected(f"not a readable DICOM file: {exc}") from exc

    if "PixelData" not in ds:
        raise ImageRejected("DICOM has no pixel data (PixelData element missing)")
    syntax = _transfer_syntax(ds)
    _check_geometry(ds, limits)
    _check_decodable(syntax)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # decoder plugins raise assorted types on corrupt streams
        raise ImageRejected(f"cannot decode DICOM pixel data ({_describe(syntax)}): {exc}") from exc

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in _MONOCHROME:
        raise ImageRejected(f"DICOM photometric interpretation {photometric} is not greyscale (MONOCHROME1/2)")
    try:
        values = apply_modality_lut(pixels, ds)
        lo, hi, values = _apply_voi(values.astype(np.float64), ds)
    except (ValueError, KeyError, TypeError, IndexError) as exc:  # malformed LUT/window attributes
        raise ImageRejected(f"invalid DICOM rescale/VOI attributes: {exc}") from exc

    if not np.isfinite(values).all():
        raise ImageRejected("DICOM pixel values are not finite after rescale/VOI")
    unit = np.zeros(values.shape) if hi <= lo else ((values - lo) / (hi - lo)).clip(0.0, 1.0)
    if photometric == "MONOCHROME1":  # low values are displayed white
        unit = 1.0 - unit
    return np.round(unit * 255.0).astype(np.uint8)


def _transfer_syntax(ds: pydicom.Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    # A preamble-less dataset has no file meta; the standard's default syntax applies.
    return UID(syntax) if syntax else ImplicitVRLittleEndian


def _describe(syntax: UID) -> str:
    name = syntax.name if syntax.name != str(syntax) else "unknown"
    return f"transfer syntax {name} ({syntax})"


def _check_decodable(syntax: UID) -> None:
    if syntax.is_transfer_syntax and not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)  # also raises for syntaxes newer than this pydicom
    except NotImplementedError:
        raise ImageRejected(
            f"compressed DICOM with {_describe(syntax)} is not supported: pydicom has no decoder for it; "
            "convert it to an uncompressed syntax (e.g. `gdcmconv --raw in.dcm out.dcm`)"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
        raise ImageRejected(
            f"compressed DICOM with {_describe(syntax)} cannot be decoded here (needs one of: {missing}); "
            "install a decoder or convert it to an uncompressed syntax (e.g. `gdcmconv --raw in.dcm out.dcm`)"
        )


def _check_geometry(ds: pydicom.Dataset, limits: DecodeLimits) -> None:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImageRejected(f"DICOM image geometry (Rows/Columns/NumberOfFrames) missing or invalid: {exc}") from exc
    if frames != 1:
        raise ImageRejected(f"multi-frame DICOM ({frames} frames) is not a single radiograph")
    if rows * cols > limits.max_pixels:  # checked before decoding: a header can declare a decompression bomb
        raise ImageRejected(f"DICOM declares {cols}x{rows} pixels, over the bound of {limits.max_pixels}")
    if min(rows, cols) < limits.min_side:
        raise ImageRejected(f"DICOM image too small: {cols}x{rows} (min side {limits.min_side})")


def _apply_voi(values: np.ndarray, ds: pydicom.Dataset) -> tuple[float, float, np.ndarray]:
    """Apply the VOI LUT or window; return (black level, white level, values).

    With a VOI transform the output range is the one it maps onto (found by
    pushing the extreme inputs through pydicom's own function, so LINEAR,
    LINEAR_EXACT, SIGMOID and LUTs all get their exact range); without one,
    the image's own min..max is stretched, as a viewer does.
    """
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if "VOILUTSequence" not in ds and not has_window:
        return float(values.min()), float(values.max()), values
    out = apply_voi_lut(values, ds, prefer_lut=True)
    extremes = np.array([np.finfo(np.float32).min, np.finfo(np.float32).max], dtype=np.float64)
    lo, hi = apply_voi_lut(extremes, ds, prefer_lut=True).astype(np.float64)
    return float(min(lo, hi)), float(max(lo, hi)), out
