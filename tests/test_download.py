"""Download against a local HTTP server (127.0.0.1) with Range support and fake small zips.

The fixture is a 200x150 copy of 87 images with its own CSV, so the mirror built from it is
checked against :func:`_fixture_release` (its counts, its CSV's sha256, 200x150); the official
expectations (10,015 images, the official CSV, 600x450) must refuse it.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from lesionlab.data import METADATA_FILE, load_dataset
from lesionlab.download import (
    ACCEPTED_IMAGE_SIZES, OFFICIAL_METADATA_SHA256, OFFICIAL_RELEASE, Release, download_ham10000,
    fetch, parse_size, release_counts, verify_release)
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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fixture_release(fixture_dir: Path) -> Release:
    """What the fixture mirror really is: its counts, its CSV, 200x150 images."""
    return Release(counts=_fixture_counts(fixture_dir),
                   metadata_sha256=_sha256(fixture_dir / METADATA_FILE), image_size=(200, 150))


def _jpeg(size: tuple[int, int], mode: str = "L", colour: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "JPEG")
    return buf.getvalue()


def _rewrite_zips(root: Path, image: bytes) -> list[str]:
    """Replace every image in the served zips by ``image``; return the image ids, sorted."""
    ids = []
    for part in sorted(root.glob("*.zip")):
        with zipfile.ZipFile(part) as zf:
            names = zf.namelist()
        with zipfile.ZipFile(part, "w") as zf:
            for n in names:
                zf.writestr(n, image)
        ids += [Path(n).stem for n in names]
    return sorted(ids)


def test_download_unzip_validate(server, tmp_path: Path, fixture_dir: Path) -> None:
    url, _ = server
    release = _fixture_release(fixture_dir)
    ds = download_ham10000(tmp_path / "data", base_url=url, http_timeout=10, release=release)
    assert len(ds) == 87
    assert (tmp_path / "data" / "HAM10000_images_part_2").is_dir()
    # second call downloads nothing
    n = len(RangeHandler.requests_seen)
    download_ham10000(tmp_path / "data", base_url=url, http_timeout=10, release=release)
    assert len(RangeHandler.requests_seen) == n


def test_release_counts_are_checked(server, tmp_path: Path, fixture_dir: Path) -> None:
    """A valid download of the wrong release is refused: the official counts do not match."""
    url, _ = server
    release = Release(metadata_sha256=None, image_size=(200, 150))  # official counts
    with pytest.raises(LesionLabError, match="does not match the published release") as err:
        download_ham10000(tmp_path / "data", base_url=url, http_timeout=10, release=release)
    assert "'images': (87, 10015)" in str(err.value)


def test_zip_with_other_images_is_refused(server, tmp_path: Path, fixture_dir: Path) -> None:
    """Images that the metadata does not list mean zips and CSV from different releases."""
    url, root = server
    with zipfile.ZipFile(root / "HAM10000_images_part_1.zip", "a") as zf:
        zf.writestr("ISIC_9999999.jpg", (fixture_dir / "images").glob("*.jpg").__next__()
                    .read_bytes())
    with pytest.raises(LesionLabError, match="1 image.* not in HAM10000_metadata.csv"):
        download_ham10000(tmp_path / "d", base_url=url, http_timeout=10,
                          release=_fixture_release(fixture_dir))


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
                          release=_fixture_release(fixture_dir))


def test_resume_partial_download(server, tmp_path: Path) -> None:
    url, root = server
    name = "HAM10000_images_part_1.zip"
    full = (root / name).read_bytes()
    dest = tmp_path / name
    dest.with_name(name + ".part").write_bytes(full[:1000])
    fetch(url + name, dest, timeout=10)
    assert dest.read_bytes() == full
    assert any(r == f"{name} bytes=1000-" for r in RangeHandler.requests_seen)


def test_bad_zip_and_unreachable(server, tmp_path: Path, fixture_dir: Path) -> None:
    url, root = server
    (root / "HAM10000_images_part_1.zip").write_bytes(b"not a zip")
    with pytest.raises(LesionLabError, match="not a valid zip"):
        download_ham10000(tmp_path / "d", base_url=url, http_timeout=10,
                          release=_fixture_release(fixture_dir))
    with pytest.raises(LesionLabError, match="failed"):
        fetch(url + "nothing_here.zip", tmp_path / "x.zip", timeout=5)


# --- integrity (issue 19): placeholders, an edited CSV, sizes -------------------------------

def test_placeholder_image_mirror_is_refused(server, tmp_path: Path, fixture_dir: Path) -> None:
    """The right CSV with 8x8 grey JPEGs in place of the photographs is never a success."""
    url, root = server
    ids = _rewrite_zips(root, _jpeg((8, 8)))
    with pytest.raises(LesionLabError) as err:
        download_ham10000(tmp_path / "d", base_url=url, http_timeout=10,
                          release=_fixture_release(fixture_dir))
    msg = str(err.value)
    assert "87 of 87 image(s) below" in msg and "are not 200x150" in msg
    assert "(found 8x8: 87)" in msg and str(ids[:5]) in msg and "\n" not in msg


def test_placeholder_mirror_of_the_full_release_is_refused(server, tmp_path: Path,
                                                           full_dir: Path) -> None:
    """Issue 19 as reported: the official CSV and 10,015 placeholders, default expectations."""
    url, root = server
    shutil.copyfile(full_dir / METADATA_FILE, root / METADATA_FILE)
    ids = sorted(load_dataset(full_dir).frame["image_id"])
    placeholder = _jpeg((8, 8))
    for part, subset in ((1, ids[:5000]), (2, ids[5000:])):
        with zipfile.ZipFile(root / f"HAM10000_images_part_{part}.zip", "w") as zf:
            for image_id in subset:
                zf.writestr(image_id + ".jpg", placeholder)
    with pytest.raises(LesionLabError, match=r"10015 of 10015 image\(s\) .* are not 600x450, "
                                             r".*\(found 8x8: 10015\)") as err:
        download_ham10000(tmp_path / "d", base_url=url, http_timeout=10)
    assert str(ids[:5]) in str(err.value)


def test_blank_or_grey_images_at_the_right_size_are_refused(data_copy: Path,
                                                           fixture_dir: Path) -> None:
    """Placeholders of the documented size: flat colour, or not RGB, still fail."""
    release = _fixture_release(fixture_dir)
    paths = sorted((data_copy / "images").glob("*.jpg"))
    for p in paths[:3]:
        p.write_bytes(_jpeg((200, 150), "RGB", 90))
    with pytest.raises(LesionLabError, match=r"3 of 87 image\(s\) .* are blank") as err:
        verify_release(data_copy, release)
    assert str([p.stem for p in paths[:3]]) in str(err.value)
    for p in paths[:3]:
        Image.open(fixture_dir / "images" / p.name).convert("L").save(p, "JPEG")
    with pytest.raises(LesionLabError, match=r"3 of 87 .* not 8-bit RGB \(mode L\)"):
        verify_release(data_copy, release)


def test_truncated_image_is_refused(data_copy: Path, fixture_dir: Path) -> None:
    """The fast (draft-mode) decode still reads every byte: a cut file fails."""
    path = sorted((data_copy / "images").glob("*.jpg"))[10]
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(LesionLabError,
                       match=rf"1 of 87 corrupt or unreadable image.*{path.name} .*truncated"):
        verify_release(data_copy, _fixture_release(fixture_dir))


def test_csv_with_one_changed_byte_is_refused(server, tmp_path: Path, fixture_dir: Path) -> None:
    """An edited CSV fails on its sha256, before any zip is fetched, and is not kept."""
    url, root = server
    csv = root / METADATA_FILE
    data = bytearray(csv.read_bytes())
    at = data.index(b"80.0")
    data[at + 1] = ord("5")  # an age 80 -> 85: still a valid CSV with the same counts
    csv.write_bytes(bytes(data))
    got = hashlib.sha256(bytes(data)).hexdigest()
    release = _fixture_release(fixture_dir)
    with pytest.raises(LesionLabError, match=f"not the official {METADATA_FILE}: sha256 {got}, "
                                             f"expected {release.metadata_sha256}"):
        download_ham10000(tmp_path / "d", base_url=url, http_timeout=10, release=release)
    assert not any(r.startswith("HAM10000_images") for r in RangeHandler.requests_seen)
    assert not list((tmp_path / "d").glob("HAM10000_metadata.csv*"))
    # the same check on a folder already there
    copy = tmp_path / "copy"
    shutil.copytree(fixture_dir, copy)
    (copy / METADATA_FILE).write_bytes(bytes(data))
    with pytest.raises(LesionLabError, match=f"sha256 {got}"):
        verify_release(copy, release)


def test_real_fixture_passes_and_official_csv_constant(fixture_dir: Path, tmp_path: Path,
                                                       full_dir: Path) -> None:
    """The untouched fixture verifies; the recorded sha256 is the official CSV's."""
    ds = verify_release(fixture_dir, _fixture_release(fixture_dir))
    assert len(ds) == 87 and ds.frame["lesion_id"].nunique() == _fixture_counts(
        fixture_dir)["lesions"]
    assert _sha256(full_dir / METADATA_FILE) == OFFICIAL_METADATA_SHA256


def test_sizes_accepted_as_documented(data_copy: Path, fixture_dir: Path) -> None:
    """600x450 (the official zips, the download's default) and 200x150 only, all 4:3."""
    assert OFFICIAL_RELEASE.image_size == (600, 450)
    assert ACCEPTED_IMAGE_SIZES == ((600, 450), (200, 150))
    assert all(w * 3 == h * 4 for w, h in ACCEPTED_IMAGE_SIZES)
    assert parse_size("200x150") == (200, 150) and parse_size("600X450") == (600, 450)
    for bad in ((8, 8), (800, 600), (150, 200)):
        with pytest.raises(LesionLabError, match="not a documented HAM10000 size"):
            Release(image_size=bad)
    with pytest.raises(LesionLabError, match="not WIDTHxHEIGHT"):
        parse_size("large")
    # the 200x150 fixture under the official size: refused, with the way to check a copy
    with pytest.raises(LesionLabError, match=r"87 of 87 .* not 600x450.*found 200x150: 87.*"
                                             r"check it with --image-size 200x150"):
        verify_release(data_copy, Release(counts=None, metadata_sha256=None))
    # one resized image among 200x150 ones: counted, no hint to accept it
    path = sorted((data_copy / "images").glob("*.jpg"))[0]
    Image.open(path).resize((600, 450)).save(path, "JPEG")
    with pytest.raises(LesionLabError, match=rf"1 of 87 .* not 200x150, .*found 600x450: 1\), "
                                             rf"e.g. \['{path.stem}'\].*download again"):
        verify_release(data_copy, _fixture_release(fixture_dir))


def test_cli_check_only(capsys, tmp_path: Path, full_dir: Path) -> None:
    """--check-only verifies a folder in place and downloads nothing."""
    from lesionlab.download import main

    with pytest.raises(SystemExit) as exc:
        main(["--data", str(tmp_path), "--check-only", "--image-size", "8x8"])
    assert exc.value.code == 2 and "invalid choice: '8x8'" in capsys.readouterr().err
    with pytest.raises(LesionLabError, match="not the official"):
        main(["--data", str(Path(__file__).parent / "fixtures" / "ham_small"), "--check-only",
              "--image-size", "200x150"])
