"""Calibration evidence (lesionlab.calibration) on hand-made examples with known values."""

import numpy as np
import pytest

from lesionlab.calibration import (binary_ece, binary_reliability, brier_score,
                                   class_score_calibration, compare_calibrators, ece_with_ci,
                                   fit_dirichlet, fit_vector_scaling, per_class_ci,
                                   prevalence_decisions)
from lesionlab.errors import LesionLabError


def test_brier_score_by_hand():
    # (0) + ((0.5-1)^2 + 0.5^2) = 0.5 for the second row; mean 0.25
    assert brier_score(np.array([0, 1]), np.array([[1.0, 0.0], [0.5, 0.5]])) == pytest.approx(0.25)
    assert brier_score(np.array([2]), np.array([[1.0, 0.0, 0.0]])) == pytest.approx(2.0)
    with pytest.raises(LesionLabError, match="one row per label"):
        brier_score(np.array([0, 1, 1]), np.array([[1.0, 0.0]]))


def test_binary_reliability_and_ece_by_hand():
    p = np.array([0.1, 0.1, 0.9, 0.9])
    pos = np.array([0, 1, 1, 1], dtype=bool)
    curve = binary_reliability(pos, p, n_bins=10)
    assert curve == {"predicted": [pytest.approx(0.1), pytest.approx(0.9)],
                     "observed": [0.5, 1.0], "count": [2, 2]}
    assert binary_ece(pos, p) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)


def test_class_score_calibration_brier_of_one_column_with_ci():
    y = np.array([0, 1, 1, 2] * 10)
    proba = np.tile(np.array([[0.8, 0.1, 0.1], [0.2, 0.6, 0.2], [0.1, 0.7, 0.2],
                              [0.3, 0.3, 0.4]]), (10, 1))
    out = class_score_calibration(y, proba, cls=1, groups=np.arange(40), n_boot=200)
    # column 1 against y == 1: (0.1^2 + 0.4^2 + 0.3^2 + 0.3^2) / 4
    assert out["brier"] == pytest.approx((0.01 + 0.16 + 0.09 + 0.09) / 4)
    lo, hi = out["ci95"]["brier"]
    assert lo <= out["brier"] <= hi and hi - lo > 0
    with pytest.raises(LesionLabError, match="not a column"):
        class_score_calibration(y, proba, cls=3)


def test_per_class_recall_and_precision_with_lesion_cis():
    y = np.array([0, 0, 1, 1] * 25)
    pred = np.array([0, 1, 1, 1] * 25)
    proba = np.eye(2)[pred]
    out = per_class_ci(y, proba, groups=np.arange(100), classes=("a", "b"), n_boot=300)
    assert out["a"]["recall"] == pytest.approx(0.5) and out["a"]["precision"] == 1.0
    assert out["b"]["recall"] == 1.0 and out["b"]["precision"] == pytest.approx(2 / 3)
    assert out["a"]["support"] == 50
    lo, hi = out["a"]["recall_ci95"]
    assert 0.3 < lo < 0.5 < hi < 0.7
    assert out["b"]["recall_ci95"] == [1.0, 1.0]
    # resampling lesions: 4 images of one lesion move together, so the CI is wider
    wide = per_class_ci(y, proba, groups=np.repeat(np.arange(25), 4), classes=("a", "b"),
                        n_boot=300)["a"]["recall_ci95"]
    assert wide == [0.5, 0.5]  # every lesion holds one right and one wrong a: no spread


def test_ece_with_ci_brackets_the_point():
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(3), size=300)
    y = rng.integers(0, 3, 300)
    out = ece_with_ci(y, proba, groups=np.arange(300), n_boot=200)
    lo, hi = out["ci95"]
    assert lo <= out["ece"] <= hi


def _miscalibrated(n: int = 1500, seed: int = 0):
    """True probabilities softmax(z); the model reports each class's logit scaled differently,
    so one temperature cannot fix it and a per-class map can."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3)) * 1.5
    true_p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in true_p])
    zr = z * np.array([3.0, 1.0, 0.4]) + np.array([0.0, 0.5, -0.5])
    return np.exp(zr) / np.exp(zr).sum(axis=1, keepdims=True), y


def test_vector_scaling_beats_temperature_on_per_class_miscalibration():
    proba, y = _miscalibrated()
    groups = np.arange(len(y))
    scores = compare_calibrators(proba, y, groups, n_folds=5)
    assert set(scores) == {"none", "temperature", "vector", "dirichlet"}
    nll = {k: v["nll"] for k, v in scores.items()}
    assert nll["vector"] < nll["temperature"] - 0.01 < nll["none"] - 0.01
    assert nll["dirichlet"] < nll["temperature"] - 0.01
    # proper scoring rules rank the maps; the binned top-label ECE need not agree with them
    assert scores["dirichlet"]["brier"] < scores["vector"]["brier"] < scores["temperature"]["brier"]
    assert scores["temperature"]["ece"] < scores["none"]["ece"] / 2


def test_vector_scaling_keeps_calibrated_probabilities_and_a_missing_class():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(2000, 3))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in p])
    vs = fit_vector_scaling(p, y)
    np.testing.assert_allclose(vs.weight, 1.0, atol=0.15)
    np.testing.assert_allclose(vs(p).sum(axis=1), 1.0)
    keep = y != 2  # a class absent from the fitting rows stays finite
    vs2 = fit_vector_scaling(p[keep], y[keep])
    assert np.isfinite(vs2(p)).all()
    d = fit_dirichlet(p[keep], y[keep])
    q = d(p)
    assert q.shape == (2000, 3) and (q[:, 2] == 0).all()
    with pytest.raises(LesionLabError, match="two classes"):
        fit_dirichlet(p[y == 0], y[y == 0])


def test_prevalence_decisions_by_hand_and_on_a_known_posterior():
    got = prevalence_decisions(np.array([[0.7, 0.3], [0.95, 0.05]]), np.array([0.9, 0.1]))
    assert got.tolist() == [1, 0]  # 0.7/0.9 < 0.3/0.1; 0.95/0.9 > 0.05/0.1
    assert prevalence_decisions(np.array([[0.1, 0.9]]), np.array([1.0, 0.0])).tolist() == [0]
    # three 1-D Gaussian classes, prior 0.8 / 0.15 / 0.05: the exact posterior is calibrated
    rng = np.random.default_rng(0)
    prior, mu = np.array([0.8, 0.15, 0.05]), np.array([0.0, 1.5, 3.0])
    y = rng.choice(3, size=20000, p=prior)
    x = rng.normal(mu[y], 1.0)
    lik = np.exp(-0.5 * (x[:, None] - mu[None, :]) ** 2) * prior
    post = lik / lik.sum(axis=1, keepdims=True)
    from lesionlab.metrics import balanced_accuracy

    by_prevalence, by_argmax = prevalence_decisions(post, prior), post.argmax(1)
    assert balanced_accuracy(y, by_prevalence) > balanced_accuracy(y, by_argmax) + 0.1
    assert (by_argmax == y).mean() > (by_prevalence == y).mean()  # argmax: accuracy


def test_compare_calibrators_scores_the_decisions_too():
    proba, y = _miscalibrated()
    scores = compare_calibrators(proba, y, np.arange(len(y)), n_folds=5)
    for v in scores.values():
        assert 0.3 < v["balanced_accuracy"] <= 1 and 0.3 < v["balanced_accuracy_prevalence"] <= 1
