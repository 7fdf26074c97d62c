"""ONNX export of a checkpoint, verified against PyTorch, carrying its own metadata.

The exported graph is `ScreeningNet.forward` in eval mode: input `image`, float
(batch, 1, 224, 224) in [0, 1]; output `logit`, (batch,). The intensity
standardisation and InceptionV3's bilinear 224 -> 299 upsampling are inside the
graph, so an ONNX runtime needs nothing from this repository but the
preprocessing. The batch axis is dynamic.

The checkpoint's meta (model, variant, input size, threshold, preprocess,
params), its sha256 and the verification result are stored as JSON under the
metadata_props key "cxr_screen", so `predict --onnx` can run from the .onnx
file alone and every prediction names the checkpoint it came from.

`torch.onnx.export(dynamo=True)` is tried first; if it raises, the TorchScript
exporter (dynamo=False) is used, and which one ran is recorded in the metadata.
`export_graph` and `logit_agreement` are the one ONNX export path and the one
agreement test: `latency` times the very graph `cxr export` ships, and the
inference engine judges its session with the same test.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from tqdm import tqdm

from pipeline.errors import CxrError
from pipeline.fileio import TEMP_SUFFIX, atomic_output, check_output_path, output_lock
from pipeline.shard_format import read_summary
from train.checkpoint import Checkpoint, load_checkpoint, validate_meta
from train import ood
from train.models import model_input
from train.onnx_contract import check_graph, load_graph, probe

log = logging.getLogger(__name__)

OPSET = 20  # what the dynamo exporter emits natively in torch 2.14; onnxruntime >= 1.17 runs it
INPUT_NAME = "image"
OUTPUT_NAME = "logit"
META_KEY = "cxr_screen"
# Accepted: |P_onnx - P_torch| <= TOLERANCE on probabilities (what predict reports), and
# |logit_onnx - logit_torch| <= TOLERANCE * max(1, |logit|), which still checks the
# graph where probabilities saturate (e.g. an untrained InceptionV3 gives logits ~1e11).
TOLERANCE = 1e-4
META_REQUIRED = ("model", "variant", "input_size", "threshold", "preprocess", "checkpoint_sha256", "onnx")
VERIFY_BATCHES = (1, 3)  # differ from the export example's batch of 2: proves the batch axis is dynamic


def export_onnx(
    checkpoint: Path | str | Checkpoint,
    out_path: Path | str,
    verify_images: np.ndarray | None = None,
    tolerance: float = TOLERANCE,
    show_progress: bool = False,
) -> Path:
    """Export `checkpoint` to `out_path` (one self-contained .onnx file) and verify it.

    Verification runs onnxruntime (CPU) and PyTorch on seeded random images and
    on `verify_images` (uint8 (N, H, W) preprocessed images, e.g. real test
    images) and raises CxrError beyond `tolerance` (see TOLERANCE). The file
    is written atomically and only once verified.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    out_path = Path(out_path)
    ckpt.threshold  # a resume checkpoint (last.pt) cannot screen: refused before the slow trace
    model = ckpt.build().float().eval()
    size = ckpt.input_size

    _check_replaceable(out_path)
    # A step bar: tracing a large network takes tens of seconds on a CPU, and so does the check.
    bar = tqdm(total=3, desc=f"export {ckpt.model_name}", unit="step", disable=not show_progress, leave=False)
    # One writer per output folder, as `shard`; the work folder is a temp of the output's own (there, under
    # its pattern), so the next export holding the lock removes what a kill -9 left (28-110 MB graphs).
    with output_lock(out_path.parent, stale_temps_of=(out_path.name,)), bar, _work_folder(out_path) as workdir:
        tmp = Path(workdir) / "graph.onnx"
        bar.set_postfix_str("tracing to ONNX")
        start = time.perf_counter()
        # with an out-of-distribution gate the graph has its score as a second output (train/ood.py)
        gated = ood.GatedNet(model, ckpt.meta["ood_params"]).eval() if ckpt.meta.get("ood") else None
        outputs = (OUTPUT_NAME,) if gated is None else (OUTPUT_NAME, ood.OUTPUT_NAME)
        exporter = export_graph(model if gated is None else gated, size, tmp, outputs)
        seconds = time.perf_counter() - start
        bar.update()
        bar.set_postfix_str("checking onnxruntime against PyTorch")
        session = onnx_session(tmp, providers=["CPUExecutionProvider"], input_size=size, outputs=outputs)
        verification = verify(model, session, size, verify_images, tolerance)
        if gated is not None:
            verification["ood"] = verify_gate(gated, session, size, verify_images)
        bar.update()
        meta = {
            # the gate's tensors are in the graph; the JSON keeps its summary (threshold, dims)
            **{k: v for k, v in ckpt.meta.items() if k != ood.PARAMS_KEY},
            "checkpoint_file": ckpt.path.name,
            "checkpoint_sha256": ckpt.file_sha256(),
            # no timings in here: the same checkpoint must give the same file
            "onnx": {"exporter": exporter, "opset": OPSET, "input": INPUT_NAME, "output": OUTPUT_NAME,
                     "verification": verification},
        }  # fmt: skip
        _write_with_metadata(tmp, meta, out_path)
        bar.update()
    log.info("exported %s with %s in %.1f s to %s: %s", ckpt.model_name, exporter, seconds, out_path, verification)
    return out_path


def _work_folder(out_path: Path) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", suffix=TEMP_SUFFIX, dir=out_path.parent)


def _check_replaceable(out_path: Path) -> None:
    """Refuse to overwrite a file that is not an ONNX model this command wrote (own only what you write)."""
    check_output_path(out_path)  # before reading it: a link or a FIFO under the name is refused, not opened
    if not out_path.exists():
        return
    try:
        proto = onnx.load(str(out_path), load_external_data=False)
        ours = proto.producer_name == "cxr-screen" and any(p.key == META_KEY for p in proto.metadata_props)
    except Exception:  # not ONNX at all (protobuf raises assorted types): certainly not ours
        ours = False
    if not ours:
        raise CxrError(f"refusing to overwrite {out_path}: it is not an ONNX model written by `cxr export`")


def export_graph(model: torch.nn.Module, size: int, path: Path, outputs: tuple[str, ...] = (OUTPUT_NAME,)) -> str:
    """Write `model` (a ScreeningNet in eval mode, or a GatedNet with `outputs` naming both) to `path`
    as ONNX with a dynamic batch axis.

    Returns the exporter that produced it: "dynamo", or "torchscript" when dynamo failed.
    """
    example = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    chatter = io.StringIO()  # the dynamo exporter prints progress to stdout, which carries the CLI's JSON
    try:
        with contextlib.redirect_stdout(chatter):
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(outputs),
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                opset_version=OPSET,
                verbose=False,
            )
        program.save(path, external_data=False)  # one file: even VGG16 (~540 MB) is far below protobuf's 2 GB
        return "dynamo"
    except Exception as exc:  # the dynamo exporter fails in many ways; the fallback below is the remedy
        log.warning("dynamo ONNX export failed (%s: %s); using the TorchScript exporter", type(exc).__name__, exc)
        log.debug("dynamo exporter output:\n%s", chatter.getvalue())
    try:
        with warnings.catch_warnings():
            # TracerWarning on ScreeningNet's input-size branch: the size is fixed per exported model;
            # the deprecation notice is about this very fallback, chosen knowingly.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=list(outputs),
                dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *outputs)},
                opset_version=OPSET,
            )
    except Exception as exc:
        raise CxrError(f"ONNX export failed with both exporters: {type(exc).__name__}: {exc}") from exc
    return "torchscript"


def verify(
    model: torch.nn.Module,
    session: ort.InferenceSession,
    size: int,
    images: np.ndarray | None = None,
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    """Compare onnxruntime with PyTorch; raise CxrError beyond `tolerance`.

    Returns {"inputs": n, "max_abs_diff_probability", "max_abs_diff_logit", "max_scaled_diff_logit", ...}.
    On failure the message also compares both float32 runtimes with PyTorch in
    float64: when ONNX's error is of the same order as PyTorch float32's, the
    network is numerically sensitive rather than the export wrong (measured on
    an untrained InceptionV3: 2.8e-4 for PyTorch, 7.2e-4 for ONNX).
    """
    generator = torch.Generator().manual_seed(1)
    batches = [torch.rand(b, 1, size, size, generator=generator) for b in VERIFY_BATCHES]
    if images is not None and len(images):
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (size, size):
            raise CxrError(f"verification images must be uint8 (N, {size}, {size}), got {images.dtype} {images.shape}")
        batches += list(model_input(images).split(8))
    expected, got = [], []
    with torch.inference_mode():
        for x in batches:
            expected.append(model(x).numpy().astype(np.float64))
            got.append(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0].astype(np.float64))
            if got[-1].shape != expected[-1].shape:
                raise CxrError(f"ONNX output shape {got[-1].shape} != PyTorch {expected[-1].shape}")
    torch_logits, onnx_logits = np.concatenate(expected), np.concatenate(got)
    result = logit_agreement(torch_logits, onnx_logits, tolerance)
    if not result.pop("ok"):
        exact = _sigmoid(_float64_logits(model, batches))
        torch_err = float(np.abs(_sigmoid(torch_logits) - exact).max())
        onnx_err = float(np.abs(_sigmoid(onnx_logits) - exact).max())
        sensitive = onnx_err <= 10 * torch_err  # same order of magnitude; a wrong graph is off by far more
        raise CxrError(
            f"ONNX output differs from PyTorch beyond {tolerance}: {result}. Against PyTorch in float64, "
            f"PyTorch float32 is off by {torch_err:.3g} and ONNX by {onnx_err:.3g} in probability"
            + ("; the network is numerically sensitive, not the export wrong (see --tolerance)" if sensitive else "")
        )
    return result


def verify_gate(gated: torch.nn.Module, session: ort.InferenceSession, size: int,
                images: np.ndarray | None = None) -> dict[str, Any]:
    """The exported gate's scores against PyTorch's (train/ood.py's tolerance); CxrError beyond it."""
    generator = torch.Generator().manual_seed(2)
    batches = [torch.rand(b, 1, size, size, generator=generator) for b in VERIFY_BATCHES]
    if images is not None and len(images):
        batches += list(model_input(images).split(8))
    with torch.inference_mode():
        expected = np.concatenate([gated(x)[1].numpy() for x in batches])
    got = np.concatenate([onnx_outputs(session, x.numpy(), gated=True)[1] for x in batches])
    result = ood.ood_agreement(expected, got)
    if not result.pop("ok"):
        raise CxrError(f"the exported out-of-distribution gate differs from PyTorch: {result}")
    return {"inputs": len(expected), **result}


def logit_agreement(reference: np.ndarray, candidate: np.ndarray, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """The one ONNX-vs-PyTorch criterion (see TOLERANCE): how far `candidate` logits are from
    `reference` (PyTorch fp32), and whether both bounds hold ("ok"); used by export, the
    inference engine and latency."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape:
        raise CxrError(f"logits of shape {candidate.shape} compared with {reference.shape}")
    diff = np.abs(candidate - reference)
    result = {
        "inputs": len(reference),
        "max_abs_diff_probability": float(np.abs(_sigmoid(candidate) - _sigmoid(reference)).max()),
        "max_abs_diff_logit": float(diff.max()),
        "max_scaled_diff_logit": float((diff / np.maximum(1.0, np.abs(reference))).max()),
        "tolerance": tolerance,
    }
    # written so that NaN fails too
    result["ok"] = bool(result["max_abs_diff_probability"] <= tolerance and result["max_scaled_diff_logit"] <= tolerance)
    return result


def _float64_logits(model: torch.nn.Module, batches: list[torch.Tensor]) -> np.ndarray:
    exact = copy.deepcopy(model).double()
    with torch.inference_mode():
        return np.concatenate([exact(x.double()).numpy() for x in batches])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _write_with_metadata(graph: Path, meta: dict[str, Any], out_path: Path) -> None:
    proto = onnx.load(str(graph))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta, sort_keys=True)
    proto.producer_name = "cxr-screen"
    with atomic_output(out_path) as stream:  # what onnx.save writes; it cannot take a file without a path name
        stream.write(proto.SerializeToString())


def onnx_session(
    path: Path | str, threads: int | None = None, providers: list[str] | None = None, input_size: int | None = None,
    outputs: tuple[str, ...] | None = None,
) -> ort.InferenceSession:
    """An onnxruntime session: CUDA when the installed onnxruntime has it, else CPU.

    `threads`: intra-op threads (None or 0: onnxruntime's default, one per core).
    The file is held to the project's graph contract (train/onnx_contract.py) first, against
    `input_size`, or the size in its metadata when None, and probed once the session exists.
    `outputs`: the graph's outputs, or (None) those its metadata promises.
    """
    path = Path(path)
    if not path.is_file():
        raise CxrError(f"ONNX model not found: {path}")
    proto = load_graph(path)
    raw_meta = {p.key: p.value for p in proto.metadata_props}.get(META_KEY)
    meta = _parse_meta(raw_meta, path) if raw_meta is not None or input_size is None else {}
    if input_size is None:
        input_size = int(meta["input_size"])
    # the graph must have exactly the outputs its metadata promises: the logit, and the gate's score if gated
    if outputs is None:
        outputs = (OUTPUT_NAME, ood.OUTPUT_NAME) if meta.get(ood.SUMMARY_KEY) is not None else (OUTPUT_NAME,)
    check_graph(proto, path, input_size, INPUT_NAME, outputs)
    del proto  # VGG16's weights: not held twice while onnxruntime reads them
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise CxrError(f"cannot load ONNX model {path}: {exc}") from exc
    probe(session, input_size, INPUT_NAME, outputs, f"ONNX model {path}")
    return session


def onnx_meta(session: ort.InferenceSession, path: Path | str = "<onnx>") -> dict[str, Any]:
    """The checkpoint meta stored at export (see module docstring)."""
    meta = _parse_meta(session.get_modelmeta().custom_metadata_map.get(META_KEY), path)
    outputs = [o.name for o in session.get_outputs()]
    if meta.get(ood.SUMMARY_KEY) is not None and (len(outputs) < 2 or outputs[1] != ood.OUTPUT_NAME):
        raise CxrError(f"{path}: its metadata has an out-of-distribution gate but the graph has no "
                       f"'{ood.OUTPUT_NAME}' output (outputs: {outputs})")  # fmt: skip
    return meta


def _parse_meta(raw: str | None, path: Path | str) -> dict[str, Any]:
    if raw is None:
        raise CxrError(f"{path} has no '{META_KEY}' metadata: it was not written by `cxr export`")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise CxrError(f"{path}: '{META_KEY}' metadata is not JSON: {exc}") from None
    missing = [k for k in META_REQUIRED if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CxrError(f"{path}: '{META_KEY}' metadata lacks {missing}; re-export it with `cxr export`")
    sha = meta["checkpoint_sha256"]
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise CxrError(f"{path}: '{META_KEY}' metadata: checkpoint_sha256 must be 64 hex digits")
    validate_meta(meta, str(path))
    return meta


def onnx_probabilities(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W) preprocessed images -> float64 P(COVID-19), shape (B,)."""
    x = model_input(images).numpy()
    return _sigmoid(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0].astype(np.float64))


def onnx_outputs(session: ort.InferenceSession, x: np.ndarray, gated: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 (B, 1, H, W) model input -> float64 logits (B,) and, for a gated graph, the gate's scores (B,)."""
    if not gated:
        return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0].astype(np.float64), None
    logits, scores = session.run([OUTPUT_NAME, ood.OUTPUT_NAME], {INPUT_NAME: x})
    if logits.shape != scores.shape:
        raise CxrError(f"the ONNX graph gave logits {logits.shape} but gate scores {scores.shape}")
    return logits.astype(np.float64), scores.astype(np.float64)


def onnx_probabilities_and_ood(session: ort.InferenceSession, images: np.ndarray,
                               gated: bool) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """uint8 (B, H, W) preprocessed images -> float64 P(COVID-19) (B,) and the gate's scores (B,) or None."""
    logits, scores = onnx_outputs(session, model_input(images).numpy(), gated)
    return _sigmoid(logits), scores


def shard_test_images(shard_dir: Path | str, count: int) -> np.ndarray:
    """The first `count` test-split images of a shard folder or URL, uint8 (N, H, W), in the shards' fixed order."""
    from train.data import eval_batches

    if count < 1:
        raise CxrError(f"verification image count must be >= 1, got {count}")
    chunks: list[np.ndarray] = []
    for batch in eval_batches(read_summary(shard_dir), "test", batch_size=count, num_workers=0):
        chunks.append(batch["image"][:, 0].numpy())
        if sum(len(c) for c in chunks) >= count:
            break
    if not chunks:
        raise CxrError(f"{shard_dir}: no test images to verify the export on")
    return np.concatenate(chunks)[:count]


def export_summary(path: Path) -> dict[str, Any]:
    """What `cxr export` prints: the file, the model it holds and the ONNX facts, read back from the file itself."""
    meta = onnx_meta(onnx_session(path, providers=["CPUExecutionProvider"]), path)
    return {"out": str(path), "model": meta["model"], "variant": meta["variant"],
            "checkpoint_sha256": meta["checkpoint_sha256"], **meta["onnx"]}  # fmt: skip
