"""Benchmark: the streaming trainer vs a naive ImageFolder trainer, same model, same CPU, one run.

Streaming path (what `cxr train` runs): WebDataset shards decoded to uint8 in
workers, one batched affine warp on the device, bf16 autocast +
channels_last where the CPU has native bf16. Naive baseline: torchvision
ImageFolder of the very same PNG bytes, per-image CPU RandomAffine in the
workers, fp32 NCHW, torch's default (foreach) Adam. Both use the weighted
BCE. Each is warmed up before timing; the loader-only rates and the fraction
of step time spent waiting for data show whether the data path could ever be
the bottleneck. The streaming path runs twice, eager and with the model under
torch.compile (as `train.compile: true` trains); the compiled path's first
step, which compiles the forward and backward graphs, is timed on its own.
Achieved GFLOP/s are rated against a convolution peak measured in the same
run, in the precision the trainer trains in (`peak_share`).
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from pipeline.errors import CxrError
from pipeline.params import AugmentParams, TrainParams
from pipeline.shard_format import CLASS_NAMES, ShardSummary, read_summary
from train.data import train_batches
from train.timing import allocator_name, conv_peak_gflops, cpu_model_name, train_flops_per_image
from train.fit.epoch import make_optimizer, train_one_epoch, weighted_bce
from train.models import build_model, model_spec
from train.runtime import Runtime, start_runtime

SAFE_KEY = re.compile(r"[A-Za-z0-9_]{1,64}")  # the shard stage writes keys like "train_000123"


def export_image_folder(summary: ShardSummary, split: str, root: Path) -> int:
    """Write the split's PNG bytes, unchanged, as root/<class>/<key>.png (ImageFolder layout)."""
    for name in CLASS_NAMES:
        (root / name).mkdir(parents=True, exist_ok=True)
    count = 0
    for sample in wds.DataPipeline(wds.SimpleShardList(summary.shard_paths(split)), wds.tarfile_to_samples()):
        # Tar member names come from a file that may have been crafted: validated before use as a path.
        key, cls = sample.get("__key__"), sample.get("cls")
        if not isinstance(key, str) or not SAFE_KEY.fullmatch(key) or cls not in (b"0", b"1"):
            raise CxrError(f"{sample.get('__url__', 'a shard')}: sample {key!r} has an invalid key or class; "
                           "not a shard written by `cxr shard`")  # fmt: skip
        (root / CLASS_NAMES[int(cls)] / f"{key}.png").write_bytes(sample["png"])
        count += 1
    return count


def _naive_loader(root: Path, aug: AugmentParams, seed: int, batch_size: int, workers: int,
                  augment: bool) -> DataLoader:  # fmt: skip
    from torchvision import datasets, transforms

    steps = [transforms.Grayscale(num_output_channels=1)]  # ImageFolder's loader makes RGB
    if augment:
        steps.append(transforms.RandomAffine(degrees=aug.rotate, translate=(aug.translate, aug.translate),
                                             scale=aug.scale))
    steps.append(transforms.ToTensor())
    dataset = datasets.ImageFolder(str(root), transform=transforms.Compose(steps))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                      generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0)


def _endless(loader: DataLoader):
    # Never empty: run_train_benchmark refuses a split smaller than one batch.
    while True:
        yield from loader


def _naive_train(model, optimizer, batches, class_weights, steps: int, device: torch.device) -> dict[str, float]:
    """fp32 NCHW training steps over already-augmented float batches."""
    model.train()
    wait = 0.0
    start = fetch = time.perf_counter()
    for x, y in islice(batches, steps):
        wait += time.perf_counter() - fetch
        x, y = x.to(device), y.to(device)
        loss = weighted_bce(model(x), y.float(), class_weights[y])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        fetch = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()  # kernels are asynchronous: time their completion
    seconds = time.perf_counter() - start
    return {"images_per_s": steps * x.shape[0] / seconds, "data_wait_fraction": wait / seconds}


def _loader_rate(batches, images: int) -> float:
    it = iter(batches)
    next(it)  # worker start-up is not throughput
    seen, start = 0, time.perf_counter()
    for batch in it:
        seen += len(batch["key"]) if isinstance(batch, dict) else batch[0].shape[0]
        if seen >= images:
            break
    return seen / (time.perf_counter() - start)


def _against_peak(result: dict[str, Any], model_name: str, size: int, rt: Runtime, compiled: bool) -> dict[str, Any]:
    """Achieved GFLOP/s of each timed path and its share of this CPU's measured convolution peak.

    `peak_share`: the path `cxr train` runs (compiled when train.compile is true)
    against the peak of the precision it trains in, measured in this run.
    """
    flops = train_flops_per_image(build_model(model_name), size)
    paths = [k for k in ("streaming", "streaming_compiled", "naive_fp32", "streaming_fp32") if k in result]
    achieved = {k: result[k]["images_per_s"] * flops / 1e9 for k in paths}
    out: dict[str, Any] = {"train_gflop_per_image": flops / 1e9, "achieved_gflops": achieved}
    if rt.device.type != "cpu":
        out["peak_note"] = "convolution peak probes are CPU-only"
        return out
    peaks = {"fp32": conv_peak_gflops(torch.float32, runs=3), "bf16": conv_peak_gflops(torch.bfloat16, runs=3)}
    best = max(peaks, key=peaks.get)
    trained = "fp32" if rt.autocast_dtype is None else "bf16"
    out["conv_peak_gflops"] = peaks
    out["share_of_peak"] = {k: v / peaks[best] for k, v in achieved.items()}
    out["peak_precision"] = best  # the faster precision on this CPU: the one a trainer should use
    out["share_of_bf16_peak"] = achieved["streaming"] / peaks["bf16"]
    out["trained_precision"] = trained
    path = "streaming_compiled" if compiled else "streaming"
    out["peak_share_path"] = path
    out["peak_share"] = achieved[path] / peaks[trained]
    return out


def run_train_benchmark(
    shard_dir: Path,
    model_name: str,
    train: TrainParams,
    seed: int,
    steps: int,
    warmup: int,
    loader_images: int,
    fp32_streaming: bool = False,
    threads: int = 0,
    device: str = "cpu",
    compiled: bool = True,
) -> dict[str, Any]:
    """`threads` 0 = all cores (what the trainer uses). On a machine shared with
    other jobs, 1 thread gives steadier numbers: OpenMP's per-op barriers stall
    whenever another process holds one of the cores. `compiled` False skips the
    compiled path (its compilation takes minutes for the larger networks on a CPU)."""
    summary = read_summary(shard_dir)
    tp = train
    if summary.split("train").count < tp.batch_size:
        raise CxrError(
            f"{shard_dir} has {summary.split('train').count} training images, fewer than one batch of "
            f"{tp.batch_size}: benchmark on a larger variant or lower train.batch_size"
        )
    if device not in ("cpu", "cuda"):
        raise CxrError(f"--device must be cpu or cuda, not {device!r}")
    rt = start_runtime(use_cuda=device == "cuda")
    if threads > 0:
        torch.set_num_threads(threads)
    naive_rt = replace(rt, autocast_dtype=None, channels_last=False)
    folder_loader = partial(_naive_loader, aug=tp.augment, seed=seed, batch_size=tp.batch_size, workers=tp.num_workers)
    class_weights = torch.tensor(summary.class_weights("train"), dtype=torch.float32, device=rt.device)
    lr = tp.lr if tp.lr is not None else model_spec(model_name).default_lr
    stream_kw = dict(batch_size=tp.batch_size, num_workers=tp.num_workers, shuffle_buffer=tp.shuffle_buffer,
                     seed=seed, epoch=0, pin_memory=rt.device.type == "cuda")

    def streaming(run_rt: Runtime, compile_model: bool = False) -> dict[str, float]:
        torch.manual_seed(seed)
        net = build_model(model_name).to(run_rt.device, memory_format=torch.channels_last if run_rt.channels_last
                                          else torch.contiguous_format)
        opt = make_optimizer(net, lr)
        model = torch.compile(net) if compile_model else net  # as the trainer does under train.compile
        gen = torch.Generator().manual_seed(seed)
        kw = dict(rt=run_rt, class_weights=class_weights, augment=tp.augment, generator=gen,
                  aux_weight=tp.aux_weight, desc="bench", show_progress=False)
        # One loader for the first step, warm-up and timed steps, as within a training epoch: a
        # second loader would time its workers' start-up and prefetch burst too.
        batches = iter(train_batches(summary, steps=1 + warmup + steps, **stream_kw))
        first = train_one_epoch(model, opt, islice(batches, 1), steps=1, **kw)  # compiles, when compiled
        if warmup:
            train_one_epoch(model, opt, islice(batches, warmup), steps=warmup, **kw)
        stats = train_one_epoch(model, opt, islice(batches, steps), steps=steps, **kw)
        if run_rt.device.type == "cuda":
            torch.cuda.synchronize()
        return {"images_per_s": stats.images_per_s, "data_wait_fraction": stats.data_wait_fraction,
                # the first step's compute: the loader workers' start-up is not compilation
                "first_step_s": first.seconds - first.data_wait_s, "step_s": stats.seconds / stats.steps}

    result: dict[str, Any] = {
        "model": model_name, "batch_size": tp.batch_size, "num_workers": tp.num_workers, "steps": steps,
        "warmup": warmup, "threads": torch.get_num_threads(), "cpu": cpu_model_name(),
        "streaming_precision": rt.describe(), "allocator": allocator_name(),
        "shards": str(shard_dir), "train_samples": summary.split("train").count,
    }
    result["streaming"] = streaming(rt)
    if compiled:
        result["streaming_compiled"] = streaming(rt, compile_model=True)
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        root = Path(tmp)
        export_image_folder(summary, "train", root)
        torch.manual_seed(seed)
        net = build_model(model_name).to(rt.device)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        naive = _endless(folder_loader(root, augment=True))
        if warmup:
            _naive_train(net, opt, naive, class_weights, warmup, rt.device)
        result["naive_fp32"] = _naive_train(net, opt, naive, class_weights, steps, rt.device)
        del naive
        if fp32_streaming:  # the streaming path in fp32 NCHW: separates precision/layout from the data path
            result["streaming_fp32"] = streaming(naive_rt)
        result["loader_only_images_per_s"] = {
            "shards": _loader_rate(train_batches(summary, steps=10**9, **stream_kw), loader_images),
            "folder_decode": _loader_rate(
                _endless(folder_loader(root, augment=False)), loader_images),
            "folder_decode_affine": _loader_rate(
                _endless(folder_loader(root, augment=True)), loader_images),
        }
    stream, base = result["streaming"]["images_per_s"], result["naive_fp32"]["images_per_s"]
    result["speedup_vs_naive"] = stream / base
    result["eager_images_per_s"] = stream
    if compiled:
        fast = result["streaming_compiled"]
        result["compiled_images_per_s"] = fast["images_per_s"]
        result["compiled_vs_eager"] = fast["images_per_s"] / stream
        # the first compiled step less what a compiled step takes once compiled: the compilation alone
        result["compile_s"] = max(fast["first_step_s"] - fast["step_s"], 0.0)
    result.update(_against_peak(result, model_name, int(summary.preprocess["size"]), rt, compiled and tp.compile))
    result["loader_headroom"] = result["loader_only_images_per_s"]["shards"] / stream
    return result
