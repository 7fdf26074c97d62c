"""What every panel of the CLI shares: the error edge, params loading, JSON output and option aliases.

Defaults a user sees in several commands (the checkpoint, the real-data root, a network name) are
typed once here, so `--help` and the code cannot drift apart between commands.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import CxrError
from pipeline.names import MODEL_NAMES
from pipeline.params import Params, load_params

# Help panels, in the order `cxr --help` lists them (the order pipeline/cli.py adds the panels in).
STAGES = "Pipeline stages (each is one dvc.yaml stage; `dvc repro` runs them all)"
SCREENING = "Screening"
REPORTS = "Reports and checks"
BENCHMARKS = "Benchmarks"

DEFAULT_CHECKPOINT = Path("models/best.pt")
DEFAULT_REAL_ROOT = Path("../shared/covidx-mini")
DEFAULT_PARAMS = Path("params.yaml")

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read (read once, strictly)")]
CheckpointOpt = Annotated[
    Path,
    typer.Option("--model", help="Checkpoint (.pt from `cxr train`): the network, variant, preprocessing, calibration "
                 "and threshold all come from it, never from params.yaml"),  # fmt: skip
]
RealRootOpt = Annotated[Path, typer.Option("--root", help="COVIDx-layout dataset root to measure on")]
ArchOpt = Annotated[str, typer.Option("--arch", help=f"Network: {' | '.join(MODEL_NAMES)}")]
EngineOpt = Annotated[
    str,
    typer.Option(
        help="auto: ONNX Runtime, built once per checkpoint and kept only if it matches PyTorch within 1e-4 on "
        "the first batch, else eager PyTorch (a one-line note says why); onnxruntime: that or an error; eager"
    ),
]


def panel() -> typer.Typer:
    """A panel's own Typer app, merged into the one `cxr` app without a group name."""
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def fail_cleanly(fn):
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


def read_params(path: Path) -> Params:
    return load_params(path)


def echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=1, sort_keys=True))
