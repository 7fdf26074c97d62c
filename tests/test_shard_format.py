"""The shard format's owner: samples and summaries round-trip through its own encoder and decoder,
and the same contract reads from a local folder or a URL (summary, shard locations, checksums)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import CxrError
from pipeline.locations import read_shard
from pipeline.shard_format import (
    MAX_SHARD_BYTES_UNRECORDED,
    SUMMARY_NAME,
    decode_sample,
    encode_png,
    encode_sample,
    make_summary,
    read_summary,
    head_images,
    shard_images,
    split_record,
    write_summary,
)
from tests.conftest import make_tiny_shards


def test_sample_round_trips_losslessly():
    image = np.random.default_rng(0).integers(0, 256, (32, 48), dtype=np.uint8)
    meta = {"source": "toy", "patient_id": "p1", "filename": "a.png"}
    sample = encode_sample("train_000001", encode_png(image), 1, meta)
    assert sample["cls"] == b"1" and sample["json"] == json.dumps(meta, sort_keys=True).encode()
    out = decode_sample({**sample, "__url__": "x.tar"})
    assert out["key"] == "train_000001" and out["label"] == 1 and out["meta"] == meta
    assert out["image"].dtype == np.uint8 and np.array_equal(out["image"], image)


@pytest.mark.parametrize(
    "key,label,message", [("train.1", 0, "must not contain a dot"), ("k", 2, "not 0 or 1"), ("k", True, "not 0 or 1")]
)
def test_encoder_refuses_what_the_reader_could_not_take_back(key, label, message):
    with pytest.raises(CxrError, match=message):
        encode_sample(key, b"", label, {})


def test_colour_or_16_bit_images_are_not_shard_images():
    with pytest.raises(CxrError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(CxrError, match="uint8"):
        encode_png(np.zeros((4, 4), np.uint16))


def test_decoder_names_the_sample_and_what_is_wrong():
    good = encode_sample("k", encode_png(np.zeros((4, 4), np.uint8)), 0, {})
    with pytest.raises(CxrError, match=r"sample k lacks \['json'\]"):
        decode_sample({k: v for k, v in good.items() if k != "json"})
    with pytest.raises(CxrError, match="label 3"):
        decode_sample({**good, "cls": b"3"})
    with pytest.raises(CxrError, match="unreadable cls/json"):
        decode_sample({**good, "json": b"{not json"})


def test_summary_round_trips_and_its_bytes_are_stable(tmp_path: Path):
    shards = [{"name": "train-000000.tar", "count": 3, "sha256": "a" * 64},
              {"name": "train-000001.tar", "count": 2, "sha256": "b" * 64}]  # fmt: skip
    splits = {"train": split_record(shards, Counter({"negative": 4, "positive": 1}))}
    summary = make_summary(variant="plain", root="/data", splits=splits, params={"preprocess": {"size": 8}, "seed": 1},
                           label_lines=6, rejects=[{"reason": "bad"}], patient_overlap={}, leaks=[])  # fmt: skip
    assert summary["counts"] == {"train": 5} and summary["reject_count"] == 1
    first = write_summary(tmp_path, summary).read_bytes()
    back = read_summary(tmp_path)
    assert back.variant == "plain" and back.preprocess == {"size": 8}
    assert back.split("train").count == 5 and back.split("train").class_counts == {"negative": 4, "positive": 1}
    assert back.shard_paths("train") == [str(tmp_path / "train-000000.tar"), str(tmp_path / "train-000001.tar")]
    assert write_summary(tmp_path, json.loads(first)).read_bytes() == first


def test_a_summary_missing_fields_is_a_clear_error(tmp_path: Path):
    (tmp_path / SUMMARY_NAME).write_text(json.dumps({"variant": "plain", "splits": {}}))
    with pytest.raises(CxrError, match="invalid shard summary"):
        read_summary(tmp_path)


def test_summary_and_shards_read_over_http_as_from_the_folder(http_root):
    root, url = http_root
    make_tiny_shards(root / "plain")
    local, remote = read_summary(root / "plain"), read_summary(f"{url}/plain/")
    assert remote.location == f"{url}/plain" and remote.raw == local.raw
    assert remote.shard_paths("val") == [f"{url}/plain/val-000000.tar", f"{url}/plain/val-000001.tar"]
    sha = remote.shard_sha256()
    assert len(sha) == 6
    assert sha[f"{url}/plain/val-000001.tar"] == local.shard_sha256()[str(root / "plain" / "val-000001.tar")]
    first = remote.shard_paths("train")[0]
    assert read_shard(first, sha[first], remote.shard_byte_limit) == (root / "plain" / "train-000000.tar").read_bytes()


def test_missing_summary_and_missing_backend_are_one_line_errors(http_root, tmp_path: Path):
    _, url = http_root
    with pytest.raises(CxrError, match="no shard summary at .*run the shard stage"):
        read_summary(tmp_path / "nowhere")
    with pytest.raises(CxrError, match=r"cannot read http://127.0.0.1:\d+/nowhere/summary.json: FileNotFoundError"):
        read_summary(f"{url}/nowhere")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(CxrError, match="cannot read s3://bucket/plain/summary.json: Install s3fs"):
            read_summary("s3://bucket/plain")


def test_shard_images_read_from_a_url_equal_the_folder_and_a_changed_shard_is_refused(http_root):
    root, url = http_root
    make_tiny_shards(root / "plain")
    keys = {"train_000000", "val_000001", "test_000003"}
    local, remote = shard_images(root / "plain", keys), shard_images(f"{url}/plain", keys)
    assert set(local) == set(remote) == keys
    assert all(np.array_equal(local[k], remote[k]) for k in keys)
    shard = read_summary(root / "plain").shard_paths("test")[-1]
    Path(shard).write_bytes(Path(shard).read_bytes()[:-1024])
    with pytest.raises(CxrError, match="differs from the summary's"):
        shard_images(f"{url}/plain", {"test_999999"})


def test_verify_checks_shards_at_a_url_and_names_the_changed_one(http_root):
    from typer.testing import CliRunner

    from pipeline.cli import app

    root, url = http_root
    make_tiny_shards(root / "plain")
    ok = CliRunner().invoke(app, ["verify", f"{url}/plain"])
    assert ok.exit_code == 0 and '"shards": 6' in ok.output, ok.output
    with open(root / "plain" / "val-000001.tar", "r+b") as fh:
        fh.seek(600)
        fh.write(b"X")
    (root / "plain" / "test-000000.tar").unlink()
    bad = CliRunner().invoke(app, ["verify", f"{url}/plain"])
    assert bad.exit_code == 1 and "2 of 6 shard(s) do not match" in bad.output
    assert "val-000001.tar" in bad.output and "test-000000.tar (missing)" in bad.output


def test_the_shard_bound_comes_from_the_summary_and_is_validated(tmp_path: Path):
    make_tiny_shards(tmp_path / "plain", size=64)
    path = tmp_path / "plain" / SUMMARY_NAME
    raw = json.loads(path.read_text())
    assert read_summary(tmp_path / "plain").shard_byte_limit == MAX_SHARD_BYTES_UNRECORDED  # bounds not recorded
    raw["params"].update(max_bytes=5000, max_count=8)
    path.write_text(json.dumps(raw))
    # max(5000, one 64x64 sample: 2 * 64 * 64 + 16 KiB) + 8 samples' tar allowance + 1 MiB
    assert read_summary(tmp_path / "plain").shard_byte_limit == (2 * 64 * 64 + 16384) + 8 * 16384 + 2**20
    for bad in (0, -1, True, "100", 1.5):
        raw["params"]["max_bytes"] = bad
        path.write_text(json.dumps(raw))
        with pytest.raises(CxrError, match="params.max_bytes must be a positive count"):
            read_summary(tmp_path / "plain")


def test_head_images_read_only_the_leading_shards_of_each_split(tmp_path):
    # 16 train images in 4 shards of 4: the first 6 need two shards, and a missing third shard is never opened
    shards = make_tiny_shards(tmp_path / "plain", per_class={"train": 8, "val": 2, "test": 2}, shard_count=4)
    summary = read_summary(shards)
    Path(summary.shard_paths("train")[2]).unlink()
    found = head_images(shards, per_split=6)
    train = sorted(k for k in found if k.startswith("train"))
    assert len(train) == 6 and len(found) == 6 + 4 + 4  # val and test hold 4 each: all of them
    assert all(img.shape == (64, 64) and img.dtype == np.uint8 for img in found.values())
    assert train == [f"train_{i:06d}" for i in range(6)]  # shard order: the writer's order
