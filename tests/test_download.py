"""Download against a local HTTP server (127.0.0.1) with Range support and fake small zips."""

from __future__ import annotations

import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from lesionlab.download import download_ham10000, fetch
from lesionlab.errors import LesionLabError


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HEAD, Content-Length and single-range GET support."""

    log_message = lambda *a, **k: None  # noqa: E731 - keep test output clean
    requests_seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        RangeHandler.requests_seen.append(f"{path.name} {rng}")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path: Path, fixture_dir: Path):
    """Serve fake HAM10000 zips + metadata built from the fixture."""
    root = tmp_path / "srv"
    root.mkdir()
    images = sorted((fixture_dir / "images").glob("*.jpg"))
    for part, subset in ((1, images[::2]), (2, images[1::2])):
        with zipfile.ZipFile(root / f"HAM10000_images_part_{part}.zip", "w") as zf:
            for img in subset:
                zf.write(img, img.name)
    (root / "HAM10000_metadata.csv").write_bytes(
        (fixture_dir / "HAM10000_metadata.csv").read_bytes())
    handler = lambda *a, **k: RangeHandler(*a, directory=str(root), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.requests_seen = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    httpd.shutdown()


def test_download_unzip_validate(server, tmp_path: Path) -> None:
    url, _ = server
    ds = download_ham10000(tmp_path / "data", base_url=url, timeout=10)
    assert len(ds) == 87
    assert (tmp_path / "data" / "HAM10000_images_part_2").is_dir()
    # second call downloads nothing
    n = len(RangeHandler.requests_seen)
    download_ham10000(tmp_path / "data", base_url=url, timeout=10)
    assert len(RangeHandler.requests_seen) == n


def test_resume_partial_download(server, tmp_path: Path) -> None:
    url, root = server
    name = "HAM10000_images_part_1.zip"
    full = (root / name).read_bytes()
    dest = tmp_path / name
    dest.with_name(name + ".part").write_bytes(full[:1000])
    fetch(url + name, dest, timeout=10)
    assert dest.read_bytes() == full
    assert any(r == f"{name} bytes=1000-" for r in RangeHandler.requests_seen)


def test_bad_zip_and_unreachable(server, tmp_path: Path) -> None:
    url, root = server
    (root / "HAM10000_images_part_1.zip").write_bytes(b"not a zip")
    with pytest.raises(LesionLabError, match="not a valid zip"):
        download_ham10000(tmp_path / "d", base_url=url, timeout=10)
    with pytest.raises(LesionLabError, match="failed"):
        fetch(url + "nothing_here.zip", tmp_path / "x.zip", timeout=5)
