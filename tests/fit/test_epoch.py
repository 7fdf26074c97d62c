from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import CxrError
from pipeline.params import AugmentParams
from train.fit import epoch
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
        model, torch.optim.SGD(model.parameters(), lr=0.0), batches, rt=CPU,
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
    assert stats.steps == 3 and stats.images == 12
    assert 0.0 <= stats.data_wait_fraction <= 1.0


def test_non_finite_loss_stops_before_the_weights_change(monkeypatch):
    torch.manual_seed(0)
    model = TwoHeads()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(epoch, "weighted_bce", lambda logits, t, w: logits.sum() * float("nan"))
    with pytest.raises(CxrError, match="loss became nan at step 1"):
        epoch.train_one_epoch(
            model, torch.optim.SGD(model.parameters(), lr=1.0), _batches(2), rt=CPU,
            class_weights=torch.tensor([1.0, 1.0]), augment=NO_AUG, generator=torch.Generator(),
            aux_weight=0.3, steps=2, desc="t", show_progress=False,
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_short_loader_is_an_error():
    with pytest.raises(CxrError, match="gave 2 batches, expected 3"):
        _epoch(TwoHeads(), _batches(2), steps=3)
