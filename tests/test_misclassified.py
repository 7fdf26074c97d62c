"""Fig. 8: which images count as misclassified, and the figure from evaluate's and report's data."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.params import load_params
from pipeline.shard_format import read_summary
from tests.conftest import make_tiny_shards
from tests.evaluation.test_evaluate import SIZE, _checkpoint, _params_file
from tests.test_figures import assert_picture
from train.evaluation.evaluate import evaluate_shards, write_outputs
from train.misclassified import select_misses


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_misses_are_wrong_for_every_model_most_confident_first():
    keys = ["a", "b", "c", "d", "e", "f"]
    labels = np.array([1, 1, 1, 0, 0, 0])
    probs = np.array([[0.10, 0.30, 0.20, 0.90, 0.60, 0.20],   # model 1, threshold 0.5
                      [0.05, 0.70, 0.35, 0.80, 0.70, 0.10]])  # model 2, threshold 0.4  # fmt: skip
    misses = select_misses(keys, labels, probs, [0.5, 0.4], list("ABCDEF"), per_kind=4)
    # b is right for model 2 (0.70 >= 0.4); f is right for both; the rest are wrong for both
    assert [(m.key, m.kind) for m in misses] == [("a", "FN"), ("c", "FN"), ("d", "FP"), ("e", "FP")]
    assert misses[0].probs == (0.10, 0.05) and misses[0].caption == "A"
    assert [m.key for m in select_misses(keys, labels, probs, [0.5, 0.4], list("ABCDEF"), per_kind=1)] == ["a", "d"]


@pytest.mark.slow
def test_report_draws_images_wrong_for_every_run_with_each_models_gradcam(tmp_path):
    shards = tmp_path / "shards"
    for variant in ("plain", "equalized"):  # same seed: the same keys and images in both variants
        make_tiny_shards(shards / variant, size=SIZE, variant=variant)
    params = load_params(_params_file(tmp_path))
    runs = tmp_path / "runs"
    wrong = []
    for name, variant, threshold in (("a-plain", "plain", 0.5), ("b-eq", "equalized", 0.5)):
        ckpt = _checkpoint(tmp_path / f"{name}.pt", variant, read_summary(shards / variant).preprocess, threshold)
        result = evaluate_shards(ckpt, shards / variant, params.evaluate, params.train, params.seed)
        write_outputs(result, runs / name / "eval.json", runs / name / "predictions_test.csv", None)
        shutil.copy(ckpt, runs / name / "best.pt")
        rows = list(csv.DictReader((runs / name / "predictions_test.csv").open()))
        wrong.append({r["key"] for r in rows if r["label"] != r["predicted_at_operating_threshold"]})
    out = tmp_path / "fig8.png"
    result = CliRunner().invoke(app, ["report", "--runs", str(runs), "--out", str(tmp_path / "tables.md"),
                                      "--misclassified", str(out), "--shards-root", str(shards)])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["misclassified"]
    both = wrong[0] & wrong[1]
    assert both, "an untrained net gets some of 8 images wrong; without any the figure test proves little"
    assert summary["images_wrong_for_every_model"] == len(both) and summary["models"] == 2
    assert summary["shown"] == min(len(both), 8)
    rows = max(summary["shown"], 1)
    assert_picture(out, (int(round(100 * (2.4 * 3 + 0.4))), int(round(100 * (2.4 * rows + 0.8)))), ink=0.2)


def test_report_needs_each_runs_predictions(tmp_path):
    runs = tmp_path / "runs" / "only-metrics"
    runs.mkdir(parents=True)
    (runs / "eval.json").write_text(json.dumps({"model": {"name": "resnet50", "variant": "plain"},
                                                "threshold": {"value": 0.5}, "val": {"macro": {"f1": 0.5}}}))  # fmt: skip
    result = CliRunner().invoke(app, ["report", "--runs", str(runs.parent), "--out", str(tmp_path / "t.md"),
                                      "--misclassified", str(tmp_path / "f.png")])  # fmt: skip
    assert result.exit_code == 1 and "predictions_test.csv" in result.output


@pytest.mark.slow
def test_evaluate_draws_fig8_from_shards_at_a_url(tmp_path, http_root):
    from train.evaluation.misclassified import FIGURE_NAME

    root, url = http_root
    shards = make_tiny_shards(root / "plain", size=SIZE)
    ckpt = _checkpoint(tmp_path / "best.pt", "plain", read_summary(shards).preprocess)
    figures = tmp_path / "figures"
    result = CliRunner().invoke(app, ["evaluate", "--model", str(ckpt), "--shards", f"{url}/plain",
                                      "--out", str(tmp_path / "eval.json"), "--figures", str(figures),
                                      "--params", str(_params_file(tmp_path))])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval.json").read_text())["shards"] == f"{url}/plain"
    assert (figures / FIGURE_NAME).stat().st_size > 0
