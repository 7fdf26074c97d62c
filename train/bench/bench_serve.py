"""Benchmark: `cxr serve` under N concurrent clients against `cxr predict` on the same images, one run.

The server is the real command (`python -m pipeline.cli serve`) in a subprocess on an ephemeral
loopback port; N client threads (httpx, one connection each) send one image per request until
REQUESTS requests have been sent. Before timing, a warm-up (every distinct image once, at least a
few requests per client) settles the engine (ONNX Runtime's session, first-batch check, its arena
for each batch shape) and the allocator; the server's RSS is read then (`before`), halfway through
the timed requests (`mid`) and after them (`after`): growth that goes on in the second half is
what a long-running server would leak. The images are a COVIDx-layout root's files cycled to REQUESTS (hard links,
bench_screen.replicate_root); `predict` then scores the very same files in-process, after the
server has stopped, so the two never share the cores.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from pipeline.errors import CxrError
from pipeline.params import Params
from train.bench.bench_screen import random_checkpoint, replicate_root
from train.screen.predict import predict
from train.timing import allocator_name, cpu_model_name

BATCH_SIZE = 32  # predict's default batch, and the server's largest micro-batch


def run_serve_benchmark(params: Params, source: Path, checkpoint: Path | None, arch: str, clients: int,
                        requests: int, warmup_per_client: int = 4) -> dict[str, Any]:  # fmt: skip
    if clients < 1 or requests < clients:
        raise CxrError(f"need clients >= 1 and requests >= clients, got {clients} and {requests}")
    with tempfile.TemporaryDirectory(prefix="cxr-bench-serve-") as tmp:
        tmp_dir = Path(tmp)
        model = checkpoint or random_checkpoint(tmp_dir / "model.pt", arch, params)
        layout = replicate_root(source, tmp_dir / "root", requests)
        files = sorted((tmp_dir / "root" / "test").iterdir())
        served = _serve_and_drive(model, files, layout["distinct_files"], clients, warmup_per_client,
                                  tmp_dir / "server.log")  # fmt: skip

        predict(files[: 2 * BATCH_SIZE], checkpoint=model, out_csv=tmp_dir / "warm.csv", batch_size=BATCH_SIZE,
                workers=0, device=torch.device("cpu"), progress=False)  # fmt: skip
        begin = time.perf_counter()
        summary = predict([str(f) for f in files], checkpoint=model, out_csv=tmp_dir / "predict.csv",
                          batch_size=BATCH_SIZE, workers=0, device=torch.device("cpu"), progress=False)  # fmt: skip
        predict_s = time.perf_counter() - begin
    predict_rate = (summary.total - summary.failed) / predict_s
    return {
        "model": summary.model,
        "checkpoint": str(checkpoint) if checkpoint is not None else f"random {arch}",
        **layout,
        "clients": clients,
        "requests": requests,
        **served,
        "predict_images_per_s": round(predict_rate, 2),
        "predict_failed": summary.failed,
        "serve_vs_predict": round(served["serve_images_per_s"] / predict_rate, 2),
        "engine": summary.device,
        "batch_size": BATCH_SIZE,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model_name(),
        "cores": os.cpu_count(),
        "allocator": allocator_name(),
    }


def _serve_and_drive(model: Path, files: list[Path], distinct: int, clients: int, warmup: int,
                     log_path: Path) -> dict[str, Any]:  # fmt: skip
    port = _free_port()
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--model", str(model), "--port", str(port),
           "--no-heatmaps", "--batch-size", str(BATCH_SIZE), "--device", "cpu"]  # fmt: skip
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(server, url, log_path)
        payloads = [(f.name, f.read_bytes()) for f in files]
        # Warm-up: every distinct image once (each size the decoders and allocator will see), at least
        # `warmup` requests per client (the engine's batch shapes).
        _drive(url, payloads, clients, max(clients * warmup, distinct))
        rss_before = _rss_mb(server.pid)
        half = len(payloads) // 2
        begin = time.perf_counter()
        latencies, errors = _drive(url, payloads[:half], clients, half)
        rss_mid = _rss_mb(server.pid)  # growth that stops by mid-run is the allocator settling; a leak goes on
        more, more_errors = _drive(url, payloads[half:], clients, len(payloads) - half)
        seconds = time.perf_counter() - begin
        rss_after = _rss_mb(server.pid)
        latencies, errors = latencies + more, errors + more_errors
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    ms = np.array(latencies) * 1000
    return {
        "serve_images_per_s": round(len(payloads) / seconds, 2),
        "latency_ms": {f"p{q}": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)},
        "errors": errors,
        "server_rss_mb": {"before": round(rss_before, 1), "mid": round(rss_mid, 1), "after": round(rss_after, 1),
                          "growth": round(rss_after - rss_before, 1),
                          "growth_second_half": round(rss_after - rss_mid, 1)},  # fmt: skip
    }


def _drive(url: str, payloads: list[tuple[str, bytes]], clients: int, count: int) -> tuple[list[float], int]:
    """COUNT requests of one image each over CLIENTS connections; (latencies in s, failed requests)."""
    lock = threading.Lock()
    sent = iter(range(count))
    latencies: list[float] = []
    errors = [0]

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while True:
                with lock:
                    i = next(sent, None)
                if i is None:
                    return
                name, data = payloads[i % len(payloads)]
                begin = time.perf_counter()
                try:
                    response = http.post("/v1/screen", files=[("files", (name, data, "application/octet-stream"))])
                    ok = response.status_code == 200 and response.json()["results"][0]["error"] is None
                except httpx.HTTPError:
                    ok = False
                took = time.perf_counter() - begin
                with lock:
                    latencies.append(took)
                    errors[0] += not ok

    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    return latencies, errors[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(server: subprocess.Popen, url: str, log_path: Path, limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise CxrError(f"the server exited ({server.returncode}): {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise CxrError(f"the server did not answer /healthz within {limit_s:.0f} s")


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise CxrError(f"no VmRSS for process {pid}")
