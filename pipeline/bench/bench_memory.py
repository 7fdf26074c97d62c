"""Benchmark: peak memory of the whole shard stage, on real data and on a corpus with one huge image.

The stage runs as the CLI does (`cxr ingest` then `cxr shard`, two workers) in a
child process. Two figures are kept, sampled every 20 ms from /proc (Linux):
the largest peak RSS (VmHWM) of any one process of the stage, and the largest
sum of RSS over the stage's process tree (an upper bound: pages the
forkserver's children share are counted once per process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.errors import CxrError
from pipeline.params import Params

HUGE_SIDE = 12000


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise CxrError(f"/proc/self/status has no {field} (Linux only)")


def reset_peak_rss() -> int:
    """Set this process's peak RSS (VmHWM) back to its RSS now (Linux >= 4.0); that RSS in bytes."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")
    return _status_kib("VmRSS") * 1024


def own_peak_rss() -> int:
    """This process's peak RSS (VmHWM) in bytes since it started or since `reset_peak_rss`."""
    return _status_kib("VmHWM") * 1024


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited while we looked
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _tree_rss(pid: int) -> tuple[int, int]:
    """(sum of RSS, largest peak RSS of one process) over pid and its descendants, in bytes."""
    tree, total, largest, todo = _children(), 0, 0, [pid]
    while todo:
        p = todo.pop()
        todo += tree.get(p, [])
        try:
            with open(f"/proc/{p}/status", "rb") as fh:
                fields = dict(line.split(b":", 1) for line in fh.read().splitlines() if b":" in line)
            total += int(fields[b"VmRSS"].split()[0]) * 1024
            largest = max(largest, int(fields[b"VmHWM"].split()[0]) * 1024)
        except (OSError, KeyError, IndexError, ValueError):
            pass  # exited while we looked, or a kernel thread
    return total, largest


def poll_tree(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
              interval: float = 0.02) -> dict[str, Any]:
    """Run `cmd`; exit code, wall seconds, and peak RSS (bytes) of its largest process and of its tree.

    Sampled from /proc: VmHWM is each process's own high-water mark, so a
    short spike between samples is still caught while the process lives.
    (The kernel's ru_maxrss is no help here: it keeps a forked parent's size
    across exec.)
    """
    if not Path("/proc/self/status").exists():
        raise CxrError("this benchmark reads /proc: it runs on Linux only")
    start = time.perf_counter()
    # stderr goes to a file, not a pipe: a chatty child would fill a pipe nobody reads while polling.
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=cwd, env=env)
        tree_peak = one_peak = 0
        while proc.poll() is None:
            total, largest = _tree_rss(proc.pid)
            tree_peak, one_peak = max(tree_peak, total), max(one_peak, largest)
            time.sleep(interval)
        seconds = time.perf_counter() - start
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    return {
        "exit_code": proc.returncode,
        "seconds": seconds,
        "peak_rss_one_process_bytes": one_peak,
        "peak_rss_tree_bytes": tree_peak,
        "error": stderr.strip().splitlines()[-1] if proc.returncode and stderr.strip() else "",
    }


def peak_rss(cmd: list[str], interval: float = 0.02) -> dict[str, Any]:
    """Run `cmd`; its exit code, wall time, peak single-process RSS and peak process-tree RSS (MiB)."""
    raw = poll_tree(cmd, interval=interval)
    return {
        "exit_code": raw["exit_code"],
        "seconds": round(raw["seconds"], 1),
        "peak_rss_one_process_mib": round(raw["peak_rss_one_process_bytes"] / 2**20, 1),
        "peak_rss_tree_mib": round(raw["peak_rss_tree_bytes"] / 2**20, 1),
        "error": raw["error"],
    }


def huge_corpus(root: Path, side: int = HUGE_SIDE) -> None:
    """A COVIDx-layout root: four ordinary radiographs per split and one side x side 16-bit PNG in train."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        lines = []
        for i in range(4):
            cv2.imwrite(str(root / split / f"{split}{i}.png"), rng.integers(0, 255, (1024, 1024), np.uint8))
            lines.append(f"p{split}{i} {split}{i}.png {('negative', 'positive')[i % 2]} synth")
        if split == "train":
            ramp = np.linspace(0, 4095, side, dtype=np.float32)  # smooth: a small file, a 288 MB decode
            big = (ramp[:, None] * 0.5 + ramp[None, :] * 0.5).astype(np.uint16)
            cv2.imwrite(str(root / split / "huge16.png"), big)
            del big
            lines.append("pbig huge16.png positive synth")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")


def _params_file(params: Params, path: Path, **preprocess: Any) -> Path:
    raw = json.loads(json.dumps(params.to_dict()))  # tuples -> lists, as YAML needs
    raw["shard"]["workers"] = 2
    raw["data"]["max_reject_fraction"] = 1.0
    raw["preprocess"].update(preprocess)
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def _stage(root: Path, work: Path, params_path: Path) -> dict[str, Any]:
    cli = [sys.executable, "-m", "pipeline.cli"]
    data = ["--out", str(work / "m.jsonl"), "--report", str(work / "r.json"), "--params", str(params_path)]
    ingest = subprocess.run([*cli, "ingest", "--root", str(root), *data], capture_output=True, text=True)
    if ingest.returncode:
        raise CxrError(f"ingest of {root} failed: {ingest.stderr.strip().splitlines()[-1:]}")
    shard = peak_rss([*cli, "shard", "--equalize", "--manifest", str(work / "m.jsonl"), "--ingest-report",
                      str(work / "r.json"), "--out", str(work / "shards"), "--params", str(params_path)])  # fmt: skip
    summary_path = work / "shards" / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        shard |= {"written": sum(summary["counts"].values()), "rejects": [r["reason"] for r in summary["rejects"]]}
    return shard


def run_memory_benchmark(root: Path, params: Params) -> dict[str, Any]:
    out: dict[str, Any] = {"workers": 2, "max_decoded_bytes_mib": params.preprocess.max_decoded_bytes / 2**20}
    with tempfile.TemporaryDirectory(prefix="cxr-bench-memory-") as tmp:
        tmp_dir = Path(tmp)
        default = _params_file(params, tmp_dir / "params.json")
        if (root / "train.txt").is_file():
            (tmp_dir / "real").mkdir()
            out[f"shard {root.name}"] = _stage(root, tmp_dir / "real", default)
        huge_corpus(tmp_dir / "huge")
        (tmp_dir / "h1").mkdir()
        out[f"shard with one {HUGE_SIDE}x{HUGE_SIDE} 16-bit PNG (default bound)"] = _stage(
            tmp_dir / "huge", tmp_dir / "h1", default
        )
        # The same image actually decoded (bound raised past its 288 MB): what the decode path costs.
        raised = _params_file(params, tmp_dir / "raised.json", max_decoded_bytes=320 * 2**20, max_pixels=2 * 10**8)
        (tmp_dir / "h2").mkdir()
        out[f"shard with one {HUGE_SIDE}x{HUGE_SIDE} 16-bit PNG decoded (bound raised to 320 MiB)"] = _stage(
            tmp_dir / "huge", tmp_dir / "h2", raised
        )
    return out
