"""The on-disk contract between the shard stage and everything downstream.

A variant directory (`shards/plain/`, `shards/equalized/`) holds WebDataset tar
shards named `{split}-{NNNNNN}.tar` and one `summary.json`. Each sample has
`__key__` (our own, dot-free), `png` (1-channel uint8 image), `cls` (b"0"
negative, b"1" positive) and `json` (provenance, sorted keys).

This module is the format's one owner: it writes the shards (`ShardWriter`, for
the shard stage and the test fixtures alike), and the training and evaluation
reader (train/data.py) decodes samples and summaries through it. It stays free
of torch, and imports webdataset only to write, since the shard stage's pool
workers import it.

A variant's location is a local folder or a URL (pipeline/locations.py):
summary.json is read from that same place, and every shard is checked against
the sha256 the summary lists before any of its samples is used, so a shard
altered in storage or in transit is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import struct
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyspng
from tqdm import tqdm

from pipeline.errors import CxrError
from pipeline.fileio import atomic_output, atomic_write_json, sha256_file
from pipeline.locations import is_url, join_location, read_bytes, read_shard
from pipeline.names import VARIANTS
from pipeline.params import INPUT_SIZE_RANGE, MAX_RECORDED_COUNT

CLASS_NAMES = ("negative", "positive")
SPLITS = ("train", "val", "test")
SUMMARY_NAME = "summary.json"
SAMPLE_FIELDS = ("png", "cls", "json")

# Each shard PNG is encoded once and decoded every epoch, so both ends count.
# Measured on covidx-mini (equalized 224x224): the "up" filter with Huffman-only
# coding encodes in 0.41 ms and decodes in 0.36 ms, against 1.1 and 0.59 ms for
# OpenCV's level-1 default (adaptive filters + LZ77), with smaller files (29 vs
# 31 KB): LZ77 finds almost nothing to match in radiograph noise.
PNG_PARAMS = [
    cv2.IMWRITE_PNG_COMPRESSION, 1,
    cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
    cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP,
]  # fmt: skip


# Reads are bounded by bytes before anything is kept in memory: a summary (16k images list in
# well under 1 MB) and a shard, whose bound follows from the params the shard stage wrote it with.
MAX_SUMMARY_BYTES = 64 * 2**20
# The shard stage rolls a shard over before its counted bytes pass shard.max_bytes, except that a
# shard's first sample is always written, so one sample may exceed it alone. A sample is its PNG
# (at most 2 x size^2 bytes for a size x size uint8 image, whatever zlib does), a small JSON, and
# tar's 512-byte header plus padding for each of its 3 members; the archive is padded to 10 KiB.
TAR_ALLOWANCE_PER_SAMPLE = 16 * 1024
TAR_SLACK = 2**20
# Summaries that do not record the bounds (older ones, hand-made fixtures) get this one.
MAX_SHARD_BYTES_UNRECORDED = 2**30

# Fixed tar metadata: with the default (current time) every run would produce
# different bytes and DVC could never recognise an unchanged output.
TAR_MTIME = 0

REJECTS_NAME = "rejects.json"  # written instead of the summary when too many images are rejected
# Every name the shard stage writes in a variant folder, and so the only names it may delete there.
OWN_NAMES = (re.compile(rf"(?:{'|'.join(SPLITS)})-\d{{6}}\.tar"), re.compile(re.escape(SUMMARY_NAME)),
             re.compile(re.escape(REJECTS_NAME)))  # fmt: skip


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W) preprocessed image -> the PNG bytes stored in a shard."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise CxrError(f"a shard image must be uint8 (H, W), got {image.dtype} {image.shape}")
    ok, png = cv2.imencode(".png", image, PNG_PARAMS)
    if not ok:  # pragma: no cover - encoding a valid uint8 array does not fail
        raise CxrError("PNG encoding failed")
    return png.tobytes()


class ShardWriter:
    """One split's shards: rolls over to a new tar when the count or byte bound is reached.

    The one writer of the format, for the shard stage and the tests alike: fixed tar metadata
    (TAR_MTIME, owner and group "cxr"), each tar under a temp name until complete, and its
    name, count and sha256 recorded for the summary (`close()` returns them in write order).
    """

    def __init__(self, out_dir: Path, split: str, max_count: int, max_bytes: int):
        self.out_dir, self.split = out_dir, split
        self.max_count, self.max_bytes = max_count, max_bytes
        self.shards: list[dict[str, Any]] = []
        self._writer = None  # webdataset.TarWriter
        self._stream = None
        self._count = self._bytes = 0

    def write(self, sample: dict[str, Any], size: int) -> None:
        if self._writer is None or self._count >= self.max_count or self._bytes + size > self.max_bytes:
            self._finish()
            self._open()
        try:
            self._writer.write(sample)
        except OSError as exc:  # a full disk mid-shard: one clean line; abort() then removes the temp file
            raise CxrError(f"cannot write {self.out_dir / self.shards[-1]['name']}: {exc.strerror or exc}") from None
        self._count += 1
        self._bytes += size

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._commit = contextlib.ExitStack()
        self._stream = self._commit.enter_context(atomic_output(self.out_dir / name))
        # Imported here: the shard stage's pool workers import this module and never write a tar.
        import webdataset as wds

        self._writer = wds.TarWriter(self._stream, mtime=TAR_MTIME, user="cxr", group="cxr")
        self.shards.append({"name": name, "count": 0})
        self._count = self._bytes = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()  # the tar trailer; the stream is the commit's, closed by it
        self._commit.close()  # fsync + rename to the final name
        name = self.shards[-1]["name"]
        self.shards[-1]["count"] = self._count
        self.shards[-1]["sha256"] = sha256_file(self.out_dir / name)
        self._writer = None

    def close(self) -> list[dict[str, Any]]:
        self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temp file goes); finished shards stay, a rerun rewrites them."""
        if self._writer is not None:
            with contextlib.suppress(OSError, ValueError):  # close the tar now, not in a __del__ after the file went
                self._writer.close()
            self._commit.__exit__(CxrError, CxrError("aborted"), None)
            self._writer = None



def encode_sample(key: str, png: bytes, label: int, meta: dict[str, Any]) -> dict[str, Any]:
    """One shard sample, as webdataset's TarWriter takes it (every field already bytes)."""
    if "." in key:  # webdataset splits a member name at its first dot into key and field
        raise CxrError(f"sample key {key!r} must not contain a dot")
    if isinstance(label, bool) or label not in (0, 1):  # str(True) would be written as b"True"
        raise CxrError(f"sample {key}: label {label!r} is not 0 or 1")
    return {
        "__key__": key,
        "png": png,
        "cls": str(label).encode(),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_GREY = 0  # IHDR colour type of a greyscale image without alpha


def png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from a PNG's IHDR, or None when it has none.

    Read from the first 26 bytes, so a shard image is checked against its summary before
    libspng allocates what its header claims (a 20000 x 20000 image would take 400 MB)."""
    if len(data) < 26 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


def check_png_header(data: bytes, size: int, where: str) -> None:
    """A shard image must be the summary's size x size, 8-bit grey, as the shard stage writes it."""
    header = png_header(data)
    if header is None:
        raise CxrError(f"{where}: png is not a 1-channel 8-bit image (no PNG header)")
    width, height, depth, colour = header
    if (width, height, depth, colour) != (size, size, 8, PNG_GREY):
        raise CxrError(f"{where}: png is {width}x{height}, bit depth {depth}, colour type {colour}: not a 1-channel "
                       f"8-bit image of the summary's size; the summary's images are {size}x{size}")


def decode_sample(sample: dict[str, Any], size: int | None = None) -> dict[str, Any]:
    """A sample as read from a tar -> {"key", "image": uint8 (H, W), "label", "meta"}.

    With `size` (the summary's preprocess size) the PNG's header is checked first and an image
    of another size, depth or mode is refused undecoded. The PNG is decoded as stored
    (webdataset's "pil" decoders return RGB, 3x the bytes for nothing), with libspng, as the
    shard stage reads PNGs: faster than OpenCV's libpng.
    """
    key = sample.get("__key__", "?")
    url = sample.get("__url__", "?")
    missing = [k for k in SAMPLE_FIELDS if k not in sample]
    if missing:
        raise CxrError(f"{url}: sample {key} lacks {missing}")
    if size is not None:
        check_png_header(sample["png"], size, f"{url}: sample {key}")
    try:
        img = pyspng.load(sample["png"])
    except Exception:  # libspng reports a corrupt PNG as a plain RuntimeError
        img = None
    if img is None or img.ndim != 2 or img.dtype != np.uint8:
        raise CxrError(f"{url}: sample {key}: png is not a 1-channel 8-bit image")
    try:
        label = int(sample["cls"])
        meta = json.loads(sample["json"])
    except (ValueError, TypeError) as exc:
        raise CxrError(f"{url}: sample {key}: unreadable cls/json field ({exc})") from None
    if label not in (0, 1):
        raise CxrError(f"{url}: sample {key}: label {label} is not 0 or 1")
    if not isinstance(meta, dict):
        raise CxrError(f"{url}: sample {key}: json is a {type(meta).__name__}, not an object")
    return {"key": key, "image": img, "label": label, "meta": meta}


@dataclass(frozen=True)
class SplitInfo:
    count: int
    class_counts: dict[str, int]
    shards: list[dict[str, Any]]  # [{"name": ..., "count": ..., "sha256": ...}] in write order


@dataclass(frozen=True)
class ShardSummary:
    location: str  # a local folder or a URL, as given
    variant: str
    splits: dict[str, SplitInfo]
    preprocess: dict[str, Any]
    raw: dict[str, Any]

    @property
    def image_size(self) -> int:
        """Every stored image is image_size x image_size (checked by read_summary)."""
        return self.preprocess["size"]

    @property
    def shard_byte_limit(self) -> int:
        """The most bytes any shard of this variant can hold, from the bounds it was written with."""
        params, size = self.raw["params"], self.preprocess.get("size")
        if "max_bytes" not in params or "max_count" not in params or not (_is_count(size) and size > 0):
            return MAX_SHARD_BYTES_UNRECORDED
        one_sample = 2 * size * size + TAR_ALLOWANCE_PER_SAMPLE
        return max(params["max_bytes"], one_sample) + params["max_count"] * TAR_ALLOWANCE_PER_SAMPLE + TAR_SLACK

    def shard_paths(self, split: str) -> list[str]:
        """Where the split's shards are: local paths or URLs, in write order."""
        return [join_location(self.location, s["name"]) for s in self.split(split).shards]

    def shard_sha256(self) -> dict[str, str]:
        """{shard path or URL: sha256 the shard stage recorded}, over every split."""
        return {
            join_location(self.location, s["name"]): s["sha256"] for info in self.splits.values() for s in info.shards
        }

    def split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise CxrError(f"{self.location}: no split {split!r} (have {sorted(self.splits)})")
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
            raise CxrError(f"{self.location}: split {split!r} lacks a class: counts {dict(zip(CLASS_NAMES, counts))}")
        return [total / (len(CLASS_NAMES) * c) for c in counts]


def _shard_pngs(summary: ShardSummary, path: str, sha256: dict[str, str]) -> Iterator[tuple[str, tarfile.TarFile, Any]]:
    source = ({"fileobj": io.BytesIO(read_shard(path, sha256[path], summary.shard_byte_limit))}
              if is_url(path) else {"name": path})  # fmt: skip
    with tarfile.open(**source) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if ext == "png":
                yield key, tar, member


def _decode_png(tar: tarfile.TarFile, member: Any) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(tar.extractfile(member).read(), np.uint8), cv2.IMREAD_GRAYSCALE)


def shard_images(location: Path | str, keys: set[str]) -> dict[str, np.ndarray]:
    """The stored 224x224 images of `keys` from a variant's tars (the format of pipeline.shard_format),
    in a folder or at a URL (a shard from a URL is checked against its sha256 before it is opened)."""
    summary = read_summary(location)
    sha256 = summary.shard_sha256()
    found: dict[str, np.ndarray] = {}
    paths = [path for split in SPLITS for path in summary.shard_paths(split)]
    for path in tqdm(paths, desc=f"read {summary.variant} shards", unit="shard", leave=False, disable=len(paths) < 8):
        if len(found) < len(keys):  # stop reading once every key is found
            for key, tar, member in _shard_pngs(summary, path, sha256):
                if key in keys:
                    found[key] = _decode_png(tar, member)
    return found


def head_images(location: Path | str, per_split: int) -> dict[str, np.ndarray]:
    """The first `per_split` stored images of each split (or all a split holds), in shard order.

    Reads only the leading shards of each split, so the cost does not grow with the dataset.
    Shards are written in a seeded shuffle, so these are a random draw of each split.
    """
    summary = read_summary(location)
    sha256 = summary.shard_sha256()
    found: dict[str, np.ndarray] = {}
    for split in SPLITS:
        taken = 0
        for path in summary.shard_paths(split):
            if taken >= per_split:
                break
            for key, tar, member in _shard_pngs(summary, path, sha256):
                found[key] = _decode_png(tar, member)
                taken += 1
                if taken >= per_split:
                    break
    return found


def split_record(shards: list[dict[str, Any]], class_counts: dict[str, int]) -> dict[str, Any]:
    """A split's entry in the summary; `shards` as [{"name", "count", "sha256"}] in write order."""
    return {
        "count": sum(s["count"] for s in shards),
        "class_counts": {name: int(class_counts.get(name, 0)) for name in CLASS_NAMES},
        "shards": shards,
    }


def make_summary(
    *,
    variant: str,
    root: str,
    splits: dict[str, dict[str, Any]],
    params: dict[str, Any],
    label_lines: int,
    rejects: list[dict[str, Any]],
    patient_overlap: dict[str, Any],
    leaks: list[dict[str, Any]],
) -> dict[str, Any]:
    """The summary.json document; `params` holds at least {"preprocess": {...}, "seed": int}."""
    return {
        "variant": variant,
        "root": root,
        "counts": {split: info["count"] for split, info in splits.items()},
        "splits": splits,
        "params": params,
        "label_lines": label_lines,
        "reject_count": len(rejects),
        "rejects": rejects,
        "label_file_patient_overlap": patient_overlap,
        "leak_count": len(leaks),
        "leaks": leaks,
    }


def write_summary(directory: Path | str, summary: dict[str, Any]) -> Path:
    """Write DIRECTORY/summary.json atomically (sorted keys: the same summary gives the same bytes)."""
    path = Path(directory) / SUMMARY_NAME
    atomic_write_json(path, summary, indent=1)
    return path


def read_summary(location: Path | str) -> ShardSummary:
    """The variant at a local folder or URL (its summary.json, read from the same place), validated
    (types, bounds, safe shard names, a sha256 per shard) before anything uses it."""
    location = str(location).rstrip("/") if is_url(location) else str(location)
    path = join_location(location, SUMMARY_NAME)
    if not is_url(location) and not Path(path).is_file():
        raise CxrError(f"no shard summary at {path}: run the shard stage first (dvc repro shard)")
    try:
        raw = json.loads(read_bytes(path, MAX_SUMMARY_BYTES))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise CxrError(f"{path} is not a readable shard summary: {exc}") from None
    splits = _check_summary(raw, path)
    return ShardSummary(
        location=location, variant=raw["variant"], splits=splits, preprocess=raw["params"]["preprocess"], raw=raw
    )


MAX_SAMPLES = MAX_RECORDED_COUNT  # params.yaml's shard bounds are held to it too
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SAMPLES


def _check_summary(raw: Any, path: str) -> dict[str, SplitInfo]:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CxrError(f"{path}: invalid shard summary: {what}")

    need(isinstance(raw, dict), "not a JSON object")
    need(raw.get("variant") in VARIANTS, f"variant must be one of {list(VARIANTS)}")
    need(isinstance(raw.get("params"), dict) and isinstance(raw["params"].get("preprocess"), dict),
         "params.preprocess missing")  # fmt: skip
    for bound in ("max_bytes", "max_count"):  # they bound every shard read: positive counts or absent
        need(bound not in raw["params"] or (_is_count(raw["params"][bound]) and raw["params"][bound] > 0),
             f"params.{bound} must be a positive count")  # fmt: skip
    size = raw["params"]["preprocess"].get("size")
    need(_is_count(size) and 0 < size <= INPUT_SIZE_RANGE[1],
         f"params.preprocess.size must be an integer in [1, {INPUT_SIZE_RANGE[1]}]")  # fmt: skip
    max_count = raw["params"].get("max_count")
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
            # the shard stage rolls over at max_count: a larger count is a summary that lies
            need(max_count is None or shard["count"] <= max_count,
                 f"{name}.shards[{index}].count {shard['count']} exceeds params.max_count {max_count}")  # fmt: skip
            need(isinstance(shard.get("sha256"), str) and bool(_SHA256.fullmatch(shard["sha256"])),
                 f"{name}.shards[{index}].sha256 must be 64 hex digits")  # fmt: skip
        need(sum(s["count"] for s in shards) == info["count"], f"{name}: shard counts do not add up to its count")
        splits[name] = SplitInfo(count=info["count"], class_counts=counts, shards=shards)
    return splits


def verify_shards(location: Path | str) -> dict[str, Any]:
    """Check every shard of a variant (folder or URL) against the sha256 in its summary; CxrError names the bad."""
    summary = read_summary(location)
    limit = summary.shard_byte_limit
    bad, checked = [], 0
    for split in summary.splits:
        for shard in summary.split(split).shards:
            where = join_location(summary.location, shard["name"])
            if is_url(where):
                try:
                    found = hashlib.sha256(read_bytes(where, limit)).hexdigest()
                except CxrError:
                    found = "missing"
            else:
                found = sha256_file(where) if Path(where).is_file() else "missing"
            checked += 1
            if found != shard["sha256"]:
                bad.append(shard["name"] + (" (missing)" if found == "missing" else ""))
    if bad:
        raise CxrError(f"{summary.location}: {len(bad)} of {checked} shard(s) do not match the summary's sha256: "
                       + ", ".join(bad[:5]))  # fmt: skip
    return {"shards": checked, "ok": True, "variant": summary.variant}


def audit_shards(summary: ShardSummary) -> dict[str, dict[str, int]]:
    """What every shard of the variant holds, checked against its summary before the summary is used.

    The summary's counts drive the steps per epoch and the class weights, and its splits are
    assumed disjoint, so none is believed on its word: each shard is read (sha256-checked, as
    the reader does), its members are walked, each sample's `cls` is counted and its PNG's
    header checked, and a key seen twice (in a split or across splits) is an error. No PNG is
    decoded and each shard is read once, so the pass costs about one read and hash of the
    shards (a fraction of one epoch) and its memory is one shard plus the keys.
    Returns {split: {class name: count}}, equal to the summary's (it raises otherwise).
    """
    owner: dict[str, str] = {}  # key -> the shard it was first seen in
    held: dict[str, dict[str, int]] = {}
    for split in (name for name in SPLITS if name in summary.splits):
        info = summary.splits[split]
        counts: Counter[str] = Counter()
        for shard in info.shards:
            path = join_location(summary.location, shard["name"])
            data = read_shard(path, shard["sha256"], summary.shard_byte_limit)
            fields: dict[str, set[str]] = {}
            try:
                with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        folder, _, base = member.name.rpartition("/")
                        stem, _, field = base.partition(".")  # webdataset's key: up to the name's first dot
                        key = f"{folder}/{stem}" if folder else stem
                        if field not in SAMPLE_FIELDS:
                            continue
                        seen = fields.setdefault(key, set())
                        if not seen and key in owner:
                            raise CxrError(f"{summary.location}: key {key} is in {owner[key]} and again in "
                                           f"{shard['name']}: a sample is counted once, in one split")  # fmt: skip
                        if field in seen:
                            raise CxrError(f"{path}: sample {key} has two {field} members")
                        seen.add(field)
                        owner.setdefault(key, shard["name"])
                        if field == "png":
                            check_png_header(tar.extractfile(member).read(26), summary.image_size, f"{path}: sample {key}")
                        elif field == "cls":
                            label = tar.extractfile(member).read(8)
                            if label not in (b"0", b"1"):
                                raise CxrError(f"{path}: sample {key}: label {label!r} is not 0 or 1")
                            counts[CLASS_NAMES[int(label)]] += 1
            except tarfile.TarError as exc:
                raise CxrError(f"{path}: not a readable tar ({exc})") from None
            lacking = next((k for k, f in fields.items() if len(f) < len(SAMPLE_FIELDS)), None)
            if lacking is not None:
                raise CxrError(f"{path}: sample {lacking} lacks {sorted(set(SAMPLE_FIELDS) - fields[lacking])}")
            if len(fields) != shard["count"]:
                raise CxrError(f"{path}: {shard['name']} holds {len(fields)} samples, the summary lists "
                               f"{shard['count']}; refusing the summary")  # fmt: skip
        held[split] = {name: counts[name] for name in CLASS_NAMES}
        listed = {name: info.class_counts.get(name, 0) for name in CLASS_NAMES}
        if held[split] != listed:
            raise CxrError(f"{summary.location}: split {split} holds {held[split]}, the summary lists {listed}; "
                           "refusing the summary")
    return held
