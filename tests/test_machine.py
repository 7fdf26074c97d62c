"""train/machine.py: timed runs, FLOPs and the measured peak."""

import torch
from torch import nn

from train import machine


def test_count_flops_hand_checked():
    # Linear 10 -> 5: 50 multiply-adds = 100 FLOPs; conv 1 -> 2 channels, 3x3, on 4x4 (no pad): 2*9*4 MACs.
    assert machine.count_flops(nn.Linear(10, 5), torch.zeros(1, 10)) == 100
    assert machine.count_flops(nn.Conv2d(1, 2, 3, bias=False), torch.zeros(1, 1, 4, 4)) == 2 * (2 * 9 * 4)


def test_time_runs_warms_up_then_times_each_run():
    calls = []
    timing = machine.time_runs(lambda: calls.append(1), warmup=3, runs=5, threads=1)
    assert len(calls) == 8 and timing.median_s >= 0 and timing.cpu_share >= 0


def test_peak_is_the_best_rate_any_probe_reached():
    probes = machine.peak_gflops(runs=1, threads=1)
    rates = [v for name, rec in probes.items() if name != "peak" for k, v in rec.items() if k.startswith("gflops")]
    assert len(probes) == 3 and probes["peak"] == max(rates) > 0


def test_machine_description_is_never_empty():
    assert machine.cpu_model_name() and machine.available_cores() >= 1
    assert machine.allocator_name() in ("tcmalloc", "jemalloc", "system", "unknown")
