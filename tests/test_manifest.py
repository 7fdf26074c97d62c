import json
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.errors import CxrError
from pipeline.manifest import build_manifest, read_manifest


def write_dataset(root: Path, n_patients=20, images_per_patient=2, extra_lines=(), val=False):
    rng = np.random.default_rng(0)
    for split in ("train", "test") + (("val",) if val else ()):
        (root / split).mkdir(parents=True)
        lines = []
        count = n_patients if split == "train" else 4
        for p in range(count):
            label = "positive" if p % 2 else "negative"
            for i in range(images_per_patient):
                name = f"{split}.pt{p}.img.{i}.png"
                cv2.imwrite(str(root / split / name), rng.integers(0, 255, (80, 80), dtype=np.uint8))
                lines.append(f"{split} patient {p} {name} {label} src{p % 3}")
        if split == "train":
            lines += list(extra_lines)
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def run(root, tmp_path, **kw):
    args = dict(val_fraction=0.2, seed=1, max_reject_fraction=0.5) | kw
    summary = build_manifest(root, tmp_path / "m.jsonl", tmp_path / "r.json", **args)
    return summary, read_manifest(tmp_path / "m.jsonl"), json.loads((tmp_path / "r.json").read_text())


def test_validation_is_carved_by_patient_and_stratified(tmp_path):
    root = write_dataset(tmp_path / "ds")
    _, entries, report = run(root, tmp_path)
    by_split = defaultdict(set)
    for e in entries:
        by_split[e.split].add(e.patient_id)
    assert not (by_split["train"] & by_split["val"]) and not (by_split["val"] & by_split["test"])
    val_labels = {e.label for e in entries if e.split == "val"}
    assert val_labels == {0, 1}
    assert len(by_split["val"]) == 4  # 20% of 10 patients per class, rounded, x2 classes
    assert len(entries) == report["accepted"] == 48
    assert all("." not in e.key for e in entries)
    assert len({e.key for e in entries}) == len(entries)


def test_same_inputs_same_manifest(tmp_path):
    root = write_dataset(tmp_path / "ds")
    run(root, tmp_path)
    first = (tmp_path / "m.jsonl").read_bytes()
    run(root, tmp_path)
    assert (tmp_path / "m.jsonl").read_bytes() == first
    run(root, tmp_path, seed=2)
    assert (tmp_path / "m.jsonl").read_bytes() != first


def test_every_line_is_accepted_or_rejected_with_a_reason(tmp_path):
    extra = [
        "x ../outside.png positive s",
        "x missing.png negative s",
        "bad line",
        "train patient 0 train.pt0.img.0.png negative src0",  # duplicate filename
    ]
    root = write_dataset(tmp_path / "ds", extra_lines=extra)
    _, entries, report = run(root, tmp_path)
    reasons = " | ".join(r["reason"] for r in report["rejects"])
    assert report["reject_count"] == 4
    for word in ("escapes", "missing file", "bad label line", "duplicate filename"):
        assert word in reasons
    assert len(entries) + report["reject_count"] == report["lines"]


def test_existing_val_file_is_used_and_label_leaks_are_reported(tmp_path):
    root = write_dataset(tmp_path / "ds", val=True)
    # put a train patient into test as well: the label files' own leak is counted, not fixed
    with open(root / "test.txt", "a") as fh:
        cv2.imwrite(str(root / "test" / "leak.png"), np.zeros((80, 80), np.uint8))
        fh.write("train patient 3 leak.png positive src0\n")
    summary, entries, report = run(root, tmp_path)
    assert report["val_source"] == "val.txt"
    assert report["label_file_patient_overlap"]["train/test"]["count"] == 1
    assert summary["label_file_patient_overlap"] == {"train/test": 1}


def test_wrong_root_fails_clearly(tmp_path):
    with pytest.raises(CxrError, match="not a COVIDx-layout root"):
        run(tmp_path, tmp_path)
    root = write_dataset(tmp_path / "ds")
    for f in (root / "train").iterdir():
        f.unlink()
    with pytest.raises(CxrError, match="right dataset root"):
        run(root, tmp_path)
