"""train/timing.py: timed runs, FLOPs and the measured peak."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import REPO
from train import timing as machine
from train.timing import conv_peak_gflops, train_flops_per_image


def test_count_flops_hand_checked():
    # Linear 10 -> 5: 50 multiply-adds = 100 FLOPs; conv 1 -> 2 channels, 3x3, on 4x4 (no pad): 2*9*4 MACs.
    assert machine.count_flops(nn.Linear(10, 5), torch.zeros(1, 10)) == 100
    assert machine.count_flops(nn.Conv2d(1, 2, 3, bias=False), torch.zeros(1, 1, 4, 4)) == 2 * (2 * 9 * 4)


def test_time_runs_takes_the_median_of_the_timed_runs_only():
    durations = iter([0.3, 0.3, 0.005, 0.4, 0.005])  # two warm-ups, then three timed runs; a sixth call raises
    timing = machine.time_runs(lambda: time.sleep(next(durations)), warmup=2, runs=3, threads=1)
    assert 0.005 <= timing.median_s < 0.1  # the median of (0.005, 0.4, 0.005); their mean would be 0.137
    assert timing.on_cpu_s < 0.05 and timing.cpu_share < 0.5  # sleeping uses no CPU time


def test_peak_is_the_best_rate_any_probe_reached():
    probes = machine.peak_gflops(runs=1, threads=1)
    rates = [v for name, rec in probes.items() if name != "peak" for k, v in rec.items() if k.startswith("gflops")]
    assert len(probes) == 3 and probes["peak"] == max(rates) > 0


def test_machine_description_names_this_machine():
    assert machine.cpu_model_name() and machine.available_cores() == len(os.sched_getaffinity(0))


TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


@pytest.mark.parametrize("preload", [None, TCMALLOC], ids=["glibc", "tcmalloc"])
def test_allocator_name_sees_what_the_process_really_runs_on(preload):
    """A child process with and without the preload: the name follows what the loader mapped."""
    if preload is not None and not preload.is_file():
        pytest.skip(f"{preload} is absent (Debian libtcmalloc-minimal4; .ci/run installs it)")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | ({"LD_PRELOAD": str(preload)} if preload else {})
    out = subprocess.run([sys.executable, "-c", "from train.timing import allocator_name; print(allocator_name())"],
                         env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert out == ("tcmalloc" if preload else "system")


def test_training_flops_count_forward_and_the_weight_gradient():
    """Hand-checked: a 1->4 channel 3x3 conv on 8x8 is 2*4*9*64 = 4608 FLOPs forward; backward
    adds the weight gradient (4608 again) and no input gradient (the images need none)."""
    conv = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)
    assert train_flops_per_image(conv, 8) == 2 * 4608
    assert conv.weight.grad is None  # the count leaves no gradients behind


def test_conv_peak_is_a_positive_rate_in_both_precisions():
    torch.set_num_threads(1)
    assert conv_peak_gflops(torch.float32, runs=1) > 0.5
    assert conv_peak_gflops(torch.bfloat16, runs=1) > 0.05



def test_conv_peak_times_runs_long_enough_to_measure(monkeypatch):
    """One convolution lasts ~2 ms on an AMX CPU: each timed run repeats it for min_seconds."""
    torch.set_num_threads(1)
    calls = []
    forward = torch.nn.Conv2d.forward
    monkeypatch.setattr(torch.nn.Conv2d, "forward", lambda self, x: calls.append(1) or forward(self, x))
    rate = conv_peak_gflops(torch.float32, runs=2, min_seconds=0.6)
    warmup_and_calibration = 5
    assert rate > 0.5
    assert len(calls) - warmup_and_calibration >= 2 * 2  # 2 runs of at least 2 convolutions each
