import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def command_names():
    return sorted(typer.main.get_command(app).commands)  # every panel's commands, merged into the one app


@pytest.mark.parametrize("name", command_names())
def test_every_command_says_what_it_reads_and_writes(name):
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Reads" in text and ("Writes" in text or "writes" in text), text


def test_library_errors_become_a_message_and_exit_code_1(tmp_path):
    result = runner.invoke(app, ["ingest", "--root", str(tmp_path), "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 1
    assert "not a COVIDx-layout root" in result.output
    result = runner.invoke(app, ["shard", "--params", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1 and "params file not found" in result.output


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "pipeline.cli"],
        [shutil.which("typer") or "typer", str(REPO / "pipeline" / "cli.py"), "run"],
        [shutil.which("cxr") or "cxr"],
    ],
    ids=["python -m", "typer run", "console script"],
)
def test_three_ways_to_run(argv, tmp_path):
    if not Path(argv[0]).exists() and shutil.which(argv[0]) is None:
        pytest.fail(f"{argv[0]} is not installed: run the README's install command")
    result = subprocess.run(argv + ["shard", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--equalize" in result.stdout


@pytest.mark.slow
def test_ingest_then_shard_from_the_command_line(tmp_path):
    from tests.test_shards import make_dataset

    root = make_dataset(tmp_path / "ds", n=8)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    env = os.environ | {"PYTHONPATH": str(REPO)}
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    ingest = run("ingest", "--root", str(root))
    assert ingest.returncode == 0, ingest.stderr
    shard = run("shard", "--equalize")
    assert shard.returncode == 0, shard.stderr
    summary = json.loads((tmp_path / "shards" / "equalized" / "summary.json").read_text())
    assert summary["variant"] == "equalized" and summary["params"]["preprocess"]["equalize"] == "global"
    assert sum(summary["counts"].values()) == 12


def test_help_groups_commands_into_panels_and_points_new_users_on():
    result = runner.invoke(app, ["--help"], terminal_width=120)
    assert result.exit_code == 0, result.output
    text = result.output
    titles = ("Pipeline stages", "Screening", "Reports and checks", "Benchmarks")
    stages, screening, reports, benchmarks = (text.index(title) for title in titles)
    assert stages < screening < reports < benchmarks  # the order the panels are declared in
    # each stage in dvc.yaml's order, inside its panel
    positions = [text.index(f"│ {name} ") for name in ("sample", "ingest", "shard", "train", "evaluate", "latency",
                                                          "figures", "curves")]  # fmt: skip
    assert stages < positions[0] and positions == sorted(positions) and positions[-1] < screening
    for name in ("predict", "export"):
        assert screening < text.index(f"│ {name} ") < reports, name
    for name in ("report", "verify"):
        assert reports < text.index(f"│ {name} ") < benchmarks, name
    for name in ("bench-preprocess", "bench-memory", "bench-train", "bench-screen", "bench-latency"):
        assert benchmarks < text.index(f"│ {name} "), name
    flat = " ".join(text.split())
    assert "`dvc repro`" in flat and "`dvc plots show`" in flat


def test_every_command_sits_in_a_panel():
    assert all(cmd.rich_help_panel for cmd in typer.main.get_command(app).commands.values())


@pytest.mark.parametrize("flags", [["--plain", "--variant", "equalized"], ["--equalize", "--variant", "plain"]])
def test_shard_refuses_a_flag_that_contradicts_the_variant(flags, tmp_path):
    result = runner.invoke(app, ["shard", *flags, "--manifest", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 1 and "contradicts --variant" in result.output


def test_shard_variant_from_either_spelling():
    from pipeline.commands.stages import shard_variant

    assert shard_variant(None, None) == "plain"
    assert shard_variant(True, None) == shard_variant(None, "equalized") == shard_variant(True, "equalized") == "equalized"
    assert shard_variant(False, "plain") == "plain"


def test_version():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"cxr-screen {version('cxr-screen')}"


def test_missing_checkpoint_says_what_to_do(tmp_path):
    result = runner.invoke(app, ["predict", str(tmp_path), "--model", str(tmp_path / "best.pt")])
    assert result.exit_code == 1
    assert "dvc repro" in result.output and "--model" in result.output
