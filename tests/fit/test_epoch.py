from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import CxrError
from pipeline.params import AugmentParams
from train.fit import epoch
from tests.conftest import REPO
from train.runtime import Runtime

CPU = Runtime(torch.device("cpu"), 0, 1, 0, None, channels_last=False)
NO_AUG = AugmentParams(scale=(1.0, 1.0), translate=0.0, rotate=0.0)


class TwoHeads(nn.Module):
    """Like InceptionV3: (logits, aux_logits) in training mode, logits otherwise."""

    def __init__(self):
        super().__init__()
        self.main = nn.Linear(16, 1)
        self.aux = nn.Linear(16, 1)

    def forward(self, x):
        f = x.flatten(1)
        if self.training:
            return self.main(f).squeeze(-1), self.aux(f).squeeze(-1)
        return self.main(f).squeeze(-1)


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 256, (4, 1, 4, 4), generator=g, dtype=torch.uint8),
         "label": torch.tensor([0, 1, 1, 0]), "key": list("abcd"), "meta": [{}] * 4}
        for _ in range(n)
    ]


def _epoch(model, batches, weights=(1.0, 3.0), aux_weight=0.3, steps=None):
    return epoch.train_one_epoch(
        model, torch.optim.SGD(model.parameters(), lr=0.0, fused=True), batches, rt=CPU,
        class_weights=torch.tensor(weights), augment=NO_AUG, generator=torch.Generator().manual_seed(0),
        aux_weight=aux_weight, steps=len(batches) if steps is None else steps, desc="t", show_progress=False,
    )


def test_aux_loss_is_added_with_its_weight_and_class_weights_apply():
    torch.manual_seed(0)
    model = TwoHeads()
    batches = _batches(3)
    stats = _epoch(model, batches)
    expected = []
    with torch.no_grad():
        for b in batches:
            x = b["image"].float() / 255
            y = b["label"].float()
            w = torch.tensor([1.0, 3.0])[b["label"]]
            main = (F.binary_cross_entropy_with_logits(model.main(x.flatten(1)).squeeze(-1), y, reduction="none") * w)
            aux = (F.binary_cross_entropy_with_logits(model.aux(x.flatten(1)).squeeze(-1), y, reduction="none") * w)
            expected.append(main.mean() + 0.3 * aux.mean())
    assert stats.loss == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)
    assert stats.step_losses == pytest.approx([float(e) for e in expected], rel=1e-5)
    assert stats.steps == 3 and stats.images == 12
    assert 0.0 <= stats.data_wait_fraction <= 1.0


def test_non_finite_loss_stops_before_the_weights_change(monkeypatch):
    torch.manual_seed(0)
    model = TwoHeads()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(epoch, "weighted_bce", lambda logits, t, w: logits.sum() * float("nan"))
    with pytest.raises(CxrError, match="loss became nan at step 1"):
        epoch.train_one_epoch(
            model, torch.optim.SGD(model.parameters(), lr=1.0, fused=True), _batches(2), rt=CPU,
            class_weights=torch.tensor([1.0, 1.0]), augment=NO_AUG, generator=torch.Generator(),
            aux_weight=0.3, steps=2, desc="t", show_progress=False,
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_short_loader_is_an_error():
    with pytest.raises(CxrError, match="gave 2 batches, expected 3"):
        _epoch(TwoHeads(), _batches(2), steps=3)


class PoisonedAt(nn.Module):
    """A linear head whose output turns NaN on the k-th training forward (1-based), as a bad batch would."""

    def __init__(self, k: int | None):
        super().__init__()
        self.head, self.k, self.calls = nn.Linear(16, 1), k, 0

    def forward(self, x):
        self.calls += 1
        out = self.head(x.flatten(1)).squeeze(-1)
        return out * float("nan") if self.calls == self.k else out


def _snapshots(model, optimizer, batches, k, seen: dict):
    """The batches, recording in `seen` the weights and optimizer state as they stand when batch k is
    fetched (after step k - 1's update, before step k), and how many batches were fetched in all."""
    for i, b in enumerate(batches, start=1):
        if i == k:
            seen["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            seen["state"] = {id(p): {n: t.clone() for n, t in s.items()} for p, s in optimizer.state.items()}
        seen["fetched"] = i
        yield b


def _poisoned_epoch(steps: int, k: int, monkeypatch, check_every: int):
    monkeypatch.setattr(epoch, "CHECK_EVERY", check_every)
    torch.manual_seed(0)
    model = PoisonedAt(k)
    optimizer = epoch.make_optimizer(model, lr=0.1)
    seen: dict = {}
    with pytest.raises(CxrError) as info:
        epoch.train_one_epoch(model, optimizer, _snapshots(model, optimizer, _batches(steps), k, seen), rt=CPU, class_weights=torch.tensor([1.0, 1.0]),
                              augment=NO_AUG, generator=torch.Generator().manual_seed(0), aux_weight=0.0,
                              steps=steps, desc="t", show_progress=False)
    return model, optimizer, seen, str(info.value)


def _assert_as_before_step_k(model, optimizer, seen):
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), seen["weights"][name]), name
    for p, state in optimizer.state.items():  # Adam's step count and moments: not advanced by a masked step
        if id(p) not in seen["state"]:  # masked from the first step: the state Adam starts from, as if none
            assert all(not t.any() for t in state.values()), state
            continue
        before = seen["state"][id(p)]
        assert set(state) == set(before) and all(torch.equal(state[n], before[n]) for n in state)


@pytest.mark.parametrize("steps,k,check_every,fetched", [
    (10, 6, 4, 8),  # found at the read after step 8; steps 6-8 masked
    (5, 5, 4, 5),  # found by the epoch's closing read
    (6, 1, 4, 4),  # the very first step: no update at all
])
def test_a_nan_at_step_k_leaves_the_weights_and_adam_state_of_step_k_minus_1(monkeypatch, steps, k, check_every,
                                                                             fetched):  # fmt: skip
    model, optimizer, seen, message = _poisoned_epoch(steps, k, monkeypatch, check_every)
    assert f"loss became nan at step {k};" in message and "last checkpoint is kept" in message
    assert seen["fetched"] == fetched  # stops at the first read after step k, not at the end
    _assert_as_before_step_k(model, optimizer, seen)
    assert not hasattr(optimizer, "found_inf")  # the mask does not outlive the loop
    if k > 1:  # the steps before k did train
        torch.manual_seed(0)
        assert not torch.equal(PoisonedAt(None).head.weight, model.head.weight)


def test_steps_after_the_masked_ones_would_train_again_with_the_same_optimizer(monkeypatch):
    # the loop's mask is removed when it ends: a later epoch's steps update as usual
    model, optimizer, seen, _ = _poisoned_epoch(4, 2, monkeypatch, 4)
    model.k = None
    stats = _epoch_with(model, optimizer, 2)
    assert stats.steps == 2 and not torch.equal(model.head.weight, seen["weights"]["head.weight"])
    assert all(int(s["step"]) == 1 + 2 for s in optimizer.state.values())


def _epoch_with(model, optimizer, steps):
    return epoch.train_one_epoch(model, optimizer, _batches(steps), rt=CPU, class_weights=torch.tensor([1.0, 1.0]),
                                 augment=NO_AUG, generator=torch.Generator().manual_seed(0), aux_weight=0.0,
                                 steps=steps, desc="t", show_progress=False)


def test_an_optimizer_that_cannot_mask_a_step_on_the_device_is_refused():
    model = PoisonedAt(None)
    with pytest.raises(CxrError, match="SGD is not fused"):
        _epoch_with(model, torch.optim.SGD(model.parameters(), lr=0.1), 2)


SYNCS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@pytest.mark.parametrize("steps,check_every", [(20, 4), (2 * epoch.CHECK_EVERY + 1, epoch.CHECK_EVERY)])
def test_the_loop_reads_the_device_once_per_check_not_once_per_step(monkeypatch, steps, check_every):
    monkeypatch.setattr(epoch, "CHECK_EVERY", check_every)
    calls: list[str] = []

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            calls.append(name)
            return real(self, *args, **kwargs)

        return wrapper

    torch.manual_seed(0)
    model = TwoHeads()
    optimizer = epoch.make_optimizer(model, lr=0.01)
    for name in SYNCS:  # every way Python turns a tensor into host values
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    stats = epoch.train_one_epoch(model, optimizer, _batches(steps), rt=CPU, class_weights=torch.tensor([1.0, 3.0]),
                                  augment=NO_AUG, generator=torch.Generator().manual_seed(0), aux_weight=0.3,
                                  steps=steps, desc="t", show_progress=False)
    monkeypatch.undo()
    assert stats.steps == steps and len(stats.step_losses) == steps and all(map(math.isfinite, stats.step_losses))
    assert 1 <= len(calls) <= math.ceil(steps / check_every), calls


DDP_DRIVER = """
import json, os, sys
import torch
from torch.nn.parallel import DistributedDataParallel
from pipeline.errors import CxrError
from tests.fit import test_epoch as t
from train.fit import epoch
from train.runtime import start_runtime, stop_runtime

epoch.CHECK_EVERY = 2
k = 3
rt = start_runtime(use_cuda=False)
torch.manual_seed(0)
net = t.PoisonedAt(k if rt.rank == 1 else None)  # rank 1's batch k alone is bad
model = DistributedDataParallel(net)
optimizer = epoch.make_optimizer(net, lr=0.1)
seen = {}
out = {"rank": rt.rank}
try:
    epoch.train_one_epoch(model, optimizer, t._snapshots(net, optimizer, t._batches(8, seed=rt.rank), k, seen), rt=rt, class_weights=torch.tensor([1.0, 1.0]), augment=t.NO_AUG,
                          generator=torch.Generator().manual_seed(0), aux_weight=0.0, steps=8, desc="t",
                          show_progress=False)
except CxrError as exc:
    out["error"] = str(exc)
t._assert_as_before_step_k(net, optimizer, seen)
out["fetched"] = seen["fetched"]
# a file per rank: the two ranks' stdout lines can interleave within one line under torchrun
with open(os.path.join(sys.argv[1], f"rank{rt.rank}.json"), "w") as f:
    json.dump(out, f)
stop_runtime(rt)
"""


@pytest.mark.slow
def test_a_nan_on_one_ddp_rank_stops_both_at_the_same_step_with_the_weights_of_step_k_minus_1(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
           str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:  # both stop at the read after step 3 (step 4), both name step 3
        assert "loss became nan at step 3;" in r["error"] and r["fetched"] == 4


class SmallConvNet(nn.Module):
    """Convolution, BatchNorm, ReLU, pooling and a linear head: the kinds of layers the study's networks compile."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3))).squeeze(-1)


@pytest.mark.slow
def test_compiled_and_eager_training_give_the_same_loss_curve_from_the_same_seed():
    aug = AugmentParams(scale=(0.9, 1.1), translate=0.05, rotate=5.0)  # the device-side warp as in training
    rt = Runtime(torch.device("cpu"), 0, 1, 0, None, channels_last=True)

    def curve(compiled: bool):
        torch.manual_seed(0)
        net = SmallConvNet().to(memory_format=torch.channels_last)
        optimizer = epoch.make_optimizer(net, lr=0.01)
        model = torch.compile(net) if compiled else net  # as the trainer does under train.compile
        stats = epoch.train_one_epoch(model, optimizer, _batches(6), rt=rt, class_weights=torch.tensor([1.0, 3.0]),
                                      augment=aug, generator=torch.Generator().manual_seed(1), aux_weight=0.0,
                                      steps=6, desc="t", show_progress=False)
        return stats.step_losses

    eager, compiled = curve(False), curve(True)
    assert len(set(eager)) == 6  # the weights moved: the curve is one of training, not of a frozen net
    # fp32: compiled kernels only reorder sums, so the curves agree far closer than bf16's 3 digits
    assert compiled == pytest.approx(eager, rel=1e-4)
