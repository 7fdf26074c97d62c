"""One training epoch and one validation pass: the per-batch work of the trainer."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.errors import CxrError
from pipeline.params import AugmentParams
from pipeline.shard_format import ShardSummary
from train.fit.augment import augment_batch
from train.data import eval_batches
from train.models import model_input
from train.runtime import Runtime, mean_across_ranks


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample weighted binary cross-entropy, averaged over the batch (the
    study's 'weighted binary cross-entropy', as Keras' class_weight computes it).
    Computed in fp32 even under autocast: bf16 logits lose the loss's low bits."""
    losses = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    return (losses * weights).mean()


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The study's Adam (default betas, no L2), as the trainer and its benchmark run it.

    fused: one kernel per step instead of foreach's temporaries; on CPU with
    glibc malloc those temporaries cost more than ResNet50's backward pass.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]  # all but a frozen backbone
    return torch.optim.Adam(trainable, lr=lr, weight_decay=0.0, fused=True)


# Steps between the loop's reads of the device: the all-rank loss and the
# non-finite flag stay there in between. Each read waits until every queued
# kernel has run (on a GPU the host stops launching work until the device
# drains), so reading every step serialises host and device; one wait in 16
# steps costs a sixteenth of that. Finding a non-finite loss up to 15 steps
# late changes nothing: every step from it on is masked too.
CHECK_EVERY = 16


@dataclass(frozen=True)
class EpochStats:
    loss: float  # mean over steps of the all-rank mean batch loss
    steps: int
    images: int  # over all ranks
    seconds: float
    data_wait_s: float  # this rank's time blocked on the loader
    step_losses: tuple[float, ...] = ()  # the all-rank mean loss of each step, in order

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait_s / self.seconds if self.seconds > 0 else 0.0


def _check_skippable(optimizer: torch.optim.Optimizer) -> None:
    # A fused optimizer skips its whole update, state included (Adam's step count and
    # moments), when its `found_inf` tensor is 1: the protocol AMP's GradScaler uses,
    # evaluated on the device. Others would need a host-side check every step.
    if not all(group.get("fused") for group in optimizer.param_groups):
        raise CxrError(f"{type(optimizer).__name__} is not fused: the training loop masks steps on the device "
                       "through a fused optimizer's found_inf (make_optimizer builds one)")


class _NonFinite:
    """The device-side record of the first step whose all-rank loss was not finite.

    Every rank sees the same all-reduced loss, so every rank records the same
    step and, reading it at the same step count, stops at the same step.
    """

    def __init__(self, device: torch.device):
        self.first = torch.zeros((), dtype=torch.int64, device=device)  # 1-based step, 0 = none yet
        self.skip = torch.zeros((), dtype=torch.float32, device=device)  # the optimizer's found_inf

    def record(self, step: int, loss: torch.Tensor) -> None:
        self.first = torch.where((self.first == 0) & ~torch.isfinite(loss), step, self.first)
        self.skip = (self.first != 0).to(torch.float32)  # sticky: no later step updates either


def _read(flag: _NonFinite, losses: list[torch.Tensor], since: int) -> tuple[int, list[float]]:
    """(first non-finite step or 0, the losses of steps since+1..) in ONE device-to-host copy."""
    both = torch.cat([flag.first.to(torch.float64).reshape(1), torch.stack(losses[since:]).to(torch.float64)])
    values = both.tolist()
    return int(values[0]), values[1:]


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[dict[str, Any]],
    *,
    rt: Runtime,
    class_weights: torch.Tensor,
    augment: AugmentParams,
    generator: torch.Generator,
    aux_weight: float,
    steps: int,
    desc: str,
    show_progress: bool = True,
) -> EpochStats:
    """Augment on the device, forward under autocast, weighted BCE (+ aux), Adam step.

    No step waits for the device: the loss is all-reduced and checked there,
    and a non-finite one on any rank masks that step's optimizer update and
    every later one (the fused optimizer's found_inf, as AMP skips steps). The
    loop reads the flag every CHECK_EVERY steps and at the end, and then raises
    CxrError naming the step, on every rank at the same step; the weights and
    the optimizer state are those from before that step, and the last
    checkpoint stays good. (BatchNorm's running statistics of the few forward
    passes until the read are not masked; a stopped run keeps none of them.)
    """
    _check_skippable(optimizer)
    model.train()
    flag = _NonFinite(rt.device)
    losses: list[torch.Tensor] = []  # on the device until read
    values: list[float] = []  # read so far
    done, images, wait = 0, 0, 0.0
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, unit="batch", disable=not (show_progress and rt.is_main),
               mininterval=1.0, leave=False)

    def check() -> None:
        bad, read = _read(flag, losses, len(values))
        values.extend(read)
        if bad:
            bar.close()
            raise CxrError(
                f"{desc}: loss became {values[bad - 1]} at step {bad}; stopped without updating the weights "
                "(the last checkpoint is kept). Try a lower train.lr."
            )
        bar.set_postfix(loss=f"{sum(read) / len(read):.4f}", img_s=f"{images / (time.perf_counter() - start):.1f}",
                        refresh=False)

    try:
        fetch = time.perf_counter()
        for batch in batches:
            wait += time.perf_counter() - fetch
            y = batch["label"].to(rt.device, non_blocking=True)
            x = augment_batch(model_input(batch["image"], rt.device), augment, generator)
            if rt.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with rt.autocast():
                out = model(x)
            logits, aux = out if isinstance(out, tuple) else (out, None)
            weights, targets = class_weights[y], y.float()
            loss = weighted_bce(logits, targets, weights)
            if aux is not None:  # InceptionV3's auxiliary classifier, as in the study
                loss = loss + aux_weight * weighted_bce(aux, targets, weights)
            mean = mean_across_ranks(rt, loss.detach())
            flag.record(done + 1, mean)
            optimizer.found_inf = flag.skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(mean)
            done += 1
            images += y.shape[0] * rt.world_size
            if done % CHECK_EVERY == 0:
                check()
            bar.update()
            fetch = time.perf_counter()
        if len(values) < done:
            check()
    finally:
        # found_inf is read by every later step() of this optimizer; it belongs to this loop alone
        optimizer.__dict__.pop("found_inf", None)
        bar.close()
    if done != steps:
        raise CxrError(f"{desc}: the loader gave {done} batches, expected {steps}")
    return EpochStats(sum(values) / max(done, 1), done, images, time.perf_counter() - start, wait, tuple(values))


@dataclass(frozen=True)
class Validation:
    loss: float  # class-weighted BCE over the split (same weights as training)
    accuracy: float  # at threshold 0.5
    labels: np.ndarray
    probs: np.ndarray
    patients: list[str]  # patient id per image, for patient-level intervals


@torch.inference_mode()
def validate(
    net: nn.Module,
    summary: ShardSummary,
    split: str,
    *,
    rt: Runtime,
    class_weights: torch.Tensor,
    batch_size: int,
    num_workers: int,
    precise: bool = False,
) -> Validation:
    """One exact pass over `split`; `precise` skips autocast (for the final threshold)."""
    net.eval()
    loss_sum, labels, probs, patients = 0.0, [], [], []
    for batch in eval_batches(summary, split, batch_size, num_workers):
        y = batch["label"].to(rt.device)
        x = model_input(batch["image"], rt.device)
        if rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if precise:
            logits = net(x).float()
        else:
            with rt.autocast():
                logits = net(x).float()
        losses = F.binary_cross_entropy_with_logits(logits, y.float(), reduction="none") * class_weights[y]
        loss_sum += float(losses.sum())
        labels.append(y.cpu().numpy())
        probs.append(torch.sigmoid(logits.double()).cpu().numpy())  # fp32 sigmoid saturates at 1.0 from logit ~17
        patients += [str(m.get("patient_id") or f"<image {k}>") for k, m in zip(batch["key"], batch["meta"])]
    labels_np, probs_np = np.concatenate(labels), np.concatenate(probs)
    accuracy = float(((probs_np >= 0.5).astype(int) == labels_np).mean())
    return Validation(loss_sum / len(labels_np), accuracy, labels_np, probs_np, patients)
