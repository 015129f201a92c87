"""Paired lesion-level bootstrap of the difference between two models (hand-made cases)."""

from __future__ import annotations

import numpy as np
import pytest

from lesionlab.data import CLASS_INDEX
from lesionlab.errors import LesionLabError
from lesionlab.metrics import (align_to, lesion_resamples, paired_bootstrap, paired_metric)

MEL, NV, BCC = CLASS_INDEX["mel"], CLASS_INDEX["nv"], CLASS_INDEX["bcc"]


def _onehot(pred: np.ndarray, conf: float = 0.9) -> np.ndarray:
    p = np.full((len(pred), 7), (1 - conf) / 6)
    p[np.arange(len(pred)), pred] = conf
    return p


def _case() -> tuple[np.ndarray, np.ndarray]:
    """3 classes x 10 lesions x 2 images: 60 images, 30 lesions."""
    y = np.repeat([MEL, NV, BCC], 20)
    groups = np.repeat([f"L{i}" for i in range(30)], 2)
    return y, groups


def test_identical_models_differ_by_zero_with_a_zero_ci() -> None:
    y, groups = _case()
    rng = np.random.default_rng(3)
    proba = rng.dirichlet(np.ones(7), len(y))
    for name in ("balanced_accuracy", "macro_auc", "mel_sensitivity"):
        res = paired_bootstrap(y, proba, proba.copy(), groups, paired_metric(name), n_boot=40)
        assert res["difference"] == 0.0 and res["ci95"] == [0.0, 0.0]
        assert res["n_used"] == 40


def test_perfect_model_against_one_wrong_on_melanoma() -> None:
    y, groups = _case()
    right = _onehot(y)
    wrong = _onehot(np.where(y == MEL, NV, y))  # every melanoma called a naevus
    res = paired_bootstrap(y, right, wrong, groups, paired_metric("balanced_accuracy"),
                           n_boot=100, seed=1)
    # recall 1, 1, 1 vs 0, 1, 1: 1/3 on all images, and on every resample holding all 3
    assert res["a"] == 1.0 and res["b"] == pytest.approx(2 / 3)
    assert res["difference"] == pytest.approx(1 / 3)
    assert res["ci95"] == pytest.approx([1 / 3, 1 / 3])
    sens = paired_bootstrap(y, right, wrong, groups, paired_metric("mel_sensitivity"), n_boot=50)
    assert sens["difference"] == 1.0 and sens["ci95"] == [1.0, 1.0]


def test_each_model_is_scored_at_its_own_melanoma_rule() -> None:
    y, groups = _case()
    right = _onehot(y)
    wrong = _onehot(np.where(y == MEL, NV, y))  # P(mel) of its melanomas: 0.1 / 6
    res = paired_bootstrap(y, right, wrong, groups, paired_metric("mel_sensitivity", 0.5),
                           paired_metric("mel_sensitivity", 0.01), n_boot=50)
    assert res["a"] == 1.0 and res["b"] == 1.0 and res["difference"] == 0.0
    res = paired_bootstrap(y, right, wrong, groups, paired_metric("mel_sensitivity", 0.5),
                           paired_metric("mel_sensitivity", 0.5), n_boot=50)
    assert res["b"] == 0.0 and res["ci95"] == [1.0, 1.0]


def test_a_noisy_difference_gets_an_interval_around_it() -> None:
    y, groups = _case()
    right = _onehot(y)
    b_pred = y.copy()
    b_pred[[0, 1]] = NV  # the two images of one melanoma lesion
    b_pred[44] = MEL  # one image of a bcc
    res = paired_bootstrap(y, right, _onehot(b_pred), groups,
                           paired_metric("balanced_accuracy"), n_boot=150, seed=0)
    assert res["difference"] == pytest.approx((2 / 20 + 1 / 20) / 3)
    lo, hi = res["ci95"]
    assert 0.0 <= lo < res["difference"] < hi  # B never beats A on any resample


def test_resamples_are_whole_lesions_from_one_seed() -> None:
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    draws = list(lesion_resamples(groups, 20, seed=5))
    for idx in draws:
        counts = {g: int((groups[idx] == g).sum()) for g in "abc"}
        assert counts["a"] % 2 == 0 and counts["c"] % 3 == 0
    again = list(lesion_resamples(groups, 20, seed=5))
    assert all(np.array_equal(x, z) for x, z in zip(draws, again))


def test_misaligned_image_ids_are_one_line_errors() -> None:
    proba = _onehot(np.array([MEL, NV, BCC]))
    reordered = align_to(["x2", "x0", "x1"], ["x0", "x1", "x2"], proba)
    assert np.array_equal(reordered, proba[[2, 0, 1]])
    with pytest.raises(LesionLabError, match="other images") as err:
        align_to(["x0", "x1", "x3"], ["x0", "x1", "x2"], proba, model="B")
    assert "\n" not in str(err.value) and "x3" in str(err.value)
    with pytest.raises(LesionLabError, match="repeated"):
        align_to(["x0", "x1", "x1"], ["x0", "x1", "x2"], proba)
    with pytest.raises(LesionLabError, match="probability rows"):
        paired_bootstrap(np.zeros(3, int), proba, proba[:2], np.arange(3),
                         paired_metric("balanced_accuracy"))
    with pytest.raises(LesionLabError, match="unknown paired metric"):
        paired_metric("accuracy")


def test_fast_metrics_equal_the_reported_ones() -> None:
    from lesionlab.metrics import (balanced_accuracy, fast_balanced_accuracy, fast_macro_auc,
                                   fast_macro_f1, macro_auc, macro_f1)

    rng = np.random.default_rng(0)
    for n, classes in ((50, [0, 2, 4, 5]), (200, list(range(7))), (9, [4, 5])):
        y = rng.choice(classes, n)
        proba = rng.dirichlet(np.ones(7), n)
        proba[:5] = np.round(proba[:5], 1)  # ties
        assert fast_balanced_accuracy(y, proba) == pytest.approx(
            balanced_accuracy(y, proba.argmax(axis=1)), abs=1e-12)
        assert fast_macro_auc(y, proba) == pytest.approx(macro_auc(y, proba), abs=1e-12)
        assert fast_macro_f1(y, proba) == pytest.approx(
            macro_f1(y, proba.argmax(axis=1)), abs=1e-12)
    assert np.isnan(fast_macro_auc(np.array([3, 3]), proba[:2]))
    # a class present but never predicted scores F1 0 (zero_division=0), as scikit-learn's
    y, proba = np.array([0, 0, 1, 2]), np.eye(7)[[0, 0, 0, 2]]
    assert fast_macro_f1(y, proba) == pytest.approx(macro_f1(y, proba.argmax(axis=1)))
    assert fast_macro_f1(y, proba) == pytest.approx((0.8 + 0 + 1) / 3)


def test_evaluate_cis_equal_one_sklearn_bootstrap_per_metric() -> None:
    """evaluate's CIs (one set of draws, the counting and rank metrics) are the intervals of
    one bootstrap_ci per metric with scikit-learn's functions, to 1e-12."""
    from lesionlab.metrics import (balanced_accuracy, bootstrap_ci, evaluate, macro_auc,
                                   macro_f1, mel_sensitivity_specificity)

    rng = np.random.default_rng(3)
    y = rng.choice(7, 200)
    proba = 0.6 * np.eye(7)[y] + rng.dirichlet(np.ones(7), 200)
    proba /= proba.sum(axis=1, keepdims=True)
    groups = rng.integers(0, 150, 200)
    got = evaluate(y, proba, groups, n_boot=60, seed=5)["ci95"]
    slow = {"balanced_accuracy": lambda t, p: balanced_accuracy(t, p.argmax(axis=1)),
            "macro_f1": lambda t, p: macro_f1(t, p.argmax(axis=1)),
            "macro_auc": macro_auc,
            "mel_sensitivity": lambda t, p: mel_sensitivity_specificity(t, p.argmax(axis=1))[0]}
    for name, fn in slow.items():
        assert got[name] == pytest.approx(list(bootstrap_ci(y, proba, groups, fn, 60, 5)),
                                          abs=1e-12), name
    assert got["balanced_accuracy"][0] < got["balanced_accuracy"][1]
