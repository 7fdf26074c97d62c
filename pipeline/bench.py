"""Benchmark for the shard stage: the real stage vs a naive baseline and a decode-only floor.

All three run in one process on the same files, so their ratios hold on any
machine. Best of `repeat` passes is kept for each (the first pass also warms
the page cache for the others).
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from pipeline.imageio import ImageRejected, decode_grey
from pipeline.manifest import build_manifest, read_manifest
from pipeline.params import PreprocessParams, ShardParams
from pipeline.preprocess import PreprocessConfig
from pipeline.shards import process_pool, write_variant


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


def _best_rate(fn, n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def run_preprocess_benchmark(
    root: Path, preprocess: PreprocessParams, shard: ShardParams, repeat: int = 2, variant: str = "equalized"
) -> dict[str, Any]:
    cfg = PreprocessConfig.for_variant(preprocess, variant)
    workers = shard.workers or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        tmp_dir = Path(tmp)
        build_manifest(root, tmp_dir / "m.jsonl", tmp_dir / "r.json", 0.1, 0, max_reject_fraction=1.0)
        paths = [str(root / e.path) for e in read_manifest(tmp_dir / "m.jsonl")]
        n = len(paths)

        def pipeline() -> None:
            write_variant(
                tmp_dir / "m.jsonl", tmp_dir / "r.json", tmp_dir / "shards", variant, preprocess, shard,
                max_reject_fraction=1.0, seed=0, show_progress=False,
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

        pipeline_rate = _best_rate(pipeline, n, repeat)
        floor_rate = _best_rate(floor, n, repeat)
        naive_rate = _best_rate(naive, n, max(1, repeat - 1))
    return {
        "images": n,
        "workers": workers,
        "variant": variant,
        "reduced_decode": cfg.reduced_decode,
        "naive_pil_single_process_images_per_s": round(naive_rate, 1),
        "decode_only_images_per_s": round(floor_rate, 1),
        "pipeline_images_per_s": round(pipeline_rate, 1),
        "pipeline_vs_naive": round(pipeline_rate / naive_rate, 2),
        "pipeline_vs_decode_only": round(pipeline_rate / floor_rate, 2),
    }
