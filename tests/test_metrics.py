"""Metrics against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from lesionlab.data import CLASS_INDEX
from lesionlab.metrics import (bootstrap_ci, evaluate, expected_calibration_error, macro_auc,
                               point_metrics)


def _onehot(pred: list[int], conf: float = 0.9) -> np.ndarray:
    p = np.full((len(pred), 7), (1 - conf) / 6)
    p[np.arange(len(pred)), pred] = conf
    return p


def test_balanced_accuracy_and_f1_hand_case() -> None:
    y = np.array([0, 0, 1, 1, 1, 2])
    pred = [0, 1, 1, 1, 0, 2]
    m = point_metrics(y, _onehot(pred))
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    # F1: class0 p=1/2 r=1/2 -> .5; class1 p=2/3 r=2/3 -> 2/3; class2 -> 1
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)


def test_always_nv_scores_chance_balanced_accuracy() -> None:
    y = np.repeat(np.arange(7), [30, 50, 100, 10, 100, 670, 40])
    m = point_metrics(y, _onehot([CLASS_INDEX["nv"]] * len(y)))
    assert m["accuracy"] == pytest.approx(0.67)
    assert m["balanced_accuracy"] == pytest.approx(1 / 7)
    assert m["mel_sensitivity"] == 0.0 and m["mel_specificity"] == 1.0


def test_melanoma_sensitivity_specificity() -> None:
    mel, nv = CLASS_INDEX["mel"], CLASS_INDEX["nv"]
    y = np.array([mel, mel, mel, mel, nv, nv, nv, nv, nv])
    pred = [mel, mel, mel, nv, nv, nv, nv, nv, mel]
    m = point_metrics(y, _onehot(pred))
    assert m["mel_sensitivity"] == pytest.approx(3 / 4)
    assert m["mel_specificity"] == pytest.approx(4 / 5)


def test_macro_auc_hand_case() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.zeros((4, 7))
    p[:, 0] = [0.9, 0.4, 0.6, 0.1]  # class 0 vs rest: pairs (0.9>0.6,0.9>0.1,0.4<0.6,0.4>0.1)=3/4
    p[:, 1] = 1 - p[:, 0]           # class 1 vs rest: mirrored, also 3/4
    assert macro_auc(y, p) == pytest.approx(0.75)


def test_ece_hand_case() -> None:
    y = np.array([0, 1, 1, 1])
    p = np.zeros((4, 7))
    p[0, 0] = p[1, 0] = 0.95  # both predicted 0, one right -> |0.5 - 0.95|
    p[2, 1] = p[3, 1] = 0.55  # both predicted 1, both right -> |1 - 0.55|
    p[:2, 1] = p[2:, 0] = 0.05
    p[2:, 2] = 0.40
    assert expected_calibration_error(y, p) == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)


def test_bootstrap_resamples_whole_lesions() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(rng.integers(0, 3, 50), 2)       # 50 lesions x 2 photos each
    groups = np.repeat(np.arange(50), 2)
    proba = _onehot(list(np.where(rng.random(100) < 0.7, y, (y + 1) % 3)))
    proba[:, 6] = groups * 1e-6                    # tag each row with its lesion
    bad = []

    def probe(yy: np.ndarray, pp: np.ndarray) -> float:
        _, counts = np.unique(np.round(pp[:, 6] * 1e6).astype(int), return_counts=True)
        bad.append(bool((counts % 2).any()))      # image-level resampling splits pairs
        return float((pp[:, :3].argmax(1) == yy).mean())

    lo, hi = bootstrap_ci(y, proba, groups, probe, n_boot=200, seed=1)
    assert len(bad) == 200 and not any(bad), "a lesion's photos must travel together"
    point = float((proba[:, :3].argmax(1) == y).mean())
    assert lo < point < hi


def test_evaluate_report_shape() -> None:
    y = np.arange(7).repeat(10)
    proba = _onehot(list(y))
    res = evaluate(y, proba, groups=np.arange(70), n_boot=50)
    assert res["balanced_accuracy"] == 1.0 and res["macro_auc"] == 1.0
    assert res["per_class"]["mel"]["recall"] == 1.0
    assert np.trace(np.array(res["confusion_matrix"])) == 70
    assert res["ci95"]["balanced_accuracy"] == [1.0, 1.0]


def test_melanoma_threshold_and_operating_point() -> None:
    from lesionlab.metrics import MEL, operating_point, threshold_for_sensitivity

    y = np.array([MEL] * 5 + [0] * 5)
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.85, 0.5, 0.3, 0.2, 0.05])
    t = threshold_for_sensitivity(y, p, 0.8)  # 4 of 5 melanomas need p >= t
    assert t == 0.6
    op = operating_point(y, p, t, groups=np.arange(10), n_boot=200)
    assert op["sensitivity"] == 0.8 and op["specificity"] == 0.8
    assert op["benign_per_melanoma_found"] == 0.25  # 1 benign flagged for 4 melanomas
    lo, hi = op["ci95"]["sensitivity"]
    assert 0 <= lo <= 0.8 <= hi <= 1
    assert np.isnan(threshold_for_sensitivity(np.zeros(3, int), np.ones(3)))


def test_threshold_is_chosen_on_val_only(tmp_path) -> None:
    """The card's melanoma threshold is the one val gives, whatever test holds."""
    from featurize.extract import FeaturizeConfig, featurize
    from lesionlab.data import load_dataset
    from lesionlab.metrics import MEL, threshold_for_sensitivity
    from models.bundle import load_head
    from models.train_design import load_design
    from models.train_head import HeadConfig, train_head
    from tests.conftest import FIXTURE

    ds = load_dataset(FIXTURE)
    featurize(ds, tmp_path, FeaturizeConfig(backbone="classical", num_workers=0))
    card = train_head(ds, tmp_path, HeadConfig(features="classical", trials=1, folds=2,
                                               n_boot=20))
    model = load_head(tmp_path / "models" / card.name)
    x = load_design(tmp_path, ds, "classical").x
    split = __import__("pandas").read_csv(tmp_path / "splits" / "split_seed0.csv")
    val = ds.frame["image_id"].isin(split.loc[split["split"] == "val", "image_id"]).to_numpy()
    want = threshold_for_sensitivity(ds.labels[val], model.predict_proba(x[val])[:, MEL])
    assert card.mel_threshold == want == model.mel_threshold_
    assert card.test["mel_operating_point"]["threshold"] == want
