"""`cxr bench-latency`: each network and thread count against the floor measured in the same run."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_bench_latency_prints_each_network_and_thread_count_against_its_floor(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["latency"] = {"threads": 0, "warmup": 1, "runs": 2, "batch": 32}
    raw["preprocess"]["size"] = 64  # small images: the benchmark's logic, not its figures, is under test
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["bench-latency", "--arch", "alexnet,resnet50", "--threads", "1",
                                      "--rounds", "2", "--params", str(params)])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    # two rounds, one row per network and thread count: the fastest time of each path is kept
    assert report["rounds"] == 2
    assert [(r["model"], r["threads"]) for r in report["rows"]] == [("alexnet", 1), ("resnet50", 1)]
    for row in report["rows"]:
        assert row["floor_ms"] > 0 and row["eager_ms"] > 0 and row["onnxruntime_ms"] > 0
        assert row["fastest"] in ("eager", "onnxruntime")
        assert row["fastest_ratio_to_floor"] == pytest.approx(row[f"{row['fastest']}_ms"] / row["floor_ms"])
    # resnet50 costs more than alexnet at the same size, and its floor says so
    assert report["rows"][1]["floor_ms"] > report["rows"][0]["floor_ms"]


@pytest.mark.parametrize("args, message", [(["--arch", "lenet"], "bench-latency: --arch from"),
                                           (["--threads", "0"], "positive integers"),
                                           (["--threads", "two"], "positive integers"),
                                           (["--rounds", "0"], "--rounds >= 1")])  # fmt: skip
def test_bench_latency_refuses_unknown_networks_and_bad_thread_counts(args, message):
    result = CliRunner().invoke(app, ["bench-latency", *args])
    assert result.exit_code != 0 and message in result.output
