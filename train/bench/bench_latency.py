"""`cxr bench-latency`: batch-1 CPU latency of each network at each thread count, eager and ONNX
Runtime, against the fp32 floor (FLOPs / peak) measured in the same run (train/evaluation/latency.py
does the timing; this sweeps networks, thread counts and rounds)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from pipeline.errors import CxrError
from pipeline.names import MODEL_NAMES
from pipeline.params import LatencyParams
from train.evaluation.latency import measure_latency
from train.models import build_model
from train.timing import allocator_name, cpu_model_name


def batch1_benchmark(
    archs: tuple[str, ...], threads: tuple[int, ...], input_size: int, params: LatencyParams, rounds: int = 1
) -> dict[str, Any]:
    """Batch-1 latency of randomly initialised networks (weights do not change the cost) at each
    thread count, eager and ONNX Runtime, each against the fp32 floor measured in the same run.

    With `rounds` > 1 the whole sweep repeats and each network keeps its fastest time per path
    and its highest peak probe (so the floor is never flattering): on a shared host the second
    core's speed drifts within minutes, and single sweeps' 2-thread timings moved by 20-40%
    between runs, so the best of interleaved rounds is the steadier figure.
    """
    unknown = [a for a in archs if a not in MODEL_NAMES]
    if unknown or not archs or not threads or min(threads) < 1 or rounds < 1:
        raise CxrError(
            f"bench-latency: --arch from {', '.join(MODEL_NAMES)}, --threads >= 1, --rounds >= 1; "
            f"got {archs}, {threads}, {rounds}"
        )
    # batch 1 for both timings: the batch-throughput figure is the latency stage's, not this benchmark's
    single = dataclasses.replace(params, batch=1)
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for _ in range(rounds):
        for count in threads:
            for arch in archs:
                torch.manual_seed(0)
                report = measure_latency(build_model(arch), input_size, dataclasses.replace(single, threads=count))
                seen = best.setdefault((arch, count), {"gflops": report["gflops"], "peak": 0.0, "share": 1.0, "ms": {}})
                seen["peak"] = max(seen["peak"], report["peak_gflops_fp32"])
                seen["share"] = min(seen["share"], report["cpu_share_min"])
                for name, path in report["cpu_paths"].items():
                    if path.get("correct"):  # only a path that computes eager's answer may be fastest
                        seen["ms"][name] = min(seen["ms"].get(name, float("inf")), path["ms_per_image"])
    rows = []
    for (arch, count), seen in best.items():
        floor_ms = seen["gflops"] / seen["peak"] * 1e3
        fastest = min(seen["ms"], key=seen["ms"].get)
        rows.append({
            "model": arch, "threads": count, "peak_gflops_fp32": seen["peak"], "cpu_share_min": seen["share"],
            **{f"{name}_ms": ms for name, ms in seen["ms"].items()},
            "floor_ms": floor_ms, "fastest": fastest, "fastest_ratio_to_floor": seen["ms"][fastest] / floor_ms,
        })  # fmt: skip
    return {"cpu": cpu_model_name(), "allocator": allocator_name(), "torch": torch.__version__,
            "warmup": params.warmup, "runs": params.runs, "rounds": rounds, "rows": rows}  # fmt: skip
