from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds

from pipeline.errors import CxrError
from pipeline.shard_format import SUMMARY_NAME, read_summary
from tests.conftest import make_tiny_shards, reseal
from train.data import eval_batches, steps_per_epoch, train_batches, train_worker_count


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def _train(summary, **kw):
    args = dict(batch_size=4, steps=6, num_workers=2, shuffle_buffer=16, seed=3, epoch=0)
    args.update(kw)
    return list(train_batches(summary, **args))


@pytest.mark.parametrize("workers", [0, 1, 2, 5])
def test_eval_reads_every_sample_exactly_once_in_a_fixed_order(tiny_shards: Path, workers: int):
    summary = read_summary(tiny_shards)
    batches = list(eval_batches(summary, "test", batch_size=3, num_workers=workers))
    keys = _keys(batches)
    assert len(keys) == len(set(keys)) == summary.split("test").count
    assert keys == _keys(eval_batches(summary, "test", batch_size=3, num_workers=workers))
    b = batches[0]
    assert b["image"].dtype == torch.uint8 and b["image"].shape == (3, 1, 64, 64)
    assert b["label"].dtype == torch.int64 and b["label"].shape == (3,)
    assert isinstance(b["meta"][0], dict) and b["meta"][0]["source"] == "toy"


def test_eval_with_one_shard_and_more_workers(tmp_path: Path):
    summary = read_summary(make_tiny_shards(tmp_path / "one", shard_count=1))
    assert len(summary.shard_paths("val")) == 1
    keys = _keys(eval_batches(summary, "val", batch_size=5, num_workers=4))
    assert sorted(keys) == sorted(set(keys)) and len(keys) == summary.split("val").count


def test_eval_labels_match_the_shards(tiny_shards: Path):
    summary = read_summary(tiny_shards)
    seen = Counter()
    for b in eval_batches(summary, "train", batch_size=4, num_workers=2):
        seen.update(b["label"].tolist())
    assert seen == Counter({0: summary.split("train").class_counts["negative"],
                            1: summary.split("train").class_counts["positive"]})


def test_eval_count_mismatch_raises(tiny_shards: Path):
    raw = json.loads((tiny_shards / SUMMARY_NAME).read_text())
    test = raw["splits"]["test"]  # a self-consistent summary (read_summary checks that) that overstates the data
    test["count"] += 1
    test["class_counts"]["negative"] += 1
    test["shards"][0]["count"] += 1
    (tiny_shards / SUMMARY_NAME).write_text(json.dumps(raw))
    with pytest.raises(CxrError, match="summary says"):
        list(eval_batches(read_summary(tiny_shards), "test", batch_size=4, num_workers=1))


def test_rgb_png_is_rejected(tmp_path: Path):
    import cv2
    import numpy as np

    directory = make_tiny_shards(tmp_path / "rgb", shard_count=1)
    ok, png = cv2.imencode(".png", np.zeros((64, 64, 3), np.uint8))
    with wds.TarWriter(str(directory / "test-000000.tar"), mtime=0) as sink:
        sink.write({"__key__": "bad", "png": png.tobytes(), "cls": 0, "json": {}})
    reseal(directory)
    with pytest.raises(CxrError, match="1-channel"):
        list(eval_batches(read_summary(directory), "test", batch_size=2, num_workers=0))


def test_train_stream_gives_exact_full_batches_and_is_seeded(tiny_shards: Path):
    summary = read_summary(tiny_shards)
    batches = _train(summary)
    assert len(batches) == 6 and all(b["image"].shape == (4, 1, 64, 64) for b in batches)
    assert all(b["image"].dtype == torch.uint8 for b in batches)
    again = _train(summary)
    assert _keys(batches) == _keys(again)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, again))
    assert _keys(batches) != _keys(_train(summary, epoch=1))  # a new epoch, a new order
    assert _keys(batches) != _keys(_train(summary, seed=4))


def test_train_stream_cycles_shards_and_shuffles_samples(tiny_shards: Path):
    summary = read_summary(tiny_shards)
    count = summary.split("train").count  # 16 samples in 2 shards
    one_pass = sorted(_keys(eval_batches(summary, "train", 4, 0)))
    # without a sample buffer, a pass worth of batches reads each shard once: every sample once
    unshuffled = _keys(_train(summary, steps=count // 4, num_workers=1, shuffle_buffer=1))
    assert sorted(unshuffled) == one_pass
    # with a buffer, samples mix within and across shards (and across the cycle boundary)
    shuffled = _keys(_train(summary, steps=count // 4, num_workers=1, shuffle_buffer=16))
    assert shuffled != unshuffled and set(shuffled) <= set(one_pass)
    assert len(set(shuffled)) >= count // 2


def test_ranks_get_the_same_number_of_batches_and_different_data(tmp_path: Path):
    # 3 shards over 2 ranks: uneven by shard, equal by batch count thanks to the endless cycle
    per_class = {"train": 12, "val": 2, "test": 2}
    summary = read_summary(make_tiny_shards(tmp_path / "s", per_class=per_class, shard_count=3))
    r0 = _train(summary, rank=0, world_size=2, steps=9)
    r1 = _train(summary, rank=1, world_size=2, steps=9)
    assert len(r0) == len(r1) == 9
    assert _keys(r0[:3]) != _keys(r1[:3])


def test_worker_and_step_arithmetic(tiny_shards: Path):
    summary = read_summary(tiny_shards)  # 2 train shards
    assert train_worker_count(summary, 8, 1) == 2
    assert train_worker_count(summary, 8, 2) == 1
    assert train_worker_count(summary, 0, 1) == 0
    assert steps_per_epoch(100, 32, 1, None) == 4
    assert steps_per_epoch(100, 32, 2, None) == 2
    assert steps_per_epoch(100, 32, 1, 3) == 3


def test_truncated_shard_is_refused_by_its_checksum(tiny_shards: Path):
    shard = tiny_shards / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CxrError, match=r"val-000000.tar: sha256 .* differs .* altered or truncated"):
        list(eval_batches(read_summary(tiny_shards), "val", batch_size=4, num_workers=0))


def test_a_corrupt_tar_whose_checksum_matches_is_still_a_clear_error(tiny_shards: Path):
    shard = tiny_shards / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    reseal(tiny_shards)  # e.g. a shard stage that wrote a broken tar: the summary agrees with it
    with pytest.raises(CxrError, match="cannot read shard data"):
        list(eval_batches(read_summary(tiny_shards), "val", batch_size=4, num_workers=0))


@pytest.mark.parametrize("workers", [0, 1])
def test_one_flipped_byte_refuses_the_shard_before_any_sample_is_used(tiny_shards: Path, workers: int):
    shard = tiny_shards / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01  # in the first member's data block: the tar still parses, only the checksum tells
    shard.write_bytes(bytes(data))
    summary = read_summary(tiny_shards)
    with pytest.raises(CxrError, match=r"train-000001.tar: sha256 .* differs"):
        list(eval_batches(summary, "train", batch_size=4, num_workers=workers))
    with pytest.raises(CxrError, match=r"train-000001.tar: sha256 .* differs"):
        _train(summary, num_workers=workers)


def test_a_summary_without_shard_checksums_is_refused(tiny_shards: Path):
    raw = json.loads((tiny_shards / SUMMARY_NAME).read_text())
    del raw["splits"]["val"]["shards"][0]["sha256"]
    (tiny_shards / SUMMARY_NAME).write_text(json.dumps(raw))
    with pytest.raises(CxrError, match=r"val.shards\[0\].sha256 must be 64 hex digits"):
        read_summary(tiny_shards)


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_stream_over_http_exactly_as_from_the_folder(http_root, workers: int):
    root, url = http_root
    make_tiny_shards(root / "plain")
    local, remote = read_summary(root / "plain"), read_summary(f"{url}/plain")
    assert _keys(eval_batches(remote, "test", 4, workers)) == _keys(eval_batches(local, "test", 4, workers))
    a, b = _train(remote, num_workers=workers), _train(local, num_workers=workers)
    assert _keys(a) == _keys(b) and all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


def test_a_tampered_shard_served_over_http_is_refused(http_root):
    root, url = http_root
    make_tiny_shards(root / "plain")
    summary = read_summary(f"{url}/plain")
    shard = root / "plain" / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CxrError, match=r"train-000000.tar: sha256 .* differs"):
        _train(summary, num_workers=2)
