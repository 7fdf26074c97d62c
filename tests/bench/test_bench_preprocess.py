import dataclasses

import cv2
import numpy as np
import pytest

from pipeline.bench.bench_preprocess import naive_pil, run_preprocess_benchmark
from pipeline.params import load_params
from pipeline.preprocess import PreprocessConfig
from pipeline.sample import generate_sample
from tests.conftest import sample_params

PARAMS = load_params("params.yaml")


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench") / "sample"
    generate_sample(root, sample_params(train=5, test=2), seed=7)
    return root


def test_naive_baseline_produces_the_same_kind_of_output(sample_root):
    cfg = PreprocessConfig.for_variant(PARAMS.preprocess, "equalized")
    largest = max((sample_root / "train").iterdir(), key=lambda p: p.stat().st_size)
    png = cv2.imdecode(np.frombuffer(naive_pil(str(largest), cfg), np.uint8), cv2.IMREAD_UNCHANGED)
    assert png.shape == (224, 224) and png.dtype == np.uint8


@pytest.mark.slow
def test_benchmark_reports_three_rates_over_every_image(sample_root):
    lines = sum(len((sample_root / f"{s}.txt").read_text().splitlines()) for s in ("train", "test"))
    shard = dataclasses.replace(PARAMS.shard, workers=2)
    result = run_preprocess_benchmark(sample_root, PARAMS.preprocess, shard, repeat=1)
    assert result["images"] == lines and result["workers"] == 2 and result["rounds"] == 1
    rates = [result[k] for k in ("pipeline_images_per_s", "decode_only_images_per_s", "naive_pil_single_process_images_per_s")]
    assert all(r > 0 for r in rates)
    assert result["pipeline_vs_naive"] == pytest.approx(rates[0] / rates[2], abs=0.02)
    assert result["pipeline_vs_decode_only"] == pytest.approx(rates[0] / rates[1], abs=0.02)
    assert result["single_process_steps"]["images_timed"] > 0


def test_step_costs_time_every_step_of_a_shard_worker(sample_root):
    from pipeline.bench.bench_preprocess import step_costs

    cfg = PreprocessConfig.for_variant(PARAMS.preprocess, "equalized")
    relatives = [f"train/{p.name}" for p in sorted((sample_root / "train").iterdir())]
    result = step_costs(sample_root, relatives + ["train/missing.png"], cfg)
    steps = result["per_image_ms"]
    assert list(steps) == ["read_inside_root", "read_plain", "sha256", "decode", "preprocess", "png_encode"]
    assert 0 < result["images_timed"] <= len(relatives) and all(v >= 0 for v in steps.values())
    assert steps["decode"] > 0 and steps["png_encode"] > 0
    floor = steps["read_plain"] + steps["decode"]
    stage = floor - steps["read_plain"] + steps["read_inside_root"] + steps["sha256"] + steps["preprocess"] + steps["png_encode"]
    assert result["stage_ceiling_vs_decode_only"] == pytest.approx(floor / stage, abs=0.01)
    assert 0 < result["stage_ceiling_vs_decode_only"] < 1  # the stage does the floor's work and more
