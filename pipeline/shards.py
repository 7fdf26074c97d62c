"""Stage `shard`: manifest -> preprocessed 224x224 greyscale WebDataset shards + summary.

Preprocessing runs in a process pool (decoding is ~90% of the cost) while one
writer consumes results in a fixed, seeded order, so the tars are
byte-identical whatever the worker count. Each shard is written under a
unique temporary name and renamed when complete (pipeline.fileio), the variant
folder is locked for the run, and only the stage's own files in it are ever
deleted: a folder holding anything else is refused (pipeline.ownership). A run
killed at any point leaves no file under a final name that a rerun would not
rewrite byte for byte.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.errors import CxrError
from pipeline.fileio import atomic_write_json, output_lock
from pipeline.manifest import ManifestEntry, read_manifest
from pipeline.ownership import claim_folder, remove_owned
from pipeline.params import DataParams, PreprocessParams, ShardParams
from pipeline.preprocess import PreprocessConfig
from pipeline.progress import Progress, bounded_map
from pipeline.rejects import check_reject_fraction
from pipeline.shard_worker import ShardResult, ShardTask, process_one, process_pool
from pipeline.shard_format import (
    CLASS_NAMES,
    OWN_NAMES,
    REJECTS_NAME,
    SPLITS,
    ShardWriter,
    encode_sample,
    make_summary,
    split_record,
    write_summary,
)

def shuffled_order(entries: list[ManifestEntry], seed: int) -> list[ManifestEntry]:
    """Seeded shuffle per split: label files come in class/source blocks, shards must mix them."""
    ordered: list[ManifestEntry] = []
    for index, split in enumerate(SPLITS):
        items = sorted((e for e in entries if e.split == split), key=lambda e: e.key)
        perm = np.random.default_rng([seed, index]).permutation(len(items))
        ordered += [items[i] for i in perm]
    return ordered


def balanced_count(n: int, max_count: int) -> int:
    """Samples per shard so that a split's shards come out the same size.

    217 images at 100 a shard make 73/72/72, not 100/100/17: each loader worker
    streams whole shards, so a runt shard leaves a worker idle half the time.
    """
    if n <= max_count:
        return max_count
    return math.ceil(n / math.ceil(n / max_count))


def _results(tasks: list[ShardTask], workers: int) -> Iterator[ShardResult]:
    if workers <= 1:
        yield from map(process_one, tasks)
        return
    with process_pool(workers) as pool:
        # chunks of 4 images per call amortise the pickling; 4 chunks in flight per worker keep them fed
        yield from bounded_map(pool, process_one, tasks, ahead=4 * workers, chunk=4)


def write_variant(
    manifest_path: Path,
    ingest_report_path: Path,
    out_dir: Path,
    variant: str,
    preprocess: PreprocessParams,
    shard: ShardParams,
    data: DataParams,
    seed: int,
    show_progress: bool = True,
) -> dict[str, Any]:
    entries = read_manifest(manifest_path)
    if not ingest_report_path.is_file():
        raise CxrError(f"ingest report not found: {ingest_report_path} (run the ingest stage first)")
    ingest = json.loads(ingest_report_path.read_text())
    root = Path(ingest["root"])
    cfg = PreprocessConfig.for_variant(preprocess, variant)
    workers = shard.workers or os.cpu_count() or 1

    claim_folder(out_dir, "shard", OWN_NAMES)
    with output_lock(out_dir):
        remove_owned(out_dir, OWN_NAMES)  # our own previous outputs (and a killed run's temps) only
        return _write_locked(entries, ingest, root, out_dir, variant, cfg, shard, workers, data.max_reject_fraction,
                             seed, show_progress)  # fmt: skip


def _write_locked(entries, ingest, root, out_dir, variant, cfg, shard, workers, max_reject_fraction, seed,
                  show_progress) -> dict[str, Any]:  # fmt: skip
    ordered = shuffled_order(entries, seed)
    tasks = [ShardTask(e, str(root), cfg) for e in ordered]
    per_split = Counter(e.split for e in entries)
    sinks = {
        split: ShardWriter(out_dir, split, balanced_count(per_split[split], shard.max_count), shard.max_bytes)
        for split in SPLITS
    }
    try:
        rejects, class_counts = _fill(sinks, tasks, workers, variant, show_progress, ingest)
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    splits = {split: split_record(sink.close(), class_counts[split]) for split, sink in sinks.items()}
    return _summarize(splits, rejects, ingest, root, out_dir, variant, cfg, shard, max_reject_fraction, seed)


def _fill(sinks, tasks, workers, variant, show_progress, ingest):
    rejects = list(ingest.get("rejects", []))
    class_counts = {split: Counter() for split in SPLITS}
    progress = Progress(len(tasks), f"shard {variant}", enabled=show_progress)
    for result in _results(tasks, workers):
        progress.update()
        e = result.entry
        if result.png is None:
            rejects.append({"split": e.split, "key": e.key, "filename": e.filename, "reason": result.reason})
            continue
        meta = {
            "patient_id": e.patient_id,
            "source": e.source,
            "filename": e.filename,
            "width": result.width,
            "height": result.height,
            "sha256": e.sha256,
        }
        sinks[e.split].write(encode_sample(e.key, result.png, e.label, meta), len(result.png) + 1024)
        class_counts[e.split][CLASS_NAMES[e.label]] += 1
    progress.close()
    return rejects, class_counts



def _summarize(splits, rejects, ingest, root, out_dir, variant, cfg, shard, max_reject_fraction, seed):
    total_lines = ingest["lines"]
    summary = make_summary(
        variant=variant,
        root=str(root),
        splits=splits,
        params={"preprocess": cfg.to_dict(), "seed": seed, "max_count": shard.max_count, "max_bytes": shard.max_bytes},
        label_lines=total_lines,
        rejects=rejects,
        patient_overlap=ingest.get("label_file_patient_overlap", {}),
        leaks=ingest.get("leaks", []),
    )
    written = sum(splits[s]["count"] for s in SPLITS)
    if written + len(rejects) != total_lines:  # the no-silent-drop invariant
        raise CxrError(f"accounting error: {written} written + {len(rejects)} rejected != {total_lines} label lines")
    def write_rejects(message: str) -> Path:  # no summary (nothing downstream may read these shards)
        atomic_write_json(out_dir / REJECTS_NAME, summary | {"failed": message}, indent=1)
        return out_dir / REJECTS_NAME

    check_reject_fraction(rejects, total_lines, max_reject_fraction, "images", root, write_rejects)
    write_summary(out_dir, summary)
    return summary
