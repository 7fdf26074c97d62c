"""Where and how a training process runs: device, precision, DDP rank.

The same code serves `cxr train` on one CPU or GPU and
`torchrun --nproc_per_node N -m pipeline.cli train` (PyTorch DDP: NCCL on
GPUs, gloo on CPU). torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK) is
the interface here, as in every torchrun program.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import platform
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import CxrError

log = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Batch-32 activations reach ~50 MiB (ResNet50's first block in bf16), so 1 GiB when glibc takes
# it; some glibc versions refuse anything above HEAP_MAX_SIZE/2 = 32 MiB on 64-bit.
MMAP_THRESHOLDS = (1 << 30, 32 << 20)
TRIM_THRESHOLD = 1 << 30


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    autocast_dtype: torch.dtype | None  # None = fp32
    channels_last: bool
    # Launched by torchrun: DDP even with one process, so `torchrun --nproc_per_node 1` runs the
    # same code path (process group, DDP wrapper, all-reduces) as a multi-GPU job.
    launched_by_torchrun: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.launched_by_torchrun

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        precision = "fp32" if self.autocast_dtype is None else f"{self.autocast_dtype} autocast"
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{self.device} x{self.world_size}, {precision}, {layout}, {torch.get_num_threads()} threads"


def cpu_has_fast_bf16() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 (AVX-512 BF16 or AMX);
    elsewhere oneDNN emulates it and fp32 is faster (measured here: bf16 +
    channels_last trains ResNet50 ~2.5x faster than fp32 on an AVX-512 BF16 CPU)."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pick_device(requested: str = "auto") -> torch.device:
    """The one device rule: "auto" is CUDA when present, else CPU; "cpu", "cuda", "cuda:N" as asked.

    Asking for CUDA where there is none is an error, never a silent CPU run.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise CxrError(f"invalid device {requested!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CxrError(f"device {requested} asked for, but CUDA is not available here")
    return device


def tune_glibc_malloc() -> str:
    """Keep large freed buffers in glibc's heap instead of returning them to the kernel.

    With glibc's defaults every activation/gradient buffer over the (dynamic) mmap threshold is
    mmap'd and munmap'd each step, or trimmed from the heap top, and then page-faulted back in:
    a profile of ResNet50 CPU training counted ~52,000 minor faults per step, ~2,800 with these
    thresholds raised. Returns what was done, for one log line.
    """
    preloaded = os.environ.get("LD_PRELOAD", "")
    for name in ("tcmalloc", "jemalloc"):
        if name in preloaded:
            return f"malloc tuning skipped: {name} is preloaded"
    if platform.libc_ver()[0] != "glibc":
        return "malloc tuning skipped: the C library is not glibc"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as exc:
        return f"malloc tuning skipped: no mallopt ({exc})"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Trim first: setting either threshold also turns off glibc's dynamic mmap threshold.
    trim_ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    mmap = next((v for v in MMAP_THRESHOLDS if mallopt(M_MMAP_THRESHOLD, v) == 1), None)
    if not trim_ok or mmap is None:
        return f"malloc tuning: glibc mallopt refused (trim threshold set: {trim_ok}, mmap threshold: {mmap})"
    return f"malloc tuning: glibc M_MMAP_THRESHOLD={mmap >> 20} MiB, M_TRIM_THRESHOLD={TRIM_THRESHOLD >> 20} MiB"


def start_runtime(use_cuda: bool | None = None) -> Runtime:
    """Join the process group when launched by torchrun, pick the device and precision.

    `use_cuda=None` means: CUDA when present.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = pick_device("auto" if use_cuda is None else "cuda" if use_cuda else "cpu").type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # fp16 would need a GradScaler; GPUs without bf16 train in fp32 (TF32 where available).
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    else:
        device = torch.device("cpu")
        log.info("%s", tune_glibc_malloc())
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        # All cores, shared fairly by the processes on this machine.
        torch.set_num_threads(max(1, cpu_count() // local_world))
        dtype = torch.bfloat16 if cpu_has_fast_bf16() else None
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if (world_size > 1 or torchrun) and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Runtime(device, rank, world_size, local_rank, dtype, channels_last=True, launched_by_torchrun=torchrun)


def stop_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_floats(rt: Runtime, values: list[float]) -> list[float]:
    """Rank 0's values on every rank, so early-stopping decisions agree."""
    if not rt.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.broadcast(t, src=0)
    return t.tolist()


def mean_across_ranks(rt: Runtime, value: torch.Tensor) -> torch.Tensor:
    if not rt.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / rt.world_size


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()
