"""cxr-screen command line: one command per DVC stage, plus screening, reports and benchmarks.

This is the one app. The command bodies live in pipeline/commands/, one module per help panel,
merged here without a group name, so every command keeps its name (`cxr shard`, as dvc.yaml calls
it). Only the CLI reads params.yaml, wires modules together and turns `CxrError` into a message
and exit code 1. Heavy modules (torch) are imported inside the commands that need them so `cxr
shard --help` stays instant.

Runs three ways: `cxr shard`, `python -m pipeline.cli shard`, `typer pipeline/cli.py run shard`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

# `typer pipeline/cli.py run` loads this file as a script, without the repo
# root on sys.path; add it so `pipeline.*` and `train.*` import either way.
_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from pipeline.commands import benchmarks, reports, screening, stages  # noqa: E402

app = typer.Typer(
    name="cxr",
    help="Screen chest X-rays for COVID-19: COVIDx -> manifest -> shards -> model -> metrics.\n\n"
    "New here? `dvc repro` runs the whole pipeline on a synthetic sample; `dvc plots show` draws its figures; "
    "`cxr predict scans/ --heatmaps heatmaps/` screens your own images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


# `cxr --help` lists the panels in the order they are added: the order a user meets them.
for _panel in (stages, screening, reports, benchmarks):
    app.add_typer(_panel.app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
