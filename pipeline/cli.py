"""cxr-screen command line: one command per DVC stage, plus screening and benchmarks.

This is the one place that reads params.yaml, wires modules together and turns
`CxrError` into a message and exit code 1. Heavy modules (torch) are imported
inside the commands that need them so `cxr shard --help` stays instant.

Runs three ways: `cxr shard`, `python -m pipeline.cli shard`,
`typer pipeline/cli.py run shard`.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

# `typer pipeline/cli.py run` loads this file as a script, without the repo
# root on sys.path; add it so `pipeline.*` and `train.*` import either way.
_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from pipeline.errors import CxrError  # noqa: E402
from pipeline.params import Params, load_params  # noqa: E402

app = typer.Typer(
    name="cxr",
    help="Screen chest X-rays for COVID-19: COVIDx -> manifest -> shards -> model -> metrics.\n\n"
    "New here? `dvc repro` runs the whole pipeline on a synthetic sample; `dvc plots show` draws its figures; "
    "`cxr predict scans/ --heatmaps heatmaps/` screens your own images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

STAGES = "Pipeline stages (each is one dvc.yaml stage; `dvc repro` runs them all)"
SCREENING = "Screening and reporting"
BENCHMARKS = "Benchmarks"


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"cxr-screen {version('cxr-screen')}")
        except PackageNotFoundError:  # run from a checkout that was never pip-installed
            typer.echo("cxr-screen (not installed: run `pip install -e .`)")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit")
    ] = False,
) -> None:
    pass


ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read (read once, strictly)")]
EngineOpt = Annotated[
    str,
    typer.Option(
        help="auto: ONNX Runtime, built once per checkpoint and kept only if it matches PyTorch within 1e-4 on "
        "the first batch, else eager PyTorch (a one-line note says why); onnxruntime: that or an error; eager"
    ),
]


def _fail_cleanly(fn):
    """Turn the project's exception into a one-line message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CxrError as exc:
            message = str(exc)
        except OSError as exc:  # an OS failure no library layer anticipated: still one line, not a traceback
            message = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
        except MemoryError:
            message = "out of memory (lower shard.workers or preprocess.max_decoded_bytes)"
        # One line whatever the message holds (decoder and OS texts can carry newlines).
        typer.secho(f"error: {' '.join(message.split())}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None

    return wrapper


def _params(path: Path) -> Params:
    return load_params(path)


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=1, sort_keys=True))


@app.command(rich_help_panel=STAGES)
@_fail_cleanly
def sample(
    out: Annotated[Path, typer.Option(help="Where to write the synthetic COVIDx-layout dataset")] = Path("data/sample"),
    style: Annotated[
        str,
        typer.Option(help="default: the training sample; shifted: an external test set from another "
                     "acquisition style (larger, flatter, noisier images with lead markers; test split only)"),
    ] = "default",
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Generate a small deterministic synthetic dataset in the COVIDx CXR-2 layout.

    Reads: params (sample.*, seed). Writes: OUT/train.txt, OUT/test.txt, OUT/train/, OUT/test/.
    """
    from pipeline.sample import generate_sample

    p = _params(params)
    _echo_json(generate_sample(out, p.sample, p.seed, style=style))


@app.command(rich_help_panel=STAGES)
@_fail_cleanly
def ingest(
    root: Annotated[
        Optional[Path], typer.Option(help="COVIDx-layout dataset root (default: params data.root)")
    ] = None,
    out: Annotated[Path, typer.Option(help="Manifest to write (JSON lines)")] = Path("data/manifest.jsonl"),
    report: Annotated[Path, typer.Option(help="Ingest report to write (counts, rejects, leaks)")] = Path(
        "data/ingest.json"
    ),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Parse the label files, hash every image, split train/val/test by patient.

    Reads: ROOT/{train,val,test}.txt and the images they name. Writes: the manifest
    (one line per image: split, key, path, label, patient_id, source, sha256) and a
    report with per-split counts, rejected lines with reasons and patient overlaps.
    """
    from pipeline.manifest import build_manifest

    p = _params(params)
    _echo_json(build_manifest(root or Path(p.data.root), out, report, p.data, p.seed, show_progress=True))


@app.command(rich_help_panel=STAGES)
@_fail_cleanly
def shard(
    equalize: Annotated[
        bool, typer.Option("--equalize/--plain", help="Histogram-equalize (method: params preprocess.equalize)")
    ] = False,
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
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Preprocess every manifest image and write 224x224 greyscale WebDataset shards.

    Reads: the manifest, the ingest report and the raw images (under the manifest's root).
    Writes: OUT/{train,val,test}-NNNNNN.tar and OUT/summary.json (counts, shard list,
    params, rejects with reasons).
    """
    from pipeline.names import VARIANTS
    from pipeline.shards import write_variant

    p = _params(params)
    if variant is not None and variant not in VARIANTS:
        raise CxrError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    variant = variant or ("equalized" if equalize else "plain")
    summary = write_variant(manifest, ingest_report, out or Path("shards") / variant, variant, p.preprocess, p.shard,
                            p.data, p.seed)  # fmt: skip
    _echo_json({k: summary[k] for k in ("variant", "counts", "reject_count")})


@app.command(rich_help_panel=SCREENING)
@_fail_cleanly
def verify(
    shards: Annotated[list[str], typer.Argument(help="Shard variant folders or URLs to check", show_default=False)],
) -> None:
    """Check every shard against the sha256 recorded in its folder's summary.json.

    Reads: SHARDS/summary.json (validated) and SHARDS/*.tar (SHARDS: a folder or a URL, as for
    train). Writes nothing. Exit code 1 names
    the shards that are missing or changed.
    """
    from pipeline.shard_format import verify_shards

    _echo_json({d: verify_shards(d) for d in shards})


@app.command("bench-preprocess", rich_help_panel=BENCHMARKS)
@_fail_cleanly
def bench_preprocess(
    root: Annotated[Path, typer.Option(help="COVIDx-layout dataset root to benchmark on")] = Path("../shared/covidx-mini"),
    repeat: Annotated[int, typer.Option(help="Interleaved rounds of the three measurements (best is kept)")] = 3,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Benchmark: pipeline preprocessing vs a naive single-process PIL baseline and a decode-only floor.

    Reads: ROOT's label files and images. Writes nothing; prints images/s and ratios.
    """
    from pipeline.bench import run_preprocess_benchmark

    p = _params(params)
    _echo_json(run_preprocess_benchmark(root, p.preprocess, p.shard, repeat=repeat))


@app.command("bench-memory", rich_help_panel=BENCHMARKS)
@_fail_cleanly
def bench_memory(
    root: Annotated[Path, typer.Option(help="COVIDx-layout dataset root to measure on")] = Path(
        "../shared/covidx-mini"
    ),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Benchmark: peak RSS of the shard stage (2 workers) on ROOT and on a corpus with one 12000x12000 16-bit PNG.

    Reads: ROOT and params (preprocess.*). Writes nothing outside a temporary folder; prints, per corpus,
    the peak RSS of the largest process and of the whole process tree (MiB), and what was rejected.
    """
    from pipeline.bench_memory import run_memory_benchmark

    _echo_json(run_memory_benchmark(root, _params(params)))


# ---- commands: train (owner: train/trainer.py) ----


@app.command(rich_help_panel=STAGES)
@_fail_cleanly
def train(
    shards: Annotated[
        Optional[str],
        typer.Option(help="Shard variant folder or URL (http(s)://, s3://, gs://, file://; default: shards/<params variant>)"),
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory for best.pt (model output) and last.pt (resume)")] = Path(
        "models"
    ),
    live: Annotated[Path, typer.Option(help="dvclive directory for the per-epoch training curves")] = Path("dvclive"),
    params: ParamsOpt = Path("params.yaml"),
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
    On CPU, LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 (Debian libtcmalloc-minimal4)
    avoids glibc malloc's page-fault stalls on large batches; it is not preloaded automatically.
    """
    from train.trainer import train_model

    p = _params(params)
    result = train_model(p, shards or str(Path("shards") / p.variant), out, live)
    if result:  # rank 0 only under DDP
        _echo_json({k: v for k, v in result.items() if k != "history"})


@app.command("bench-train", rich_help_panel=BENCHMARKS)
@_fail_cleanly
def bench_train(
    shards: Annotated[
        Optional[Path], typer.Option(help="Shard variant directory (default: shards/<params variant>)")
    ] = None,
    model: Annotated[str, typer.Option(help="Network to time")] = "resnet50",
    steps: Annotated[int, typer.Option(help="Timed training steps per path")] = 12,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up steps per path")] = 3,
    loader_images: Annotated[int, typer.Option(help="Images read per loader-only measurement")] = 2000,
    fp32_streaming: Annotated[
        bool, typer.Option(help="Also time the streaming path in fp32 NCHW (precision vs data path)")
    ] = False,
    threads: Annotated[
        int, typer.Option(help="Compute threads, 0 = all cores (1 is steadier on a machine shared with other jobs)")
    ] = 0,
    device: Annotated[str, typer.Option(help="cpu, or cuda to time both paths on the GPU")] = "cpu",
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Benchmark on this CPU (or --device cuda): streaming trainer vs naive ImageFolder + per-image RandomAffine fp32 trainer.

    Reads: SHARDS (train split; exported to a temporary ImageFolder of the same PNGs) and params train.*.
    Writes nothing; prints training images/s of both paths and their ratio, loader-only images/s
    (shards vs folder) and the fraction of step time spent waiting for data.
    """
    from train.bench_train import run_train_benchmark

    p = _params(params)
    _echo_json(
        run_train_benchmark(
            shards or Path("shards") / p.variant,
            model,
            p.train,
            p.seed,
            steps,
            warmup,
            loader_images,
            fp32_streaming=fp32_streaming,
            threads=threads,
            device=device,
        )
    )


@app.command("bench-latency", rich_help_panel=BENCHMARKS)
@_fail_cleanly
def bench_latency(
    arch: Annotated[str, typer.Option(help="Networks to time, comma-separated")] = "resnet50,densenet121,inceptionv3,vgg16",
    threads: Annotated[str, typer.Option(help="Thread counts, comma-separated")] = "1,2",
    rounds: Annotated[int, typer.Option(help="Sweeps of all networks (each keeps its fastest time and highest peak)")] = 3,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Benchmark batch-1 CPU latency against the fp32 floor (FLOPs / peak measured in the same run).

    Reads: params (latency.warmup, latency.runs, preprocess.size). Writes nothing; prints, per network
    and thread count, eager and ONNX Runtime milliseconds and the fastest path's ratio to the floor.
    """
    from train.latency import batch1_benchmark, parse_counts, parse_paths

    p = _params(params)
    _echo_json(batch1_benchmark(parse_paths(arch), parse_counts(threads), p.preprocess.size, p.latency, rounds))


@app.command("bench-screen", rich_help_panel=BENCHMARKS)
@_fail_cleanly
def bench_screen(
    root: Annotated[Path, typer.Option(help="COVIDx-layout root whose images are cycled into the test set")] = Path(
        "../shared/covidx-mini"
    ),
    images: Annotated[int, typer.Option(help="Images in the timed external test set")] = 1000,
    model: Annotated[
        Optional[Path], typer.Option(help="Checkpoint to time (default: a random --arch; weights do not change speed)")
    ] = None,
    arch: Annotated[str, typer.Option(help="Network to time when no --model is given")] = "densenet121",
    rounds: Annotated[int, typer.Option(help="Interleaved rounds of eager and default (the fastest of each is kept)")] = 1,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Benchmark `evaluate --root` end to end: the default engine against eager PyTorch, in one run.

    Reads: ROOT's label files and images (linked into a temporary root of IMAGES test images), the
    checkpoint, params (evaluate.*, train.num_workers, seed). Writes nothing but the ONNX cache;
    prints images/s of both engines, their ratio and the one-time ONNX build time.
    """
    from train.bench_screen import run_screen_benchmark

    p = _params(params)
    _echo_json(run_screen_benchmark(p, root, images, model, arch, rounds))


# ---- commands: evaluate, latency, report (owner: train/evaluate.py, train/latency.py, train/report.py + runs.py) ----


@app.command(rich_help_panel=STAGES)
@_fail_cleanly
def evaluate(
    model: Annotated[Path, typer.Option(help="Checkpoint to evaluate (rebuilt from its own meta)")] = Path(
        "models/best.pt"
    ),
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
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Score a checkpoint on the test and validation shards, or on an external dataset's test split.

    Reads: the checkpoint (model, variant, threshold chosen on validation, preprocessing),
    the shards of its variant, params (evaluate.*, seed, train.num_workers; with --root also
    data.max_reject_fraction). Writes: OUT (calibrated metrics at the operating threshold, at 0.5
    in `at_0_5`, by source, with patient-bootstrap and Wilson CIs, Brier/ECE, PPV/NPV at
    evaluate.prevalence, and under `inference` the engine that ran), the predictions CSV and the
    DVC plot files (ROC, PR, reliability, confusion).
    """
    from train.evaluate import evaluate_shards, headline, human_summary, write_outputs
    from train.external import evaluate_external, external_test_items

    p = _params(params)
    if root is None:
        result = evaluate_shards(model, shards, p.evaluate, p.train, p.seed, engine, show_progress=True)
        predictions = predictions or Path("metrics/predictions_test.csv")
        plots = plots or Path("metrics/plots")
        figures = figures or Path("metrics/figures")
    else:
        if shards is not None:
            raise CxrError("pass either --shards or --root, not both")
        items, rejects = external_test_items(root)
        rejects_path = out.with_name(f"{out.stem}_rejects.json")
        result = evaluate_external(model, items, rejects, str(root), p.evaluate, p.data, p.train, p.seed, engine,
                                   show_progress=True, rejects_path=rejects_path)  # fmt: skip
    write_outputs(result, out, predictions, plots)
    if figures is not None:
        if root is not None:
            raise CxrError("--figures draws shard images; with --root there are none (drop --figures)")
        from train.misclassified import FIGURE_NAME, evaluate_figure

        evaluate_figure(model, result, figures / FIGURE_NAME)
    _echo_json(headline(result.report, out))
    typer.echo(human_summary(result.report, out), err=True)  # stderr: stdout stays JSON


@app.command(rich_help_panel=STAGES)
@_fail_cleanly
def latency(
    model: Annotated[Path, typer.Option(help="Checkpoint whose network is timed")] = Path("models/best.pt"),
    out: Annotated[Path, typer.Option(help="Latency JSON to write")] = Path("metrics/latency.json"),
    paths: Annotated[
        str, typer.Option(help="CPU paths to time, comma-separated: eager (required), onnxruntime, compile")
    ] = "eager,onnxruntime",
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Time the checkpoint's network: params, CPU/GPU ms per image, FLOPs, measured peak and floor.

    Reads: the checkpoint and params (latency.*). Writes: OUT. Run it alone: other load
    on the machine shows up in the numbers (the load average is recorded).
    """
    from pipeline.fileio import atomic_write_json
    from train.latency import HEADLINE, latency_for_checkpoint, parse_paths

    report = latency_for_checkpoint(model, _params(params).latency, parse_paths(paths), show_progress=True)
    atomic_write_json(out, report, indent=1)
    _echo_json({k: report.get(k) for k in HEADLINE})


@app.command(rich_help_panel=STAGES)
@_fail_cleanly
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

    _echo_json(write_data_figures(manifest, ingest_report, shards, out, per_split=per_split, sheet=sheet))


@app.command(rich_help_panel=STAGES)
@_fail_cleanly
def curves(
    live: Annotated[Path, typer.Option(help="dvclive folder written by `train`")] = Path("dvclive"),
    out: Annotated[Path, typer.Option(help="PNG to write")] = Path("figures/training_curves.png"),
) -> None:
    """Training curves: train and validation loss on one chart, validation ROC AUC beside it.

    Reads: LIVE/plots/metrics/*.tsv (one row per epoch). Writes: OUT.
    """
    from pipeline.figures import training_curves

    typer.echo(str(training_curves(live, out)))


@app.command(rich_help_panel=SCREENING)
@_fail_cleanly
def report(
    out: Annotated[Path, typer.Option(help="Markdown tables to write")] = Path("reports/tables.md"),
    runs: Annotated[
        Optional[Path], typer.Option(help="Directory with one sub-directory per run holding eval.json/latency.json")
    ] = None,
    exp_json: Annotated[Optional[Path], typer.Option(help="Saved `dvc exp show --json` output to read")] = None,
    eval_file: Annotated[str, typer.Option(help="Evaluate metrics file in the experiments")] = "metrics/eval.json",
    latency_file: Annotated[str, typer.Option(help="Latency metrics file in the experiments")] = "metrics/latency.json",
    at: Annotated[
        str, typer.Option(help="Threshold for Tables II-IV and VI: '0.5' (the study's rule) or 'operating'")
    ] = "0.5",
    misclassified: Annotated[
        Optional[Path],
        typer.Option(help="Also draw Fig. 8 here: test images wrong for every model of the set, with each "
                     "model's Grad-CAM (needs each run's predictions and best.pt)"),  # fmt: skip
    ] = None,
    shards_root: Annotated[
        Path, typer.Option(help="Folder with the plain/ and equalized/ shards the runs were evaluated on")
    ] = Path("shards"),
) -> None:
    """Rebuild the study's Tables II-VII from our experiments, beside the published figures.

    Reads: `dvc exp show --json` in the current repository (default), or --exp-json, or --runs; with
    --misclassified also each run's predictions and checkpoint (from the DVC cache, or best.pt and
    predictions_test.csv in its --runs folder) and the test shards.
    Writes: OUT (Markdown; each cell tagged with the experiment or publication it came from) and, with
    --misclassified, that PNG (Fig. 8 over the experiment set).
    """
    from train.report import load_published, write_report
    from train.runs import collect_runs, shown_runs

    found, skipped = collect_runs(runs, exp_json, eval_file, latency_file, Path.cwd())
    write_report(found, out, load_published(), at, skipped)
    summary = {"out": str(out), "runs": [f"{r.label}: {r.model}/{r.variant}" for r in found], "skipped": skipped}
    if misclassified is not None:
        from train.misclassified import report_figure

        figure = report_figure(shown_runs(found), Path.cwd(), shards_root, misclassified)
        summary["misclassified"] = {"out": str(misclassified), **figure}
    _echo_json(summary)


# ---- commands: predict, export (owner: train/predict.py, train/export.py) ----


@app.command(rich_help_panel=SCREENING)
@_fail_cleanly
def predict(
    inputs: Annotated[
        list[str], typer.Argument(help="Image files, folders (searched recursively) or glob patterns", show_default=False)
    ],
    model: Annotated[
        Path,
        typer.Option(
            help="Checkpoint: architecture, variant, preprocessing and threshold all come from it. "
            "With --onnx they come from the ONNX metadata and the checkpoint is read only for --heatmaps"
        ),
    ] = Path("models/best.pt"),
    out: Annotated[Path, typer.Option(help="CSV to write: path, probability, decision, threshold, model, engine, error")] = Path(
        "predictions.csv"
    ),
    heatmaps: Annotated[
        Optional[Path], typer.Option(help="Folder for one Grad-CAM overlay PNG per image (<stem>-<path hash>.png)")
    ] = None,
    onnx: Annotated[
        Optional[Path], typer.Option(help="Run this ONNX model (from `cxr export`) with onnxruntime instead of PyTorch")
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
    from train.predict import predict as run_predict
    from train.runtime import pick_device

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
@_fail_cleanly
def export(
    model: Annotated[Path, typer.Option(help="Checkpoint to export")] = Path("models/best.pt"),
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
    _echo_json(export_summary(export_onnx(model, out, verify_images=images, tolerance=tolerance, show_progress=True)))



# Help panels list in order of first use: stages, then screening, then benchmarks.
_PANEL_ORDER = (STAGES, SCREENING, BENCHMARKS)
app.registered_commands.sort(key=lambda cmd: _PANEL_ORDER.index(cmd.rich_help_panel))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
