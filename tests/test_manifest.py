import json
import os
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.errors import CxrError
from pipeline.manifest import build_manifest, read_manifest
from tests.conftest import data_params


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


def run(root, tmp_path, seed=1, **kw):
    data = data_params(**(dict(val_fraction=0.2, max_reject_fraction=0.5) | kw))
    summary = build_manifest(root, tmp_path / "m.jsonl", tmp_path / "r.json", data, seed)
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


def test_links_out_of_the_root_folders_and_fifos_are_rejects_not_crashes(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    cv2.imwrite(str(outside / "secret.png"), np.full((80, 80), 7, np.uint8))
    extra = ["x out.png positive s", "x linkdir/secret.png positive s", "x dir.png negative s", "x fifo.png negative s"]
    root = write_dataset(tmp_path / "ds", extra_lines=extra)
    (root / "train" / "out.png").symlink_to(outside / "secret.png")
    (root / "train" / "linkdir").symlink_to(outside)
    (root / "train" / "dir.png").mkdir()
    os.mkfifo(root / "train" / "fifo.png")
    _, entries, report = run(root, tmp_path)
    reasons = sorted(r["reason"] for r in report["rejects"])
    assert len(reasons) == 4 and sum("outside the dataset root" in r for r in reasons) == 2
    assert any("is a folder" in r for r in reasons) and any("not a regular file" in r for r in reasons)
    assert len(entries) + report["reject_count"] == report["lines"]


def test_duplicates_by_normalised_path_and_by_content_within_a_split_are_rejects(tmp_path):
    root = write_dataset(tmp_path / "ds")
    (root / "train" / "copy.png").write_bytes((root / "train" / "train.pt1.img.0.png").read_bytes())
    with open(root / "train.txt", "a") as fh:
        fh.write("train patient 0 ./train.pt0.img.0.png negative src0\n")
        fh.write("someone else copy.png positive src0\n")
    _, entries, report = run(root, tmp_path)
    reasons = [r["reason"] for r in report["rejects"]]
    assert any("duplicate filename in train.txt (same as line 1)" in r for r in reasons)
    assert any("same content (sha256) as line 3 (train.pt1.img.0.png)" in r for r in reasons)
    assert len(entries) == 48


@pytest.mark.parametrize("policy", ["report", "drop", "fail"])
def test_an_image_in_two_label_files_is_a_leak_handled_by_policy(tmp_path, policy):
    root = write_dataset(tmp_path / "ds")
    shared = root / "test" / "test.pt0.img.0.png"
    (root / "train" / "leaked.png").write_bytes(shared.read_bytes())
    with open(root / "train.txt", "a") as fh:
        fh.write("new patient leaked.png negative src0\n")
    if policy == "fail":
        with pytest.raises(CxrError, match="1 image.*shared between label files.*leaked.png"):
            run(root, tmp_path, leaks=policy)
        assert json.loads((tmp_path / "r.json").read_text())["leak_count"] == 1  # evidence written
        return
    summary, entries, report = run(root, tmp_path, leaks=policy)
    (leak,) = report["leaks"]
    assert leak["splits"] == ["train", "test"] and leak["train"]["filename"] == "leaked.png"
    assert leak["test"]["filename"] == "test.pt0.img.0.png" and summary["leak_count"] == 1
    kept = {e.filename for e in entries}
    assert ("leaked.png" in kept) == (policy == "report") and "test.pt0.img.0.png" in kept
    assert len(entries) + report["reject_count"] == report["lines"]


def test_the_full_rejects_list_is_written_when_the_threshold_fails(tmp_path):
    root = write_dataset(tmp_path / "ds", extra_lines=[f"x missing{i}.png negative s" for i in range(10)])
    with pytest.raises(CxrError, match="all rejects in"):
        run(root, tmp_path, max_reject_fraction=0.01)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["reject_count"] == 10 == len(report["rejects"]) and "failed" in report
    assert not (tmp_path / "m.jsonl").exists()
