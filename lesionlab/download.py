"""Fetch the official HAM10000 files: resumable, size-checked, unzipped, then validated."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from lesionlab.data import METADATA_FILE, Dataset, load_dataset
from lesionlab.errors import LesionLabError

log = logging.getLogger(__name__)

BASE_URL = "https://storage.googleapis.com/peltarion-ml-assignment/HAM10000/"
FILES: tuple[str, ...] = (
    "HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip", METADATA_FILE)
CHUNK = 1 << 20


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


def download_ham10000(dest: Path | str, base_url: str = BASE_URL,
                      timeout: float = 60.0) -> Dataset:
    """Fetch, unzip and validate HAM10000 into ``dest``; files already there are kept."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        path = fetch(base_url + name, dest / name, timeout=timeout)
        if name.endswith(".zip"):
            folder = dest / name[:-4]
            done = folder / ".unzipped"
            if not done.exists():
                try:
                    with zipfile.ZipFile(path) as zf:
                        zf.extractall(folder)
                except zipfile.BadZipFile:
                    path.unlink()
                    raise LesionLabError(
                        f"{path} is not a valid zip (deleted); rerun to download it again"
                    ) from None
                done.touch()
    dataset = load_dataset(dest)
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
