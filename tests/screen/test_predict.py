"""`cxr predict`: every input format, errors recorded per row, exit code, heatmaps, ONNX."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.dicom import read_dicom
from pipeline.errors import CxrError
from pipeline.preprocess import PreprocessConfig, preprocess_array, preprocess_bytes
from train.calibration import PROB_COLUMN
from train.calibration import apply as calibrate
from train.checkpoint import load_checkpoint, make_meta, save_checkpoint
from train.export import export_onnx, onnx_meta, onnx_session
from train.screen.inputs import MAX_FOLDER_DEPTH, collect_inputs, load_image
from train.screen.predict import CSV_COLUMNS, heatmap_name
from tests.test_dicom import dicom_bytes
from tests.test_export import PREPROCESS, make_checkpoint

CFG = PreprocessConfig.from_dict(PREPROCESS)
GOOD = ("a.png", "b16.png", "c.jpg", "d.tiff", "mono1.dcm", "scans/IM0001", "scans/mono2.dcm")
BAD = ("corrupt.png", "notes.png")
PLATT = {"method": "platt", "a": 0.5, "b": 0.3, "fitted_on": "val"}


def chest(rng: np.random.Generator, h: int = 300, w: int = 260, hi: int = 255) -> np.ndarray:
    """A radiograph-ish picture: smooth structure plus noise, so images differ from one another."""
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    cx, cy = rng.uniform(0.3, 0.7, 2)
    img = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.08) + 0.2 * rng.random((h, w))
    return np.round(img / img.max() * hi)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("inputs")
    (root / "scans").mkdir()
    cv2.imwrite(str(root / "a.png"), chest(rng).astype(np.uint8))
    cv2.imwrite(str(root / "b16.png"), chest(rng, hi=65535).astype(np.uint16))
    cv2.imwrite(str(root / "c.jpg"), chest(rng).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    Image.fromarray(chest(rng).astype(np.uint8)).save(root / "d.tiff")
    twelve_bit = chest(rng, hi=4095).astype(np.uint16)
    (root / "mono1.dcm").write_bytes(
        dicom_bytes(twelve_bit, photometric="MONOCHROME1", slope=1.0, intercept=-1024.0, window=(600.0, 3000.0))
    )
    (root / "scans" / "IM0001").write_bytes(dicom_bytes(chest(rng, hi=4095).astype(np.uint16)))  # found by magic
    (root / "scans" / "mono2.dcm").write_bytes(
        dicom_bytes(twelve_bit, slope=2.0, intercept=-1024.0, window=(1000.0, 4000.0))
    )
    png = (root / "a.png").read_bytes()
    (root / "corrupt.png").write_bytes(png[: len(png) // 3])
    (root / "notes.png").write_text("this is not an image\n")
    (root / "readme.txt").write_text("ignored: not an image suffix, no DICOM magic\n")
    (root / ".hidden.png").write_text("ignored: hidden\n")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, inputs) -> Path:
    """resnet50 with a Platt calibration, whose threshold is the median calibrated probability over the
    good inputs, so both decisions occur."""
    good = [inputs / name for name in GOOD]
    path = make_checkpoint(tmp_path_factory.mktemp("model") / "best.pt", "resnet50",
                           calibration=np.stack([load_image(p, CFG) for p in good]))  # fmt: skip
    ckpt = load_checkpoint(path)
    probs = calibrate(list(direct_probabilities(ckpt.build(), good).values()), PLATT)
    meta = dict(ckpt.meta, calibration=PLATT,
                threshold={"value": float(np.median(probs)), "rule": "fixed", "split": "val"})  # fmt: skip
    save_checkpoint(path, meta, ckpt.state_dict)
    return path


def direct_probabilities(model: torch.nn.Module, paths: list[Path]) -> dict[str, float]:
    images = np.stack([load_image(p, CFG) for p in paths])
    with torch.inference_mode():
        probs = torch.sigmoid(model(torch.from_numpy(images[:, None]).float() / 255.0)).numpy()
    return {str(p): float(v) for p, v in zip(paths, probs)}


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        return {row["path"]: row for row in reader}


def run(*args: str):
    return CliRunner().invoke(app, ["predict", *args, "--no-progress"])


@pytest.mark.slow
def test_predict_folder_records_every_input_and_fails_with_exit_2(tmp_path, inputs, checkpoint):
    out = tmp_path / "pred.csv"
    missing = str(tmp_path / "nowhere.png")
    result = run(str(inputs), missing, "--model", str(checkpoint), "--out", str(out), "--batch-size", "3")
    assert result.exit_code == 2, result.output
    assert "3 failed" in result.output  # the summary line: 2 unreadable + 1 missing

    rows = read_rows(out)
    assert set(rows) == {str(inputs / n) for n in GOOD + BAD} | {missing}
    ckpt = load_checkpoint(checkpoint)
    raw = direct_probabilities(ckpt.build(), [inputs / n for n in GOOD])
    expected = dict(zip(raw, calibrate(list(raw.values()), PLATT)))  # predict applies the checkpoint's calibration
    decisions = set()
    for name in GOOD:
        row = rows[str(inputs / name)]
        assert row["error"] == "", (name, row["error"])
        prob, threshold = float(row[PROB_COLUMN]), float(row["threshold"])
        assert threshold == ckpt.threshold
        # same preprocessing, same model; the default engine is ONNX Runtime, checked to 1e-4
        assert prob == pytest.approx(expected[str(inputs / name)], abs=1e-4)
        assert row["decision"] == ("positive" if prob >= threshold else "negative")
        assert row["model"] == f"resnet50/equalized@{ckpt.file_sha256()[:12]}" and row["engine"] == "onnxruntime-cpu"
        decisions.add(row["decision"])
    assert decisions == {"positive", "negative"}
    for name in BAD:
        row = rows[str(inputs / name)]
        assert row[PROB_COLUMN] == row["decision"] == row["engine"] == "" and row["error"]
    assert "no such file" in rows[missing]["error"]

    eager = tmp_path / "eager.csv"
    assert run(str(inputs), "--model", str(checkpoint), "--out", str(eager), "--engine", "eager").exit_code == 2
    for name in GOOD:
        row = read_rows(eager)[str(inputs / name)]
        assert row["engine"] == "eager-cpu" and float(row[PROB_COLUMN]) == pytest.approx(expected[str(inputs / name)],
                                                                                        abs=1e-6)


def test_all_good_inputs_exit_0_and_globs_work(tmp_path, inputs, checkpoint):
    out = tmp_path / "pred.csv"
    result = run(str(inputs / "*.dcm"), str(inputs / "scans" / "*"), "--model", str(checkpoint), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert set(read_rows(out)) == {str(inputs / n) for n in ("mono1.dcm", "scans/IM0001", "scans/mono2.dcm")}


def test_collect_inputs_walks_folders_and_keeps_named_files(inputs):
    files, unmatched = collect_inputs([str(inputs), str(inputs / "readme.txt"), "no/such/*.png"])
    names = {str(p.relative_to(inputs)) for p in files}
    assert names == set(GOOD) | set(BAD) | {"readme.txt"}  # named explicitly, so it is tried
    assert unmatched == [("no/such/*.png", "pattern matched no images")]
    assert files == sorted(files, key=str)


def test_dicom_goes_through_the_shard_stage_functions(inputs):
    data = (inputs / "scans" / "mono2.dcm").read_bytes()
    via_dicom = load_image(inputs / "scans" / "mono2.dcm", CFG)
    assert via_dicom.shape == (224, 224) and via_dicom.dtype == np.uint8
    np.testing.assert_array_equal(via_dicom, preprocess_array(read_dicom(data, CFG.limits), CFG))
    # the displayed DICOM saved as a PNG gives the very same model input
    ok, png = cv2.imencode(".png", read_dicom(data, CFG.limits))
    np.testing.assert_array_equal(via_dicom, preprocess_bytes(png.tobytes(), CFG))


def test_heatmaps_one_png_per_image_with_unique_names(tmp_path, inputs, checkpoint):
    twins = tmp_path / "twins"
    for sub in ("x", "y"):
        (twins / sub).mkdir(parents=True)
        (twins / sub / "same.png").write_bytes((inputs / "a.png").read_bytes())
    maps = tmp_path / "maps"
    result = run(str(twins), str(inputs / "c.jpg"), "--model", str(checkpoint), "--out", str(tmp_path / "p.csv"),
                 "--heatmaps", str(maps))  # fmt: skip
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in maps.iterdir() if not p.name.startswith("."))  # not the ownership marker
    expected = sorted(heatmap_name(p) for p in (twins / "x" / "same.png", twins / "y" / "same.png", inputs / "c.jpg"))
    assert written == expected and len(set(written)) == 3 and written[0].startswith(("c-", "same-"))
    with Image.open(maps / heatmap_name(inputs / "c.jpg")) as png:
        assert png.size == (224, 224) and png.mode == "RGB"
        assert np.asarray(png).std(axis=2).mean() > 1  # coloured overlay, not the greyscale input


@pytest.mark.slow
def test_onnx_predictions_match_torch(tmp_path, inputs, checkpoint):
    onnx_path = export_onnx(checkpoint, tmp_path / "model.onnx")
    assert onnx_meta(onnx_session(onnx_path), onnx_path)["calibration"] == PLATT  # stored in the ONNX metadata
    torch_csv, onnx_csv = tmp_path / "torch.csv", tmp_path / "onnx.csv"
    assert run(str(inputs), "--model", str(checkpoint), "--out", str(torch_csv)).exit_code == 2
    # --model is not needed with --onnx: the meta comes from the ONNX file
    result = run(str(inputs), "--model", str(tmp_path / "absent.pt"), "--onnx", str(onnx_path), "--out", str(onnx_csv))
    assert result.exit_code == 2, result.output
    by_torch, by_onnx = read_rows(torch_csv), read_rows(onnx_csv)
    assert set(by_torch) == set(by_onnx)
    sha = load_checkpoint(checkpoint).file_sha256()[:12]
    for path, row in by_onnx.items():
        assert row["model"] == f"resnet50/equalized@{sha}+onnx" and bool(row["error"]) == bool(by_torch[path]["error"])
        if not row["error"]:  # both calibrated: the mapping travels in the ONNX metadata
            assert abs(float(row[PROB_COLUMN]) - float(by_torch[path][PROB_COLUMN])) <= 1e-4
            positive = float(row[PROB_COLUMN]) >= float(row["threshold"])
            assert row["decision"] == ("positive" if positive else "negative")

    # heatmaps with --onnx need the checkpoint the ONNX came from
    other = make_checkpoint(tmp_path / "other.pt", "resnet50", seed=5)
    result = run(str(inputs / "a.png"), "--onnx", str(onnx_path), "--model", str(other), "--heatmaps",
                 str(tmp_path / "m"), "--out", str(tmp_path / "x.csv"))  # fmt: skip
    assert result.exit_code == 1 and "same weights" in result.output


def test_missing_checkpoint_is_exit_1(tmp_path, inputs):
    result = run(str(inputs / "a.png"), "--model", str(tmp_path / "none.pt"), "--out", str(tmp_path / "p.csv"))
    assert result.exit_code == 1 and "checkpoint not found" in result.output


def test_inconsistent_checkpoint_meta_is_refused(tmp_path, inputs, checkpoint):
    ckpt = load_checkpoint(checkpoint)
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, make_meta(**{**_meta_args(ckpt.meta), "input_size": 299}), ckpt.state_dict)
    result = run(str(inputs / "a.png"), "--model", str(bad), "--out", str(tmp_path / "p.csv"))
    assert result.exit_code == 1 and "inconsistent" in result.output


def _meta_args(meta: dict) -> dict:
    keys = ("model", "variant", "input_size", "preprocess", "params", "threshold", "epoch", "val_loss")
    return {k: meta[k] for k in keys}


def test_user_files_are_never_replaced(tmp_path, inputs, checkpoint):
    sheet = tmp_path / "budget.csv"
    sheet.write_text("month,amount\njan,3\n")
    result = run(str(inputs / "a.png"), "--model", str(checkpoint), "--out", str(sheet))
    assert result.exit_code == 1 and "not a CSV written by `cxr predict`" in result.output
    assert sheet.read_text() == "month,amount\njan,3\n"
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.png").write_bytes(b"precious")
    result = run(str(inputs / "a.png"), "--model", str(checkpoint), "--out", str(tmp_path / "p.csv"),
                 "--heatmaps", str(photos))  # fmt: skip
    assert result.exit_code == 1 and "refusing to write into" in result.output
    assert sorted(p.name for p in photos.iterdir()) == ["holiday.png"]


def test_rows_are_streamed_so_a_crash_keeps_the_decided_ones(tmp_path, inputs, checkpoint, monkeypatch):
    import train.screen.predict as predict_module

    real = predict_module.load_or_reason

    def crash_on_tiff(path, cfg):
        if path.suffix == ".tiff":
            raise KeyboardInterrupt  # stands in for a kill: nothing after this point runs
        return real(path, cfg)

    monkeypatch.setattr(predict_module, "load_or_reason", crash_on_tiff)
    out = tmp_path / "p.csv"
    with pytest.raises(KeyboardInterrupt):
        predict_module.predict([str(inputs / n) for n in ("a.png", "b16.png", "d.tiff")], checkpoint=checkpoint,
                               out_csv=out, batch_size=2, workers=1, device=torch.device("cpu"), progress=False)  # fmt: skip
    assert set(read_rows(out)) == {str(inputs / "a.png"), str(inputs / "b16.png")}


def test_a_second_run_on_the_same_csv_is_refused_and_leaves_the_first_runs_rows(tmp_path, inputs, checkpoint):
    import fcntl

    out = tmp_path / "pred.csv"
    first = run(str(inputs / "a.png"), "--model", str(checkpoint), "--out", str(out))
    assert first.exit_code == 0, first.output
    written = out.read_bytes()
    with open(out, "rb") as held:  # stands in for a run still writing this CSV
        fcntl.flock(held, fcntl.LOCK_EX)
        second = run(str(inputs / "a.png"), "--model", str(checkpoint), "--out", str(out))
    assert second.exit_code == 1 and "another run is writing" in second.output
    assert out.read_bytes() == written  # neither truncated nor interleaved
    again = run(str(inputs / "a.png"), "--model", str(checkpoint), "--out", str(out))
    assert again.exit_code == 0 and out.read_bytes() == written  # the lock went with its holder


def test_a_file_that_grows_while_it_is_read_is_an_error_not_a_longer_read(inputs, monkeypatch):
    """load_image reads st_size + 1 bytes (read() would first allocate the whole 128 MiB bound)."""
    from train.screen import inputs as screen_inputs

    real_fstat = screen_inputs.os.fstat

    class Shrunk:
        def __init__(self, info):
            self.st_size, self.st_mode = info.st_size - 100, info.st_mode

    assert load_image(inputs / "a.png", CFG).shape == (CFG.size, CFG.size)
    monkeypatch.setattr(screen_inputs.os, "fstat", lambda fd: Shrunk(real_fstat(fd)))
    with pytest.raises(CxrError, match="grew while it was being read"):
        load_image(inputs / "a.png", CFG)


def _with_state(tmp_path: Path, checkpoint: Path, name: str, *, fill: float | None = None, meta: dict | None = None):
    ckpt = load_checkpoint(checkpoint)
    state = {k: torch.full_like(v, fill) if fill is not None and v.is_floating_point() else v
             for k, v in ckpt.state_dict.items()}  # fmt: skip
    save_checkpoint(tmp_path / name, meta or ckpt.meta, state)
    return tmp_path / name


def test_nan_weights_are_an_error_row_and_exit_2_not_a_negative(tmp_path, inputs, checkpoint):
    """issue 21: a checkpoint whose weights are NaN gave `nan,negative` and exit 0."""
    broken = _with_state(tmp_path, checkpoint, "nan.pt", fill=float("nan"))
    out = tmp_path / "p.csv"
    result = run(str(inputs / "a.png"), "--model", str(broken), "--out", str(out), "--engine", "eager")
    assert result.exit_code == 2, result.output
    row = read_rows(out)[str(inputs / "a.png")]
    assert (row[PROB_COLUMN], row["decision"]) == ("", "") and "not finite" in row["error"]


def test_a_crafted_onnx_that_outputs_nan_is_an_error_row(tmp_path, inputs, checkpoint):
    from tests.test_export import crafted_onnx

    meta = load_checkpoint(checkpoint).meta
    # finite on the contract's black probe images, NaN on real ones: only scoring can tell
    graph = crafted_onnx(tmp_path / "nan.onnx", meta, fill=1e35, self_difference=True)
    out = tmp_path / "p.csv"
    result = run(str(inputs / "a.png"), str(inputs / "c.jpg"), "--onnx", str(graph), "--model", str(checkpoint),
                 "--out", str(out))  # fmt: skip
    assert result.exit_code == 2, result.output
    rows = read_rows(out)
    assert all(r["decision"] == "" and "not finite" in r["error"] for r in rows.values()) and len(rows) == 2
    always_nan = crafted_onnx(tmp_path / "nan2.onnx", meta, fill=float("nan"))  # refused before any image is read
    result = run(str(inputs / "a.png"), "--onnx", str(always_nan), "--out", str(tmp_path / "q.csv"))
    assert result.exit_code == 1 and "two black images gives float32 [nan, nan]" in result.output
    assert not (tmp_path / "q.csv").exists()


def test_a_resume_checkpoint_is_one_clear_line(tmp_path, inputs, checkpoint):
    """issue 21: last.pt (no threshold chosen yet) gave KeyError 'value'."""
    meta = dict(load_checkpoint(checkpoint).meta, threshold={"value": None, "rule": "max_f1", "split": "val"})
    last = _with_state(tmp_path, checkpoint, "last.pt", meta=meta)
    result = run(str(inputs / "a.png"), "--model", str(last), "--out", str(tmp_path / "p.csv"))
    assert result.exit_code == 1 and "resume checkpoint written during training; screen with best.pt" in result.output
    assert not (tmp_path / "p.csv").exists()


def test_file_names_a_spreadsheet_would_run_are_escaped_in_the_csv(tmp_path, inputs, checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative names, as a user types them: the path cell starts with the name
    Path("=1+2.png").write_bytes((inputs / "a.png").read_bytes())
    Path("@evil.png").write_text("not an image")
    result = run("=1+2.png", "@evil.png", "--model", str(checkpoint), "--out", "p.csv", "--engine", "eager")
    assert result.exit_code == 2, result.output
    rows = read_rows(Path("p.csv"))
    assert set(rows) == {"'=1+2.png", "'@evil.png"}
    assert rows["'=1+2.png"]["decision"] in ("positive", "negative") and rows["'@evil.png"]["error"]


def test_out_as_a_dangling_link_is_refused_and_its_target_never_created(tmp_path, inputs, checkpoint):
    out = tmp_path / "pred.csv"
    out.symlink_to(tmp_path / "elsewhere.csv")
    result = run(str(inputs / "a.png"), "--model", str(checkpoint), "--out", str(out))
    assert result.exit_code == 1 and "symbolic link" in result.output and len(result.output.splitlines()) == 1
    assert not (tmp_path / "elsewhere.csv").exists() and out.is_symlink()


def test_a_link_planted_under_a_coming_heatmaps_name_is_refused_not_followed(tmp_path, inputs, checkpoint):
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / heatmap_name(inputs / "a.png")).symlink_to(victim)
    result = run(str(inputs / "a.png"), "--model", str(checkpoint), "--out", str(tmp_path / "p.csv"),
                 "--heatmaps", str(maps))  # fmt: skip
    assert result.exit_code == 1 and "symbolic link" in result.output and len(result.output.splitlines()) == 1
    assert victim.read_bytes() == b"precious"
    assert (maps / heatmap_name(inputs / "a.png")).is_symlink()


def _in_a_child(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with a deadline: a walk that blocks on a FIFO fails the test, never hangs it."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"timed out after {timeout} s: something blocked (a FIFO opened for reading?)")


def test_fifos_in_a_scanned_folder_are_error_rows_never_opened(tmp_path, inputs):
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "good.png").write_bytes((inputs / "a.png").read_bytes())
    os.mkfifo(folder / "a.png")  # named like an image: the read would block
    os.mkfifo(folder / "b")  # no suffix: the DICOM sniff would block
    code = (
        "import json; from pipeline.preprocess import PreprocessConfig; from train.screen.inputs import *\n"
        f"files, refused = collect_inputs([{str(folder)!r}, {str(folder / 'a.png')!r}])\n"
        f"cfg = PreprocessConfig.from_dict({PREPROCESS!r})\n"
        "print(json.dumps([[str(f) for f in files], refused, [load_or_reason(f, cfg) for f in files if f.name == 'a.png']]))"
    )
    result = _in_a_child(code)
    assert result.returncode == 0, result.stderr
    files, refused, named = json.loads(result.stdout)
    assert files == [str(folder / "a.png"), str(folder / "good.png")]  # a.png: only because it was named
    assert refused == [[str(folder / "a.png"), "a FIFO (named pipe), not a regular file: refused unopened"],
                       [str(folder / "b"), "a FIFO (named pipe), not a regular file: refused unopened"]]  # fmt: skip
    assert named == ["a FIFO (named pipe), not a regular file: refused unopened"]


def test_a_fifo_given_to_predict_is_an_error_row_and_exit_2(tmp_path, inputs, checkpoint):
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "good.png").write_bytes((inputs / "a.png").read_bytes())
    os.mkfifo(folder / "x.png")
    out = tmp_path / "p.csv"
    code = (
        "import sys; from typer.testing import CliRunner; from pipeline.cli import app\n"
        f"r = CliRunner().invoke(app, ['predict', {str(folder)!r}, '--model', {str(checkpoint)!r}, "
        f"'--out', {str(out)!r}, '--no-progress'])\n"
        "print(r.output); sys.exit(r.exit_code)"
    )
    result = _in_a_child(code, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    rows = read_rows(out)
    assert "not a regular file" in rows[str(folder / "x.png")]["error"]
    assert rows[str(folder / "good.png")]["decision"] in {"positive", "negative"}


def test_deeply_nested_folders_are_one_reason_not_a_recursion_error(tmp_path, inputs):
    deep = tmp_path / "deep"
    leaf = deep
    deep.mkdir()
    for _ in range(1100):  # deeper than the interpreter's recursion limit: os.walk (3.11) and `**` recurse
        leaf = leaf / "d"
        leaf.mkdir()  # one level at a time: os.makedirs recurses too
    (leaf / "x.png").write_bytes((inputs / "a.png").read_bytes())
    (deep / "top.png").write_bytes((inputs / "a.png").read_bytes())
    try:
        files, unmatched = collect_inputs([str(deep), str(deep) + "/**/*.png"])
    finally:  # bottom-up by hand: pytest's cleanup (shutil.rmtree, 3.11) would recurse 1,100 deep
        (leaf / "x.png").unlink()
        while leaf != deep:
            leaf.rmdir()
            leaf = leaf.parent
    assert files == []
    assert unmatched[0] == (str(deep), f"{deep} has folders nested more than {MAX_FOLDER_DEPTH} deep (at "
                            f"{deep}{'/d' * (MAX_FOLDER_DEPTH + 1)}); name a shallower folder")  # fmt: skip
    assert len(unmatched) == 2 and unmatched[1][0].endswith("**/*.png")


def test_a_shallow_tree_within_the_bounds_is_walked_whole(tmp_path, inputs):
    leaf = tmp_path / "tree" / Path(*["d"] * MAX_FOLDER_DEPTH)
    leaf.mkdir(parents=True)
    (leaf / "x.png").write_bytes((inputs / "a.png").read_bytes())
    files, unmatched = collect_inputs([str(tmp_path / "tree")])
    assert files == [leaf / "x.png"] and unmatched == []
