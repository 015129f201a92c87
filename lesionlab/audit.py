"""``python -m lesionlab.audit DIR [--against DIR2] [--out FILE]``: duplicate images.

Lists exact duplicates (identical bytes) and near duplicates (perceptual hashes within
``--near-distance`` bits, see :mod:`lesionlab.fingerprint`) among the images below ``DIR``
and, with ``--against``, between ``DIR`` and ``DIR2`` (e.g. a training set and an external
test set: an external image that is a training image inflates the external score). Prints the
counts; ``--out`` writes counts and pairs as JSON. Fingerprints are cached in
``<workdir>/fingerprints``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from lesionlab.artifacts import write_json
from lesionlab.cli import command_parser, config_from_args, option, run_main, workdir_option
from lesionlab.data import index_images
from lesionlab.errors import LesionLabError
from lesionlab.fingerprint import (HASH_BITS, NEAR_DISTANCE, exact_pairs, folder_fingerprints,
                                   near_pairs, phash_bits)


@dataclass
class AuditConfig:
    """What ``python -m lesionlab.audit`` compares; its flags come from these fields."""

    folder: Path = option(help="image folder to audit (every image below it)", parse=Path,
                          positional=True)
    against: Path | None = option(None, "a second image folder: report the duplicates "
                                        "between the two", parse=Path)
    near_distance: int = option(NEAR_DISTANCE, "largest perceptual-hash Hamming distance "
                                               "(bits of 256) that counts as a near duplicate",
                                ge=0, le=HASH_BITS)
    out: Path | None = option(None, "write counts and pairs as JSON here", parse=Path)
    workdir: Path = workdir_option()


def folder_table(folder: Path, workdir: Path | None) -> pd.DataFrame:
    """Fingerprints of every image below ``folder``: columns image_id, path, sha256, phash.

    Args:
        folder: the image folder, searched recursively.
        workdir: where the fingerprint cache lives; None: no cache.

    Returns:
        (n_images, 4) frame, one row per image id in sorted order; ``phash``: 64 hex digits
        (a 256-bit DCT perceptual hash, see :mod:`lesionlab.fingerprint`).

    Raises:
        LesionLabError: the folder is missing or holds no image.
    """
    if not folder.is_dir():
        raise LesionLabError(f"image folder not found: {folder}")
    images = index_images(folder)
    if not images:
        raise LesionLabError(f"no images found below {folder}")
    ids = sorted(images)
    table = folder_fingerprints([str(images[i]) for i in ids], folder, workdir)
    return table.assign(image_id=ids)


def pair_block(a: pd.DataFrame, b: pd.DataFrame | None, near_distance: int) -> dict:
    """Exact and near (not exact) duplicate pairs within ``a`` (``b`` None) or between the
    two: ``{"exact_pairs", "near_pairs", "exact", "near"}``, pairs as
    ``[id in a, id in b (or a), Hamming distance]``.

    Args:
        a: (n_a, 4) fingerprint table (:func:`folder_table`).
        b: (n_b, 4) a second one, or None for pairs inside ``a``.
        near_distance: the largest Hamming distance, in bits of 256, of a near pair.
    """
    other = a if b is None else b
    exact = exact_pairs(a["sha256"], None if b is None else b["sha256"])
    near = near_pairs(phash_bits(a["phash"]), None if b is None else phash_bits(b["phash"]),
                      near_distance)
    sha_a, sha_o = a["sha256"].to_numpy(), other["sha256"].to_numpy()
    near = near[sha_a[near[:, 0]] != sha_o[near[:, 1]]] if len(near) else near
    ids_a, ids_o = a["image_id"].to_numpy(), other["image_id"].to_numpy()
    return {"exact_pairs": int(len(exact)), "near_pairs": int(len(near)),
            "exact": [[ids_a[i], ids_o[j], 0] for i, j in exact],
            "near": [[ids_a[i], ids_o[j], int(d)] for i, j, d in near]}


def audit(folder: Path, against: Path | None = None, near_distance: int = NEAR_DISTANCE,
          workdir: Path | None = None) -> dict:
    """Duplicates within ``folder`` and (optionally) between it and ``against``.

    Returns:
        ``{"folder", "n_images", "near_distance", "within": pair_block, "against": None or
        {"folder", "n_images", "between": pair_block, "images_with_exact_copy",
        "images_with_near_copy"}}``; the two counts are images of ``against`` that have an
        exact (a near, not exact) copy in ``folder``.

    Raises:
        LesionLabError: see :func:`folder_table`.
    """
    a = folder_table(folder, workdir)
    out = {"folder": str(folder), "n_images": len(a), "near_distance": near_distance,
           "within": pair_block(a, None, near_distance), "against": None}
    if against is not None:
        b = folder_table(against, workdir)
        between = pair_block(a, b, near_distance)
        exact_ids = {p[1] for p in between["exact"]}
        near_ids = {p[1] for p in between["near"]} - exact_ids
        out["against"] = {"folder": str(against), "n_images": len(b), "between": between,
                          "images_with_exact_copy": len(exact_ids),
                          "images_with_near_copy": len(near_ids)}
    return out


def summary_lines(result: dict) -> list[str]:
    """The printed report: one line per comparison."""
    w = result["within"]
    lines = [f"{result['folder']}: {result['n_images']} images; {w['exact_pairs']} exact "
             f"duplicate pair(s), {w['near_pairs']} near duplicate pair(s) (pHash distance "
             f"<= {result['near_distance']} of {HASH_BITS} bits, bytes differ)"]
    ag = result["against"]
    if ag is not None:
        b = ag["between"]
        lines.append(
            f"{ag['folder']} ({ag['n_images']} images) against it: {b['exact_pairs']} exact "
            f"and {b['near_pairs']} near pair(s); {ag['images_with_exact_copy']} of its "
            f"images have an exact copy in {result['folder']}, "
            f"{ag['images_with_near_copy']} more a near one")
    return lines


def build_parser():  # noqa: ANN201 - argparse.ArgumentParser
    """CLI arguments, from ``AuditConfig``."""
    return command_parser("python -m lesionlab.audit", __doc__, AuditConfig)


def main(argv: Sequence[str] | None = None) -> int:
    """Audit the folder(s), print the counts, optionally write the JSON."""
    cfg = config_from_args(AuditConfig, build_parser().parse_args(argv))
    result = audit(cfg.folder, cfg.against, cfg.near_distance, cfg.workdir)
    for line in summary_lines(result):
        print(line)
    if cfg.out is not None:
        write_json(cfg.out, result)
    return 0


if __name__ == "__main__":
    run_main(main)
