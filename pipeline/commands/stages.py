"""Panel: the pipeline stages, one command per dvc.yaml stage, in the order `dvc repro` runs them."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.commands.common import (
    DEFAULT_CHECKPOINT,
    DEFAULT_PARAMS,
    STAGES,
    CheckpointOpt,
    EngineOpt,
    ParamsOpt,
    echo_json,
    fail_cleanly,
    panel,
    read_params,
)
from pipeline.errors import CxrError
from pipeline.fileio import output_lock
from pipeline.ownership import MARKER, claim_folder

app = panel()


@app.command(rich_help_panel=STAGES)
@fail_cleanly
def sample(
    out: Annotated[Path, typer.Option(help="Where to write the synthetic COVIDx-layout dataset")] = Path("data/sample"),
    style: Annotated[
        str,
        typer.Option(help="default: the training sample; shifted: an external test set from another "
                     "acquisition style (larger, flatter, noisier images with lead markers; test split only)"),
    ] = "default",
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Generate a small deterministic synthetic dataset in the COVIDx CXR-2 layout.

    Reads: params (sample.*, seed). Writes: OUT/train.txt, OUT/test.txt, OUT/train/, OUT/test/.
    """
    from pipeline.sample import generate_sample

    p = read_params(params)
    echo_json(generate_sample(out, p.sample, p.seed, style=style))


@app.command(rich_help_panel=STAGES)
@fail_cleanly
def ingest(
    root: Annotated[
        Optional[Path], typer.Option(help="COVIDx-layout dataset root (default: params data.root)")
    ] = None,
    out: Annotated[Path, typer.Option(help="Manifest to write (JSON lines)")] = Path("data/manifest.jsonl"),
    report: Annotated[Path, typer.Option(help="Ingest report to write (counts, rejects, leaks)")] = Path(
        "data/ingest.json"
    ),
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Parse the label files, hash every image, split train/val/test by patient.

    Reads: ROOT's label files (params data.labels: train.txt, val.txt, test.txt by default) and
    the images they name under ROOT/train/, val/, test/; prints what it found (stderr) before hashing. Writes: the manifest
    (one line per image: split, key, path, label, patient_id, source, sha256) and a
    report with per-split counts, rejected lines with reasons and patient overlaps.
    """
    from pipeline.manifest import build_manifest

    p = read_params(params)
    found = functools.partial(typer.echo, err=True)
    echo_json(build_manifest(root or Path(p.data.root), out, report, p.data, p.seed, show_progress=True, announce=found))


@app.command(rich_help_panel=STAGES)
@fail_cleanly
def shard(
    equalize: Annotated[
        Optional[bool],
        typer.Option("--equalize/--plain", help="Histogram-equalize (method: params preprocess.equalize) [default: plain]",
                     show_default=False),  # fmt: skip
    ] = None,
    variant: Annotated[
        Optional[str], typer.Option(help="'plain' or 'equalized' (same as --plain/--equalize; used by dvc.yaml's foreach)")
    ] = None,
    manifest: Annotated[Path, typer.Option(help="Manifest written by `ingest`")] = Path("data/manifest.jsonl"),
    ingest_report: Annotated[Path, typer.Option(help="Ingest report (its rejects are carried into the summary)")] = Path(
        "data/ingest.json"
    ),
    out: Annotated[
        Optional[Path], typer.Option(help="Variant directory to write (default shards/plain or shards/equalized)")
    ] = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Preprocess every manifest image and write 224x224 greyscale WebDataset shards.

    Reads: the manifest, the ingest report and the raw images (under the manifest's root).
    Writes: OUT/{train,val,test}-NNNNNN.tar and OUT/summary.json (counts, shard list,
    params, rejects with reasons).
    """
    from pipeline.shards import write_variant

    variant = shard_variant(equalize, variant)
    p = read_params(params)
    summary = write_variant(manifest, ingest_report, out or Path("shards") / variant, variant, p.preprocess, p.shard,
                            p.data, p.seed)  # fmt: skip
    echo_json({k: summary[k] for k in ("variant", "counts", "reject_count")})


def shard_variant(equalize: bool | None, variant: str | None) -> str:
    """The variant `shard` writes: --variant, or --equalize/--plain; both, when they disagree, is an error."""
    from pipeline.names import VARIANTS

    if variant is not None and variant not in VARIANTS:
        raise CxrError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    flag = None if equalize is None else ("equalized" if equalize else "plain")
    if variant is not None and flag is not None and flag != variant:
        raise CxrError(f"--{'equalize' if equalize else 'plain'} contradicts --variant {variant}: pass one of them")
    return variant or flag or "plain"


@app.command(rich_help_panel=STAGES)
@fail_cleanly
def train(
    shards: Annotated[
        Optional[str],
        typer.Option(help="Shard variant folder or URL (http(s)://, s3://, gs://, file://; default: shards/<params variant>)"),
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory for best.pt (model output) and last.pt (resume)")] = Path(
        "models"
    ),
    live: Annotated[Path, typer.Option(help="dvclive directory for the per-epoch training curves")] = Path("dvclive"),
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Train params `model` on the shards, streaming them with WebDataset.

    Reads: SHARDS/summary.json and SHARDS/{train,val}-*.tar, each checked against its sha256 (SHARDS: a folder
    or a URL); params (seed, model, variant, train.*, evaluate.threshold_rule, evaluate.target_sensitivity,
    evaluate.bootstrap); the weights train.init names (imagenet: torchvision's file in the torch hub cache; or
    a checkpoint to fine-tune). Writes: OUT/best.pt (the epoch train.select picks, with its validation metric
    and interval, a Platt calibration and then the operating threshold, both fitted on validation, and the
    init it started from), OUT/last.pt (every epoch; a rerun with the same params and data resumes from it),
    LIVE/metrics.json and LIVE/plots/. Multi-process:
    `torchrun --nproc_per_node N -m pipeline.cli train` (DDP; NCCL on GPUs, gloo on CPU).
    On CPU, start-up raises glibc malloc's mmap/trim thresholds against page-fault stalls on large
    batches; LD_PRELOAD of tcmalloc (Debian libtcmalloc-minimal4) is optional and about as fast.
    """
    from train.fit.trainer import train_model

    p = read_params(params)
    result = train_model(p, shards or str(Path("shards") / p.variant), out, live)
    if result:  # rank 0 only under DDP
        echo_json({k: v for k, v in result.items() if k != "history"})


@app.command(rich_help_panel=STAGES)
@fail_cleanly
def evaluate(
    model: CheckpointOpt = DEFAULT_CHECKPOINT,
    shards: Annotated[
        Optional[str], typer.Option(help="Shard folder or URL to score (default: shards/<checkpoint variant>)")
    ] = None,
    root: Annotated[
        Optional[Path],
        typer.Option(help="External test: a COVIDx-layout root whose test split is scored instead of the shards"),
    ] = None,
    out: Annotated[Path, typer.Option(help="Metrics JSON to write")] = Path("metrics/eval.json"),
    predictions: Annotated[
        Optional[Path],
        typer.Option(help="Per-image CSV to write (default: metrics/predictions_test.csv; with --root none)"),
    ] = None,
    plots: Annotated[
        Optional[Path],
        typer.Option(help="Directory for roc.json, pr.json, confusion.csv (default: metrics/plots; with --root none)"),
    ] = None,
    figures: Annotated[
        Optional[Path],
        typer.Option(help="Directory for Fig. 8, misclassified test images with Grad-CAM (default: metrics/figures; "
                     "with --root none)"),  # fmt: skip
    ] = None,
    engine: EngineOpt = "auto",
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Score a checkpoint on the test and validation shards, or on an external dataset's test split.

    Reads: the checkpoint (model, variant, threshold chosen on validation, preprocessing),
    the shards of its variant, params (evaluate.*, seed, train.num_workers; with --root also
    data.max_reject_fraction). Writes: OUT (calibrated metrics at the operating threshold, at 0.5
    in `at_0_5`, by source, with patient-bootstrap and Wilson CIs, Brier/ECE, PPV/NPV at
    evaluate.prevalence, and under `inference` the engine that ran), the predictions CSV and the
    DVC plot files (ROC, PR, reliability, confusion).
    """
    from train.evaluation.evaluate import PLOT_FILES, PLOT_NAMES, evaluate_shards, headline, human_summary, write_outputs
    from train.evaluation.external import evaluate_external, external_test_items

    p = read_params(params)
    if root is None:
        predictions = predictions or Path("metrics/predictions_test.csv")
        plots = plots or Path("metrics/plots")
        figures = figures or Path("metrics/figures")
    else:
        if shards is not None:
            raise CxrError("pass either --shards or --root, not both")
        if figures is not None:
            raise CxrError("--figures draws shard images; with --root there are none (drop --figures)")
    with contextlib.ExitStack() as held:
        if plots is not None:  # one writer per plots folder, held from before scoring to the last file
            claim_folder(plots, "evaluate-plots", PLOT_NAMES)
            held.enter_context(output_lock(plots, stale_temps_of=(*PLOT_FILES, MARKER)))
        if root is None:
            result = evaluate_shards(model, shards, p.evaluate, p.train, p.seed, engine, show_progress=True)
        else:
            items, rejects = external_test_items(root)
            rejects_path = out.with_name(f"{out.stem}_rejects.json")
            result = evaluate_external(model, items, rejects, str(root), p.evaluate, p.data, p.train, p.seed, engine,
                                       show_progress=True, rejects_path=rejects_path)  # fmt: skip
        write_outputs(result, out, predictions, plots)
        if figures is not None:
            from train.evaluation.misclassified import FIGURE_NAME, evaluate_figure

            evaluate_figure(model, result, figures / FIGURE_NAME)
    echo_json(headline(result.report, out))
    typer.echo(human_summary(result.report, out), err=True)  # stderr: stdout stays JSON


@app.command(rich_help_panel=STAGES)
@fail_cleanly
def latency(
    model: CheckpointOpt = DEFAULT_CHECKPOINT,
    out: Annotated[Path, typer.Option(help="Latency JSON to write")] = Path("metrics/latency.json"),
    paths: Annotated[
        str, typer.Option(help="CPU paths to time, comma-separated: eager (required), onnxruntime, compile")
    ] = "eager,onnxruntime",
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Time the checkpoint's network: params, CPU/GPU ms per image, FLOPs, measured peak and floor.

    Reads: the checkpoint and params (latency.*). Writes: OUT. Run it alone: other load
    on the machine shows up in the numbers (the load average is recorded).
    """
    from pipeline.fileio import atomic_write_json
    from train.evaluation.latency import HEADLINE, latency_for_checkpoint, parse_paths

    report = latency_for_checkpoint(model, read_params(params).latency, parse_paths(paths), show_progress=True)
    atomic_write_json(out, report, indent=1)
    echo_json({k: report.get(k) for k in HEADLINE})


@app.command(rich_help_panel=STAGES)
@fail_cleanly
def figures(
    manifest: Annotated[Path, typer.Option(help="Manifest written by `ingest` (with each image's header size)")] = Path(
        "data/manifest.jsonl"
    ),
    ingest_report: Annotated[Path, typer.Option(help="Ingest report (gives the dataset root)")] = Path(
        "data/ingest.json"
    ),
    shards: Annotated[Path, typer.Option(help="Folder holding the plain/ and equalized/ shard variants")] = Path(
        "shards"
    ),
    out: Annotated[Path, typer.Option(help="Folder for the figure PNGs")] = Path("figures"),
    per_split: Annotated[int, typer.Option(help="Examples per class and split in Figs. 2-3")] = 2,
    sheet: Annotated[int, typer.Option(help="Images on each contact sheet")] = 36,
) -> None:
    """The study's data figures from your data: Fig. 1 (image sizes), Figs. 2-3 (examples), contact sheets.

    Reads: the manifest, the ingest report, the raw images it names and both shard variants.
    Writes: OUT/fig1_dimensions.png, OUT/fig2_negative_examples.png, OUT/fig3_positive_examples.png,
    OUT/contact_sheet_plain.png, OUT/contact_sheet_equalized.png (`dvc plots show` renders them).
    """
    from pipeline.figures import write_data_figures

    echo_json(write_data_figures(manifest, ingest_report, shards, out, per_split=per_split, sheet=sheet))


@app.command(rich_help_panel=STAGES)
@fail_cleanly
def curves(
    live: Annotated[Path, typer.Option(help="dvclive folder written by `train`")] = Path("dvclive"),
    out: Annotated[Path, typer.Option(help="PNG to write")] = Path("figures/training_curves.png"),
) -> None:
    """Training curves: train and validation loss on one chart, validation ROC AUC beside it.

    Reads: LIVE/plots/metrics/*.tsv (one row per epoch). Writes: OUT.
    """
    from pipeline.figures import training_curves

    typer.echo(str(training_curves(live, out)))
