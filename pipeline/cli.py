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
    help="Screen chest X-rays for COVID-19: COVIDx -> manifest -> shards -> model -> metrics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read (read once, strictly)")]


def _fail_cleanly(fn):
    """Turn the project's exception into a one-line message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CxrError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=1) from None

    return wrapper


def _params(path: Path) -> Params:
    return load_params(path)


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=1, sort_keys=True))


@app.command()
@_fail_cleanly
def sample(
    out: Annotated[Path, typer.Option(help="Where to write the synthetic COVIDx-layout dataset")] = Path("data/sample"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Generate a small deterministic synthetic dataset in the COVIDx CXR-2 layout.

    Reads: params (sample.*, seed). Writes: OUT/train.txt, OUT/test.txt, OUT/train/, OUT/test/.
    """
    from pipeline.sample import generate_sample

    p = _params(params)
    _echo_json(generate_sample(out, p.sample.train_per_class, p.sample.test_per_class, p.seed))


@app.command()
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
    summary = build_manifest(
        root=root or Path(p.data.root),
        manifest_path=out,
        report_path=report,
        val_fraction=p.data.val_fraction,
        seed=p.seed,
        max_reject_fraction=p.data.max_reject_fraction,
    )
    _echo_json(summary)


@app.command()
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
    from pipeline.shards import write_variant

    p = _params(params)
    if variant is not None and variant not in ("plain", "equalized"):
        raise CxrError(f"unknown variant {variant!r}; valid: plain, equalized")
    variant = variant or ("equalized" if equalize else "plain")
    summary = write_variant(
        manifest_path=manifest,
        ingest_report_path=ingest_report,
        out_dir=out or Path("shards") / variant,
        variant=variant,
        preprocess=p.preprocess,
        shard=p.shard,
        max_reject_fraction=p.data.max_reject_fraction,
        seed=p.seed,
    )
    _echo_json({k: summary[k] for k in ("variant", "counts", "reject_count")})


@app.command("bench-preprocess")
@_fail_cleanly
def bench_preprocess(
    root: Annotated[Path, typer.Option(help="COVIDx-layout dataset root to benchmark on")] = Path("../shared/covidx-mini"),
    repeat: Annotated[int, typer.Option(help="Passes over the images per measurement (best is kept)")] = 2,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Benchmark: pipeline preprocessing vs a naive single-process PIL baseline and a decode-only floor.

    Reads: ROOT's label files and images. Writes nothing; prints images/s and ratios.
    """
    from pipeline.bench import run_preprocess_benchmark

    p = _params(params)
    _echo_json(run_preprocess_benchmark(root, p.preprocess, p.shard, repeat=repeat))


# ---- commands: train (owner: train/trainer.py) ----


# ---- commands: evaluate, latency, report (owner: train/evaluate.py, train/latency.py, train/report.py) ----


# ---- commands: predict, export (owner: train/predict.py, train/export.py) ----


def main() -> None:
    app()


if __name__ == "__main__":
    main()
