"""dvc.yaml is the pipeline's table of contents: every stage must name a real command and real params."""

import functools
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import typer

from pipeline.cli import app

REPO = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
COMMANDS = set(typer.main.get_command(app).commands)  # the merged panels' commands, as the CLI sees them


def stages():
    for name, stage in DVC["stages"].items():
        if "foreach" in stage:
            items = stage["foreach"]
            if isinstance(items, str):  # ${a.b}: a mapping in params.yaml, DVC's ${key} and ${item}
                items = _lookup(items.removeprefix("${").removesuffix("}"))
                assert isinstance(items, dict) and items, f"{name}: foreach must name a non-empty mapping"
                for key, item in items.items():
                    yield f"{name}@{key}", _resolve(stage["do"], {"key": key, "item": item})
                continue
            assert all(isinstance(item, str) for item in items), "foreach values must be strings"
            for item in items:
                yield f"{name}@{item}", _resolve(stage["do"], {"item": item})
        else:
            yield name, stage


def _resolve(node, values):
    text = yaml.safe_dump(node)
    for key, value in values.items():
        text = text.replace("${" + key + "}", value)
    return yaml.safe_load(text)


def _lookup(key: str):
    node = PARAMS
    for part in key.split("."):
        assert isinstance(node, dict) and part in node, f"params key {key} missing from params.yaml"
        node = node[part]
    return node


def test_the_issues_stage_names_exist():
    assert {"sample", "ingest", "shard"} <= set(DVC["stages"])
    assert DVC["stages"]["shard"]["foreach"] == ["plain", "equalized"]


def test_every_stage_is_one_cli_command_with_real_options():
    """Each stage's command line parses as its CLI command would parse it (options, their values, arguments)."""
    group = typer.main.get_command(app)
    for name, stage in stages():
        argv = shlex.split(stage["cmd"])
        assert argv[:3] == ["python", "-m", "pipeline.cli"], f"{name}: {stage['cmd']}"
        assert argv[3] in COMMANDS, f"{name}: unknown command {argv[3]}"
        command = group.commands[argv[3]]
        ctx = command.make_context(argv[3], argv[4:], resilient_parsing=False)  # raises on an unknown option
        given = {opt for opt in argv[4:] if opt.startswith("--")}
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        assert given <= known, f"{name}: {sorted(given - known)} are not options of {argv[3]}"
        assert ctx.params, name


def test_the_option_check_refuses_a_misspelt_option():
    command = typer.main.get_command(app).commands["evaluate"]
    with pytest.raises(Exception, match="No such option: --modle"):  # click's UsageError, vendored by typer
        command.make_context("evaluate", ["--modle", "models/best.pt"])


def test_params_and_code_deps_exist():
    for name, stage in stages():
        for entry in stage.get("params", []):
            for key in entry if isinstance(entry, dict) else [entry]:
                _lookup(key)
        for dep in stage.get("deps", []):
            if dep.endswith(".py"):
                assert (REPO / dep).is_file(), f"{name}: dependency {dep} does not exist"


# The module behind each stage's command; every project module it imports must be
# a dependency, or DVC would skip a stage whose code changed. Params are tracked
# through `params:` (names.py is the vocabulary they are checked against), and
# errors.py holds no behaviour.
STAGE_MODULES = {
    "sample": "pipeline.sample",
    "sample_shifted": "pipeline.sample",
    "ingest": "pipeline.manifest",
    "shard": "pipeline.shards",
    "train": "train.fit.trainer",
    "evaluate": "train.evaluation.evaluate,train.evaluation.misclassified",
    "external": "train.evaluation.external",
    "latency": "train.evaluation.latency",
    "figures": "pipeline.figures",
    "curves": "pipeline.figures",
}


@functools.lru_cache(maxsize=None)  # one interpreter per stage module set, shared by the tests below
def stage_code(modules: str) -> frozenset[str]:
    """The project files a fresh interpreter loads to import `modules`, relative to the repo.

    A package's `__init__.py` is left out: it only makes the folder a package (train/__init__.py's
    lazy `Screener` is never touched by a stage)."""
    probe = ("import importlib, sys; [importlib.import_module(m) for m in sys.argv[1].split(',')]; "
             "print(' '.join(getattr(m, '__file__', None) or '' for n, m in list(sys.modules.items()) "
             "if n.split('.')[0] in ('pipeline', 'train')))")
    loaded = subprocess.run([sys.executable, "-c", probe, modules], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout.split()  # fmt: skip
    files = {Path(f).resolve().relative_to(REPO).as_posix() for f in loaded}
    return frozenset(f for f in files if not f.endswith("__init__.py"))


@pytest.mark.slow
def test_each_stage_lists_all_the_code_it_runs():
    for name, stage in stages():
        needed = stage_code(STAGE_MODULES[name.split("@")[0]])
        needed -= {"pipeline/errors.py", "pipeline/params.py", "pipeline/names.py"}
        missing = needed - set(stage.get("deps", []))
        assert not missing, f"stage {name} runs {sorted(missing)} but does not depend on it"


@pytest.mark.slow
def test_each_stage_depends_on_no_code_it_does_not_run():
    """The other half of the contract: a dependency the stage never imports reruns it for nothing."""
    for name, stage in stages():
        needed = stage_code(STAGE_MODULES[name.split("@")[0]])
        code = [d for d in stage.get("deps", []) if d.endswith(".py")]
        assert set(code) <= needed, f"stage {name} depends on {sorted(set(code) - needed)}, which it never imports"
        assert len(code) == len(set(code)), f"stage {name} lists a dependency twice"


@pytest.mark.slow
def test_the_stage_probe_sees_sub_package_modules():
    """A probe that missed train/fit/*.py would make the two tests above pass on any deps."""
    assert {"train/fit/trainer.py", "train/fit/epoch.py", "train/models.py"} <= stage_code("train.fit.trainer")


def test_outputs_are_git_ignored_not_committed():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing decides what is ignored")
    outputs = ["data/manifest.jsonl", "shards/plain/train-000000.tar", "models/best.pt", "metrics/eval.json",
               "dvclive/metrics.json", "reports/tables.md", "figures/roc.png"]  # fmt: skip
    kept = ["shards/.gitignore", "params.yaml", "dvc.yaml"]
    check = subprocess.run(["git", "check-ignore", "--no-index", *outputs, *kept], cwd=REPO, capture_output=True, text=True)
    assert check.stdout.split() == outputs, check.stderr


def test_default_external_root_is_made_by_a_stage():
    """A fresh `dvc repro` scores the external set without any download."""
    roots = PARAMS["evaluate"]["external"]
    made = {out for stage in DVC["stages"].values() if "outs" in stage for out in stage["outs"] if isinstance(out, str)}
    assert roots and set(roots.values()) <= made
    external = dict(stages())
    for key, root in roots.items():
        stage = external[f"external@{key}"]
        assert root in stage["deps"] and f"metrics/external/{key}.json" in stage["metrics"]
