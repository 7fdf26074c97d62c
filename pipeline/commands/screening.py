"""Panel: screening new images with a trained model, and shipping it (ONNX)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.commands.common import DEFAULT_CHECKPOINT, SCREENING, CheckpointOpt, EngineOpt, echo_json, fail_cleanly, panel

app = panel()


@app.command(rich_help_panel=SCREENING)
@fail_cleanly
def predict(
    inputs: Annotated[
        list[str], typer.Argument(help="Image files, folders (searched recursively) or glob patterns", show_default=False)
    ],
    model: CheckpointOpt = DEFAULT_CHECKPOINT,
    out: Annotated[Path, typer.Option(help="CSV to write: path, probability, decision, threshold, model, engine, error")] = Path(
        "predictions.csv"
    ),
    heatmaps: Annotated[
        Optional[Path], typer.Option(help="Folder for one Grad-CAM overlay PNG per image (<stem>-<path hash>.png)")
    ] = None,
    onnx: Annotated[
        Optional[Path],
        typer.Option(help="Run this ONNX model (from `cxr export`) with onnxruntime; everything then comes from its "
                     "metadata, and --model is read only for --heatmaps"),  # fmt: skip
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per inference batch")] = 32,
    workers: Annotated[int, typer.Option(help="Threads decoding images (0 = one per core)")] = 0,
    device: Annotated[str, typer.Option(help="PyTorch device: auto (CUDA when present), cpu, cuda, cuda:N")] = "auto",
    engine: EngineOpt = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar")] = True,
) -> None:
    """Screen images: P(COVID-19) and a decision at the model's validation-chosen threshold.

    Reads: the inputs (PNG, JPEG, TIFF, DICOM) and the checkpoint or ONNX model.
    Writes: OUT (one row per input; unreadable inputs get a row with the error) and,
    with --heatmaps, one overlay PNG per image. Exit code 2 when any input failed.
    """
    from train.runtime import pick_device
    from train.screen.predict import predict as run_predict

    summary = run_predict(
        inputs,
        checkpoint=model,
        out_csv=out,
        onnx_path=onnx,
        heatmaps_dir=heatmaps,
        batch_size=batch_size,
        workers=workers,
        device=pick_device(device),
        engine=engine,
        progress=progress,
    )
    typer.echo(f"{summary.line()} -> {out}" + (f", heatmaps in {heatmaps}" if heatmaps else ""))
    if summary.failed:
        typer.secho(f"error: {summary.failed} input(s) could not be read; see the error column of {out}", err=True)
        raise typer.Exit(code=2)


@app.command(rich_help_panel=SCREENING)
@fail_cleanly
def export(
    model: CheckpointOpt = DEFAULT_CHECKPOINT,
    out: Annotated[Path, typer.Option(help="ONNX file to write")] = Path("models/model.onnx"),
    verify_shards: Annotated[
        Optional[str],
        typer.Option(help="Shard folder or URL whose test images are also used to check ONNX against PyTorch"),
    ] = None,
    verify_count: Annotated[int, typer.Option(help="How many of those test images to check")] = 64,
    tolerance: Annotated[
        float, typer.Option(help="Largest accepted |P_onnx - P_torch| (raise only for a numerically sensitive net)")
    ] = 1e-4,
) -> None:
    """Export the checkpoint to ONNX (dynamic batch, upsampling in the graph) and verify it.

    Reads: the checkpoint (and --verify-shards' test split). Writes: OUT, with the checkpoint's
    meta and sha256 in its metadata. Fails unless onnxruntime matches PyTorch within --tolerance
    in probability on seeded random inputs and the test images.
    """
    from train.export import export_onnx, export_summary, shard_test_images

    images = shard_test_images(verify_shards, verify_count) if verify_shards is not None else None
    echo_json(export_summary(export_onnx(model, out, verify_images=images, tolerance=tolerance, show_progress=True)))
