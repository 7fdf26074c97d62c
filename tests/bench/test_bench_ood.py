"""`cxr bench-ood`: the gate's ROC AUC and flagged shares, radiographs against skimage.data, noise and blanks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from pipeline.cli import app
from train.bench.bench_ood import SKIMAGE, non_radiographs, radiographs
from train.screen.api import Screener
from train.screen.inputs import load_image
from train.screen.screening_model import ScreeningModel
from tests.test_export import make_checkpoint
from tests.test_ood import gate_checkpoint


def test_the_non_radiographs_are_all_readable_offline_and_of_every_kind():
    others = non_radiographs()
    kinds = {kind for kind, _, _ in others}
    assert kinds == set(SKIMAGE) | {"noise", "blank"}
    assert all(pixels.dtype == np.uint8 and min(pixels.shape[:2]) >= 64 for _, _, pixels in others)
    assert len({name for _, name, _ in others}) == len(others)


@pytest.mark.slow
def test_bench_ood_reports_the_gate_s_auroc_and_flagged_shares(tmp_path, covidx_mini):
    model = make_checkpoint(tmp_path / "m.pt", "resnet50")
    config = ScreeningModel.open(model, None, False, torch.device("cpu"), "eager").config
    xrays = radiographs(covidx_mini)
    gate_checkpoint(model, np.stack([load_image(p, config) for p in xrays[:18]]))
    result = CliRunner().invoke(app, ["bench-ood", "--model", str(model), "--root", str(covidx_mini),
                                      "--engine", "eager"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    others = non_radiographs()
    assert report["radiographs"]["n"] == len(xrays) and report["non_radiographs"]["n"] == len(others)
    assert sum(k["n"] for k in report["non_radiographs"]["by_kind"].values()) == len(others)

    # the same numbers from the Python API's own scores
    screener = Screener(model, device="cpu", engine="eager")
    inside = screener.predict([str(p) for p in xrays])
    outside = screener.predict([pixels for _, _, pixels in others])
    scores = [r.ood_score for r in inside + outside]
    assert report["auroc"] == pytest.approx(roc_auc_score([0] * len(inside) + [1] * len(outside), scores))
    assert report["radiographs"]["flagged_share"] == pytest.approx(np.mean([r.out_of_distribution for r in inside]))
    assert report["non_radiographs"]["flagged_share"] == pytest.approx(
        np.mean([r.out_of_distribution for r in outside]))


def test_a_model_without_a_gate_is_refused_in_one_line(tmp_path, covidx_mini):
    model = make_checkpoint(tmp_path / "old.pt", "resnet50")
    result = CliRunner().invoke(app, ["bench-ood", "--model", str(model), "--root", str(covidx_mini),
                                      "--engine", "eager"])  # fmt: skip
    assert result.exit_code == 1 and "has no out-of-distribution gate" in result.output
