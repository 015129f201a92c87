"""Heads: tiny-budget tuning, SMOTE only inside training parts, save/reload, predict CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from featurize.extract import FeaturizeConfig, featurize
from lesionlab.data import CLASSES, load_dataset
from lesionlab.errors import LesionLabError
from models import heads
from models.bundle import load_card, load_head
from models.train_design import load_design
from models.design import card_design
from models.predict import images_dataset, predict_images
from models.train_head import HeadConfig, train_head
from tests.conftest import run_module


@pytest.fixture(scope="module")
def featurized(tmp_path_factory) -> tuple[Path, Path]:
    """Fixture data with classical features computed once for this module."""
    from tests.conftest import FIXTURE

    work = tmp_path_factory.mktemp("work")
    featurize(load_dataset(FIXTURE), work, FeaturizeConfig(backbone="classical", num_workers=0))
    return FIXTURE, work


class Recorder(LogisticRegression):
    """Logistic regression that remembers what it was fitted on and asked to predict."""

    fitted: list[int] = []
    predicted: list[np.ndarray] = []

    def fit(self, x, y, sample_weight=None):
        Recorder.fitted.append(len(x))
        return super().fit(x, y, sample_weight)

    def predict_proba(self, x):
        Recorder.predicted.append(np.asarray(x).copy())
        return super().predict_proba(x)


def test_smote_never_reaches_evaluation(featurized) -> None:
    data, work = featurized
    ds = load_dataset(data)
    x = load_design(work, ds, "classical").x
    y = ds.labels
    order = np.random.default_rng(0).permutation(87)
    tr, va = order[:60], order[60:]
    pipe = heads.build_pipeline("logreg", "smote", {"C": 1.0, "pca": 0}, seed=0)
    pipe.steps[-1] = ("clf", Recorder(max_iter=500))
    Recorder.fitted, Recorder.predicted = [], []
    proba, _ = heads.fit_fold(pipe, x[tr], y[tr], x[va], y[va])
    counts = np.bincount(y[tr], minlength=7)
    assert Recorder.fitted == [(counts > 0).sum() * counts.max()]  # training part oversampled
    assert Recorder.fitted[0] > len(tr)
    assert Recorder.predicted[0].shape[0] == len(va)      # evaluation: original rows only
    want = pipe.named_steps["scale"].transform(pipe.named_steps["impute"].transform(x[va]))
    np.testing.assert_allclose(Recorder.predicted[0], want)
    # the saved-model path (imblearn Pipeline) also skips SMOTE at prediction time
    Recorder.predicted = []
    pipe.fit(x[tr], y[tr])
    assert pipe.predict_proba(x[va]).shape == (len(va), len(np.unique(y[tr])))
    assert Recorder.predicted[-1].shape[0] == len(va)
    assert proba.shape == (len(va), 7)


@pytest.mark.parametrize("head, imbalance", [("logreg", "smote"), ("lightgbm", "class_weight")])
def test_train_head_tiny_budget_and_reload(featurized, tmp_path: Path, head: str,
                                           imbalance: str) -> None:
    from lesionlab.metrics import balanced_accuracy, expected_calibration_error
    from models.heads import HeadModel, apply_prior_correction

    data, work = featurized
    wd = tmp_path / "w"
    shutil.copytree(work, wd)
    ds = load_dataset(data)
    cfg = HeadConfig(features="classical", head=head, imbalance=imbalance, metadata=True,
                     trials=3, folds=2, n_boot=50)
    card = train_head(ds, wd, cfg)
    folder = wd / "models" / card.name
    assert (folder / "study.db").exists() and (folder / "head.skops").exists()
    assert not list(folder.glob("*.joblib")) and not list(folder.glob("*.pkl"))
    assert card.details.n_trials == 3 and card.tune_time_s > 0
    assert set(card.test["ci95"]) >= {"balanced_accuracy", "macro_auc"}
    assert card.details.n_features == 75 + 17  # classical + age/sex/localization
    model = load_head(folder)
    assert isinstance(model, HeadModel) and model.decision_rule_ == card.decision_rule
    assert model.temperature_ == pytest.approx(card.temperature)
    design = load_design(wd, ds, "classical", metadata=True)
    test_rows = ds.frame["image_id"].isin(card.test_image_ids).to_numpy()
    y_test = ds.labels[test_rows]
    # the card's headline numbers are those of the stored probabilities
    stored = np.load(folder / "test_proba.npy")
    assert card.test["balanced_accuracy"] == pytest.approx(
        balanced_accuracy(y_test, stored.argmax(1)))
    assert card.test["n"] == int(test_rows.sum())
    # "uncalibrated" ECE is measured before the temperature, after the decision rule only
    raw = model.raw_proba(design.x[test_rows])
    if model.decision_rule_ == "prior_corrected":
        raw = apply_prior_correction(raw, model.prior_)
    assert card.test["ece_uncalibrated"] == pytest.approx(expected_calibration_error(y_test, raw))
    # reload predicts identically on the stored test rows
    np.testing.assert_allclose(model.predict_proba(design.x[test_rows]), stored, atol=1e-10)
    # features recomputed from images (predict's path) equal the cached ones
    sub = ds.frame[test_rows]
    recomputed = card_design(load_card(folder), images_dataset(sub["path"].tolist(), sub))
    np.testing.assert_allclose(recomputed, design.x[test_rows], rtol=1e-5, atol=1e-5)
    # rerun: study resumes with no new trials, same numbers
    again = train_head(ds, wd, cfg)
    assert again.details.n_trials == 3 and again.tune_time_s == 0.0
    assert again.test["balanced_accuracy"] == card.test["balanced_accuracy"]


def test_predict_cli_format_and_bad_image(featurized, tmp_path: Path, capsys) -> None:
    data, work = featurized
    wd = tmp_path / "w"
    shutil.copytree(work, wd)
    card = train_head(load_dataset(data), wd,
                      HeadConfig(features="classical", head="logreg", trials=1, folds=2,
                                 n_boot=0))
    imgs = sorted((data / "images").glob("*.jpg"))[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"garbage")
    proc = run_module(capsys, "models.predict", "--model", str(wd / "models" / card.name),
                      str(imgs[0]), str(bad), str(imgs[1]))
    assert proc.returncode == 1
    lines = [json.loads(text) for text in proc.stdout.strip().splitlines()]
    assert [line["path"] for line in lines] == [str(imgs[0]), str(bad), str(imgs[1])]
    assert "error" in lines[1] and "broken.jpg" in lines[1]["error"]
    for line in (lines[0], lines[2]):
        assert set(line["probabilities"]) == set(CLASSES)
        assert abs(sum(line["probabilities"].values()) - 1) < 1e-4
        assert line["prediction"] == max(line["probabilities"], key=line["probabilities"].get)
        assert line["name"]
    assert "broken.jpg" in proc.stderr


def test_bad_feature_key_and_options(featurized, tmp_path: Path, capsys) -> None:
    data, work = featurized
    ds = load_dataset(data)
    with pytest.raises(LesionLabError, match="no computed features match 'tf_efficientnet_lite1'"):
        train_head(ds, work, HeadConfig(features="classical+tf_efficientnet_lite1"))
    with pytest.raises(LesionLabError, match="unknown --head"):
        train_head(ds, work, HeadConfig(features="classical", head="svm"))
    proc = run_module(capsys, "models.train_head", "--features", "nothing", "--data", str(data),
                      "--workdir", str(tmp_path))
    assert proc.returncode == 2 and "no computed features" in proc.stderr
    assert "Traceback" not in proc.stderr
    with pytest.raises(LesionLabError, match="not a lesionlab model folder"):
        predict_images(tmp_path, [str(next((data / "images").glob("*.jpg")))])


def test_card_train_and_test_lesions_are_disjoint(featurized, tmp_path: Path) -> None:
    """Leakage check on a real model card: no lesion on both sides."""
    data, work = featurized
    wd = tmp_path / "w"
    shutil.copytree(work, wd)
    ds = load_dataset(data)
    card = train_head(ds, wd, HeadConfig(features="classical", trials=1, folds=2, n_boot=0))
    lesion = ds.frame.set_index("image_id")["lesion_id"]
    train_lesions = set(lesion[card.train_image_ids])
    test_lesions = set(lesion[card.test_image_ids])
    assert train_lesions and test_lesions and not train_lesions & test_lesions
    assert card.n_train == len(card.train_image_ids) and card.n_test == len(card.test_image_ids)


def test_temperature_equals_scikit_learns() -> None:
    """fit_temperature finds the T of CalibratedClassifierCV(method='temperature')."""
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator

    class Given(ClassifierMixin, BaseEstimator):
        def fit(self, x, y=None):
            self.classes_ = np.arange(7)
            return self

        def predict_proba(self, x):
            return np.asarray(x)

        def predict(self, x):
            return np.asarray(x).argmax(1)

    rng = np.random.default_rng(0)
    for true_t in (0.3, 2.5):
        z = rng.normal(size=(400, 7)) * 3
        q = np.exp(z / true_t)
        y = np.array([rng.choice(7, p=r / r.sum()) for r in q])
        proba = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        cal = CalibratedClassifierCV(FrozenEstimator(Given().fit(None)), method="temperature")
        cal.fit(proba, y)
        beta = float(cal.calibrated_classifiers_[0].calibrators[0].beta_)
        assert heads.fit_temperature(proba, y) == pytest.approx(1 / beta, rel=1e-4)
        assert heads.fit_temperature(proba, y) == pytest.approx(true_t, rel=0.25)


def test_lightgbm_stops_early_on_training_rows_only(featurized) -> None:
    """The rows LightGBM early-stops on come from the fold's training part, grouped by lesion,
    and are disjoint from the rows the fold is scored on."""
    import lightgbm as lgb

    from lesionlab.splits import grouped_folds

    class Recorder(lgb.LGBMClassifier):
        eval_x: list[np.ndarray] = []

        def fit(self, x, y, **kwargs):
            Recorder.eval_x.append(np.asarray(kwargs["eval_set"][0][0]).copy())
            return super().fit(x, y, **kwargs)

    data, work = featurized
    ds = load_dataset(data)
    x, y = load_design(work, ds, "classical").x, ds.labels
    groups = ds.frame["lesion_id"].to_numpy()
    tr, va = grouped_folds(y, groups, 3, 0)[0]
    fit_rows, stop_rows = heads.early_stopping_split(y[tr], groups[tr], 0)
    assert not set(groups[tr][fit_rows]) & set(groups[tr][stop_rows])
    assert len(fit_rows) + len(stop_rows) == len(tr)
    pipe = heads.build_pipeline("lightgbm", "class_weight",
                                heads.default_params("lightgbm", x.shape[1]), 0)
    pipe.steps[-1] = ("clf", Recorder(**pipe.steps[-1][1].get_params()))
    Recorder.eval_x = []
    proba, best = heads.fit_fold(pipe, x[tr], y[tr], x[va], y[va], groups[tr], 0)
    assert proba.shape == (len(va), 7) and best >= 1
    scored = x[va]
    for _, step in pipe.steps[:-1]:
        scored = step.transform(scored)
    stopped_on = Recorder.eval_x[0]
    assert 0 < len(stopped_on) <= len(stop_rows)
    scored_rows = {tuple(np.round(r, 6)) for r in scored}
    assert not any(tuple(np.round(r, 6)) in scored_rows for r in stopped_on)
