"""`cxr serve` as people use it: the API through FastAPI's test client, a real uvicorn on loopback under
concurrent clients and hostile bodies, and the page in a real headless Chromium."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import io
import itertools
import os
import select
import shutil
import socket
import threading
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.uid import UID, JPEGBaseline8Bit
from typer.testing import CliRunner

from pipeline.cli import app as cli_app
from pipeline.errors import CxrError
from train.checkpoint import load_checkpoint, save_checkpoint
from train.screen.predict import predict
from train.screen.screening_model import ScreeningModel, Scores
from train.screen.serve import ServeLimits, check_exposure, create_app, read_token, safe_filename
from tests.screen.test_predict import PLATT, chest
from tests.test_dicom import dicom_bytes
from tests.test_export import make_checkpoint

TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, bytes]:
    rng = np.random.default_rng(5)
    png = cv2.imencode(".png", chest(rng).astype(np.uint8))[1].tobytes()
    jpeg = cv2.imencode(".jpg", chest(rng).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    tiff = io.BytesIO()
    Image.fromarray(chest(rng).astype(np.uint8)).save(tiff, format="TIFF")
    dcm = dicom_bytes(chest(rng, hi=4095).astype(np.uint16), window=(2000.0, 4000.0))
    return {"a.png": png, "b.jpg": jpeg, "c.tiff": tiff.getvalue(), "d.dcm": dcm, "corrupt.png": png[: len(png) // 3],
            "notes.png": b"this is not an image\n"}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = make_checkpoint(tmp_path_factory.mktemp("model") / "best.pt", "alexnet", threshold=0.5)
    ckpt = load_checkpoint(path)
    save_checkpoint(path, dict(ckpt.meta, calibration=PLATT), ckpt.state_dict)
    return path


@pytest.fixture(scope="module")
def model(checkpoint) -> ScreeningModel:
    return ScreeningModel.open(checkpoint, None, True, torch.device("cpu"), "eager")


@pytest.fixture(scope="module")
def client(model) -> TestClient:
    with TestClient(create_app(model)) as c:
        yield c


def upload(*names_and_bytes: tuple[str, bytes]) -> list:
    return [("files", (name, data, "application/octet-stream")) for name, data in names_and_bytes]


def test_screen_equals_predict_and_records_each_unreadable_file(tmp_path, client, checkpoint, files):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    summary = predict([str(tmp_path / n) for n in files], checkpoint=checkpoint, out_csv=tmp_path / "p.csv",
                      batch_size=4, workers=1, device=torch.device("cpu"), engine="eager", progress=False)  # fmt: skip
    assert summary.failed == 2
    import csv

    with open(tmp_path / "p.csv", newline="") as fh:
        expected = {Path(r["path"]).name: r for r in csv.DictReader(fh)}

    response = client.post("/v1/screen", files=upload(*files.items()))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == summary.model
    results = {r["filename"]: r for r in body["results"]}
    assert list(results) == list(files)  # request order
    for name, row in expected.items():
        got = results[name]
        if row["error"]:
            assert got["error"] == row["error"] and got["probability"] is None and got["decision"] is None
        else:
            assert got["error"] is None
            assert abs(got["probability"] - float(row["p_covid_calibrated_at_val_prevalence"])) <= 1e-6
            assert got["decision"] == row["decision"] and got["threshold"] == float(row["threshold"])
            assert got["uncalibrated"] != got["probability"]  # the checkpoint's Platt scaling is applied
            assert got["out_of_distribution"] is None and got["ood_score"] is None  # this model has no gate


def test_heatmaps_are_base64_pngs_of_the_input_size(client, files, model):
    response = client.post("/v1/screen?heatmaps=true", files=upload(("x.png", files["a.png"]), ("bad", b"")))
    good, bad = response.json()["results"]
    heat = np.array(Image.open(io.BytesIO(base64.b64decode(good["heatmap_png"]))))
    view = np.array(Image.open(io.BytesIO(base64.b64decode(good["input_png"]))))
    size = model.config.size
    assert heat.shape == (size, size, 3) and view.shape == (size, size)
    assert heat.std() > 0 and "heatmap_png" not in bad


def test_ood_fields_and_score_errors_pass_through(model, files):
    def gated(images):
        s = model.score(images)
        n = len(images)
        return Scores(s.uncalibrated, s.calibrated, errors=["non-finite output"] * n, ood_score=np.full(n, 7.5),
                      out_of_distribution=np.ones(n, bool))  # fmt: skip

    gate_model = type("Gated", (), {})()
    gate_model.__dict__.update(model.__dict__)
    for name in ("stack", "decide", "decide_gated", "engine"):
        setattr(gate_model, name, getattr(model, name))
    gate_model.score = gated
    with TestClient(create_app(gate_model)) as c:
        r = c.post("/v1/screen", files=upload(("x.png", files["a.png"])))
    (result,) = r.json()["results"]
    assert r.status_code == 422
    assert result["out_of_distribution"] is True and result["ood_score"] == 7.5
    assert result["error"] == "non-finite output" and result["decision"] is None


def test_model_card_shows_metrics_only_of_the_same_checkpoint(model, checkpoint):
    sha = load_checkpoint(checkpoint).file_sha256()
    metrics = {"model": {"checkpoint_sha256": sha}, "roc_auc": 0.91, "roc_auc_ci95": [0.88, 0.94],
               "sensitivity": {"value": 0.8, "ci95": [0.7, 0.9]}, "specificity": {"value": 0.9, "ci95": [0.85, 0.95]}}  # fmt: skip
    card = TestClient(create_app(model, checkpoint_sha256=sha, metrics=metrics)).get("/v1/model").json()
    assert card["network"] == "alexnet" and card["variant"] == model.meta["variant"]
    assert card["threshold"]["rule"] == model.meta["threshold"]["rule"] and card["calibration"] == PLATT
    assert card["test_metrics"]["roc_auc_ci95"] == [0.88, 0.94] and card["test_metrics"]["sensitivity"]["ci95"] == [0.7, 0.9]
    other = dict(metrics, model={"checkpoint_sha256": "f" * 64})
    card = TestClient(create_app(model, checkpoint_sha256=sha, metrics=other)).get("/v1/model").json()
    assert card["test_metrics"] is None and "not this one" in card["note"]


def test_healthz_page_and_docs_are_served_without_a_cdn(client):
    assert client.get("/healthz").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace("http-equiv", "")  # no external asset
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    docs = client.get("/docs").text
    assert "/swagger-ui/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert client.get("/swagger-ui/swagger-ui-bundle.js").status_code == 200
    assert "/v1/screen" in client.get("/openapi.json").json()["paths"]


def test_token_is_required_and_accepted(tmp_path, model, files):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    c = TestClient(create_app(model, token=read_token(token_file)))
    assert c.get("/v1/model").status_code == 401
    wrong = c.post("/v1/screen", files=upload(("a.png", files["a.png"])), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "token" in wrong.json()["error"]
    ok = c.post("/v1/screen", files=upload(("a.png", files["a.png"])), headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["results"][0]["probability"] is not None
    assert c.get("/healthz").status_code == 200  # liveness stays open for load balancers
    (tmp_path / "short").write_text("abc")
    with pytest.raises(CxrError, match="at least"):
        read_token(tmp_path / "short")


def test_non_loopback_host_is_refused_without_a_token_file(tmp_path):
    assert check_exposure("127.0.0.1", None, False) is None and check_exposure("::1", None, False) is None
    with pytest.raises(CxrError, match="--token-file"):
        check_exposure("0.0.0.0", None, False)
    assert check_exposure("0.0.0.0", None, True) is None
    result = CliRunner().invoke(cli_app, ["serve", "--host", "0.0.0.0", "--model", str(tmp_path / "none.pt")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--token-file" in lines[0]


def test_hostile_uploads_each_get_a_4xx_with_a_reason_and_the_server_stays_healthy(client, files):
    header = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (60000).to_bytes(4, "big") * 2 + b"\x08\x00\x00\x00\x00"
    wrong_syntax = dicom_bytes(chest(np.random.default_rng(1), hi=4095).astype(np.uint16),
                               syntax=UID("1.2.840.10008.1.2.4.100"))  # MPEG2: not an image codec we decode  # fmt: skip
    bad_jpeg = dicom_bytes(np.zeros((64, 64), np.uint16), syntax=JPEGBaseline8Bit)  # junk codestream
    hostile = {"empty.png": b"", "text.png": b"hello, I am text", "huge.png": header,
               "truncated.jpg": files["b.jpg"][:200], "wrong-syntax.dcm": wrong_syntax, "junk.dcm": bad_jpeg}  # fmt: skip
    for name, data in hostile.items():
        r = client.post("/v1/screen", files=upload((name, data)))
        assert r.status_code == 422, (name, r.text)
        assert r.json()["results"][0]["error"], name
    many = client.post("/v1/screen", files=upload(*[(f"{i}.png", b"x") for i in range(1000)]))
    assert many.status_code == 413 and "too many files" in many.json()["error"]
    assert client.post("/v1/screen", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.post("/v1/screen", files=upload(("a.png", files["a.png"]))).status_code == 200


def test_no_dicom_tag_or_client_path_is_echoed(client, caplog):
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(dicom_bytes(chest(np.random.default_rng(2), hi=4095).astype(np.uint16))))
    ds.PatientName, ds.PatientID = "DOE^JANE", "MRN-99887766"
    buf = io.BytesIO()
    ds.save_as(buf)
    r = client.post("/v1/screen", files=upload(("C:\\PACS\\DOE_JANE\\img.dcm", buf.getvalue())))
    assert r.status_code == 200
    assert r.json()["results"][0]["filename"] == "img.dcm"
    assert "DOE" not in r.text and "99887766" not in r.text and "DOE" not in caplog.text
    assert safe_filename("../../etc/passwd\x00", 0) == "passwd" and safe_filename("", 3) == "upload-4"


def test_a_full_queue_answers_503_with_retry_after(model, files):
    c = TestClient(create_app(model, limits=ServeLimits(queue_images=1)))
    r = c.post("/v1/screen", files=upload(("a.png", files["a.png"]), ("b.jpg", files["b.jpg"])))
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["error"]


def test_oversized_files_are_refused_while_read(model, files):
    c = TestClient(create_app(model, limits=ServeLimits(max_file_bytes=1000, max_request_bytes=4000)))
    r = TestClient(create_app(model, limits=ServeLimits(max_file_bytes=1000))).post(
        "/v1/screen", files=upload(("a.png", files["a.png"])))
    assert r.status_code == 413 and r.json()["error"] == "file 'a.png' is over the bound of 1000 bytes"
    r = c.post("/v1/screen", files=upload(*[(f"{i}.png", b"x" * 900) for i in range(5)]))
    assert r.status_code == 413 and "request" in r.json()["error"]


class LiveServer:
    """The app under a real uvicorn on an ephemeral loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", limit_concurrency=64))  # fmt: skip
        sock.close()
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def raw_post(port: int, headers: str, chunks, limit_s: float = 30) -> bytes:
    """Send a request head, then whole body chunks until the server answers (or closes); its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as sock:
        sock.sendall(headers.encode())
        # A server that refuses on the head alone answers before any body byte is sent, so its close
        # cannot reset the connection over unread body bytes (which would drop the answer).
        if select.select([sock], [], [], 1.0)[0]:
            return read_answer(sock)
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:  # an answer is waiting: stop sending
                break
            try:
                sock.sendall(chunk)
            except OSError:  # the server answered and closed while we sent
                break
        return read_answer(sock)


def read_answer(sock: socket.socket) -> bytes:
    """The whole answer: its head, then Content-Length bytes of body (one recv may hold only the head)."""
    answer = b""
    try:
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                return answer
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body
    except OSError:
        return answer


@pytest.mark.slow
def test_live_server_under_concurrent_clients_and_a_2gb_body(model, files):
    with LiveServer(create_app(model, limits=ServeLimits(max_request_bytes=32 * 2**20))) as live:
        with httpx.Client(base_url=live.url) as c:
            solo = c.post("/v1/screen", files=upload(("a.png", files["a.png"]))).json()["results"][0]["probability"]

        def one_client(i: int) -> list[float]:
            with httpx.Client(base_url=live.url, timeout=60) as c:
                return [c.post("/v1/screen", files=upload(("a.png", files["a.png"]))).json()["results"][0]["probability"]
                        for _ in range(4)]  # fmt: skip

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            probs = [p for ps in pool.map(one_client, range(8)) for p in ps]
        assert len(probs) == 32 and max(abs(p - solo) for p in probs) <= 1e-6  # batched with others: same answer

        two_gb = 2 * 2**30
        head = (f"POST /v1/screen HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                f"Content-Length: {two_gb}\r\n\r\n")  # fmt: skip
        declared = raw_post(live.port, head, (b"\0" * 2**20 for _ in range(2048)))
        assert declared.startswith(b"HTTP/1.1 413") and b"over the bound" in declared
        head = ("POST /v1/screen HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                "Transfer-Encoding: chunked\r\n\r\n")
        part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'
        chunk = b"%x\r\n" % 2**20 + b"\0" * 2**20 + b"\r\n"
        body = itertools.chain([b"%x\r\n" % len(part) + part + b"\r\n"], (chunk for _ in range(2048)))
        counted = raw_post(live.port, head, body)  # 2 GiB if it were all read: refused once 32 MiB are counted
        assert counted.startswith(b"HTTP/1.1 413") and b"request is over the bound of 32 MiB" in counted
        with httpx.Client(base_url=live.url) as c:
            assert c.get("/healthz").json()["status"] == "ok"


@pytest.mark.slow
def test_page_in_headless_chromium_screens_an_image(model, files, tmp_path):
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    flags = {"ood": False}

    def score(images):
        s = model.score(images)
        n = len(images)
        return dataclasses.replace(s, ood_score=np.full(n, 42.0), out_of_distribution=np.full(n, flags["ood"]))

    shown = type("Shown", (), {})()
    shown.__dict__.update(model.__dict__)
    for name in ("stack", "decide", "decide_gated", "engine"):
        setattr(shown, name, getattr(model, name))
    shown.score = score
    (tmp_path / "chest.png").write_bytes(files["a.png"])
    with LiveServer(create_app(shown)) as live, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
            viewport={"width": 1100, "height": 900})  # fmt: skip
        try:
            page = browser.new_page()
            page.goto(live.url + "/")
            page.wait_for_selector("#card dt")
            assert "alexnet" in page.inner_text("#card")
            page.set_input_files("#files", str(tmp_path / "chest.png"))
            page.wait_for_selector(".result .prob", timeout=60000)
            assert "P(COVID-19) = 0." in page.inner_text(".result .prob")
            heat = page.locator(".result img").first
            assert heat.get_attribute("src").startswith("data:image/png;base64,")
            assert heat.evaluate("img => img.naturalWidth") == model.config.size
            assert page.locator(".ood").count() == 0
            shot = Path(os.environ.get("CXR_SERVE_SCREENSHOT", tmp_path / "serve.png"))
            page.screenshot(path=str(shot), full_page=True)
            flags["ood"] = True
            page.set_input_files("#files", str(tmp_path / "chest.png"))
            page.wait_for_selector(".ood", timeout=60000)
            assert "Out of distribution" in page.inner_text(".ood")
            with page.expect_download() as download:
                page.click("#csv")
            lines = Path(download.value.path()).read_text().splitlines()
            assert lines[0].startswith("path,p_covid_calibrated_at_val_prevalence,decision") and len(lines) == 3
        finally:
            browser.close()


@pytest.mark.slow
def test_the_gate_s_verdict_and_score_agree_in_predict_s_csv_the_api_and_the_server(tmp_path, checkpoint, files):
    """One gated model, one set of files: `predict`'s two columns, the Python API's fields and the server's JSON
    carry the same verdict and score; a flagged image keeps its probability but gets no decision."""
    from train.screen.api import Screener
    from train.screen.inputs import load_image
    from tests.test_ood import gate_checkpoint

    gated = tmp_path / "gated.pt"
    shutil.copyfile(checkpoint, gated)
    readable = [n for n in files if n not in ("corrupt.png", "notes.png")]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    model = ScreeningModel.open(gated, None, False, torch.device("cpu"), "eager")
    images = np.stack([load_image(tmp_path / n, model.config) for n in readable])
    rng = np.random.default_rng(9)
    fit = np.concatenate([images, rng.integers(0, 256, (5, *images.shape[1:]), dtype=np.uint8)])
    gate_checkpoint(gated, fit)
    scores = ScreeningModel.open(gated, None, False, torch.device("cpu"), "eager").score(images).ood_score
    ckpt = load_checkpoint(gated)
    # a threshold between the scores: some of these files pass, some are flagged
    middle = float(np.sort(scores)[len(scores) // 2 - 1] + np.sort(scores)[len(scores) // 2]) / 2
    save_checkpoint(gated, dict(ckpt.meta, ood=dict(ckpt.meta["ood"], threshold=middle)), ckpt.state_dict)

    summary = predict([str(tmp_path / n) for n in files], checkpoint=gated, out_csv=tmp_path / "p.csv",
                      batch_size=4, workers=1, device=torch.device("cpu"), engine="eager", progress=False)  # fmt: skip
    import csv

    with open(tmp_path / "p.csv", newline="") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    flagged = {n for n in readable if rows[n]["out_of_distribution"] == "true"}
    assert 0 < len(flagged) < len(readable) and summary.out_of_distribution == len(flagged)
    assert summary.positive + summary.negative + summary.out_of_distribution + summary.failed == len(files)
    api = {Path(r.path).name: r for r in Screener(gated, device="cpu", engine="eager").predict(
        [str(tmp_path / n) for n in files], batch_size=4)}  # fmt: skip
    with TestClient(create_app(ScreeningModel.open(gated, None, False, torch.device("cpu"), "eager"))) as client:
        response = client.post("/v1/screen", files=upload(*files.items()))
    served = {r["filename"]: r for r in response.json()["results"]}
    for name, score in zip(readable, scores):
        row = rows[name]
        assert float(row["ood_score"]) == pytest.approx(score, rel=1e-6)
        assert (name in flagged) == (score > middle)
        assert row["p_covid_calibrated_at_val_prevalence"] != ""  # still scored
        assert row["decision"] == ("" if name in flagged else ("positive" if float(
            row["p_covid_calibrated_at_val_prevalence"]) >= float(row["threshold"]) else "negative"))  # fmt: skip
        for got in (served[name], {"out_of_distribution": api[name].out_of_distribution,
                                   "ood_score": api[name].ood_score, "decision": api[name].decision}):  # fmt: skip
            assert got["out_of_distribution"] is (name in flagged)
            assert got["ood_score"] == pytest.approx(score, rel=1e-6)
            assert got["decision"] == (row["decision"] or None)
    for name in ("corrupt.png", "notes.png"):  # unreadable: no verdict at all, never a fake false
        assert rows[name]["out_of_distribution"] == rows[name]["ood_score"] == ""
        assert served[name]["out_of_distribution"] is None and api[name].out_of_distribution is None
