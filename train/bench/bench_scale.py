"""The model-side stages of `cxr bench-scale`, each run in its own process so its peak RSS is its own.

pipeline/bench/bench_scale.py builds the datasets and times every stage; these are the stages
that need torch: one loader pass over the train split, evaluation's metrics with the patient
bootstrap on the test split, and a queued experiment's setup up to the first training batch.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.params import EvaluateParams, TrainParams
from pipeline.shard_format import audit_shards, read_summary
from train import metrics
from train.data import train_batches
from train.evaluation.evaluate import ImageFacts, Predictions, split_report


def loader_pass(shards: Path, train: TrainParams, seed: int) -> dict[str, Any]:
    """One epoch of the training loader (every full batch of the train split), decoded and collated."""
    summary = read_summary(shards)
    steps = summary.split("train").count // train.batch_size
    seen = 0
    for batch in train_batches(summary, batch_size=train.batch_size, steps=steps, num_workers=train.num_workers,
                               shuffle_buffer=train.shuffle_buffer, seed=seed, epoch=0):  # fmt: skip
        seen += len(batch["label"])
    return {"images": seen, "steps": steps}


def metrics_pass(labels: list[int], patients: list[str], sources: list[str], params: EvaluateParams,
                 seed: int) -> dict[str, Any]:  # fmt: skip
    """Evaluation's per-split report on fake scores: what the metrics and the bootstrap cost, not the network.

    Scores are drawn so that the classes overlap (an AUC near 0.85), which keeps ties and every
    confusion cell populated as real scores do.
    """
    y = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    raw = 1.0 / (1.0 + np.exp(-(rng.normal(size=len(y)) + 1.5 * (2 * y - 1))))
    pred = Predictions(keys=[f"k{i}" for i in range(len(y))], labels=y, probs=raw, raw=raw,
                       meta=ImageFacts({"patient_id": p, "source": s} for p, s in zip(patients, sources)))  # fmt: skip
    threshold = metrics.choose_threshold(y, raw, params.threshold_rule, params.target_sensitivity)["value"]
    report = split_report(pred, threshold, params, seed)
    return {"images": int(len(y)), "patients": report["n_patients"], "roc_auc": report["roc_auc"]}


def private_bytes(root: Path) -> int:
    """Disk blocks held by files under `root` that no other path shares (nlink 1, not a symlink).

    A checkout that hardlinks from the cache adds no such file; one that copies adds every byte.
    """
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                total += st.st_blocks * 512
    return total


def first_step(shards: Path, train: TrainParams, seed: int, workspace: Path) -> dict[str, Any]:
    """What a training run does before its first step: audit the shards, draw the first batch.

    Also measures what the checkout of `workspace` (a queued experiment's temporary copy of the
    repository) wrote to disk: bytes held only by its own files, outputs and git clone included.
    """
    summary = read_summary(shards)
    audit_shards(summary)
    batch = next(iter(train_batches(summary, batch_size=train.batch_size, steps=1, num_workers=train.num_workers,
                                    shuffle_buffer=train.shuffle_buffer, seed=seed, epoch=0)))  # fmt: skip
    return {"batch": int(len(batch["label"])), "workspace": str(workspace),
            "workspace_private_bytes": private_bytes(workspace)}  # fmt: skip
