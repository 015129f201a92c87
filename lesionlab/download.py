"""Fetch the official HAM10000 files: resumable, size-checked, unzipped, then validated."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from lesionlab.data import METADATA_FILE, Dataset, index_images, load_dataset, load_rgb
from lesionlab.errors import LesionLabError

log = logging.getLogger(__name__)

BASE_URL = "https://storage.googleapis.com/peltarion-ml-assignment/HAM10000/"
FILES: tuple[str, ...] = (
    "HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip", METADATA_FILE)
CHUNK = 1 << 20
# The release as published (Tschandl et al. 2018, Sci. Data 5:180161, Table 1 and the CSV).
# The mirror publishes no checksums for its zips, so these counts are what a download is
# checked against before the data is declared ready.
OFFICIAL_COUNTS: dict[str, int] = {
    "images": 10015, "lesions": 7470, "akiec": 327, "bcc": 514, "bkl": 1099, "df": 115,
    "mel": 1113, "nv": 6705, "vasc": 142}


def _remote_size(url: str, timeout: float) -> int | None:
    req = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        length = resp.headers.get("Content-Length")
        return int(length) if length is not None else None


def fetch(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``, resuming a ``.part`` file with an HTTP Range request."""
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    try:
        total = _remote_size(url, timeout)
        have = part.stat().st_size if part.exists() else 0
        if total is not None and have > total:
            part.unlink()
            have = 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        if total is None or have < total:
            req = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                if have and resp.status != 206:  # server ignored Range: start over
                    have = 0
                mode = "ab" if have else "wb"
                with open(part, mode) as out, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True,
                        desc=dest.name) as bar:
                    while chunk := resp.read(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise LesionLabError(
            f"download of {url} failed ({exc}); rerun to resume, or download it by hand "
            f"into {dest.parent}") from None
    got = part.stat().st_size
    if total is not None and got != total:
        raise LesionLabError(
            f"download of {url} is incomplete ({got} of {total} bytes); rerun to resume")
    part.replace(dest)
    return dest


def release_counts(dataset: Dataset) -> dict[str, int]:
    """Images, lesions and images per class of a loaded folder (the published counts' keys)."""
    frame = dataset.frame
    counts = {"images": len(frame), "lesions": int(frame["lesion_id"].nunique())}
    counts.update({str(k): int(v) for k, v in frame["dx"].value_counts().items()})
    return counts


def verify_release(dataset: Dataset, expected: dict[str, int] | None = OFFICIAL_COUNTS) -> None:
    """Check a downloaded folder before calling it ready: counts, no stray images, all decode."""
    if expected is not None:
        got = release_counts(dataset)
        wrong = {k: (got.get(k, 0), v) for k, v in expected.items() if got.get(k, 0) != v}
        if wrong:
            raise LesionLabError(
                f"downloaded data at {dataset.root} does not match the published release "
                f"(found, expected): {wrong}; delete the folder and download again")
    listed = set(dataset.frame["image_id"])
    stray = sorted(set(index_images(dataset.root)) - listed)
    if stray:
        raise LesionLabError(
            f"{len(stray)} image(s) below {dataset.root} are not in {METADATA_FILE}, e.g. "
            f"{stray[:5]}: the zips and the metadata are from different releases")
    for path in tqdm(dataset.frame["path"], desc="verify images", unit="img"):
        load_rgb(path)


def _unzip(path: Path) -> None:
    """Extract ``X.zip`` into ``X/`` once (a marker file records that it finished)."""
    folder = path.with_suffix("")
    done = folder / ".unzipped"
    if done.exists():
        return
    try:
        with zipfile.ZipFile(path) as zf:
            zf.extractall(folder)
    except zipfile.BadZipFile:
        path.unlink()
        raise LesionLabError(f"{path} is not a valid zip (deleted); rerun to download it again"
                             ) from None
    done.touch()


def download_ham10000(dest: Path | str, base_url: str = BASE_URL, http_timeout: float = 60.0,
                      expected: dict[str, int] | None = OFFICIAL_COUNTS) -> Dataset:
    """Fetch, unzip and verify HAM10000 into ``dest``; files already there are kept."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        path = fetch(base_url + name, dest / name, timeout=http_timeout)
        if name.endswith(".zip"):
            _unzip(path)
    dataset = load_dataset(dest)
    verify_release(dataset, expected)
    log.info("HAM10000 ready at %s: %d images, %d lesions", dest, len(dataset),
             dataset.frame["lesion_id"].nunique())
    return dataset


def ensure_data(root: Path | str, download: bool = False) -> Dataset:
    """Load the dataset at ``root``; if absent and ``download``, fetch it there first."""
    root = Path(root)
    if not (root / METADATA_FILE).exists() and download:
        log.info("no HAM10000 at %s: downloading the official files (about 2.7 GB)", root)
        return download_ham10000(root)
    return load_dataset(root)
