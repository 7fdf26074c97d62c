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
def serve(
    model: CheckpointOpt = DEFAULT_CHECKPOINT,
    onnx: Annotated[
        Optional[Path], typer.Option(help="Serve this ONNX model (from `cxr export`); --model then only gives heatmaps")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs --token-file")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    metrics: Annotated[
        Optional[Path], typer.Option(help="metrics/eval.json of this checkpoint: its test figures go on the model card")
    ] = None,
    token_file: Annotated[
        Optional[Path], typer.Option(help="File holding the bearer token clients must send (never on the command line)")
    ] = None,
    insecure_no_auth: Annotated[
        bool, typer.Option("--insecure-no-auth", help="Serve a non-loopback host without a token (trusted networks only)")
    ] = False,
    heatmaps: Annotated[bool, typer.Option("--heatmaps/--no-heatmaps", help="Allow ?heatmaps=true (keeps the "
                                           "PyTorch weights in memory)")] = True,  # fmt: skip
    batch_size: Annotated[int, typer.Option(help="Largest batch the concurrent requests' images are scored in")] = 32,
    batch_wait_ms: Annotated[float, typer.Option(help="How long the first queued image waits for company")] = 5.0,
    max_files: Annotated[int, typer.Option(help="Files per request")] = 64,
    max_file_mb: Annotated[int, typer.Option(help="MiB per file (also bounded by the model's max_decoded_bytes)")] = 64,
    max_request_mb: Annotated[int, typer.Option(help="MiB per request")] = 256,
    queue_images: Annotated[int, typer.Option(help="Images waiting for the model before requests get 503")] = 256,
    max_connections: Annotated[int, typer.Option(help="Open connections before uvicorn answers 503")] = 64,
    timeout: Annotated[float, typer.Option(help="Seconds for a request's upload, and for its scores")] = 120.0,
    workers: Annotated[int, typer.Option(help="Threads decoding uploads (0 = one per core)")] = 0,
    device: Annotated[str, typer.Option(help="PyTorch device: auto (CUDA when present), cpu, cuda, cuda:N")] = "auto",
    engine: EngineOpt = "auto",
) -> None:
    """Serve the model: a web page at / and a REST API (POST /v1/screen, GET /v1/model, /healthz, /docs).

    Reads: the checkpoint or ONNX model (once), --metrics, --token-file. Writes nothing; uploads stay in
    memory. Loopback only unless --token-file (or --insecure-no-auth) is given.
    """
    from train.runtime import pick_device
    from train.screen.serve import ServeLimits, check_exposure
    from train.screen.serve import serve as run_serve

    check_exposure(host, token_file, insecure_no_auth)  # refused in one line before the model loads
    limits = ServeLimits(max_file_bytes=max_file_mb * 2**20, max_request_bytes=max_request_mb * 2**20,
                         max_files=max_files, queue_images=queue_images, batch_size=batch_size,
                         batch_wait_ms=batch_wait_ms, request_timeout_s=timeout, decode_threads=workers)  # fmt: skip
    run_serve(model, onnx, host=host, port=port, token_file=token_file, insecure_no_auth=insecure_no_auth,
              metrics_path=metrics, device=pick_device(device), engine=engine, heatmaps=heatmaps, limits=limits,
              max_connections=max_connections)  # fmt: skip


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
