"""The layering rule (README, Layout), held by walking every import in the package.

base  = the pipeline/ modules in BASE: errors, names, params, file I/O and ownership, formats,
        image I/O, preprocessing. They import only each other.
data  = every other pipeline/ module (ingest, shard, sample, benchmarks): base + data.
model = every train/ module: base + model, never the data side.
app   = pipeline/cli.py, the one module that wires both; nothing imports it.
A new pipeline/ module is data until it is listed here.
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
APP = {"pipeline.cli"}
ALLOWED = {"base": {"base"}, "data": {"base", "data"}, "model": {"base", "model"}, "app": {"base", "data", "model"}}


def layer(module: str) -> str:
    if module in APP:
        return "app"
    if module in BASE:
        return "base"
    return "data" if module.startswith("pipeline.") else "model"


def project_imports(path: Path, modules: set[str]) -> set[tuple[str, int]]:
    """(imported project module, line) for every import in the file, function-level ones included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from train import metrics` imports the module train.metrics
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]  # fmt: skip
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}:{node.lineno}: relative import; the layering test reads absolute ones")
        else:
            continue
        found |= {(name, node.lineno) for name in names if name.split(".")[0] in PACKAGES}
    return found


def edges(root: Path = REPO) -> list[tuple[str, str, int]]:
    files = {f"{p.parent.name}.{p.stem}": p for pkg in PACKAGES for p in (root / pkg).glob("*.py")}
    modules = set(files) | set(PACKAGES)
    return [(src, dst, line) for src, path in sorted(files.items()) for dst, line in project_imports(path, modules)]


def violations(found: list[tuple[str, str, int]]) -> list[str]:
    bad = []
    for src, dst, line in found:
        if dst in PACKAGES:
            continue  # the package itself (`import train`): empty __init__ files
        if layer(dst) not in ALLOWED[layer(src)]:
            bad.append(f"{src} ({layer(src)}) imports {dst} ({layer(dst)}) at line {line}")
    return sorted(bad)


def test_every_import_follows_the_layering():
    assert violations(edges()) == []


def test_every_base_module_exists():
    missing = [m for m in BASE | APP if not (REPO / (m.replace(".", "/") + ".py")).is_file()]
    assert not missing, missing


@pytest.mark.parametrize(
    "src,dst",
    [
        ("pipeline.preprocess", "train.models"),  # base reaching up into the model side
        ("pipeline.shard_format", "pipeline.manifest"),  # base reaching into the data side
        ("train.evaluate", "pipeline.manifest"),  # model side reaching into the data side
        ("pipeline.shards", "train.data"),  # data side reaching into the model side
        ("train.report", "pipeline.cli"),  # anything importing the app
    ],
)
def test_the_rule_refuses_each_kind_of_wrong_edge(src, dst):
    assert violations([(src, dst, 1)]) != []


def test_the_walk_sees_function_level_and_from_package_imports(tmp_path):
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
    (tmp_path / "pipeline" / "preprocess.py").write_text("def f():\n    from train import models\n")
    (tmp_path / "train" / "models.py").write_text("import pipeline.manifest\n")
    (tmp_path / "pipeline" / "manifest.py").write_text("")
    assert violations(edges(tmp_path)) == [
        "pipeline.preprocess (base) imports train.models (model) at line 2",
        "train.models (model) imports pipeline.manifest (data) at line 1",
    ]
