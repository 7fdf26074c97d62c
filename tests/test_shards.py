import hashlib
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.errors import CxrError
from pipeline.fileio import sha256_file
from pipeline.locations import read_shard
from pipeline.manifest import build_manifest
from pipeline.params import ShardParams, load_params
from pipeline.preprocess import PreprocessConfig, preprocess_bytes
from pipeline.shard_format import read_summary
from pipeline.shards import balanced_count, write_variant
from tests.conftest import data_params

PARAMS = load_params("params.yaml")


def huge_png_header(side=60_000):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def add_hostile(root: Path) -> list[str]:
    """Corrupt and hostile inputs, each with a label line; returns the reasons we expect."""
    rng = np.random.default_rng(1)
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (500, 500), dtype=np.uint8)).save(jpeg, "JPEG")
    files = {
        "truncated.scan.jpg": jpeg.getvalue()[:3000],
        "zero.png": b"",
        "notes.png": b"this is a text file that pretends to be a png\n",
        "bomb.png": huge_png_header(),
        "tiny.png": cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes(),
    }
    lines = []
    for name, data in files.items():
        (root / "train" / name).write_bytes(data)
        lines.append(f"hostile {name} positive evil")
    lines.append("hostile ../test.txt positive evil")
    with open(root / "train.txt", "a") as fh:
        fh.write("\n".join(lines) + "\n")
    return ["unreadable", "empty file", "not a readable image", "over the bound", "too small", "escapes"]


def make_dataset(root: Path, n=16, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("test", n // 2)):
        (root / split).mkdir(parents=True)
        lines = []
        for i in range(count):
            label = i % 2
            h, w = rng.integers(260, 700, 2)
            img = rng.normal(100 + 40 * label, 30, (h, w)).clip(0, 255).astype(np.uint8)
            ext = ".png" if i % 3 else ".jpg"
            name = f"{split}.{i}.scan{ext}"
            cv2.imwrite(str(root / split / name), img)
            lines.append(f"pat {split} {i // 2} {name} {'positive' if label else 'negative'} src{i % 2}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def shard(root: Path, out: Path, variant="equalized", workers=2, max_count=5, max_reject=0.5, tmp=None, max_bytes=10**8):
    tmp = tmp or out.parent
    build_manifest(root, tmp / "m.jsonl", tmp / "r.json", data_params(), seed=3)
    return write_variant(
        tmp / "m.jsonl", tmp / "r.json", out, variant, PARAMS.preprocess,
        ShardParams(max_count=max_count, max_bytes=max_bytes, workers=workers),
        data_params(max_reject_fraction=max_reject), seed=3, show_progress=False,
    )


def read_all(directory: Path):
    summary = read_summary(directory)
    samples = {}
    for split in ("train", "val", "test"):
        for url in summary.shard_paths(split):
            for s in wds.WebDataset(url, shardshuffle=False):
                samples[s["__key__"]] = (split, s)
    return summary, samples


def tar_hashes(directory: Path):
    return {p.name: sha256_file(p) for p in sorted(directory.glob("*.tar"))}


def test_round_trip_counts_and_nothing_lost(tmp_path):
    root = make_dataset(tmp_path / "ds")
    expected = add_hostile(root)
    summary = shard(root, tmp_path / "out")
    reasons = " | ".join(r["reason"] for r in summary["rejects"])
    for word in expected:
        assert word in reasons, f"no reject for {word}: {reasons}"
    assert summary["reject_count"] == len(expected)
    _, samples = read_all(tmp_path / "out")
    assert len(samples) + summary["reject_count"] == summary["label_lines"] == 24 + len(expected)
    for key, (split, s) in samples.items():
        img = cv2.imdecode(np.frombuffer(s["png"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert img.shape == (224, 224) and img.dtype == np.uint8
        meta = json.loads(s["json"])
        assert int(s["cls"]) in (0, 1) and meta["patient_id"].startswith("pat") and key.startswith(split)
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_shards_mix_classes_and_respect_count_bound(tmp_path):
    root = make_dataset(tmp_path / "ds", n=30)
    summary = shard(root, tmp_path / "out", max_count=5)
    train = summary["splits"]["train"]
    assert all(s["count"] <= 5 for s in train["shards"]) and len(train["shards"]) >= 4
    _, samples = read_all(tmp_path / "out")
    first = [int(s["cls"]) for k, (split, s) in samples.items() if split == "train"][:5]
    assert set(first) == {0, 1}


def test_every_shard_written_fits_the_byte_bound_readers_enforce(tmp_path):
    """Readers refuse a shard past `shard_byte_limit`: the bound must hold for what the stage writes,
    both when the byte bound rolls shards over (each sample alone exceeds it) and when the count does."""
    root = make_dataset(tmp_path / "raw")
    for max_bytes, max_count in ((1, 5), (10**8, 5), (60_000, 4)):
        out = tmp_path / f"out-{max_bytes}"
        (tmp_path / f"work-{max_bytes}").mkdir()
        shard(root, out, workers=1, max_count=max_count, max_bytes=max_bytes, tmp=tmp_path / f"work-{max_bytes}")
        summary = read_summary(out)
        sizes = [p.stat().st_size for p in out.glob("*.tar")]
        assert sizes and max(sizes) <= summary.shard_byte_limit < 2 * max(max_bytes, 10**6) + 2**21
        for url, sha in summary.shard_sha256().items():  # and the reader takes each of them
            assert hashlib.sha256(read_shard(url, sha, summary.shard_byte_limit)).hexdigest() == sha


def test_shards_of_a_split_come_out_the_same_size(tmp_path):
    assert balanced_count(217, 100) == 73 and balanced_count(200, 100) == 100 and balanced_count(7, 100) == 100
    root = make_dataset(tmp_path / "ds", n=30)
    summary = shard(root, tmp_path / "out", max_count=7)
    for split in ("train", "val", "test"):
        counts = [s["count"] for s in summary["splits"][split]["shards"]]
        assert max(counts) - min(counts) <= 1 and max(counts) <= 7, (split, counts)


def test_byte_identical_across_runs_and_worker_counts(tmp_path):
    root = make_dataset(tmp_path / "ds")
    shard(root, tmp_path / "a" / "out", workers=2, tmp=tmp_path / "a")
    shard(root, tmp_path / "b" / "out", workers=1, tmp=tmp_path / "b")
    assert tar_hashes(tmp_path / "a" / "out") == tar_hashes(tmp_path / "b" / "out")
    assert (tmp_path / "a" / "out" / "summary.json").read_bytes() == (tmp_path / "b" / "out" / "summary.json").read_bytes()


def test_too_many_rejects_fails_with_a_hint(tmp_path):
    root = make_dataset(tmp_path / "ds", n=4)
    add_hostile(root)
    with pytest.raises(CxrError, match="dataset root"):
        shard(root, tmp_path / "out", max_reject=0.05)


def test_changed_file_after_ingest_is_a_reject_not_a_silent_swap(tmp_path):
    root = make_dataset(tmp_path / "ds")
    build_manifest(root, tmp_path / "m.jsonl", tmp_path / "r.json", data_params(), seed=3)
    victim = next((root / "train").glob("*.png"))
    cv2.imwrite(str(victim), np.zeros((300, 300), np.uint8))
    summary = write_variant(tmp_path / "m.jsonl", tmp_path / "r.json", tmp_path / "out", "plain", PARAMS.preprocess,
                            ShardParams(5, 10**8, 1), data_params(max_reject_fraction=0.5), 3, show_progress=False)
    assert any("changed since ingest" in r["reason"] for r in summary["rejects"])


@pytest.mark.slow
@pytest.mark.real_data
def test_covidx_mini_integration(covidx_mini, tmp_path):
    root = tmp_path / "covidx"
    shutil.copytree(covidx_mini, root)
    expected = add_hostile(root)
    a = shard(root, tmp_path / "a" / "out", tmp=tmp_path / "a", max_count=100, max_reject=0.05)
    b = shard(root, tmp_path / "b" / "out", tmp=tmp_path / "b", max_count=100, max_reject=0.05, workers=1)
    assert tar_hashes(tmp_path / "a" / "out") == tar_hashes(tmp_path / "b" / "out")
    assert a["reject_count"] == len(expected) and (b["counts"], b["rejects"]) == (a["counts"], a["rejects"])
    assert sum(a["counts"].values()) == 326
    _, samples = read_all(tmp_path / "a" / "out")
    labels = {}
    for line in (covidx_mini / "train.txt").read_text().splitlines() + (covidx_mini / "test.txt").read_text().splitlines():
        pid, fname, label, _src = line.rsplit(maxsplit=3)
        labels[fname] = (pid, 1 if label == "positive" else 0)
    patients = {"train": set(), "val": set(), "test": set()}
    for split, s in samples.values():
        meta = json.loads(s["json"])
        assert labels[meta["filename"]] == (meta["patient_id"], int(s["cls"]))
        patients[split].add(meta["patient_id"])
        assert cv2.imdecode(np.frombuffer(s["png"], np.uint8), cv2.IMREAD_UNCHANGED).shape == (224, 224)
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert not (patients["val"] & patients["test"])


@pytest.mark.real_data
def test_reduced_decoding_stays_within_1_5_grey_levels_on_real_jpegs(covidx_mini):
    full = PreprocessConfig.for_variant(PARAMS.preprocess, "plain")
    fast = PreprocessConfig(**(full.to_dict() | {"reduced_decode": True}))
    full = PreprocessConfig(**(full.to_dict() | {"reduced_decode": False}))
    jpegs = sorted(p for p in (covidx_mini / "train").iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:40]
    assert len(jpegs) >= 20
    diffs = []
    for path in jpegs:
        data = path.read_bytes()
        diffs.append(np.abs(preprocess_bytes(data, full).astype(float) - preprocess_bytes(data, fast)).mean())
    assert np.mean(diffs) <= 1.5, f"mean abs difference {np.mean(diffs):.2f} grey levels"


def test_label_files_may_name_dicom_files_compressed_as_pacs_exports_them(tmp_path):
    from pydicom.uid import JPEGLSLossless, RLELossless

    from tests.test_dicom import pydicom_encoded

    root = make_dataset(tmp_path / "ds", n=8)
    lines = (root / "train.txt").read_text().splitlines()
    expected = {}
    for i, syntax in ((0, RLELossless), (1, JPEGLSLossless)):
        patient, pid, number, name, label, source = lines[i].split()
        pixels = cv2.imread(str(root / "train" / name), cv2.IMREAD_GRAYSCALE)
        pixels[-1, 0], pixels[-1, -1] = 0, 255  # without a VOI window a DICOM is stretched over its own range
        (root / "train" / name).unlink()
        dcm = name.rsplit(".", 1)[0] + ".dcm"
        (root / "train" / dcm).write_bytes(pydicom_encoded(syntax, pixels, 8))
        lines[i] = " ".join((patient, pid, number, dcm, label, source))
        expected[dcm] = pixels
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    summary = shard(root, tmp_path / "out", variant="plain")
    assert summary["reject_count"] == 0, summary["rejects"]
    manifest = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    sizes = {e["filename"]: (e["format"], e["width"], e["height"]) for e in manifest}
    cfg = PreprocessConfig.for_variant(PARAMS.preprocess, "plain")
    _, samples = read_all(tmp_path / "out")
    by_name = {json.loads(s["json"])["filename"]: s for _, s in samples.values()}
    for dcm, pixels in expected.items():
        assert sizes[dcm] == ("DICOM", pixels.shape[1], pixels.shape[0])
        stored = cv2.imdecode(np.frombuffer(by_name[dcm]["png"], np.uint8), cv2.IMREAD_GRAYSCALE)
        as_png = preprocess_bytes(cv2.imencode(".png", pixels)[1].tobytes(), cfg)
        np.testing.assert_array_equal(stored, as_png)  # 8-bit MONOCHROME2 without VOI: the same picture
    png_entry = next(e for e in manifest if e["filename"].endswith(".png"))
    assert png_entry["format"] == "PNG" and png_entry["width"] >= 260
