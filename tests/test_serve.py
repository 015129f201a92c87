"""serve/: the HTTP API (FastAPI TestClient) and the page in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lesionlab import data as data_mod
from lesionlab.data import CLASSES
from models.predict import predict_images
from serve.app import create_app
from tests.conftest import FIXTURE, ROOT, run_module


@pytest.fixture
def models_dir(trained_models) -> dict[str, Path]:
    """A head with metadata and a tiny fine-tuned network, both trained on the fixture."""
    return {"head": trained_models["head_meta"], "finetune": trained_models["finetune"]}


@pytest.fixture
def image() -> Path:
    return sorted((FIXTURE / "images").glob("*.jpg"))[3]


def _post(client: TestClient, data: bytes, name: str = "x.jpg", query: str = "",
          **form) -> object:
    return client.post("/api/predict" + query, files={"image": (name, data, "image/jpeg")},
                       data={k: str(v) for k, v in form.items()})


def test_head_api_schema_and_metadata(models_dir, image: Path) -> None:
    client = TestClient(create_app(models_dir["head"]))
    assert client.get("/healthz").json()["status"] == "ok"
    info = client.get("/api/model").json()
    assert info["uses_metadata"] is True and info["has_gradcam"] is False
    assert list(info["classes"]) == list(CLASSES) and "not a medical device" in info["disclaimer"]
    res = _post(client, image.read_bytes(), image.name, age=55, sex="male", localization="back")
    assert res.status_code == 200, res.text
    out = res.json()
    assert set(out) == {"path", "prediction", "name", "probabilities",
        "prevalence_probabilities", "decisions"}
    assert abs(sum(out["probabilities"].values()) - 1) < 1e-4
    meta = __import__("pandas").DataFrame({"age": [55.0], "sex": ["male"],
                                           "localization": ["back"]})
    cli = predict_images(models_dir["head"], [str(image)], meta)[0]
    np.testing.assert_allclose(list(out["probabilities"].values()),
                               list(cli["probabilities"].values()), atol=1e-6)
    assert out["prediction"] == cli["prediction"]
    page = client.get("/")
    assert page.status_code == 200 and 'type="file"' in page.text
    assert client.get("/static/app.js").status_code == 200
    assert "/api/predict" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("which", ["finetune", "shipped"])
def test_finetuned_api_gradcam(models_dir, image: Path, which: str) -> None:
    """A network folder explains itself; an export (the shipped model, which the page asks for
    Grad-CAM on every upload) explains its torch copy, loaded on first use."""
    from models.shipped import SHIPPED_MODEL

    client = TestClient(create_app(SHIPPED_MODEL if which == "shipped" else models_dir[which]))
    info = client.get("/api/model").json()
    assert info["has_gradcam"] is True and info["kind"] == "finetune"
    assert info["folder_kind"] == ("onnx" if which == "shipped" else "finetune")
    res = _post(client, image.read_bytes(), image.name, "?gradcam=true")
    assert res.status_code == 200, res.text
    out = res.json()
    assert out["prediction"] in CLASSES
    png = base64.b64decode(out["gradcam_png"].split(",", 1)[1])
    with Image.open(io.BytesIO(png)) as overlay:
        assert overlay.format == "PNG" and overlay.size == Image.open(image).size


def test_grey_and_palette_uploads_say_so_in_the_response(models_dir, image: Path) -> None:
    client = TestClient(create_app(models_dir["finetune"]))
    colour = _post(client, image.read_bytes(), image.name).json()
    assert "warnings" not in colour
    for mode, word in (("L", "grey image 'mole.png'"), ("P", "palette image 'mole.png'")):
        buf = io.BytesIO()
        Image.open(image).convert(mode).save(buf, format="PNG")
        out = _post(client, buf.getvalue(), "mole.png").json()
        assert len(out["warnings"]) == 1 and out["warnings"][0].startswith(word), out
        assert ".upload" not in out["warnings"][0]  # the upload's name, not the temp file's


def test_logged_warnings_name_the_upload_not_its_temp_file(models_dir, image: Path,
                                                            caplog) -> None:
    from lesionlab.errors import flush_warnings

    flush_warnings()  # counted warnings are logged the first time their key is seen
    client = TestClient(create_app(models_dir["finetune"]))
    buf = io.BytesIO()
    Image.open(image).convert("RGB").resize((450, 100)).save(buf, format="PNG")
    with caplog.at_level(logging.WARNING, logger="lesionlab"):
        assert _post(client, buf.getvalue(), "wide.png").status_code == 200
    logged = [r.getMessage() for r in caplog.records if "centre-cropped" in r.getMessage()]
    assert len(logged) == 1 and logged[0].startswith("warning: 'wide.png': 450x100 pixels")
    assert ".upload" not in logged[0] and "/tmp" not in logged[0]
    # the response says so on every request, also once the log only counts it
    for name in ("wide.png", "wide2.png"):
        out = _post(client, buf.getvalue(), name).json()
        assert [w for w in out["warnings"] if "centre-cropped" in w] == [
            f"'{name}': 450x100 pixels, aspect 4.5 vs the model's 1.33 (over 1.5x apart): "
            f"centre-cropped to 133x100 (images are cropped, never stretched)"], out


def test_bad_inputs_get_4xx_and_the_server_keeps_serving(models_dir, image: Path,
                                                          monkeypatch) -> None:
    client = TestClient(create_app(models_dir["head"], max_mb=0.05))
    good = image.read_bytes()
    cases = [
        (_post(client, b"this is a text file", "notes.txt"), 400, "notes.txt"),
        (_post(client, b"", "empty.jpg"), 400, "empty file"),
        (_post(client, good[: len(good) // 2], "half.jpg"), 400, "half.jpg"),
        (_post(client, good + b"\0" * 60_000, "huge.jpg"), 413, "size limit"),
        (_post(client, good, sex="other"), 422, "unknown sex"),
        (_post(client, good, localization="elbow"), 422, "unknown localization"),
        (_post(client, good, age=300), 422, "age must be between"),
    ]
    monkeypatch.setattr(data_mod, "MAX_IMAGE_PIXELS", 1000)
    cases.append((_post(client, good, "bomb.jpg"), 400, "image too large"))
    monkeypatch.undo()
    for res, status, text in cases:
        assert res.status_code == status, (status, res.text)
        assert text in res.json()["detail"], res.json()
        assert "''" not in res.json()["detail"], res.json()  # the upload's name quoted once
    assert _post(client, good, image.name).status_code == 200  # still serving
    assert client.post("/api/predict").status_code == 422  # no file at all


def test_missing_model_folder_is_one_line(tmp_path: Path, capsys) -> None:
    proc = run_module(capsys, "serve", "--model", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: model folder not found or not a lesionlab model: {tmp_path / 'nope'}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser() -> str | None:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture
def server(models_dir):
    """``python -m serve`` on a free loopback port, stopped after the test."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model",
                             str(models_dir["finetune"]), "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(proc.stderr.read().decode()[-500:])
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_page_in_a_real_browser(server: str, models_dir, image: Path, tmp_path: Path) -> None:
    browser_path = _browser()
    if browser_path is None:
        pytest.skip("no Chromium installed (apt-get install chromium-headless-shell)")
    pw = pytest.importorskip("playwright.sync_api")
    want = predict_images(models_dir["finetune"], [str(image)])[0]["prediction"]
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image at all")
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path,
                                    args=["--no-sandbox"] if os.geteuid() == 0 else [])
        page = browser.new_page(viewport={"width": 1000, "height": 1100})
        page.goto(server)
        page.wait_for_function("document.getElementById('model-name').textContent"
                               ".startsWith('Model:')")
        assert "not a medical device" in page.text_content("#disclaimer")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#bars .bar >> nth=6")
        assert page.locator("#bars .bar").count() == 7
        assert page.text_content("#top-class").startswith(want + " (")
        page.wait_for_function("() => { const i = document.getElementById('overlay');"
                               " return i.complete && i.naturalWidth > 0; }")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        page.set_input_files("#file", str(not_image))
        page.wait_for_selector("#error:not([hidden])")
        assert "Error 400" in page.text_content("#error")
        assert "notes.jpg" in page.text_content("#error")
        browser.close()
    assert (tmp_path / "page.png").stat().st_size > 10_000
