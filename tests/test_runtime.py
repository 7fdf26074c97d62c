import socket
import types

import pytest
import torch
import torch.distributed as dist

from pipeline.errors import CxrError
import train.runtime as runtime
from train.runtime import pick_device, start_runtime, stop_runtime, tune_glibc_malloc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_plain_launch_is_not_distributed(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    rt = start_runtime(use_cuda=False)
    assert not rt.distributed and rt.world_size == 1 and not dist.is_initialized()


def test_torchrun_with_one_process_runs_the_ddp_path(monkeypatch):
    # What `torchrun --nproc_per_node 1` sets: the process group and DDP wrapper must be used,
    # so a one-GPU torchrun exercises the same code as a multi-GPU job.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    rt = start_runtime(use_cuda=False)
    try:
        assert rt.distributed and rt.world_size == 1
        assert dist.is_initialized() and dist.get_backend() == "gloo"
    finally:
        stop_runtime(rt)
    assert not dist.is_initialized()


def test_auto_is_cuda_exactly_when_present():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")


def test_missing_cuda_or_a_bad_name_is_an_error_not_a_cpu_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CxrError, match="CUDA is not available"):
        pick_device("cuda:1")
    with pytest.raises(CxrError, match="invalid device 'gpu0'"):
        pick_device("gpu0")


class _FakeMallopt:
    """Records mallopt calls; refuses mmap thresholds above `mmap_cap` like older glibc."""

    def __init__(self, mmap_cap: int):
        self.calls: list[tuple[int, int]] = []
        self.mmap_cap = mmap_cap

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 0 if param == runtime.M_MMAP_THRESHOLD and value > self.mmap_cap else 1


def _fake_glibc(monkeypatch, mmap_cap: int) -> _FakeMallopt:
    mallopt = _FakeMallopt(mmap_cap)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: types.SimpleNamespace(mallopt=mallopt))
    return mallopt


def test_malloc_tuning_raises_both_thresholds(monkeypatch):
    libc = _fake_glibc(monkeypatch, mmap_cap=1 << 40)
    note = tune_glibc_malloc()
    assert libc.calls == [(-1, 1 << 30), (-3, 1 << 30)]
    assert "M_MMAP_THRESHOLD=1024 MiB" in note


def test_malloc_tuning_falls_back_to_the_largest_threshold_glibc_accepts(monkeypatch):
    libc = _fake_glibc(monkeypatch, mmap_cap=32 << 20)
    note = tune_glibc_malloc()
    assert libc.calls == [(-1, 1 << 30), (-3, 1 << 30), (-3, 32 << 20)]
    assert "M_MMAP_THRESHOLD=32 MiB" in note


@pytest.mark.parametrize(
    ("preload", "libc_name", "reason"),
    [("/usr/lib/libtcmalloc_minimal.so.4", "glibc", "tcmalloc"), ("", "musl", "not glibc")],
)
def test_malloc_tuning_is_skipped_off_glibc_or_under_another_allocator(monkeypatch, preload, libc_name, reason):
    libc = _fake_glibc(monkeypatch, mmap_cap=1 << 40)
    monkeypatch.setenv("LD_PRELOAD", preload)
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: (libc_name, ""))
    note = tune_glibc_malloc()
    assert libc.calls == [] and "skipped" in note and reason in note


def test_cpu_start_up_tunes_malloc(monkeypatch, caplog):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    libc = _fake_glibc(monkeypatch, mmap_cap=1 << 40)
    with caplog.at_level("INFO", logger="train.runtime"):
        start_runtime(use_cuda=False)
    assert (-3, 1 << 30) in libc.calls
    assert "M_MMAP_THRESHOLD=1024 MiB" in caplog.text
