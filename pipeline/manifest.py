"""Stage `ingest`: label files + image folders -> one manifest with patient-wise splits.

Every label line ends up either in the manifest or in the report's rejects with
its reason, whatever the OS says about the file it names (missing, unreadable,
a folder, a FIFO, a symlink out of the root). Validation is carved from train
by patient (never by image), so no patient we assign can straddle train and val.

Duplicates are found on the normalised relative path and on content (sha256).
Within one label file the later copy is a reject; across label files a shared
image is a leak between splits: every pair is listed in the report, and
`data.leaks` says what happens (report: keep both, so published splits stay
comparable; drop: reject the train/val copy, test stays whole; fail: stop).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import sys
from array import array
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.dicom import image_file_header
from pipeline.errors import CxrError
from pipeline.fileio import atomic_output, atomic_write_text
from pipeline.imageio import Header, ImageRejected
from pipeline.labels import LabelLine, open_inside, parse_label_file
from pipeline.params import DataParams
from pipeline.progress import Progress, bounded_map
from pipeline.rejects import check_reject_fraction
from pipeline.shard_format import CLASS_NAMES, SPLITS

LEAK_POLICIES = ("report", "drop", "fail")


@dataclass(frozen=True)
class ManifestEntry:
    key: str  # our own dot-free sample key, e.g. "train_000123"
    split: str
    path: str  # relative to the dataset root, posix
    label: int
    patient_id: str
    source: str
    filename: str
    sha256: str
    bytes: int
    # Stored size and format from the image header (read without decoding, as
    # the shard stage's decoder sees it); None where the header is unreadable,
    # which the shard stage then records as a reject with the reason.
    width: int | None = None
    height: int | None = None
    format: str | None = None


@dataclass(slots=True)
class _Kept:
    """One label file's lines whose image was read, with each image's content and header figures in columns.

    Ingest holds every image's until the manifest is written. With an object per image (a 64-character
    hex digest, three ints) and a (folder, line) tuple, its traced peak grew 633 bytes an image
    (tracemalloc, 2,000 against 8,000 images); with these columns (32 bytes of digest, 24 of figures,
    a shared format string) and no dict keyed by every image, 273, most of it the label lines.
    """

    lines: list[LabelLine] = field(default_factory=list)
    digests: bytearray = field(default_factory=bytearray)  # sha256, 32 bytes a line
    figures: array = field(default_factory=lambda: array("q"))  # file size, width, height a line; -1: no header
    formats: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.lines)

    def add(self, line: LabelLine, digest: bytes, size: int, header: Header | None) -> None:
        self.lines.append(line)
        self.digests += digest
        # stored size and format (Fig. 1), None when the header is unreadable; the Header itself is not kept
        self.figures.extend((size, -1, -1) if header is None else (size, header.width, header.height))
        self.formats.append(None if header is None else sys.intern(header.format))

    def sha256(self, i: int) -> str:
        return self.digests[32 * i : 32 * i + 32].hex()

    def digest_array(self) -> np.ndarray:
        """The digests as one 32-byte value each (a copy: a view would pin the bytearray's size)."""
        return np.frombuffer(bytes(self.digests), dtype="V32")

    def select(self, keep: np.ndarray) -> _Kept:
        """The lines where the boolean mask `keep` is true, in order."""
        rows = np.flatnonzero(keep)
        figures = np.frombuffer(self.figures, dtype=np.int64).reshape(-1, 3)[rows]
        return _Kept([self.lines[i] for i in rows], bytearray(self.digest_array()[rows].tobytes()),
                     array("q", figures.tobytes()), [self.formats[i] for i in rows])  # fmt: skip

    def entry(self, split: str, idx: int, folder: str, i: int) -> ManifestEntry:
        line = self.lines[i]
        size, width, height = self.figures[3 * i : 3 * i + 3]
        return ManifestEntry(key=f"{split}_{idx:06d}", split=split, path=f"{folder}/{line.filename}", label=line.label,
                             patient_id=line.patient_id, source=line.source, filename=line.filename,
                             sha256=self.sha256(i), bytes=size, width=None if width < 0 else width,
                             height=None if height < 0 else height, format=self.formats[i])  # fmt: skip


def _first_alike(digests: np.ndarray) -> np.ndarray:
    """For each digest, the index of its first occurrence: a stable sort, not a dict keyed by every image."""
    if not len(digests):
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(digests, kind="stable")
    ranked = digests[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    first = np.empty(len(digests), dtype=np.int64)
    first[order] = np.repeat(order[starts], np.diff(np.r_[starts, len(digests)]))
    return first


def hash_inside(root: Path, relative: str) -> tuple[bytes, int, Header | None] | str:
    """(sha256 digest, size, header) of root/relative read through `open_inside`, or the reason it was refused.

    The header is read without decoding; an unreadable one is None here and a
    reject with its reason in the shard stage.
    """
    opened = open_inside(root, relative)
    if isinstance(opened, str):
        return opened
    fd, info = opened
    try:
        with os.fdopen(fd, "rb") as fh:
            # one reused 256 KiB buffer per call: fresh 1 MiB blocks per read made each hashing
            # thread's malloc arena keep several MB, RSS that grew with the largest files seen
            digest = hashlib.file_digest(fh, "sha256")
    except OSError as exc:  # EIO on a bad sector, EACCES on some FUSE mounts: a reject, never a crash
        return f"cannot read {relative}: {exc.strerror or exc}"
    try:
        header = image_file_header(Path(os.path.realpath(Path(root) / relative)))
    except ImageRejected:
        header = None
    return digest.digest(), info.st_size, header


def carve_validation(lines: list[LabelLine], fraction: float, seed: int, exclude: set[str]) -> set[str]:
    """Patients moved from train to val: a seeded, class-stratified fraction of patients.

    Written by hand because scikit-learn's group splitters either ignore the
    class (GroupShuffleSplit) or cannot hit a fraction (StratifiedGroupKFold).
    A patient's class is positive if any of its images is. Patients that the
    label files also put in test are never chosen, so validation stays clean.
    """
    patient_label: dict[str, int] = {}
    for line in lines:
        patient_label[line.patient_id] = max(patient_label.get(line.patient_id, 0), line.label)
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for cls in (0, 1):
        candidates = sorted(p for p, lab in patient_label.items() if lab == cls and p not in exclude)
        if len(candidates) < 2:
            continue
        take = max(1, int(round(fraction * len(candidates))))
        order = rng.permutation(len(candidates))[:take]
        chosen.update(candidates[i] for i in order)
    return chosen


def _parse_split(root: Path, split: str, label_file: str, rejects: list[dict[str, Any]]) -> tuple[int, list[LabelLine]]:
    """One label file -> (its line count, its parsed lines without repeated filenames); the rest are rejects."""
    lines, bad = parse_label_file(root / label_file)
    rejects += [{"split": split, "line": r.line_no, "text": r.text, "reason": r.reason} for r in bad]
    by_name: dict[str, int] = {}
    unique = []
    for line in lines:
        if line.filename in by_name:
            reason = f"duplicate filename in {label_file} (same as line {by_name[line.filename]})"
            rejects.append({"split": split, "line": line.line_no, "filename": line.filename, "reason": reason})
            continue
        by_name[line.filename] = line.line_no
        unique.append(line)
    return len(lines) + len(bad), unique


def _hash_split(root: Path, split: str, label_file: str, unique: list[LabelLine], pool: ThreadPoolExecutor,
                rejects: list[dict[str, Any]], show_progress: bool) -> _Kept:  # fmt: skip
    """The lines whose image (under ROOT/<split>/) is readable and not a content duplicate within the file."""
    kept = _Kept()
    refused: list[dict[str, Any]] = []
    # 32 files in flight keep the (at most 8) hashing threads busy without a future per image
    results = bounded_map(pool, lambda l: hash_inside(root, f"{split}/{l.filename}"), unique, ahead=32)
    progress = Progress(len(unique), f"ingest {split}", enabled=show_progress)
    for line, hashed in zip(unique, results):
        progress.update()
        if isinstance(hashed, str):
            refused.append({"split": split, "line": line.line_no, "filename": line.filename, "reason": hashed})
        else:
            kept.add(line, *hashed)
    progress.close()
    first = _first_alike(kept.digest_array())
    copies = np.flatnonzero(first != np.arange(len(kept)))
    duplicates = [{"split": split, "line": kept.lines[i].line_no, "filename": kept.lines[i].filename,
                   "reason": f"duplicate image in {label_file}: same content (sha256) as line "
                             f"{kept.lines[first[i]].line_no} ({kept.lines[first[i]].filename})"}
                  for i in copies]  # fmt: skip
    rejects += heapq.merge(refused, duplicates, key=lambda r: r["line"])  # in line order, as the file reads
    return kept.select(first == np.arange(len(kept))) if duplicates else kept


def label_files(root: Path, data: DataParams) -> dict[str, str]:
    """split -> label file name in ROOT, for the splits present (val only when its file exists and is asked for)."""
    names = data.labels
    missing = [n for n in (names.train, names.test) if not (root / n).is_file()]
    if missing:
        found = sorted(p.name for p in root.glob("*.txt"))[:10] if root.is_dir() else []
        raise CxrError(f"{root} is not a COVIDx-layout root: no {' or '.join(missing)} (label files there: "
                       f"{', '.join(found) or 'none'}); name them with -S data.labels.train=... "
                       f"-S data.labels.test=... (README, Your data)")  # fmt: skip
    files = {"train": names.train}
    if names.val is not None and (root / names.val).is_file():
        files["val"] = names.val
    files["test"] = names.test
    return files


def found_table(files: dict[str, str], lines: dict[str, list[LabelLine]], val_carved: bool) -> str:
    """What the label files hold, printed before the long hashing part: one short row per split."""
    rows = [f"{'split':<6} {'label file':<28} {'images':>8} {'patients':>9}  classes / sources"]
    for split, name in files.items():
        classes = Counter(CLASS_NAMES[line.label] for line in lines[split])
        sources = Counter(line.source for line in lines[split])
        shown = ", ".join(f"{s} {n:,}" for s, n in sorted(sources.items(), key=lambda kv: (-kv[1], kv[0]))[:5])
        more = f" (+{len(sources) - 5} more)" if len(sources) > 5 else ""
        rows.append(f"{split:<6} {name:<28} {len(lines[split]):>8,} {len({l.patient_id for l in lines[split]}):>9,}  "
                    f"{', '.join(f'{c} {n:,}' for c, n in sorted(classes.items()))} / {shown}{more}")  # fmt: skip
    if val_carved:
        rows.append("val    carved from train by patient (data.val_fraction)")
    return "\n".join(rows)


def find_leaks(parsed: dict[str, _Kept]) -> list[dict[str, Any]]:
    """Every pair of lines in different label files that name the same image (path or content).

    Within a label file content and name are unique by now, so each line of a later file meets at
    most one line of an earlier one; content is matched in sorted digests, names in a set of the
    later file's, so no dict is keyed by every image of the largest file.
    """
    leaks = []
    splits = list(parsed)
    for i, a in enumerate(splits):
        ka = parsed[a]
        digests = ka.digest_array()
        order = np.argsort(digests)
        ranked = digests[order]
        for b in splits[i + 1 :]:
            kb = parsed[b]
            theirs = kb.digest_array()
            at = np.minimum(np.searchsorted(ranked, theirs), max(0, len(ranked) - 1))
            same = ranked[at] == theirs if len(ranked) else np.zeros(len(kb), dtype=bool)
            wanted = {line.filename for line in kb.lines}
            named = {line.filename: n for n, line in enumerate(ka.lines) if line.filename in wanted}
            for j, line in enumerate(kb.lines):
                if same[j]:
                    leaks.append(_leak(a, ka, int(order[at[j]]), b, kb, j, "same content (sha256)"))
                elif line.filename in named:  # same name, different bytes: still worth a look
                    leaks.append(_leak(a, ka, named[line.filename], b, kb, j, "same filename"))
    return leaks


def _leak(a: str, ka: _Kept, i: int, b: str, kb: _Kept, j: int, why: str) -> dict[str, Any]:
    x, y = ka.lines[i], kb.lines[j]
    return {"why": why, a: {"line": x.line_no, "filename": x.filename, "patient_id": x.patient_id},
            b: {"line": y.line_no, "filename": y.filename, "patient_id": y.patient_id},
            "splits": [a, b], "sha256": kb.sha256(j) if why.startswith("same content") else None}  # fmt: skip


def _apply_leak_policy(parsed: dict[str, _Kept], leaks: list[dict[str, Any]], policy: str,
                       rejects: list[dict[str, Any]]) -> None:  # fmt: skip
    if policy not in LEAK_POLICIES:
        raise CxrError(f"data.leaks must be one of {list(LEAK_POLICIES)}, got {policy!r}")
    if not leaks or policy == "report":
        return
    if policy == "fail":
        first = leaks[0]
        a, b = first["splits"]
        raise CxrError(f"{len(leaks)} image(s) shared between label files (data.leaks: fail), first: "
                       f"{a}/{first[a]['filename']} and {b}/{first[b]['filename']} ({first['why']})")  # fmt: skip
    # drop: the copy in the earlier split (train before val before test) goes, so test stays whole
    drop = {(leak["splits"][0], leak[leak["splits"][0]]["line"]): leak for leak in leaks}
    for split, kept in parsed.items():
        keep = np.ones(len(kept), dtype=bool)
        for i, line in enumerate(kept.lines):
            leak = drop.get((split, line.line_no))
            if leak is None:
                continue
            keep[i] = False
            other = leak["splits"][1]
            reason = f"leak dropped (data.leaks: drop): {leak['why']} as {other}/{leak[other]['filename']}"
            rejects.append({"split": split, "line": line.line_no, "filename": line.filename, "reason": reason})
        if not keep.all():
            parsed[split] = kept.select(keep)


def build_manifest(
    root: Path,
    manifest_path: Path,
    report_path: Path,
    data: DataParams,
    seed: int,
    show_progress: bool = False,
    announce: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """ROOT's label files -> the manifest and the ingest report (params: data.labels, data.val_fraction,
    data.max_reject_fraction, data.leaks and seed; ROOT is passed, data.root is only the CLI's default).

    `announce` gets the table of what the label files hold before any image is hashed.
    """
    root = Path(root)
    val_fraction, leaks = data.val_fraction, data.leaks
    files = label_files(root, data)
    present = list(files)

    rejects: list[dict[str, Any]] = []
    total_lines = 0
    named: dict[str, list[LabelLine]] = {}
    line_rejects: dict[str, list[dict[str, Any]]] = {split: [] for split in files}  # kept in file order, as before
    for split, name in files.items():
        count, named[split] = _parse_split(root, split, name, line_rejects[split])
        total_lines += count
    if announce is not None:
        announce(found_table(files, named, "val" not in files))
    parsed: dict[str, _Kept] = {}
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:  # hashing is I/O + GIL-free
        for split, name in files.items():
            rejects += line_rejects[split]
            parsed[split] = _hash_split(root, split, name, named.pop(split), pool, rejects, show_progress)
    leak_pairs = find_leaks(parsed)
    report: dict[str, Any] = {"root": str(root), "label_files": present, "lines": total_lines,
                              "leak_policy": leaks, "leak_count": len(leak_pairs), "leaks": leak_pairs}  # fmt: skip
    try:
        _apply_leak_policy(parsed, leak_pairs, leaks, rejects)
    except CxrError as exc:
        _write_failed(report_path, report, rejects, str(exc))
        raise

    # patient sets of the later label files only (present[0] is train, the largest): train is walked
    later = {split: {line.patient_id for line in parsed[split].lines} for split in present[1:]}
    label_overlap = {}
    for i, a in enumerate(present):
        for b in present[i + 1 :]:
            shared = sorted({line.patient_id for line in parsed[a].lines if line.patient_id in later[b]})
            if shared:
                label_overlap[f"{a}/{b}"] = shared
    # split -> (its images' folder, the label file's kept lines, which of them): the folder is the
    # label file's, and carved val is a selection of train's lines, not a second copy of them
    assigned: dict[str, tuple[str, _Kept, np.ndarray]]
    if "val" in present:
        assigned = {split: (split, parsed[split], np.arange(len(parsed[split]))) for split in present}
        val_patients = later["val"]
    else:
        train = parsed["train"]
        val_patients = carve_validation(train.lines, val_fraction, seed, exclude=later["test"])
        in_val = np.fromiter((line.patient_id in val_patients for line in train.lines), dtype=bool, count=len(train))
        assigned = {"train": ("train", train, np.flatnonzero(~in_val)), "val": ("train", train, np.flatnonzero(in_val)),
                    "test": ("test", parsed["test"], np.arange(len(parsed["test"])))}  # fmt: skip
    del parsed, later

    accepted = sum(len(rows) for _, _, rows in assigned.values())
    counts = {split: dict(Counter(CLASS_NAMES[kept.lines[i].label] for i in rows))
              for split, (_, kept, rows) in ((s, assigned[s]) for s in SPLITS)}  # fmt: skip
    report |= {
        "accepted": accepted,
        "counts": counts,
        "val_source": files["val"] if "val" in present else f"carved from train by patient ({val_fraction:.0%}, seed {seed})",
        "val_patients": len(val_patients),
        "label_file_patient_overlap": {k: {"count": len(v), "patients": v[:50]} for k, v in label_overlap.items()},
        "cross_split_duplicate_images": sum(1 for leak in leak_pairs if leak["sha256"]),
    }
    if accepted + len(rejects) != total_lines:  # the no-silent-drop invariant
        raise CxrError(f"accounting error: {accepted} accepted + {len(rejects)} rejected != {total_lines} lines")
    check_reject_fraction(rejects, total_lines, data.max_reject_fraction, "label lines", root,
                          lambda message: _write_failed(report_path, report, rejects, message))  # fmt: skip
    with atomic_output(manifest_path) as out:  # a line at a time: the whole text was ~0.8 kB per image at once
        for split in SPLITS:
            folder, kept, rows = assigned[split]
            for idx, i in enumerate(rows):
                out.write((json.dumps(asdict(kept.entry(split, idx, folder, int(i))), sort_keys=True) + "\n").encode("utf-8"))
    atomic_write_text(report_path, json.dumps(report | _rejects(rejects), indent=1, sort_keys=True) + "\n")
    return {k: report[k] for k in ("root", "lines", "accepted", "counts", "val_source", "leak_count")} | {
        "reject_count": len(rejects),
        "label_file_patient_overlap": {k: v["count"] for k, v in report["label_file_patient_overlap"].items()},
    }


def _rejects(rejects: list[dict[str, Any]]) -> dict[str, Any]:
    return {"reject_count": len(rejects), "rejects": rejects}


def _write_failed(report_path: Path, report: dict[str, Any], rejects: list[dict[str, Any]], message: str) -> Path:
    """The evidence of a failed run: the full rejects list, so the user can fix the data, not guess."""
    failed = report | _rejects(rejects) | {"failed": message}
    atomic_write_text(report_path, json.dumps(failed, indent=1, sort_keys=True) + "\n")
    return report_path




def iter_manifest(path: Path) -> Iterator[ManifestEntry]:
    """The manifest's entries one line at a time: a reader that keeps one split need not hold them all."""
    if not path.is_file():
        raise CxrError(f"manifest not found: {path} (run the ingest stage first)")
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield ManifestEntry(**json.loads(line))


def read_manifest(path: Path) -> list[ManifestEntry]:
    return list(iter_manifest(path))
