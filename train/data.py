"""WebDataset pipelines over a shard directory: an endless shuffled stream for
training and an exact, fixed-order single pass for evaluation.

Each reads as a list of steps (shards -> split -> samples -> shuffle -> decode
-> batch). Workers only decode and batch; augmentation runs on the training
device (train/fit/augment.py). Images stay uint8 (B, 1, H, W) until they reach that
device, which keeps host->device copies and pinned buffers 4x smaller.
"""

from __future__ import annotations

import functools
import io
import math
import multiprocessing
import random
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from pipeline.errors import CxrError
from pipeline.locations import read_shard
from pipeline.shard_format import ShardSummary, decode_sample


def _shard_error(exn: Exception) -> bool:
    """WebDataset handler: a corrupt or missing shard is a user-facing error, never skipped."""
    raise CxrError(f"cannot read shard data: {exn}") from exn


class VerifiedTarSamples:
    """{"url"} stream -> samples, each shard checked against the summary's sha256 first.

    Stands in for wds.tarfile_to_samples, whose opener streams a file or a
    `curl` pipe unchecked: here a shard is read whole (local path or any fsspec
    URL), hashed, and only then expanded, so no sample of an altered shard is used.
    """

    def __init__(self, summary: ShardSummary):
        self.sha256, self.limit = summary.shard_sha256(), summary.shard_byte_limit

    def __call__(self, src: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
        streams = ({"url": item["url"], "stream": io.BytesIO(read_shard(item["url"], self.sha256[item["url"]], self.limit))}
                   for item in src)
        files = wds.tariterators.tar_file_expander(streams, handler=_shard_error)
        return wds.tariterators.group_by_keys(files, handler=_shard_error)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.from_numpy(np.stack([s["image"] for s in samples])[:, None]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


def derive_seed(*parts: Any) -> int:
    # random.Random(str) hashes with SHA-512: stable across processes and runs,
    # unlike hash(), which Python salts per process for str.
    return random.Random("/".join(map(str, parts))).getrandbits(63)


class ShardCycle:
    """An endless stream of {"url": ...}: a fresh seeded permutation of the
    shards after each full pass.

    Hand-written because wds.ResampledShards draws shards with replacement and,
    unless deterministic, from the clock; a permutation cycle visits every shard
    equally often and depends only on (seed, epoch), so a resumed run reads the
    very same data. Every rank and worker iterates the same cycle and the
    splitters below take disjoint, interleaved positions of it.
    """

    def __init__(self, urls: list[str], seed: int, epoch: int):
        if not urls:
            raise CxrError("no training shards")
        self.urls, self.seed, self.epoch = list(urls), seed, epoch

    def __call__(self) -> Iterator[dict[str, str]]:
        rng = random.Random(derive_seed("shards", self.seed, self.epoch))
        while True:
            order = self.urls[:]
            rng.shuffle(order)
            yield from ({"url": url} for url in order)


class SplitByRank:
    """Explicit node splitter: rank r takes positions r, r + world, ... of the
    shard stream (wds.split_by_node would read RANK from the environment)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        return islice(src, self.rank, None, self.world_size)


class WorkerShuffle:
    """Sample shuffle buffer seeded per (seed, epoch, rank, worker).

    wds.shuffle with one fixed seed would give every worker the same
    permutation pattern; the worker id is only known inside the worker.
    """

    def __init__(self, bufsize: int, seed: int, epoch: int, rank: int):
        self.bufsize, self.seed, self.epoch, self.rank = bufsize, seed, epoch, rank

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        seed = derive_seed("samples", self.seed, self.epoch, self.rank, worker)
        return wds.shuffle(self.bufsize, initial=min(self.bufsize, 100), seed=seed)(src)


def worker_context() -> multiprocessing.context.BaseContext:
    """Where loader workers come from: a forkserver, never a fork of the trainer.

    A forked worker shares the trainer's heap copy-on-write, so while it lives
    every heap page the trainer writes (activations, gradients: GBs, reused
    each step) is copied first: +4-5 s on the first training step of every
    epoch for DenseNet121 at batch 32 on 2 CPU cores (650k minor faults), and
    fork after CUDA initialisation is unsafe anyway. A forkserver started once
    per process, with this module preloaded, forks workers from a small process.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def train_worker_count(summary: ShardSummary, num_workers: int, world_size: int) -> int:
    """Workers beyond the shards a rank reads would only re-read the same
    shards in another order, so cap them at ceil(shards / world)."""
    shards = len(summary.split("train").shards)
    return max(0, min(num_workers, math.ceil(shards / world_size)))


def steps_per_epoch(train_count: int, batch_size: int, world_size: int, max_steps: int | None) -> int:
    steps = math.ceil(train_count / (batch_size * world_size))
    return min(steps, max_steps) if max_steps is not None else steps


def train_batches(
    summary: ShardSummary,
    *,
    batch_size: int,
    steps: int,
    num_workers: int,
    shuffle_buffer: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> Iterator[dict[str, Any]]:
    """Exactly `steps` full batches for one epoch of one rank.

    The stream is endless (shards cycle), so every rank gets the same number
    of batches whatever the shard count -- the WebDataset docs' recipe
    (resampled shards + a fixed epoch length) for DDP, without which ranks
    run out at different steps and the last all-reduce hangs. The order
    depends only on (seed, epoch, rank, worker count).
    """
    workers = train_worker_count(summary, num_workers, world_size)
    dataset = wds.DataPipeline(
        ShardCycle(summary.shard_paths("train"), seed, epoch),
        SplitByRank(rank, world_size),
        wds.split_by_worker,
        VerifiedTarSamples(summary),
        WorkerShuffle(shuffle_buffer, seed, epoch, rank),
        wds.map(functools.partial(decode_sample, size=summary.image_size)),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    )
    loader = DataLoader(
        dataset,
        batch_size=None,  # batched inside the workers: moving single samples between processes is slow
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        multiprocessing_context=worker_context() if workers else None,
        # Workers draw their base seed from this generator, not from the global
        # torch RNG, so creating a loader does not shift the model's RNG stream.
        generator=torch.Generator().manual_seed(derive_seed("loader", seed, epoch, rank)),
    )
    return islice(loader, steps)


def eval_batches(summary: ShardSummary, split: str, batch_size: int, num_workers: int) -> Iterator[dict[str, Any]]:
    """Every sample of `split` exactly once, in a fixed order.

    Yields {"image": uint8 (B, 1, H, W), "label": int64 (B,), "key": [str],
    "meta": [dict]}. Workers are capped at the shard count (WebDataset splits
    by shard, and a worker without a shard is an error there); with several
    workers the DataLoader interleaves their batches round-robin, which is
    deterministic. Raises CxrError when the count differs from the summary.
    """
    info = summary.split(split)
    urls = summary.shard_paths(split)
    if not urls:
        raise CxrError(f"{summary.location}: split {split!r} has no shards")
    workers = max(0, min(num_workers, len(urls)))
    dataset = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        VerifiedTarSamples(summary),
        wds.map(functools.partial(decode_sample, size=summary.image_size)),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                        multiprocessing_context=worker_context() if workers else None)
    seen = 0
    for batch in loader:
        seen += len(batch["key"])
        yield batch
    if seen != info.count:
        raise CxrError(f"{summary.location}: read {seen} {split} samples, the summary says {info.count}")
