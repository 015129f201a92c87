"""Content fingerprints of images: exact (sha256 of the file bytes) and perceptual (pHash).

Two files with the same sha256 are the same image whatever their names (an *exact
duplicate*); two images whose 256-bit perceptual hashes differ in at most
:data:`NEAR_DISTANCE` bits are the same picture re-encoded or resized (a *near duplicate*).
The perceptual hash is ImageHash's ``phash`` with ``hash_size=16`` (the DCT hash of pHash,
Zauner 2010: the signs of the 16x16 lowest frequencies of the 64x64 grey image's DCT against
their median) of the EXIF-corrected RGB image, so a rotated phone copy is the same picture.
ImageHash's default 8x8 (64-bit) hash cannot tell dermoscopic images apart: they share one
layout (a dark blob on skin), and on HAM10000 pairs of different lesions lie at distance 0.

Fingerprints are cached per image folder in ``<workdir>/fingerprints/<folder key>.csv``
(columns :data:`CACHE_COLUMNS`); a row is reused while its file's path, size and mtime are
unchanged, so an edited image is fingerprinted again. The cache is written atomically.

The archives are known to hold such copies under different image and lesion ids (Cassidy et
al., "Analysis of the ISIC image datasets", Med. Image Anal. 2022): :mod:`lesionlab.splits`
keeps exact duplicates in one split group, ``models.evaluate`` leaves images of the model's
training set out, and ``python -m lesionlab.audit`` lists the duplicates of folders.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from lesionlab.artifacts import atomic_path, sha256_file
from lesionlab.data import Dataset
from lesionlab.errors import LesionLabError, all_problems

# Near duplicates: pHash (16x16, 256 bits) Hamming distance <= 24 bits (9%). Measured on
# HAM10000 (200x150): a JPEG re-encode at quality 50 moves a hash by at most 16 bits and a
# halving of the size by at most 8 (100 images each); of all pairs under different lesion
# ids, the two within 36 bits are one picture recoloured (at 14 and 36 bits) and those from
# 38 bits on are different lesions. 24 keeps a margin below them; 5% crops (38-56 bits) and
# strong recolouring are not caught.
NEAR_DISTANCE = 24
HASH_SIZE = 16  # ImageHash's hash_size: a HASH_SIZE x HASH_SIZE bit matrix
HASH_BITS = HASH_SIZE * HASH_SIZE
_WORDS = HASH_BITS // 64
CACHE_DIR = "fingerprints"
CACHE_COLUMNS: tuple[str, ...] = ("path", "size", "mtime_ns", "sha256", "phash")
HASH_THREADS = 4  # Pillow releases the GIL while decoding and resizing
_CHUNK = 512  # rows per block of the pairwise Hamming distances (512 x n uint64 at a time)


def cache_path(workdir: Path | str, folder: Path | str) -> Path:
    """``<workdir>/fingerprints/<first 16 hex of sha256(resolved folder)>.csv``."""
    key = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16]
    return Path(workdir) / CACHE_DIR / f"{key}.csv"


def perceptual_hash(path: Path | str) -> str:
    """pHash (64 hex digits, 256 bits) of the EXIF-corrected RGB image at ``path``.

    A JPEG is decoded at the smallest of its DCT scales that keeps 64x64 pixels (Pillow's
    ``draft``), the size the hash reads: the same hash as a full decode to within a few bits
    (a halving of the size moves it at most 8), at a third of the cost.

    Raises:
        LesionLabError: the file is missing or not a decodable image.
    """
    import imagehash  # imported here: only fingerprinting needs it

    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (HASH_SIZE * 4, HASH_SIZE * 4))
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except FileNotFoundError:
        raise LesionLabError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise LesionLabError(f"corrupt or unreadable image: {path} ({exc})") from None
    return str(imagehash.phash(rgb, hash_size=HASH_SIZE))


def _fingerprint_one(path: str) -> tuple[str, str] | str:
    """(sha256, pHash) of one image, or the one-line error that names why it cannot be read."""
    try:
        return sha256_file(path), perceptual_hash(path)
    except LesionLabError as exc:
        return str(exc)


def _stat(paths: Sequence[str]) -> pd.DataFrame:
    """(path, size in bytes, mtime in ns) of each file.

    Raises:
        LesionLabError: files are missing (all of them named by count, a few by path).
    """
    rows, missing = [], []
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            missing.append(f"image not found: {p}")
            continue
        rows.append((p, st.st_size, st.st_mtime_ns))
    if missing:
        raise all_problems(missing, len(paths))
    return pd.DataFrame(rows, columns=["path", "size", "mtime_ns"])


def _read_cache(path: Path | None) -> pd.DataFrame:
    """The cached rows (empty when there is no cache or it is unreadable: then recomputed)."""
    if path is None or not path.is_file():
        return pd.DataFrame(columns=list(CACHE_COLUMNS))
    try:
        cached = pd.read_csv(path, dtype={"path": str, "sha256": str, "phash": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return pd.DataFrame(columns=list(CACHE_COLUMNS))
    if list(cached.columns) != list(CACHE_COLUMNS):
        return pd.DataFrame(columns=list(CACHE_COLUMNS))
    return cached


def fingerprint_paths(paths: Sequence[str | Path], cache: Path | None = None,
                      progress: bool = True) -> pd.DataFrame:
    """sha256 and pHash of each image, reusing ``cache`` rows whose file is unchanged.

    Args:
        paths: image files.
        cache: the CSV to read and update (see :func:`cache_path`); None: compute all.
        progress: show a progress bar while hashing.

    Returns:
        (n_paths, 3) frame, one row per path, in order: columns ``path``, ``sha256`` (64 hex),
        ``phash`` (64 hex).

    Raises:
        LesionLabError: a file is missing or not a decodable image.
    """
    stats = _stat([str(p) for p in paths])
    cached = _read_cache(cache).drop_duplicates("path", keep="last")
    merged = stats.merge(cached, on=["path", "size", "mtime_ns"], how="left")
    todo = np.flatnonzero(merged["sha256"].isna().to_numpy())
    if len(todo):
        todo_paths = merged["path"].to_numpy()[todo].tolist()
        with ThreadPoolExecutor(HASH_THREADS) as pool:
            done = list(tqdm(pool.map(_fingerprint_one, todo_paths), total=len(todo_paths),
                             unit="img", desc="fingerprints", disable=not progress,
                             leave=False))
        ok = np.array([not isinstance(d, str) for d in done])
        merged.loc[todo[ok], "sha256"] = [d[0] for d in done if not isinstance(d, str)]
        merged.loc[todo[ok], "phash"] = [d[1] for d in done if not isinstance(d, str)]
        if cache is not None:  # the readable images' hashes are kept even when some fail
            keep = cached[~cached["path"].isin(merged["path"])]
            table = pd.concat([keep, merged[list(CACHE_COLUMNS)].dropna(subset=["sha256"])],
                              ignore_index=True)
            with atomic_path(cache) as tmp:
                table.to_csv(tmp, index=False)
        if not ok.all():
            raise all_problems([d for d in done if isinstance(d, str)], len(paths))
    return pd.DataFrame({c: merged[c].astype(str).tolist() for c in ("path", "sha256", "phash")})


def folder_fingerprints(paths: Sequence[str | Path], folder: Path | str,
                        workdir: Path | str | None, progress: bool = True) -> pd.DataFrame:
    """:func:`fingerprint_paths` of images below ``folder``, cached in ``workdir`` (None: not
    cached).

    Args:
        paths: the image files below ``folder``.
        folder: the folder the cache is keyed by.
        workdir: the workdir holding the cache; None: not cached.
        progress: show a progress bar while hashing.

    Returns:
        (n_images, 3) frame: ``path``, ``sha256``, ``phash`` (see :func:`fingerprint_paths`).

    Raises:
        LesionLabError: a file is missing or not a decodable image.
    """
    cache = None if workdir is None else cache_path(workdir, folder)
    return fingerprint_paths(paths, cache, progress)


def phash_bits(hexes: Iterable[str]) -> np.ndarray:
    """(n, 4) uint64 words of 64-hex-digit (256-bit) perceptual hashes.

    Raises:
        LesionLabError: a hash is not 64 hex digits long.
    """
    rows = [bytes.fromhex(h) for h in hexes]
    if any(len(r) != HASH_BITS // 8 for r in rows):
        raise LesionLabError(f"perceptual hashes must have {HASH_BITS // 4} hex digits")
    flat = np.frombuffer(b"".join(rows), dtype=">u8").astype(np.uint64)
    return flat.reshape(len(rows), _WORDS)


def near_pairs(a: np.ndarray, b: np.ndarray | None = None,
               max_distance: int = NEAR_DISTANCE) -> np.ndarray:
    """Index pairs of hashes at Hamming distance <= ``max_distance``.

    Args:
        a: (n, w) uint64 hash words (:func:`phash_bits`).
        b: (m, w) uint64 hash words; None: pairs within ``a`` (i < j only).
        max_distance: the largest distance in bits that counts as near.

    Returns:
        (k, 3) int64 rows ``(i, j, distance)``, i indexing ``a`` and j ``b`` (or ``a``),
        sorted by i then j.
    """
    other = a if b is None else b
    found = [np.zeros((0, 3), dtype=np.int64)]
    for start in range(0, len(a), _CHUNK):
        block = a[start:start + _CHUNK]
        first = start if b is None else 0  # within one set: only columns j >= i's block
        dist = np.zeros((len(block), len(other) - first), dtype=np.int64)
        for w in range(a.shape[1]):
            dist += np.bitwise_count(block[:, None, w] ^ other[None, first:, w])
        i, j = np.nonzero(dist <= max_distance)
        d, i, j = dist[i, j], i + start, j + first
        keep = i < j if b is None else np.ones(len(i), dtype=bool)
        found.append(np.stack([i[keep], j[keep], d[keep]], axis=1))
    return np.concatenate(found).astype(np.int64)


def exact_pairs(a: Sequence[str], b: Sequence[str] | None = None) -> np.ndarray:
    """Index pairs of equal sha256 values.

    Args:
        a: (n,) hex digests.
        b: (m,) hex digests; None: pairs within ``a`` (i < j only).

    Returns:
        (k, 2) int64 rows ``(i, j)`` as in :func:`near_pairs`, sorted.
    """
    left = pd.DataFrame({"h": np.asarray(a, dtype=str), "i": np.arange(len(a))})
    right = left if b is None else pd.DataFrame({"h": np.asarray(b, dtype=str),
                                                 "j": np.arange(len(b))})
    right = right.rename(columns={"i": "j"})
    pairs = left.merge(right, on="h")
    if b is None:
        pairs = pairs[pairs["i"] < pairs["j"]]
    return pairs.sort_values(["i", "j"])[["i", "j"]].to_numpy(dtype=np.int64).reshape(-1, 2)


def merge_duplicate_groups(groups: Sequence[str], sha256: Sequence[str]) -> tuple[np.ndarray,
                                                                                  int, int]:
    """Lesion groups with every set of exact duplicates joined into one group.

    Groups linked by an image they share (directly or through a chain) become one, named by
    its smallest lesion id, so that no split can put one picture on two sides.

    Args:
        groups: (n_images,) lesion ids.
        sha256: (n_images,) content digests.

    Returns:
        ``(merged groups (n_images,) str, exact-duplicate image pairs whose lesion ids differ,
        lesion ids folded into another's group)``.
    """
    groups = np.asarray(groups, dtype=str)
    pairs = exact_pairs(sha256)
    pairs = pairs[groups[pairs[:, 0]] != groups[pairs[:, 1]]]
    if not len(pairs):
        return groups, 0, 0
    names, code = np.unique(groups, return_inverse=True)
    graph = coo_matrix((np.ones(len(pairs)), (code[pairs[:, 0]], code[pairs[:, 1]])),
                       shape=(len(names), len(names)))
    _, component = connected_components(graph, directed=False)
    first = pd.Series(names).groupby(component).transform("min").to_numpy()
    merged = first[code]
    return merged, len(pairs), int(np.sum(first != names))


# --- the training set of a model folder, by content --------------------------------------

TRAIN_DIGESTS = "train_sha256.txt"  # in a model folder: its training images' digests
# Digests are stored as their first 16 hex digits (64 bits): the chance that any of 10^4
# evaluation images shares a prefix with one of 10^4 training images by accident is about
# 10^8 / 2^64 = 5e-12 (the birthday bound), so the prefix is as good as the whole digest here.
DIGEST_PREFIX = 16


def save_train_digests(folder: Path | str, dataset: Dataset, train_ids: Sequence[str]) -> Path:
    """Write ``<folder>/train_sha256.txt``: the sorted, unique sha256 prefixes (16 hex
    digits) of the images of ``dataset`` named by ``train_ids``, one per line, atomically.

    ``models.evaluate`` reads it to find evaluation images that are training images under
    another name (:func:`train_overlap`). Call it before the folder's card is written.
    """
    paths = dataset.frame.set_index("image_id").loc[list(train_ids), "path"]
    digests = sorted({sha256_file(p)[:DIGEST_PREFIX] for p in paths})
    dest = Path(folder) / TRAIN_DIGESTS
    with atomic_path(dest) as tmp:
        tmp.write_text("".join(f"{d}\n" for d in digests), encoding="ascii")
    return dest


def read_train_digests(folder: Path | str) -> set[str] | None:
    """The digests :func:`save_train_digests` wrote in ``folder``; None where there are none
    (a folder written before they were recorded).

    Raises:
        LesionLabError: the file holds something other than 16-hex-digit lines.
    """
    path = Path(folder) / TRAIN_DIGESTS
    if not path.is_file():
        return None
    lines = path.read_text(encoding="ascii", errors="replace").split()
    bad = [x for x in lines if len(x) != DIGEST_PREFIX or x.strip("0123456789abcdef")]
    if bad:
        raise LesionLabError(f"{path}: expected one {DIGEST_PREFIX}-hex-digit sha256 prefix "
                             f"per line, found {bad[0][:40]!r}")
    return set(lines)


def train_overlap(folder: Path | str, train_ids: Sequence[str], image_ids: Sequence[str],
                  paths: Sequence[str | Path]) -> tuple[np.ndarray, np.ndarray]:
    """Which evaluation images a model folder was trained on: by image id (the card's
    ``train_image_ids``) and by content (``train_sha256.txt``, where the folder has one).

    Args:
        folder: the model folder.
        train_ids: the card's training image ids.
        image_ids: (n,) the evaluation images' ids.
        paths: (n,) their files (read, only when the folder records its digests).

    Returns:
        ``(by_id, by_content)``: (n,) bool each; ``by_content`` is all False without digests.
    """
    by_id = np.isin(np.asarray(image_ids, dtype=str), np.asarray(list(train_ids), dtype=str))
    digests = read_train_digests(folder)
    by_content = np.zeros(len(by_id), dtype=bool)
    if digests:
        by_content = np.array([sha256_file(p)[:DIGEST_PREFIX] in digests for p in paths],
                              dtype=bool).reshape(-1)
    return by_id, by_content
