"""`cxr bench-screen`: evaluate --root end to end, default engine against eager, in one run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.params import load_params
from pipeline.sample import generate_sample
from tests.conftest import REPO, sample_params
from train.bench.bench_screen import replicate_root, run_screen_benchmark


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    generate_sample(root, sample_params(2, 2), seed=5)  # 8 images: PNG, JPEG, TIFF, 16-bit, odd sizes
    return root


def test_the_replicated_root_cycles_every_labelled_image(sample_root, tmp_path):
    layout = replicate_root(sample_root, tmp_path / "r", 19)
    lines = (tmp_path / "r" / "test.txt").read_text().splitlines()
    assert layout == {"images": 19, "distinct_files": 8} and len(lines) == 19
    names = [line.split()[1] for line in lines]
    assert len(set(names)) == 19 and all((tmp_path / "r" / "test" / n).is_file() for n in names)
    first, ninth = (tmp_path / "r" / "test" / names[0]), (tmp_path / "r" / "test" / names[8])
    assert first.read_bytes() == ninth.read_bytes()  # the 9th is the 1st again
    assert lines[0].split()[2] == lines[8].split()[2]  # with its label


@pytest.mark.slow
def test_benchmark_times_both_engines_on_the_same_images(sample_root):
    params = load_params(REPO / "params.yaml")
    small = dataclasses.replace(params.preprocess, size=32)  # seconds, not minutes, on a busy CPU
    params = dataclasses.replace(params, preprocess=small,
                                 evaluate=dataclasses.replace(params.evaluate, bootstrap=20, batch_size=8))
    torch.set_num_threads(1)
    result = run_screen_benchmark(params, sample_root, images=20, checkpoint=None, arch="densenet121")
    assert result["scored"] + result["rejected"] == 20 and result["scored"] >= 16
    assert result["default_engine"]["engine"] == "onnxruntime" and result["default_engine"]["first_batch_check"]["ok"]
    assert result["eager_images_per_s"] > 0 and result["default_images_per_s"] > 0
    assert result["default_vs_eager"] == pytest.approx(result["default_images_per_s"] / result["eager_images_per_s"],
                                                       abs=0.01)
    auc = result["roc_auc"]
    assert auc["eager"] == pytest.approx(auc["auto"], abs=1e-3)  # same predictions from both engines


def test_cli_refuses_a_zero_image_benchmark(sample_root, tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["bench-screen", "--root", str(sample_root), "--images", "0",
                                      "--params", str(tmp_path / "p.yaml")])
    assert result.exit_code == 1 and "images and rounds must be >= 1" in result.output
