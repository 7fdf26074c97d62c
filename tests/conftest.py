"""Shared fixtures: tiny generated data in the real formats, and the real-data root."""

from __future__ import annotations

import functools
import math
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from pipeline.fileio import sha256_file
from pipeline.params import DataParams, SampleParams
from pipeline.shard_format import (
    CLASS_NAMES,
    ShardWriter,
    encode_png,
    encode_sample,
    make_summary,
    read_summary,
    split_record,
    write_summary,
)

REPO = Path(__file__).resolve().parents[1]
COVIDX_MINI = REPO.parent / "shared" / "covidx-mini"


def data_params(val_fraction: float = 0.2, max_reject_fraction: float = 1.0, leaks: str = "report") -> DataParams:
    """The `data` section a stage function receives (its root unused: the stage takes ROOT as an input)."""
    return DataParams(root="unused", val_fraction=val_fraction, max_reject_fraction=max_reject_fraction, leaks=leaks)


def sample_params(train: int = 2, test: int = 2, shifted: int = 2) -> SampleParams:
    """The `sample` section: per-class image counts of the default sample (train, test) and of the shifted set."""
    return SampleParams(train_per_class=train, test_per_class=test, shifted_test_per_class=shifted)


@pytest.fixture(autouse=True, scope="session")
def private_onnx_cache(tmp_path_factory):
    """The inference engine caches ONNX exports under XDG_CACHE_HOME: keep the tests' out of ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def covidx_mini() -> Path:
    if not (COVIDX_MINI / "train.txt").is_file():
        pytest.skip(f"real-data test: {COVIDX_MINI} is absent (it ships beside the repo in CI only)")
    return COVIDX_MINI


def synthetic_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A learnable toy: positives carry a bright blob, negatives do not."""
    img = rng.normal(90, 20, (size, size)).clip(0, 255)
    if label:
        y, x = rng.integers(size // 4, 3 * size // 4, 2)
        yy, xx = np.mgrid[:size, :size]
        img += 120 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * (size / 8) ** 2))
    return img.clip(0, 255).astype(np.uint8)


def make_tiny_shards(
    directory: Path,
    per_class: dict[str, int] | None = None,
    size: int = 64,
    shard_count: int = 2,
    seed: int = 0,
    variant: str = "plain",
) -> Path:
    """Write a variant directory with the shard format's own writer (summary.json + tars), as the stage does,
    without the raw pipeline."""
    per_class = per_class or {"train": 8, "val": 4, "test": 4}
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in per_class.items():
        labels = [0, 1] * n
        rng.shuffle(labels)
        # the stage's own writer, rolling over by count as the stage does (max_bytes never binds here)
        writer = ShardWriter(directory, split, max_count=math.ceil(len(labels) / min(shard_count, len(labels))),
                             max_bytes=2**30)  # fmt: skip
        for i, label in enumerate(labels):
            png = encode_png(synthetic_image(label, size, rng))
            meta = {"patient_id": f"p{split}{i}", "source": "toy", "filename": f"x.{i}.png"}
            writer.write(encode_sample(f"{split}_{i:06d}", png, label, meta), len(png))
        splits[split] = split_record(writer.close(), Counter(CLASS_NAMES[c] for c in labels))
    preprocess = {"size": size, "top_crop": 0.08, "equalize": None}
    summary = make_summary(
        variant=variant,
        root=str(directory / "raw"),
        splits=splits,
        params={"preprocess": preprocess, "seed": seed},
        label_lines=sum(split["count"] for split in splits.values()),
        rejects=[],
        patient_overlap={},
        leaks=[],
    )
    write_summary(directory, summary)
    return directory


def reseal(directory: Path) -> None:
    """Record the shards' current sha256 in summary.json (after a test rewrote a shard on purpose)."""
    summary = read_summary(directory).raw
    for split in summary["splits"].values():
        for shard in split["shards"]:
            shard["sha256"] = sha256_file(directory / shard["name"])
    write_summary(directory, summary)


@pytest.fixture
def tiny_shards(tmp_path: Path) -> Path:
    return make_tiny_shards(tmp_path / "shards" / "plain")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 -- the base class's name
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(folder, its URL): a plain HTTP server on 127.0.0.1 serving `folder`, like object storage.

    Bounded: it stops at teardown, and by itself after 15 minutes should a
    test process hang, so no server outlives the tests.
    """
    root = tmp_path / "served"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    watchdog = threading.Timer(900, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
