"""train/evaluation/latency.py: the JSON a `latency` run writes, on a small input and few runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import CxrError
from pipeline.params import LatencyParams
from tests.conftest import REPO
from train.evaluation import latency
from train.checkpoint import make_meta, save_checkpoint
from train.export import TOLERANCE
from train.models import build_model, inference_param_count

QUICK = LatencyParams(threads=1, warmup=1, runs=3, batch=2)


def test_a_path_is_correct_only_within_1e_4_of_eager():
    ref = np.array([0.5, 2.0, -3.0], dtype=np.float32)
    x1, xb = torch.zeros(1), torch.zeros(2)

    def result(offset: float, scale: float = 1.0):
        r = ref * scale
        return latency._path_result(lambda x: r[:1] + offset if len(x) == 1 else r[1:], x1, xb, r, QUICK)

    assert result(0.0)["correct"] and result(5e-5)["correct"]
    assert not result(1e-3)["correct"]
    assert result(1e-3)["max_abs_diff"] == pytest.approx(1e-3, rel=1e-4)
    # logits of an untrained InceptionV3 (~1e11): the bound is relative to their scale
    assert result(1e5, scale=1e11)["correct"] and not result(1e8, scale=1e11)["correct"]


def test_paths_must_include_eager_and_be_known():
    model = build_model("densenet121")
    with pytest.raises(CxrError, match="must include eager"):
        latency.cpu_paths(model, 32, QUICK, ("onnxruntime",))
    with pytest.raises(CxrError, match="must include eager"):
        latency.cpu_paths(model, 32, QUICK, ("eager", "tensorrt"))


@pytest.mark.slow
def test_latency_cli_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the ONNX cache predict and evaluate share
    torch.manual_seed(0)
    net = build_model("densenet121")
    ckpt = tmp_path / "best.pt"
    meta = make_meta(model="densenet121", variant="plain", input_size=32, preprocess={"size": 32}, params={},
                     threshold={"value": 0.5, "rule": "fixed", "split": "val"}, epoch=1, val_loss=None)  # fmt: skip
    save_checkpoint(ckpt, meta, net.state_dict())
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["latency"] = {"threads": 1, "warmup": 1, "runs": 3, "batch": 2}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    out = tmp_path / "metrics" / "latency.json"

    result = CliRunner().invoke(app, ["latency", "--model", str(ckpt), "--out", str(out), "--params", str(params)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())

    assert report["params_m"] == pytest.approx(inference_param_count(net) / 1e6)
    assert report["model"] == "densenet121" and report["variant"] == "plain" and report["input_size"] == 32
    assert report["cpu_threads"] == 1 and report["batch"] == 2 and report["runs"] == 3
    assert report["cpu_ms_per_image"] > 0 and report["cpu_images_per_s_batch"] > 0
    assert report["cpu_ms_per_image"] == report["cpu_paths"]["eager"]["ms_per_image"]
    assert report["gflops"] > 0 and report["peak_gflops_fp32"] > 0
    probes = report["peak_probes"]
    rates = [p[k] for p in probes.values() for k in ("gflops_wall", "gflops_on_cpu", "gflops_one_thread_x_threads")]
    assert len(probes) == 2 and report["peak_gflops_fp32"] == max(rates)
    for path in report["cpu_paths"].values():
        assert path["on_cpu_ms_per_image"] > 0 and 0 < path["cpu_share"] < 1.5
    assert report["cpu_share_min"] == min(p["cpu_share"] for p in report["cpu_paths"].values())
    assert report["floor_ms"] == pytest.approx(report["gflops"] / report["peak_gflops_fp32"] * 1e3)
    assert report["cpu_ratio_to_floor"] == pytest.approx(report["cpu_ms_per_image"] / report["floor_ms"])
    ort = report["cpu_paths"]["onnxruntime"]
    assert ort["correct"] and ort["max_scaled_diff"] <= TOLERANCE, ort
    fastest = report["cpu_fastest_path"]
    assert fastest in ("eager", "onnxruntime")
    assert report["cpu_fastest_ms_per_image"] == min(p["ms_per_image"] for p in report["cpu_paths"].values())
    assert report["cpu_model"] and report["torch_version"] == torch.__version__
    assert len(report["checkpoint_sha256"]) == 64
    # ONNX Runtime timed the checkpoint's file in the cache, where predict and evaluate find it
    assert report["onnx_graph"] == "the checkpoint's, from the ONNX cache"
    assert (tmp_path / "cache" / "cxr-screen" / "onnx" / f"{report['checkpoint_sha256']}.onnx").is_file()
    # a second run takes it from there: nothing is exported again
    monkeypatch.setattr("train.export.export_graph", lambda *a, **k: pytest.fail("exported again"))
    monkeypatch.setattr(latency, "export_graph", lambda *a, **k: pytest.fail("exported again"))
    again = CliRunner().invoke(app, ["latency", "--model", str(ckpt), "--out", str(out), "--params", str(params)])
    assert again.exit_code == 0, again.output
    assert json.loads(out.read_text())["cpu_paths"]["onnxruntime"]["correct"]
    if not torch.cuda.is_available():
        assert report["gpu_ms_per_image"] is None and "CUDA" in report["gpu_note"]
    else:
        assert report["gpu_ms_per_image"] > 0
