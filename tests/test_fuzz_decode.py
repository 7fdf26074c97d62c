"""Bounded, seeded fuzzing of the decode path: every mutated file is an image or a reject with a reason.

Real files of each supported format (covidx-mini's JPEG/PNG when present, and
generated PNG 8/16-bit, JPEG, TIFF, BMP, DICOM) are mutated by bit flips, byte
runs, truncation, splices and header-field rewrites, then sent through what
the shard stage and `predict` run. Anything but a 224x224 uint8 image or an
ImageRejected (a CxrError) with a non-empty reason fails the test.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.dicom import looks_like_dicom, read_dicom
from pipeline.errors import CxrError
from pipeline.params import load_params
from pipeline.preprocess import PreprocessConfig, preprocess_array, preprocess_bytes
from tests.conftest import REPO
from tests.test_dicom import dicom_bytes

CFG = PreprocessConfig.for_variant(load_params(REPO / "params.yaml").preprocess, "equalized")
MUTATIONS_PER_FILE = 200


def seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    img = (rng.random((180, 150)) * 255).astype(np.uint8)
    img16 = (rng.random((180, 150)) * 4095).astype(np.uint16)
    tif = io.BytesIO()
    Image.fromarray(img).save(tif, "TIFF")
    files = {
        "png8": cv2.imencode(".png", img)[1].tobytes(),
        "png16": cv2.imencode(".png", img16)[1].tobytes(),
        "jpeg": cv2.imencode(".jpg", img)[1].tobytes(),
        "tiff": tif.getvalue(),
        "bmp": cv2.imencode(".bmp", img)[1].tobytes(),
        "dicom": dicom_bytes(img16, window=(2000.0, 4000.0)),
    }
    real = REPO.parent / "shared" / "covidx-mini" / "test"
    if real.is_dir():  # one real file per format, the smallest, so the test stays fast
        for suffix in (".jpg", ".png"):
            found = sorted(real.glob(f"*{suffix}"), key=lambda p: p.stat().st_size)
            if found:
                files[f"covidx{suffix}"] = found[0].read_bytes()
    return files


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    kind = int(rng.integers(0, 6))
    n = len(buf)
    if kind == 0:  # flip a few bits anywhere
        for _ in range(int(rng.integers(1, 8))):
            i = int(rng.integers(0, n))
            buf[i] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:  # overwrite a run with random bytes
        i = int(rng.integers(0, n))
        run = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        buf[i : i + len(run)] = run
    elif kind == 2:  # truncate
        del buf[int(rng.integers(1, n)) :]
    elif kind == 3:  # splice a copy of one region into another place
        a, b = sorted(int(x) for x in rng.integers(0, n, 2))
        at = int(rng.integers(0, n))
        buf[at:at] = buf[a:b][:4096]
    elif kind == 4:  # a header field (sizes, depths, offsets live in the first 64 bytes) set to an extreme
        i = int(rng.integers(0, min(60, n - 4)))
        buf[i : i + 4] = struct.pack(">I", int(rng.choice([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF])))
    else:  # random bytes appended (polyglot tails)
        buf += rng.integers(0, 256, int(rng.integers(1, 2048)), dtype=np.uint8).tobytes()
    return bytes(buf)


def decode_like_the_pipeline(data: bytes) -> np.ndarray:
    if looks_like_dicom(Path("x"), data[:132]):
        return preprocess_array(read_dicom(data, CFG.limits), CFG)
    return preprocess_bytes(data, CFG)


@pytest.mark.parametrize("name", sorted(seeds()))
def test_mutated_files_decode_or_are_rejected_with_a_reason(name):
    original = seeds()[name]
    assert decode_like_the_pipeline(original).shape == (224, 224)  # the seed itself is a good image
    rng = np.random.default_rng(sum(name.encode()))  # seeded per format: failures reproduce
    outcomes = {"decoded": 0, "rejected": 0}
    for _ in range(MUTATIONS_PER_FILE):
        data = mutate(original, rng)
        try:
            out = decode_like_the_pipeline(data)
        except CxrError as exc:
            assert str(exc).strip(), "a reject without a reason"
            outcomes["rejected"] += 1
            continue
        assert out.dtype == np.uint8 and out.shape == (224, 224)
        outcomes["decoded"] += 1
    assert sum(outcomes.values()) == MUTATIONS_PER_FILE
