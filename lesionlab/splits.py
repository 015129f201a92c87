"""Stratified, lesion-grouped train/val/test splits and K-fold iterators.

One lesion is often photographed several times (10,015 images of 7,470 lesions), so every
split groups by ``lesion_id``: no lesion ever sits on both sides of a split.

``python -m lesionlab.splits --data DIR [--split-seed N]`` makes (or shows) the split.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from lesionlab.artifacts import atomic_path, splits_dir
from lesionlab.cli import (add_config_args, add_data_args, label_options, make_parser, option,
                           resolve_data, run_main)
from lesionlab.data import BINARY_CLASSES, CLASSES, NOT_MEL, Dataset, class_set
from lesionlab.download import ensure_data
from lesionlab.errors import LesionLabError, warn_once
from lesionlab.fingerprint import folder_fingerprints, merge_duplicate_groups

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.70, 0.15, 0.15)
MIN_LESIONS_PER_CLASS = 4  # the train/val/test split: 2 in train (for its CV), 1 in val, 1 in test


def _class_name(label: object, classes: Sequence[str] | None = None) -> str:
    """A class label as the user reads it (integer labels index ``classes``, default
    ``CLASSES``)."""
    classes = CLASSES if classes is None else classes
    if isinstance(label, (int, np.integer)) and 0 <= int(label) < len(classes):
        return classes[int(label)]
    return str(label)


def lesions_per_class(labels: np.ndarray, groups: np.ndarray) -> dict[Any, int]:
    """Number of distinct lesions (groups) of each class present in ``labels``.

    Args:
        labels: (n_images,) class labels.
        groups: (n_images,) lesion ids.

    Returns:
        {label: n_lesions} for every label that occurs, in sorted label order.
    """
    pairs = pd.DataFrame({"y": np.asarray(labels), "g": np.asarray(groups)}).drop_duplicates()
    return {k: int(v) for k, v in pairs.groupby("y")["g"].nunique().sort_index().items()}


def fold_count(labels: np.ndarray, groups: np.ndarray, n_folds: int, purpose: str,
               allow_fewer: bool = True, classes: Sequence[str] | None = None) -> int:
    """How many lesion-grouped, stratified folds ``labels`` / ``groups`` can have.

    The one place that decides it, for every K-fold-style split (CV folds of head tuning,
    K-fold fine-tuning): each class must lie in the training part of every fold, so it needs at
    least 2 lesions, and a fold count above a class's lesion count leaves that class out of some
    folds' held-out parts. The answer is ``min(n_folds, fewest lesions of any class)``.

    Args:
        labels: (n_images,) class labels.
        groups: (n_images,) lesion ids.
        n_folds: folds asked for (>= 2).
        purpose: what the folds are for, named in messages (e.g. "head tuning CV").
        allow_fewer: if False, a class with fewer lesions than ``n_folds`` is an error instead
            of a reason for fewer folds (K-fold runs, whose fold count names its networks).

    Returns:
        The number of folds to use, 2 <= k <= n_folds.

    Raises:
        LesionLabError: a class has fewer than 2 lesions, or fewer than ``n_folds`` when
            ``allow_fewer`` is False, or ``n_folds`` < 2.
    """
    if n_folds < 2:
        raise LesionLabError(f"{purpose}: a lesion-grouped split needs at least 2 folds, "
                             f"got {n_folds}")
    counts = lesions_per_class(labels, groups)
    label, fewest = min(counts.items(), key=lambda kv: kv[1])
    name = _class_name(label, classes)
    if fewest < 2:
        raise LesionLabError(
            f"{purpose}: class {name} has {fewest} lesion; a lesion-grouped split needs at "
            f"least 2 so that it appears on both sides")
    if fewest >= n_folds:
        return n_folds
    if not allow_fewer:
        raise LesionLabError(
            f"{purpose}: class {name} has {fewest} lesions, fewer than the {n_folds} folds asked "
            f"for; use at most {fewest} folds")
    warn_once(f"{purpose}: class {name} has only {fewest} lesions; using {fewest} folds "
              f"instead of {n_folds}", key=f"fold_count:{purpose}:{name}:{fewest}:{n_folds}")
    return fewest


def grouped_holdout(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int,
                    purpose: str, min_held: int = 1, min_rest: int = 1,
                    classes: Sequence[str] | None = None) -> np.ndarray:
    """Boolean mask of a stratified, lesion-grouped holdout of about ``fraction`` of the rows.

    Classes with at least round(1 / fraction) lesions are split by ``StratifiedGroupKFold``
    with that many folds (fold 0 held out). A rarer class would be left to chance by it, so its
    lesions are shuffled (seeded) and round(fraction x n_lesions) of them held out. Either way
    each class then keeps at least ``min_held`` lesions in the holdout and ``min_rest`` outside
    it (lesions are moved where needed). One counted warning line per ``purpose`` names the
    rare classes and their lesion counts. A lesion whose images carry several classes follows
    its first image's class.

    Args:
        labels: (n_images,) class labels.
        groups: (n_images,) lesion ids.
        fraction: share of rows to hold out, in (0, 1).
        seed: seeds both the folds and the rare classes' draw.
        purpose: what the holdout is, named in messages (e.g. "test split").
        min_held: lesions of every class that the holdout must hold.
        min_rest: lesions of every class that must stay outside it.
        classes: the class names integer labels index, for messages (default ``CLASSES``).

    Returns:
        (n_images,) bool, True for held-out rows.

    Raises:
        LesionLabError: a class has fewer than ``min_held + min_rest`` lesions.
    """
    if not 0.0 < fraction < 1.0:
        raise LesionLabError(f"{purpose}: holdout fraction must be in (0, 1), got {fraction}")
    labels, groups = np.asarray(labels), np.asarray(groups)
    n_splits = max(2, int(round(1.0 / fraction)))
    first = pd.DataFrame({"y": labels, "g": groups}).drop_duplicates("g")
    counts = first.groupby("y")["g"].nunique()
    for c, m in counts.items():
        _check_sides(_class_name(c, classes), int(m), min_held + min_rest, purpose)
    row_class = pd.Series(groups).map(dict(zip(first["g"], first["y"]))).to_numpy()
    rare = [c for c, m in counts.items() if m < n_splits]
    common = ~np.isin(row_class, np.array(rare, dtype=row_class.dtype))
    mask = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(seed)
    if common.any():
        rows = np.flatnonzero(common)
        mask[rows[_sgkf_holdout(labels[common], groups[common], n_splits, seed)]] = True
    for c in rare:
        lesions = rng.permutation(np.sort(first.loc[first["y"] == c, "g"].to_numpy()))
        mask[np.isin(groups, lesions[:int(round(fraction * len(lesions)))])] = True
    _ensure_sides(mask, row_class, groups, min_held, min_rest, rng)
    if rare:
        keeps = " and ".join(t for t in (f">= {min_held} held out" if min_held else "",
                                         f">= {min_rest} outside" if min_rest else "") if t)
        warn_once(f"{purpose}: " + ", ".join(
            f"class {_class_name(c, classes)} has {_lesions(int(counts[c]))}" for c in rare)
            + f", fewer than the {n_splits} folds of a {fraction:.0%} stratified holdout; "
              f"their lesions were drawn at random" + (f" (each class keeps {keeps})"
                                                       if keeps else ""),
            key=f"holdout:{purpose}")
    return mask


def _lesions(n: int) -> str:
    """``"1 lesion"``, ``"3 lesions"``."""
    return f"{n} lesion" + ("" if n == 1 else "s")


def _ensure_sides(mask: np.ndarray, row_class: np.ndarray, groups: np.ndarray, min_held: int,
                  min_rest: int, rng: np.random.Generator) -> None:
    """Move random lesions (in place) until every class has ``min_held`` lesions in the
    holdout and ``min_rest`` outside it (``StratifiedGroupKFold``'s greedy folds can leave a
    class with fewer when it has few lesions per fold)."""
    for c in pd.unique(row_class):
        rows = row_class == c
        for side, needed in ((True, min_held), (False, min_rest)):
            have = np.unique(groups[rows & (mask == side)])
            other = np.unique(groups[rows & (mask != side)])
            if len(have) < needed:
                moved = rng.choice(other, size=needed - len(have), replace=False)
                mask[np.isin(groups, moved)] = side


def _check_sides(label: object, n_lesions: int, need: int, purpose: str) -> None:
    """Raise if a class has fewer lesions than a split needs of it."""
    if n_lesions < need:
        raise LesionLabError(
            f"{purpose}: class {_class_name(label)} has {_lesions(n_lesions)}; a lesion-grouped "
            f"split needs at least {need} of every class here")


def _sgkf_holdout(labels: np.ndarray, groups: np.ndarray, n_splits: int,
                  seed: int) -> np.ndarray:
    """Indices of fold 0 of ``StratifiedGroupKFold`` (every class has >= n_splits lesions,
    except where there are fewer lesions than folds altogether: then one lesion per fold)."""
    n_groups = len(np.unique(groups))
    sgkf = StratifiedGroupKFold(n_splits=min(n_splits, n_groups), shuffle=True,
                                random_state=seed)
    with warnings.catch_warnings():  # class sizes were checked by the caller
        warnings.simplefilter("ignore", UserWarning)
        return next(sgkf.split(np.zeros(len(labels)), labels, groups))[1]


def make_split(dataset: Dataset, seed: int = 0,
               fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
               sha256: Sequence[str] | None = None) -> pd.DataFrame:
    """Assign each image to train/val/test, stratified by dx and grouped by lesion_id.

    Args:
        dataset: the images and their labels.
        seed: seeds the test holdout (``seed``) and the val holdout (``seed + 1``).
        fractions: shares of (train, val, test), summing to 1.
        sha256: (n_images,) content digests of the images (``lesionlab.fingerprint``); byte-
            identical images under different lesion ids then share one group (one warning
            line says how many), so no picture lies on two sides. None: lesion ids only.

    Returns:
        One row per image: ``image_id``, ``lesion_id`` (as in the labels), ``dx``, ``split``.

    Raises:
        LesionLabError: binary melanoma labels (``mel`` / ``not_mel``: scored by
            ``models.evaluate``, not trained on), fractions not summing to 1, or a class with fewer than
            :data:`MIN_LESIONS_PER_CLASS` groups.
    """
    if tuple(dataset.classes) == BINARY_CLASSES:
        raise LesionLabError(f"{dataset.root}: binary melanoma labels (mel / {NOT_MEL}) are "
                             f"for scoring a multiclass model (python -m models.evaluate), not "
                             f"for training: give the other classes' names")
    frame = dataset.frame
    if not np.isclose(sum(fractions), 1.0):
        raise LesionLabError(f"split fractions must sum to 1, got {fractions}")
    labels = frame["label"].to_numpy()
    lesions = frame["lesion_id"].astype(str).to_numpy()
    groups = lesions if sha256 is None else _duplicate_groups(lesions, sha256)
    split = np.full(len(frame), "train", dtype=object)
    # each class keeps a lesion in test and val and two in train (so train can be
    # cross-validated): 4 lesions at least
    for label, n in lesions_per_class(labels, groups).items():
        _check_sides(dataset.classes[int(label)], n, MIN_LESIONS_PER_CLASS,
                     "train/val/test split")
    test = grouped_holdout(labels, groups, fractions[2], seed, "test split", min_rest=3,
                           classes=dataset.classes)
    split[test] = "test"
    rest = np.flatnonzero(~test)
    val_frac = fractions[1] / (fractions[0] + fractions[1])
    val = grouped_holdout(labels[rest], groups[rest], val_frac, seed + 1, "val split",
                          min_rest=2, classes=dataset.classes)
    split[rest[val]] = "val"
    return pd.DataFrame({
        "image_id": frame["image_id"].to_numpy(),
        "lesion_id": lesions,
        "dx": frame["dx"].to_numpy(),
        "split": split,
    })


def _duplicate_groups(lesions: np.ndarray, sha256: Sequence[str]) -> np.ndarray:
    """Lesion ids with exact duplicates joined (``fingerprint.merge_duplicate_groups``),
    saying in one warning line how many pairs and lesions that joined."""
    groups, n_pairs, n_folded = merge_duplicate_groups(lesions, sha256)
    if n_pairs:
        warn_once(f"train/val/test split: {n_pairs} pair(s) of byte-identical images carry "
                  f"different lesion ids; {n_folded} lesion id(s) joined another's group, so "
                  f"each picture lies in one split only", key=f"split-duplicates:{n_pairs}")
    return groups


def split_path(workdir: Path | str, seed: int) -> Path:
    """``<workdir>/splits/split_seed<seed>.csv``."""
    return splits_dir(workdir) / f"split_seed{seed}.csv"


def load_or_make_split(dataset: Dataset, workdir: Path | str, seed: int = 0) -> pd.DataFrame:
    """Reuse the persisted split for ``seed`` if it was made from these labels, else make and
    save it.

    The cache is keyed by the content it was made from: the split file holds each image's
    ``lesion_id`` and ``dx``, and a file whose values differ from the labels' now (an edited
    lesion id or class), or that puts exact duplicates (``lesionlab.fingerprint``, cached in
    ``workdir``) on two sides, is made again, with a warning saying why.

    Args:
        dataset: the labelled images.
        workdir: the folder holding ``splits/`` (and the fingerprint cache).
        seed: the split seed.

    Returns:
        (n_images, 4) frame: ``image_id``, ``lesion_id``, ``dx``, ``split`` (train/val/test).

    Raises:
        LesionLabError: the split file lists another image set, or see :func:`make_split`.
    """
    path = split_path(workdir, seed)
    sha256 = dataset_sha256(dataset, workdir)
    if path.exists():
        split = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str})
        if set(split["image_id"]) != set(dataset.frame["image_id"]):
            raise LesionLabError(
                f"split file {path} was made for a different image set "
                f"({len(split)} images vs {len(dataset)} now); delete it or use another --workdir")
        stale = _stale_reason(split, dataset, sha256)
        if stale is None:
            return split
        warn_once(f"split file {path} is stale ({stale}); made a new split from the labels "
                  f"now (models trained on the old one keep their own image lists)",
                  key=f"stale-split:{path}")
    split = make_split(dataset, seed, sha256=sha256)
    with atomic_path(path) as tmp:
        split.to_csv(tmp, index=False)
    return split


def dataset_sha256(dataset: Dataset, workdir: Path | str) -> np.ndarray:
    """(n_images,) sha256 of each image of ``dataset``, cached in ``<workdir>/fingerprints``."""
    prints = folder_fingerprints(dataset.frame["path"].tolist(), dataset.root, workdir)
    return prints["sha256"].to_numpy(dtype=str)


def _stale_reason(split: pd.DataFrame, dataset: Dataset, sha256: np.ndarray) -> str | None:
    """Why a persisted split (of the same images) no longer fits the labels; None if it does."""
    frame = dataset.frame
    old = split.set_index("image_id").reindex(frame["image_id"])
    changed = [f"{int(n)} {col} value(s) changed" for col, n in (
        ("lesion_id", (old["lesion_id"].astype(str).to_numpy()
                       != frame["lesion_id"].astype(str).to_numpy()).sum()),
        ("dx", (old["dx"].astype(str).to_numpy() != frame["dx"].astype(str).to_numpy()).sum()))
        if n]
    if changed:
        return ", ".join(changed)
    sides = pd.DataFrame({"h": sha256, "s": old["split"].to_numpy()}).groupby("h")["s"]
    crossing = int((sides.nunique() > 1).sum())
    if crossing:
        return f"{crossing} exact-duplicate image(s) lie on two sides"
    return None


def class_counts(split: pd.DataFrame) -> pd.DataFrame:
    """Per-split class counts table (rows: split, columns: the split's class set + total).

    Args:
        split: (n_images, 4) a split frame (``image_id``, ``lesion_id``, ``dx``, ``split``).

    Returns:
        (3, n_classes + 2) counts: rows train, val, test; a column per class, ``total``
        (images) and ``lesions``.
    """
    table = pd.crosstab(split["split"], split["dx"]).reindex(
        index=list(SPLITS), columns=list(class_set(split["dx"])), fill_value=0)
    table["total"] = table.sum(axis=1)
    table["lesions"] = split.groupby("split")["lesion_id"].nunique().reindex(list(SPLITS))
    return table


def grouped_folds(labels: np.ndarray, groups: np.ndarray, n_folds: int, seed: int,
                  purpose: str = "CV folds", allow_fewer: bool = True,
                  keep_singletons: bool = False,
                  classes: Sequence[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Lesion-grouped stratified K folds as (train_idx, val_idx) pairs.

    The fold count comes from :func:`fold_count` (fewer than ``n_folds``, with a warning, when
    a class has fewer lesions; an error when one has fewer than 2).

    Args:
        labels: (n_images,) class labels.
        groups: (n_images,) lesion ids.
        n_folds: folds asked for.
        seed: seeds ``StratifiedGroupKFold``'s shuffle.
        purpose: what the folds are for, named in messages.
        allow_fewer: see :func:`fold_count`.
        keep_singletons: a class with a single lesion is no error: that lesion goes into
            every fold's training part and no val part (so it is trained on, never scored),
            with a counted warning. For tuning CV, where a fold only has to train on every
            class; never for out-of-fold predictions.
        classes: the class names integer labels index, for messages (default ``CLASSES``).

    Returns:
        k pairs of row-index arrays; every row is in at most one val part (exactly one,
        but for kept singletons).

    Raises:
        LesionLabError: see :func:`fold_count`.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    rows = np.arange(len(labels))
    if keep_singletons:
        counts = lesions_per_class(labels, groups)
        single = [c for c, m in counts.items() if m == 1]
        if single:
            warn_once(f"{purpose}: " + ", ".join(f"class {_class_name(c, classes)}"
                                                 for c in single)
                      + " has a single lesion: trained on in every fold, scored in none",
                      key=f"singletons:{purpose}")
            rows = rows[~np.isin(groups, groups[np.isin(labels, single)])]
    k = fold_count(labels[rows], groups[rows], n_folds, purpose, allow_fewer, classes)
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    kept = np.setdiff1d(np.arange(len(labels)), rows)
    with warnings.catch_warnings():  # every class has >= k lesions, so >= k images
        warnings.simplefilter("ignore", UserWarning)
        folds = sgkf.split(np.zeros(len(rows)), labels[rows], groups[rows])
        return [(np.sort(np.concatenate([rows[tr], kept])), rows[va]) for tr, va in folds]


def train_fraction(labels: np.ndarray, groups: np.ndarray, fraction: float,
                   seed: int) -> np.ndarray:
    """Indices of a lesion-grouped, stratified subset holding about ``fraction`` of the rows.

    Args:
        labels: (n_rows,) class indices.
        groups: (n_rows,) lesion id of each row.
        fraction: share of the rows to keep, in (0, 1].
        seed: the subset's seed.

    Returns:
        (m,) sorted row indices, m about ``fraction * n_rows``; every row for 1.0.

    Raises:
        LesionLabError: ``fraction`` is outside (0, 1], or a class has too few lesions to keep
            two of them (see :func:`grouped_holdout`).
    """
    if not 0.0 < fraction <= 1.0:
        raise LesionLabError(f"train fraction must be in (0, 1], got {fraction}")
    if fraction >= 1.0:
        return np.arange(len(labels))
    # two lesions of every class, so the subset can still be cross-validated
    return np.flatnonzero(grouped_holdout(labels, groups, fraction, seed,
                                          f"{fraction:.0%} training fraction", min_held=2,
                                          min_rest=0))


def split_indices(dataset: Dataset, split: pd.DataFrame, train_frac: float = 1.0,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of ``dataset`` in train, val and test; train optionally subsampled by lesion.

    The one place heads and fine-tuning turn a split file into rows, so both see the same sets.

    Args:
        dataset: the labelled images.
        split: (n_images, 4) its split frame (:func:`load_or_make_split`).
        train_frac: share of train's rows kept, by lesion, in (0, 1].
        seed: seed of that subset.

    Returns:
        (train, val, test): (n_train,), (n_val,), (n_test,) int row indices into ``dataset``.

    Raises:
        LesionLabError: ``train_frac`` <= 0, or too few lesions of a class for the subset
            (:func:`train_fraction`).
    """
    where = dataset.frame["image_id"].map(split.set_index("image_id")["split"]).to_numpy()
    tr, va, te = (np.flatnonzero(where == s) for s in SPLITS)
    if train_frac < 1.0:
        groups = dataset.frame["lesion_id"].astype(str).to_numpy()
        tr = tr[train_fraction(dataset.labels[tr], groups[tr], train_frac, seed)]
    return tr, va, te


@dataclass
class SplitCommandConfig:
    """Options of ``python -m lesionlab.splits`` (beyond the data ones)."""

    split_seed: int = option(0, "seed of the split", ge=0, le=2**32 - 1)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m lesionlab.splits``."""
    p = make_parser("python -m lesionlab.splits",
                    "Make (or show) the lesion-grouped train/val/test split.")
    add_data_args(p)
    add_config_args(p, SplitCommandConfig)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Create or load the split and print per-split class counts."""
    args = build_parser().parse_args(argv)
    dataset = ensure_data(resolve_data(args), **label_options(args))
    split = load_or_make_split(dataset, args.workdir, args.split_seed)
    print(f"split: {split_path(args.workdir, args.split_seed)}  ({len(dataset)} images, "
          f"{dataset.frame['lesion_id'].nunique()} lesions)")
    print(class_counts(split).to_string())
    return 0


if __name__ == "__main__":
    run_main(main)
