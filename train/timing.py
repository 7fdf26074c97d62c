"""What this machine can do, measured: CPU name, allocator, cores, timed runs,
a model's FLOPs and the attainable fp32 peak.

Shared by the latency stage (which turns FLOPs / peak into a floor) and the
training benchmark (which records the machine it ran on).
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

PROBE_SIZE = 2048  # fp32 matmul probe: 17 GFLOP, large enough to reach the BLAS peak
PROBE_CONV = (256, 56)  # 3x3 conv probe, channels and side: a ResNet stage-2 layer, 3.7 GFLOP


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def allocator_name() -> str:
    """tcmalloc/jemalloc when preloaded, else "system" (glibc, tuned by train.runtime on CPU)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc"):
        if name in maps:
            return name
    return "system"


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Timing:
    median_s: float  # wall clock: what a user waits
    # CPU time per run / threads: ~median_s on an idle machine and a better
    # estimate of it on a busy one (with one thread; with more, spinning counts).
    on_cpu_s: float
    # on_cpu_s x runs / wall time: ~1 idle; well below 1 means other processes
    # took the cores and the wall-clock median is inflated (multi-threaded eager
    # PyTorch most: each op waits at a barrier for a descheduled thread).
    cpu_share: float


def time_runs(fn: Callable[[], Any], warmup: int, runs: int, threads: int) -> Timing:
    for _ in range(warmup):
        fn()
    times = []
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed run would be charged to the model
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    try:
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    cpu = (time.process_time() - cpu_start) / threads
    wall = max(time.perf_counter() - wall_start, 1e-9)
    return Timing(statistics.median(times), cpu / runs, cpu / wall)


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward (2 per multiply-add; convolutions and matmuls only)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def _probes() -> dict[str, tuple[Callable[[], Any], int]]:
    """fp32 kernels near the hardware's limit: a BLAS matmul and a oneDNN 3x3
    convolution (on AVX-512 CPUs the convolution runs ~15% faster than the
    matmul, so a matmul-only peak would put the floor too high)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(PROBE_SIZE, PROBE_SIZE, generator=gen)
    b = torch.randn(PROBE_SIZE, PROBE_SIZE, generator=gen)
    out = torch.empty(PROBE_SIZE, PROBE_SIZE)
    c, hw = PROBE_CONV
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).eval()
    x = torch.randn(1, c, hw, hw, generator=gen)

    def run_conv():
        with torch.inference_mode():
            conv(x)

    return {
        f"matmul_{PROBE_SIZE}": (lambda: torch.mm(a, b, out=out), 2 * PROBE_SIZE**3),
        f"conv3x3_{c}x{hw}x{hw}": (run_conv, 2 * c * c * 9 * hw * hw),
    }


def peak_gflops(runs: int, threads: int) -> dict[str, Any]:
    """This machine's attainable fp32 rate with `threads` threads: the best probe.

    Each probe is rated by the clock (best of `runs`), by the CPU time the
    process actually got, and, run on ONE thread, by that CPU-time rate times
    `threads`. Other load on a shared machine lowers the first two (a thread
    descheduled mid-matmul stalls its partner at the barrier) but hardly the
    third; on an idle machine all three agree within turbo-clock effects. The
    floor uses the highest rate seen, so it is never flattering.
    """
    out: dict[str, Any] = {}
    for name, (fn, flops) in _probes().items():
        timings = [time_runs(fn, warmup=1, runs=1, threads=threads) for _ in range(runs)]
        torch.set_num_threads(1)
        try:
            single = [time_runs(fn, warmup=1, runs=1, threads=1) for _ in range(runs)]
        finally:
            torch.set_num_threads(threads)
        out[name] = {
            "gflops_wall": flops / min(t.median_s for t in timings) / 1e9,
            "gflops_on_cpu": flops / min(t.on_cpu_s for t in timings) / 1e9,
            "gflops_one_thread_x_threads": threads * flops / min(t.on_cpu_s for t in single) / 1e9,
            "cpu_share": min(t.cpu_share for t in timings),
        }
    out["peak"] = max(max(v[k] for k in v if k.startswith("gflops")) for v in out.values())
    return out


def train_flops_per_image(model: torch.nn.Module, size: int) -> int:
    """FLOPs of one training step per image: forward, backward of the summed outputs (aux head included).

    Counted on a batch of 2 in train mode (BatchNorm as in training); the optimizer's
    elementwise update is not counted, like every published training-FLOP figure.
    """
    x = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    model.train()
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops()) // 2


def conv_peak_gflops(dtype: torch.dtype, runs: int, min_seconds: float = 0.2) -> float:
    """Best rate of a 3x3 convolution (the probe above) in `dtype`, channels_last, with the current threads.

    bf16 runs through autocast as training does; on CPUs without native bf16
    oneDNN emulates it and this comes out below fp32, which is the honest
    answer: the training benchmark reports its share of the faster of the two.

    Each timed run repeats the convolution for at least `min_seconds`: on an AMX
    CPU one bf16 call takes about 2 ms, and best-of-3 single calls gave 554 and
    1,814 GFLOP/s in two runs of the same benchmark on the same machine.
    """
    c, hw = PROBE_CONV
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(memory_format=torch.channels_last).eval()
    x = torch.randn(1, c, hw, hw, generator=gen).contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            conv(x)

    threads = torch.get_num_threads()
    # warm-up: oneDNN builds its kernel on the first call (and an AMX CPU grants the tile registers)
    once = time_runs(run, warmup=2, runs=3, threads=threads).median_s
    repeats = max(1, math.ceil(min_seconds / once))

    def block():
        for _ in range(repeats):
            run()

    best = min(time_runs(block, warmup=0, runs=1, threads=threads).median_s for _ in range(runs))
    return repeats * 2 * c * c * 9 * hw * hw / best / 1e9

