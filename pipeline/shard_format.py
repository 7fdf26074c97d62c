"""The on-disk contract between the shard stage and everything downstream.

A variant directory (`shards/plain/`, `shards/equalized/`) holds WebDataset tar
shards named `{split}-{NNNNNN}.tar` and one `summary.json`. Each sample has
`__key__` (our own, dot-free), `png` (1-channel uint8 image), `cls` (0 negative,
1 positive) and `json` (provenance). `train/` imports this module and nothing
else from the data side except the params types.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import CxrError

CLASS_NAMES = ("negative", "positive")
SPLITS = ("train", "val", "test")
SUMMARY_NAME = "summary.json"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


@dataclass(frozen=True)
class SplitInfo:
    count: int
    class_counts: dict[str, int]
    shards: list[dict[str, Any]]  # [{"name": ..., "count": ..., "sha256": ...}] in write order


@dataclass(frozen=True)
class ShardSummary:
    directory: Path
    variant: str
    splits: dict[str, SplitInfo]
    preprocess: dict[str, Any]
    raw: dict[str, Any]

    def shard_paths(self, split: str) -> list[str]:
        info = self.split(split)
        return [str(self.directory / s["name"]) for s in info.shards]

    def split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise CxrError(f"{self.directory}: no split {split!r} (have {sorted(self.splits)})")
        return self.splits[split]

    def class_weights(self, split: str = "train") -> list[float]:
        """Per-class loss weights inversely proportional to class frequency.

        Normalised so that a balanced split gets weight 1.0 for both classes
        (w_c = N / (C * N_c)); read from the summary so training never needs a
        counting pass over the data.
        """
        info = self.split(split)
        total = info.count
        counts = [info.class_counts.get(name, 0) for name in CLASS_NAMES]
        if min(counts) == 0:
            raise CxrError(f"{self.directory}: split {split!r} lacks a class: counts {dict(zip(CLASS_NAMES, counts))}")
        return [total / (len(CLASS_NAMES) * c) for c in counts]


def read_summary(directory: Path | str) -> ShardSummary:
    directory = Path(directory)
    path = directory / SUMMARY_NAME
    if not path.is_file():
        raise CxrError(f"no shard summary at {path}: run the shard stage first (dvc repro shard)")
    raw = json.loads(path.read_text())
    splits = {
        name: SplitInfo(count=s["count"], class_counts=s["class_counts"], shards=s["shards"])
        for name, s in raw["splits"].items()
    }
    return ShardSummary(
        directory=directory, variant=raw["variant"], splits=splits, preprocess=raw["params"]["preprocess"], raw=raw
    )
