"""Stage `shard`: manifest -> preprocessed 224x224 greyscale WebDataset shards + summary.

Preprocessing runs in a process pool (decoding is ~90% of the cost) while one
writer consumes results in a fixed, seeded order, so the tars are
byte-identical whatever the worker count. Each shard is written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import webdataset as wds
from tqdm import tqdm

from pipeline.errors import CxrError
from pipeline.manifest import ManifestEntry, read_manifest
from pipeline.params import PreprocessParams, ShardParams
from pipeline.preprocess import PreprocessConfig
from pipeline.shard_worker import ShardResult, ShardTask, process_one, process_pool
from pipeline.shard_format import CLASS_NAMES, SPLITS, SUMMARY_NAME, shard_name

# Fixed tar metadata: with the default (current time) every run would produce
# different bytes and DVC could never recognise an unchanged output.
TAR_MTIME = 0


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
        yield from pool.map(process_one, tasks, chunksize=4)


class _ShardSink:
    """Rolls over to a new tar when the count or byte bound is reached."""

    def __init__(self, out_dir: Path, split: str, max_count: int, max_bytes: int):
        self.out_dir, self.split = out_dir, split
        self.max_count, self.max_bytes = max_count, max_bytes
        self.shards: list[dict[str, Any]] = []
        self._writer: wds.TarWriter | None = None
        self._stream = None
        self._count = self._bytes = 0

    def write(self, sample: dict[str, Any], size: int) -> None:
        if self._writer is None or self._count >= self.max_count or self._bytes + size > self.max_bytes:
            self._finish()
            self._open()
        self._writer.write(sample)
        self._count += 1
        self._bytes += size

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._stream = open(self.out_dir / f"{name}.tmp", "wb")
        self._writer = wds.TarWriter(self._stream, mtime=TAR_MTIME, user="cxr", group="cxr")
        self.shards.append({"name": name, "count": 0})
        self._count = self._bytes = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._stream.close()
        name = self.shards[-1]["name"]
        os.replace(self.out_dir / f"{name}.tmp", self.out_dir / name)
        self.shards[-1]["count"] = self._count
        self.shards[-1]["sha256"] = _file_sha256(self.out_dir / name)
        self._writer = None

    def close(self) -> list[dict[str, Any]]:
        self._finish()
        return self.shards


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_variant(
    manifest_path: Path,
    ingest_report_path: Path,
    out_dir: Path,
    variant: str,
    preprocess: PreprocessParams,
    shard: ShardParams,
    max_reject_fraction: float,
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

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(out_dir.glob("*.tar")) + list(out_dir.glob("*.tmp")) + [out_dir / SUMMARY_NAME]:
        stale.unlink(missing_ok=True)  # our own previous outputs only

    ordered = shuffled_order(entries, seed)
    tasks = [ShardTask(e, str(root / e.path), cfg) for e in ordered]
    per_split = Counter(e.split for e in entries)
    sinks = {
        split: _ShardSink(out_dir, split, balanced_count(per_split[split], shard.max_count), shard.max_bytes)
        for split in SPLITS
    }
    rejects = list(ingest.get("rejects", []))
    class_counts = {split: Counter() for split in SPLITS}
    progress = tqdm(total=len(tasks), desc=f"shard {variant}", unit="img", disable=not show_progress)
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
        sample = {
            "__key__": e.key,
            "png": result.png,
            "cls": str(e.label).encode(),
            "json": json.dumps(meta, sort_keys=True).encode(),
        }
        sinks[e.split].write(sample, len(result.png) + 1024)
        class_counts[e.split][CLASS_NAMES[e.label]] += 1
    progress.close()

    splits = {}
    for split, sink in sinks.items():
        shards = sink.close()
        splits[split] = {
            "count": sum(s["count"] for s in shards),
            "class_counts": {name: class_counts[split][name] for name in CLASS_NAMES},
            "shards": shards,
        }
    total_lines = ingest["lines"]
    summary = {
        "variant": variant,
        "root": str(root),
        "counts": {split: splits[split]["count"] for split in SPLITS},
        "splits": splits,
        "params": {"preprocess": cfg.to_dict(), "seed": seed, "max_count": shard.max_count, "max_bytes": shard.max_bytes},
        "label_lines": total_lines,
        "reject_count": len(rejects),
        "rejects": rejects,
        "label_file_patient_overlap": ingest.get("label_file_patient_overlap", {}),
    }
    written = sum(splits[s]["count"] for s in SPLITS)
    if written + len(rejects) != total_lines:  # the no-silent-drop invariant
        raise CxrError(f"accounting error: {written} written + {len(rejects)} rejected != {total_lines} label lines")
    if len(rejects) > max_reject_fraction * total_lines:
        raise CxrError(
            f"{len(rejects)} of {total_lines} images rejected (> {max_reject_fraction:.0%}): is the dataset root "
            f"{root} right? First reasons: " + "; ".join(r["reason"] for r in rejects[:3])
        )
    tmp = out_dir / (SUMMARY_NAME + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / SUMMARY_NAME)
    return summary
