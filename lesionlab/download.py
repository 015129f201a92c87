"""Fetch the official HAM10000 files: resumable, size-checked, unzipped, then verified.

A folder is declared ready only when it matches a :class:`Release`: the metadata CSV's sha256,
the published counts, no stray images, and every image decoding at the one size its source
documents (``ACCEPTED_IMAGE_SIZES``). Placeholder, resized or truncated images and an edited
CSV are refused with one line naming the count and a few examples.

``python -m lesionlab.download --data DIR`` fetches, unzips and verifies the files;
``--check-only`` verifies a folder already there (e.g. a downscaled copy, with
``--image-size 200x150``) without downloading anything.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from lesionlab.cli import (
    add_config_args, add_data_args, config_from_args, make_parser, option, resolve_data, run_main)
from lesionlab.artifacts import sha256_file
from lesionlab.data import MAX_IMAGE_PIXELS, METADATA_FILE, Dataset, index_images, load_dataset
from lesionlab.labels import AUTO
from lesionlab.errors import LesionLabError

log = logging.getLogger(__name__)

BASE_URL = "https://storage.googleapis.com/peltarion-ml-assignment/HAM10000/"
ZIPS: tuple[str, ...] = ("HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip")
FILES: tuple[str, ...] = (*ZIPS, METADATA_FILE)
CHUNK = 1 << 20
# The release as published (Tschandl et al. 2018, Sci. Data 5:180161, Table 1 and the CSV).
OFFICIAL_COUNTS: dict[str, int] = {
    "images": 10015, "lesions": 7470, "akiec": 327, "bcc": 514, "bkl": 1099, "df": 115,
    "mel": 1113, "nv": 6705, "vasc": 142}
# sha256 of the official HAM10000_metadata.csv (563,277 bytes, 10,015 rows; md5
# 70bb67f71bd23dde0bd2eda4bdcc98e5), computed from the project's verified copy of the release
# (shared/data/ham10000/HAM10000_metadata.csv beside the repo), which is that file byte for byte.
OFFICIAL_METADATA_SHA256 = "06aee5e603d313ba69de38263053c792a1dff030eb9c44a96ceb477ceefb99a5"
# No checksum of the image zips is recorded: the mirror at BASE_URL publishes none, and the MD5s
# of the Harvard Dataverse record (doi:10.7910/DVN/DBW86T, files HAM10000_images_part1/2.zip)
# could not be retrieved offline to cite. The zips are checked through their contents instead.
# Every image of the official zips is a 600x450 (width x height) 8-bit RGB JPEG.
OFFICIAL_IMAGE_SIZE: tuple[int, int] = (600, 450)
# The only sizes a verified copy may have, all 4:3 (width, height): 600x450, the official
# release; 200x150, the same images downscaled by 3 (the project's shared copy and test
# fixture). A folder must be all one size, the one its source documents.
ACCEPTED_IMAGE_SIZES: tuple[tuple[int, int], ...] = ((600, 450), (200, 150))
IMAGE_MODE = "RGB"
EXAMPLES = 5


def format_size(size: tuple[int, int]) -> str:
    """``(600, 450)`` -> ``"600x450"`` (width x height)."""
    return f"{size[0]}x{size[1]}"


def parse_size(text: str) -> tuple[int, int]:
    """``"200x150"`` -> ``(200, 150)``, one of ``ACCEPTED_IMAGE_SIZES``.

    Raises:
        LesionLabError: the text is not WxH, or the size is not an accepted one.
    """
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise LesionLabError(f"image size {text!r} is not WIDTHxHEIGHT, e.g. 600x450") from None
    return _accepted((w, h))


def _accepted(size: tuple[int, int]) -> tuple[int, int]:
    size = (int(size[0]), int(size[1]))
    if size not in ACCEPTED_IMAGE_SIZES:
        raise LesionLabError(
            f"image size {format_size(size)} is not a documented HAM10000 size; accepted: "
            f"{[format_size(s) for s in ACCEPTED_IMAGE_SIZES]} (600x450: the official zips)")
    return size


@dataclasses.dataclass(frozen=True)
class Release:
    """What a HAM10000 folder must match before it is declared ready.

    Attributes:
        counts: images, lesions and images per class; None skips the count check.
        metadata_sha256: sha256 of ``HAM10000_metadata.csv``; None skips it (another release).
        image_size: (width, height) every image must decode at; one of ``ACCEPTED_IMAGE_SIZES``.

    Raises:
        LesionLabError: ``image_size`` is not an accepted size.
    """

    counts: Mapping[str, int] | None = dataclasses.field(
        default_factory=lambda: dict(OFFICIAL_COUNTS))
    metadata_sha256: str | None = OFFICIAL_METADATA_SHA256
    image_size: tuple[int, int] = OFFICIAL_IMAGE_SIZE

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", _accepted(self.image_size))


OFFICIAL_RELEASE = Release()


def _remote_size(url: str, timeout: float) -> int | None:
    req = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        length = resp.headers.get("Content-Length")
        return int(length) if length is not None else None


# the names the download gives what it writes (download_files lists them from these)
STAGED_METADATA = METADATA_FILE + ".download"  # fetched, put in place once verified


def part_name(name: str) -> str:
    """The file ``fetch`` downloads ``name`` into until the transfer is complete."""
    return name + ".part"


def unzip_name(name: str) -> str:
    """The folder ``X.zip`` is extracted into: ``X``."""
    return name.removesuffix(".zip")


def fetch(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``, resuming a ``.part`` file with an HTTP Range request.

    Raises:
        LesionLabError: the URL cannot be reached or the transfer breaks off (the ``.part``
            file is kept, so the next call resumes).
    """
    if dest.exists():
        return dest
    part = dest.with_name(part_name(dest.name))
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


def check_metadata(csv_path: Path, expected_sha256: str | None,
                   fix: str = "delete it and download it again from the official source") -> None:
    """Refuse a metadata CSV that is not byte for byte the expected file.

    Raises:
        LesionLabError: the file is missing, or its sha256 differs from ``expected_sha256``.
    """
    if expected_sha256 is None:
        return
    if not csv_path.is_file():
        raise LesionLabError(f"metadata CSV not found: {csv_path}")
    got = sha256_file(csv_path)
    if got != expected_sha256:
        raise LesionLabError(
            f"{csv_path} is not the official {METADATA_FILE}: sha256 {got}, expected "
            f"{expected_sha256}; {fix}")


def _check_counts(dataset: Dataset, expected: Mapping[str, int] | None) -> None:
    if expected is None:
        return
    got = release_counts(dataset)
    wrong = {k: (got.get(k, 0), v) for k, v in expected.items() if got.get(k, 0) != v}
    if wrong:
        raise LesionLabError(
            f"downloaded data at {dataset.root} does not match the published release "
            f"(found, expected): {wrong}; delete the folder and download again")


def _decode(path: str) -> tuple[tuple[int, int], str, bool]:
    """(header size, mode, blank) of an image after decoding all of its data.

    JPEGs decode in draft mode (DCT scaling to 1/8): every byte is still entropy-decoded, so
    truncated or corrupt data fails as in a full decode, at about half the cost. ``blank``
    is true when no channel spans more than 8 grey levels (a placeholder, not a photograph).

    Raises:
        OSError, ValueError, SyntaxError, UnidentifiedImageError, DecompressionBombError or
        DecompressionBombWarning: the file is not a readable image.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            size, mode = img.size, img.mode
            if size[0] * size[1] > MAX_IMAGE_PIXELS:
                raise ValueError(f"{format_size(size)} is over {MAX_IMAGE_PIXELS:,} pixels")
            if img.format == "JPEG":
                img.draft(mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            img.load()
            extrema = img.getextrema()
    bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
    return size, mode, all(hi - lo <= 8 for lo, hi in bands)


READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError,
               Image.DecompressionBombError, Image.DecompressionBombWarning)


def _scan_images(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Decode every image once; group image ids by what is wrong with them."""
    found: dict[str, list[str]] = collections.defaultdict(list)
    for image_id, path in tqdm(zip(frame["image_id"], frame["path"]), total=len(frame),
                               desc="verify images", unit="img"):
        try:
            size, mode, blank = _decode(path)
        except READ_ERRORS as exc:
            reason = " ".join(str(exc).replace(str(path), "it").split())
            found["unreadable"].append(f"{Path(path).name} ({type(exc).__name__}: {reason})")
            continue
        found[f"size {format_size(size)}"].append(image_id)
        if mode != IMAGE_MODE:
            found[f"mode {mode}"].append(image_id)
        if blank:
            found["blank"].append(image_id)
    return found


def _size_message(others: dict[str, list[str]], total: int, where: Path, want: str) -> str:
    """The refusal of images that are not ``want``: how many, which sizes, a few ids, a fix."""
    ids = sorted(i for v in others.values() for i in v)
    seen = ", ".join(f"{k}: {len(v)}" for k, v in sorted(others.items()))
    one = next(iter(others)) if len(others) == 1 else None
    if len(ids) == total and one in {format_size(s) for s in ACCEPTED_IMAGE_SIZES}:
        fix = f"if this is a verified copy downscaled to {one}, check it with --image-size {one}"
    else:
        fix = "delete the folder and download again"
    return (f"{len(ids)} of {total} image(s) below {where} are not {want}, the documented size "
            f"of this source (found {seen}), e.g. {ids[:EXAMPLES]}: placeholder or resized "
            f"images; {fix}")


def check_images(dataset: Dataset, size: tuple[int, int]) -> None:
    """Refuse a folder unless every image decodes, is 8-bit RGB, not blank, and ``size``.

    Raises:
        LesionLabError: some image is unreadable, of another size or mode, or blank; the
            message names how many and a few image ids.
    """
    found = _scan_images(dataset.frame)
    total, where = len(dataset.frame), dataset.root
    bad = found.pop("unreadable", [])
    if bad:
        raise LesionLabError(
            f"{len(bad)} of {total} corrupt or unreadable image(s) below {where}, e.g. "
            f"{'; '.join(bad[:3])}; delete the folder and download again")
    want = format_size(size)
    others = {k[5:]: v for k, v in found.items() if k.startswith("size ") and k[5:] != want}
    if others:
        raise LesionLabError(_size_message(others, total, where, want))
    flaws = [(k, f"not 8-bit {IMAGE_MODE} ({k})") for k in sorted(found) if k.startswith("mode ")]
    flaws.append(("blank", "blank (one flat colour: placeholders, not photographs)"))
    for key, what in flaws:
        ids = found.get(key, [])
        if ids:
            raise LesionLabError(
                f"{len(ids)} of {total} image(s) below {where} are {what}, e.g. "
                f"{sorted(ids)[:EXAMPLES]}; delete the folder and download again")


def verify_release(root: Path | str, release: Release = OFFICIAL_RELEASE) -> Dataset:
    """Check a HAM10000 folder before calling it ready, and return it loaded.

    Checks, in order: the metadata CSV's sha256, the published counts, no image that the CSV
    does not list, and every image decoding at ``release.image_size`` (see
    :func:`check_images`). About 4 s for the 10,015 200x150 images, 10 s at 600x450 (2 cores).

    Raises:
        LesionLabError: any check fails (one line naming the count and a few examples), or
            the folder is not a readable HAM10000 folder at all.
    """
    root = Path(root)
    check_metadata(root / METADATA_FILE, release.metadata_sha256)
    dataset = load_dataset(root)
    _check_counts(dataset, release.counts)
    listed = set(dataset.frame["image_id"])
    stray = sorted(set(index_images(dataset.root)) - listed)
    if stray:
        raise LesionLabError(
            f"{len(stray)} image(s) below {dataset.root} are not in {METADATA_FILE}, e.g. "
            f"{stray[:EXAMPLES]}: the zips and the metadata are from different releases")
    check_images(dataset, release.image_size)
    return dataset


def _unzip(path: Path) -> None:
    """Extract ``X.zip`` into ``X/`` once (a marker file records that it finished)."""
    folder = path.with_name(unzip_name(path.name))
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
                      release: Release = OFFICIAL_RELEASE) -> Dataset:
    """Fetch, unzip and verify HAM10000 into ``dest``; files already there are kept.

    Raises:
        LesionLabError: a download fails, a zip is broken, or the result does not match
            ``release`` (see :func:`verify_release`); nothing is reported ready then.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    csv = dest / METADATA_FILE
    staged = dest / STAGED_METADATA
    if not csv.exists():  # checked first, put in place last: its presence means "all fetched"
        fetch(base_url + METADATA_FILE, staged, timeout=http_timeout)
        try:
            check_metadata(staged, release.metadata_sha256, f"deleted it: {base_url} does not "
                           f"serve the official file, download from another source")
        except LesionLabError:
            staged.unlink()
            raise
    for name in ZIPS:
        _unzip(fetch(base_url + name, dest / name, timeout=http_timeout))
    if not csv.exists():
        staged.replace(csv)
    dataset = verify_release(dest, release)
    log.info("HAM10000 ready at %s: %d images, %d lesions", dest, len(dataset),
             dataset.frame["lesion_id"].nunique())
    return dataset


def download_files() -> set[str]:
    """The names :func:`download_ham10000` writes at the top of its folder: the staged
    metadata, the zips, their ``.part`` files and the folders they unzip to."""
    names = {STAGED_METADATA, part_name(STAGED_METADATA)}
    for z in ZIPS:
        names |= {z, part_name(z), unzip_name(z)}
    return names


def ensure_data(root: Path | str, download: bool = False, *, labels: str = AUTO,
                label_map: Path | str | None = None) -> Dataset:
    """Load the dataset at ``root`` (``labels``/``label_map``: see ``load_dataset``). With
    ``download`` and HAM10000 (or auto) labels, a folder that does not exist, is empty or
    holds only an interrupted download's files (:func:`download_files`) gets HAM10000 first;
    a folder holding anything else is the user's data and is only read, never written to.

    Raises:
        LesionLabError: the download fails or its files do not verify, or the folder's labels
            are invalid or missing (see :func:`lesionlab.data.load_dataset`).
    """
    root = Path(root)
    ours = download_files()
    if download and labels in (AUTO, "ham10000") and not (root / METADATA_FILE).exists() and \
            (not root.exists() or root.is_dir() and all(p.name in ours for p in root.iterdir())):
        log.info("no HAM10000 at %s: downloading the official files (about 2.7 GB)", root)
        return download_ham10000(root)
    return load_dataset(root, labels=labels, label_map=label_map)


@dataclasses.dataclass(frozen=True)
class DownloadConfig:
    """Options of ``python -m lesionlab.download`` (its flags)."""

    http_timeout: float = option(
        60.0, "seconds to wait for the server before a download counts as failed", gt=0)
    image_size: str = option(
        format_size(ACCEPTED_IMAGE_SIZES[0]), "WIDTHxHEIGHT every image must decode at: "
        "600x450 for the official zips; 200x150 for a copy downscaled by 3",
        choices=[format_size(s) for s in ACCEPTED_IMAGE_SIZES])
    check_only: bool = option(
        False, "only verify the files already in --data (metadata sha256, counts, every image "
        "decoded at --image-size); download nothing")


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m lesionlab.download``."""
    p = make_parser("python -m lesionlab.download",
                    "Fetch, unzip and verify the HAM10000 files. --check-only verifies a "
                    "folder already there (e.g. a downscaled copy, with --image-size 200x150) "
                    "without downloading anything.")
    add_config_args(p, DownloadConfig)
    add_data_args(p, workdir=False, labels=False)
    p.add_argument("--base-url", default=BASE_URL, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Download (unless --check-only), unzip and verify HAM10000 into --data."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(DownloadConfig, args)
    dest = resolve_data(args)
    release = Release(image_size=parse_size(cfg.image_size))
    if cfg.check_only:
        ds = verify_release(dest, release)
    else:
        ds = download_ham10000(dest, base_url=args.base_url, http_timeout=cfg.http_timeout,
                               release=release)
    print(f"{dest}: {len(ds)} images, {ds.frame['lesion_id'].nunique()} lesions, all "
          f"{cfg.image_size}, metadata sha256 {release.metadata_sha256[:12]}... as published")
    return 0


if __name__ == "__main__":
    run_main(main)
