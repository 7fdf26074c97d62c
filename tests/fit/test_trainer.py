"""End-to-end trainer tests on tiny 32x32 shards with the real ResNet50 (a few optimizer steps each)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.errors import CxrError
from pipeline.params import Params, load_params, params_from_dict
from pipeline.shard_format import read_summary
from tests.conftest import REPO, make_tiny_shards, synthetic_image
from train import ood
from train.inference import Engine
from train.fit import epoch
from train.checkpoint import load_checkpoint
from train.fit.trainer import train_model

PER_CLASS = {"train": 8, "val": 4, "test": 2}


def _params(variant: str = "plain", **train) -> Params:
    raw = load_params(REPO / "params.yaml").to_dict()
    raw.update(model="resnet50", variant=variant, seed=5)
    raw["train"].update(epochs=2, batch_size=4, max_steps=2, num_workers=1, shuffle_buffer=8, lr=None)
    raw["train"].update(train)
    raw["evaluate"].update(batch_size=8)
    return params_from_dict(raw)


def _write_params(params: Params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(json.loads(json.dumps(params.to_dict()))))  # tuples -> lists
    return path


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    return make_tiny_shards(tmp_path / "shards" / "plain", per_class=PER_CLASS, size=32)


def _losses(history: list[dict]) -> list[tuple[float, float]]:
    return [(h["train_loss"], h["val_loss"]) for h in history]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "train", *args]


@pytest.mark.slow
def test_train_writes_self_describing_best_and_resumable_last(tmp_path: Path, shards: Path):
    params = _params()
    out, live = tmp_path / "models", tmp_path / "dvclive"
    result = train_model(params, shards, out, live, progress=False)
    assert result["epochs_run"] == 2 and result["steps_per_rank"] == [4] and result["resumed_from_epoch"] == 0
    assert 1 <= result["best_epoch"] <= 2

    best = load_checkpoint(out / "best.pt")
    summary = read_summary(shards)
    assert (best.model_name, best.variant, best.input_size) == ("resnet50", "plain", 32)
    assert best.preprocess == summary.preprocess and best.meta["params"]["train"]["batch_size"] == 4
    assert best.meta["threshold"]["rule"] == "max_f1" and best.meta["threshold"]["split"] == "val"
    assert best.meta["threshold"]["n"] == summary.split("val").count  # chosen on validation, never test
    assert 0.0 <= best.threshold <= 1.0 and best.meta["epoch"] == result["best_epoch"]
    assert best.meta["val_loss"] == pytest.approx(result["best_val_loss"])
    assert best.build()(torch.rand(2, 1, 32, 32)).shape == (2,)
    # calibration fitted on validation, the threshold chosen on its scale, the selection with its interval
    assert best.meta["calibration"]["fitted_on"] == "val" and best.meta["calibration"]["n"] == 8
    assert best.meta["calibration"] == result["calibration"]
    chosen = best.meta["selection"]
    assert chosen["rule"] == "val_loss" and chosen["epoch"] == result["best_epoch"] and chosen["n_images"] == 8
    lo, hi = chosen["val_loss_ci95"]["low"], chosen["val_loss_ci95"]["high"]
    assert lo <= chosen["val_loss"] <= hi and "patients" in chosen["ci95_method"]

    last = load_checkpoint(out / "last.pt")
    assert last.extra["epoch"] == 2 and last.extra["finished"] and len(last.extra["history"]) == 2
    assert all(torch.equal(best.state_dict[k], v) for k, v in last.extra["best_state"].items())
    assert last.extra["optimizer"]["param_groups"][0]["lr"] == 1e-3  # resnet50's default
    assert last.extra["optimizer"]["param_groups"][0]["weight_decay"] == 0.0

    metrics = json.loads((live / "metrics.json").read_text())
    assert {"train_loss", "val_loss", "val_accuracy", "lr", "images_per_s"} <= set(metrics)
    assert metrics["step"] == 1  # dvclive counts from 0
    rows = (live / "plots" / "metrics" / "val_loss.tsv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + one row per epoch

    # Same params and data: the finished run is reused (threshold recomputed), not retrained.
    again = train_model(params, shards, out, live, progress=False)
    assert again["resumed_from_epoch"] == 2 and again["steps_per_rank"] == [0]
    assert _losses(again["history"]) == _losses(result["history"])
    assert len((live / "plots" / "metrics" / "val_loss.tsv").read_text().strip().splitlines()) == 3

    # Different params: an unrelated run must start fresh.
    other = train_model(_params(epochs=1), shards, out, live, progress=False)
    assert other["resumed_from_epoch"] == 0 and other["epochs_run"] == 1


@pytest.mark.slow
def test_same_params_give_the_same_loss_curve(tmp_path: Path, shards: Path):
    params = _params(epochs=1, num_workers=2)  # two workers: their interleaving must be seeded too
    a = train_model(params, shards, tmp_path / "a", tmp_path / "la", progress=False)
    b = train_model(params, shards, tmp_path / "b", tmp_path / "lb", progress=False)
    assert _losses(a["history"]) == _losses(b["history"])
    assert all(math.isfinite(x) for pair in _losses(a["history"]) for x in pair)


@pytest.mark.slow
def test_select_val_auc_keeps_the_best_auc_epoch_and_records_it(tmp_path: Path, shards: Path):
    result = train_model(_params(epochs=3, select="val_auc"), shards, tmp_path / "m", tmp_path / "l", progress=False)
    history = result["history"]
    assert all(h["val_auc"] is not None for h in history)
    # highest AUC, ties to the lower loss, then to the earlier epoch
    expected = min(history, key=lambda h: (-h["val_auc"], h["val_loss"], h["epoch"]))["epoch"]
    assert result["best_epoch"] == expected
    best = load_checkpoint(tmp_path / "m" / "best.pt")
    chosen = best.meta["selection"]
    assert chosen["rule"] == "val_auc" and chosen["epoch"] == expected and chosen["value"] == chosen["val_auc"]
    assert "val_auc" in json.loads((tmp_path / "l" / "metrics.json").read_text())


def test_select_val_auc_refuses_a_one_class_validation_split(tmp_path: Path):
    shards = make_tiny_shards(tmp_path / "s" / "plain", per_class={"train": 4, "val": 2, "test": 2}, size=32)
    summary = json.loads((shards / "summary.json").read_text())
    val = summary["splits"]["val"]
    val["class_counts"] = {"negative": val["count"], "positive": 0}  # consistent, or the summary check refuses it
    (shards / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(CxrError, match="val_auc needs both classes"):
        train_model(_params(select="val_auc"), shards, tmp_path / "m", tmp_path / "l", progress=False)


@pytest.mark.slow
def test_training_converges_on_the_toy_with_this_cpus_precision(tmp_path: Path):
    # bf16 autocast + channels_last where the CPU has native bf16, fp32 elsewhere: either must learn
    shards = make_tiny_shards(tmp_path / "shards" / "plain", per_class={"train": 16, "val": 8, "test": 2}, size=32)
    raw = _params(epochs=2, batch_size=8, max_steps=None).to_dict()
    raw["evaluate"]["ood_dim"] = 8  # below the 31 that 32 images allow: the residual term has room to work
    result = train_model(params_from_dict(raw), shards, tmp_path / "m", tmp_path / "l", progress=False)
    best = result["history"][result["best_epoch"] - 1]
    assert best["val_accuracy"] >= 0.9 and best["val_loss"] < 0.35
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]
    # The out-of-distribution gate, fitted on this toy's training images: about 99% of validation
    # passes, and images unlike any toy (uniform noise, blanks) are flagged while fresh toys pass.
    gate = result["ood"]
    assert gate["n_train"] == 32 and gate["n_val"] == 16 and gate["dim"] == 8 and gate["val_pass_rate"] >= 0.99
    engine = Engine(load_checkpoint(tmp_path / "m" / "best.pt"), "eager", torch.device("cpu"))
    rng = np.random.default_rng(11)
    unlike = np.stack([rng.integers(0, 256, (32, 32)).astype(np.uint8), np.zeros((32, 32), np.uint8),
                       np.full((32, 32), 255, np.uint8)])  # fmt: skip
    toys = np.stack([synthetic_image(i % 2, 32, rng) for i in range(8)])
    _, unlike_scores = engine.probabilities_and_ood(unlike)
    _, toy_scores = engine.probabilities_and_ood(toys)
    assert ood.verdicts(unlike_scores, gate).all()
    assert ood.verdicts(toy_scores, gate).mean() <= 0.25


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path: Path, shards: Path, monkeypatch):
    real = epoch.weighted_bce
    calls = {"n": 0}

    def nan_after_first_epoch(logits, targets, weights):
        calls["n"] += 1
        loss = real(logits, targets, weights)
        return loss * float("nan") if calls["n"] > 2 else loss  # epoch 1 = 2 steps

    monkeypatch.setattr(epoch, "weighted_bce", nan_after_first_epoch)
    out = tmp_path / "models"
    with pytest.raises(CxrError, match=r"epoch 2/3: loss became nan at step 1.*last checkpoint is kept"):
        train_model(_params(epochs=3), shards, out, tmp_path / "live", progress=False)
    last = load_checkpoint(out / "last.pt")
    assert last.extra["epoch"] == 1 and not last.extra["finished"]
    assert all(torch.isfinite(v).all() for v in last.state_dict.values() if v.is_floating_point())
    assert not (out / "best.pt").exists()  # best.pt is only written by a run that finished


def test_shards_of_the_other_variant_are_refused(tmp_path: Path, shards: Path):
    raw = json.loads(json.dumps(_params().to_dict()))
    raw["variant"] = "equalized"
    with pytest.raises(CxrError, match="variant"):
        train_model(params_from_dict(raw), shards, tmp_path / "m", tmp_path / "l")


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_continues_and_matches_an_uninterrupted_run(tmp_path: Path, shards: Path):
    params = _params(epochs=3)
    reference = train_model(params, shards, tmp_path / "ref", tmp_path / "ref_live", progress=False)

    cmd = _cli("--shards", str(shards), "--out", str(tmp_path / "models"), "--live", str(tmp_path / "live"),
               "--params", str(_write_params(params, tmp_path / "params.yaml")))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Its own process group, killed as a whole (as `kill -9` of a job or the OOM killer would):
    # a surviving loader worker would otherwise hold the output pipe open and hang communicate().
    log = tmp_path / "killed_run.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        last = tmp_path / "models" / "last.pt"
        deadline = time.monotonic() + 300
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    output = log.read_text(errors="replace")
    assert last.exists(), output
    killed_at = load_checkpoint(last).extra["epoch"]
    assert 1 <= killed_at < 3, "the run finished before it could be killed"

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from {last} after epoch {killed_at}" in rerun.stdout
    result = json.loads(rerun.stdout[rerun.stdout.index("{"):])
    assert result["resumed_from_epoch"] == killed_at
    assert result["epochs_run"] == reference["epochs_run"] == 3
    history = load_checkpoint(last).extra["history"]
    # One row per epoch (train, val): the shapes must match too, so a resumed run that
    # skipped or repeated an epoch fails here.
    np.testing.assert_allclose(np.array(_losses(history)), np.array(_losses(reference["history"])), rtol=1e-6)


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "pipeline.cli", "train", *args]


@pytest.mark.slow
def test_ddp_two_gloo_processes_stream_url_shards_with_equal_steps(tmp_path: Path, http_root):
    # 3 training shards over 2 ranks: unequal shards per rank, equal batches per rank;
    # both ranks read the shards from an HTTP server, as from object storage on two nodes
    root, url = http_root
    make_tiny_shards(root / "equalized", per_class={"train": 10, "val": 4, "test": 2}, size=32, shard_count=3,
                     variant="equalized")
    params = _params(epochs=2, max_steps=None, variant="equalized")
    cmd = _torchrun(2, "--shards", f"{url}/equalized", "--out", str(tmp_path / "models"),
                    "--live", str(tmp_path / "live"), "--params", str(_write_params(params, tmp_path / "params.yaml")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-12000:]
    result = json.loads(run.stdout[run.stdout.index("{"):])  # rank 0 alone prints
    per_epoch = math.ceil(20 / (4 * 2))
    assert result["world_size"] == 2 and result["steps_per_epoch"] == per_epoch
    assert result["steps_per_rank"] == [2 * per_epoch, 2 * per_epoch]
    assert run.stdout.count('"steps_per_rank"') == 1
    assert f"on {url}/equalized (equalized)" in run.stdout
    assert load_checkpoint(tmp_path / "models" / "best.pt").meta["params"]["train"]["epochs"] == 2


@pytest.mark.slow
def test_cli_trains_from_url_shards_and_refuses_a_tampered_one(tmp_path: Path, http_root):
    root, url = http_root
    local = make_tiny_shards(root / "equalized", per_class=PER_CLASS, size=32, variant="equalized")
    params_file = _write_params(_params(epochs=1, variant="equalized"), tmp_path / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def train(out: str) -> subprocess.CompletedProcess:
        cmd = _cli("--shards", f"{url}/equalized", "--out", str(tmp_path / out), "--live", str(tmp_path / "live"),
                   "--params", str(params_file))
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    run = train("models")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-12000:]
    assert load_checkpoint(tmp_path / "models" / "best.pt").meta["epoch"] == 1

    shard = local / "val-000001.tar"
    shard.write_bytes(shard.read_bytes().replace(b"toy", b"t0y", 1))  # same length, one sample's provenance edited
    run = train("again")
    assert run.returncode == 1
    assert f"{url}/equalized/val-000001.tar: sha256" in run.stderr and "refusing it" in run.stderr
    assert not (tmp_path / "again" / "best.pt").exists()


NODE_DRIVER = """
import json, os, sys
from pathlib import Path
import yaml
from pipeline.params import params_from_dict
from train.fit.trainer import train_model
# guarded: loader workers start from a forkserver, which imports a script's top level again (README, Python API)
if __name__ == "__main__":
    shards, base, params_file = sys.argv[1:4]
    # each rank writes under its own folder, as two nodes would on their own disks
    out = Path(base) / f"node{os.environ['RANK']}"
    result = train_model(params_from_dict(yaml.safe_load(open(params_file))), shards, out, out / "live", progress=False)
    if result:
        print(json.dumps({k: result[k] for k in ("resumed_from_epoch", "steps_per_rank", "epochs_run")}))
"""


@pytest.mark.slow
def test_ranks_without_rank_0s_disk_resume_with_it(tmp_path: Path, http_root):
    # rank 0's node holds last.pt of a finished run; rank 1's disk is empty. Both must
    # follow rank 0 (a rank that started afresh would wait forever in its first all-reduce).
    root, url = http_root
    make_tiny_shards(root / "plain", per_class=PER_CLASS, size=32)
    params = _params(epochs=1)
    first = train_model(params, f"{url}/plain", tmp_path / "node0", tmp_path / "live0", progress=False)
    assert first["epochs_run"] == 1
    driver = tmp_path / "node_driver.py"
    driver.write_text(NODE_DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
           f"{url}/plain", str(tmp_path), str(_write_params(params, tmp_path / "params.yaml"))]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-12000:]
    result = json.loads(run.stdout[run.stdout.index("{"):])
    assert result == {"resumed_from_epoch": 1, "steps_per_rank": [0, 0], "epochs_run": 1}
    assert not (tmp_path / "node1" / "last.pt").exists()  # one writer


def test_a_summary_claiming_a_billion_training_images_is_refused_before_any_step(tmp_path: Path, shards: Path):
    """Today it planned 250,000,000 steps per epoch and took its class weights from the claim (issue 21)."""
    raw = json.loads((shards / "summary.json").read_text())
    train = raw["splits"]["train"]
    extra = 10**9 - train["count"]
    train["shards"][0]["count"] += extra
    train["count"] = 10**9
    train["class_counts"]["negative"] += extra
    (shards / "summary.json").write_text(json.dumps(raw))
    started = time.perf_counter()
    with pytest.raises(CxrError, match=r"train-000000.tar holds \d+ samples, the summary lists 99999"):
        train_model(_params(), shards, tmp_path / "m", tmp_path / "l", progress=False)
    assert time.perf_counter() - started < 30 and not (tmp_path / "m" / "last.pt").exists()


def test_a_second_training_on_the_same_out_is_refused_and_leaves_the_first_runs_model(tmp_path: Path, shards: Path):
    from pipeline.fileio import output_lock

    out = tmp_path / "models"
    out.mkdir()
    (out / "best.pt").write_bytes(b"the first run's model")
    with output_lock(out):  # stands in for a training still running on OUT
        with pytest.raises(CxrError, match="another run is writing"):
            train_model(_params(epochs=1), shards, out, tmp_path / "live", progress=False)
    assert (out / "best.pt").read_bytes() == b"the first run's model"


def test_the_next_training_removes_the_checkpoint_temps_a_killed_one_left(tmp_path: Path, shards: Path, monkeypatch):
    from train.fit import trainer

    out = tmp_path / "models"
    out.mkdir()
    for name in (".last.pt.k9abcdef.tmp", ".best.pt.k9abcdef.tmp", "notes.tmp", ".model.onnx.k9abcdef.tmp"):
        (out / name).write_bytes(b"x")
    seen = []
    monkeypatch.setattr(trainer, "_train", lambda *a, **k: seen.append(sorted(p.name for p in out.iterdir())) or {})
    train_model(_params(epochs=1), shards, out, tmp_path / "live", progress=False)
    assert seen == [[".cxr.lock", ".model.onnx.k9abcdef.tmp", "notes.tmp"]]  # only its own temps, before it ran
