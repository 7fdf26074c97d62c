"""Panel: tables over a set of experiments, and integrity checks of stored shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.commands.common import REPORTS, echo_json, fail_cleanly, panel

app = panel()


@app.command(rich_help_panel=REPORTS)
@fail_cleanly
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
    from train.report.experiments import collect_runs, shown_runs
    from train.report.tables import load_published, write_report

    found, skipped = collect_runs(runs, exp_json, eval_file, latency_file, Path.cwd())
    write_report(found, out, load_published(), at, skipped)
    summary = {"out": str(out), "runs": [f"{r.label}: {r.model}/{r.variant}" for r in found], "skipped": skipped}
    if misclassified is not None:
        from train.report.misclassified import report_figure

        figure = report_figure(shown_runs(found), Path.cwd(), shards_root, misclassified)
        summary["misclassified"] = {"out": str(misclassified), **figure}
    echo_json(summary)


@app.command(rich_help_panel=REPORTS)
@fail_cleanly
def verify(
    shards: Annotated[list[str], typer.Argument(help="Shard variant folders or URLs to check", show_default=False)],
) -> None:
    """Check every shard against the sha256 recorded in its folder's summary.json.

    Reads: SHARDS/summary.json (validated) and SHARDS/*.tar (SHARDS: a folder or a URL, as for
    train). Writes nothing. Exit code 1 names the shards that are missing or changed.
    """
    from pipeline.shard_format import verify_shards

    echo_json({d: verify_shards(d) for d in shards})
