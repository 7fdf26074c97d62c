"""glibc malloc tuning A/B in one run: the same CPU training steps in fresh processes, alternating.

    python -m train.bench.malloc_ab --models resnet50 densenet121 --batch 32 --steps 2 --rounds 2

Arms: `default` (glibc as shipped), `tuned` (train.runtime.tune_glibc_malloc, what start-up does),
and `tcmalloc` when its library exists (LD_PRELOAD). Each arm runs in its own process, in ABAB
order, so drift of a shared machine hits every arm alike; the ratios against `default` are the
result, the raw images/s are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


def _child(model_name: str, batch: int, steps: int, tune: bool) -> dict:
    import torch
    import torchvision

    from train.runtime import tune_glibc_malloc

    preload = os.environ.get("LD_PRELOAD")
    note = tune_glibc_malloc() if tune else f"LD_PRELOAD={preload}" if preload else "glibc defaults"
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(num_classes=2).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 224, 224).to(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: first-touch of weights, optimizer state, oneDNN primitives
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    return {"images_per_s": batch * steps / seconds, "minor_faults_per_step": faults / steps, "note": note}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["resnet50", "densenet121"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        model_name, batch, steps, tune = args.child
        print(json.dumps(_child(model_name, int(batch), int(steps), tune == "1")))
        return
    arms = {"default": ("0", None), "tuned": ("1", None)}
    if TCMALLOC.exists():
        arms["tcmalloc"] = ("0", str(TCMALLOC))
    for model_name in args.models:
        results: dict[str, list[dict]] = {arm: [] for arm in arms}
        for r in range(args.rounds):
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            for arm in order:
                tune, preload = arms[arm]
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                env.pop("LD_PRELOAD", None)
                if preload:
                    env["LD_PRELOAD"] = preload
                cmd = [sys.executable, "-m", "train.bench.malloc_ab", "--child", model_name, str(args.batch), str(args.steps), tune]
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                res = json.loads(out.strip().splitlines()[-1])
                results[arm].append(res)
                print(f"{model_name} round {r} {arm}: {res['images_per_s']:.2f} img/s, {res['minor_faults_per_step']:.0f} minor faults/step ({res['note']})", flush=True)
        base = statistics.median(x["images_per_s"] for x in results["default"])
        for arm, rs in results.items():
            ips = statistics.median(x["images_per_s"] for x in rs)
            faults = statistics.median(x["minor_faults_per_step"] for x in rs)
            print(f"{model_name} batch {args.batch} {arm}: median {ips:.2f} img/s, {faults:.0f} minor faults/step, x{ips / base:.2f} vs default")


if __name__ == "__main__":
    main()
