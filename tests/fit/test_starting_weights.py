"""train.init (scratch | imagenet | checkpoint) and train.freeze, on weights the tests write themselves.

No test downloads: torchvision's networks are built with random weights and
saved under the very file names torchvision publishes, in a temporary torch hub cache.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torchvision import models as tvm
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import CxrError
from pipeline.params import load_params, params_from_dict
from pipeline.shard_format import read_summary
from tests.conftest import REPO, make_tiny_shards
from train.fit import starting_weights
from train.checkpoint import load_checkpoint, make_meta, save_checkpoint
from train.fit.epoch import make_optimizer
from pipeline.networks import NETWORKS
from train.models import INPUT_MEAN, INPUT_STD, build_model, model_spec
from train.fit.trainer import train_model

SLOW = pytest.mark.slow
TV_NAMES = {"inceptionv3": "inception_v3"}


@pytest.fixture
def hub(tmp_path: Path, monkeypatch) -> Path:
    """An empty torch hub cache: TORCH_HOME is where torch.hub.get_dir() looks."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def place_imagenet_weights(model: str, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """torchvision's 1000-class network with random weights, saved where and as torchvision's file would be.

    DenseNet121's published file uses torchvision's old key names ('norm.1'), so this one does too.
    """
    _, path, _ = starting_weights.imagenet_file(model)
    torch.manual_seed(seed)
    extra = {"init_weights": True} if model == "inceptionv3" else {}
    state = tvm.get_model(TV_NAMES.get(model, model), weights=None, **extra).state_dict()
    if model == "densenet121":
        state = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()}
        assert any(".norm.1." in k for k in state)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path, state


def test_missing_weights_say_which_file_goes_where(hub: Path, tmp_path: Path):
    summary = read_summary(make_tiny_shards(tmp_path / "s"))
    with pytest.raises(CxrError) as err:
        starting_weights.resolve("imagenet", "resnet50", summary)
    message = str(err.value)
    assert f"{hub / 'resnet50-11ad3fa6.pth'}" in message and "does not download" in message
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in message and "TORCH_HOME" in message


@pytest.mark.parametrize("model", [m if m == "resnet50" else pytest.param(m, marks=SLOW) for m in NETWORKS])
def test_imagenet_start_keeps_every_weight_but_the_adapted_stem_and_the_new_head(hub: Path, tmp_path: Path, model):
    path, state = place_imagenet_weights(model)
    summary = read_summary(make_tiny_shards(tmp_path / "s"))
    init = starting_weights.resolve("imagenet", model, summary)
    assert init.record["kind"] == "imagenet" and init.record["file"] == str(path)
    assert init.record["weights"] == model_spec(model).weights
    assert init.record["published_file"] is False  # random weights do not hash to torchvision's file name

    torch.manual_seed(1)
    net = build_model(model)
    fresh_head = {k: v.clone() for k, v in net.state_dict().items() if k in net.head_parameter_names()}
    init.apply(net, "none")
    spec, loaded = model_spec(model), net.state_dict()
    for key in fresh_head:  # a one-logit head, as the seed built it
        assert torch.equal(loaded[key], fresh_head[key]), key
    assert loaded[f"backbone.{spec.first_conv}.weight"].shape[1] == 1
    heads = tuple(f"{h}." for h in spec.heads)
    kept = [k for k in state if not k.startswith(heads) and not k.startswith(f"{spec.first_conv}.")]
    compared = set()
    for key in kept:  # everything else exactly as in the file (DenseNet's old names mapped)
        ours = "backbone." + re.sub(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.", r"\1\2.", key)
        assert torch.equal(loaded[ours], state[key]), key
        compared.add(ours)
    stem_keys = {k for k in loaded if k.startswith(f"backbone.{spec.first_conv}.")}
    assert compared | set(fresh_head) | stem_keys == set(loaded)  # every weight of the net accounted for
    net.eval()
    assert net(torch.rand(2, 1, 64, 64)).shape == (2,)


@pytest.mark.parametrize("model", ["alexnet", "resnet50", "inceptionv3"])
def test_the_adapted_stem_computes_on_grey_what_the_imagenet_stem_computed_on_rgb(model):
    spec = model_spec(model)
    torch.manual_seed(0)
    conv = build_model(model).backbone.get_submodule(spec.first_conv)
    weight = torch.randn(conv.out_channels, 3, *conv.kernel_size)
    state = {f"{spec.first_conv}.weight": weight}
    if conv.bias is not None:
        state[f"{spec.first_conv}.bias"] = torch.randn(conv.out_channels)
    adapted = starting_weights.adapt_imagenet_state(state, spec)
    grey = torch.rand(1, 1, 40, 40, dtype=torch.float64)
    mean, std = (torch.tensor(v, dtype=torch.float64)[None, :, None, None] for v in spec.weights_norm)
    bias = state.get(f"{spec.first_conv}.bias")
    # no padding: the equivalence holds away from the border
    imagenet = F.conv2d((grey.expand(1, 3, 40, 40) - mean) / std, weight.double(),
                        None if bias is None else bias.double(), stride=conv.stride)
    ours = F.conv2d((grey - INPUT_MEAN) / INPUT_STD, adapted[f"backbone.{spec.first_conv}.weight"].double(),
                    None if bias is None else adapted[f"backbone.{spec.first_conv}.bias"].double(), stride=conv.stride)
    offset = imagenet - ours
    if bias is not None or model == "inceptionv3":  # a bias absorbs the mean shift; InceptionV3 has none
        assert offset.abs().max() < 1e-5
    else:  # a per-channel constant, left to the BatchNorm that follows
        assert (offset - offset[..., :1, :1]).abs().max() < 1e-5 and offset.abs().max() > 1e-3


def test_a_file_that_is_not_the_networks_is_refused(hub: Path, tmp_path: Path):
    summary = read_summary(make_tiny_shards(tmp_path / "s"))
    _, path, _ = starting_weights.imagenet_file("resnet50")
    path.parent.mkdir(parents=True)
    torch.save(tvm.resnet18(weights=None).state_dict(), path)  # right name, wrong network
    with pytest.raises(CxrError, match="does not fit resnet50"):
        starting_weights.resolve("imagenet", "resnet50", summary).apply(build_model("resnet50"), "none")
    path.write_bytes(b"not a torch file")
    with pytest.raises(CxrError, match="cannot load"):
        starting_weights.resolve("imagenet", "resnet50", summary)


def test_frozen_backbone_trains_the_head_only_and_keeps_its_batchnorm_statistics():
    torch.manual_seed(0)
    net = build_model("resnet50")
    net.freeze_backbone()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = make_optimizer(net, 1e-2)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(net.backbone.fc.weight),
                                                                            id(net.backbone.fc.bias)}
    net.train()
    assert not net.backbone.bn1.training and net.backbone.fc.training
    loss = F.binary_cross_entropy_with_logits(net(torch.rand(4, 1, 64, 64)), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    loss.backward()
    optimizer.step()
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"backbone.fc.weight", "backbone.fc.bias"}


def _checkpoint(path: Path, model: str, variant: str, preprocess: dict) -> Path:
    net = build_model(model)
    meta = make_meta(model=model, variant=variant, input_size=int(preprocess["size"]), preprocess=preprocess,
                     params={}, threshold={"value": 0.5, "rule": "max_f1", "split": "val"}, epoch=3, val_loss=0.4)
    save_checkpoint(path, meta, net.state_dict())
    return path


def test_a_checkpoint_start_must_match_network_variant_and_preprocessing(tmp_path: Path):
    summary = read_summary(make_tiny_shards(tmp_path / "s"))  # plain, 64 px
    good = _checkpoint(tmp_path / "good.pt", "resnet50", "plain", summary.preprocess)
    init = starting_weights.resolve(str(good), "resnet50", summary)
    assert init.record["kind"] == "checkpoint" and init.record["epoch"] == 3
    assert init.record["init"] == {"kind": "scratch", "freeze": "none"}  # the starting checkpoint's own start
    for path, model, match in (
        (good, "densenet121", "model: checkpoint 'resnet50', this run 'densenet121'"),
        (_checkpoint(tmp_path / "eq.pt", "resnet50", "equalized", summary.preprocess), "resnet50", "variant"),
        (_checkpoint(tmp_path / "big.pt", "resnet50", "plain", {**summary.preprocess, "size": 224}), "resnet50",
         "preprocess"),
        (tmp_path / "missing.pt", "resnet50", "must be 'scratch', 'imagenet' or a checkpoint file"),
    ):
        with pytest.raises(CxrError, match=re.escape(match)):
            starting_weights.resolve(str(path), model, summary)


def _train_params(tmp_path: Path, **train):
    raw = load_params(REPO / "params.yaml").to_dict()
    raw.update(model="resnet50", variant="plain", seed=5)
    raw["train"].update(epochs=1, batch_size=4, max_steps=2, num_workers=0, shuffle_buffer=8, lr=None)
    raw["train"].update(train)
    raw["evaluate"].update(batch_size=8, bootstrap=50)
    params = params_from_dict(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(params.to_dict()))))
    return params, path


def _evaluate_and_report(tmp_path: Path, name: str, model: Path, shards: Path, params_file: Path) -> tuple[dict, str]:
    run = tmp_path / "runs" / name
    args = ["evaluate", "--model", str(model), "--shards", str(shards), "--out", str(run / "eval.json"),
            "--predictions", str(tmp_path / f"{name}.csv"), "--plots", str(tmp_path / f"{name}-plots"),
            "--params", str(params_file)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["report", "--runs", str(run.parent), "--out", str(tmp_path / f"{name}.md")])
    assert result.exit_code == 0, result.output
    (run / "eval.json").rename(tmp_path / f"{name}.json")  # one run per report: both are resnet50/plain
    return json.loads((tmp_path / f"{name}.json").read_text()), (tmp_path / f"{name}.md").read_text()


@SLOW
def test_imagenet_start_and_a_fine_tune_from_its_checkpoint_train_evaluate_and_report_their_init(hub, tmp_path):
    weights, _ = place_imagenet_weights("resnet50")
    study = make_tiny_shards(tmp_path / "study" / "plain", per_class={"train": 8, "val": 4, "test": 4}, size=32)
    params, params_file = _train_params(tmp_path, init="imagenet")
    result = train_model(params, study, tmp_path / "a", tmp_path / "la", progress=False)
    assert result["init"]["kind"] == "imagenet" and result["init"]["file"] == str(weights)
    start = load_checkpoint(tmp_path / "a" / "best.pt")
    assert start.meta["init"]["weights"] == "ResNet50_Weights.IMAGENET1K_V2"
    assert start.meta["init"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    report, tables = _evaluate_and_report(tmp_path, "imagenet", start.path, study, params_file)
    assert report["model"]["init"]["kind"] == "imagenet" and report["model"]["init"]["freeze"] == "none"
    assert "init=imagenet (ResNet50_Weights.IMAGENET1K_V2)" in tables

    # Another hospital's images, sharded with the same preprocessing: fine-tune the head only.
    hospital = make_tiny_shards(tmp_path / "hospital" / "plain", per_class={"train": 8, "val": 4, "test": 4},
                                size=32, seed=9)
    params, params_file = _train_params(tmp_path, init=str(start.path), freeze="backbone", lr=1e-2)
    result = train_model(params, hospital, tmp_path / "b", tmp_path / "lb", progress=False)
    tuned = load_checkpoint(tmp_path / "b" / "best.pt")
    assert tuned.meta["init"] == {**result["init"], "freeze": "backbone"}
    assert tuned.meta["init"]["kind"] == "checkpoint" and tuned.meta["init"]["sha256"] == start.file_sha256()
    assert tuned.meta["init"]["init"] == start.meta["init"]  # the chain back to ImageNet
    changed = {k for k, v in tuned.state_dict.items() if not torch.equal(v, start.state_dict[k])}
    assert changed == {"backbone.fc.weight", "backbone.fc.bias"}  # BatchNorm statistics included: frozen
    report, tables = _evaluate_and_report(tmp_path, "tuned", tuned.path, hospital, params_file)
    assert report["model"]["init"]["kind"] == "checkpoint" and report["model"]["init"]["freeze"] == "backbone"
    assert f"init=checkpoint {start.file_sha256()[:12]}, backbone frozen" in tables


def test_freezing_a_scratch_start_is_a_params_error():
    raw = load_params(REPO / "params.yaml").to_dict()
    assert raw["train"]["init"] == "scratch" and raw["train"]["freeze"] == "none"  # the study, by default
    raw["train"]["freeze"] = "backbone"
    with pytest.raises(CxrError, match="needs train.init imagenet or a checkpoint"):
        params_from_dict(raw)


def test_fine_tuning_from_the_runs_own_output_is_refused_before_it_is_replaced(tmp_path: Path):
    shards = make_tiny_shards(tmp_path / "s")
    best = _checkpoint(tmp_path / "models" / "best.pt", "resnet50", "plain", read_summary(shards).preprocess)
    before = best.read_bytes()
    params, _ = _train_params(tmp_path, init=str(best))
    with pytest.raises(CxrError, match="output of this very run.*copy it elsewhere first"):
        train_model(params, shards, tmp_path / "models", tmp_path / "live", progress=False)
    assert best.read_bytes() == before
