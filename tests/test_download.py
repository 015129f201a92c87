"""Download against a local HTTP server (127.0.0.1) with Range support and fake small zips."""

from __future__ import annotations

import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from lesionlab.data import load_dataset
from lesionlab.download import download_ham10000, fetch, release_counts
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


def _fixture_counts(fixture_dir: Path) -> dict[str, int]:
    return release_counts(load_dataset(fixture_dir))


def test_download_unzip_validate(server, tmp_path: Path, fixture_dir: Path) -> None:
    url, _ = server
    expected = _fixture_counts(fixture_dir)
    ds = download_ham10000(tmp_path / "data", base_url=url, http_timeout=10, expected=expected)
    assert len(ds) == 87
    assert (tmp_path / "data" / "HAM10000_images_part_2").is_dir()
    # second call downloads nothing
    n = len(RangeHandler.requests_seen)
    download_ham10000(tmp_path / "data", base_url=url, http_timeout=10, expected=expected)
    assert len(RangeHandler.requests_seen) == n


def test_release_counts_are_checked(server, tmp_path: Path) -> None:
    """A valid download of the wrong release is refused: the official counts do not match."""
    url, _ = server
    with pytest.raises(LesionLabError, match="does not match the published release") as err:
        download_ham10000(tmp_path / "data", base_url=url, http_timeout=10)
    assert "'images': (87, 10015)" in str(err.value)


def test_zip_with_other_images_is_refused(server, tmp_path: Path, fixture_dir: Path) -> None:
    """Images that the metadata does not list mean zips and CSV from different releases."""
    url, root = server
    with zipfile.ZipFile(root / "HAM10000_images_part_1.zip", "a") as zf:
        zf.writestr("ISIC_9999999.jpg", (fixture_dir / "images").glob("*.jpg").__next__()
                    .read_bytes())
    with pytest.raises(LesionLabError, match="1 image.* not in HAM10000_metadata.csv"):
        download_ham10000(tmp_path / "d", base_url=url, http_timeout=10,
                          expected=_fixture_counts(fixture_dir))


def test_undecodable_image_in_zip_is_refused(server, tmp_path: Path,
                                             fixture_dir: Path) -> None:
    url, root = server
    part = root / "HAM10000_images_part_2.zip"
    with zipfile.ZipFile(part) as zf:
        first = zf.namelist()[0]
        items = {n: zf.read(n) for n in zf.namelist()}
    items[first] = b"\xff\xd8 not an image"
    with zipfile.ZipFile(part, "w") as zf:
        for n, data in items.items():
            zf.writestr(n, data)
    with pytest.raises(LesionLabError, match=f"corrupt or unreadable image.*{first}"):
        download_ham10000(tmp_path / "d", base_url=url, http_timeout=10,
                          expected=_fixture_counts(fixture_dir))


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
        download_ham10000(tmp_path / "d", base_url=url, http_timeout=10)
    with pytest.raises(LesionLabError, match="failed"):
        fetch(url + "nothing_here.zip", tmp_path / "x.zip", timeout=5)
