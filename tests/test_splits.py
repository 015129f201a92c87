"""Lesion-grouped, stratified splits and folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lesionlab.data import CLASSES, load_dataset
from lesionlab.splits import (class_counts, grouped_folds, load_or_make_split, make_split,
                              split_path, train_fraction)
from lesionlab.errors import LesionLabError

TOLERANCE = 0.02  # class share in each split within 2 percentage points of the whole set


def _assert_no_lesion_crosses(split: pd.DataFrame) -> None:
    per_lesion = split.groupby("lesion_id")["split"].nunique()
    assert (per_lesion == 1).all(), per_lesion[per_lesion > 1].index.tolist()[:5]


def test_fixture_split_grouped_and_reused(fixture_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset(fixture_dir)
    split = load_or_make_split(ds, tmp_path, seed=3)
    assert split_path(tmp_path, 3).exists()
    _assert_no_lesion_crosses(split)
    assert set(split["split"]) == {"train", "val", "test"}
    assert len(split) == len(ds)
    # persisted file is reused verbatim, and the same seed gives an identical file
    again = load_or_make_split(ds, tmp_path, seed=3)
    pd.testing.assert_frame_equal(split, again)
    other = tmp_path / "other"
    load_or_make_split(ds, other, seed=3)
    assert split_path(other, 3).read_bytes() == split_path(tmp_path, 3).read_bytes()
    assert not make_split(ds, seed=4)["split"].equals(split["split"])


def test_split_for_other_images_is_refused(data_copy: Path, tmp_path: Path) -> None:
    load_or_make_split(load_dataset(data_copy), tmp_path)
    meta = pd.read_csv(data_copy / "HAM10000_metadata.csv")
    meta.iloc[:-2].to_csv(data_copy / "HAM10000_metadata.csv", index=False)
    with pytest.raises(LesionLabError, match="different image set"):
        load_or_make_split(load_dataset(data_copy), tmp_path)


def test_folds_are_grouped(fixture_dir: Path) -> None:
    ds = load_dataset(fixture_dir)
    groups = ds.frame["lesion_id"].to_numpy()
    folds = grouped_folds(ds.labels, groups, 3, seed=0)
    assert len(folds) == 3
    seen_val = np.concatenate([va for _, va in folds])
    assert sorted(seen_val) == list(range(len(ds)))  # each image validated exactly once
    for tr, va in folds:
        assert not set(groups[tr]) & set(groups[va])


def test_train_fraction_grouped(fixture_dir: Path) -> None:
    ds = load_dataset(fixture_dir)
    groups = ds.frame["lesion_id"].to_numpy()
    idx = train_fraction(ds.labels, groups, 0.5, seed=0)
    assert 0.3 * len(ds) < len(idx) < 0.7 * len(ds)
    inside = set(groups[idx])
    outside = set(np.delete(groups, idx))
    assert not inside & outside
    assert len(train_fraction(ds.labels, groups, 1.0, 0)) == len(ds)


def test_full_set_split(full_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset(full_dir)
    split = load_or_make_split(ds, tmp_path, seed=0)
    _assert_no_lesion_crosses(split)
    counts = class_counts(split)
    assert (counts[list(CLASSES)] > 0).all().all(), "every class in every split"
    overall = split["dx"].value_counts(normalize=True)
    for name in ("train", "val", "test"):
        share = split.loc[split["split"] == name, "dx"].value_counts(normalize=True)
        assert (share.reindex(CLASSES) - overall.reindex(CLASSES)).abs().max() < TOLERANCE
    sizes = split["split"].value_counts(normalize=True)
    assert abs(sizes["train"] - 0.70) < 0.03
    assert abs(sizes["val"] - 0.15) < 0.02 and abs(sizes["test"] - 0.15) < 0.02
