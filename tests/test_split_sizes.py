"""Lesion-grouped stratified splits when a class has few lesions (1, 2, k-1, k), at every call
site: the train/val/test split, head-tuning CV folds, the inner early-stopping split, K-fold
fine-tuning and training fractions.

Every test runs with ``StratifiedGroupKFold`` replaced by a strict wrapper that raises if it is
ever asked for more folds than a class has images, so the outcome never depends on whether the
installed scikit-learn warns or raises there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import StratifiedGroupKFold

import lesionlab.splits as splits
from lesionlab.data import CLASSES
from lesionlab.errors import LesionLabError, flush_warnings, warning_counts
from lesionlab.splits import fold_count, grouped_folds, make_split, train_fraction
from models.finetune import FinetuneConfig, cv_rows
from models.heads import early_stopping_split

RARE = CLASSES.index("df")


class StrictSGKF(StratifiedGroupKFold):
    """StratifiedGroupKFold that refuses what some scikit-learn versions only warn about."""

    def split(self, X, y=None, groups=None):  # noqa: N803 - scikit-learn's signature
        counts = np.bincount(np.asarray(y))
        if self.n_splits > counts[counts > 0].min():
            raise AssertionError(f"asked for {self.n_splits} folds of a class with "
                                 f"{counts[counts > 0].min()} images")
        return super().split(X, y, groups)


@pytest.fixture(autouse=True)
def strict_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(splits, "StratifiedGroupKFold", StrictSGKF)
    flush_warnings()


def make_labels(n_rare: int, n_common: int = 30, images_per_lesion: int = 2,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and lesion ids: class df with ``n_rare`` lesions, the others ``n_common`` each."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for c in range(len(CLASSES)):
        for lesion in range(n_rare if c == RARE else n_common):
            k = int(rng.integers(1, images_per_lesion + 1))
            labels += [c] * k
            groups += [f"L{c}_{lesion}"] * k
    return np.array(labels), np.array(groups)


def assert_grouped(mask_or_parts: list[np.ndarray], groups: np.ndarray) -> None:
    """No lesion in two parts; together the parts cover every row once."""
    seen: set[str] = set()
    for part in mask_or_parts:
        lesions = set(groups[part])
        assert not lesions & seen
        seen |= lesions
    assert sorted(np.concatenate(mask_or_parts)) == list(range(len(groups)))


def rare_warnings() -> list[str]:
    return [k for k in warning_counts() if ":df:" in k or k.startswith("holdout:")]


@dataclass
class FakeDataset:
    frame: pd.DataFrame
    classes: tuple[str, ...] = CLASSES

    @property
    def labels(self) -> np.ndarray:
        return self.frame["label"].to_numpy()


def fake_dataset(n_rare: int) -> FakeDataset:
    y, g = make_labels(n_rare)
    return FakeDataset(pd.DataFrame({"image_id": [f"I{i}" for i in range(len(y))],
                                     "lesion_id": g, "label": y,
                                     "dx": [CLASSES[i] for i in y]}))


# --- train/val/test split (a class needs 2 lesions in train, 1 in val, 1 in test) -------

@pytest.mark.parametrize("n_rare", [1, 2, 3])
def test_split_refuses_class_with_too_few_lesions(n_rare: int) -> None:
    with pytest.raises(LesionLabError, match=rf"train/val/test split: class df has {n_rare} "
                                             rf"lesions?; .* at least 4"):
        make_split(fake_dataset(n_rare), seed=0)


@pytest.mark.parametrize("n_rare", [4, 6, 7])  # 4 = the minimum; 7 = the test holdout's folds
def test_split_keeps_rare_class_on_every_side(n_rare: int,
                                              caplog: pytest.LogCaptureFixture) -> None:
    ds = fake_dataset(n_rare)
    with caplog.at_level("WARNING"):
        split = make_split(ds, seed=0)
    assert (split.groupby("lesion_id")["split"].nunique() == 1).all()
    per_side = split[split["dx"] == "df"].groupby("split")["lesion_id"].nunique()
    assert per_side["train"] >= 2 and per_side["val"] >= 1 and per_side["test"] >= 1
    assert per_side.sum() == n_rare
    said = [r.getMessage() for r in caplog.records if "test split" in r.getMessage()]
    if n_rare < 7:  # fewer lesions than the 15% holdout's 7 folds: said once, by name
        assert said == [f"warning: test split: class df has {n_rare} lesions, fewer than the 7 "
                        f"folds of a 15% stratified holdout; their lesions were drawn at random "
                        f"(each class keeps >= 1 held out and >= 3 outside)"]
    else:
        assert said == []
    assert abs((split["split"] == "test").mean() - 0.15) < 0.05


def test_split_unchanged_when_every_class_is_common() -> None:
    """With enough lesions everywhere the split is plain StratifiedGroupKFold's, as before."""
    ds = fake_dataset(30)
    y, g = ds.labels, ds.frame["lesion_id"].to_numpy()
    sgkf = StratifiedGroupKFold(n_splits=7, shuffle=True, random_state=0)
    _, hold = next(sgkf.split(np.zeros(len(y)), y, g))
    split = make_split(ds, seed=0)
    assert sorted(np.flatnonzero(split["split"] == "test")) == sorted(hold)
    assert not rare_warnings()


# --- CV folds of head tuning (fold_count / grouped_folds) --------------------------------

def test_cv_folds_one_lesion_is_an_error() -> None:
    y, g = make_labels(1)
    with pytest.raises(LesionLabError, match="head tuning CV: class df has 1 lesion"):
        grouped_folds(y, g, 5, 0, "head tuning CV")


@pytest.mark.parametrize("n_rare,expected", [(2, 2), (4, 4), (5, 5), (9, 5)])
def test_cv_folds_shrink_to_the_rarest_class(n_rare: int, expected: int) -> None:
    y, g = make_labels(n_rare)
    folds = grouped_folds(y, g, 5, 0, "head tuning CV")
    assert len(folds) == expected
    assert_grouped([va for _, va in folds], g)
    for tr, va in folds:  # every class trains in every fold
        assert set(y[tr]) == set(range(len(CLASSES)))
        assert RARE in set(y[va])  # and the rare class is scored in every fold
    assert bool([k for k in warning_counts() if k.startswith("fold_count:")]) == (n_rare < 5)


def test_fold_count_message_names_class_and_count(caplog: pytest.LogCaptureFixture) -> None:
    y, g = make_labels(3)
    with caplog.at_level("WARNING"):
        assert fold_count(y, g, 5, "head tuning CV") == 3
        assert fold_count(y, g, 5, "head tuning CV") == 3  # the repeat is counted, not shown
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["warning: head tuning CV: class df has only 3 lesions; using 3 folds "
                     "instead of 5"]


# --- the inner early-stopping split (fit rows must hold every class) --------------------

@pytest.mark.parametrize("n_rare", [1, 2, 4, 5])
def test_early_stopping_split_keeps_every_class_in_fit_rows(n_rare: int) -> None:
    y, g = make_labels(n_rare)
    fit, stop = early_stopping_split(y, g, seed=0)
    assert_grouped([fit, stop], g)
    assert set(y[fit]) == set(range(len(CLASSES)))
    n_stop_rare = len(set(g[stop][y[stop] == RARE]))
    assert n_stop_rare == {1: 0, 2: 0, 4: 1, 5: 1}[n_rare]
    assert 0.12 < len(stop) / len(y) < 0.28


# --- K-fold fine-tuning (the fold count names the networks: never silently fewer) --------

@pytest.mark.parametrize("n_rare", [1, 2])
def test_kfold_refuses_more_folds_than_lesions(n_rare: int) -> None:
    ds = fake_dataset(n_rare)
    cfg = FinetuneConfig(cv_folds=3, cv_fold=0)
    with pytest.raises(LesionLabError, match=f"3-fold fine-tuning: class df has {n_rare} "):
        cv_rows(ds, np.arange(len(ds.frame)), cfg)


@pytest.mark.parametrize("n_rare", [3, 4])
def test_kfold_folds_cover_train_once(n_rare: int) -> None:
    ds = fake_dataset(n_rare)
    tr = np.arange(len(ds.frame))
    held = [cv_rows(ds, tr, FinetuneConfig(cv_folds=3, cv_fold=k))[1] for k in range(3)]
    g = ds.frame["lesion_id"].to_numpy()
    assert_grouped(held, g)
    assert all(RARE in set(ds.labels[h]) for h in held)


# --- training fractions (the subset must hold every class) ------------------------------

def test_train_fraction_refuses_a_class_it_cannot_cross_validate() -> None:
    y, g = make_labels(1)
    with pytest.raises(LesionLabError, match="10% training fraction: class df has 1 lesion"):
        train_fraction(y, g, 0.1, seed=0)


@pytest.mark.parametrize("n_rare", [2, 9, 10])
def test_train_fraction_keeps_two_lesions_of_every_class(n_rare: int) -> None:
    y, g = make_labels(n_rare)
    idx = train_fraction(y, g, 0.1, seed=0)
    rest = np.setdiff1d(np.arange(len(y)), idx)
    assert_grouped([idx, rest], g)
    for c in range(len(CLASSES)):  # two lesions each, so its CV has 2 folds at least
        assert len(set(g[idx][y[idx] == c])) >= 2
    assert len(set(g[idx][y[idx] == RARE])) == 2
    assert bool(warning_counts().get("holdout:10% training fraction")) == (n_rare < 10)
    assert 0.07 < len(idx) / len(y) < 0.2


def test_tuning_cv_trains_on_a_single_lesion_class_and_never_scores_it() -> None:
    """Head tuning on a small training set (a fold network's held-out rows, say): a class with
    one lesion is trained on in every fold and scored in none, with one warning."""
    y, g = make_labels(1)
    folds = grouped_folds(y, g, 5, 0, "head tuning CV", keep_singletons=True)
    assert len(folds) == 5
    rare_rows = np.flatnonzero(y == RARE)
    for tr, va in folds:
        assert set(rare_rows) <= set(tr) and not set(rare_rows) & set(va)
        assert not set(g[tr]) & set(g[va])
    scored = np.sort(np.concatenate([va for _, va in folds]))
    assert list(scored) == sorted(set(range(len(y))) - set(rare_rows))
    assert warning_counts() == {"singletons:head tuning CV": 1}


@pytest.mark.parametrize("head", ["logreg", "lightgbm"])
def test_smote_fold_with_a_single_image_class_fits(head: str) -> None:
    """A class with 2 lesions in train leaves 1 image in some CV training part: SMOTE
    oversamples the others, keeps that one row, and says so once."""
    from models.heads import build_pipeline, default_params, fit_fold

    rng = np.random.default_rng(0)
    y = np.array([0] * 20 + [1] * 12 + [2] * 6 + [3] * 1 + [4] * 8 + [5] * 40 + [6] * 5)
    x = rng.normal(size=(len(y), 16)) + y[:, None]
    pipe = build_pipeline(head, "smote", default_params(head, 16), seed=0)
    proba, _ = fit_fold(pipe, x, y, x[:7], y[:7], groups_tr=np.arange(len(y)), seed=0)
    assert proba.shape == (7, 7) and np.allclose(proba.sum(axis=1), 1.0)
    assert warning_counts().get("smote_single_image") == 1
    smote = pipe.named_steps["smote"]
    assert smote.sampling_strategy == {0: 40, 1: 40, 2: 40, 4: 40, 6: 40} or head == "lightgbm"
