"""Stage `ingest`: label files + image folders -> one manifest with patient-wise splits.

Every label line ends up either in the manifest or in the report's rejects with
its reason. Validation is carved from train by patient (never by image), so no
patient we assign can straddle train and val.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.dicom import image_file_header
from pipeline.errors import CxrError
from pipeline.fileio import sha256_file
from pipeline.imageio import Header, ImageRejected
from pipeline.labels import LabelLine, parse_label_file
from pipeline.shard_format import CLASS_NAMES, SPLITS


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


def _inspect(path: Path) -> tuple[str, Header | None]:
    """sha256 of the file and its header (Fig. 1's image dimensions), or None for an unreadable header."""
    try:
        header = image_file_header(path)
    except ImageRejected:
        header = None
    return sha256_file(path), header


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


def build_manifest(
    root: Path,
    manifest_path: Path,
    report_path: Path,
    val_fraction: float,
    seed: int,
    max_reject_fraction: float,
    show_progress: bool = False,
) -> dict[str, Any]:
    root = Path(root)
    if not (root / "train.txt").is_file() or not (root / "test.txt").is_file():
        raise CxrError(f"{root} is not a COVIDx-layout root: it needs train.txt and test.txt (and train/, test/)")
    present = [s for s in SPLITS if (root / f"{s}.txt").is_file()]

    parsed: dict[str, list[LabelLine]] = {}
    rejects: list[dict[str, Any]] = []
    total_lines = 0
    for split in present:
        lines, bad = parse_label_file(root / f"{split}.txt")
        total_lines += len(lines) + len(bad)
        rejects += [{"split": split, "line": r.line_no, "text": r.text, "reason": r.reason} for r in bad]
        seen: set[str] = set()
        kept = []
        for line in lines:
            reason = None
            if line.filename in seen:
                reason = "duplicate filename in the label file"
            elif not (root / split / line.filename).is_file():
                reason = f"missing file {split}/{line.filename}"
            seen.add(line.filename)
            if reason:
                rejects.append({"split": split, "line": line.line_no, "filename": line.filename, "reason": reason})
            else:
                kept.append(line)
        parsed[split] = kept

    patients = {split: {line.patient_id for line in parsed[split]} for split in present}
    label_overlap = {
        f"{a}/{b}": sorted(patients[a] & patients[b])
        for i, a in enumerate(present)
        for b in present[i + 1 :]
        if patients[a] & patients[b]
    }
    assigned: dict[str, list[tuple[str, LabelLine]]] = defaultdict(list)
    if "val" in present:
        for split in present:
            assigned[split] = [(split, line) for line in parsed[split]]
        val_patients: set[str] = set()
    else:
        val_patients = carve_validation(parsed["train"], val_fraction, seed, exclude=patients["test"])
        for line in parsed["train"]:
            assigned["val" if line.patient_id in val_patients else "train"].append(("train", line))
        assigned["test"] = [("test", line) for line in parsed["test"]]

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:  # hashing is I/O + GIL-free
        entries = []
        for split in SPLITS:
            items = assigned.get(split, [])
            paths = [root / folder / line.filename for folder, line in items]
            inspected = list(tqdm(pool.map(_inspect, paths), total=len(paths), desc=f"ingest {split}", unit="img",
                                  disable=not show_progress, leave=False))  # fmt: skip
            for idx, ((folder, line), path, (digest, header)) in enumerate(zip(items, paths, inspected)):
                entries.append(
                    ManifestEntry(
                        key=f"{split}_{idx:06d}",
                        split=split,
                        path=f"{folder}/{line.filename}",
                        label=line.label,
                        patient_id=line.patient_id,
                        source=line.source,
                        filename=line.filename,
                        sha256=digest,
                        bytes=path.stat().st_size,
                        width=header.width if header else None,
                        height=header.height if header else None,
                        format=header.format if header else None,
                    )
                )

    by_hash: dict[str, set[str]] = defaultdict(set)
    for e in entries:
        by_hash[e.sha256].add(e.split)
    cross_split_duplicates = sum(1 for splits in by_hash.values() if len(splits) > 1)

    reject_fraction = len(rejects) / max(total_lines, 1)
    counts = {
        split: dict(Counter(CLASS_NAMES[e.label] for e in entries if e.split == split)) for split in SPLITS
    }
    report = {
        "root": str(root),
        "label_files": present,
        "lines": total_lines,
        "accepted": len(entries),
        "counts": counts,
        "val_source": "val.txt" if "val" in present else f"carved from train by patient ({val_fraction:.0%}, seed {seed})",
        "val_patients": len(val_patients) if "val" not in present else len(patients["val"]),
        "label_file_patient_overlap": {k: {"count": len(v), "patients": v[:50]} for k, v in label_overlap.items()},
        "cross_split_duplicate_images": cross_split_duplicates,
        "reject_count": len(rejects),
        "rejects": rejects,
    }
    if reject_fraction > max_reject_fraction:
        raise CxrError(
            f"{len(rejects)} of {total_lines} label lines rejected ({reject_fraction:.1%} > "
            f"{max_reject_fraction:.0%}): is {root} the right dataset root? First reasons: "
            + "; ".join(r["reason"] for r in rejects[:3])
        )
    _write_atomic(manifest_path, "".join(json.dumps(asdict(e), sort_keys=True) + "\n" for e in entries))
    _write_atomic(report_path, json.dumps(report, indent=1, sort_keys=True) + "\n")
    return {k: report[k] for k in ("root", "lines", "accepted", "counts", "reject_count", "val_source")} | {
        "label_file_patient_overlap": {k: v["count"] for k, v in report["label_file_patient_overlap"].items()}
    }


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_manifest(path: Path) -> list[ManifestEntry]:
    if not path.is_file():
        raise CxrError(f"manifest not found: {path} (run the ingest stage first)")
    return [ManifestEntry(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
