"""Calibration evidence: Brier scores, the reliability of P(mel), per-class CIs, and
calibration maps beyond one temperature (vector and Dirichlet scaling), compared on val.

Sources:
    Brier score: Brier, "Verification of forecasts expressed in terms of probability",
    Monthly Weather Review 1950 (scikit-learn's ``brier_score_loss``).
    Temperature and vector scaling: Guo et al., "On calibration of modern neural networks",
    ICML 2017 (vector scaling: one weight and one bias per class on the log-probabilities).
    Dirichlet calibration: Kull et al., NeurIPS 2019: a multinomial logistic regression on
    the log-probabilities, here with scikit-learn's L2 penalty instead of their ODIR.

Every CI here resamples whole lesions (:func:`lesionlab.metrics.bootstrap_ci`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, precision_score, recall_score

from lesionlab.errors import LesionLabError
from lesionlab.metrics import (balanced_accuracy, binned_ece, binned_reliability, bootstrap_ci,
                               expected_calibration_error)
from lesionlab.splits import grouped_folds

EPS = 1e-12  # probabilities are clipped to [EPS, 1] before a log


def _check(y_true: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true, proba = np.asarray(y_true), np.asarray(proba, dtype=float)
    if proba.ndim != 2 or len(proba) != len(y_true):
        raise LesionLabError(f"probabilities must be (n_images, n_classes) with one row per "
                             f"label; got {proba.shape} for {len(y_true)} labels")
    return y_true, proba


def brier_score(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Multiclass Brier score: mean over images of sum_k (p_k - [y = k])^2 (Brier 1950).

    Args:
        y_true: (n_images,) class indices into the columns of ``proba``.
        proba: (n_images, n_classes) probabilities, rows summing to 1.

    Returns:
        The score in [0, 2] (0 is perfect; NaN for no images).

    Raises:
        LesionLabError: when the shapes disagree.
    """
    y_true, proba = _check(y_true, proba)
    if len(y_true) == 0:
        return float("nan")
    return float(brier_score_loss(y_true, proba, labels=np.arange(proba.shape[1]),
                                  scale_by_half=False))


def binary_reliability(is_positive: np.ndarray, p: np.ndarray,
                       n_bins: int = 10) -> dict[str, list[float]]:
    """Reliability of one class's probability (e.g. P(mel)): per equal-width bin of ``p``, the
    mean predicted probability, the observed frequency of the class and the count.

    Args:
        is_positive: (n_images,) bool, the image is of the class.
        p: (n_images,) predicted probability of the class, in [0, 1].
        n_bins: equal-width bins on [0, 1], right edges closed (the first also holds 0).

    Returns:
        ``predicted``, ``observed`` (in [0, 1]) and ``count`` per non-empty bin, in bin order.
    """
    pred, obs, count = binned_reliability(np.asarray(p, dtype=float), is_positive, n_bins)
    return {"predicted": pred, "observed": obs, "count": count}


def binary_ece(is_positive: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """ECE of one class's probability: count-weighted mean |observed - predicted| over the
    bins of :func:`binary_reliability` (Naeini et al., AAAI 2015, for a binary score).

    Args:
        is_positive: (n_images,) bool, whether each image is of the class.
        p: (n_images,) the class's predicted probability, in [0, 1].
        n_bins: equal-width probability bins on [0, 1].

    Returns:
        The ECE in [0, 1]; NaN for no images.
    """
    if len(np.asarray(p)) == 0:
        return float("nan")
    curve = binary_reliability(is_positive, p, n_bins)
    return binned_ece(curve["predicted"], curve["observed"], curve["count"])


def class_score_calibration(y_true: np.ndarray, proba: np.ndarray, cls: int,
                            groups: np.ndarray | None = None, n_boot: int = 1000,
                            seed: int = 0, n_bins: int = 10) -> dict:
    """How well one class's probability (P(mel) for the melanoma rule) is calibrated.

    Args:
        y_true: (n_images,) class indices.
        proba: (n_images, n_classes) calibrated probabilities.
        cls: the column scored (e.g. the index of ``mel``).
        groups: (n_images,) lesion ids, for the bootstrap CIs; None: no CIs.
        n_boot: bootstrap resamples.
        seed: the bootstrap's seed.
        n_bins: reliability bins.

    Returns:
        ``brier`` (binary Brier of the column, in [0, 1]), ``ece`` (binary ECE), the
        ``reliability`` bins, ``n`` and, with groups, ``ci95`` of ``brier`` and ``ece``.

    Raises:
        LesionLabError: when the shapes disagree or ``cls`` is not a column.
    """
    y_true, proba = _check(y_true, proba)
    if not 0 <= cls < proba.shape[1]:
        raise LesionLabError(f"class index {cls} is not a column of {proba.shape[1]}")
    fns: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "brier": lambda y, q: float(np.mean((q[:, cls] - (y == cls)) ** 2)),
        "ece": lambda y, q: binary_ece(y == cls, q[:, cls], n_bins)}
    out: dict = {name: fn(y_true, proba) for name, fn in fns.items()}
    out["reliability"] = binary_reliability(y_true == cls, proba[:, cls], n_bins)
    out["n"] = int(len(y_true))
    if groups is not None and n_boot > 0:
        out["ci95"] = {name: list(bootstrap_ci(y_true, proba, np.asarray(groups), fn,
                                               n_boot=n_boot, seed=seed))
                       for name, fn in fns.items()}
    return out


def ece_with_ci(y_true: np.ndarray, proba: np.ndarray, groups: np.ndarray,
                n_boot: int = 1000, seed: int = 0) -> dict[str, float | list[float]]:
    """Top-label ECE (:func:`lesionlab.metrics.expected_calibration_error`) with its
    lesion-level bootstrap 95% CI: ``{"ece": float, "ci95": [lo, hi]}``.

    Args:
        y_true: (n_images,) class indices.
        proba: (n_images, n_classes) probabilities, rows summing to 1.
        groups: (n_images,) lesion id of each image, the bootstrap's resampled unit.
        n_boot: bootstrap resamples.
        seed: seed of the resamples.

    Raises:
        LesionLabError: ``proba`` is not 2-D or has not one row per label.
    """
    y_true, proba = _check(y_true, proba)
    return {"ece": expected_calibration_error(y_true, proba),
            "ci95": list(bootstrap_ci(y_true, proba, np.asarray(groups),
                                      expected_calibration_error, n_boot=n_boot, seed=seed))}


def per_class_ci(y_true: np.ndarray, proba: np.ndarray, groups: np.ndarray,
                 classes: tuple[str, ...] | list[str], n_boot: int = 1000,
                 seed: int = 0) -> dict[str, dict]:
    """Per-class recall and precision of the argmax decision with lesion-level 95% CIs.

    Args:
        y_true: (n_images,) class indices into ``classes``.
        proba: (n_images, len(classes)) probabilities (or one-hot decisions).
        groups: (n_images,) lesion ids.
        classes: the column names.
        n_boot: bootstrap resamples; seed: their seed.

    Returns:
        ``{class: {"recall", "precision", "support", "recall_ci95", "precision_ci95"}}``;
        a ratio without a case (no image of the class, or none predicted) is NaN, as is a CI
        without resamples that hold one.

    Raises:
        LesionLabError: when the shapes disagree.
    """
    y_true, proba = _check(y_true, proba)
    if proba.shape[1] != len(classes):
        raise LesionLabError(f"{proba.shape[1]} probability columns for {len(classes)} classes")

    def ratio(kind: str, c: int) -> Callable[[np.ndarray, np.ndarray], float]:
        def fn(y: np.ndarray, q: np.ndarray) -> float:
            pred = q.argmax(axis=1)
            denom = (y == c).sum() if kind == "recall" else (pred == c).sum()
            return float(((pred == c) & (y == c)).sum() / denom) if denom else float("nan")
        return fn

    out: dict[str, dict] = {}
    for c, name in enumerate(classes):
        row: dict = {"support": int((y_true == c).sum())}
        for kind in ("recall", "precision"):
            fn = ratio(kind, c)
            row[kind] = fn(y_true, proba)
            row[f"{kind}_ci95"] = list(bootstrap_ci(y_true, proba, np.asarray(groups), fn,
                                                    n_boot=n_boot, seed=seed))
        out[name] = row
    return out


def _log_p(proba: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(proba, dtype=float), EPS, 1.0))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class VectorScaling:
    """softmax(w * log p + b), one weight and bias per class (Guo et al. 2017).

    Attributes:
        weight: (n_classes,) per-class scale of the log-probabilities.
        bias: (n_classes,) per-class offset.
    """

    weight: np.ndarray
    bias: np.ndarray

    def __call__(self, proba: np.ndarray) -> np.ndarray:
        """(n_images, n_classes) probabilities -> recalibrated, same shape."""
        return _softmax(_log_p(proba) * self.weight + self.bias)


def vector_scaling_from(block: dict) -> VectorScaling:
    """The map a card's ``prevalence_map`` block holds (``weight`` and ``bias``, one number
    per class: ``models.calibrate``)."""
    return VectorScaling(weight=np.asarray(block["weight"], float),
                         bias=np.asarray(block["bias"], float))


def fit_vector_scaling(proba: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> VectorScaling:
    """Fit vector scaling by minimising the NLL on held-out rows (L-BFGS, scipy).

    Args:
        proba: (n_images, n_classes) held-out probabilities.
        y: (n_images,) class indices.
        l2: ridge penalty pulling the weights to 1 and the biases to 0 (keeps a class absent
            from ``y`` finite).

    Returns:
        The fitted map.

    Raises:
        LesionLabError: when the shapes disagree.
    """
    y, proba = _check(y, proba)
    logp, k = _log_p(proba), proba.shape[1]
    rows = np.arange(len(y))

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:k], theta[k:]
        q = _softmax(logp * w + b)
        loss = -np.log(np.clip(q[rows, y], EPS, 1.0)).mean()
        loss += l2 * (((w - 1) ** 2).sum() + (b ** 2).sum())
        g = q.copy()
        g[rows, y] -= 1.0
        g /= len(y)
        grad = np.concatenate([(g * logp).sum(axis=0) + 2 * l2 * (w - 1),
                               g.sum(axis=0) + 2 * l2 * b])
        return float(loss), grad

    theta0 = np.concatenate([np.ones(k), np.zeros(k)])
    res = minimize(nll, theta0, jac=True, method="L-BFGS-B")
    return VectorScaling(weight=res.x[:k], bias=res.x[k:])


@dataclass(frozen=True)
class DirichletScaling:
    """Dirichlet calibration (Kull et al. 2019): multinomial logistic regression on log p.

    Attributes:
        model: the fitted scikit-learn ``LogisticRegression`` (its ``classes_`` are the class
            indices seen when fitting).
        n_classes: columns of the probabilities it maps.
    """

    model: LogisticRegression
    n_classes: int

    def __call__(self, proba: np.ndarray) -> np.ndarray:
        """(n_images, n_classes) probabilities -> recalibrated, same shape (a class unseen
        when fitting gets probability 0)."""
        out = np.zeros((len(proba), self.n_classes))
        out[:, self.model.classes_] = self.model.predict_proba(_log_p(proba))
        return out


def fit_dirichlet(proba: np.ndarray, y: np.ndarray, c: float = 1.0) -> DirichletScaling:
    """Fit Dirichlet calibration with an L2 penalty of strength ``1 / c``.

    Args:
        proba: (n_images, n_classes) uncalibrated probabilities (val), rows summing to 1.
        y: (n_images,) class indices.
        c: inverse L2 strength (scikit-learn's ``LogisticRegression(C=)``).

    Raises:
        LesionLabError: when the shapes disagree or ``y`` holds one class only.
    """
    y, proba = _check(y, proba)
    if len(np.unique(y)) < 2:
        raise LesionLabError("Dirichlet calibration needs at least two classes in y")
    model = LogisticRegression(C=c, max_iter=2000).fit(_log_p(proba), y)
    return DirichletScaling(model=model, n_classes=proba.shape[1])


def _temperature_map(proba: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Temperature scaling (Guo et al. 2017), bounded like the model cards' temperatures."""
    from scipy.optimize import minimize_scalar

    logp, rows = _log_p(proba), np.arange(len(y))
    t = minimize_scalar(lambda t: -np.log(np.clip(_softmax(logp / t)[rows, y], EPS, 1)).mean(),
                        bounds=(0.05, 20.0), method="bounded").x
    return lambda p: _softmax(_log_p(p) / t)


CALIBRATORS: dict[str, Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "none": lambda p, y: (lambda q: np.asarray(q, dtype=float)),
    "temperature": _temperature_map,
    "vector": fit_vector_scaling,
    "dirichlet": fit_dirichlet,
}


def compare_calibrators(proba: np.ndarray, y: np.ndarray, groups: np.ndarray,
                        n_folds: int = 5, seed: int = 0) -> dict[str, dict[str, float]]:
    """Temperature, vector and Dirichlet scaling compared on val by lesion-grouped
    cross-fitting: each map is fitted on k-1 folds of val and scored on the held-out fold,
    so no map is scored on the rows it was fitted on.

    Args:
        proba: (n_images, n_classes) val probabilities before calibration.
        y: (n_images,) class indices.
        groups: (n_images,) lesion ids.
        n_folds: lesion-grouped folds (fewer when a class has fewer lesions).
        seed: the folds' seed.

    Returns:
        ``{name: {"nll", "ece", "brier", "balanced_accuracy",
        "balanced_accuracy_prevalence"}}`` of the out-of-fold calibrated probabilities, for
        ``none``, ``temperature``, ``vector`` and ``dirichlet``: NLL, ECE and Brier (lower is
        better), and the balanced accuracy of their argmax and of
        :func:`prevalence_decisions` (with the fitting folds' class frequencies). Choose by
        ``nll`` (a proper scoring rule); the binned top-label ECE can rank the maps otherwise
        (on a hand-made per-class miscalibration, vector scaling lowers NLL and Brier below
        temperature scaling's and doubles its ECE: tests/test_calibration.py).

    Raises:
        LesionLabError: when the shapes disagree, or (from the folds) when a class has fewer
            than 2 lesions.
    """
    y, proba = _check(y, proba)
    folds = grouped_folds(y, np.asarray(groups), n_folds, seed, purpose="calibration folds")
    out: dict[str, dict[str, float]] = {}
    rows, k = np.arange(len(y)), proba.shape[1]
    for name, fit in CALIBRATORS.items():
        oof = np.zeros_like(proba)
        pred = np.zeros(len(y), dtype=int)
        for train_idx, test_idx in folds:
            oof[test_idx] = fit(proba[train_idx], y[train_idx])(proba[test_idx])
            pred[test_idx] = prevalence_decisions(oof[test_idx], np.bincount(
                y[train_idx], minlength=k) / len(train_idx))
        out[name] = {"nll": float(-np.log(np.clip(oof[rows, y], EPS, 1.0)).mean()),
                     "ece": expected_calibration_error(y, oof),
                     "brier": brier_score(y, oof),
                     "balanced_accuracy": balanced_accuracy(y, oof.argmax(1)),
                     "balanced_accuracy_prevalence": balanced_accuracy(y, pred)}
    return out


def prevalence_decisions(proba: np.ndarray, prevalence: np.ndarray) -> np.ndarray:
    """The class that maximises expected balanced accuracy, ``argmax_c p_c / prevalence_c``,
    for probabilities calibrated to a population with those class frequencies (Bayes'
    decision under the balanced loss: each class's errors weigh 1 / its frequency; Elkan,
    "The foundations of cost-sensitive learning", IJCAI 2001). The argmax of ``proba`` itself
    maximises accuracy instead.

    Args:
        proba: (n_images, n_classes) calibrated probabilities.
        prevalence: (n_classes,) class frequencies of the population ``proba`` is calibrated
            to (e.g. val's); a class of frequency 0 is never chosen.

    Returns:
        (n_images,) class indices.
    """
    prevalence = np.asarray(prevalence, dtype=float)
    return np.where(prevalence > 0, prior_corrected(proba, prevalence), -1.0).argmax(axis=1)


def prior_corrected(proba: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """``proba / prior``, renormalised: probabilities under a uniform class prior (the
    class-prior correction of ``models.heads``, a balanced-accuracy decision rule).

    Args:
        proba: (n_images, n_classes) probabilities.
        prior: (n_classes,) class frequencies (clipped at 1e-12).

    Returns:
        (n_images, n_classes), rows summing to 1.
    """
    q = np.asarray(proba, dtype=float) / np.clip(np.asarray(prior, dtype=float), EPS, None)
    return q / q.sum(axis=1, keepdims=True)
