"""DICOM decoding: rescale, VOI window, MONOCHROME1 / INVERSE, compressed syntaxes, refusals with clear messages."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
import pydicom
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MPEG4HP41,
    RLELossless,
    UID,
    generate_uid,
)

from pipeline import dicom
from pipeline.dicom import image_file_header, looks_like_dicom, read_dicom
from pipeline.errors import CxrError
from pipeline.imageio import DecodeLimits

LIMITS = DecodeLimits(max_pixels=10**9, min_side=2)


def unit(data: bytes, limits: DecodeLimits = LIMITS) -> np.ndarray:
    """read_dicom's uint8 output as [0, 1] floats, to state expectations in display terms."""
    out = read_dicom(data, limits)
    assert out.dtype == np.uint8
    return out / 255.0


def dicom_bytes(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    syntax: UID = ExplicitVRLittleEndian,
    frames: int = 1,
    preamble: bool = True,
    presentation_lut: str | None = None,
    fragments: list[bytes] | None = None,
    bits: int = 12,
) -> bytes:
    """A minimal DX DICOM (`bits` stored) as a Part 10 file.

    A compressed `syntax` gets `fragments` as its encapsulated frames, or junk.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (8 if bits == 8 else 16), bits, bits - 1, 0
    if frames != 1:
        ds.NumberOfFrames = frames
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if presentation_lut is not None:
        ds.PresentationLUTShape = presentation_lut
    if syntax.is_compressed:
        ds.PixelData = encapsulate(fragments or [b"\x00\x01junk-not-a-codestream" * 8])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = np.tile(pixels.astype("<u1" if bits == 8 else "<u2"), (frames, 1, 1)).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=preamble)
    return buf.getvalue()


def gradient(rows: int = 64, cols: int = 80, hi: int = 4095) -> np.ndarray:
    return np.tile(np.linspace(0, hi, cols), (rows, 1)).round().astype(np.uint16)


def test_monochrome2_without_voi_stretches_full_range():
    out = unit(dicom_bytes(gradient(hi=3000) + 500))
    assert out.shape == (64, 80)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.all(np.diff(out[0]) >= 0)  # left dark -> right bright is kept


def test_monochrome1_is_inverted():
    pixels = gradient()
    mono2 = unit(dicom_bytes(pixels, photometric="MONOCHROME2"))
    mono1 = unit(dicom_bytes(pixels, photometric="MONOCHROME1"))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1 / 255)
    assert mono1[0, 0] == 1.0  # the lowest stored value is displayed white


def test_rescale_then_window_maps_the_window_onto_black_to_white():
    # stored p -> value 2p - 1024; window centre 0, width 400 shows values -200..200
    values = np.array([-500, -200, 0, 100, 200, 900], dtype=float)
    stored = ((values + 1024) / 2).astype(np.uint16)
    pixels = np.repeat(stored[None, :], 4, axis=0)
    out = unit(dicom_bytes(pixels, slope=2.0, intercept=-1024.0, window=(0.0, 400.0)))[0]
    assert out[0] == 0.0 and out[1] == 0.0  # at or below the window floor
    assert out[-1] == 1.0 and out[-2] == pytest.approx(1.0, abs=0.01)
    assert out[2] == pytest.approx(0.5, abs=0.01)
    assert out[3] == pytest.approx(0.75, abs=0.01)


def test_window_is_applied_on_rescaled_values_not_stored_ones():
    pixels = np.repeat(np.array([[500, 512, 524]], dtype=np.uint16), 4, axis=0)
    # rescaled 2p - 1024 = -24, 0, 24: centred in a narrow window -> dark, mid, bright
    with_rescale = unit(dicom_bytes(pixels, slope=2.0, intercept=-1024.0, window=(0.0, 40.0)))
    assert with_rescale[0, 0] < 0.1 and with_rescale[0, 1] == pytest.approx(0.5, abs=0.05) and with_rescale[0, 2] > 0.9
    # the same window read against the stored values would be all white
    without = unit(dicom_bytes(pixels, window=(0.0, 40.0)))
    assert np.all(without == 1.0)


def test_monochrome1_inversion_happens_after_the_window():
    pixels = np.repeat(np.array([[0, 2048, 4095]], dtype=np.uint16), 2, axis=0)
    out = unit(dicom_bytes(pixels, photometric="MONOCHROME1", window=(2048.0, 4096.0)))[0]
    assert out[0] == pytest.approx(1.0, abs=0.01) and out[2] == pytest.approx(0.0, abs=0.01)


def test_file_without_preamble_is_read():
    out = unit(dicom_bytes(gradient(), preamble=False))
    assert out.shape == (64, 80)


def test_presentation_lut_inverse_inverts_monochrome2():
    pixels = gradient()
    plain = unit(dicom_bytes(pixels))
    np.testing.assert_allclose(unit(dicom_bytes(pixels, presentation_lut="INVERSE")), 1.0 - plain, atol=1 / 255)
    np.testing.assert_array_equal(unit(dicom_bytes(pixels, presentation_lut="IDENTITY")), plain)


def test_monochrome1_with_inverse_is_inverted_once():
    # PS3.3 C.8.11.6.1.2: INVERSE is what a MONOCHROME1 DX carries; both name the same inversion.
    pixels = gradient()
    mono1 = unit(dicom_bytes(pixels, photometric="MONOCHROME1"))
    both = unit(dicom_bytes(pixels, photometric="MONOCHROME1", presentation_lut="INVERSE"))
    np.testing.assert_array_equal(both, mono1)
    assert both[0, 0] == 1.0


def test_syntax_pydicom_cannot_decode_is_refused_by_name():
    with pytest.raises(CxrError, match=r"MPEG-4.*1\.2\.840\.10008\.1\.2\.4\.102.*not supported.*uncompressed"):
        read_dicom(dicom_bytes(gradient(), syntax=MPEG4HP41), LIMITS)


def test_syntax_whose_plugin_is_missing_is_refused_by_name(monkeypatch):
    class Unavailable:  # what pydicom reports on a machine without the pylibjpeg plugins
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"]

    monkeypatch.setattr(dicom, "get_decoder", lambda syntax: Unavailable())
    with pytest.raises(CxrError, match=r"JPEG-LS Lossless.*1\.2\.840\.10008\.1\.2\.4\.80.*pylibjpeg-libjpeg.*uncompressed"):
        read_dicom(dicom_bytes(gradient(), syntax=JPEGLSLossless), LIMITS)


def test_unknown_syntax_is_refused_by_uid():
    # pydicom will not write a syntax it does not know, so swap a same-length UID into the file meta.
    data = dicom_bytes(gradient(), syntax=JPEGLSLossless).replace(b"1.2.840.10008.1.2.4.80", b"1.2.840.10008.1.2.4.98")
    with pytest.raises(CxrError, match=r"unknown \(1\.2\.840\.10008\.1\.2\.4\.98\).*not supported"):
        read_dicom(data, LIMITS)


def test_corrupt_jpeg2000_stream_names_the_syntax():
    # pydicom has a JPEG 2000 plugin here (Pillow) or not; either way the message names the syntax.
    with pytest.raises(CxrError, match=r"JPEG 2000.*1\.2\.840\.10008\.1\.2\.4\.90"):
        read_dicom(dicom_bytes(gradient(), syntax=JPEG2000Lossless), LIMITS)


def test_size_limits_are_checked_before_decoding():
    data = dicom_bytes(gradient(rows=64, cols=80))
    with pytest.raises(CxrError, match="over the bound"):
        read_dicom(data, DecodeLimits(max_pixels=64 * 80 - 1, min_side=2))
    with pytest.raises(CxrError, match="too small"):
        read_dicom(data, DecodeLimits(max_pixels=10**9, min_side=65))


def test_multiframe_is_refused():
    with pytest.raises(CxrError, match="multi-frame"):
        read_dicom(dicom_bytes(gradient(), frames=2), LIMITS)


@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")  # pydicom's own note on the truncated one
@pytest.mark.parametrize("blob", [b"", b"not a dicom at all" * 20, b"\x00" * 128 + b"DICM" + b"\xff" * 50])
def test_garbage_is_a_clear_error(blob):
    with pytest.raises(CxrError, match="DICOM"):
        read_dicom(blob, LIMITS)


def test_truncated_pixel_data_is_a_clear_error():
    data = dicom_bytes(gradient())
    with pytest.raises(CxrError, match="DICOM"):
        read_dicom(data[: len(data) - 1000], LIMITS)


def test_looks_like_dicom_by_suffix_or_magic():
    data = dicom_bytes(gradient())
    assert looks_like_dicom(Path("scan.DCM"), b"")
    assert looks_like_dicom(Path("IM000001"), data[:132])
    assert not looks_like_dicom(Path("x.png"), b"\x89PNG" + b"\x00" * 200)


# ---- compressed transfer syntaxes, as PACS exports them ----


def lossless_jpeg(pixels: np.ndarray, precision: int) -> bytes:
    """A minimal JPEG Process 14 codestream (predictor 1 = left neighbour, point transform 0).

    Nothing on PyPI that installs everywhere encodes lossless JPEG, so the tests
    write it: ITU T.81 H.1; one Huffman table giving every difference category
    0-16 a 5-bit code (code i = category i).
    """
    rows, cols = pixels.shape
    x = pixels.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:], pred[1:, 0], pred[1:, 1:] = x[0, :-1], x[:-1, 0], x[1:, :-1]  # row starts predict from above
    diff = (x - pred) % 65536
    diff = np.where(diff > 32768, diff - 65536, diff).ravel()
    bits = []
    for d in diff.tolist():
        category = abs(d).bit_length()
        bits.append(format(category, "05b"))
        if 0 < category < 16:
            bits.append(format(d if d > 0 else d + (1 << category) - 1, f"0{category}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    scan = bytearray()
    for i in range(0, len(stream), 8):
        scan.append(int(stream[i : i + 8], 2))
        if scan[-1] == 0xFF:
            scan.append(0x00)  # byte stuffing

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body

    sof = bytes([precision]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    dht = bytes([0x00]) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0])
    return b"\xff\xd8" + segment(0xC3, sof) + segment(0xC4, dht) + segment(0xDA, sos) + bytes(scan) + b"\xff\xd9"


def radiograph(bits: int, rows: int = 96, cols: int = 112) -> np.ndarray:
    """Smooth anatomy-like structure plus noise, reaching both ends of the stored range."""
    rng = np.random.default_rng(bits)
    yy, xx = np.mgrid[:rows, :cols] / max(rows, cols)
    top = (1 << bits) - 1
    body = 0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy) + rng.normal(0, 0.02, (rows, cols))
    img = (body.clip(0, 1) * top).round()
    img[:4], img[-4:] = 0, top  # flat black and white bands pin the stretch to the full range
    return img.astype(np.uint8 if bits == 8 else np.uint16)


def pydicom_encoded(syntax: UID, pixels: np.ndarray, bits: int, **kwargs) -> bytes:
    """Compress with pydicom's own encoders (RLE: numpy; JPEG-LS: pyjpegls; JPEG 2000: openjpeg)."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(pixels, bits=bits)))
    ds.compress(syntax, pixels, **kwargs)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def jpeg_baseline(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=100, subsampling=0)
    return out.getvalue()


# (syntax, bits stored, encoder, lossless)
CODECS = {
    "RLE": (RLELossless, 12, lambda a: pydicom_encoded(RLELossless, a, 12), True),
    "JPEG lossless SV1": (
        JPEGLosslessSV1, 12, lambda a: dicom_bytes(a, syntax=JPEGLosslessSV1, fragments=[lossless_jpeg(a, 12)]), True
    ),
    "JPEG lossless": (JPEGLossless, 16, lambda a: dicom_bytes(a, syntax=JPEGLossless, bits=16,
                                                              fragments=[lossless_jpeg(a, 16)]), True),  # fmt: skip
    "JPEG-LS lossless": (JPEGLSLossless, 12, lambda a: pydicom_encoded(JPEGLSLossless, a, 12), True),
    "JPEG 2000 lossless": (JPEG2000Lossless, 12, lambda a: pydicom_encoded(JPEG2000Lossless, a, 12), True),
    "JPEG baseline": (JPEGBaseline8Bit, 8, lambda a: dicom_bytes(a, syntax=JPEGBaseline8Bit, bits=8,
                                                                 fragments=[jpeg_baseline(a)]), False),  # fmt: skip
    "JPEG-LS near-lossless": (
        JPEGLSNearLossless, 12, lambda a: pydicom_encoded(JPEGLSNearLossless, a, 12, jls_error=1), False
    ),
    "JPEG 2000 lossy": (JPEG2000, 12, lambda a: pydicom_encoded(JPEG2000, a, 12, j2k_psnr=[70.0]), False),
}


@pytest.mark.parametrize("name", list(CODECS))
def test_compressed_syntax_decodes_like_the_uncompressed_original(name):
    syntax, bits, encode, lossless = CODECS[name]
    pixels = radiograph(bits)
    data = encode(pixels)
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == syntax
    original = read_dicom(dicom_bytes(pixels, bits=bits), LIMITS).astype(int)
    decoded = read_dicom(data, LIMITS).astype(int)
    assert decoded.shape == original.shape
    if lossless:
        np.testing.assert_array_equal(decoded, original)
    else:
        assert np.abs(decoded - original).max() <= 1, f"{name}: off by up to {np.abs(decoded - original).max()}"
        assert not np.array_equal(pixel_array(io.BytesIO(data)), pixels), "not a lossy stream: the test proves little"


@pytest.mark.parametrize("name", list(CODECS))
def test_the_installed_plugin_set_decodes_every_syntax(name):
    """The decoders the project declares (pydicom's RLE, pylibjpeg + libjpeg/openjpeg) do it alone,
    not whatever else a developer machine happens to have (gdcm, pyjpegls, Pillow)."""
    syntax, bits, encode, lossless = CODECS[name]
    plugin = "pydicom" if syntax == RLELossless else "pylibjpeg"
    assert plugin in get_decoder(syntax).available_plugins
    pixels = radiograph(bits)
    decoded = pixel_array(io.BytesIO(encode(pixels)), decoding_plugin=plugin).astype(int)
    tolerance = 0 if lossless else -(-((1 << bits) - 1) // 255)  # stored values per output grey level
    assert np.abs(decoded - pixels.astype(int)).max() <= tolerance


def test_image_file_header_reads_dicom_and_png_sizes(tmp_path):
    (tmp_path / "a.dcm").write_bytes(dicom_bytes(gradient(rows=64, cols=80), preamble=False))
    Image.fromarray(np.zeros((30, 50), np.uint8)).save(tmp_path / "b.png")
    assert (image_file_header(tmp_path / "a.dcm").width, image_file_header(tmp_path / "a.dcm").height) == (80, 64)
    header = image_file_header(tmp_path / "b.png")
    assert (header.format, header.width, header.height) == ("PNG", 50, 30)


def test_deflated_dicom_is_inflated_with_a_cap():
    plain = dicom_bytes(gradient())
    deflated = dicom_bytes(gradient(), syntax=DeflatedExplicitVRLittleEndian)
    assert len(deflated) < len(plain) and np.array_equal(read_dicom(deflated, LIMITS), read_dicom(plain, LIMITS))
    bomb = dicom_bytes(np.zeros((1000, 1000), np.uint16), syntax=DeflatedExplicitVRLittleEndian)  # 2 MB in ~3 KB
    with pytest.raises(CxrError, match="deflated DICOM inflates to more than 1 MiB"):
        read_dicom(bomb, DecodeLimits(max_pixels=10**9, min_side=2, max_decoded_bytes=2**20))


def test_dicom_memory_bound_counts_the_float_working_copies():
    with pytest.raises(CxrError, match=r"needs 0 MiB to decode, over the bound"):
        read_dicom(dicom_bytes(gradient()), DecodeLimits(max_pixels=10**9, min_side=2, max_decoded_bytes=64 * 80 * 8 - 1))
