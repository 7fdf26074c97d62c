from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.errors import CxrError
from train.checkpoint import detached_state_dict, load_checkpoint, make_meta, save_checkpoint
from train.models import build_model


def _meta(**kw):
    args = dict(model="resnet50", variant="plain", input_size=64, preprocess={"size": 64, "equalize": None},
                params={"seed": 1, "train": {"augment": {"scale": (0.9, 1.1)}}},
                threshold={"value": 0.42, "rule": "max_f1", "split": "val"}, epoch=3, val_loss=0.5)
    args.update(kw)
    return make_meta(**args)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_model("resnet50").eval()


def test_round_trip_rebuilds_the_same_model(tmp_path: Path, net):
    path = tmp_path / "m" / "best.pt"
    save_checkpoint(path, _meta(), detached_state_dict(net))
    assert not list(path.parent.glob("*.tmp"))
    ckpt = load_checkpoint(path)
    assert (ckpt.model_name, ckpt.variant, ckpt.input_size, ckpt.threshold) == ("resnet50", "plain", 64, 0.42)
    assert ckpt.meta["class_names"] == ["negative", "positive"]
    assert ckpt.preprocess == {"size": 64, "equalize": None}
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        assert torch.equal(ckpt.build()(x), net(x))
    assert len(ckpt.file_sha256()) == 64


def test_loads_with_weights_only_including_resume_state(tmp_path: Path):
    torch.manual_seed(0)
    net = build_model("resnet50")
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for p in net.parameters():  # a stand-in gradient: the optimizer state is what matters here
        p.grad = torch.ones_like(p)
    opt.step()
    extra = {"optimizer": opt.state_dict(), "epoch": 2, "history": [{"val_loss": 0.1}], "best_val_loss": float("inf")}
    save_checkpoint(tmp_path / "last.pt", _meta(), detached_state_dict(net), extra)
    raw = torch.load(tmp_path / "last.pt", weights_only=True)  # no pickled code may be needed
    assert set(raw) == {"meta", "state_dict", "extra"}
    again = torch.optim.Adam(net.parameters(), lr=1e-3)
    again.load_state_dict(load_checkpoint(tmp_path / "last.pt").extra["optimizer"])
    assert again.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])


def test_detached_copy_really_is_a_copy(tmp_path: Path):
    torch.manual_seed(0)
    model = build_model("resnet50")
    best = detached_state_dict(model)
    aliased = model.state_dict()  # the study's bug: views of the live weights
    save_checkpoint(tmp_path / "best.pt", _meta(), best)
    key = "backbone.fc.weight"
    before = best[key].clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(best[key], before)  # the in-memory copy did not move
    assert not torch.equal(aliased[key], before)  # while state_dict() followed the live weights
    assert torch.equal(load_checkpoint(tmp_path / "best.pt").state_dict[key], before)


def test_detached_copy_unwraps_compiled_and_ddp_style_wrappers():
    torch.manual_seed(0)
    model = build_model("resnet50")

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel's .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert set(detached_state_dict(Wrapper(model))) == set(model.state_dict())


def test_missing_and_foreign_files_raise(tmp_path: Path):
    with pytest.raises(CxrError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CxrError, match="not a cxr-screen checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a zip")
    with pytest.raises(CxrError, match="cannot load"):
        load_checkpoint(tmp_path / "garbage.pt")


def test_init_in_meta_is_recorded_defaulted_and_checked(tmp_path: Path):
    from train.checkpoint import validate_meta

    assert _meta()["init"] == {"kind": "scratch", "freeze": "none"}
    record = {"kind": "imagenet", "weights": "ResNet50_Weights.IMAGENET1K_V2", "freeze": "backbone"}
    assert validate_meta(_meta(init=record), "m")["init"] == record
    older = {k: v for k, v in _meta().items() if k != "init"}  # before train.init existed: scratch
    assert validate_meta(older, "old.pt") is older
    for bad in ({"kind": "download"}, {"kind": "imagenet", "freeze": "all"}, "imagenet"):
        meta = dict(_meta(), init=bad)
        torch.save({"meta": meta, "state_dict": {}, "extra": {}}, tmp_path / "bad.pt")
        with pytest.raises(CxrError, match=r"bad.pt: invalid model meta: init must be \{kind: one of"):
            load_checkpoint(tmp_path / "bad.pt")


def test_a_meta_key_added_later_is_filled_in_for_older_checkpoints(tmp_path: Path, net, monkeypatch):
    from train import checkpoint

    path = tmp_path / "old.pt"
    old_meta = {k: v for k, v in _meta().items() if k != "selection"}  # written before "selection" existed
    save_checkpoint(path, old_meta, detached_state_dict(net))
    monkeypatch.setattr(checkpoint, "META_DEFAULTS", {"selection": "val_loss", "epoch": -1})
    ckpt = load_checkpoint(path)
    assert ckpt.meta["selection"] == "val_loss"  # missing: the default, i.e. the old behaviour
    assert ckpt.meta["epoch"] == 3  # present: the checkpoint's own value wins
    assert ckpt.threshold_record == {"value": 0.42, "rule": "max_f1", "split": "val"}


def test_train_state_round_trips_through_last_pt_and_older_states_get_defaults(tmp_path: Path, net):
    from train.checkpoint import TrainState

    state = TrainState("abc", epoch=2, best_state=detached_state_dict(net), best_epoch=1, best_val_loss=0.3,
                       history=[{"epoch": 1.0}, {"epoch": 2.0}], finished=True)  # fmt: skip
    save_checkpoint(tmp_path / "last.pt", _meta(), detached_state_dict(net), state.to_dict())
    back = TrainState.from_dict(load_checkpoint(tmp_path / "last.pt").extra)
    assert (back.fingerprint, back.epoch, back.best_epoch, back.best_val_loss) == ("abc", 2, 1, 0.3)
    assert back.finished and not back.early_stopped and back.history == state.history
    assert all(torch.equal(back.best_state[k], v) for k, v in state.best_state.items())
    older = {k: v for k, v in state.to_dict().items() if k != "early_stopped"}  # before that key existed
    assert TrainState.from_dict(older).early_stopped is False
    with pytest.raises(CxrError, match="fingerprint"):
        TrainState.from_dict({"epoch": 1})
