import socket

import pytest
import torch
import torch.distributed as dist

from pipeline.errors import CxrError
from train.runtime import pick_device, start_runtime, stop_runtime


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
