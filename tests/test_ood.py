"""The out-of-distribution gate: its fit, its threshold, its place in checkpoints and ONNX files, hostile metas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA

from pipeline.errors import CxrError
from train import ood
from train.checkpoint import load_checkpoint, save_checkpoint
from train.export import TOLERANCE, export_onnx, onnx_meta, onnx_session
from train.inference import Engine
from train.models import build_model, model_input
from tests.test_export import make_checkpoint


def gate_checkpoint(path: Path, fit_images: np.ndarray, threshold: float | None = None, dim: int = 4) -> Path:
    """Give the checkpoint at `path` a gate fitted on `fit_images` (uint8 (N, 224, 224)): the first two
    thirds fit it, the rest set its threshold, unless `threshold` overrides it."""
    ckpt = load_checkpoint(path)
    features = ood.penultimate_features(ckpt.build(), [fit_images], torch.device("cpu"))
    cut = 2 * len(features) // 3
    summary, params = ood.fit_gate(features[:cut], features[cut:], dim, 0.99)
    if threshold is not None:
        summary["threshold"] = threshold
    save_checkpoint(path, {**ckpt.meta, "ood": summary, "ood_params": params}, ckpt.state_dict)
    return path


def _gaussian(n: int, rng: np.random.Generator, shift: float = 0.0) -> np.ndarray:
    mixing = np.random.default_rng(0).normal(size=(6, 40))  # features live near a 6-d subspace, as real ones do
    return rng.normal(size=(n, 6)) @ mixing + 0.05 * rng.normal(size=(n, 40)) + shift


def test_threshold_lets_the_quantile_of_validation_pass_and_flags_far_points():
    rng = np.random.default_rng(1)
    summary, params = ood.fit_gate(_gaussian(300, rng), _gaussian(400, rng), dim=6, quantile=0.95)
    assert summary["dim"] == 6 and summary["features"] == 40 and summary["n_train"] == 300
    assert 0.95 <= summary["val_pass_rate"] <= 0.96  # "higher": at least the quantile, by one image at most
    fresh = ood.score_features(_gaussian(2000, rng), params)
    assert 0.92 <= np.mean(fresh <= summary["threshold"]) <= 0.98  # unseen in-distribution data passes alike
    far = ood.score_features(_gaussian(50, rng) * 10, params)  # the same shape, ten times wider
    assert ood.verdicts(far, summary).all()


def test_score_is_ledoit_wolf_s_mahalanobis_distance_in_pca_space_plus_the_scaled_residual():
    rng = np.random.default_rng(2)
    train, probe = _gaussian(120, rng), _gaussian(10, rng, shift=0.5)
    _, params = ood.fit_gate(train, train[:20], dim=5, quantile=0.99)
    pca = PCA(n_components=5, svd_solver="full").fit(train)
    inside = LedoitWolf().fit(pca.transform(train)).mahalanobis(pca.transform(probe))

    def residual(x):
        return np.sum((x - pca.inverse_transform(pca.transform(x))) ** 2, axis=1)

    expected = np.sqrt(inside + residual(probe) / residual(train).mean())
    np.testing.assert_allclose(ood.score_features(probe, params), expected, rtol=1e-4)


def test_an_image_off_the_subspace_is_flagged_even_where_it_projects_onto_the_mean():
    rng = np.random.default_rng(12)
    train = _gaussian(200, rng)
    summary, params = ood.fit_gate(train, _gaussian(100, rng), dim=6, quantile=0.99)
    off = np.linalg.svd(train - train.mean(0))[2][-1]  # a direction the training features never take
    probe = train.mean(0) + 5 * np.sqrt(np.mean(np.sum((train - train.mean(0)) ** 2, 1))) * off
    assert ood.verdicts(ood.score_features(probe[None], params), summary).all()


def test_dim_is_capped_by_the_images_and_too_few_or_broken_features_are_refused():
    rng = np.random.default_rng(3)
    summary, params = ood.fit_gate(_gaussian(5, rng), _gaussian(3, rng), dim=32, quantile=0.99)
    assert summary["dim"] == 4 and params["components"].shape == (4, 40)  # PCA keeps at most n - 1
    with pytest.raises(CxrError, match=">= 3 training images"):
        ood.fit_gate(_gaussian(2, rng), _gaussian(3, rng), dim=4, quantile=0.99)
    broken = _gaussian(10, rng)
    broken[3, 1] = np.nan
    with pytest.raises(CxrError, match="not finite"):
        ood.fit_gate(broken, _gaussian(3, rng), dim=4, quantile=0.99)


def test_non_finite_scores_are_out_of_distribution():
    flags = ood.verdicts(np.array([0.5, 2.0, np.nan, np.inf]), {"threshold": 1.0})
    assert flags.tolist() == [False, True, True, True]


def _gate(features: int = 8, dim: int = 2) -> tuple[dict, dict]:
    rng = np.random.default_rng(4)
    return ood.fit_gate(rng.normal(size=(20, features)), rng.normal(size=(10, features)), dim, 0.99)


def _hostile(summary: dict, params: dict, case: str) -> tuple[dict, dict | None]:
    summary, params = dict(summary), dict(params)
    if case == "nan precision":
        params["precision"] = params["precision"].clone()
        params["precision"][0, 0] = float("nan")
    elif case == "wrong components shape":
        params["components"] = params["components"][:, :-1]
    elif case == "integer tensors":
        params["center"] = params["center"].long()
    elif case == "negative threshold":
        summary["threshold"] = -1.0
    elif case == "huge dim":
        summary["dim"] = 10**6
    elif case == "dim disagrees with tensors":
        summary["dim"] = 1
    elif case == "negative residual scale":
        params["residual_scale"] = torch.tensor(-1.0)
    elif case == "tensors as lists":
        params["precision"] = params["precision"].tolist()
    elif case == "params without summary":
        summary = None
    return summary, params


HOSTILE = ("nan precision", "wrong components shape", "integer tensors", "negative threshold", "huge dim",
           "dim disagrees with tensors", "negative residual scale", "tensors as lists", "params without summary")  # fmt: skip


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_gate_meta_is_refused_in_one_line(case):
    summary, params = _hostile(*_gate(), case)
    with pytest.raises(CxrError, match="invalid out-of-distribution gate"):
        ood.validate_gate({"ood": summary, "ood_params": params}, "x.pt")


def test_hostile_gate_is_refused_when_a_checkpoint_loads(tmp_path):
    net = build_model("resnet50")
    path = make_checkpoint(tmp_path / "m.pt", "resnet50")
    ckpt = load_checkpoint(path)
    summary, params = ood.fit_gate(np.random.default_rng(5).normal(size=(12, 2048)),
                                   np.random.default_rng(6).normal(size=(4, 2048)), 3, 0.99)  # fmt: skip
    save_checkpoint(path, {**ckpt.meta, "ood": summary, "ood_params": params}, ckpt.state_dict)
    loaded = load_checkpoint(path)  # weights_only: plain tensors and floats
    assert loaded.meta["ood"] == summary
    assert all(torch.equal(loaded.meta["ood_params"][k], params[k]) for k in params)
    bad_summary, bad_params = _hostile(summary, params, "nan precision")
    save_checkpoint(path, {**ckpt.meta, "ood": bad_summary, "ood_params": bad_params}, ckpt.state_dict)
    with pytest.raises(CxrError, match="tensors must be finite"):
        load_checkpoint(path)
    del net


def test_a_checkpoint_without_a_gate_still_loads_and_has_none(tmp_path):
    ckpt = load_checkpoint(make_checkpoint(tmp_path / "old.pt", "resnet50"))
    raw = torch.load(ckpt.path, weights_only=True)
    del raw["meta"]["ood"], raw["meta"]["ood_params"]  # as a checkpoint from before the gate
    torch.save(raw, ckpt.path)
    old = load_checkpoint(ckpt.path)
    assert old.meta["ood"] is None and old.meta["ood_params"] is None
    engine = Engine(old, "eager", torch.device("cpu"))
    probs, scores = engine.probabilities_and_ood(np.zeros((2, 224, 224), np.uint8))
    assert probs.shape == (2,) and scores is None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["alexnet", "vgg16", "resnet50", "densenet121", "inceptionv3"])
def test_gated_net_gives_the_network_s_own_logits_and_leaves_it_intact(name):
    torch.manual_seed(0)
    net = build_model(name).eval()
    x = model_input(np.random.default_rng(7).integers(0, 256, (2, 224, 224), dtype=np.uint8))
    with torch.inference_mode():
        before = net(x)
        features = ood.penultimate_features(net, [x.mul(255).round().to(torch.uint8)], torch.device("cpu"))
        summary, params = ood.fit_gate(np.concatenate([features, features + 1, features - 1]), features, 2, 0.99)
        logits, scores = ood.GatedNet(net, params).eval()(x)
        after = net(x)
    head = net.backbone.get_submodule(net.spec.heads[0])
    assert features.shape == (2, head.in_features)
    torch.testing.assert_close(logits, before, rtol=0, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # the split shares weights and replaces nothing in net
    assert scores.shape == (2,) and torch.isfinite(scores).all()


@pytest.mark.slow
def test_onnx_export_carries_the_gate_and_onnx_runtime_scores_it_like_pytorch(tmp_path):
    rng = np.random.default_rng(8)
    images = rng.integers(0, 256, (9, 224, 224), dtype=np.uint8)
    path = gate_checkpoint(make_checkpoint(tmp_path / "m.pt", "resnet50"), images)
    ckpt = load_checkpoint(path)
    out = export_onnx(ckpt, tmp_path / "m.onnx")
    session = onnx_session(out, providers=["CPUExecutionProvider"])
    meta = onnx_meta(session, out)
    assert meta["ood"] == ckpt.meta["ood"] and "ood_params" not in meta  # the tensors are in the graph
    assert [o.name for o in session.get_outputs()] == ["logit", ood.OUTPUT_NAME]
    assert meta["onnx"]["verification"]["ood"]["max_scaled_diff"] <= ood.OOD_TOLERANCE

    eager = Engine(ckpt, "eager", torch.device("cpu")).probabilities_and_ood(images[:4])
    onnx_engine = Engine(ckpt, "onnxruntime", torch.device("cpu"), cache_dir=tmp_path / "cache")
    got = onnx_engine.probabilities_and_ood(images[:4])
    assert onnx_engine.path == "onnxruntime" and onnx_engine.check["ood_agreement"]["ok"]
    np.testing.assert_allclose(got[0], eager[0], atol=TOLERANCE)
    np.testing.assert_allclose(got[1], eager[1], rtol=1e-3)


@pytest.mark.slow
def test_an_onnx_file_whose_metadata_claims_a_gate_its_graph_lacks_is_refused(tmp_path):
    import json

    import onnx

    out = export_onnx(make_checkpoint(tmp_path / "m.pt", "resnet50"), tmp_path / "m.onnx")
    proto = onnx.load(str(out))
    entry = next(p for p in proto.metadata_props if p.key == "cxr_screen")
    meta = json.loads(entry.value)
    meta["ood"], _ = _gate(2048, 2)
    entry.value = json.dumps(meta)
    onnx.save(proto, str(out))
    with pytest.raises(CxrError, match=r"outputs \['logit'\], expected exactly \['logit', 'ood_score'\]"):
        onnx_meta(onnx_session(out, providers=["CPUExecutionProvider"]), out)
