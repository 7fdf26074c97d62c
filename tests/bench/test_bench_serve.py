"""`cxr bench-serve`: the real `cxr serve` subprocess under concurrent clients beside predict, in one run."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.errors import CxrError
from pipeline.params import load_params
from pipeline.sample import generate_sample
from tests.conftest import REPO, sample_params
from train.bench.bench_serve import run_serve_benchmark


@pytest.mark.slow
def test_benchmark_serves_every_request_and_reports_against_predict(tmp_path):
    generate_sample(tmp_path / "root", sample_params(2, 2), seed=5)  # 8 images: PNG, JPEG, TIFF, 16-bit
    params = load_params(REPO / "params.yaml")
    small = dataclasses.replace(params.preprocess, size=64)  # seconds, not minutes; alexnet needs >= 63 px
    params = dataclasses.replace(params, preprocess=small)
    result = run_serve_benchmark(params, tmp_path / "root", None, "alexnet", clients=3, requests=12,
                                 warmup_per_client=1)  # fmt: skip
    assert result["requests"] == 12 and result["distinct_files"] == 8
    assert result["errors"] == 0 and result["predict_failed"] == 0
    # both rates are printed to 2 decimals: at a few images/s that rounding alone moves their ratio by ~1%
    assert result["serve_vs_predict"] == pytest.approx(
        result["serve_images_per_s"] / result["predict_images_per_s"], rel=0.03, abs=0.01)
    latency = result["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    rss = result["server_rss_mb"]
    assert rss["before"] > 50 and rss["growth"] == pytest.approx(rss["after"] - rss["before"], abs=0.1)


def test_fewer_requests_than_clients_is_refused(tmp_path):
    with pytest.raises(CxrError, match="requests >= clients"):
        run_serve_benchmark(load_params(REPO / "params.yaml"), tmp_path, None, "alexnet", clients=8, requests=2)
