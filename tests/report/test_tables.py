"""train/report/tables.py and train/report/experiments.py: tables from synthetic metric files and from `dvc exp show --json` output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from train.report import tables as rep
from train.report import experiments as run_sources


def _block(p: float, acc: float) -> dict:
    """A threshold-dependent block whose numbers are all derived from p (easy to find in the output)."""
    return {
        "accuracy": acc,
        "negative": {"precision": p - 0.01, "recall": p - 0.02, "f1": p - 0.03},
        "positive": {"precision": p + 0.01, "recall": p + 0.02, "f1": p + 0.005},
        "macro": {"precision": p - 0.004, "recall": p - 0.006, "f1": p - 0.008},
    }


def _eval(model: str, variant: str, p: float, val_f1: float, init: dict | None = None) -> dict:
    return {
        "model": {"name": model, "variant": variant, "input_size": 224, **({"init": init} if init else {})},
        "n_test": 88,
        "threshold": {"value": 0.41, "rule": "max_f1", "split": "val"},
        **_block(p, p),
        "at_0_5": _block(p - 0.1, p - 0.1),
        "val": {"macro": {"f1": val_f1}},
    }


def _latency(model: str, ms: float) -> dict:
    return {"model": model, "params_m": 7.0, "cpu_ms_per_image": ms, "cpu_fastest_path": "onnxruntime",
            "cpu_fastest_ms_per_image": ms * 0.7, "floor_ms": ms * 0.6, "network_input": 224,
            "cpu_model": "Test CPU", "cpu_threads": 2, "torch_version": "2.x"}  # fmt: skip


def _write_run(root: Path, name: str, ev: dict | None, lat: dict | None) -> None:
    d = root / name
    d.mkdir(parents=True)
    if ev is not None:
        (d / "eval.json").write_text(json.dumps(ev))
    if lat is not None:
        (d / "latency.json").write_text(json.dumps(lat))


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    _write_run(root, "rn-eq", _eval("resnet50", "equalized", 0.90, 0.80), _latency("resnet50", 40.0))
    _write_run(root, "rn-plain", _eval("resnet50", "plain", 0.80, 0.70), None)
    imagenet = {"kind": "imagenet", "weights": "DenseNet121_Weights.IMAGENET1K_V1", "freeze": "backbone"}
    _write_run(root, "dn-eq", _eval("densenet121", "equalized", 0.70, 0.60, imagenet), _latency("densenet121", 30.0))
    # same pair as rn-eq: better on TEST but worse on validation, so it must not be the one shown
    _write_run(root, "rn-eq-lucky", _eval("resnet50", "equalized", 0.95, 0.50), None)
    return root


def test_tables_bold_best_and_tag_sources(runs_dir):
    runs = run_sources.runs_from_dir(runs_dir)
    text = rep.render(runs, rep.load_published(), at="operating")
    lines = text.splitlines()
    t3 = lines.index(next(line for line in lines if line.startswith("### Table III")))
    rn = next(line for line in lines[t3:] if line.startswith("| ResNet50 | ours"))
    cells = [c.strip() for c in rn.strip("|").split("|")]
    # positive precision = p + 0.01: eq. run rn-eq (val 0.80 beats rn-eq-lucky's 0.50), best in column
    assert cells[2] == "**0.910**" and cells[5].startswith("E")
    assert cells[6] == "**0.810**"  # plain: only resnet50 has a plain run
    dn = next(line for line in lines[t3:] if line.startswith("| DenseNet121 | ours"))
    assert "| 0.710 |" in dn and "**0.710**" not in dn
    assert "| AlexNet | ours | — | — | — | — |" in text
    study_row = next(line for line in lines[t3:] if line.startswith("|  | study"))
    assert "0.994" in study_row and "study Table III" in study_row  # AlexNet eq. precision, Table III
    assert "0.950" not in text  # rn-eq-lucky never appears


def test_threshold_choice_and_published_rows(runs_dir):
    text = rep.render(run_sources.runs_from_dir(runs_dir), rep.load_published(), at="0.5")
    t6 = text.split("### Table VI")[1].split("### Table VII")[0]
    assert "| ResNet50 | ours | equalized | 224×224 | 0.810 | 0.820 | 0.800 | E" in t6  # at_0_5 block (p - 0.1)
    assert "| COVID-Net CXR-2 | published | — | 480×480 | 0.970 | 0.955 | 0.963 | COVID-Net CXR-2 paper |" in t6
    assert "| InceptionV3 | study | plain | 299×299 | 0.975 | 0.975 | 0.975 | study Table VI |" in t6
    t7 = text.split("### Table VII")[1]
    assert "| COVID-Net CXR-2 | published | 8.8 | 71.1 |" in t7
    t5 = text.split("### Table V:")[1].split("### Table VI")[0]
    assert "| ResNet50 | ours | 7.0 | 40.0 | 28.0 (onnxruntime) | 24.0 | — | E" in t5
    assert "| VGG16 | ours | — | — | — | — | — | — |" in t5
    assert "|  | study | 134.3 | 171.0 | — | — | 12.7 | study Table V |" in t5
    sources = text.split("## Sources")[1]
    assert "`rn-eq`" in sources and "n_test=88" in sources and "Test CPU" in sources
    dn = next(line for line in sources.splitlines() if "`dn-eq`" in line)
    assert "init=imagenet (DenseNet121_Weights.IMAGENET1K_V1), backbone frozen" in dn
    assert "init=—" in next(line for line in sources.splitlines() if "`rn-eq`" in line)  # an eval.json without it
    assert "Loconte" in sources and "Pavlova" in sources


def test_best_run_is_chosen_on_validation_not_test(runs_dir):
    best = run_sources.best_by_pair(run_sources.runs_from_dir(runs_dir))
    assert best[("resnet50", "equalized")].label == "rn-eq"


# `dvc exp show --json` from dvc 3.67.1 (a throw-away repo; trimmed to the fields the report reads).
# DVC drops lists and nulls from metrics there, and the workspace repeats the last experiment run.
_EXP_EVAL = {"accuracy": 0.8, "macro": {"f1": 0.7}, "model": {"name": "densenet121", "variant": "equalized"},
             "positive": {"precision": 0.75}, "sensitivity": {"value": 0.9}, "val": {"macro": {"f1": 0.66}}}  # fmt: skip
_BASE_EVAL = {"accuracy": 0.9, "macro": {"f1": 0.8}, "model": {"name": "resnet50", "variant": "plain"}}
EXP_SHOW = [
    {"rev": "workspace", "name": None, "error": None, "experiments": None,
     "data": {"rev": "workspace", "params": {"params.yaml": {"data": {"model": "densenet121", "variant": "equalized"}}},
              "metrics": {"metrics/eval.json": {"data": _EXP_EVAL}, "metrics/latency.json": {"data": {"params_m": 6.96}}}}},
    {"rev": "92f0ac1a78b4be9346378ddb51a620528c0a56a8", "name": "master", "error": None,
     "data": {"rev": "92f0ac1a78b4be9346378ddb51a620528c0a56a8",
              "params": {"params.yaml": {"data": {"model": "resnet50", "variant": "plain"}}},
              "metrics": {"metrics/eval.json": {"data": _BASE_EVAL}}},
     "experiments": [
         {"name": "minim-expo", "executor": None, "revs": [
             {"rev": "b0facb489bb872ee29501c94f7f44184542e0f98", "name": "minim-expo", "error": None, "experiments": None,
              "data": {"rev": "b0facb489bb872ee29501c94f7f44184542e0f98",
                       "params": {"params.yaml": {"data": {"model": "densenet121", "variant": "equalized"}}},
                       "metrics": {"metrics/eval.json": {"data": _EXP_EVAL},
                                   "metrics/latency.json": {"data": {"params_m": 6.96}}}}}]},
         {"name": "failed-one", "executor": None, "revs": [
             {"rev": "12a718e000000000000000000000000000000000", "name": "failed-one", "data": {},
              "error": {"type": "ReproductionError", "msg": "failed"}, "experiments": None}]},
     ]},
]  # fmt: skip


def test_runs_from_exp_show_dedupes_workspace_and_skips_errors():
    runs, skipped = run_sources.runs_from_exp_show(EXP_SHOW, "metrics/eval.json", "metrics/latency.json")
    assert [(r.label, r.model, r.variant) for r in runs] == [
        ("minim-expo", "densenet121", "equalized"),
        ("master", "resnet50", "plain"),
    ]
    assert skipped == ["failed-one: failed"]
    assert runs[0].rev.startswith("b0facb4") and runs[0].latency == {"params_m": 6.96}
    text = rep.render(runs, rep.load_published(), at="operating")
    assert "`minim-expo` (commit b0facb4)" in text and "`master` (commit 92f0ac1)" in text


def test_unreadable_metrics_are_reported_not_silently_dropped(tmp_path):
    """`cache: false` metrics in a git-ignored folder: what dvc 3.67 shows for every commit and experiment."""
    missing = {"error": {"type": "FileNotFoundError", "msg": "[Errno 2] No such file or directory: 'metrics/eval.json'"}}
    data = [{"rev": "827401f" + "0" * 33, "name": "main", "error": None, "experiments": None,
             "data": {"params": {}, "metrics": {"metrics/eval.json": missing}}}]  # fmt: skip
    runs, skipped = run_sources.runs_from_exp_show(data, "metrics/eval.json", "metrics/latency.json")
    assert runs == [] and "No such file" in skipped[0]
    saved = tmp_path / "exp.json"
    saved.write_text(json.dumps(data))
    result = CliRunner().invoke(app, ["report", "--exp-json", str(saved), "--out", str(tmp_path / "t.md")])
    assert result.exit_code == 1 and "main: metrics/eval.json: [Errno 2]" in result.output


def test_report_cli_from_saved_exp_json_and_no_runs_error(tmp_path):
    saved = tmp_path / "exp.json"
    saved.write_text(json.dumps(EXP_SHOW))
    out = tmp_path / "reports" / "tables.md"
    result = CliRunner().invoke(app, ["report", "--exp-json", str(saved), "--out", str(out), "--at", "operating"])
    assert result.exit_code == 0, result.output
    assert "### Table VII" in out.read_text()
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["report", "--runs", str(tmp_path / "empty"), "--out", str(out)])
    assert result.exit_code == 1 and "no runs with metrics" in result.output


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or shutil.which("dvc") is None, reason="needs git and dvc")
def test_report_reads_a_real_dvc_exp_show(tmp_path):
    """A throw-away DVC repo: one committed run and one `dvc exp run -S` experiment."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text("model: resnet50\nvariant: plain\n")
    (repo / "gen.py").write_text(
        "import json, os, yaml\np = yaml.safe_load(open('params.yaml'))\nos.makedirs('metrics', exist_ok=True)\n"
        "json.dump({'model': {'name': p['model'], 'variant': p['variant']}, 'accuracy': 0.5, 'at_0_5': "
        "{'positive': {'precision': 0.123, 'recall': 0.5}, 'accuracy': 0.5}, 'val': {'macro': {'f1': 0.4}}}, "
        "open('metrics/eval.json', 'w'))\n"
    )
    (repo / "dvc.yaml").write_text(
        "stages:\n  evaluate:\n    cmd: python gen.py\n    deps: [gen.py]\n    params: [model, variant]\n"
        "    metrics:\n      - metrics/eval.json:\n          cache: false\n"
    )

    def sh(*cmd):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)

    sh("git", "init", "-q")
    sh("git", "config", "user.email", "t@example.com")
    sh("git", "config", "user.name", "t")
    sh("dvc", "init", "-q")
    sh("dvc", "repro", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "base")
    sh("dvc", "exp", "run", "-q", "-n", "incv3", "-S", "model=inceptionv3")
    out = repo / "tables.md"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "report", "--out", str(out)], cwd=repo,
                          capture_output=True, text=True, env=None)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "`incv3` (commit" in text and "inceptionv3/plain" in text and "resnet50/plain" in text
    assert "| InceptionV3 | ours | plain | — | 0.123 | 0.500 | 0.500 | E" in text


def _honest(auc: float, sens_low: float) -> dict:
    """The interval/calibration fields of an eval.json or external JSON (as `dvc exp show` keeps them)."""
    return {
        "n_test": 40, "intervals": {"n_patients": 25}, "roc_auc": auc, "roc_auc_ci95": {"low": auc - 0.1, "high": 0.99},
        "sensitivity": {"value": 1.0, "ci95": {"low": 1.0, "high": 1.0}, "ci95_wilson": {"low": sens_low, "high": 1.0}},
        "specificity": {"value": 0.5, "ci95": {"low": 0.3, "high": 0.7}, "ci95_wilson": {"low": 0.31, "high": 0.69}},
        "at_prevalence": {"prevalence": 0.05, "ppv": {"value": 0.095, "ci95": {"low": 0.07, "high": 0.15}},
                          "npv": {"value": 1.0}},
        "calibration": {"brier": 0.12, "brier_uncalibrated": 0.2, "ece": 0.05, "ece_uncalibrated": 0.15},
        "by_source": {"site-x": {"n": 40, "accuracy": 0.75, "sensitivity": 1.0, "specificity": 0.5}},
    }  # fmt: skip


def test_report_shows_test_and_external_with_their_intervals(tmp_path):
    root = tmp_path / "runs"
    _write_run(root, "dn", {**_eval("densenet121", "equalized", 0.7, 0.6), **_honest(0.81, 0.839)}, None)
    (root / "dn" / "external").mkdir()
    (root / "dn" / "external" / "shifted.json").write_text(json.dumps(_honest(0.62, 0.722)))
    text = rep.render(run_sources.runs_from_dir(root), rep.load_published())
    section = text[text.index("### In-distribution and external validation"):]
    test_row = next(line for line in section.splitlines() if "test (in-distribution)" in line)
    ext_row = next(line for line in section.splitlines() if "external: shifted" in line)
    assert "0.810 [0.710, 0.990]" in test_row and "1.000 [1.000, 1.000] W[0.839, 1.000]" in test_row
    assert "0.620 [0.520, 0.990]" in ext_row and "W[0.722, 1.000]" in ext_row
    assert "0.095 [0.070, 0.150]" in test_row and "0.120 (0.200)" in test_row and "40 / 25" in test_row
    assert "PPV at prevalence 0.05" in section and "cluster bootstrap over patients" in section
    assert "| E1 densenet121/equalized | shifted | site-x | 40 | 0.750 | 1.000 | 0.500 |" in section


def test_exp_show_external_metrics_come_with_the_run():
    data = json.loads(json.dumps(EXP_SHOW[:1]))
    data[0]["data"]["metrics"]["metrics/external/shifted.json"] = {"data": _honest(0.6, 0.7)}
    runs, _ = run_sources.runs_from_exp_show(data, "metrics/eval.json", "metrics/latency.json")
    assert list(runs[0].external) == ["shifted"] and runs[0].external["shifted"]["roc_auc"] == 0.6


def test_spread_over_seeds_is_mean_and_sample_sd(tmp_path):
    root = tmp_path / "runs"
    for i, auc in enumerate((0.6, 0.7, 0.8)):
        _write_run(root, f"seed{i}", {**_eval("densenet121", "equalized", 0.7, 0.6 + i / 100), **_honest(auc, 0.8)},
                   None)  # fmt: skip
        (root / f"seed{i}" / "external").mkdir()
        (root / f"seed{i}" / "external" / "shifted.json").write_text(json.dumps(_honest(auc - 0.1, 0.8)))
    _write_run(root, "alone", _eval("resnet50", "plain", 0.7, 0.6), None)  # one run: no spread to show
    text = rep.render(run_sources.runs_from_dir(root), rep.load_published())
    section = text[text.index("### Spread over runs") : text.index("## Sources")]
    row = next(line for line in section.splitlines() if line.startswith("| densenet121/equalized"))
    # mean 0.7, sample SD of (0.6, 0.7, 0.8) = 0.1; external 0.6 ± 0.1; sensitivity 1.0 in every run
    assert "| 0.700 ± 0.100 | 1.000 ± 0.000 |" in row and "| 0.600 ± 0.100 |" in row
    assert "resnet50/plain" not in section and "shifted: ROC AUC" in section


def test_spread_never_pools_runs_from_different_starting_weights(tmp_path):
    root = tmp_path / "runs"
    imagenet = {"kind": "imagenet", "weights": "DenseNet121_Weights.IMAGENET1K_V1", "freeze": "none"}
    scratch = {"kind": "scratch", "freeze": "none"}
    for name, auc, init in (("s0", 0.6, scratch), ("s1", 0.7, None), ("i0", 0.9, imagenet), ("i1", 0.8, imagenet)):
        _write_run(root, name, {**_eval("densenet121", "equalized", 0.7, 0.6, init), **_honest(auc, 0.8)}, None)
    text = rep.render(run_sources.runs_from_dir(root), rep.load_published())
    rows = [line for line in text[text.index("### Spread over runs") : text.index("## Sources")].splitlines()
            if line.startswith("| densenet121/equalized")]  # fmt: skip
    assert len(rows) == 2
    # an eval.json without model.init (s1) is a scratch run: pooled with s0, never with the ImageNet starts
    scratch_row = next(r for r in rows if r.startswith("| densenet121/equalized |"))
    imagenet_row = next(r for r in rows if "init imagenet (DenseNet121_Weights.IMAGENET1K_V1)" in r)
    assert "| 0.650 ± 0.071 |" in scratch_row and "| 0.850 ± 0.071 |" in imagenet_row
