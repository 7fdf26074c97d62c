"""Benchmark for the shard stage: the real stage vs a naive baseline and a decode-only floor.

All three run in one process on the same files, so their ratios hold on any
machine. They run interleaved, `repeat` rounds of pipeline, floor, naive, and
the fastest pass of each is kept: on a shared host the speed of the second
core drifts by tens of percent within a minute, and interleaving makes all
three see the same drift. A warm-up pass first fills the page cache and starts
the pool's forkserver.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from pipeline.imageio import ImageRejected, decode_grey
from pipeline.labels import read_image_file
from pipeline.manifest import build_manifest, read_manifest
from pipeline.params import DataParams, PreprocessParams, ShardParams
from pipeline.preprocess import PreprocessConfig, decode_image, preprocess_array
from pipeline.shard_format import encode_png
from pipeline.shard_worker import process_pool


def naive_pil(path: str, cfg: PreprocessConfig) -> bytes:
    """What a first script would do: Pillow end to end, one image at a time."""
    with Image.open(path) as img:
        grey = ImageOps.exif_transpose(img).convert("L")
    w, h = grey.size
    grey = grey.crop((0, int(round(h * cfg.top_crop)), w, h))
    w, h = grey.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    grey = grey.crop((left, top, left + side, top + side)).resize((cfg.size, cfg.size), Image.Resampling.BICUBIC)
    if cfg.equalize:
        grey = ImageOps.equalize(grey)
    out = io.BytesIO()
    grey.save(out, "PNG")
    return out.getvalue()


def decode_only(args: tuple[str, PreprocessConfig]) -> int:
    path, cfg = args
    reduce_to = (cfg.top_crop, cfg.size) if cfg.reduced_decode else None
    try:
        return decode_grey(Path(path).read_bytes(), cfg.limits, reduce_to).size
    except ImageRejected:
        return 0


def step_costs(root: Path, relatives: list[str], cfg: PreprocessConfig) -> dict[str, Any]:
    """Milliseconds per image of each step a shard worker runs, timed one image at a time in this process.

    The ratio of the decode-only pass's steps (plain read, decode) to the stage's
    steps is the most the stage can reach against that floor with perfect
    parallelism and a free parent process: the benchmark prints it beside the
    measured ratio, so a shortfall reads as the stage's own work, not overhead.
    """
    totals = dict.fromkeys(("read_inside_root", "read_plain", "sha256", "decode", "preprocess", "png_encode"), 0.0)
    reduce_to = (cfg.top_crop, cfg.size) if cfg.reduced_decode else None
    timed = 0
    for relative in relatives:
        marks = [time.perf_counter()]
        data = read_image_file(str(root), relative, cfg.max_decoded_bytes)
        if isinstance(data, str):
            continue  # missing or refused: the floor never reads it either
        marks.append(time.perf_counter())
        (root / relative).read_bytes()
        marks.append(time.perf_counter())
        hashlib.sha256(data).hexdigest()
        marks.append(time.perf_counter())
        try:
            image = decode_image(data, cfg.limits, relative, reduce_to)[1]
            marks.append(time.perf_counter())
            image = preprocess_array(image, cfg)
        except ImageRejected:
            continue  # a reject costs the stage little; the floor skips it too
        marks.append(time.perf_counter())
        encode_png(image)
        marks.append(time.perf_counter())
        for name, start, end in zip(totals, marks, marks[1:]):
            totals[name] += end - start
        timed += 1
    per_image = {k: round(v / max(timed, 1) * 1e3, 3) for k, v in totals.items()}
    floor = per_image["read_plain"] + per_image["decode"]
    stage = sum(v for k, v in per_image.items() if k != "read_plain")
    return {"per_image_ms": per_image, "images_timed": timed, "stage_ceiling_vs_decode_only": round(floor / stage, 2)}


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_preprocess_benchmark(
    root: Path, preprocess: PreprocessParams, shard: ShardParams, repeat: int = 3, variant: str = "equalized"
) -> dict[str, Any]:
    # Imported here, not at the top: pool workers import this module to find
    # `decode_only`, and `shards` pulls in webdataset and with it torch.
    from pipeline.shards import write_variant

    cfg = PreprocessConfig.for_variant(preprocess, variant)
    workers = shard.workers or os.cpu_count() or 1
    data = DataParams(root=str(root), val_fraction=0.1, max_reject_fraction=1.0, leaks="report")  # time every image
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        tmp_dir = Path(tmp)
        build_manifest(root, tmp_dir / "m.jsonl", tmp_dir / "r.json", data, seed=0)
        paths = [str(root / e.path) for e in read_manifest(tmp_dir / "m.jsonl")]
        n = len(paths)

        def pipeline() -> None:
            write_variant(
                tmp_dir / "m.jsonl", tmp_dir / "r.json", tmp_dir / "shards", variant, preprocess, shard,
                data, seed=0, show_progress=False,
            )

        def floor() -> None:
            with process_pool(workers) as pool:
                list(pool.map(decode_only, [(p, cfg) for p in paths], chunksize=4))

        def naive() -> None:
            for p in paths:
                try:
                    naive_pil(p, cfg)
                except OSError:
                    pass

        floor()  # warm-up: page cache, forkserver
        steps = step_costs(root, [e.path for e in read_manifest(tmp_dir / "m.jsonl")], cfg)
        best = {"pipeline": float("inf"), "floor": float("inf"), "naive": float("inf")}
        for _ in range(repeat):
            for name, fn in (("pipeline", pipeline), ("floor", floor), ("naive", naive)):
                best[name] = min(best[name], _seconds(fn))
        pipeline_rate, floor_rate, naive_rate = (n / best[k] for k in ("pipeline", "floor", "naive"))
    return {
        "images": n,
        "workers": workers,
        "rounds": repeat,
        "variant": variant,
        "reduced_decode": cfg.reduced_decode,
        "naive_pil_single_process_images_per_s": round(naive_rate, 1),
        "decode_only_images_per_s": round(floor_rate, 1),
        "pipeline_images_per_s": round(pipeline_rate, 1),
        "pipeline_vs_naive": round(pipeline_rate / naive_rate, 2),
        "pipeline_vs_decode_only": round(pipeline_rate / floor_rate, 2),
        "single_process_steps": steps,
    }
