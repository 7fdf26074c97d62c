"""Benchmark: `evaluate --root` over N mixed-size images, the default engine against eager PyTorch, one run.

The images are a COVIDx-layout root's own files (train and test, PNG and JPEG
of every size it has), cycled to N and laid out as a new root whose test.txt
lists them all, so the timed call is exactly what `cxr evaluate --root` runs:
label parsing, decoding and preprocessing in threads, the model, the metrics.
Files are hard-linked where the file system allows (copied otherwise), so a
1,000-image root costs no extra disk on the same file system.

The engines run interleaved (eager, auto, eager, auto, ...) and each keeps its
fastest round: on a shared machine the cores' speed drifts within a minute,
and interleaving makes both engines see the same drift. Building the ONNX
Runtime session (the export into the cache) happens once, before the timed
rounds, and is reported on its own: it is paid once per checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import CxrError
from pipeline.labels import parse_label_file
from pipeline.params import Params
from pipeline.preprocess import PreprocessConfig
from pipeline.shard_format import CLASS_NAMES
from train.checkpoint import detached_state_dict, load_checkpoint, make_meta, save_checkpoint
from train.evaluation.external import evaluate_external, external_test_items
from train.inference import Engine, default_cache_dir
from train.timing import allocator_name, cpu_model_name
from train.models import build_model


def replicate_root(source: Path, out: Path, count: int) -> dict[str, Any]:
    """Write OUT/test.txt + OUT/test/ with `count` images: SOURCE's labelled files, cycled."""
    lines = []
    for split in ("train", "test"):
        if (source / f"{split}.txt").is_file():
            good, _ = parse_label_file(source / f"{split}.txt")
            lines += [(split, line) for line in good if (source / split / line.filename).is_file()]
    if not lines:
        raise CxrError(f"{source}: no labelled images found in train.txt/test.txt")
    (out / "test").mkdir(parents=True)
    rows = []
    for i in range(count):
        split, line = lines[i % len(lines)]
        name = f"{i:06d}-{Path(line.filename).name}"
        src, dst = source / split / line.filename, out / "test" / name
        try:
            os.link(src, dst)
        except OSError:  # another file system, or links not allowed: a copy times the same
            shutil.copyfile(src, dst)
        rows.append(f"p{i % len(lines)} {name} {CLASS_NAMES[line.label]} {line.source}\n")
    (out / "test.txt").write_text("".join(rows))
    return {"images": count, "distinct_files": min(count, len(lines))}


def random_checkpoint(path: Path, arch: str, params: Params) -> Path:
    """A randomly initialised `arch` with the params' preprocessing: its speed is a trained one's."""
    torch.manual_seed(params.seed)
    net = build_model(arch)
    preprocess = PreprocessConfig.for_variant(params.preprocess, params.variant).to_dict()
    meta = make_meta(model=arch, variant=params.variant, input_size=params.preprocess.size, preprocess=preprocess,
                     params={}, threshold={"value": 0.5, "rule": "fixed", "split": "none"}, epoch=0,
                     val_loss=None)  # fmt: skip
    save_checkpoint(path, meta, detached_state_dict(net))
    return path


def run_screen_benchmark(
    params: Params, source: Path, images: int, checkpoint: Path | None, arch: str, rounds: int = 1
) -> dict[str, Any]:
    if images < 1 or rounds < 1:
        raise CxrError(f"images and rounds must be >= 1, got {images} and {rounds}")
    with tempfile.TemporaryDirectory(prefix="cxr-bench-screen-") as tmp:
        tmp_dir = Path(tmp)
        if checkpoint is None:
            checkpoint = random_checkpoint(tmp_dir / "model.pt", arch, params)
        ckpt = load_checkpoint(checkpoint)
        layout = replicate_root(source, tmp_dir / "root", images)
        items, label_rejects = external_test_items(tmp_dir / "root")
        keep_all = dataclasses.replace(params.data, max_reject_fraction=1.0)  # time every image, never refuse

        start = time.perf_counter()
        Engine(ckpt, "auto", torch.device("cpu"), default_cache_dir())  # fills the cache (once per checkpoint)
        build_s = time.perf_counter() - start

        def run(engine: str) -> tuple[float, dict[str, Any]]:
            begin = time.perf_counter()
            result = evaluate_external(checkpoint, items, label_rejects, str(source), evaluate=params.evaluate,
                                       data=keep_all, train=params.train, seed=params.seed, engine=engine)  # fmt: skip
            return time.perf_counter() - begin, result.report

        best = {"eager": float("inf"), "auto": float("inf")}
        reports: dict[str, dict[str, Any]] = {}
        for _ in range(rounds):
            for engine in best:
                seconds, reports[engine] = run(engine)
                best[engine] = min(best[engine], seconds)
    scored = reports["auto"]["n_test"]
    rate = {k: scored / v for k, v in best.items()}
    auc = {k: r["roc_auc"] for k, r in reports.items()}
    return {
        "model": ckpt.model_name,
        "checkpoint": str(checkpoint) if checkpoint != tmp_dir / "model.pt" else f"random {arch}",
        **layout,
        "scored": scored,
        "rejected": reports["auto"]["dataset"]["reject_count"],
        "rounds": rounds,
        "batch_size": params.evaluate.batch_size,
        "decode_threads": params.train.num_workers or os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model_name(),
        "allocator": allocator_name(),
        "default_engine": reports["auto"]["inference"],
        "onnx_build_s_once": round(build_s, 1),
        "eager_images_per_s": round(rate["eager"], 2),
        "default_images_per_s": round(rate["auto"], 2),
        "default_vs_eager": round(rate["auto"] / rate["eager"], 2),
        "roc_auc": auc,  # the same metric from both engines: the speed-up changes no result
    }
