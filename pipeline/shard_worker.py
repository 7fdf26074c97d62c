"""The per-image work of the shard stage, run in a process pool.

Kept free of torch and webdataset on purpose: the pool's forkserver preloads
this module, and importing webdataset pulls in torch (about 2 s), which every
shard run would otherwise pay before its first image.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import cv2

from pipeline.imageio import ImageRejected
from pipeline.labels import read_image_file
from pipeline.manifest import ManifestEntry
from pipeline.preprocess import PreprocessConfig, decode_and_preprocess
from pipeline.shard_format import encode_png

@dataclass(frozen=True)
class ShardTask:
    entry: ManifestEntry
    root: str  # the dataset root; the image is root/entry.path, re-checked to stay inside it
    cfg: PreprocessConfig


@dataclass(frozen=True)
class ShardResult:
    entry: ManifestEntry
    png: bytes | None
    width: int = 0
    height: int = 0
    reason: str = ""


def process_one(task: ShardTask) -> ShardResult:
    """Read, verify, preprocess and PNG-encode one image; a reject carries its reason."""
    data = read_image_file(task.root, task.entry.path, task.cfg.max_decoded_bytes)
    if isinstance(data, str):
        return ShardResult(task.entry, None, reason=data)
    if hashlib.sha256(data).hexdigest() != task.entry.sha256:
        return ShardResult(task.entry, None, reason="file changed since ingest (sha256 mismatch): rerun ingest")
    try:
        header, image = decode_and_preprocess(data, task.cfg, task.entry.path)
    except ImageRejected as exc:
        return ShardResult(task.entry, None, reason=str(exc))
    except (MemoryError, cv2.error) as exc:  # the bounds make these unlikely; a reject, never a dead stage
        return ShardResult(task.entry, None, reason=f"decoding failed: {type(exc).__name__}: {exc}")
    return ShardResult(task.entry, encode_png(image), header.width, header.height)


def init_worker() -> None:
    cv2.setNumThreads(1)  # one image per process already fills the cores


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool whose workers never inherit a forked copy of torch/OpenMP thread state.

    Plain fork() after torch has started its thread pools can deadlock a child
    on a lock held by a thread that no longer exists; forkserver children come
    from a clean, single-threaded server. The server preloads this module and
    the main script, so a two-worker pool starts in about 40 ms rather than
    each worker re-importing the program.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", __name__])
    return ProcessPoolExecutor(max_workers=workers, initializer=init_worker, mp_context=ctx)
