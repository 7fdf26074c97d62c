"""Inference cost of a checkpoint's network: Table V, made meaningful on any machine.

Besides milliseconds per image, the report carries the model's FLOPs, this
machine's measured fp32 peak (matmul and convolution probes in the same run)
and so the floor `flops / peak`: `ratio_to_floor` says how close a path comes to what the
hardware allows, which a bare millisecond figure from another machine cannot.

Timing hygiene (as timm's benchmark does): warm-up runs first, then the median
of timed runs, each run synchronised, the garbage collector paused, nothing
printed inside a timed region, every path timed alone one after the other.
A shared machine still perturbs wall-clock time, so each timing also records
the CPU time the process got (`on_cpu_ms_per_image`, `cpu_share`): a share
well below 1 says the milliseconds are inflated by other load, not the model.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.errors import CxrError
from pipeline.params import LatencyParams
from train.checkpoint import load_checkpoint
from train.export import INPUT_NAME, OUTPUT_NAME, export_graph, logit_agreement, onnx_session
from train.timing import allocator_name, available_cores, count_flops, cpu_model_name, peak_gflops, time_runs
from train.inference import cached_onnx, default_cache_dir
from train.models import ScreeningNet, inference_param_count
from train.runtime import pick_device

CPU_PATHS = ("eager", "onnxruntime", "compile")
# What `cxr latency` prints; the full report is in its OUT.
HEADLINE = ("model", "params_m", "cpu_ms_per_image", "cpu_fastest_path", "cpu_fastest_ms_per_image", "floor_ms",
            "cpu_fastest_ratio_to_floor", "gpu_ms_per_image")  # fmt: skip


def _path_result(
    fn: Callable[[torch.Tensor], np.ndarray], x1: torch.Tensor, xb: torch.Tensor, reference: np.ndarray,
    params: LatencyParams, is_reference: bool = False,
) -> dict[str, Any]:  # fmt: skip
    # A faster path only counts if it computes the same thing, within export's TOLERANCE of eager.
    # Eager is the reference itself: running it again to compare with itself cost a batch's time (2.7 s
    # for DenseNet121 at batch 32 on 2 cores) and could only agree.
    check = logit_agreement(reference, reference if is_reference else np.concatenate([fn(x1), fn(xb)]))
    threads = torch.get_num_threads()
    single = time_runs(lambda: fn(x1), params.warmup, params.runs, threads)
    if xb.shape[0] == 1:  # bench-latency: the batch timing would repeat the single one
        batch = single
    else:
        batch = time_runs(lambda: fn(xb), max(1, params.warmup // 2), max(3, params.runs // 4), threads)
    return {
        "ms_per_image": single.median_s * 1e3,
        "on_cpu_ms_per_image": single.on_cpu_s * 1e3,
        "images_per_s_batch": params.batch / batch.median_s,
        "cpu_share": min(single.cpu_share, batch.cpu_share),
        "max_abs_diff": check["max_abs_diff_logit"],
        "max_scaled_diff": check["max_scaled_diff_logit"],
        "correct": check["ok"],
    }


def _eager_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], np.ndarray]:
    def run(x):
        with torch.inference_mode():
            return model(x).numpy()

    return run


def _onnxruntime_fn(model: ScreeningNet, input_size: int, threads: int, workdir: Path, onnx_file: Path | None):
    if onnx_file is None:
        onnx_file = workdir / "model.onnx"
        export_graph(model, input_size, onnx_file)  # the graph `cxr export` ships, not a look-alike
    session = onnx_session(onnx_file, threads=threads, providers=["CPUExecutionProvider"], input_size=input_size)

    def run(x):
        return session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]

    return run


def _compile_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], np.ndarray]:
    import torch._inductor.config as inductor_config

    compiled = torch.compile(model, dynamic=False)

    def run(x):
        # Freezing folds the weights into the graph as constants so Inductor can
        # pre-pack them for oneDNN: the setting that makes CPU inference fast.
        # Compilation happens at the first call, hence the patch around calls.
        with inductor_config.patch(freezing=True), torch.inference_mode():
            return compiled(x).numpy()

    return run


def cpu_paths(
    model: ScreeningNet, input_size: int, params: LatencyParams, paths: tuple[str, ...], show_progress: bool = False,
    onnx_file: Callable[[], Path] | None = None,
) -> dict[str, Any]:
    """Each path's figures. `onnx_file` gives the ONNX graph to time (a checkpoint's, from the cache that
    `cxr predict` and `cxr evaluate` run); without it the model is exported for this run."""
    unknown = [p for p in paths if p not in CPU_PATHS]
    if unknown or "eager" not in paths:
        raise CxrError(f"latency paths must include eager and come from {', '.join(CPU_PATHS)}; got {list(paths)}")
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    x1 = torch.rand(1, 1, input_size, input_size, generator=gen)
    xb = torch.rand(params.batch, 1, input_size, input_size, generator=gen)
    eager = _eager_fn(model)
    reference = np.concatenate([eager(x1), eager(xb)])
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cxr-latency-") as tmp:
        builders = {
            "eager": lambda: eager,
            "onnxruntime": lambda: _onnxruntime_fn(model, input_size, threads, Path(tmp),
                                                   onnx_file() if onnx_file is not None else None),
            "compile": lambda: _compile_fn(model),  # static shapes: batch 1 and batch N compile separately
        }
        # One tick per path, outside the timed runs: a bar redrawn inside them would be timed too.
        for name in tqdm(paths, desc="latency (CPU paths)", unit="path", disable=not show_progress, leave=False):
            try:
                results[name] = _path_result(builders[name](), x1, xb, reference, params, is_reference=name == "eager")
            except Exception as exc:  # an optional backend failing must not hide the eager numbers
                if name == "eager":
                    raise
                results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return results


def cuda_timing(model: ScreeningNet, input_size: int, params: LatencyParams) -> dict[str, Any]:
    if pick_device().type != "cuda":
        return {
            "gpu_ms_per_image": None,
            "gpu_images_per_s_batch": None,
            "gpu_note": "CUDA not available on this machine",
        }
    device = pick_device("cuda")
    torch.backends.cudnn.benchmark = True
    gpu_model = model.to(device)
    x1 = torch.rand(1, 1, input_size, input_size, device=device)
    xb = torch.rand(params.batch, 1, input_size, input_size, device=device)

    def run(x):
        with torch.inference_mode():
            gpu_model(x)
        torch.cuda.synchronize()  # kernels are asynchronous: time their completion, not their launch

    single = time_runs(lambda: run(x1), params.warmup, params.runs, threads=1)
    batch = time_runs(lambda: run(xb), max(1, params.warmup // 2), max(3, params.runs // 4), threads=1)
    model.to("cpu")
    return {
        "gpu_ms_per_image": single.median_s * 1e3,
        "gpu_images_per_s_batch": params.batch / batch.median_s,
        "gpu_name": torch.cuda.get_device_name(device),
        "gpu_precision": "fp32",
    }


def measure_latency(
    model: ScreeningNet,
    input_size: int,
    params: LatencyParams,
    paths: tuple[str, ...] = ("eager", "onnxruntime"),
    show_progress: bool = False,
    onnx_file: Callable[[], Path] | None = None,
) -> dict[str, Any]:
    """All latency figures for one model; `paths` are the CPU paths to time next to eager.

    The peak is probed here, right before the model's timings, not once per benchmark run: on a
    shared host the second core's speed drifts within minutes (InceptionV3 on ONNX Runtime took
    85.7 and 69.9 ms at 2 threads in two runs), and a floor must describe the machine the
    timings ran on."""
    if params.warmup < 0 or params.runs < 1 or params.batch < 1 or params.threads < 0:
        raise CxrError("latency params: warmup >= 0, runs >= 1, batch >= 1, threads >= 0 (0 = all cores)")
    threads = params.threads or available_cores()
    torch.set_num_threads(threads)
    model = model.eval().to("cpu")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    flops = count_flops(model, torch.zeros(1, 1, input_size, input_size))
    probe = peak_gflops(runs=5, threads=threads)
    peak = probe.pop("peak")
    floor_ms = flops / (peak * 1e9) * 1e3
    paths_out = cpu_paths(model, input_size, params, paths, show_progress, onnx_file)
    for entry in paths_out.values():
        if "ms_per_image" in entry:
            entry["ratio_to_floor"] = entry["ms_per_image"] / floor_ms
    correct = {k: v for k, v in paths_out.items() if v.get("correct")}
    fastest = min(correct, key=lambda k: correct[k]["ms_per_image"])
    eager = paths_out["eager"]
    return {
        "model": model.name,
        "input_size": input_size,
        "network_input": model.network_input,
        "params_m": inference_param_count(model) / 1e6,
        "cpu_ms_per_image": eager["ms_per_image"],
        "cpu_images_per_s_batch": eager["images_per_s_batch"],
        "batch": params.batch,
        "cpu_threads": threads,
        "cpu_fastest_path": fastest,
        "cpu_fastest_ms_per_image": correct[fastest]["ms_per_image"],
        "cpu_fastest_ratio_to_floor": correct[fastest]["ratio_to_floor"],
        "cpu_paths": paths_out,
        "onnx_graph": "exported for this run" if onnx_file is None else "the checkpoint's, from the ONNX cache",
        "gflops": flops / 1e9,
        "peak_gflops_fp32": peak,
        "peak_probes": probe,
        "floor_ms": floor_ms,
        "cpu_ratio_to_floor": eager["ms_per_image"] / floor_ms,
        **cuda_timing(model, input_size, params),
        "cpu_model": cpu_model_name(),
        "cpu_cores_available": available_cores(),
        "allocator": allocator_name(),
        "load_average_before": list(load_before) if load_before else None,
        # below ~0.8 the machine was busy while timing: treat the milliseconds as upper bounds
        "cpu_share_min": min(v["cpu_share"] for v in paths_out.values() if "cpu_share" in v),
        "torch_version": torch.__version__,
        "warmup": params.warmup,
        "runs": params.runs,
        "precision": "fp32",
    }


def latency_for_checkpoint(
    checkpoint_path: Path, params: LatencyParams, paths: tuple[str, ...], show_progress: bool = False
) -> dict[str, Any]:
    """Latency of the network a checkpoint describes (its weights do not change the cost)."""
    ckpt = load_checkpoint(checkpoint_path)
    # ONNX Runtime times the very file `cxr predict` and `cxr evaluate` run (the network and, when the
    # checkpoint has one, its out-of-distribution gate), from their cache: in `dvc repro` evaluate has
    # exported it already, and exporting DenseNet121 again took 12 s on 2 cores
    report = measure_latency(ckpt.build(), ckpt.input_size, params, paths, show_progress,
                             onnx_file=lambda: cached_onnx(ckpt, default_cache_dir()))
    report["variant"] = ckpt.variant
    report["checkpoint_sha256"] = ckpt.file_sha256()
    return report


def parse_counts(text: str) -> tuple[int, ...]:
    """--threads "1, 2" -> (1, 2); anything but positive integers is an error."""
    parts = parse_paths(text)
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise CxrError(f"expected positive integers separated by commas, got {text!r}")
    return tuple(int(p) for p in parts)


def parse_paths(text: str) -> tuple[str, ...]:
    """--paths "eager, onnxruntime" -> ("eager", "onnxruntime"); checked by `cpu_paths`."""
    return tuple(s.strip() for s in text.split(",") if s.strip())
