"""Train one of the study's networks on streamed shards: the `train` stage.

Protocol (params.yaml, each key overridable with `dvc exp run -S`): Adam with
the per-model default lr, no weight decay; class-weighted BCE with weights
from the shard summary; InceptionV3's aux loss x train.aux_weight; device-side
affine augmentation; early stopping on the selection metric; the best epoch's
weights (a real copy; "best" per train.select, train/fit/best_epoch.py) saved as
OUT/best.pt with a Platt calibration and then the operating threshold, both
fitted on validation; OUT/last.pt after every epoch for an exact resume.

Randomness is re-derived from (seed, epoch, rank) at the start of every epoch
(data order, augmentation, dropout), so resuming at an epoch boundary needs
no saved RNG state and every DDP rank resumes exactly too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sklearn.metrics import roc_auc_score
from torch.nn.parallel import DistributedDataParallel

from pipeline.errors import CxrError
from pipeline.fileio import output_lock
from pipeline.params import Params
from pipeline.shard_format import ShardSummary, audit_shards, read_summary
from train.checkpoint import TrainState, detached_state_dict, load_checkpoint, make_meta, save_checkpoint
from train.data import derive_seed, steps_per_epoch, train_batches
from train.fit.epoch import make_optimizer, train_one_epoch, validate
from train.models import build_model, model_spec
from train.runtime import Runtime, barrier, broadcast_floats, start_runtime, stop_runtime
from train.metrics import choose_threshold  # shared with the evaluate stage
from train import calibration, ood
from train.fit import best_epoch, starting_weights

BEST_NAME = "best.pt"
LAST_NAME = "last.pt"


def run_fingerprint(params: Params, summary: ShardSummary, init: dict[str, Any]) -> str:
    """What makes a run resumable: the training params, the data and the starting weights' file.

    evaluate.* is left out on purpose: it only shapes the threshold chosen
    after training, so changing it reuses a finished run instead of retraining.
    """
    p = params.to_dict()
    payload = {"seed": p["seed"], "model": p["model"], "variant": p["variant"], "train": p["train"],
               "data": summary.raw, "init": init}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _resume_state(last: Path, fingerprint: str, rt: Runtime) -> tuple[TrainState, dict | None]:
    """(state, model weights) from last.pt when it belongs to this very run, else a fresh start."""
    if not last.is_file():
        return TrainState(fingerprint), None
    try:
        ckpt = load_checkpoint(last)
    except CxrError as exc:
        if rt.is_main:
            print(f"[train] ignoring unreadable {last} ({exc}); starting fresh", flush=True)
        return TrainState(fingerprint), None
    if ckpt.extra.get("fingerprint") != fingerprint:
        if rt.is_main:
            print(f"[train] {last} is from another run (params or data differ); starting fresh", flush=True)
        return TrainState(fingerprint), None
    if rt.is_main:
        print(f"[train] resuming from {last} after epoch {ckpt.extra['epoch']}", flush=True)
    return TrainState.from_dict(ckpt.extra), ckpt.state_dict


def _meta(params: Params, summary: ShardSummary, init: dict, threshold: dict, epoch: int, val_loss: float | None,
          calibration: dict | None = None, chosen: dict | None = None) -> dict:  # fmt: skip
    return make_meta(
        model=params.model,
        variant=summary.variant,
        input_size=int(summary.preprocess["size"]),
        preprocess=summary.preprocess,
        params=params.to_dict(),
        threshold=threshold,
        epoch=epoch,
        val_loss=val_loss,
        calibration=calibration,
        selection=chosen,
        init={**init, "freeze": params.train.freeze},
    )


def _open_live(live_dir: Path, history: list[dict[str, float]]):
    """A dvclive logger holding the whole curve: the epochs of a resumed run
    are replayed from last.pt, since DVC clears the live dir before a stage runs."""
    from dvclive import Live

    # dvcyaml=False: the project's dvc.yaml declares dvclive's metrics and plots itself.
    live = Live(dir=str(live_dir), resume=False, save_dvc_exp=False, dvcyaml=False)
    for record in history:
        _log_epoch(live, record)
    return live


def _auc(labels, probs) -> float:
    """Validation ROC AUC for the training curves; NaN (not logged) when the split holds one class."""
    return float(roc_auc_score(labels, probs)) if len(set(labels.tolist())) == 2 else float("nan")


def _log_epoch(live, record: dict[str, float]) -> None:
    for name in ("train_loss", "val_loss", "val_accuracy", "val_auc", "lr", "images_per_s", "data_wait_fraction"):
        if name in record and math.isfinite(record[name]):  # val_auc: absent in runs resumed from older code
            live.log_metric(name, record[name])
    live.log_metric("best_val_loss", record["best_val_loss"], plot=False)
    live.next_step()


def train_model(params: Params, shard_dir: Path | str, out_dir: Path, live_dir: Path, *, progress: bool = True) -> dict:
    """Train params.model on the shards at shard_dir (a folder or URL); write OUT/best.pt and OUT/last.pt.

    Works alone or under torchrun (DDP). Returns a summary (rank 0's view).
    """
    summary = read_summary(shard_dir)
    if summary.variant != params.variant:
        raise CxrError(f"{shard_dir} holds the {summary.variant!r} variant but params variant is {params.variant!r}")
    best_epoch.check_rule(params.train.select, summary.split("val").class_counts)
    # The summary's counts plan the steps per epoch and the class weights, and its splits are taken
    # as disjoint: check them against what the shards hold (one read of each, no PNG decoded) first.
    audit_shards(summary)
    rt = start_runtime()
    try:
        # One writer per OUT: a second training on it stops here, before best.pt is touched. Rank 0
        # only, as only it writes OUT; holding the lock, it removes the checkpoint temps a killed run left.
        lock = output_lock(out_dir, stale_temps_of=(BEST_NAME, LAST_NAME)) if rt.is_main else contextlib.nullcontext()
        with lock:
            return _train(params, summary, Path(out_dir), Path(live_dir), rt, progress)
    finally:
        stop_runtime(rt)


def _train(params: Params, summary: ShardSummary, out_dir: Path, live_dir: Path, rt: Runtime, progress: bool) -> dict:
    tp = params.train
    init = starting_weights.resolve(tp.init, params.model, summary)
    init_record = init.record
    own_outputs = {(out_dir / name).resolve() for name in (BEST_NAME, LAST_NAME)}
    if init_record["kind"] == "checkpoint" and Path(init_record["file"]).resolve() in own_outputs:
        raise CxrError(f"train.init={tp.init} is an output of this very run, which replaces it: "
                       f"copy it elsewhere first (e.g. {out_dir / 'start.pt'})")
    fingerprint = run_fingerprint(params, summary, init_record)
    # One writer: only rank 0 writes OUT, so only its last.pt is sure to exist (other
    # nodes' OUT is another disk); every rank resumes from what rank 0 read.
    state, weights = _resume_state(out_dir / LAST_NAME, fingerprint, rt) if rt.is_main else (None, None)
    if rt.distributed:
        shared = [state, weights]
        dist.broadcast_object_list(shared, src=0)
        state, weights = shared
    resumed_from = state.epoch
    if rt.is_main:
        # best.pt is only written once training ends; one present now belongs to
        # an earlier run and must not outlive a crash of this one.
        (out_dir / BEST_NAME).unlink(missing_ok=True)

    torch.manual_seed(params.seed)  # identical initial weights on every rank
    net = build_model(params.model)
    if weights is not None:
        net.load_state_dict(weights)
        starting_weights.set_freeze(net, tp.freeze)
    else:
        init.apply(net, tp.freeze)
    del init  # its weights are in the net now; VGG16's would hold another 0.5 GB
    net = net.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.preserve_format)
    lr = tp.lr if tp.lr is not None else model_spec(params.model).default_lr
    optimizer = make_optimizer(net, lr)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    model: torch.nn.Module = net
    if rt.distributed:
        model = DistributedDataParallel(net, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    if tp.compile:
        model = torch.compile(model)

    class_weights = torch.tensor(summary.class_weights("train"), dtype=torch.float32, device=rt.device)
    steps = steps_per_epoch(summary.split("train").count, tp.batch_size, rt.world_size, tp.max_steps)
    live = _open_live(live_dir, state.history) if rt.is_main else None
    if rt.is_main:
        print(f"[train] {params.model} on {summary.location} ({summary.variant}); {rt.describe()}; "
              f"{steps} steps/epoch, lr {lr:g}; init {_describe_init(init_record, tp.freeze)}", flush=True)
    steps_done = 0
    rates: list[float] = []
    while not state.finished:
        epoch = state.epoch  # 0-based index of the epoch about to run
        torch.manual_seed(derive_seed("torch", params.seed, epoch, rt.rank))  # dropout
        generator = torch.Generator(device=rt.device).manual_seed(derive_seed("augment", params.seed, epoch, rt.rank))
        batches = train_batches(
            summary, batch_size=tp.batch_size, steps=steps, num_workers=tp.num_workers,
            shuffle_buffer=tp.shuffle_buffer, seed=params.seed, epoch=epoch, rank=rt.rank,
            world_size=rt.world_size, pin_memory=rt.device.type == "cuda",
        )
        stats = train_one_epoch(
            model, optimizer, batches, rt=rt, class_weights=class_weights, augment=tp.augment,
            generator=generator, aux_weight=tp.aux_weight, steps=steps, desc=f"epoch {epoch + 1}/{tp.epochs}",
            show_progress=progress,
        )
        steps_done += stats.steps
        rates.append(stats.images_per_s)
        val = validate(net, summary, "val", rt=rt, class_weights=class_weights,
                       batch_size=params.evaluate.batch_size, num_workers=tp.num_workers)
        val_loss, val_accuracy, val_auc = broadcast_floats(rt, [val.loss, val.accuracy, _auc(val.labels, val.probs)])
        epoch_score = best_epoch.score(tp.select, val_loss, None if math.isnan(val_auc) else val_auc)
        if best_epoch.improved(epoch_score, state.best_score):
            # only rank 0 writes checkpoints, so only it keeps a copy of the best weights
            state.best_state = detached_state_dict(net) if rt.is_main else None
            state.best_epoch, state.best_val_loss, state.best_score, state.bad_epochs = epoch + 1, val_loss, epoch_score, 0
        else:
            state.bad_epochs += 1
        early = state.bad_epochs >= max(tp.patience, 1)
        record = {
            "epoch": epoch + 1, "train_loss": stats.loss, "val_loss": val_loss, "val_accuracy": val_accuracy,
            "val_auc": val_auc,
            "lr": optimizer.param_groups[0]["lr"], "images_per_s": stats.images_per_s,
            "data_wait_fraction": stats.data_wait_fraction, "best_val_loss": state.best_val_loss,
            "steps": stats.steps,
        }
        state.epoch, state.optimizer, state.history = epoch + 1, optimizer.state_dict(), state.history + [record]
        state.finished, state.early_stopped = early or epoch + 1 >= tp.epochs, early
        if rt.is_main:
            save_checkpoint(out_dir / LAST_NAME, _meta(params, summary, init_record, {}, epoch + 1, val_loss),
                            detached_state_dict(net), state.to_dict())
            _log_epoch(live, record)
            print(f"[train] epoch {epoch + 1}: train_loss {stats.loss:.4f} val_loss {val_loss:.4f} "
                  f"val_acc {val_accuracy:.3f} {stats.images_per_s:.1f} img/s "
                  f"(data wait {100 * stats.data_wait_fraction:.0f}%)", flush=True)
        barrier(rt)

    steps_per_rank = [steps_done]
    if rt.distributed:
        steps_per_rank = [0] * rt.world_size
        dist.all_gather_object(steps_per_rank, steps_done)
    result: dict[str, Any] = {}
    if rt.is_main:
        result = _finish(params, summary, init_record, out_dir, rt, net, state, class_weights)
        live.end()
        result.update(resumed_from_epoch=resumed_from, steps_per_epoch=steps, steps_per_rank=steps_per_rank,
                      world_size=rt.world_size, runtime=rt.describe(), init={**init_record, "freeze": tp.freeze},
                      images_per_s=(sum(rates) / len(rates)) if rates else None)
    barrier(rt)
    return result


def _describe_init(record: dict[str, Any], freeze: str) -> str:
    kind = record["kind"]
    text = {"scratch": "scratch", "imagenet": f"imagenet ({record.get('weights')}, {record.get('file')})",
            "checkpoint": f"checkpoint {record.get('file')} (sha256 {str(record.get('sha256'))[:12]})"}[kind]
    if kind == "imagenet" and not record.get("published_file"):
        text += " -- NOTE: this file does not hash to the name torchvision published it under"
    return text + (", backbone frozen" if freeze == "backbone" else "")


def _finish(params, summary, init, out_dir, rt, net, state: TrainState, class_weights) -> dict[str, Any]:
    """Best weights -> validation probabilities (fp32 forward) -> calibration -> threshold -> best.pt."""
    if state.best_state is None:
        raise CxrError("training ended without a single validated epoch")
    net.load_state_dict(state.best_state)
    val = validate(net, summary, "val", rt=rt, class_weights=class_weights,
                   batch_size=params.evaluate.batch_size, num_workers=params.train.num_workers, precise=True)
    # Calibration first, threshold after: the threshold is a calibrated probability.
    cal = calibration.fit_platt(val.labels, val.probs)
    threshold = choose_threshold(val.labels, calibration.apply(val.probs, cal), params.evaluate.threshold_rule,
                                 params.evaluate.target_sensitivity)
    chosen = best_epoch.selection_report(params.train.select, state.best_epoch, val.labels, val.probs,
                                        val.patients, class_weights.tolist(), params.evaluate.bootstrap,
                                        params.seed)  # fmt: skip
    meta = _meta(params, summary, init, threshold, state.best_epoch, state.best_val_loss, cal, chosen)
    meta["ood"], meta["ood_params"] = ood.fit_gate_on_shards(
        net, summary, dim=params.evaluate.ood_dim, quantile=params.evaluate.ood_quantile,
        batch_size=params.evaluate.batch_size, num_workers=params.train.num_workers, device=rt.device)
    save_checkpoint(out_dir / BEST_NAME, meta, state.best_state, extra={})
    return {
        "epochs_run": state.epoch,
        "early_stopped": state.early_stopped,
        "best_epoch": state.best_epoch,
        "best_val_loss": state.best_val_loss,
        "threshold": threshold,
        "calibration": cal,
        "selection": chosen,
        "ood": meta["ood"],
        "history": state.history,
    }
