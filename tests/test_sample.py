"""pipeline.sample: a synthetic COVIDx-layout dataset with the traps of the real one."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.errors import CxrError
from pipeline.sample import CLASSES, KIND_POOL, SPLITS, generate_sample
from tests.conftest import sample_params

PER_CLASS = {"train": len(KIND_POOL), "test": 4}  # a full pool per class: every quirk appears


def read_labels(path: Path) -> list[tuple[str, str, str, str]]:
    # Parse from the right: patient ids may contain spaces, the last three fields never do.
    return [tuple(line.rsplit(" ", 3)) for line in path.read_text(encoding="utf-8").splitlines()]


def file_format(data: bytes) -> str:
    """Container and pixel layout from the bytes, never from the file name."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        depth, colour = data[24], data[25]  # IHDR fields
        return f"png-{depth}bit-" + {0: "grey", 2: "rgb", 3: "palette", 4: "greyalpha", 6: "rgba"}[colour]
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return "unknown"


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("sample") / "data" / "sample"
    summary = generate_sample(root, sample_params(PER_CLASS["train"], PER_CLASS["test"]), seed=20211)
    return root, summary


def all_rows(root: Path) -> list[tuple[str, str, str, str, str]]:
    return [(split, *row) for split in SPLITS for row in read_labels(root / f"{split}.txt")]


def test_layout_and_line_format(sample):
    root, _ = sample
    assert {p.name for p in root.iterdir() if not p.name.startswith(".")} == {"train", "test", "train.txt", "test.txt"}
    for split in SPLITS:
        text = (root / f"{split}.txt").read_text(encoding="utf-8")
        assert text.endswith("\n") and "\r" not in text and "\n\n" not in text
        rows = read_labels(root / f"{split}.txt")
        for patient_id, filename, label, source in rows:
            assert patient_id and patient_id == patient_id.strip()
            assert " " not in filename and "/" not in filename
            assert label in ("positive", "negative")
            assert source in ("synth-a", "synth-b", "synth-c")
            assert (root / split / filename).is_file()
        names = [row[1] for row in rows]
        assert len(set(names)) == len(names)
        assert sorted(names) == sorted(p.name for p in (root / split).iterdir())  # nothing unlisted


def test_counts_per_class_match_arguments_and_summary(sample):
    root, summary = sample
    for split in SPLITS:
        counts = Counter(label for _, _, label, _ in read_labels(root / f"{split}.txt"))
        assert counts == {c: PER_CLASS[split] for c in CLASSES}
        assert summary["images"][split] == {c: PER_CLASS[split] for c in CLASSES}
        assert summary["patients"][split] == len({pid for pid, *_ in read_labels(root / f"{split}.txt")})
    assert summary["seed"] == 20211


def test_patients_are_disjoint_and_some_have_several_images(sample):
    root, _ = sample
    rows = all_rows(root)
    train = {pid for split, pid, *_ in rows if split == "train"}
    test = {pid for split, pid, *_ in rows if split == "test"}
    assert train and test and not train & test
    per_patient = Counter(pid for _, pid, *_ in rows)
    assert max(per_patient.values()) >= 2
    labels = {}
    for _, pid, _, label, _ in rows:
        assert labels.setdefault(pid, label) == label  # one label per patient


def test_real_world_quirks_are_present(sample):
    root, _ = sample
    rows = all_rows(root)
    formats = {file_format((root / s / f).read_bytes()) for s, _, f, _, _ in rows}
    assert {"png-16bit-grey", "png-8bit-grey", "jpeg", "tiff", "png-8bit-rgba", "png-8bit-palette"} <= formats
    assert any(" " in pid for _, pid, *_ in rows)
    assert any(f.count(".") >= 2 for _, _, f, _, _ in rows)
    assert any(f.lower().endswith(".jpg") and file_format((root / s / f).read_bytes()).startswith("png")
               for s, _, f, _, _ in rows)
    assert len({src for *_, src in rows}) >= 3

    tinted = 0
    shapes = set()
    for split, _, filename, _, _ in rows:
        img = cv2.imread(str(root / split / filename), cv2.IMREAD_UNCHANGED)
        shapes.add(img.shape[:2])
        if img.dtype == np.uint16:
            assert img.max() < 65535 - 5000  # a non-full range, as real 16-bit exports have
        if img.ndim == 3 and img.shape[2] == 3:
            b, r = img[..., 0].astype(float), img[..., 2].astype(float)
            tinted += b.mean() > r.mean() + 5
    assert tinted >= 1
    assert any(h > w for h, w in shapes) and any(w > h for h, w in shapes)
    assert len(shapes) > len(rows) // 2


def test_every_image_decodes_with_cv2(sample):
    root, _ = sample
    for split, _, filename, _, _ in all_rows(root):
        img = cv2.imread(str(root / split / filename), cv2.IMREAD_UNCHANGED)
        assert img is not None, filename
        assert 256 <= min(img.shape[:2]) and max(img.shape[:2]) <= 1200
        grey = cv2.imread(str(root / split / filename), cv2.IMREAD_GRAYSCALE)
        assert grey.std() > 10  # a picture, not a blank


def test_format_and_source_do_not_predict_the_label(sample):
    root, _ = sample
    rows = [r for r in all_rows(root) if r[0] == "train"]
    by_class = {c: Counter(file_format((root / "train" / f).read_bytes()) for _, _, f, lab, _ in rows if lab == c)
                for c in CLASSES}
    # Both classes get the same multiset of encodings (JPEG channels and TIFF depth are drawn
    # per image, so file_format deliberately does not look at them).
    assert by_class["negative"] == by_class["positive"]


def test_same_seed_is_byte_identical(sample, tmp_path):
    root, summary = sample
    again = generate_sample(tmp_path / "again", sample_params(PER_CLASS["train"], PER_CLASS["test"]), seed=20211)
    assert again == summary
    assert tree_hashes(tmp_path / "again") == tree_hashes(root)  # every encoder, incl. TIFF and palette


def test_another_seed_differs(tmp_path):
    generate_sample(tmp_path / "a", sample_params(3, 2), seed=7)
    generate_sample(tmp_path / "b", sample_params(3, 2), seed=8)
    a, b = tree_hashes(tmp_path / "a"), tree_hashes(tmp_path / "b")
    assert a["train.txt"] != b["train.txt"]
    assert not set(a.values()) & set(b.values())  # no image repeats either


def test_regenerating_replaces_the_old_sample_and_leaves_no_temp_dirs(tmp_path):
    out = tmp_path / "sample"
    generate_sample(out, sample_params(4, 2), seed=1)
    generate_sample(out, sample_params(2, 2), seed=2)
    rows = all_rows(out)
    assert len(rows) == 8
    assert sum(1 for p in out.rglob("*") if p.is_file() and p.parent != out) == 8
    assert [p.name for p in tmp_path.iterdir()] == ["sample"]


def test_refuses_to_replace_a_folder_it_did_not_make(tmp_path):
    real = tmp_path / "covidx"
    real.mkdir()
    (real / "train.txt").write_text("1 a.png positive cohen\n")
    with pytest.raises(CxrError, match="refusing"):
        generate_sample(real, sample_params(2, 2), seed=0)
    assert (real / "train.txt").read_text() == "1 a.png positive cohen\n"


@pytest.mark.parametrize(
    "train, test, seed",
    [(1, 2, 0), (2, 0, 0), (True, 2, 0), (2.0, 2, 0), (2, 2, -1), (2, 2, 1.5)],
)
def test_bad_arguments_raise_cxr_error(tmp_path, train, test, seed):
    with pytest.raises(CxrError):
        generate_sample(tmp_path / "s", sample_params(train, test), seed)
    assert not (tmp_path / "s").exists()


def test_a_user_file_inside_an_earlier_sample_stops_the_replacement(tmp_path):
    out = tmp_path / "sample"
    generate_sample(out, sample_params(2, 2), 1)
    (out / "my-notes.txt").write_text("keep me")
    with pytest.raises(CxrError, match="holds 'my-notes.txt'"):
        generate_sample(out, sample_params(2, 2), 1)
    assert (out / "my-notes.txt").read_text() == "keep me"


@pytest.fixture(scope="module")
def shifted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shifted") / "external" / "shifted"
    summary = generate_sample(root, sample_params(shifted=6), seed=20211, style="shifted")
    assert summary["style"] == "shifted" and summary["images"]["test"] == {"negative": 6, "positive": 6}
    return root


def _long_sides(root: Path, split: str = "test") -> list[int]:
    return [max(cv2.imdecode(np.fromfile(p, np.uint8), cv2.IMREAD_UNCHANGED).shape[:2])
            for p in sorted((root / split).iterdir())]  # fmt: skip


def test_shifted_style_is_a_test_only_set_of_other_patients(sample, shifted):
    root, _ = sample
    assert (shifted / "train.txt").read_text() == "" and not any((shifted / "train").iterdir())
    ours = {row[0] for row in read_labels(shifted / "test.txt")}
    theirs = {row[1] for row in all_rows(root)}
    assert len(ours) >= 2 and not ours & theirs  # another site: no patient in common


def test_shifted_style_has_larger_images(sample, shifted):
    root, _ = sample
    assert np.median(_long_sides(shifted)) > 1.4 * np.median(_long_sides(root))


def test_unknown_style_is_refused(tmp_path):
    with pytest.raises(CxrError, match="unknown style"):
        generate_sample(tmp_path / "s", sample_params(2, 2), seed=0, style="vintage")
    with pytest.raises(CxrError, match="train_per_class must be an integer >= 2"):
        generate_sample(tmp_path / "s", sample_params(0, 2), seed=0)  # only an external set may lack training images
    with pytest.raises(CxrError, match="test_per_class must be an integer >= 2"):
        generate_sample(tmp_path / "s", sample_params(2, 2, shifted=1), seed=0, style="shifted")
