"""A hostile COVIDx-layout dataset, crafted files and killed runs, end to end (issue 10).

One corpus holds every class of trouble we know of; the tests check the
invariants rather than each case: every label line ends in a shard or a
reject with a reason, nothing outside the root is read, no user file is
touched, and every failure is one clean line.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline import manifest as manifest_module
from pipeline.cli import app
from pipeline.manifest import build_manifest
from pipeline.params import load_params
from pipeline.shards import write_variant
from tests.conftest import data_params, sample_params

REPO = Path(__file__).resolve().parents[1]
PARAMS = load_params(REPO / "params.yaml")
runner = CliRunner()


def radiograph(seed: int, shape=(300, 260), dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    top = 255 if dtype == np.uint8 else 4095
    return (rng.random(shape) * top).astype(dtype)


def png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def png_header_only(width: int, height: int, bit_depth: int) -> bytes:
    """A valid PNG header declaring any size, with one row of data: refused from the header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def multi_frame(fmt: str) -> bytes:
    frames = [Image.fromarray(radiograph(i)) for i in range(2)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


def corrupt_jpeg() -> bytes:
    data = bytearray(cv2.imencode(".jpg", radiograph(7))[1].tobytes())
    data[len(data) // 2] ^= 0x55
    return bytes(data)


# filename -> bytes, or a callable(root, split_dir) that makes the entry itself
GOOD = {f"good.{i}.png": png(radiograph(i)) for i in range(12)} | {
    "good16.png": png(radiograph(50, dtype=np.uint16)),
    "good.jpg": cv2.imencode(".jpg", radiograph(51))[1].tobytes(),
    "good.tif": cv2.imencode(".tif", radiograph(52))[1].tobytes(),
}
BAD_FILES = {
    "empty.png": b"",
    "text.png": b"just text",
    "truncated.png": png(radiograph(60))[:500],
    "corrupt.jpg": corrupt_jpeg(),
    "pages.tif": multi_frame("TIFF"),
    "anim.gif": multi_frame("GIF"),
    "huge16.png": png_header_only(12000, 12000, 16),  # 288 MB decoded: over max_decoded_bytes
    "bomb.png": png_header_only(60000, 60000, 8),  # over max_pixels
    "tiny.png": png(radiograph(61, shape=(20, 20))),
    "scan.dcm": b"\0" * 128 + b"DICM" + b"\0" * 64,
    "eio.png": png(radiograph(62)),  # made unreadable by the OS stand-in below
}


def build_corpus(base: Path) -> tuple[Path, dict[str, int]]:
    """The hostile root plus an outside folder; returns (root, expected reject count by kind)."""
    root, outside = base / "root", base / "outside"
    for d in (root / "train", root / "test", outside):
        d.mkdir(parents=True)
    (outside / "secret.png").write_bytes(png(radiograph(99)))
    for name, data in {**GOOD, **BAD_FILES}.items():
        (root / "train" / name).write_bytes(data)
    for i in range(4):
        (root / "test" / f"t.{i}.png").write_bytes(png(radiograph(200 + i)))
    (root / "test" / "leak.png").write_bytes(GOOD["good.0.png"])  # same bytes as a train image
    (root / "train" / "copy.png").write_bytes(GOOD["good.1.png"])  # same bytes within train
    (root / "train" / "out.png").symlink_to(outside / "secret.png")
    (root / "train" / "outdir").symlink_to(outside)
    (root / "train" / "folder.png").mkdir()
    os.mkfifo(root / "train" / "fifo.png")

    lines = [f"p{i % 5} {name} {'positive' if i % 2 else 'negative'} src" for i, name in enumerate(GOOD)]
    lines += [f"bad {name} negative src" for name in BAD_FILES]
    lines += [
        "p0 ./good.0.png negative src",  # duplicate by normalised path
        "p9 copy.png positive src",  # duplicate by content
        "x ../outside/secret.png positive src",  # traversal
        "x /etc/passwd positive src",  # absolute
        "x out.png positive src",  # file symlink out of the root
        "x outdir/secret.png positive src",  # folder symlink out of the root
        "x folder.png negative src",  # a folder named like an image
        "x fifo.png negative src",  # a FIFO: reading it would block forever
        "x missing.png negative src",
        "x a\x1bb.png negative src",  # control character
        "only three fields",
        "x y.png maybe src",  # unknown label
        "pat\u2028ient good.nl.png negative src",  # U+2028 is not a line break: one (missing-file) line
    ]
    text = "\ufeff" + "\r\n".join(lines) + "\r\n"
    (root / "train.txt").write_bytes(text.encode() + b"x \xff\xfe.png negative src\n\n  \t\n")
    (root / "test.txt").write_text(
        "".join(f"t{i} t.{i}.png {'positive' if i % 2 else 'negative'} src\n" for i in range(4))
        + "t9 leak.png negative src\n"
    )
    return root, {"train_lines": len(lines) + len(GOOD) * 0 + 1, "test_lines": 5}


@pytest.fixture
def eio(monkeypatch):
    """The OS says EIO for one file (a bad sector): reading any fd whose path ends in eio.png fails."""
    real_fdopen = os.fdopen

    class Failing(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, buffer):  # what hashlib.file_digest reads with
            raise OSError(errno.EIO, "Input/output error")

        def read(self, *args):
            raise OSError(errno.EIO, "Input/output error")

        def close(self):
            super().close()

    def fdopen(fd, *args, **kwargs):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("eio.png"):
            os.close(fd)
            return Failing()
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(manifest_module.os, "fdopen", fdopen)


def tree_state(folder: Path) -> dict[str, tuple]:
    """Every entry under folder (not following links) with its bytes' hash and mtime."""
    state = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else ""
        state[str(path.relative_to(folder))] = (info.st_mode, info.st_mtime_ns, digest)
    return state


def ingest_and_shard(tmp_path: Path, root: Path, out: Path, workers: int = 2):
    report_path, manifest_path = tmp_path / "data" / "ingest.json", tmp_path / "data" / "manifest.jsonl"
    build_manifest(root, manifest_path, report_path, data_params(), PARAMS.seed)
    summary = write_variant(manifest_path, report_path, out, "equalized", PARAMS.preprocess,
                            replace(PARAMS.shard, workers=workers), data_params(), PARAMS.seed,
                            show_progress=False)  # fmt: skip
    return json.loads(report_path.read_text()), summary


def test_every_label_line_is_written_or_rejected_with_a_reason_and_nothing_outside_is_read(tmp_path, eio):
    root, _ = build_corpus(tmp_path)
    before = tree_state(tmp_path)
    ingest, summary = ingest_and_shard(tmp_path, root, tmp_path / "shards")
    written = sum(summary["counts"].values())

    raw_lines = [l for l in (root / "train.txt").read_bytes().split(b"\n") if l.strip(b" \t\r")]
    raw_lines += [l for l in (root / "test.txt").read_bytes().split(b"\n") if l.strip()]
    assert summary["label_lines"] == len(raw_lines) == written + summary["reject_count"]
    assert all(r["reason"].strip() for r in summary["rejects"])
    assert written == len(GOOD) + 4 + 1  # good train images, 4 test images, the leaked copy (report policy)

    reasons = {r.get("filename", r.get("text")): r["reason"] for r in summary["rejects"]}
    expect = {
        "empty.png": "empty file", "text.png": "unrecognised format", "truncated.png": "truncated",
        "corrupt.jpg": "corrupt JPEG data", "pages.tif": "multi-frame", "anim.gif": "multi-frame",
        "huge16.png": "max_decoded_bytes", "bomb.png": "over the bound", "tiny.png": "too small",
        "scan.dcm": "DICOM has no pixel data", "eio.png": "Input/output error", "out.png": "outside the dataset root",
        "outdir/secret.png": "outside the dataset root", "folder.png": "is a folder", "fifo.png": "not a regular file",
        "missing.png": "missing file", "copy.png": "same content (sha256)", "good.0.png": "duplicate filename",
    }  # fmt: skip
    for name, words in expect.items():
        assert words in reasons[name], (name, reasons[name])
    assert any("not valid UTF-8" in r for r in reasons.values())
    assert sum("escapes the dataset root" in r for r in reasons.values()) == 2

    # the BOM did not stick to the first patient id, U+2028 did not split a line
    patients = {json.loads(l)["patient_id"] for l in (tmp_path / "data" / "manifest.jsonl").read_text().splitlines()}
    assert "p0" in patients and not any(p.startswith("\ufeff") for p in patients)
    assert ingest["leak_count"] == 1 and ingest["leaks"][0]["test"]["filename"] == "leak.png"
    assert summary["leak_count"] == 1

    secret = hashlib.sha256((tmp_path / "outside" / "secret.png").read_bytes()).hexdigest()
    shard_hashes = {json.loads(l)["sha256"] for l in (tmp_path / "data" / "manifest.jsonl").read_text().splitlines()}
    assert secret not in shard_hashes
    after = tree_state(tmp_path)
    assert {k: v for k, v in after.items() if k.startswith(("root", "outside"))} == {
        k: v for k, v in before.items() if k.startswith(("root", "outside"))
    }  # no user file touched, not even its mtime


def test_shard_refuses_a_folder_with_user_files_in_one_clean_line(tmp_path):
    root, _ = build_corpus(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "holiday.tar").write_bytes(b"precious")
    (out / "summary.json").write_text("{}")
    data = tmp_path / "data"
    build_manifest(root, data / "m.jsonl", data / "r.json", data_params(), 1)
    result = runner.invoke(app, ["shard", "--manifest", str(data / "m.jsonl"), "--ingest-report", str(data / "r.json"),
                                 "--out", str(out), "--params", str(REPO / "params.yaml")])  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0 and "refusing to write into" in result.output
    assert (out / "holiday.tar").read_bytes() == b"precious" and (out / "summary.json").read_text() == "{}"


def test_too_many_rejects_still_writes_every_reject(tmp_path):
    root, _ = build_corpus(tmp_path)
    data, out = tmp_path / "data", tmp_path / "shards"
    build_manifest(root, data / "m.jsonl", data / "r.json", data_params(), 1)
    for f in (root / "train").glob("good.*.png"):
        f.write_bytes(b"changed after ingest")
    with pytest.raises(Exception, match="all rejects in"):
        write_variant(data / "m.jsonl", data / "r.json", out, "plain", PARAMS.preprocess,
                      replace(PARAMS.shard, workers=1), data_params(max_reject_fraction=0.05), 1,
                      show_progress=False)  # fmt: skip
    rejects = json.loads((out / "rejects.json").read_text())
    assert rejects["reject_count"] == len(rejects["rejects"]) > 12 and "failed" in rejects
    assert sum("changed since ingest" in r["reason"] for r in rejects["rejects"]) == 12
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize(
    "argv,words",
    [
        (["verify", "{tmp}/nowhere"], "no shard summary"),
        (["evaluate", "--model", "{tmp}/x.pt", "--root", "{tmp}"], "label file not found"),
        (["export", "--model", "{tmp}/fake.pt", "--out", "{tmp}/out.onnx"], "is not a cxr-screen checkpoint"),
        (["predict", "{tmp}", "--model", "{tmp}/fake.pt", "--out", "{tmp}/user.csv"], "not a cxr-screen checkpoint"),
    ],
)
def test_failures_are_one_clean_line(tmp_path, argv, words):
    import torch

    torch.save({"meta": {"format": "something else"}}, tmp_path / "fake.pt")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    result = runner.invoke(app, argv)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.strip().count("\n") == 0, result.output
    assert words in result.output


def test_crafted_summary_and_model_meta_are_refused_before_use(tmp_path, tiny_shards):
    import torch

    from pipeline.errors import CxrError
    from pipeline.shard_format import read_summary
    from train.checkpoint import load_checkpoint, make_meta

    raw = json.loads((tiny_shards / "summary.json").read_text())
    raw["splits"]["train"]["shards"][0]["name"] = "../../../etc/passwd"
    (tiny_shards / "summary.json").write_text(json.dumps(raw))
    with pytest.raises(CxrError, match=r"train.shards\[0\] must be named train-000000.tar"):
        read_summary(tiny_shards)
    (tiny_shards / "summary.json").write_text("{not json")
    with pytest.raises(CxrError, match="not a readable shard summary"):
        read_summary(tiny_shards)

    meta = make_meta(model="resnet50", variant="plain", input_size=10**6, preprocess={"size": 10**6}, params={},
                     threshold={"value": 0.5}, epoch=1, val_loss=0.1)  # fmt: skip
    torch.save({"meta": meta, "state_dict": {}, "extra": {}}, tmp_path / "huge.pt")
    with pytest.raises(CxrError, match=r"input_size must be an integer in \[32, 1024\]"):
        load_checkpoint(tmp_path / "huge.pt")
    meta = make_meta(model="resnet50", variant="plain", input_size=224, preprocess={"size": 224}, params={},
                     threshold={"value": 0.5}, epoch=1, val_loss=0.1)  # fmt: skip
    torch.save({"meta": meta, "state_dict": {"fc.weight": torch.zeros(2)}, "extra": {}}, tmp_path / "wrong.pt")
    with pytest.raises(CxrError, match="weights do not fit a resnet50"):
        load_checkpoint(tmp_path / "wrong.pt").build()


def test_verify_finds_a_changed_shard(tmp_path, tiny_shards):
    ok = runner.invoke(app, ["verify", str(tiny_shards)])
    assert ok.exit_code == 0 and json.loads(ok.output)[str(tiny_shards)]["shards"] == 6
    with open(tiny_shards / "val-000001.tar", "r+b") as fh:
        fh.seek(600)
        fh.write(b"X")
    bad = runner.invoke(app, ["verify", str(tiny_shards)])
    assert bad.exit_code == 1 and "1 of 6 shard(s) do not match" in bad.output and "val-000001.tar" in bad.output


def test_a_crafted_shard_cannot_make_bench_train_write_outside(tmp_path, tiny_shards):
    import webdataset as wds

    from pipeline.errors import CxrError
    from pipeline.shard_format import read_summary
    from train.bench.bench_train import export_image_folder

    with wds.TarWriter(str(tiny_shards / "train-000000.tar"), mtime=0) as sink:
        sink.write({"__key__": "../../../escaped", "png": b"x", "cls": b"0"})
    with pytest.raises(CxrError, match="invalid key"):
        export_image_folder(read_summary(tiny_shards), "train", tmp_path / "folder")
    assert not list(tmp_path.rglob("escaped*"))


def _shard_cmd(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "shard", "--plain", "--manifest", str(data / "m.jsonl"),
            "--ingest-report", str(data / "r.json"), "--out", str(out), "--params", str(REPO / "params.yaml")]  # fmt: skip


@pytest.mark.slow
def test_shard_killed_anywhere_then_rerun_gives_byte_identical_shards(tmp_path):
    from pipeline.sample import generate_sample

    root = tmp_path / "sample"
    generate_sample(root, sample_params(24, 8), 3)
    data = tmp_path / "data"
    build_manifest(root, data / "m.jsonl", data / "r.json", data_params(max_reject_fraction=0.05), 1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(_shard_cmd(data, tmp_path / "reference"), check=True, env=env, capture_output=True)
    reference = {p.name: p.read_bytes() for p in (tmp_path / "reference").iterdir()}

    out = tmp_path / "killed"
    # Kill once while a shard is being written (a temp file exists), once after a shard was committed.
    for ready in (lambda: any(p.name.endswith(".tmp") for p in out.iterdir()),
                  lambda: any(p.name.endswith(".tar") for p in out.iterdir())):  # fmt: skip
        # Its own process group, killed whole (as `kill -9` of the job): the pool's forkserver and
        # workers die with it instead of living on as orphans of the test run.
        proc = subprocess.Popen(_shard_cmd(data, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while not (out.is_dir() and ready()) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    subprocess.run(_shard_cmd(data, out), check=True, env=env, capture_output=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == reference  # no temp left, same bytes


def test_a_full_disk_mid_shard_is_one_clean_error_and_leaves_no_temp(tmp_path, monkeypatch):
    import webdataset as wds

    from pipeline.errors import CxrError

    root, _ = build_corpus(tmp_path)
    data, out = tmp_path / "data", tmp_path / "shards"
    build_manifest(root, data / "m.jsonl", data / "r.json", data_params(), 1)
    real_write, calls = wds.TarWriter.write, []

    def write(self, sample):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, sample)

    monkeypatch.setattr(wds.TarWriter, "write", write)
    with pytest.raises(CxrError, match=r"cannot write .*-000000.tar: No space left on device"):
        write_variant(data / "m.jsonl", data / "r.json", out, "plain", PARAMS.preprocess,
                      replace(PARAMS.shard, workers=1), data_params(), 1, show_progress=False)  # fmt: skip
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("target_exists", [False, True])
def test_an_ingest_output_planted_as_a_link_is_refused_in_one_line_and_its_target_untouched(tmp_path, target_exists):
    root, _ = build_corpus(tmp_path)
    data, victim = tmp_path / "data", tmp_path / "victim.jsonl"
    data.mkdir()
    if target_exists:
        victim.write_text("a user's file\n")
    (data / "m.jsonl").symlink_to(victim)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["max_reject_fraction"] = 1.0  # the corpus is mostly rejects: ingest must reach its writes
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["ingest", "--root", str(root), "--out", str(data / "m.jsonl"), "--report",
                                 str(data / "r.json"), "--params", str(tmp_path / "params.yaml")])  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1].startswith("error:") and "symbolic link" in result.output
    assert victim.read_text() == "a user's file\n" if target_exists else not victim.exists()
    assert (data / "m.jsonl").is_symlink()
