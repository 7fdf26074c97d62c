"""The on-disk contract between the shard stage and everything downstream.

A variant directory (`shards/plain/`, `shards/equalized/`) holds WebDataset tar
shards named `{split}-{NNNNNN}.tar` and one `summary.json`. Each sample has
`__key__` (our own, dot-free), `png` (1-channel uint8 image), `cls` (0 negative,
1 positive) and `json` (provenance). `train/` imports this module and nothing
else from the data side except the params types.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import CxrError
from pipeline.fileio import sha256_file
from pipeline.params import VARIANTS

CLASS_NAMES = ("negative", "positive")
SPLITS = ("train", "val", "test")
SUMMARY_NAME = "summary.json"


REJECTS_NAME = "rejects.json"  # written instead of the summary when too many images are rejected
# Every name the shard stage writes in a variant folder, and so the only names it may delete there.
OWN_NAMES = (re.compile(rf"(?:{'|'.join(SPLITS)})-\d{{6}}\.tar"), re.compile(re.escape(SUMMARY_NAME)),
             re.compile(re.escape(REJECTS_NAME)))  # fmt: skip


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
    """The variant folder's summary, validated (types, bounds, safe shard names) before anything uses it."""
    directory = Path(directory)
    path = directory / SUMMARY_NAME
    if not path.is_file():
        raise CxrError(f"no shard summary at {path}: run the shard stage first (dvc repro shard)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CxrError(f"{path} is not a readable shard summary: {exc}") from None
    splits = _check_summary(raw, path)
    return ShardSummary(
        directory=directory, variant=raw["variant"], splits=splits, preprocess=raw["params"]["preprocess"], raw=raw
    )


MAX_SAMPLES = 10**9
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SAMPLES


def _check_summary(raw: Any, path: Path) -> dict[str, SplitInfo]:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CxrError(f"{path}: invalid shard summary: {what}")

    need(isinstance(raw, dict), "not a JSON object")
    need(raw.get("variant") in VARIANTS, f"variant must be one of {list(VARIANTS)}")
    need(isinstance(raw.get("params"), dict) and isinstance(raw["params"].get("preprocess"), dict),
         "params.preprocess missing")  # fmt: skip
    need(isinstance(raw.get("splits"), dict) and set(raw["splits"]) <= set(SPLITS), f"splits must be among {SPLITS}")
    splits = {}
    for name, info in raw["splits"].items():
        need(isinstance(info, dict) and _is_count(info.get("count")), f"{name}.count must be a count")
        counts = info.get("class_counts")
        need(isinstance(counts, dict) and set(counts) <= set(CLASS_NAMES) and all(map(_is_count, counts.values()))
             and sum(counts.values()) == info["count"], f"{name}.class_counts must count {CLASS_NAMES} to count")  # fmt: skip
        shards = info.get("shards")
        need(isinstance(shards, list), f"{name}.shards must be a list")
        for index, shard in enumerate(shards):
            need(isinstance(shard, dict) and shard.get("name") == shard_name(name, index),
                 f"{name}.shards[{index}] must be named {shard_name(name, index)}")  # fmt: skip
            need(_is_count(shard.get("count")), f"{name}.shards[{index}].count must be a count")
            need(isinstance(shard.get("sha256"), str) and bool(_SHA256.fullmatch(shard["sha256"])),
                 f"{name}.shards[{index}].sha256 must be 64 hex digits")  # fmt: skip
        need(sum(s["count"] for s in shards) == info["count"], f"{name}: shard counts do not add up to its count")
        splits[name] = SplitInfo(count=info["count"], class_counts=counts, shards=shards)
    return splits


def verify_shards(directory: Path | str) -> dict[str, Any]:
    """Check every shard of a variant folder against the sha256 in its summary; CxrError naming the bad ones."""
    summary = read_summary(directory)
    bad, checked = [], 0
    for split in summary.splits:
        for shard in summary.split(split).shards:
            path = summary.directory / shard["name"]
            found = sha256_file(path) if path.is_file() else "missing"
            checked += 1
            if found != shard["sha256"]:
                bad.append(shard["name"] + (" (missing)" if found == "missing" else ""))
    if bad:
        raise CxrError(f"{summary.directory}: {len(bad)} of {checked} shard(s) do not match the summary's sha256: "
                       + ", ".join(bad[:5]))  # fmt: skip
    return {"shards": checked, "ok": True, "variant": summary.variant}
