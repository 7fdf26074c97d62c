"""The ONNX graph contract (train/onnx_contract.py): crafted files that break it one way at a time are
refused with their reason before (or, for what only running shows, right after) a session is made."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.errors import CxrError
from train.export import OPSET, onnx_probabilities, onnx_session
from train.onnx_contract import MAX_SHAPE_ELEMENTS

S = 32  # the smallest input size a checkpoint may declare: small files, fast sessions


def graph_file(path: Path, *, nodes=None, inits=(), input_name="image", in_shape=("batch", 1, S, S),
               out_shape=("batch",), out_type=TensorProto.FLOAT, fill: float = 0.01,
               external: str | None = None) -> Path:  # fmt: skip
    """image -> Conv (one (1, 1, S, S) filter of `fill`) -> Reshape [-1] -> logit, unless `nodes` replace it.
    `external`: the filter's data written beside the file under that name (onnx's own external-data writer)."""
    weight = numpy_helper.from_array(np.full((1, in_shape[1], S, S), fill, np.float32), "w")
    flat = numpy_helper.from_array(np.array([-1], np.int64), "flat")
    if nodes is None:
        nodes = [helper.make_node("Conv", [input_name, "w"], ["conv"]), helper.make_node("Reshape", ["conv", "flat"], ["logit"])]
    graph = helper.make_graph(nodes, "crafted", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("logit", out_type, out_shape)], [weight, flat, *inits])  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = 9
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, location=external)  # the filter (4 KiB) goes out, the shape stays in
    else:
        path.write_bytes(proto.SerializeToString())
    return path


def refused(path: Path, reason: str) -> None:
    with pytest.raises(CxrError, match=reason) as failure:
        onnx_session(path, providers=["CPUExecutionProvider"], input_size=S)
    assert "\n" not in str(failure.value) and str(path) in str(failure.value)


def test_a_graph_of_the_contract_is_accepted_and_scores_one_probability_per_image(tmp_path):
    session = onnx_session(graph_file(tmp_path / "ok.onnx"), providers=["CPUExecutionProvider"], input_size=S)
    images = np.full((3, S, S), 255, np.uint8)
    assert onnx_probabilities(session, images) == pytest.approx([1 / (1 + np.exp(-0.01 * S * S))] * 3)


def test_the_issues_graphs_are_refused_with_their_reason(tmp_path):
    # one logit for a batch of two: declared (batch,), but all images pooled into one number
    pooled = [helper.make_node("ReduceMean", ["image"], ["g"]), helper.make_node("Reshape", ["g", "flat"], ["logit"])]
    refused(graph_file(tmp_path / "one.onnx", nodes=pooled),
            r"a batch of two images gives output shape \(1,\), expected \(2,\): one logit per image")
    refused(graph_file(tmp_path / "cols.onnx", out_shape=("batch", 2)), r"'logit' has shape \['batch', 2\], expected rank 1")
    refused(graph_file(tmp_path / "rgb.onnx", in_shape=("batch", 3, S, S)),
            rf"input shape \['batch', 3, {S}, {S}\], expected \[batch, 1, {S}, {S}\]")
    refused(graph_file(tmp_path / "name.onnx", input_name="pixels"), r"inputs \['pixels'\], expected exactly one named 'image'")


def test_shape_type_and_batch_breaches_are_refused(tmp_path):
    refused(graph_file(tmp_path / "size.onnx", in_shape=("batch", 1, 64, 64)), r"input shape \['batch', 1, 64, 64\]")
    refused(graph_file(tmp_path / "fixed.onnx", in_shape=(2, 1, S, S)), "fixed batch of 2, expected a dynamic batch axis")
    refused(graph_file(tmp_path / "double.onnx", out_type=TensorProto.DOUBLE), "'logit' is DOUBLE, expected a float32 tensor")
    refused(graph_file(tmp_path / "nan.onnx", fill=float("nan")), r"two black images gives float32 \[nan, nan\]")


def test_graphs_that_would_allocate_without_bound_are_refused_before_they_run(tmp_path):
    # ConstantOfShape of 2^36 floats: no exporter of ours writes the op, so it is refused by name
    huge = numpy_helper.from_array(np.array([2**36], np.int64), "huge")
    fill = [helper.make_node("ConstantOfShape", ["huge"], ["big"]), helper.make_node("Conv", ["image", "w"], ["conv"]),
            helper.make_node("Reshape", ["conv", "flat"], ["logit"])]  # fmt: skip
    refused(graph_file(tmp_path / "cos.onnx", nodes=fill, inits=[huge]), "operator ConstantOfShape .* is not one `cxr export` writes")
    expand = [helper.make_node("Expand", ["image", "huge"], ["big"]), *fill[1:]]
    refused(graph_file(tmp_path / "expand.onnx", nodes=expand, inits=[huge]), "operator Expand")
    # an op the exporter does write, asked for a shape of 2^36 elements
    wide = numpy_helper.from_array(np.array([2**12, 2**12, 2**12], np.int64), "wide")
    reshape = [helper.make_node("Reshape", ["image", "wide"], ["big"]), *fill[1:]]
    refused(graph_file(tmp_path / "reshape.onnx", nodes=reshape, inits=[wide]),
            f"Reshape node .* asks for shape \\[4096, 4096, 4096\\], over {MAX_SHAPE_ELEMENTS} elements")
    as_attribute = [helper.make_node("Constant", [], ["wide"], value_ints=[2**12, 2**12, 2**12]), *reshape]
    refused(graph_file(tmp_path / "attr.onnx", nodes=as_attribute), "Reshape node .* asks for shape \\[4096, 4096, 4096\\]")
    scales = numpy_helper.from_array(np.array([1, 1, 1e4, 1e4], np.float32), "scales")
    resize = [helper.make_node("Resize", ["image", "", "scales"], ["big"]), *fill[1:]]
    refused(graph_file(tmp_path / "resize.onnx", nodes=resize, inits=[scales]), r"Resize node .* scales by \[1.0, 1.0, 10000.0")
    loop = [helper.make_node("Loop", ["n", "c"], ["x"], body=helper.make_graph([], "b", [], [])), *fill[1:]]
    refused(graph_file(tmp_path / "loop.onnx", nodes=loop), "operator Loop")


def test_external_data_must_lie_inside_the_models_folder_with_no_link(tmp_path):
    inside = tmp_path / "model"
    inside.mkdir()
    good = graph_file(inside / "ok.onnx", external="ok.weights")
    session = onnx_session(good, providers=["CPUExecutionProvider"], input_size=S)  # onnx's own layout is accepted
    assert onnx_probabilities(session, np.zeros((2, S, S), np.uint8)).shape == (2,)

    secret = tmp_path / "secret.bin"
    secret.write_bytes((inside / "ok.weights").read_bytes())
    for name, location in (("up", "../secret.bin"), ("abs", str(secret)), ("deep", "sub/../../secret.bin")):
        path = graph_file(inside / f"{name}.onnx", external=f"{name}.weights")
        proto = onnx.load(str(path), load_external_data=False)
        for entry in proto.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        path.write_bytes(proto.SerializeToString())
        refused(path, f"keeps its data at '{location}', outside the model's folder")

    linked = graph_file(inside / "link.onnx", external="link.weights")
    (inside / "link.weights").unlink()
    os.symlink(secret, inside / "link.weights")
    refused(linked, "external data 'link.weights' goes through a symbolic link")
    short = graph_file(inside / "short.onnx", external="short.weights")
    (inside / "short.weights").write_bytes(b"\0" * 8)
    refused(short, "external data 'short.weights' holds 8 bytes")
