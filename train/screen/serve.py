"""`cxr serve`: the opened ScreeningModel behind a REST API and one web page (FastAPI).

    POST /v1/screen    multipart files -> {"model", "engine", "results": [{filename, probability, ...}]}
    GET  /v1/model     the model card          GET /healthz    liveness
    GET  /             the page (static/)      GET /docs       Swagger UI, served from this app

Safe by default: a non-loopback host needs a bearer token from a file (check_exposure); every
upload is bounded in bytes per file and per request and in count, read in memory while it is
counted (never spooled to disk: starlette's form parser spools files over 1 MiB to temporary
files, hence the streaming parser below), then decoded by the predict's own bounded decoders
(inputs.bytes_or_reason). Results carry only the uploaded file's base name: no DICOM tag is ever
read back into a response or a log line. Every error is JSON with a reason.

Fast under concurrency: decoding runs in a thread pool; decoded images go to one bounded queue
that a single worker thread drains into batches of up to the model's batch size (waiting a few
milliseconds for company), scored with one `ScreeningModel.score` call. A full queue answers 503
with Retry-After instead of growing memory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import ipaddress
import logging
import os
import queue
import re
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hashlib
import json

import numpy as np
import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.errors import CxrError
from train.gradcam import gradcam_heatmaps, overlay
from train.models import model_input
from train.screen.inputs import bytes_or_reason
from train.screen.predict import CSV_COLUMNS
from train.screen.screening_model import ScreeningModel

STATIC_DIR = Path(__file__).parent / "static"
MIN_TOKEN_CHARS = 16
log = logging.getLogger("cxr.serve")


@dataclass(frozen=True)
class ServeLimits:
    """What one request may cost. File bytes are further bounded by the model's own
    preprocess.max_decoded_bytes; pixels by its max_pixels (the decoders check both)."""

    max_file_bytes: int = 64 * 2**20
    max_request_bytes: int = 256 * 2**20
    max_files: int = 64
    queue_images: int = 256  # images decoded and waiting for the model, over all requests
    batch_size: int = 32
    batch_wait_ms: float = 5.0
    request_timeout_s: float = 120.0  # reading the body, and waiting for the scores, each
    decode_threads: int = 0  # 0 = one per core

    def __post_init__(self):
        for name in ("max_file_bytes", "max_request_bytes", "max_files", "queue_images", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise CxrError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0 or self.request_timeout_s <= 0:
            raise CxrError("batch wait must be >= 0 ms and the request timeout > 0 s")


# --- exposure ---------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def check_exposure(host: str, token_file: Path | None, insecure_no_auth: bool) -> str | None:
    """The bearer token clients must send (None: no auth), or CxrError when HOST would be open to anyone."""
    if token_file is not None:
        if insecure_no_auth:
            raise CxrError("--token-file and --insecure-no-auth contradict each other; pass one")
        return read_token(token_file)
    if not is_loopback(host) and not insecure_no_auth:
        raise CxrError(f"--host {host} is reachable from other machines: pass --token-file FILE (a bearer token "
                       "clients must send) or, on a network you trust, --insecure-no-auth")  # fmt: skip
    return None


def read_token(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CxrError(f"cannot read token file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise CxrError(f"token file {path} must hold one token of at least {MIN_TOKEN_CHARS} characters, "
                       "no spaces (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")  # fmt: skip
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s is readable by other users (chmod 600 it)", path)
    return token


# --- uploads ----------------------------------------------------------------------------------------


class Rejected(Exception):
    """A request refused as a whole: an HTTP status and the reason sent back."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers


def safe_filename(raw: str | None, index: int) -> str:
    """The upload's base name only (no client path, no control characters), at most 255 characters."""
    name = re.split(r"[\\/]", raw or "")[-1]
    name = "".join(c for c in name if c.isprintable()).strip()[:255]
    return name or f"upload-{index + 1}"


class _Uploads:
    """A streaming multipart parser into memory that refuses a request as soon as it is over a bound.

    Hand-written around python-multipart's parser because starlette's `request.form()` spools
    every file over 1 MiB to a temporary file and bounds no total.
    """

    def __init__(self, boundary: bytes, limits: ServeLimits, max_file_bytes: int):
        self.limits, self.max_file_bytes = limits, max_file_bytes
        self.files: list[tuple[str, bytes]] = []
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""
        self._chunks: list[bytes] | None = None
        self._size = 0
        self._name: str | None = None
        callbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._add("_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }
        self.parser = MultipartParser(boundary, callbacks, max_header_count=16, max_header_size=8192)

    def _add(self, attr: str, data: bytes) -> None:
        value = getattr(self, attr) + data
        if len(value) > 8192:
            raise Rejected(400, "multipart header too long")
        setattr(self, attr, value)

    def _part_begin(self) -> None:
        self._headers, self._field, self._value = {}, b"", b""

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        filename = options.get(b"filename")
        if filename is None:  # a plain form field: ignored, but still counted in the request's bytes
            self._chunks, self._name = None, None
            return
        if len(self.files) >= self.limits.max_files:
            raise Rejected(413, f"too many files in one request: at most {self.limits.max_files}")
        self._chunks, self._size = [], 0
        self._name = safe_filename(filename.decode("utf-8", "replace"), len(self.files))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._chunks is None:
            return
        self._size += end - start
        if self._size > self.max_file_bytes:
            raise Rejected(413, f"file {self._name!r} is over the bound of {_size(self.max_file_bytes)}")
        self._chunks.append(data[start:end])

    def _part_end(self) -> None:
        if self._chunks is not None:
            self.files.append((self._name, b"".join(self._chunks)))
            self._chunks = None


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


async def read_uploads(request: Request, limits: ServeLimits, max_file_bytes: int) -> list[tuple[str, bytes]]:
    """The request's files as (base name, bytes), counted while they arrive."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise Rejected(415, "send the images as multipart/form-data, one `files` part per image")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Rejected(400, "invalid Content-Length")
        if int(declared) > limits.max_request_bytes:  # refused before one byte of the body is read
            raise Rejected(413, f"request is {_size(int(declared))}, over the bound of {_size(limits.max_request_bytes)}")
    uploads = _Uploads(options[b"boundary"], limits, max_file_bytes)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limits.max_request_bytes:
                raise Rejected(413, f"request is over the bound of {_size(limits.max_request_bytes)}")
            uploads.parser.write(chunk)
        uploads.parser.finalize()
    except Rejected:
        raise
    except Exception as exc:  # python-multipart's parse errors: a malformed body, said so
        raise Rejected(400, f"malformed multipart body: {type(exc).__name__}") from None
    if not uploads.files:
        raise Rejected(400, "no files in the request: send one or more `files` parts")
    return uploads.files


# --- micro-batching ---------------------------------------------------------------------------------


class Busy(Exception):
    pass


class Batcher:
    """One worker thread that scores queued images in batches; `submit` returns one Future per image."""

    def __init__(self, model: ScreeningModel, limits: ServeLimits, model_lock: threading.Lock):
        self.model, self.limits, self.lock = model, limits, model_lock
        self._queue: queue.Queue = queue.Queue(maxsize=limits.queue_images)
        self._submit_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="cxr-batcher", daemon=True)
        self._thread.start()

    def submit(self, images: list[np.ndarray]) -> list[Future]:
        """All of a request's images queued, or none (Busy): a request is never half-scored for lack of room."""
        futures = [Future() for _ in images]
        with self._submit_lock:  # all-or-nothing against other submitters; the worker only takes
            if self._queue.maxsize - self._queue.qsize() < len(images):
                raise Busy()
            for image, future in zip(images, futures):
                self._queue.put_nowait((image, future))
        return futures

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        wait = self.limits.batch_wait_ms / 1000
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + wait
            stop = False
            while len(batch) < self.limits.batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._score([(image, fut) for image, fut in batch if fut.set_running_or_notify_cancel()])
            if stop:
                return

    def _score(self, batch: list[tuple[np.ndarray, Future]]) -> None:
        if not batch:
            return
        try:
            with self.lock:
                scores = self.model.score(self.model.stack([image for image, _ in batch]))
        except Exception as exc:  # the engine failed on this batch: each of its requests gets the error
            for _, future in batch:
                future.set_exception(exc)
            return
        errors = getattr(scores, "errors", None)
        for i, (_, future) in enumerate(batch):
            future.set_result({
                "uncalibrated": float(scores.uncalibrated[i]),
                "probability": float(scores.calibrated[i]),
                "ood_score": None if scores.ood_score is None else float(scores.ood_score[i]),
                "out_of_distribution": None if scores.out_of_distribution is None
                else bool(scores.out_of_distribution[i]),
                "error": (errors[i] or None) if errors else None,
            })  # fmt: skip


# --- the app ----------------------------------------------------------------------------------------


def png_base64(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def model_card(model: ScreeningModel, checkpoint_sha256: str | None, metrics: dict[str, Any] | None,
               metrics_note: str | None) -> dict[str, Any]:  # fmt: skip
    """What the model is and how it was measured, from its own artifact (and a matching metrics file)."""
    meta = model.meta
    params = meta.get("params") or {}
    card: dict[str, Any] = {
        "identity": model.identity,
        "network": meta.get("model"),
        "variant": meta.get("variant"),
        "input_size": meta.get("input_size"),
        "init": meta.get("init"),
        "epoch": meta.get("epoch"),
        "checkpoint_sha256": checkpoint_sha256,
        "preprocess": meta.get("preprocess"),
        "threshold": meta.get("threshold"),
        "calibration": model.calibration,
        "selection": meta.get("selection"),
        "training": {k: params[k] for k in ("model", "variant", "seed", "train", "data") if k in params} or None,
        "training_counts": meta.get("counts") or meta.get("data_counts"),
        "out_of_distribution_gate": model.ood_gate,
        "test_metrics": None,
        "note": metrics_note,
        "csv_columns": list(CSV_COLUMNS),  # the page's CSV download: predict's own columns
    }
    if metrics is not None:
        card["test_metrics"] = {
            "roc_auc": metrics.get("roc_auc"),
            "roc_auc_ci95": metrics.get("roc_auc_ci95"),
            "sensitivity": metrics.get("sensitivity"),
            "specificity": metrics.get("specificity"),
            "n_test": metrics.get("n_test"),
            "n_patients": metrics.get("n_patients"),
            "positives": metrics.get("positives"),
            "negatives": metrics.get("negatives"),
        }
    return card


def matching_metrics(metrics: dict[str, Any] | None, checkpoint_sha256: str | None) -> tuple[dict | None, str | None]:
    """The metrics of exactly these weights, or None with a note saying why they are not shown."""
    if metrics is None:
        return None, None
    recorded = (metrics.get("model") or {}).get("checkpoint_sha256") if isinstance(metrics, dict) else None
    if not isinstance(recorded, str) or recorded != checkpoint_sha256:
        return None, (f"the metrics file describes checkpoint {str(recorded)[:12]}, not this one "
                      f"({str(checkpoint_sha256)[:12]}): its figures are not shown")  # fmt: skip
    return metrics, None


def create_app(model: ScreeningModel, *, limits: ServeLimits = ServeLimits(), token: str | None = None,
               checkpoint_sha256: str | None = None, metrics: dict[str, Any] | None = None) -> FastAPI:  # fmt: skip
    """The server around one opened model. `token`: the bearer token every /v1 call must carry (None: open).
    `metrics`: an evaluate JSON; shown on the model card only if it is of this checkpoint."""
    shown, note = matching_metrics(metrics, checkpoint_sha256)
    card = model_card(model, checkpoint_sha256, shown, note)
    max_file_bytes = min(limits.max_file_bytes, model.config.max_decoded_bytes)
    model_lock = threading.Lock()  # scoring and Grad-CAM (whose hooks sit on the same layers) take turns
    decoders = ThreadPoolExecutor(limits.decode_threads or os.cpu_count() or 1, thread_name_prefix="cxr-decode")
    batcher = Batcher(model, limits, model_lock)
    swagger = _swagger_assets()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()
        decoders.shutdown(wait=False)

    app = FastAPI(title="cxr-screen", summary="COVID-19 chest X-ray screening", docs_url=None, redoc_url=None,
                  version=str(model.meta.get("format", "")), lifespan=lifespan)  # fmt: skip
    app.state.batcher = batcher

    def authorized(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise Rejected(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                           {"WWW-Authenticate": "Bearer"})  # fmt: skip

    @app.exception_handler(Rejected)
    async def _rejected(request: Request, exc: Rejected):
        return JSONResponse({"error": exc.reason}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        reasons = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request: {reasons}"}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("internal error on %s: %s", request.url.path, type(exc).__name__)  # never the upload's content
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server is still up"},
                            status_code=500)  # fmt: skip

    @app.get("/healthz", summary="Liveness: the model is loaded and the batch worker is running")
    def healthz() -> dict[str, Any]:
        alive = batcher._thread.is_alive()
        if not alive:
            raise Rejected(503, "the batch worker has stopped")
        return {"status": "ok", "model": model.identity, "queued_images": batcher._queue.qsize()}

    @app.get("/v1/model", summary="The model card", dependencies=[Depends(authorized)])
    def model_endpoint() -> dict[str, Any]:
        return card

    @app.post("/v1/screen", summary="Screen one or several images (multipart `files`)",
              dependencies=[Depends(authorized)],
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "properties": {"files": {"type": "array",
                                                             "items": {"type": "string", "format": "binary"}}}}}}}})  # fmt: skip
    async def screen(request: Request, heatmaps: bool = Query(False, description="Add a Grad-CAM overlay and the "
                     "preprocessed input, PNG base64, per image")) -> dict[str, Any]:  # fmt: skip
        if heatmaps and model.cam_model is None:
            raise Rejected(400, "this server has no PyTorch weights for heatmaps (start it with --model's checkpoint)")
        try:
            files = await asyncio.wait_for(read_uploads(request, limits, max_file_bytes), limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise Rejected(408, f"the upload took over {limits.request_timeout_s:.0f} s") from None
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(*(loop.run_in_executor(decoders, bytes_or_reason, data, name, model.config)
                                         for name, data in files))  # fmt: skip
        names = [name for name, _ in files]
        del files  # the encoded bytes are not needed past here
        ok = [i for i, img in enumerate(decoded) if not isinstance(img, str)]
        try:
            futures = batcher.submit([decoded[i] for i in ok])
        except Busy:
            raise Rejected(503, "the server is busy: too many images are waiting for the model; retry shortly",
                           {"Retry-After": "1"}) from None  # fmt: skip
        try:
            scored = await asyncio.wait_for(asyncio.gather(*map(asyncio.wrap_future, futures)),
                                            limits.request_timeout_s)  # fmt: skip
        except asyncio.TimeoutError:
            for future in futures:
                future.cancel()
            raise Rejected(504, f"scoring took over {limits.request_timeout_s:.0f} s") from None
        by_index = dict(zip(ok, scored))
        results = []
        for i, img in enumerate(decoded):
            s = by_index.get(i)
            error = img if isinstance(img, str) else s["error"]
            decided = error is None
            results.append({
                "filename": names[i],
                "probability": s["probability"] if decided else None,
                "uncalibrated": s["uncalibrated"] if decided else None,
                "decision": model.decide_gated(s["probability"], s["out_of_distribution"]) if decided else None,
                "threshold": model.threshold,
                "out_of_distribution": s["out_of_distribution"] if s else None,
                "ood_score": s["ood_score"] if s else None,
                "error": error,
            })  # fmt: skip
        if heatmaps:
            decided = [i for i in ok if results[i]["error"] is None]
            overlays = await loop.run_in_executor(decoders, _heatmaps, model, model_lock, [decoded[i] for i in decided])
            for i, (input_png, heatmap_png) in zip(decided, overlays):
                results[i]["input_png"], results[i]["heatmap_png"] = input_png, heatmap_png
        body = {"model": model.identity, "engine": model.engine, "results": results}
        if all(r["error"] is not None for r in results):  # nothing screened: a client error, each file's reason inside
            return JSONResponse({**body, "error": f"none of the {len(results)} file(s) could be screened"}, 422)
        return body

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        # The page's own assets only: no CDN, no inline script, images from data: URLs.
        return FileResponse(STATIC_DIR / "index.html", headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                       "frame-ancestors 'none'", "X-Content-Type-Options": "nosniff"})  # fmt: skip

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if swagger is not None:
        app.mount("/swagger-ui", StaticFiles(directory=swagger), name="swagger")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        if swagger is None:
            return HTMLResponse("<p>Swagger UI assets are not installed (pip install swagger-ui-bundle); "
                                "the API description is at <a href='/openapi.json'>/openapi.json</a>.</p>")  # fmt: skip
        return get_swagger_ui_html(openapi_url="/openapi.json", title="cxr-screen API",
                                   swagger_js_url="/swagger-ui/swagger-ui-bundle.js",
                                   swagger_css_url="/swagger-ui/swagger-ui.css",
                                   swagger_favicon_url="/swagger-ui/favicon-32x32.png")  # fmt: skip

    return app


def _heatmaps(model: ScreeningModel, lock: threading.Lock, images: list[np.ndarray]) -> list[tuple[str, str]]:
    if not images:
        return []
    device = next(model.cam_model.parameters()).device
    with lock:
        maps = gradcam_heatmaps(model.cam_model, model_input(np.stack(images), device))
    return [(png_base64(img), png_base64(overlay(img, heat))) for img, heat in zip(images, maps)]


def serve(checkpoint: Path, onnx_path: Path | None, *, host: str, port: int, token_file: Path | None,
          insecure_no_auth: bool, metrics_path: Path | None, device: torch.device, engine: str, heatmaps: bool,
          limits: ServeLimits, max_connections: int) -> None:  # fmt: skip
    """Open the model once and serve it with uvicorn until interrupted (refused first if HOST would be open)."""
    import uvicorn

    token = check_exposure(host, token_file, insecure_no_auth)
    metrics = _read_json(metrics_path) if metrics_path is not None else None
    model = ScreeningModel.open(checkpoint, onnx_path, heatmaps and checkpoint.is_file(), device, engine)
    sha = model.meta.get("checkpoint_sha256") if onnx_path is not None else _sha256(checkpoint)
    app = create_app(model, limits=limits, token=token, checkpoint_sha256=sha, metrics=metrics)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    log.info("model %s (%s), %s", model.identity, "bearer token required" if token else "no auth",
             f"heatmaps {'on' if model.cam_model is not None else 'off'}")
    # limit_concurrency: connections over it get 503 from uvicorn itself, before any body is read;
    # timeout_keep_alive: idle connections are closed (slow clients do not pin sockets).
    uvicorn.run(app, host=host, port=port, limit_concurrency=max_connections, timeout_keep_alive=5,
                log_level="info", access_log=True, server_header=False)  # fmt: skip


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CxrError(f"cannot read metrics {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(data, dict):
        raise CxrError(f"{path} is not an evaluate metrics JSON object")
    return data


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _swagger_assets() -> Path | None:
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    return Path(swagger_ui_path)
