"""Stage `external`: a checkpoint scored on a tiny external COVIDx-layout root, through its own preprocessing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.labels import parse_label_file
from pipeline.params import load_params
from pipeline.preprocess import PreprocessConfig
from pipeline.sample import generate_sample
from tests.conftest import REPO, sample_params
from tests.evaluation.test_evaluate import SIZE, _checkpoint, _dig, _params_file, one_thread  # noqa: F401 (autouse fixture)
from train.evaluation.external import external_test_items


@pytest.fixture
def external(tmp_path):
    root = tmp_path / "ext"
    generate_sample(root, sample_params(2, 4), seed=3)
    cfg = PreprocessConfig.for_variant(load_params(REPO / "params.yaml").preprocess, "equalized")
    preprocess = dataclasses.replace(cfg, size=SIZE).to_dict()
    return root, _checkpoint(tmp_path / "ext.pt", "equalized", preprocess)


def _external_cli(ckpt: Path, root: Path, out: Path, tmp_path: Path):
    args = ["evaluate", "--model", str(ckpt), "--root", str(root), "--out", str(out)]
    return CliRunner().invoke(app, args + ["--params", str(_params_file(tmp_path))])


@pytest.mark.slow
def test_external_root_through_the_checkpoint_preprocessing(tmp_path, external):
    root, ckpt = external
    out = tmp_path / "external.json"
    result = _external_cli(ckpt, root, out, tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    n_lines = len((root / "test.txt").read_text().splitlines())
    assert report["n_test"] == n_lines and report["dataset"]["reject_count"] == 0
    assert set(report["by_source"]) == {line.split()[-1] for line in (root / "test.txt").read_text().splitlines()}
    for key in ("accuracy", "macro.f1", "roc_auc", "sensitivity.ci95", "at_0_5.accuracy"):
        _dig(report, key)
    assert not (tmp_path / "metrics").exists()  # no predictions/plots unless asked for


def test_external_rejects_are_reported_and_bounded(tmp_path, external):
    root, ckpt = external
    victim = (root / "test.txt").read_text().splitlines()[0].split()[1]
    (root / "test" / victim).write_bytes(b"not an image")
    result = _external_cli(ckpt, root, tmp_path / "x.json", tmp_path)
    assert result.exit_code == 1
    assert "1 of 8 test images rejected" in result.output


def test_external_one_class_dataset_has_null_auc(tmp_path, external):
    root, ckpt = external
    lines = [ln for ln in (root / "test.txt").read_text().splitlines() if " negative " in ln]
    (root / "test.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "neg.json"
    result = _external_cli(ckpt, root, out, tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["roc_auc"] is None and "only negative" in report["auc_undefined"]
    assert report["sensitivity"]["value"] is None

def test_external_items_reject_duplicates_escapes_and_bad_lines(tmp_path):
    (tmp_path / "test.txt").write_text(
        "p 1 a.b.png positive src\n"
        "p 2 a.b.png negative src\n"
        "p 3 ../../etc/passwd positive src\n"
        "only two\n"
        "COVID 4 c.png negative src\n"
    )
    (tmp_path / "test").mkdir()
    for name in ("a.b.png", "c.png"):  # present: a missing or linked-out file is a reject at this stage too
        (tmp_path / "test" / name).write_bytes(b"x")
    items, rejects = external_test_items(tmp_path)
    assert [(i["filename"], i["label"], i["patient_id"]) for i in items] == [("a.b.png", 1, "p 1"), ("c.png", 0, "COVID 4")]
    assert items[0]["path"] == tmp_path / "test" / "a.b.png"
    reasons = " | ".join(r["reason"] for r in rejects)
    assert len(rejects) == 3 and "duplicate" in reasons and "escapes" in reasons


def test_external_root_may_name_compressed_dicom(tmp_path, external):
    from pydicom.uid import JPEG2000Lossless

    from tests.test_dicom import pydicom_encoded

    root, ckpt = external
    lines = (root / "test.txt").read_text().splitlines()
    patient, name, label, source = lines[0].rsplit(" ", 3)
    pixels = cv2.imread(str(root / "test" / name), cv2.IMREAD_GRAYSCALE)
    (root / "test" / name).unlink()
    (root / "test" / "scan.dcm").write_bytes(pydicom_encoded(JPEG2000Lossless, pixels, 8))
    lines[0] = f"{patient} scan.dcm {label} {source}"
    (root / "test.txt").write_text("\n".join(lines) + "\n")
    result = _external_cli(ckpt, root, tmp_path / "external.json", tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "external.json").read_text())
    assert report["n_test"] == len(lines) and report["dataset"]["reject_count"] == 0

def test_shifted_external_sample_scores_with_patient_intervals(tmp_path, external):
    _, ckpt = external
    root = tmp_path / "shifted"
    generate_sample(root, sample_params(shifted=3), seed=3, style="shifted")
    out, plots = tmp_path / "ext" / "shifted.json", tmp_path / "ext" / "plots"
    args = ["evaluate", "--model", str(ckpt), "--root", str(root), "--out", str(out), "--plots", str(plots),
            "--predictions", str(tmp_path / "ext" / "p.csv"), "--params", str(_params_file(tmp_path))]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    patients = {line.patient_id for line in parse_label_file(root / "test.txt")[0]}
    assert report["n_test"] == 6 and report["intervals"]["n_patients"] == len(patients)
    assert report["at_prevalence"]["prevalence"] == 0.05 and "calibration" in report
    assert (plots / "reliability_test.json").is_file() and not (plots / "reliability_val.json").exists()


def test_external_images_are_bounded_and_rechecked_inside_the_root_when_read(tmp_path):
    from train.evaluation.external import _load_external

    cfg = PreprocessConfig.for_variant(load_params(REPO / "params.yaml").preprocess, "equalized")
    (tmp_path / "test").mkdir()
    (tmp_path / "test.txt").write_text("p1 big.png positive src\np2 swapped.png negative src\n")
    big = tmp_path / "test" / "big.png"
    big.write_bytes(b"\0" * 64)
    (tmp_path / "test" / "swapped.png").write_bytes(b"x")
    secret = tmp_path.parent / f"{tmp_path.name}-outside.png"
    cv2.imwrite(str(secret), (np.arange(64 * 64) % 255).reshape(64, 64).astype(np.uint8))
    items, rejects = external_test_items(tmp_path)
    assert len(items) == 2 and rejects == []
    # after the listing: one file grows past the decode bound, the other becomes a link out of ROOT
    with open(big, "r+b") as fh:
        fh.truncate(cfg.max_decoded_bytes + 1)  # sparse: nothing of it may be read into memory
    (tmp_path / "test" / "swapped.png").unlink()
    (tmp_path / "test" / "swapped.png").symlink_to(secret)
    reasons = [_load_external(item, cfg) for item in items]
    assert all(isinstance(r, str) for r in reasons), "both must be rejects, not images"
    assert "over the bound" in reasons[0]
    assert "outside the dataset root" in reasons[1]
