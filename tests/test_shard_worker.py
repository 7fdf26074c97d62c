import hashlib

import cv2
import numpy as np

from pipeline.manifest import ManifestEntry
from pipeline.params import load_params
from pipeline.preprocess import PreprocessConfig, preprocess_bytes
from pipeline.shard_worker import ShardTask, process_one, process_pool

CFG = PreprocessConfig.for_variant(load_params("params.yaml").preprocess, "equalized")


def radiograph_png(tmp_path, seed=0):
    rng = np.random.default_rng(seed)
    img = (rng.normal(100, 30, (400, 360))).clip(0, 255).astype(np.uint8)
    path = tmp_path / f"scan.{seed}.png"
    cv2.imwrite(str(path), img)
    return path


def task_for(path, sha256=None):
    data = path.read_bytes()
    entry = ManifestEntry("train_000000", "train", path.name, 1, "p1", "src", path.name,
                          sha256 or hashlib.sha256(data).hexdigest(), len(data))
    return ShardTask(entry, str(path.parent), CFG)


def test_shard_png_is_a_lossless_copy_of_the_preprocessed_image(tmp_path):
    path = radiograph_png(tmp_path)
    result = process_one(task_for(path))
    assert result.reason == "" and (result.width, result.height) == (360, 400)
    stored = cv2.imdecode(np.frombuffer(result.png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert stored.dtype == np.uint8 and stored.shape == (224, 224)
    assert np.array_equal(stored, preprocess_bytes(path.read_bytes(), CFG))


def test_missing_changed_and_broken_files_come_back_as_reasons(tmp_path):
    path = radiograph_png(tmp_path)
    assert "changed since ingest" in process_one(task_for(path, sha256="0" * 64)).reason
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert "not a readable image" in process_one(task_for(broken)).reason
    gone = task_for(path)
    path.unlink()
    result = process_one(gone)
    assert result.png is None and "missing file" in result.reason


def test_pool_workers_give_the_same_bytes_as_the_main_process(tmp_path):
    tasks = [task_for(radiograph_png(tmp_path, seed)) for seed in range(6)]
    with process_pool(2) as pool:
        pooled = list(pool.map(process_one, tasks, chunksize=2))
    assert [r.png for r in pooled] == [process_one(t).png for t in tasks]


def test_a_file_that_grows_after_its_stat_is_a_changed_file_not_a_longer_read(tmp_path, monkeypatch):
    """The worker reads st_size + 1 bytes (not the 128 MiB bound + 1, which read() would allocate):
    a file that grew between the stat and the read is caught by the sha256 check."""
    from pipeline import labels

    path = radiograph_png(tmp_path)
    task = task_for(path)
    real_fstat = labels.os.fstat

    class Shrunk:
        def __init__(self, info):
            self.st_size, self.st_mode = info.st_size - 100, info.st_mode

    monkeypatch.setattr(labels.os, "fstat", lambda fd: Shrunk(real_fstat(fd)), raising=True)
    data = labels.read_image_file(task.root, task.entry.path, CFG.max_decoded_bytes)
    assert isinstance(data, bytes) and len(data) == path.stat().st_size - 99
    assert "changed since ingest" in process_one(task).reason
