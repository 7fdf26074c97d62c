"""Stage `evaluate` end to end on tiny shards (the external root: tests/evaluation/test_external.py)."""

from __future__ import annotations

import csv
import json
import tarfile
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import CxrError
from pipeline.params import load_params
from pipeline.shard_format import read_summary
from tests.conftest import REPO, make_tiny_shards
from train.checkpoint import load_checkpoint, make_meta, save_checkpoint
from train.evaluation.evaluate import ImageFacts, evaluate_shards
from train.models import build_model

MODEL = "densenet121"  # the smallest checkpoint of the five (7M parameters)
SIZE = 32  # images: small enough for seconds on a busy 2-core CPU
REQUIRED = [
    "accuracy", "macro.f1", "macro.precision", "macro.recall", "positive.recall", "positive.precision",
    "positive.f1", "negative.recall", "negative.precision", "negative.f1", "roc_auc", "roc_auc_ci95", "pr_auc",
    "sensitivity.value", "sensitivity.ci95", "specificity.value", "specificity.ci95", "ppv.value", "ppv.ci95",
    "npv.value", "npv.ci95", "confusion.tn", "confusion.fp", "confusion.fn", "confusion.tp", "threshold.value",
    "threshold.rule", "threshold.split", "at_0_5.threshold", "at_0_5.accuracy", "at_0_5.macro.f1",
    "at_0_5.sensitivity.value", "at_0_5.confusion.tp", "at_0_5.by_source", "by_source.toy.n",
    "by_source.toy.error_rate", "val.accuracy", "val.macro.f1", "val.roc_auc", "val.sensitivity.ci95", "n_test",
    "model.name", "model.variant", "model.checkpoint_sha256", "intervals.resamples", "intervals.seed",
    "intervals.ci95", "intervals.ci95_wilson", "intervals.n_patients", "intervals.n_images", "n_patients",
    "sensitivity.ci95_wilson", "specificity.ci95_wilson", "ppv.ci95_wilson", "npv.ci95_wilson", "accuracy_ci95",
    "positive_f1_ci95", "macro_f1_ci95", "at_prevalence.prevalence", "at_prevalence.ppv.value",
    "at_prevalence.npv.ci95", "calibration.brier", "calibration.brier_uncalibrated", "calibration.ece",
    "calibration.ece_uncalibrated", "calibration.ece_binning", "calibration_model.method", "val.calibration.ece",
    "val.intervals.n_patients",
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny inputs: one thread is as fast, and on a shared busy CPU multi-threaded
    ops stall at their barriers (each op waits for a descheduled thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _dig(d, dotted):
    for part in dotted.split("."):
        assert isinstance(d, dict) and part in d, f"missing key {dotted}"
        d = d[part]
    return d


def _checkpoint(path: Path, variant: str, preprocess: dict, threshold: float = 0.5, calibration=None) -> Path:
    torch.manual_seed(0)
    net = build_model(MODEL)
    meta = make_meta(
        model=MODEL,
        variant=variant,
        input_size=int(preprocess["size"]),
        preprocess=preprocess,
        params={},
        threshold={"value": threshold, "rule": "max_f1", "split": "val"},
        epoch=1,
        val_loss=0.5,
        calibration=calibration,
    )
    save_checkpoint(path, meta, net.state_dict())
    return path


def _params_file(tmp_path: Path) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["evaluate"]["bootstrap"] = 50
    raw["train"]["num_workers"] = 0
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def tiny(tmp_path):
    shards = make_tiny_shards(tmp_path / "shards" / "plain", size=SIZE)
    ckpt = _checkpoint(tmp_path / "models" / "best.pt", "plain", read_summary(shards).preprocess, threshold=0.52)
    return shards, ckpt


@pytest.mark.slow
def test_evaluate_cli_writes_every_required_key(tmp_path, tiny):
    shards, ckpt = tiny
    out, preds, plots = tmp_path / "m" / "eval.json", tmp_path / "m" / "pred.csv", tmp_path / "m" / "plots"
    figures = tmp_path / "m" / "figures"
    result = CliRunner().invoke(
        app,
        ["evaluate", "--model", str(ckpt), "--shards", str(shards), "--out", str(out), "--predictions", str(preds),
         "--plots", str(plots), "--figures", str(figures), "--params", str(_params_file(tmp_path))],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert "sensitivity" in result.output and "missed COVID-19 (FN)" in result.output  # the human summary
    report = json.loads(out.read_text())
    for key in REQUIRED:
        _dig(report, key)
    assert report["n_test"] == read_summary(shards).split("test").count == 8
    assert report["threshold"]["value"] == 0.52 and report["at_0_5"]["threshold"] == 0.5
    assert report["model"]["name"] == MODEL and len(report["model"]["checkpoint_sha256"]) == 64
    assert report["inference"]["engine"] == "onnxruntime" and report["inference"]["first_batch_check"]["ok"]

    rows = list(csv.DictReader(preds.open()))
    assert len(rows) == 8 and len({r["key"] for r in rows}) == 8
    assert list(rows[0]) == ["key", "source", "patient_id", "filename", "label",
                             "p_covid_calibrated_at_val_prevalence", "p_covid_uncalibrated",
                             "predicted_at_operating_threshold"]  # fmt: skip
    called = sum(int(r["predicted_at_operating_threshold"]) for r in rows)
    assert called == report["confusion"]["tp"] + report["confusion"]["fp"]
    assert all(int(r["predicted_at_operating_threshold"]) == (float(r["p_covid_calibrated_at_val_prevalence"]) >= 0.52)
               for r in rows)  # fmt: skip
    assert report["calibration_model"]["method"] == "identity"  # a checkpoint without calibration: left as is
    assert report["intervals"]["n_images"] == 8 and report["n_patients"] == report["intervals"]["n_patients"]
    for split in ("test", "val"):
        bins = json.loads((plots / f"reliability_{split}.json").read_text())
        assert sum(b["count"] for b in bins) == (8 if split == "test" else report["val"]["n"])

    roc = json.loads((plots / "roc.json").read_text())
    assert roc[0] == {"fpr": 0.0, "tpr": 0.0, "threshold": 1.0} and roc[-1]["fpr"] == 1.0
    assert {"recall", "precision"} <= set(json.loads((plots / "pr.json").read_text())[0])
    confusion = (plots / "confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 9

    # Fig. 8: one row per shown miss (at most 4 FN + 4 FP), image + Grad-CAM overlay.
    from tests.test_figures import assert_picture
    from train.evaluation.misclassified import FIGURE_NAME

    shown = min(4, report["confusion"]["fn"]) + min(4, report["confusion"]["fp"])
    assert shown > 0  # an untrained net on 8 images: something is wrong
    assert_picture(figures / FIGURE_NAME, (520, int(round(100 * (2.4 * shown + 0.8)))), ink=0.2)


def test_val_metrics_are_the_val_split(tmp_path):
    shards = make_tiny_shards(tmp_path / "s", per_class={"train": 2, "val": 3, "test": 5}, size=SIZE)
    ckpt = _checkpoint(tmp_path / "best.pt", "plain", read_summary(shards).preprocess)
    params = load_params(_params_file(tmp_path))
    result = evaluate_shards(ckpt, shards, params.evaluate, params.train, seed=0, engine="eager")
    assert result.report["n_test"] == 10 and result.report["val"]["n"] == 6
    assert len(result.test.keys) == 10


def test_wrong_variant_is_refused(tmp_path, tiny):
    shards, _ = tiny
    ckpt = _checkpoint(tmp_path / "eq.pt", "equalized", read_summary(shards).preprocess)
    params = load_params(_params_file(tmp_path))
    with pytest.raises(CxrError, match="shards/equalized"):
        evaluate_shards(ckpt, shards, params.evaluate, params.train, seed=0)


def test_decoded_probabilities_match_a_direct_forward(tmp_path, tiny):
    """The loader path (uint8 -> /255 -> model) gives the same numbers as calling the model by hand."""
    shards, ckpt = tiny
    params = load_params(_params_file(tmp_path))
    result = evaluate_shards(ckpt, shards, params.evaluate, params.train, seed=0, engine="eager")
    summary = read_summary(shards)
    sample = next(iter(wds.WebDataset(summary.shard_paths("test")[0], shardshuffle=False)))
    img = cv2.imdecode(np.frombuffer(sample["png"], np.uint8), cv2.IMREAD_UNCHANGED)
    net = load_checkpoint(ckpt).build()
    with torch.inference_mode():
        prob = torch.sigmoid(net(torch.from_numpy(img)[None, None].float() / 255)).item()
    index = result.test.keys.index(sample["__key__"])
    assert result.test.raw[index] == pytest.approx(prob, abs=1e-6)
    assert result.test.probs[index] == result.test.raw[index]  # no calibration in this checkpoint


def test_plots_folder_with_user_files_is_refused(tmp_path):
    from train.evaluation.evaluate import Predictions, write_plots

    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "thesis.pdf").write_bytes(b"%PDF")
    probs = np.array([0.2, 0.9])
    pred = Predictions(["a", "b"], np.array([0, 1]), probs, [{}, {}], raw=probs)
    with pytest.raises(CxrError, match="refusing to write into .*thesis.pdf"):
        write_plots(tmp_path / "plots", pred, 0.5)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["thesis.pdf"]
    write_plots(tmp_path / "fresh", pred, 0.5)
    assert {"roc.json", "pr.json", "confusion.csv"} <= {p.name for p in (tmp_path / "fresh").iterdir()}


@pytest.mark.slow
def test_calibration_of_the_checkpoint_is_applied_before_the_threshold(tmp_path):
    shards = make_tiny_shards(tmp_path / "s", per_class={"train": 2, "val": 3, "test": 5}, size=SIZE)
    platt = {"method": "platt", "a": 3.0, "b": -0.5, "fitted_on": "val"}
    plain = _checkpoint(tmp_path / "plain.pt", "plain", read_summary(shards).preprocess)
    cal = _checkpoint(tmp_path / "cal.pt", "plain", read_summary(shards).preprocess, calibration=platt)
    params = load_params(_params_file(tmp_path))
    before = evaluate_shards(plain, shards, params.evaluate, params.train, seed=0)
    after = evaluate_shards(cal, shards, params.evaluate, params.train, seed=0)
    raw = before.test.raw
    assert after.test.raw == pytest.approx(raw)  # same weights
    expected = 1 / (1 + np.exp(-(3.0 * np.log(raw / (1 - raw)) - 0.5)))
    assert after.test.probs == pytest.approx(expected)
    yhat = (expected >= 0.5).astype(int)
    assert after.report["confusion"]["tp"] == int(((yhat == 1) & (after.test.labels == 1)).sum())
    assert after.report["calibration_model"] == platt
    c = after.report["calibration"]
    assert c["brier"] == pytest.approx(np.mean((expected - after.test.labels) ** 2))
    assert c["brier_uncalibrated"] == pytest.approx(np.mean((raw - after.test.labels) ** 2))
    # the study's 0.5 rule stays on the network's own output
    assert after.report["at_0_5"]["confusion"] == before.report["at_0_5"]["confusion"]
    assert after.report["roc_auc"] == pytest.approx(before.report["roc_auc"])  # monotone: same ranking


@pytest.mark.slow
def test_shards_at_a_url_score_exactly_as_the_folder(tmp_path, http_root):
    root, url = http_root
    shards = make_tiny_shards(root / "plain", size=SIZE)
    ckpt = _checkpoint(tmp_path / "best.pt", "plain", read_summary(shards).preprocess)
    params = load_params(_params_file(tmp_path))
    local = evaluate_shards(ckpt, shards, params.evaluate, params.train, 0)
    remote = evaluate_shards(ckpt, f"{url}/plain", params.evaluate, params.train, 0)
    assert remote.test.keys == local.test.keys and np.array_equal(remote.test.probs, local.test.probs)
    assert remote.report["roc_auc_ci95"] == local.report["roc_auc_ci95"] and remote.report["shards"] == f"{url}/plain"


class _Fixed:
    """An engine whose probabilities are given: what a NaN-weight checkpoint or a crafted graph returns."""

    def __init__(self, values):
        self.values = iter(values)

    def probabilities(self, images):
        return np.array(next(self.values), np.float64)


def _batch(keys: list[str]) -> dict:
    return {"image": torch.zeros(len(keys), 1, 4, 4, dtype=torch.uint8), "label": torch.zeros(len(keys)),
            "key": keys, "meta": [{}] * len(keys)}  # fmt: skip


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1.5, -0.1])
def test_a_non_finite_or_out_of_range_probability_stops_the_evaluation(bad):
    from train.evaluation.evaluate import predict_batches

    engine = _Fixed([[0.2, 0.3], [0.4, bad, bad]])
    with pytest.raises(CxrError, match=r"for 2 of 5 images \(first: k3\)"):
        predict_batches(engine, [_batch(["k0", "k1"]), _batch(["k2", "k3", "k4"])])
    good = predict_batches(_Fixed([[0.2, 0.3]]), [_batch(["k0", "k1"])])
    assert good.raw.tolist() == [0.2, 0.3]


def test_a_resume_checkpoint_is_refused_before_scoring(tmp_path, tiny):
    shards, ckpt = tiny
    loaded = load_checkpoint(ckpt)
    last = tmp_path / "last.pt"
    save_checkpoint(last, dict(loaded.meta, threshold={"value": None, "rule": "max_f1", "split": "val"}),
                    loaded.state_dict)  # fmt: skip
    params = load_params(_params_file(tmp_path))
    with pytest.raises(CxrError, match="last.pt is a resume checkpoint written during training; screen with best.pt"):
        evaluate_shards(last, shards, params.evaluate, params.train, seed=0, engine="eager")


def test_shard_metadata_a_spreadsheet_would_run_is_escaped_in_the_predictions_csv(tmp_path):
    from train.evaluation.evaluate import Predictions, write_predictions

    meta = [{"source": '=HYPERLINK("http://x")', "patient_id": "+1-2", "filename": "@x.png"}, {"source": "toy"}]
    probs = np.array([0.25, 0.75])
    write_predictions(tmp_path / "p.csv", Predictions(["-k", "k2"], np.array([0, 1]), probs, meta, probs), 0.5)
    with open(tmp_path / "p.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert (rows[0]["key"], rows[0]["source"], rows[0]["patient_id"], rows[0]["filename"]) == (
        "'-k", '\'=HYPERLINK("http://x")', "'+1-2", "'@x.png")  # fmt: skip
    assert rows[1]["source"] == "toy" and rows[0]["label"] == "0" and rows[1]["p_covid_calibrated_at_val_prevalence"] == "0.750000"


def test_a_test_key_also_in_train_is_refused_before_scoring(tmp_path, tiny):
    """Today n_test counted it and leaks_between_splits said 0 (issue 21)."""
    import shutil

    from tests.conftest import reseal

    shards, ckpt = tiny
    shutil.copy(shards / "train-000000.tar", shards / "test-000001.tar")  # a train shard also listed as test
    raw = json.loads((shards / "summary.json").read_text())
    train0, test = raw["splits"]["train"]["shards"][0], raw["splits"]["test"]
    test["shards"][1] = {**train0, "name": "test-000001.tar"}
    test["count"] = test["shards"][0]["count"] + train0["count"]
    held = Counter()
    for name in ("test-000000.tar", "test-000001.tar"):
        with tarfile.open(shards / name) as tar:
            held.update(read_cls(tar))
    test["class_counts"] = {name: held[name] for name in ("negative", "positive")}  # an honest-looking summary
    (shards / "summary.json").write_text(json.dumps(raw))
    reseal(shards)
    params = load_params(_params_file(tmp_path))
    with pytest.raises(CxrError, match=r"key train_000\d+ is in train-000000.tar and again in test-000001.tar"):
        evaluate_shards(ckpt, shards, params.evaluate, params.train, seed=0, engine="eager")


def read_cls(tar) -> list[str]:
    return [("negative", "positive")[int(tar.extractfile(m).read())] for m in tar if m.name.endswith(".cls")]


def test_a_second_evaluate_on_the_same_plots_is_refused_before_scoring_and_replaces_nothing(tmp_path, tiny):
    from pipeline.fileio import output_lock

    shards, ckpt = tiny
    out, plots = tmp_path / "m" / "eval.json", tmp_path / "m" / "plots"
    out.parent.mkdir()
    out.write_text('{"first": true}\n')
    with output_lock(plots):  # stands in for an evaluate still writing these plots
        result = CliRunner().invoke(
            app,
            ["evaluate", "--model", str(ckpt), "--shards", str(shards), "--out", str(out), "--predictions",
             str(tmp_path / "m" / "pred.csv"), "--plots", str(plots), "--figures", str(tmp_path / "m" / "figures"),
             "--params", str(_params_file(tmp_path))],  # fmt: skip
        )
    assert result.exit_code == 1 and "another run is writing" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert out.read_text() == '{"first": true}\n' and not (tmp_path / "m" / "pred.csv").exists()


def test_image_facts_keep_the_three_fields_evaluation_reads_as_the_dicts_had_them():
    metas = [{"source": "cohen", "patient_id": "p1", "filename": "a.png", "extra": [1, 2]},
             {"patient_id": None, "filename": "b.png"},  # no source; an explicit None stays None
             {}]  # fmt: skip
    facts = ImageFacts(metas[:1])
    facts.extend(metas[1:])
    assert len(facts) == 3
    assert list(facts) == [{"source": "cohen", "patient_id": "p1", "filename": "a.png"},
                           {"patient_id": None, "filename": "b.png"}, {}]  # fmt: skip
    assert facts[-1] == {} and facts[1:] == [facts[1], facts[2]]
    with pytest.raises(IndexError):
        facts[3]


def test_image_facts_hold_a_few_list_slots_per_image_not_a_dict():
    import tracemalloc

    n = 20_000
    # the strings exist already (as the shards' decoded JSON has them); what is measured is the holding
    names = [f"image-{i:06d}.png" for i in range(n)]
    patients = [f"patient-{i // 2}" for i in range(n)]

    def held(build) -> float:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        del kept
        return grown / n

    dicts = held(lambda: [{"source": "cohen", "patient_id": p, "filename": f} for p, f in zip(patients, names)])
    facts = held(lambda: ImageFacts({"source": "cohen", "patient_id": p, "filename": f} for p, f in zip(patients, names)))
    assert facts < 40 < 150 < dicts, (facts, dicts)  # 3 slots of 8 bytes (+ list growth) against a dict each
