"""Stratified, lesion-grouped train/val/test splits and K-fold iterators.

One lesion is often photographed several times (10,015 images of 7,470 lesions), so every
split groups by ``lesion_id``: no lesion ever sits on both sides of a split.
"""

from __future__ import annotations

from pathlib import Path
import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from lesionlab.artifacts import atomic_path, splits_dir
from lesionlab.data import CLASSES, Dataset
from lesionlab.errors import LesionLabError

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.70, 0.15, 0.15)


def _grouped_holdout(labels: np.ndarray, groups: np.ndarray, fraction: float,
                     seed: int) -> np.ndarray:
    """Boolean mask of a stratified, grouped holdout of about ``fraction`` of the rows.

    Uses ``StratifiedGroupKFold`` with round(1 / fraction) folds and keeps one fold.
    """
    n_splits = max(2, int(round(1.0 / fraction)))
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, hold = next(sgkf.split(np.zeros(len(labels)), labels, groups))
    mask = np.zeros(len(labels), dtype=bool)
    mask[hold] = True
    return mask


def make_split(dataset: Dataset, seed: int = 0,
               fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> pd.DataFrame:
    """Assign each image to train/val/test, stratified by dx and grouped by lesion_id."""
    frame = dataset.frame
    if not np.isclose(sum(fractions), 1.0):
        raise LesionLabError(f"split fractions must sum to 1, got {fractions}")
    labels = frame["label"].to_numpy()
    groups = frame["lesion_id"].astype(str).to_numpy()
    split = np.full(len(frame), "train", dtype=object)
    test = _grouped_holdout(labels, groups, fractions[2], seed)
    split[test] = "test"
    rest = np.flatnonzero(~test)
    val_frac = fractions[1] / (fractions[0] + fractions[1])
    val = _grouped_holdout(labels[rest], groups[rest], val_frac, seed + 1)
    split[rest[val]] = "val"
    return pd.DataFrame({
        "image_id": frame["image_id"].to_numpy(),
        "lesion_id": groups,
        "dx": frame["dx"].to_numpy(),
        "split": split,
    })


def split_path(workdir: Path | str, seed: int) -> Path:
    """``<workdir>/splits/split_seed<seed>.csv``."""
    return splits_dir(workdir) / f"split_seed{seed}.csv"


def load_or_make_split(dataset: Dataset, workdir: Path | str, seed: int = 0) -> pd.DataFrame:
    """Reuse the persisted split for ``seed`` if it matches the dataset, else make and save it."""
    path = split_path(workdir, seed)
    if path.exists():
        split = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str})
        if set(split["image_id"]) != set(dataset.frame["image_id"]):
            raise LesionLabError(
                f"split file {path} was made for a different image set "
                f"({len(split)} images vs {len(dataset)} now); delete it or use another --workdir")
        return split
    split = make_split(dataset, seed)
    with atomic_path(path) as tmp:
        split.to_csv(tmp, index=False)
    return split


def class_counts(split: pd.DataFrame) -> pd.DataFrame:
    """Per-split class counts table (rows: split, columns: classes + total)."""
    table = pd.crosstab(split["split"], split["dx"]).reindex(
        index=list(SPLITS), columns=list(CLASSES), fill_value=0)
    table["total"] = table.sum(axis=1)
    table["lesions"] = split.groupby("split")["lesion_id"].nunique().reindex(list(SPLITS))
    return table


def grouped_folds(labels: np.ndarray, groups: np.ndarray, n_folds: int,
                  seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Lesion-grouped stratified K folds as (train_idx, val_idx) pairs."""
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return list(sgkf.split(np.zeros(len(labels)), labels, groups))


def train_fraction(labels: np.ndarray, groups: np.ndarray, fraction: float,
                   seed: int) -> np.ndarray:
    """Indices of a lesion-grouped, stratified subset holding about ``fraction`` of the rows."""
    if not 0.0 < fraction <= 1.0:
        raise LesionLabError(f"train fraction must be in (0, 1], got {fraction}")
    if fraction >= 1.0:
        return np.arange(len(labels))
    return np.flatnonzero(_grouped_holdout(labels, groups, fraction, seed))


def split_indices(dataset: Dataset, split: pd.DataFrame, train_frac: float = 1.0,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of ``dataset`` in train, val and test; train optionally subsampled by lesion.

    The one place heads and fine-tuning turn a split file into rows, so both see the same sets.
    """
    where = dataset.frame["image_id"].map(split.set_index("image_id")["split"]).to_numpy()
    tr, va, te = (np.flatnonzero(where == s) for s in SPLITS)
    if train_frac < 1.0:
        groups = dataset.frame["lesion_id"].astype(str).to_numpy()
        tr = tr[train_fraction(dataset.labels[tr], groups[tr], train_frac, seed)]
    return tr, va, te
