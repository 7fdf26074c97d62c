"""The layering rule (README, Layout), held by walking every import in both packages, sub-packages included.

Data side (pipeline/):
  base       = the pipeline/ modules in BASE: errors, names, params, file I/O and ownership, formats,
               image I/O, preprocessing. They import only each other.
  data       = every other pipeline/ module (sample, ingest, shard, figures): base + data.
  data-bench = pipeline/bench/ (bench-preprocess, bench-memory): base + data + data-bench.
Model side (train/):
  core       = the flat train/ modules (models, checkpoint, data, runtime, inference, export, ...): base + core.
  a job      = train/fit/, train/evaluation/, train/screen/, train/report/: base + core + that job; a job
               never reaches into another job or into the benchmarks.
  model-bench= train/bench/: base + core + every job + model-bench.
  facade     = train/__init__.py (`from train import Screener`): base + core + screen.
App:
  app        = pipeline/cli.py and pipeline/commands/: everything; nothing else imports it.
A new pipeline/ module is data until it is listed in BASE.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "train")
BASE = {
    "pipeline.errors",
    "pipeline.names",
    "pipeline.networks",
    "pipeline.fileio",
    "pipeline.ownership",
    "pipeline.params",
    "pipeline.rejects",
    "pipeline.labels",
    "pipeline.locations",
    "pipeline.shard_format",
    "pipeline.imageio",
    "pipeline.dicom",
    "pipeline.preprocess",
}
APP = {"pipeline.cli", "pipeline.commands"}
FACADES = {"train"}
JOBS = ("fit", "evaluation", "screen", "report")
_MODEL = {"base", "core"}
ALLOWED = {
    "base": {"base"},
    "data": {"base", "data"},
    "data-bench": {"base", "data", "data-bench"},
    "core": _MODEL,
    **{job: _MODEL | {job} for job in JOBS},
    "model-bench": _MODEL | set(JOBS) | {"model-bench"},
    "facade": _MODEL | {"screen"},
    "app": {"base", "data", "data-bench", "core", *JOBS, "model-bench", "facade", "app"},
}


def layer(module: str) -> str:
    if module in APP or module.startswith("pipeline.commands."):
        return "app"
    if module in FACADES:
        return "facade"
    if module in BASE:
        return "base"
    parts = module.split(".")
    if parts[0] == "pipeline":
        return "data-bench" if parts[1:2] == ["bench"] else "data"
    if parts[1] == "bench":
        return "model-bench"
    return parts[1] if parts[1] in JOBS else "core"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, modules: set[str]) -> set[tuple[str, int]]:
    """(imported project module, line) for every import in the file, function-level ones included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from train.fit import epoch` imports the module train.fit.epoch
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]  # fmt: skip
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}:{node.lineno}: relative import; the layering test reads absolute ones")
        else:
            continue
        found |= {(name, node.lineno) for name in names if name.split(".")[0] in PACKAGES}
    return found


def edges(root: Path = REPO) -> list[tuple[str, str, int]]:
    files = {module_name(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    modules = set(files)
    return [(src, dst, line) for src, path in sorted(files.items()) for dst, line in project_imports(path, modules)]


def violations(found: list[tuple[str, str, int]]) -> list[str]:
    bad = []
    for src, dst, line in found:
        if dst in PACKAGES and dst not in FACADES:
            continue  # `import pipeline`: an empty package
        if src == dst:
            continue
        if layer(dst) not in ALLOWED[layer(src)] or (layer(dst) == "app" and layer(src) != "app"):
            bad.append(f"{src} ({layer(src)}) imports {dst} ({layer(dst)}) at line {line}")
    return sorted(bad)


def test_every_import_follows_the_layering():
    assert violations(edges()) == []


def test_the_walk_covers_every_sub_package():
    walked = {src for src, _, _ in edges()} | {module_name(p, REPO) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    for job in (*JOBS, "bench"):
        assert any(m.startswith(f"train.{job}.") for m in walked), job
    assert any(m.startswith("pipeline.bench.") for m in walked)
    assert any(m.startswith("pipeline.commands.") for m in walked)


def test_every_base_module_exists():
    missing = [m for m in BASE | {"pipeline.cli"} if not (REPO / (m.replace(".", "/") + ".py")).is_file()]
    assert not missing, missing


@pytest.mark.parametrize(
    "src,dst",
    [
        ("pipeline.preprocess", "train.models"),  # base reaching up into the model side
        ("pipeline.shard_format", "pipeline.manifest"),  # base reaching into the data side
        ("train.evaluation.evaluate", "pipeline.manifest"),  # model side reaching into the data side
        ("pipeline.shards", "train.data"),  # data side reaching into the model side
        ("train.report.tables", "pipeline.cli"),  # anything importing the app
        ("train.models", "train.fit.trainer"),  # core reaching up into a job
        ("train.checkpoint", "train.screen.predict"),
        ("train.fit.trainer", "train.evaluation.evaluate"),  # one job reaching into another
        ("train.screen.predict", "train.bench.bench_screen"),  # a job reaching up into the benchmarks
        ("pipeline.shards", "pipeline.bench.bench_preprocess"),  # a stage reaching up into its benchmarks
        ("train.models", "train"),  # core importing the facade (and so the screening job)
        ("pipeline.figures", "pipeline.commands.stages"),  # the data side importing a CLI panel
    ],
)
def test_the_rule_refuses_each_kind_of_wrong_edge(src, dst):
    assert violations([(src, dst, 1)]) != []


@pytest.mark.parametrize(
    "src,dst",
    [
        ("train.fit.trainer", "train.fit.epoch"),  # inside one job
        ("train.bench.bench_train", "train.fit.epoch"),  # benchmarks time the jobs
        ("train.screen.api", "train.inference"),  # a job on the core
        ("pipeline.commands.stages", "train.fit.trainer"),  # the app wires everything
    ],
)
def test_the_rule_allows_each_kind_of_right_edge(src, dst):
    assert violations([(src, dst, 1)]) == []


def test_the_walk_sees_function_level_and_from_package_imports_in_sub_packages(tmp_path):
    for folder in ("pipeline", "train", "train/fit", "train/screen"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "preprocess.py").write_text("def f():\n    from train import models\n")
    (tmp_path / "train" / "models.py").write_text("import pipeline.manifest\n")
    (tmp_path / "pipeline" / "manifest.py").write_text("")
    (tmp_path / "train" / "fit" / "epoch.py").write_text("x = 1\n\n\ndef g():\n    from train.screen import predict\n")
    (tmp_path / "train" / "screen" / "predict.py").write_text("")
    assert violations(edges(tmp_path)) == [
        "pipeline.preprocess (base) imports train.models (core) at line 2",
        "train.fit.epoch (fit) imports train.screen.predict (screen) at line 5",
        "train.models (core) imports pipeline.manifest (data) at line 1",
    ]
