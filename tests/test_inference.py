"""The inference engine: ONNX Runtime by default, checked against eager PyTorch, cached once per checkpoint."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import CxrError
from train import export as export_mod
from train.checkpoint import load_checkpoint, make_meta, save_checkpoint
from train.export import TOLERANCE
from train.inference import CHECK_IMAGES, Engine, batched, cached_onnx, ordered_prefetch
from train.models import build_model

SIZE = 32  # DenseNet121 on 32x32 inputs: a real architecture that exports and runs in seconds


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    net = build_model("densenet121")
    meta = make_meta(model="densenet121", variant="plain", input_size=SIZE, preprocess={"size": SIZE}, params={},
                     threshold={"value": 0.5, "rule": "max_f1", "split": "val"}, epoch=1, val_loss=0.5)  # fmt: skip
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(path, meta, net.state_dict())
    return load_checkpoint(path)


@pytest.fixture(scope="module")
def cache(ckpt, tmp_path_factory) -> Path:
    """One export for the module: exporting DenseNet121 takes tens of seconds on a busy CPU."""
    folder = tmp_path_factory.mktemp("cache")
    cached_onnx(ckpt, folder)
    return folder


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE), dtype=np.uint8)


def eager_probabilities(ckpt, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        logits = ckpt.build()(torch.from_numpy(x[:, None]).float() / 255.0).double()
    return torch.sigmoid(logits).numpy()


@pytest.mark.slow
def test_auto_runs_onnxruntime_checked_on_the_first_batch(ckpt, cache):
    engine = Engine(ckpt, "auto", torch.device("cpu"), cache)
    x = images(10)
    got = engine.probabilities(x)
    assert engine.path == "onnxruntime" and engine.note == ""
    check = engine.describe()["first_batch_check"]
    assert check["ok"] and check["inputs"] == CHECK_IMAGES and check["max_abs_diff_probability"] <= TOLERANCE
    expected = eager_probabilities(ckpt, x)
    assert np.abs(got - expected).max() <= TOLERANCE and np.ptp(expected) > 1e-3  # the nets' outputs differ
    # the export's lock file stays (as shard's); nothing else but the one cached graph
    assert sorted(p.name for p in cache.iterdir()) == [".cxr.lock", f"{ckpt.file_sha256()}.onnx"]


def test_the_export_is_cached_by_checkpoint_sha256(ckpt, cache, monkeypatch):
    first = cache / f"{ckpt.file_sha256()}.onnx"
    stamp = first.stat().st_mtime_ns

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the cache holds this checkpoint")

    monkeypatch.setattr(export_mod, "export_onnx", no_export)
    assert cached_onnx(ckpt, cache) == first and first.stat().st_mtime_ns == stamp
    assert Engine(ckpt, "auto", torch.device("cpu"), cache).path == "onnxruntime"


def test_a_foreign_file_under_the_checkpoint_name_is_exported_again(ckpt, cache, tmp_path, monkeypatch):
    good = (cache / f"{ckpt.file_sha256()}.onnx").read_bytes()

    def fake_export(checkpoint, out_path):  # the real export is tested above and in test_export.py
        Path(out_path).write_bytes(good)
        return Path(out_path)

    monkeypatch.setattr(export_mod, "export_onnx", fake_export)
    (tmp_path / f"{ckpt.file_sha256()}.onnx").write_bytes(b"not a model")
    path = cached_onnx(ckpt, tmp_path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.slow
def test_disagreement_falls_back_to_eager_with_a_note(ckpt, cache, monkeypatch, caplog):
    real = Engine._onnx_outputs
    monkeypatch.setattr(Engine, "_onnx_outputs", lambda self, x: (real(self, x)[0] + 0.01, real(self, x)[1]))
    engine = Engine(ckpt, "auto", torch.device("cpu"), cache)
    x = images(4, seed=1)
    got = engine.probabilities(x)
    assert engine.path == "eager" and "differs from PyTorch on the first batch" in engine.note
    assert engine.note in caplog.text and "\n" not in engine.note
    assert np.abs(got - eager_probabilities(ckpt, x)).max() < 1e-6  # scored by eager, not by the wrong graph
    assert not engine.describe()["first_batch_check"]["ok"]

    strict = Engine(ckpt, "onnxruntime", torch.device("cpu"), cache)
    with pytest.raises(CxrError, match="engine onnxruntime was asked for"):
        strict.probabilities(x)


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX ownership")
def test_a_cache_others_can_write_is_not_used(ckpt, cache, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    engine = Engine(ckpt, "auto", torch.device("cpu"), shared)
    assert engine.path == "eager" and "writable by others" in engine.note
    assert list(shared.iterdir()) == []
    with pytest.raises(CxrError, match="writable by others"):
        Engine(ckpt, "onnxruntime", torch.device("cpu"), shared)

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / f"{ckpt.file_sha256()}.onnx").symlink_to(cache / f"{ckpt.file_sha256()}.onnx")
    with pytest.raises(CxrError, match="not a plain file"):
        cached_onnx(ckpt, private)


def test_without_onnxruntime_auto_screens_eagerly_and_says_why(ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    engine = Engine(ckpt, "auto", torch.device("cpu"), tmp_path / "cache")
    assert engine.path == "eager" and "onnxruntime is not installed" in engine.note
    x = images(2)
    np.testing.assert_allclose(engine.probabilities(x), eager_probabilities(ckpt, x), rtol=0, atol=1e-6)
    with pytest.raises(CxrError, match="engine onnxruntime was asked for: .*onnxruntime is not installed"):
        Engine(ckpt, "onnxruntime", torch.device("cpu"), tmp_path / "cache")


def test_eager_never_exports(ckpt, tmp_path):
    engine = Engine(ckpt, "eager", torch.device("cpu"), tmp_path / "cache")
    x = images(3)
    np.testing.assert_allclose(engine.probabilities(x), eager_probabilities(ckpt, x), rtol=0, atol=1e-6)
    assert engine.describe() == {"engine": "eager", "requested": "eager", "device": "cpu",
                                 "first_batch_check": None, "note": ""}  # fmt: skip
    assert not (tmp_path / "cache").exists()
    with pytest.raises(CxrError, match="unknown engine"):
        Engine(ckpt, "tensorrt", torch.device("cpu"))


def test_prefetch_keeps_order_and_bounds_the_work_in_flight():
    running, most = [0], [0]
    lock = threading.Lock()

    def load(i: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.002 * (i % 3))  # finish out of order
        with lock:
            running[0] -= 1
        return i * i

    started = []
    source = (started.append(i) or i for i in range(50))
    out = []
    for item, value in ordered_prefetch(source, load, workers=4, ahead=6):
        assert len(started) <= item + 1 + 6  # never more than `ahead` items beyond the one consumed
        out.append((item, value))
    assert out == [(i, i * i) for i in range(50)] and most[0] <= 4
    assert [len(c) for c in batched(range(7), 3)] == [3, 3, 1]
