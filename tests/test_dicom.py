"""DICOM decoding: rescale, VOI window, MONOCHROME1, refusals with clear messages."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    UID,
    generate_uid,
)

from pipeline.dicom import looks_like_dicom, read_dicom
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
) -> bytes:
    """A minimal DX DICOM (uint16, 12 bits stored) as a Part 10 file; compressed syntaxes get junk fragments."""
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
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames != 1:
        ds.NumberOfFrames = frames
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if syntax.is_compressed:
        ds.PixelData = encapsulate([b"\x00\x01junk-not-a-codestream" * 8])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = np.tile(pixels.astype("<u2"), (frames, 1, 1)).tobytes()
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


def test_compressed_syntax_without_decoder_is_refused_by_name():
    with pytest.raises(CxrError, match=r"JPEG-LS Lossless.*1\.2\.840\.10008\.1\.2\.4\.80.*uncompressed"):
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
