"""ONNX export: every architecture exports, carries its meta, and matches PyTorch within 1e-4."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import CxrError
from pipeline.params import load_params
from pipeline.preprocess import PreprocessConfig, preprocess_bytes
from train import export as export_mod
from train.checkpoint import detached_state_dict, load_checkpoint, make_meta, save_checkpoint
from train.export import TOLERANCE, export_onnx, onnx_meta, onnx_probabilities, onnx_session, verify
from train.models import build_model
from train.onnx_contract import EXPORTED_OPS

from tests.conftest import REPO, make_tiny_shards

SLOW = pytest.mark.slow
PREPROCESS = PreprocessConfig.for_variant(load_params(REPO / "params.yaml").preprocess, "equalized").to_dict()


def make_checkpoint(
    path: Path,
    name: str,
    threshold: float = 0.4,
    seed: int = 0,
    calibration: np.ndarray | None = None,
    head_scale: float = 1.0,
) -> Path:
    """A checkpoint of a randomly initialised net whose BatchNorm statistics were set on
    `calibration` (uint8 (N, 224, 224); default: random images), so its logits on such images
    are O(1) like a trained net's. With the default statistics an untrained InceptionV3
    outputs logits ~1e11 and every probability is exactly 0 or 1.

    `head_scale` multiplies the final layer: a random InceptionV3 is numerically sensitive
    (PyTorch's own float32 logit differs from float64 by ~2e-3), so no float32 runtime can
    match it to 1e-4 in probability; a smaller head scales that noise down with the logit."""
    torch.manual_seed(seed)
    model = build_model(name)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the calibration batch
    if calibration is None:
        calibration = np.random.default_rng(seed).integers(0, 256, (4, 224, 224), dtype=np.uint8)
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(calibration[:, None]).float() / 255.0)
        head = model.backbone.classifier if name in ("alexnet", "vgg16", "densenet121") else model.backbone.fc
        for param in (head[-1] if isinstance(head, torch.nn.Sequential) else head).parameters():
            param.mul_(head_scale)
    meta = make_meta(
        model=name,
        variant="equalized",
        input_size=224,
        preprocess=PREPROCESS,
        params={},
        threshold={"value": threshold, "rule": "max_f1", "split": "val"},
        epoch=0,
        val_loss=None,
    )
    save_checkpoint(path, meta, detached_state_dict(model))
    return path


def export(directory: Path, name: str) -> tuple[Path, Path]:
    ckpt_path = make_checkpoint(directory / f"{name}.pt", name, head_scale=0.01 if name == "inceptionv3" else 1.0)
    out = export_onnx(ckpt_path, directory / "out" / f"{name}.onnx")
    assert out == directory / "out" / f"{name}.onnx" and out.is_file()
    return ckpt_path, out


@pytest.fixture(scope="module")
def resnet50_onnx(tmp_path_factory) -> tuple[Path, Path]:
    return export(tmp_path_factory.mktemp("resnet50"), "resnet50")


def check_export(name: str, ckpt_path: Path, out: Path) -> None:
    assert not list(out.parent.glob("*.tmp")) and not list(out.parent.glob("*.data"))  # one self-contained file

    session = onnx_session(out, providers=["CPUExecutionProvider"])
    meta = onnx_meta(session, out)
    ckpt = load_checkpoint(ckpt_path)
    assert meta["checkpoint_sha256"] == ckpt.file_sha256()
    assert (meta["model"], meta["variant"], meta["threshold"], meta["preprocess"]) == (
        name, "equalized", ckpt.meta["threshold"], PREPROCESS,
    )  # fmt: skip
    check = meta["onnx"]["verification"]
    assert check["max_abs_diff_probability"] <= TOLERANCE and check["max_scaled_diff_logit"] <= TOLERANCE
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == ["logit"]

    # a batch size never seen at export, compared here independently of export's own check
    images = np.random.default_rng(7).integers(0, 256, (5, 224, 224), dtype=np.uint8)
    got = onnx_probabilities(session, images)
    with torch.inference_mode():
        expected = torch.sigmoid(ckpt.build()(torch.from_numpy(images[:, None]).float() / 255.0)).numpy()
    assert got.shape == (5,)
    assert np.abs(got - expected).max() <= TOLERANCE
    assert np.ptp(expected) > 1e-4  # the calibrated net does discriminate, so the check above is not vacuous

    graph = onnx.load(str(out), load_external_data=False).graph
    written = {(node.domain, node.op_type) for node in graph.node}
    assert written <= EXPORTED_OPS, written - EXPORTED_OPS  # the contract's op list covers what we export
    if name == "inceptionv3":  # the 224 -> 299 upsampling is inside the graph
        assert any(node.op_type in ("Resize", "Upsample") for node in graph.node)


@SLOW
def test_export_matches_pytorch_resnet50(resnet50_onnx):
    check_export("resnet50", *resnet50_onnx)


@SLOW
@pytest.mark.parametrize("name", ["alexnet", "densenet121", "inceptionv3", "vgg16"])  # vgg16: a 540 MB file
def test_export_matches_pytorch_other_architectures(tmp_path, name):
    check_export(name, *export(tmp_path, name))


@SLOW
def test_verify_catches_a_different_network(tmp_path, resnet50_onnx):
    _, out = resnet50_onnx
    other = load_checkpoint(make_checkpoint(tmp_path / "b.pt", "resnet50", seed=1)).build()
    with pytest.raises(CxrError, match="differs from PyTorch") as failure:
        verify(other, onnx_session(out, providers=["CPUExecutionProvider"]), 224)
    assert "Against PyTorch in float64" in str(failure.value) and "not the export wrong" not in str(failure.value)


@SLOW
def test_falls_back_to_torchscript_exporter(tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def dynamo_breaks(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("simulated dynamo failure")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(export_mod.torch.onnx, "export", dynamo_breaks)
    out = export_onnx(make_checkpoint(tmp_path / "m.pt", "resnet50"), tmp_path / "m.onnx")
    meta = onnx_meta(onnx_session(out), out)
    assert meta["onnx"]["exporter"] == "torchscript"
    assert meta["onnx"]["verification"]["max_abs_diff_probability"] <= TOLERANCE


def test_missing_or_foreign_onnx_is_a_clear_error(tmp_path):
    with pytest.raises(CxrError, match="not found"):
        onnx_session(tmp_path / "none.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(CxrError, match="cannot load ONNX"):
        onnx_session(tmp_path / "junk.onnx")
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [value("x", onnx.TensorProto.FLOAT, [1])], [value("y", onnx.TensorProto.FLOAT, [1])],
    )  # fmt: skip
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)]), tmp_path / "f.onnx")
    with pytest.raises(CxrError, match="not written by `cxr export`"):
        onnx_meta(onnx_session(tmp_path / "f.onnx"), tmp_path / "f.onnx")


@SLOW
def test_export_cli_verifies_on_shard_test_images_read_from_a_url(tmp_path, http_root):
    root, url = http_root
    make_tiny_shards(root / "equalized", per_class={"train": 1, "val": 1, "test": 3}, size=224)
    ckpt = make_checkpoint(tmp_path / "best.pt", "resnet50")
    out = tmp_path / "model.onnx"
    args = ["export", "--model", str(ckpt), "--out", str(out), "--verify-shards", f"{url}/equalized",
            "--verify-count", "5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # progress and notes go to stderr
    assert report["checkpoint_sha256"] == load_checkpoint(ckpt).file_sha256()
    assert report["verification"]["inputs"] == 1 + 3 + 5  # two random batches + 5 of the 6 test images
    assert report["verification"]["max_abs_diff_probability"] <= TOLERANCE


def test_export_cli_missing_checkpoint_exits_1(tmp_path):
    result = CliRunner().invoke(app, ["export", "--model", str(tmp_path / "no.pt"), "--out", str(tmp_path / "x.onnx")])
    assert result.exit_code == 1 and "checkpoint not found" in result.output
    assert not (tmp_path / "x.onnx").exists()


@SLOW
@pytest.mark.real_data
def test_onnx_matches_pytorch_on_real_test_images(tmp_path, covidx_mini):
    """Within TOLERANCE on real test images, preprocessed by the pipeline's own functions."""
    cfg = PreprocessConfig.from_dict(PREPROCESS)
    names = [line.split()[1] for line in (covidx_mini / "test.txt").read_text().splitlines() if line.strip()]
    images = np.stack([preprocess_bytes((covidx_mini / "test" / n).read_bytes(), cfg) for n in names])
    # BatchNorm set on these very images: logits O(1) on them, so probabilities are not saturated
    ckpt_path = make_checkpoint(tmp_path / "m.pt", "resnet50", calibration=images[::4])
    out = export_onnx(ckpt_path, tmp_path / "m.onnx", verify_images=images[:16])  # all of them are checked below

    meta = onnx_meta(onnx_session(out), out)
    assert meta["onnx"]["verification"]["inputs"] == 4 + 16
    got = onnx_probabilities(onnx_session(out, providers=["CPUExecutionProvider"]), images)
    with torch.inference_mode():
        x = torch.from_numpy(images[:, None]).float().div_(255.0)
        expected = torch.sigmoid(load_checkpoint(ckpt_path).build()(x)).numpy()
    print(f"real test images: {len(images)}, max |P_onnx - P_torch| = {np.abs(got - expected).max():.3g}")
    assert np.abs(got - expected).max() <= TOLERANCE
    assert 0.01 < np.median(expected) < 0.99 and np.ptp(expected) > 1e-3  # not a saturated, vacuous comparison


@pytest.mark.slow
def test_export_never_overwrites_a_file_it_did_not_write(tmp_path, resnet50_onnx):
    from train.export import _check_replaceable

    notes = tmp_path / "notes.onnx"
    notes.write_text("my notes")
    with pytest.raises(CxrError, match="not an ONNX model written by `cxr export`"):
        _check_replaceable(notes)
    _check_replaceable(resnet50_onnx[1])  # our own export may be replaced


def crafted_onnx(path: Path, meta: dict, *, fill: float = 0.0, input_name: str = "image", channels: int = 1,
                 batch: str | int = "batch", columns: int = 1, output_name: str = "logit",
                 extra: tuple = (), self_difference: bool = False) -> Path:  # fmt: skip
    """A hand-made ONNX file carrying `meta` as `cxr export` stores it: image -> Conv (every weight
    `fill`) -> Reshape -> logit. The keywords break the project's contract one way at a time;
    `extra`: (nodes, initializers, outputs) appended to the graph; `self_difference`: logit = x - x,
    so a huge `fill` gives inf - inf = NaN for a real image yet 0 for the black probe images."""
    from onnx import TensorProto, helper, numpy_helper

    size = meta["input_size"]
    weight = numpy_helper.from_array(np.full((columns, channels, size, size), fill, np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1] if columns == 1 else [-1, columns], np.int64), "shape")
    nodes = [helper.make_node("Conv", [input_name, "w"], ["conv"]),
             helper.make_node("Reshape", ["conv", "shape"], ["x" if self_difference else output_name])]  # fmt: skip
    if self_difference:
        nodes.append(helper.make_node("Sub", ["x", "x"], [output_name]))
    out_shape = [batch] if columns == 1 else [batch, columns]
    inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, channels, size, size])]
    outputs = [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, out_shape)]
    more_nodes, more_inits, more_outputs = extra or ([], [], [])
    graph = helper.make_graph(nodes + list(more_nodes), "crafted", inputs, outputs + list(more_outputs),
                              [weight, shape, *more_inits])  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", export_mod.OPSET)])
    proto.ir_version = 9
    proto.producer_name = "cxr-screen"
    full = {**meta, "checkpoint_sha256": "0" * 64,
            "onnx": {"exporter": "crafted", "opset": export_mod.OPSET, "input": "image", "output": "logit"}}  # fmt: skip
    entry = proto.metadata_props.add()
    entry.key, entry.value = export_mod.META_KEY, json.dumps(full)
    path.write_bytes(proto.SerializeToString())
    return path


def test_export_holds_its_folder_and_removes_the_temps_a_killed_export_left(tmp_path, monkeypatch):
    import re

    from pipeline.fileio import output_lock

    ckpt = make_checkpoint(tmp_path / "r.pt", "resnet50")
    out = tmp_path / "out"
    (out / ".model.onnx.k9abcdef.tmp").mkdir(parents=True)  # the work folder of an export killed mid-trace
    (out / ".model.onnx.k9abcdef.tmp" / "graph.onnx").write_bytes(b"\0" * 4096)
    (out / ".model.onnx.k9zzzzzz.tmp").write_bytes(b"half a model")  # killed mid-write
    (out / "notes.tmp").write_text("a user's file")
    with output_lock(out):  # stands in for an export (or a training) still writing this folder
        with pytest.raises(CxrError, match="another run is writing"):
            export_onnx(ckpt, out / "model.onnx")
    assert len(list(out.iterdir())) == 4  # nothing removed while another run held the folder
    seen = []

    def stop_at_trace(model, size, path, outputs):
        seen.append(sorted(p.name for p in out.iterdir()))
        raise CxrError("stopped at the trace")

    monkeypatch.setattr(export_mod, "export_graph", stop_at_trace)
    with pytest.raises(CxrError, match="stopped at the trace"):
        export_onnx(ckpt, out / "model.onnx")
    (lock, work, notes), = seen
    assert (lock, notes) == (".cxr.lock", "notes.tmp") and re.fullmatch(r"\.model\.onnx\.[a-z0-9_]{8}\.tmp", work)
    assert sorted(p.name for p in out.iterdir()) == [".cxr.lock", "notes.tmp"]  # its own work folder went too
