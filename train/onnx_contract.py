"""What an ONNX file must be before onnxruntime runs it: the kind of graph `cxr export` writes, and no other.

An ONNX file is an artifact handed to `predict --onnx`, the API and the server; it is checked
against the project's contract before a session is created, and each violation is one line:
- one input, float32 (batch, 1, S, S) with S the metadata's input size and the batch dynamic;
  one output, float32 (batch,): one logit per image; a model with an out-of-distribution gate
  (train/ood.py) has the gate's score as a second output of the same shape, and no other;
- only the operators the project's exporter emits for its five networks (`EXPORTED_OPS`), so no
  control flow, no custom domains, nothing that builds shapes the exporter never builds;
- weights (initializers and Constant tensors) at most `MAX_TENSOR_BYTES` in total, and every
  constant shape a node expands to at most `MAX_SHAPE_ELEMENTS` elements (a 2^36-float
  ConstantOfShape is refused before it is run);
- external data, if any, inside the model's own folder: a relative location without '..', no
  symbolic link on the way, a regular file that holds the bytes it is said to hold. Checked here,
  not left to whichever onnxruntime version is installed.
Then `probe` runs a batch of two black images and wants two finite logits back.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.errors import CxrError

# Every (domain, op) that `export_graph` writes for alexnet, vgg16, resnet50, densenet121 and
# inceptionv3 with torch 2.14 / opset 20, by either exporter (dynamo, TorchScript fallback), listed
# by exporting all ten; tests/test_export.py checks each export stays within this set.
EXPORTED_OPS = frozenset(
    ("", op)
    for op in (
        # dynamo, all five networks
        "Add", "AveragePool", "BatchNormalization", "Concat", "Conv", "Div", "Gemm", "MaxPool", "ReduceMean",
        "Relu", "Reshape", "Resize", "Shape", "Squeeze", "Sub",
        # the TorchScript fallback adds these
        "Constant", "Flatten", "GlobalAveragePool", "Identity", "Slice",
        # the out-of-distribution gate's score (train/ood.py: a Mahalanobis distance)
        "MatMul", "Mul", "ReduceSum", "Sqrt", "Clip", "Max", "Transpose",
    )
)  # fmt: skip
MAX_TENSOR_BYTES = 2 * 2**30  # VGG16, the largest network, holds ~540 MB of weights
# A constant shape (Reshape/Expand/ConstantOfShape/Tile/Resize sizes) over 2^28 elements (1 GiB of
# float32) is no shape of these networks: their largest activation per image is ~2^22.
MAX_SHAPE_ELEMENTS = 2**28
# InceptionV3's 224 -> 299 upsampling grows an image 1.8x; a constant Resize scale beyond 16x is no export of ours.
MAX_RESIZE_GROWTH = 16.0
_SHAPE_INPUTS = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0, "Tile": 1, "Resize": 3}


def load_graph(path: Path) -> onnx.ModelProto:
    """The file's graph and metadata, its external data (if any) left unread."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises assorted types on a file that is not ONNX
        raise CxrError(f"cannot load ONNX model {path}: {type(exc).__name__}: {exc}") from None


def check_graph(proto: onnx.ModelProto, path: Path, size: int, input_name: str, output_names: tuple[str, ...]) -> None:
    """Refuse the model at `path` unless its graph keeps the project's contract (see the module docstring).

    `output_names`: the outputs the metadata promises, in order (the logit, then the gate's score if any).
    """
    where = f"ONNX model {path}"
    graph = proto.graph
    _check_io(graph, size, input_name, output_names, where)
    _check_ops(proto, where)
    constants = _constants(graph)
    _check_shapes(graph, constants, where)
    _check_tensor_bytes(path, graph, where)


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    shape = value.type.tensor_type.shape
    if not value.type.tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


def _check_io(graph: onnx.GraphProto, size: int, input_name: str, output_names: tuple[str, ...], where: str) -> None:
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if [i.name for i in inputs] != [input_name]:
        raise CxrError(f"{where}: inputs {[i.name for i in inputs]}, expected exactly one named {input_name!r}")
    if [o.name for o in graph.output] != list(output_names):
        raise CxrError(f"{where}: outputs {[o.name for o in graph.output]}, expected exactly {list(output_names)}")
    given = inputs[0]
    for value, want in ((given, 4), *((made, 1) for made in graph.output)):
        kind = value.type.WhichOneof("value")
        elem = value.type.tensor_type.elem_type if kind == "tensor_type" else None
        if elem != onnx.TensorProto.FLOAT:
            got = onnx.TensorProto.DataType.Name(elem) if elem else kind
            raise CxrError(f"{where}: {value.name!r} is {got}, expected a float32 tensor")
        dims = _dims(value)
        if len(dims) != want:
            raise CxrError(f"{where}: {value.name!r} has shape {dims}, expected rank {want}")
        if isinstance(dims[0], int):
            raise CxrError(f"{where}: {value.name!r} has a fixed batch of {dims[0]}, expected a dynamic batch axis")
    if _dims(given)[1:] != [1, size, size]:
        raise CxrError(f"{where}: input shape {_dims(given)}, expected [batch, 1, {size}, {size}] (the metadata's size)")


def _check_ops(proto: onnx.ModelProto, where: str) -> None:
    if proto.functions:
        raise CxrError(f"{where}: holds {len(proto.functions)} local function(s); `cxr export` writes none")
    for node in proto.graph.node:
        if (node.domain if node.domain != "ai.onnx" else "", node.op_type) not in EXPORTED_OPS:
            op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
            raise CxrError(f"{where}: operator {op} (node {node.name!r}) is not one `cxr export` writes")


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    found = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    found[node.output[0]] = attr.t
                elif attr.name in ("value_ints", "value_int"):  # a shape may come as a plain attribute too
                    ints = list(attr.ints) if attr.name == "value_ints" else [attr.i]
                    found[node.output[0]] = numpy_helper.from_array(np.array(ints, np.int64))
    return found


def _check_shapes(graph: onnx.GraphProto, constants: dict[str, onnx.TensorProto], where: str) -> None:
    for node in graph.node:
        if node.op_type == "Resize" and len(node.input) > 2 and node.input[2] in constants:
            scales = numpy_helper.to_array(constants[node.input[2]]).astype(np.float64).ravel()
            if not np.isfinite(scales).all() or float(np.prod(np.abs(scales))) > MAX_RESIZE_GROWTH:
                raise CxrError(f"{where}: Resize node {node.name!r} scales by {scales.tolist()}, over "
                               f"{MAX_RESIZE_GROWTH:.0f}x the elements")  # fmt: skip
        at = _SHAPE_INPUTS.get(node.op_type)
        if at is None or len(node.input) <= at or node.input[at] not in constants:
            continue
        tensor = constants[node.input[at]]
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type not in (onnx.TensorProto.INT64,
                                                                                        onnx.TensorProto.INT32):  # fmt: skip
            raise CxrError(f"{where}: {node.op_type} node {node.name!r} takes its shape from a non-integer or external tensor")
        values = numpy_helper.to_array(tensor).astype(np.float64).ravel()  # float: a product of int64s can wrap
        if float(np.prod(values[values > 0])) > MAX_SHAPE_ELEMENTS:
            raise CxrError(f"{where}: {node.op_type} node {node.name!r} asks for shape {values.astype(np.int64).tolist()}, "
                           f"over {MAX_SHAPE_ELEMENTS} elements")  # fmt: skip


def _check_tensor_bytes(path: Path, graph: onnx.GraphProto, where: str) -> None:
    total = 0
    tensors = list(graph.initializer) + [a.t for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += _external_bytes(path, tensor, where)
        else:
            total += tensor.ByteSize()
        if total > MAX_TENSOR_BYTES:
            raise CxrError(f"{where}: its weights exceed {MAX_TENSOR_BYTES / 2**30:.0f} GiB")


def _external_bytes(path: Path, tensor: onnx.TensorProto, where: str) -> int:
    """The bytes an external tensor takes from its file, once its location is proven to lie inside the model's folder."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    parts = PurePosixPath(location.replace("\\", "/")).parts
    if not parts or PurePosixPath(location).is_absolute() or location.startswith(("/", "\\")) or ".." in parts \
            or ":" in location:  # fmt: skip
        raise CxrError(f"{where}: tensor {tensor.name!r} keeps its data at {location!r}, outside the model's folder")
    current = path.parent
    for part in parts:
        current = current / part
        try:
            st = os.lstat(current)
        except OSError as exc:
            raise CxrError(f"{where}: tensor {tensor.name!r}: external data {location!r}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise CxrError(f"{where}: tensor {tensor.name!r}: external data {location!r} goes through a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        raise CxrError(f"{where}: tensor {tensor.name!r}: external data {location!r} is not a regular file")
    try:
        offset, length = int(info.get("offset", 0)), int(info.get("length", st.st_size))
    except ValueError:
        raise CxrError(f"{where}: tensor {tensor.name!r}: external data offset/length are not integers") from None
    if offset < 0 or length < 0 or offset + length > st.st_size:
        raise CxrError(f"{where}: tensor {tensor.name!r}: external data {location!r} holds {st.st_size} bytes, "
                       f"not {offset}+{length}")  # fmt: skip
    return length


def probe(session, size: int, input_name: str, output_names: tuple[str, ...], where: str) -> None:
    """Two black images must give two finite float values per output: one logit (and gate score) per image."""
    try:
        outs = session.run(list(output_names), {input_name: np.zeros((2, 1, size, size), np.float32)})
    except Exception as exc:  # onnxruntime's own Fail/RuntimeException types
        raise CxrError(f"{where}: a batch of two images fails: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    for name, out in zip(output_names, outs):
        out = np.asarray(out)
        what = "logit" if name == output_names[0] else f"{name!r}"
        if out.shape != (2,):
            raise CxrError(f"{where}: a batch of two images gives output shape {out.shape}, expected (2,): "
                           f"one {what} per image")  # fmt: skip
        if out.dtype != np.float32 or not np.isfinite(out).all():
            raise CxrError(f"{where}: a batch of two black images gives {out.dtype} {out.tolist()}, "
                           f"expected finite float32 values of {what}")  # fmt: skip
