"""Panel: benchmarks. Each prints its own baseline measured in the same run, and ratios against it.

Command `bench-X` lives in `pipeline/bench/bench_X.py` (data side) or `train/bench/bench_X.py` (model side).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.errors import CxrError
from pipeline.commands.common import (
    BENCHMARKS,
    DEFAULT_PARAMS,
    DEFAULT_REAL_ROOT,
    EngineOpt,
    ArchOpt,
    ParamsOpt,
    RealRootOpt,
    echo_json,
    fail_cleanly,
    panel,
    read_params,
)

app = panel()


@app.command("bench-preprocess", rich_help_panel=BENCHMARKS)
@fail_cleanly
def bench_preprocess(
    root: RealRootOpt = DEFAULT_REAL_ROOT,
    repeat: Annotated[int, typer.Option(help="Interleaved rounds of the three measurements (best is kept)")] = 3,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Benchmark: pipeline preprocessing vs a naive single-process PIL baseline and a decode-only floor.

    Reads: ROOT's label files and images. Writes nothing; prints images/s and ratios.
    """
    from pipeline.bench.bench_preprocess import run_preprocess_benchmark

    p = read_params(params)
    echo_json(run_preprocess_benchmark(root, p.preprocess, p.shard, repeat=repeat))


@app.command("bench-memory", rich_help_panel=BENCHMARKS)
@fail_cleanly
def bench_memory(root: RealRootOpt = DEFAULT_REAL_ROOT, params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Benchmark: peak RSS of the shard stage (2 workers) on ROOT and on a corpus with one 12000x12000 16-bit PNG.

    Reads: ROOT and params (preprocess.*). Writes nothing outside a temporary folder; prints, per corpus,
    the peak RSS of the largest process and of the whole process tree (MiB), and what was rejected.
    """
    from pipeline.bench.bench_memory import run_memory_benchmark

    echo_json(run_memory_benchmark(root, read_params(params)))


@app.command("bench-train", rich_help_panel=BENCHMARKS)
@fail_cleanly
def bench_train(
    shards: Annotated[
        Optional[Path], typer.Option(help="Shard variant directory (default: shards/<params variant>)")
    ] = None,
    arch: ArchOpt = "resnet50",
    steps: Annotated[int, typer.Option(help="Timed training steps per path")] = 12,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up steps per path")] = 3,
    loader_images: Annotated[int, typer.Option(help="Images read per loader-only measurement")] = 2000,
    fp32_streaming: Annotated[
        bool, typer.Option(help="Also time the streaming path in fp32 NCHW (precision vs data path)")
    ] = False,
    threads: Annotated[
        int, typer.Option(help="Compute threads, 0 = all cores (1 is steadier on a machine shared with other jobs)")
    ] = 0,
    device: Annotated[str, typer.Option(help="cpu, or cuda to time both paths on the GPU")] = "cpu",
    compiled: Annotated[
        bool, typer.Option(help="Also time the streaming path with the model under torch.compile")
    ] = True,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Benchmark on this CPU (or --device cuda): streaming trainer vs naive ImageFolder + per-image RandomAffine fp32 trainer.

    Reads: SHARDS (train split; exported to a temporary ImageFolder of the same PNGs) and params train.*.
    Writes nothing; prints training images/s of both paths and their ratio, the streaming path eager
    vs compiled (eager_images_per_s, compiled_images_per_s, compile_s), loader-only images/s
    (shards vs folder), the fraction of step time spent waiting for data, and achieved GFLOP/s
    against a convolution peak measured in the same run in the trained precision (peak_share).
    """
    from train.bench.bench_train import run_train_benchmark

    p = read_params(params)
    echo_json(
        run_train_benchmark(
            shards or Path("shards") / p.variant,
            arch,
            p.train,
            p.seed,
            steps,
            warmup,
            loader_images,
            fp32_streaming=fp32_streaming,
            threads=threads,
            device=device,
            compiled=compiled,
        )
    )


@app.command("bench-screen", rich_help_panel=BENCHMARKS)
@fail_cleanly
def bench_screen(
    root: Annotated[Path, typer.Option(help="COVIDx-layout root whose images are cycled into the test set")] = DEFAULT_REAL_ROOT,
    images: Annotated[int, typer.Option(help="Images in the timed external test set")] = 1000,
    model: Annotated[
        Optional[Path], typer.Option(help="Checkpoint to time (default: a random --arch; weights do not change speed)")
    ] = None,
    arch: ArchOpt = "densenet121",
    rounds: Annotated[int, typer.Option(help="Interleaved rounds of eager and default (the fastest of each is kept)")] = 1,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Benchmark `evaluate --root` end to end: the default engine against eager PyTorch, in one run.

    Reads: ROOT's label files and images (linked into a temporary root of IMAGES test images), the
    checkpoint, params (evaluate.*, train.num_workers, seed). Writes nothing but the ONNX cache;
    prints images/s of both engines, their ratio and the one-time ONNX build time.
    """
    from train.bench.bench_screen import run_screen_benchmark

    echo_json(run_screen_benchmark(read_params(params), root, images, model, arch, rounds))


@app.command("bench-ood", rich_help_panel=BENCHMARKS)
@fail_cleanly
def bench_ood(
    model: Annotated[Path, typer.Option(help="Checkpoint or ONNX file whose out-of-distribution gate is measured")]
    = Path("models/best.pt"),
    root: Annotated[Path, typer.Option(help="COVIDx-layout root whose test split is the radiograph side")]
    = DEFAULT_REAL_ROOT,
    engine: EngineOpt = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per batch")] = 32,
) -> None:
    """Benchmark: the out-of-distribution gate on ROOT's test radiographs vs non-radiographs (skimage.data, noise, blanks).

    Reads: the model, ROOT's test.txt and test images. Writes nothing; prints JSON: the gate's ROC AUC,
    the share flagged on each side and per kind of non-radiograph.
    """
    from train.bench.bench_ood import run_ood_benchmark

    echo_json(run_ood_benchmark(model, root, engine=engine, batch_size=batch_size))


@app.command("bench-serve", rich_help_panel=BENCHMARKS)
@fail_cleanly
def bench_serve(
    root: Annotated[Path, typer.Option(help="COVIDx-layout root whose images are cycled into the requests")] = DEFAULT_REAL_ROOT,
    model: Annotated[
        Optional[Path], typer.Option(help="Checkpoint to serve (default: a random --arch; weights do not change speed)")
    ] = None,
    arch: ArchOpt = "densenet121",
    clients: Annotated[int, typer.Option(help="Concurrent clients, each sending one image per request")] = 8,
    requests: Annotated[int, typer.Option(help="Timed requests in all (after a warm-up of 4 per client)")] = 2000,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Benchmark `cxr serve` on loopback under concurrent clients against `cxr predict` on the same images.

    Reads: ROOT's images (linked into a temporary folder of REQUESTS files), the checkpoint, params (seed,
    preprocess.*, variant for a random model). Writes nothing but the ONNX cache; prints images/s of both,
    their ratio, p50/p95/p99 latency, errors and the server's RSS before and after the timed requests.
    """
    from train.bench.bench_serve import run_serve_benchmark

    echo_json(run_serve_benchmark(read_params(params), root, model, arch, clients, requests))


@app.command("bench-latency", rich_help_panel=BENCHMARKS)
@fail_cleanly
def bench_latency(
    arch: Annotated[str, typer.Option(help="Networks to time, comma-separated")] = "resnet50,densenet121,inceptionv3,vgg16",
    threads: Annotated[str, typer.Option(help="Thread counts, comma-separated")] = "1,2",
    rounds: Annotated[int, typer.Option(help="Sweeps of all networks (each keeps its fastest time and highest peak)")] = 3,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Benchmark batch-1 CPU latency against the fp32 floor (FLOPs / peak measured in the same run).

    Reads: params (latency.warmup, latency.runs, preprocess.size). Writes nothing; prints, per network
    and thread count, eager and ONNX Runtime milliseconds and the fastest path's ratio to the floor.
    """
    from train.bench.bench_latency import batch1_benchmark
    from train.evaluation.latency import parse_counts, parse_paths

    p = read_params(params)
    echo_json(batch1_benchmark(parse_paths(arch), parse_counts(threads), p.preprocess.size, p.latency, rounds))


@app.command("bench-scale", rich_help_panel=BENCHMARKS)
@fail_cleanly
def bench_scale(
    # Ingest's peak RSS moves by up to 0.5 MB between runs at one size (its hashing threads' malloc
    # arenas): over 200-1,600 images its growth per image read 359 to 552 B between runs of the same
    # code. Spread over 3,600 images between the smallest and largest size, 0.5 MB is 140 B an image
    # (a quarter of the 512 B aim); over 1,400 it was 360.
    sizes: Annotated[
        str, typer.Option(help="Dataset sizes in images, comma-separated, ascending; three or more also give the "
                          "added time per added image (CXR-4: 84818)")
    ] = "400,1600,4000",
    min_side: Annotated[int, typer.Option(help="Shortest long side of a generated image, px (real downloads: 1000)")] = 512,
    max_side: Annotated[int, typer.Option(help="Longest long side of a generated image, px (real downloads: 4000)")] = 1024,
    rounds: Annotated[int, typer.Option(help="Least runs of each stage at each size; the least time, RSS and disk are kept")] = 2,
    measured_s: Annotated[float, typer.Option(help="More runs (up to 8) until a stage's runs at a size add up to this many "
                                              "seconds, so short runs, where noise weighs most, get the most; 0: exactly --rounds")] = 30.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table")] = False,
    dvc_config: Annotated[Path, typer.Option(help="The DVC config whose cache link type the queued experiment uses")] = Path(
        ".dvc/config"
    ),
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Benchmark how every stage grows with the dataset: synthetic COVIDx datasets of growing SIZES.

    At each size, in a temporary git + DVC repository: ingest, shard (both variants), one loader pass
    over train, evaluation's metrics with the patient bootstrap (fake scores, test split = a tenth),
    figures, `dvc status` and a queued experiment's setup up to its first batch (cache.type copy, then
    DVC_CONFIG's).

    Reads: params (every stage's, data.root aside), DVC_CONFIG. Writes nothing outside temporary folders;
    prints per stage time per image, peak RSS of its process tree, disk written, the ratio
    largest/smallest size, the projection to COVIDx CXR-4 (84,818 images) and which aims hold.
    """
    from pipeline.bench.bench_scale import run_scale_benchmark, table

    try:
        counts = [int(x) for x in sizes.split(",")]
    except ValueError:
        raise CxrError(f"--sizes: comma-separated integers expected, got {sizes!r}") from None
    result = run_scale_benchmark(read_params(params), counts, dvc_config, min_side=min_side, max_side=max_side,
                                 workers=os.cpu_count() or 1, rounds=rounds, measured_s=measured_s)  # fmt: skip
    if json_out:
        echo_json(result)
    else:
        typer.echo(table(result))


@app.command("bench-scale-stage", hidden=True, rich_help_panel=BENCHMARKS)
@fail_cleanly
def bench_scale_stage(
    stage: Annotated[str, typer.Argument(help="loader | metrics | first-step")],
    shards: Annotated[Path, typer.Option(help="Shard variant directory")] = Path("shards/equalized"),
    manifest: Annotated[Path, typer.Option(help="Manifest (metrics: its test split)")] = Path("data/manifest.jsonl"),
    report: Annotated[Optional[Path], typer.Option(help="Also write the result here (JSON)")] = None,
    repeat: Annotated[int, typer.Option(help="metrics: evaluate the test split this many times over (new patients "
                                             "each copy)")] = 1,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """One model-side stage of bench-scale in its own process (its peak RSS measured from outside).

    Reads: SHARDS (loader, first-step) or MANIFEST's test split (metrics), params. Writes REPORT if given;
    prints what the stage did (first-step: also the disk its workspace holds unshared; metrics: its
    own peak RSS from after its imports, and the RSS it started from).
    """
    import json

    from train.bench import bench_scale as stages

    p = read_params(params)
    if stage == "loader":
        result = stages.loader_pass(shards, p.train, p.seed)
    elif stage == "metrics":
        from pipeline.bench.bench_memory import own_peak_rss, reset_peak_rss
        from pipeline.manifest import iter_manifest

        if repeat < 1:
            raise CxrError(f"bench-scale-stage: --repeat must be at least 1, got {repeat}")
        # torch and the rest are imported by now: what follows is the part that can grow with the test split
        start = reset_peak_rss()
        test = [e for e in iter_manifest(manifest) if e.split == "test"]
        # each copy's patients are new patients, so the patient bootstrap grows with the copies too
        patients = [e.patient_id if r == 0 else f"{e.patient_id}#{r}" for r in range(repeat) for e in test]
        result = stages.metrics_pass([e.label for e in test] * repeat, patients, [e.source for e in test] * repeat,
                                     p.evaluate, p.seed)  # fmt: skip
        result |= {"rss_at_start_bytes": start, "peak_rss_bytes": own_peak_rss()}
    elif stage == "first-step":
        result = stages.first_step(shards, p.train, p.seed, Path.cwd())
    else:
        raise CxrError(f"bench-scale-stage: unknown stage {stage!r}; valid: loader, metrics, first-step")
    if report is not None:
        report.write_text(json.dumps(result))
    echo_json(result)
