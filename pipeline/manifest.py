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
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
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


@dataclass(frozen=True, slots=True)  # one per image until the manifest is written: no __dict__
class _Hashed:
    line: LabelLine
    sha256: str
    bytes: int
    # stored size and format (Fig. 1), None when the header is unreadable; the Header itself is not kept
    width: int | None
    height: int | None
    format: str | None

    @classmethod
    def of(cls, line: LabelLine, sha256: str, size: int, header: Header | None) -> _Hashed:
        if header is None:
            return cls(line, sha256, size, None, None, None)
        return cls(line, sha256, size, header.width, header.height, header.format)


def hash_inside(root: Path, relative: str) -> tuple[str, int, Header | None] | str:
    """(sha256, size, header) of root/relative read through `open_inside`, or the reason it was refused.

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
    return digest.hexdigest(), info.st_size, header


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
                rejects: list[dict[str, Any]], show_progress: bool) -> list[_Hashed]:  # fmt: skip
    """The lines whose image (under ROOT/<split>/) is readable and not a content duplicate within the file."""
    kept: list[_Hashed] = []
    by_hash: dict[str, LabelLine] = {}
    # 32 files in flight keep the (at most 8) hashing threads busy without a future per image
    results = bounded_map(pool, lambda l: hash_inside(root, f"{split}/{l.filename}"), unique, ahead=32)
    progress = Progress(len(unique), f"ingest {split}", enabled=show_progress)
    for line, hashed in zip(unique, results):
        progress.update()
        if isinstance(hashed, str):
            reason = hashed
        elif hashed[0] in by_hash:
            first = by_hash[hashed[0]]
            reason = f"duplicate image in {label_file}: same content (sha256) as line {first.line_no} ({first.filename})"
        else:
            by_hash[hashed[0]] = line
            kept.append(_Hashed.of(line, *hashed))
            continue
        rejects.append({"split": split, "line": line.line_no, "filename": line.filename, "reason": reason})
    progress.close()
    return kept


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


def find_leaks(parsed: dict[str, list[_Hashed]]) -> list[dict[str, Any]]:
    """Every pair of lines in different label files that name the same image (path or content)."""
    leaks = []
    splits = list(parsed)
    for i, a in enumerate(splits):
        names = {h.line.filename: h for h in parsed[a]}
        hashes = {h.sha256: h for h in parsed[a]}
        for b in splits[i + 1 :]:
            for h in parsed[b]:
                other = hashes.get(h.sha256)
                if other is not None:
                    leaks.append(_leak(a, other, b, h, "same content (sha256)"))
                elif h.line.filename in names:  # same name, different bytes: still worth a look
                    leaks.append(_leak(a, names[h.line.filename], b, h, "same filename"))
    return leaks


def _leak(a: str, x: _Hashed, b: str, y: _Hashed, why: str) -> dict[str, Any]:
    return {"why": why, a: {"line": x.line.line_no, "filename": x.line.filename, "patient_id": x.line.patient_id},
            b: {"line": y.line.line_no, "filename": y.line.filename, "patient_id": y.line.patient_id},
            "splits": [a, b], "sha256": y.sha256 if why.startswith("same content") else None}  # fmt: skip


def _apply_leak_policy(parsed: dict[str, list[_Hashed]], leaks: list[dict[str, Any]], policy: str,
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
    for split in parsed:
        keep = []
        for h in parsed[split]:
            leak = drop.get((split, h.line.line_no))
            if leak is None:
                keep.append(h)
                continue
            other = leak["splits"][1]
            reason = f"leak dropped (data.leaks: drop): {leak['why']} as {other}/{leak[other]['filename']}"
            rejects.append({"split": split, "line": h.line.line_no, "filename": h.line.filename, "reason": reason})
        parsed[split] = keep


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
    parsed: dict[str, list[_Hashed]] = {}
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

    patients = {split: {h.line.patient_id for h in parsed[split]} for split in present}
    label_overlap = {
        f"{a}/{b}": sorted(patients[a] & patients[b])
        for i, a in enumerate(present)
        for b in present[i + 1 :]
        if patients[a] & patients[b]
    }
    # (folder, hashed line) per split: what the manifest lines are written from, one at a time
    assigned: dict[str, list[tuple[str, _Hashed]]] = defaultdict(list)
    if "val" in present:
        for split in present:
            assigned[split] = [(split, h) for h in parsed[split]]
        val_patients: set[str] = set()
    else:
        val_patients = carve_validation([h.line for h in parsed["train"]], val_fraction, seed, exclude=patients["test"])
        for h in parsed["train"]:
            assigned["val" if h.line.patient_id in val_patients else "train"].append(("train", h))
        assigned["test"] = [("test", h) for h in parsed["test"]]
    del parsed

    accepted = sum(len(v) for v in assigned.values())
    counts = {split: dict(Counter(CLASS_NAMES[h.line.label] for _, h in assigned.get(split, []))) for split in SPLITS}
    report |= {
        "accepted": accepted,
        "counts": counts,
        "val_source": files["val"] if "val" in present else f"carved from train by patient ({val_fraction:.0%}, seed {seed})",
        "val_patients": len(val_patients) if "val" not in present else len(patients["val"]),
        "label_file_patient_overlap": {k: {"count": len(v), "patients": v[:50]} for k, v in label_overlap.items()},
        "cross_split_duplicate_images": sum(1 for leak in leak_pairs if leak["sha256"]),
    }
    if accepted + len(rejects) != total_lines:  # the no-silent-drop invariant
        raise CxrError(f"accounting error: {accepted} accepted + {len(rejects)} rejected != {total_lines} lines")
    check_reject_fraction(rejects, total_lines, data.max_reject_fraction, "label lines", root,
                          lambda message: _write_failed(report_path, report, rejects, message))  # fmt: skip
    with atomic_output(manifest_path) as out:  # a line at a time: the whole text was ~0.8 kB per image at once
        for split in SPLITS:
            for idx, (folder, h) in enumerate(assigned.get(split, [])):
                out.write((json.dumps(asdict(_entry(split, idx, folder, h)), sort_keys=True) + "\n").encode("utf-8"))
    atomic_write_text(report_path, json.dumps(report | _rejects(rejects), indent=1, sort_keys=True) + "\n")
    return {k: report[k] for k in ("root", "lines", "accepted", "counts", "val_source", "leak_count")} | {
        "reject_count": len(rejects),
        "label_file_patient_overlap": {k: v["count"] for k, v in report["label_file_patient_overlap"].items()},
    }


def _entry(split: str, idx: int, folder: str, h: _Hashed) -> ManifestEntry:
    line = h.line
    return ManifestEntry(key=f"{split}_{idx:06d}", split=split, path=f"{folder}/{line.filename}", label=line.label,
                         patient_id=line.patient_id, source=line.source, filename=line.filename, sha256=h.sha256,
                         bytes=h.bytes, width=h.width, height=h.height, format=h.format)  # fmt: skip


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
