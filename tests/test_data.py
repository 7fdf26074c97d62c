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


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process tree from Linux's /proc")
@pytest.mark.parametrize("stream", ["train", "eval"])
def test_loader_workers_are_not_forks_of_the_trainer(tiny_shards: Path, stream: str):
    # A forked worker shares the trainer's heap copy-on-write and made the first
    # step of every epoch 2-3x slower; workers must come from the forkserver.
    import os

    summary = read_summary(tiny_shards)
    before = _children(os.getpid())
    if stream == "train":
        batches = iter(train_batches(summary, batch_size=4, steps=6, num_workers=2, shuffle_buffer=8, seed=1, epoch=0))
    else:
        batches = iter(eval_batches(summary, "train", batch_size=4, num_workers=2))
    next(batches)  # the workers run now
    ours = Path("/proc/self/cmdline").read_bytes()
    new = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in _children(os.getpid()) - before}
    assert not [pid for pid, cmd in new.items() if cmd == ours], "a loader worker was forked from this process"
    servers = [pid for pid in _children(os.getpid()) if b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert sum(len(_children(s)) for s in servers) >= 2  # the two workers, forked from the forkserver
    list(batches)


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


# --- shard samples checked against their summary before use (issue 21) ------------------------

def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG of width x height black grey pixels, built row by row (never width x height in memory)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row, parts = zlib.compressobj(9), b"\0" * (width + 1), []
    for _ in range(height):
        parts.append(packer.compress(row))
    parts.append(packer.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def _variant(directory: Path, splits: dict[str, list[list[tuple]]], size: int = 64, **params) -> Path:
    """A variant whose shards hold exactly the given (key, png, label, meta) samples, with an honest summary
    (every sha256 and count is what the tars hold), as a hostile producer with the format's writer makes it."""
    import numpy as np

    from pipeline.fileio import sha256_file
    from pipeline.shard_format import CLASS_NAMES, encode_png, encode_sample, make_summary, shard_name, split_record
    from pipeline.shard_format import write_summary

    directory.mkdir(parents=True)
    records = {}
    for split, shards in splits.items():
        written, counts = [], Counter()
        for index, samples in enumerate(shards):
            name = shard_name(split, index)
            with wds.TarWriter(str(directory / name), mtime=0) as sink:
                for key, png, label, meta in samples:
                    png = png if png is not None else encode_png(np.full((size, size), 7, np.uint8))
                    sink.write(encode_sample(key, png, label, meta))
                    counts[CLASS_NAMES[label]] += 1
            written.append({"name": name, "count": len(samples), "sha256": sha256_file(directory / name)})
        records[split] = split_record(written, counts)
    write_summary(directory, make_summary(variant="plain", root="raw", splits=records,
                                          params={"preprocess": {"size": size}, "seed": 0, **params}, label_lines=0,
                                          rejects=[], patient_overlap={}, leaks=[]))  # fmt: skip
    return directory


def _honest(split: str, n: int, png=None, meta=None) -> list[tuple]:
    return [(f"{split}_{i}", png, i % 2, meta if meta is not None else {"patient_id": f"{split}{i}"}) for i in range(n)]


def test_a_huge_png_in_an_honestly_summarised_shard_is_refused_from_its_header(tmp_path: Path):
    import resource

    huge = _png_header_only(20000, 20000)  # ~0.4 MB of PNG that would decode to 400 MB
    directory = _variant(tmp_path / "v", {"test": [_honest("test", 3) + [("bomb", huge, 0, {})]]})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CxrError, match=r"sample bomb: png is 20000x20000,.*; the summary's images are 64x64") as e:
        list(eval_batches(read_summary(directory), "test", batch_size=2, num_workers=0))
    assert "\n" not in str(e.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB: nothing was decoded


def test_an_image_of_another_size_than_the_summarys_is_refused_not_scored(tmp_path: Path):
    import numpy as np

    from pipeline.shard_format import encode_png

    other = encode_png(np.zeros((300, 300), np.uint8))
    directory = _variant(tmp_path / "v", {"test": [_honest("test", 2) + [("big", other, 1, {})]]}, size=224)
    with pytest.raises(CxrError, match=r"sample big: png is 300x300,.*; the summary's images are 224x224"):
        list(eval_batches(read_summary(directory), "test", batch_size=8, num_workers=0))


def test_a_sample_whose_json_is_not_an_object_is_refused_with_its_key(tmp_path: Path):
    directory = _variant(tmp_path / "v", {"test": [_honest("test", 2) + [("listy", None, 1, [1, 2])]]})
    with pytest.raises(CxrError, match=r"sample listy: json is a list, not an object"):
        list(eval_batches(read_summary(directory), "test", batch_size=8, num_workers=0))


def test_the_same_key_in_two_shards_of_a_split_is_an_error(tmp_path: Path):
    from pipeline.shard_format import audit_shards

    directory = _variant(tmp_path / "v", {"train": [_honest("train", 4)], "val": [_honest("val", 2)],
                                          "test": [_honest("test", 2), _honest("test", 2)]})  # fmt: skip
    with pytest.raises(CxrError, match=r"key test_0 is in test-000000.tar and again in test-000001.tar"):
        audit_shards(read_summary(directory))


def test_a_key_in_two_splits_is_an_error(tmp_path: Path):
    from pipeline.shard_format import audit_shards

    leaked = _honest("train", 4)
    directory = _variant(tmp_path / "v", {"train": [leaked], "val": [_honest("val", 2)], "test": [leaked[:2]]})
    with pytest.raises(CxrError, match=r"key train_0 is in train-000000.tar and again in test-000000.tar"):
        audit_shards(read_summary(directory))


def test_each_shards_count_must_be_what_it_holds(tmp_path: Path):
    from pipeline.shard_format import audit_shards

    directory = _variant(tmp_path / "v", {"test": [_honest("test", 2), _honest("more", 4)]})
    raw = json.loads((directory / SUMMARY_NAME).read_text())
    shards = raw["splits"]["test"]["shards"]
    shards[0]["count"], shards[1]["count"] = 3, 3  # the split's total still adds up
    (directory / SUMMARY_NAME).write_text(json.dumps(raw))
    with pytest.raises(CxrError, match=r"test-000000.tar holds 2 samples, the summary lists 3"):
        audit_shards(read_summary(directory))


def test_class_counts_must_be_what_the_shards_hold(tmp_path: Path):
    from pipeline.shard_format import audit_shards

    directory = _variant(tmp_path / "v", {"train": [_honest("train", 4)]})
    raw = json.loads((directory / SUMMARY_NAME).read_text())
    raw["splits"]["train"]["class_counts"] = {"negative": 3, "positive": 1}  # drives the class weights
    (directory / SUMMARY_NAME).write_text(json.dumps(raw))
    with pytest.raises(CxrError, match=r"train holds \{'negative': 2, 'positive': 2\}, the summary lists"):
        audit_shards(read_summary(directory))


def test_honest_shards_pass_the_audit_with_the_summarys_counts(tiny_shards: Path):
    from pipeline.shard_format import audit_shards

    summary = read_summary(tiny_shards)
    held = audit_shards(summary)
    assert held == {split: summary.split(split).class_counts for split in summary.splits}


def test_a_shard_count_above_the_recorded_max_count_is_refused(tmp_path: Path):
    directory = _variant(tmp_path / "v", {"test": [_honest("test", 4)]}, max_count=2, max_bytes=10**6)
    with pytest.raises(CxrError, match=r"test.shards\[0\].count 4 exceeds params.max_count 2"):
        read_summary(directory)
