"""DICOM radiographs -> a display-ready greyscale array for `pipeline.preprocess.preprocess_array`.

A DICOM stores raw detector values, not a picture: the modality transform
(rescale slope/intercept or a Modality LUT) gives physical values, the VOI
transform (a VOI LUT or window centre/width) says which range of them the
radiologist looks at, and MONOCHROME1 or a Presentation LUT Shape of INVERSE
mean "bright = low value". The PNG/JPEG
exports the models were trained on had all three baked in, so we apply them
here with pydicom's own implementations and hand over an 8-bit array in which
white means dense, exactly like a decoded PNG. (8-bit, not float: for deeper
data `preprocess_array` stretches the image's own min..max, which would undo
the VOI window whenever the image does not reach both ends of it.)

PACS exports are often compressed. pydicom decodes RLE itself and, through
the pylibjpeg plugins this project installs, JPEG baseline/extended/lossless
and JPEG-LS (pylibjpeg-libjpeg) and JPEG 2000 (pylibjpeg-openjpeg). A syntax
without a working decoder is refused with a message naming it (rather than a
pydicom traceback about missing plugins).

Memory is bounded before decoding: the geometry is checked against the decode
limits counting the float64 working copies pydicom's LUT functions make (8
bytes a pixel), and a deflated dataset (Deflated Explicit VR Little Endian,
where pydicom would inflate everything in one call) is inflated by us with a
cap, so a 600 KB file cannot become 600 MB before any check.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pipeline.imageio import DecodeLimits, Header, ImageRejected, read_header

DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"
DICOM_SUFFIXES = (".dcm", ".dicom")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_LONG_VRS = (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UR", b"UT", b"UN")
WORK_BYTES_PER_PIXEL = 8  # apply_modality_lut / apply_voi_lut work in float64


def looks_like_dicom(path: Path, head: bytes) -> bool:
    """True for a .dcm/.dicom name or the Part 10 preamble magic ('DICM' at offset 128).

    `head` needs only the first 132 bytes of the file.
    """
    return path.suffix.lower() in DICOM_SUFFIXES or head[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC


def image_file_header(path: Path) -> Header:
    """Stored size and format of any input image, DICOM or not, from its header alone (for ingest)."""
    try:
        with open(path, "rb") as fh:
            if looks_like_dicom(path, fh.read(DICOM_MAGIC_OFFSET + 4)):
                return read_dicom_header(path)
            fh.seek(0)
            return read_header(fh)
    except OSError as exc:
        raise ImageRejected(f"cannot read file: {exc.strerror or exc}") from None


def read_dicom(data: bytes, limits: DecodeLimits) -> np.ndarray:
    """Decode one DICOM image to uint8, shape (H, W), white = dense, ready for `preprocess_array`."""
    return read_dicom_with_header(data, limits)[1]


def read_dicom_with_header(data: bytes, limits: DecodeLimits) -> tuple[Header, np.ndarray]:
    """`read_dicom` that also returns the stored size (Columns x Rows) as a Header, format "DICOM".

    Raises ImageRejected (a CxrError) with the reason for anything that is not a
    single-frame greyscale image we can decode: not DICOM, no pixel data,
    multi-frame, a colour/palette photometric interpretation, a size outside
    `limits` (checked before decoding), or a compressed transfer syntax without
    a working decoder.
    """
    try:
        meta_end, syntax_text = _file_meta(data)
        if syntax_text == DeflatedExplicitVRLittleEndian:
            ds = _parse(io.BytesIO(_inflate_capped(data[meta_end:], limits.max_decoded_bytes)))
            ds.file_meta = FileMetaDataset()  # a bare dataset now (pydicom detects its explicit VR)
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        else:
            ds = _parse(io.BytesIO(data))
    except (struct.error, zlib.error) as exc:
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
    if _inverted(ds, photometric):  # low values are displayed white
        unit = 1.0 - unit
    header = Header("DICOM", int(ds.Columns), int(ds.Rows), photometric, 1)
    return header, np.round(unit * 255.0).astype(np.uint8)


def read_dicom_header(path: Path) -> Header:
    """Columns x Rows of a DICOM file from its header, without reading the pixel data."""
    try:
        with open(path, "rb") as fh:
            ds = _parse(fh, stop_before_pixels=True)
            return Header("DICOM", int(ds.Columns), int(ds.Rows), str(ds.get("PhotometricInterpretation", "")), 1)
    except OSError as exc:
        raise ImageRejected(f"cannot read file: {exc.strerror or exc}") from None
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImageRejected(f"DICOM image geometry (Rows/Columns) missing or invalid: {exc}") from None


def _parse(source, stop_before_pixels: bool = False) -> pydicom.Dataset:
    try:
        # force=True accepts files without the 128-byte preamble (older exports);
        # a non-DICOM blob then fails the PixelData/geometry checks.
        return pydicom.dcmread(source, force=True, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
        raise ImageRejected(f"not a readable DICOM file: {exc}") from exc


def _inverted(ds: pydicom.Dataset, photometric: str) -> bool:
    """Whether the lowest value is shown white.

    PS3.3 C.8.11.6.1.2: a Presentation LUT Shape of INVERSE "shall be used if"
    the image is MONOCHROME1; both name the same single inversion, so a
    conformant MONOCHROME1 + INVERSE file is inverted once, not twice. Some
    exports (CR, secondary captures) flag inversion of a MONOCHROME2 image by
    INVERSE alone, which viewers honour, and so do we.
    """
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def _file_meta(data: bytes) -> tuple[int, str | None]:
    """(offset where the dataset starts, Transfer Syntax UID) of a Part 10 file; (0, None) without one.

    Read by hand because pydicom's reader inflates a deflated dataset as soon as
    it has read the file meta, in one uncapped call.
    """
    if data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] != DICOM_MAGIC:
        return 0, None
    pos, syntax = DICOM_MAGIC_OFFSET + 4, None
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:  # the file meta group (always explicit VR little endian) has ended
            break
        if data[pos + 4 : pos + 6] in _LONG_VRS:
            (length,), head = struct.unpack_from("<I", data, pos + 8), 12
        else:
            (length,), head = struct.unpack_from("<H", data, pos + 6), 8
        if element == 0x0010:
            syntax = data[pos + head : pos + head + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos += head + length
    return pos, syntax


def _inflate_capped(deflated: bytes, cap: int) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # DICOM's deflate is raw (RFC 1951), no zlib header
    body = inflater.decompress(deflated, cap + 1)
    if len(body) > cap or inflater.unconsumed_tail:
        raise ImageRejected(
            f"deflated DICOM inflates to more than {cap / 2**20:.0f} MiB (preprocess.max_decoded_bytes): refused"
        )
    return body


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
    if rows * cols * WORK_BYTES_PER_PIXEL > limits.max_decoded_bytes:
        need = rows * cols * WORK_BYTES_PER_PIXEL / 2**20
        raise ImageRejected(f"DICOM {cols}x{rows} needs {need:.0f} MiB to decode, over the bound of "
                            f"{limits.max_decoded_bytes / 2**20:.0f} MiB (preprocess.max_decoded_bytes)")  # fmt: skip
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
