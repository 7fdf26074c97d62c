"""The Python API (train/screen/api.py): the README's example runs and gives `cxr predict`'s numbers."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.errors import CxrError
from tests.conftest import REPO
from tests.screen.test_predict import BAD, GOOD, PLATT, inputs, checkpoint, read_rows, run  # noqa: F401 -- fixtures
from train import Screener
from train.calibration import PROB_COLUMN
from train.calibration import apply as calibrate
from train.checkpoint import load_checkpoint
from train.export import export_onnx


def readme_example() -> str:
    section = (REPO / "README.md").read_text().split("\n## Python API\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch, inputs, checkpoint) -> Path:  # noqa: F811
    """The README's layout: models/best.pt and a scans/ folder (good and unreadable images)."""
    (tmp_path / "models").mkdir()
    shutil.copy(checkpoint, tmp_path / "models" / "best.pt")
    shutil.copytree(inputs, tmp_path / "scans")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _printed(code: str) -> dict[str, list[str]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    lines = [line.split(" ", 3) for line in out.getvalue().splitlines()]
    return {fields[0]: fields[1:] for fields in lines}


@pytest.mark.slow
def test_the_readme_example_runs_and_matches_cxr_predict(workspace: Path):
    code = readme_example()
    assert len(code.strip().splitlines()) <= 5 and "Screener(" in code
    printed = _printed(code)
    result = run("scans/", "--model", "models/best.pt", "--out", "cli.csv")
    assert result.exit_code == 2  # the unreadable files
    rows = read_rows(workspace / "cli.csv")
    assert set(printed) == set(rows) == {f"scans/{name}" for name in GOOD + BAD}
    for path, row in rows.items():
        probability, decision, rest = printed[path]
        if row["error"]:
            assert (probability, decision, rest) == ("None", "None", row["error"])
        else:
            assert abs(float(probability) - float(row[PROB_COLUMN])) <= 1e-6
            assert decision == row["decision"] and rest == "(224, 224)"
    assert {row["decision"] for row in rows.values() if not row["error"]} == {"positive", "negative"}


@pytest.mark.slow
def test_the_screener_runs_predicts_engine_and_calibration(workspace: Path):
    """Same engine choice as `cxr predict` (auto: ONNX Runtime once it matches PyTorch), then the
    checkpoint's Platt calibration, which the fixture makes far from the identity."""
    screener = Screener("models/best.pt")
    results = [r for r in screener.predict("scans/") if not r.error]
    assert run("scans/", "--model", "models/best.pt", "--out", "cli.csv").exit_code == 2
    rows = read_rows(workspace / "cli.csv")
    assert screener.engine == rows[results[0].path]["engine"] == "onnxruntime-cpu"
    assert screener.calibration == PLATT
    raw = np.array([r.uncalibrated for r in results])
    assert np.allclose([r.probability for r in results], calibrate(raw, PLATT), rtol=0, atol=1e-12)
    assert np.abs(calibrate(raw, PLATT) - raw).max() > 1e-3  # calibration really moves the numbers
    eager = {r.path: r for r in Screener("models/best.pt", engine="eager").predict("scans/") if not r.error}
    assert eager[results[0].path].probability == pytest.approx(results[0].probability, abs=1e-4)


def test_arrays_score_like_the_files_they_were_read_from(workspace: Path):
    screener = Screener("models/best.pt")
    by_file = {r.path: r for r in screener.predict(["scans/a.png", "scans/b16.png"])}
    pixels = [cv2.imread(str(workspace / "scans" / n), cv2.IMREAD_UNCHANGED) for n in ("a.png", "b16.png")]
    assert pixels[1].dtype == np.uint16
    by_array = screener.predict(pixels + [np.zeros((3, 4, 5, 6))])
    assert [r.path for r in by_array] == ["array[0]", "array[1]", "array[2]"]
    for got, name in zip(by_array, ("a.png", "b16.png")):
        want = by_file[f"scans/{name}"]
        assert abs(got.probability - want.probability) <= 1e-6 and got.decision == want.decision
        assert np.array_equal(got.image, want.image) and got.heatmap is None
    assert by_array[2].probability is None and "(H, W) or (H, W, C)" in by_array[2].error
    assert screener.meta["model"] == "resnet50" and screener.identity.startswith("resnet50/equalized@")


@pytest.mark.slow
def test_an_onnx_screener_matches_cxr_predict_onnx_and_explains_only_with_its_weights(workspace: Path):
    export_onnx(workspace / "models" / "best.pt", workspace / "models" / "model.onnx")
    screener = Screener("models/model.onnx")
    got = {r.path: r for r in screener.predict("scans/")}
    assert run("scans/", "--onnx", "models/model.onnx", "--out", "cli.csv").exit_code == 2
    for path, row in read_rows(workspace / "cli.csv").items():
        if not row["error"]:
            assert abs(got[path].probability - float(row[PROB_COLUMN])) <= 1e-6
    with pytest.raises(CxrError, match="heatmaps need the PyTorch weights"):
        screener.predict("scans/a.png", heatmaps=True)
    explained = Screener("models/model.onnx", checkpoint="models/best.pt").predict("scans/a.png", heatmaps=True)
    assert explained[0].heatmap.shape == (224, 224) and 0 <= explained[0].heatmap.min() <= 1


def test_nan_weights_give_an_error_and_no_decision_through_the_api(tmp_path, inputs, checkpoint):  # noqa: F811
    from tests.screen.test_predict import _with_state

    broken = _with_state(tmp_path, checkpoint, "nan.pt", fill=float("nan"))
    results = Screener(broken, engine="eager").predict([inputs / "a.png", np.full((300, 300), 90, np.uint8)])
    assert len(results) == 2
    assert all(r.decision is None and r.probability is None and "not finite" in r.error for r in results)


def test_a_resume_checkpoint_is_refused_by_the_api(tmp_path, checkpoint):  # noqa: F811
    from tests.screen.test_predict import _with_state

    meta = dict(load_checkpoint(checkpoint).meta, threshold={"value": None, "rule": "max_f1", "split": "val"})
    with pytest.raises(CxrError, match="resume checkpoint written during training; screen with best.pt"):
        Screener(_with_state(tmp_path, checkpoint, "last.pt", meta=meta))


def _hostile_arrays() -> dict[str, tuple[np.ndarray, str]]:
    """The issue's arrays (and kin), each with the reason it must get instead of a score or an exception."""
    huge = np.full((300, 300), 3e38, np.float32)
    huge[:150] = -3e38  # near float32's limit: the min..max stretch overflowed and the garbage was scored
    nan = np.full((300, 300), 0.5, np.float32)
    nan[5, 5] = np.nan
    return {
        "1x1": (np.full((1, 1), 90, np.uint8), r"image too small: 1x1 \(min side 64\)"),
        "2x2": (np.full((2, 2), 90, np.uint8), r"image too small: 2x2 \(min side 64\)"),
        "63 rows": (np.full((63, 500), 90, np.uint8), r"image too small: 500x63 \(min side 64\)"),
        "complex": (np.full((300, 300), 90 + 3j), "unsupported pixel type complex128"),
        "3e38": (huge, r"outside the accepted \+-2\^64"),
        "1e300 float64": (np.full((300, 300), 1e300), r"outside the accepted \+-2\^64"),
        "strings": (np.full((300, 300), "90"), "unsupported pixel type <U2"),
        "objects": (np.full((300, 300), 90, object), "unsupported pixel type object"),
        "NaN": (nan, "image contains non-finite values"),
        "inf": (np.full((300, 300), -np.inf), "image contains non-finite values"),
        "two channels": (np.zeros((300, 300, 2), np.uint8), r"\(H, W\) or \(H, W, C\) image array with C 1, 3 or 4"),
        "empty": (np.zeros((0, 300), np.uint8), "image too small: 300x0"),
    }


def test_hostile_arrays_get_their_reason_and_the_others_are_still_scored(checkpoint):  # noqa: F811
    screener = Screener(checkpoint, engine="eager")
    rng = np.random.default_rng(0)
    good = (rng.random((300, 260)) * 255).astype(np.uint8)
    good[0, :2] = 0, 255  # spans 0..255, so the float copy's min..max stretch gives these very pixels
    hostile = _hostile_arrays()
    results = screener.predict([good, *(a for a, _ in hostile.values()), good.astype(np.float32) / 255])
    assert len(results) == len(hostile) + 2
    first, last, bad = results[0], results[-1], results[1:-1]
    assert first.decision in ("positive", "negative") and not first.error
    assert last.probability == pytest.approx(first.probability, abs=1e-6)  # a float image in [0, 1]: same picture
    for (name, (_, reason)), r in zip(hostile.items(), bad):
        assert r.probability is None and r.decision is None, name
        assert re.search(reason, r.error), (name, r.error)


def test_array_size_bounds_are_the_decoders(checkpoint):  # noqa: F811
    screener = Screener(checkpoint, engine="eager")
    cfg = screener.config
    wide = np.broadcast_to(np.uint8(90), (64, cfg.max_pixels // 64 + 1))  # no memory: one byte, strided
    over = screener.predict(wide)[0]
    assert over.decision is None and f"over the bound of {cfg.max_pixels}" in over.error
    heavy = np.broadcast_to(np.float64(0.5), (4100, 4100))  # 128 MiB as float64, within max_pixels
    assert heavy.nbytes > cfg.max_decoded_bytes >= heavy.size
    assert "preprocess.max_decoded_bytes" in screener.predict(heavy)[0].error
