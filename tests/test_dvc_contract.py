"""dvc.yaml is the pipeline's table of contents: every stage must name a real command and real params."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import app

REPO = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
COMMANDS = {cmd.name or cmd.callback.__name__ for cmd in app.registered_commands}


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
    for name, stage in stages():
        argv = shlex.split(stage["cmd"])
        assert argv[:3] == ["python", "-m", "pipeline.cli"], f"{name}: {stage['cmd']}"
        assert argv[3] in COMMANDS, f"{name}: unknown command {argv[3]}"


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
    "train": "train.trainer",
    "evaluate": "train.evaluate,train.misclassified",
    "external": "train.external",
    "latency": "train.latency",
    "figures": "pipeline.figures",
    "curves": "pipeline.figures",
}


def test_each_stage_lists_all_the_code_it_runs():
    probe = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1].split(',')]; print(' '.join(sys.modules))"
    for name, stage in stages():
        base = name.split("@")[0]
        loaded = subprocess.run([sys.executable, "-c", probe, STAGE_MODULES[base]], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout.split()
        needed = {m.replace(".", "/") + ".py" for m in loaded if m.startswith(("pipeline.", "train."))}
        needed -= {"pipeline/errors.py", "pipeline/params.py", "pipeline/names.py"}
        missing = needed - set(stage.get("deps", []))
        assert not missing, f"stage {name} runs {sorted(missing)} but does not depend on it"


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
