"""The finishing step every trained model goes through, whatever its kind.

Once a model is fitted, its val probabilities choose the decision rule (argmax, or the
class-prior correction where the kind allows it), then the temperature (temperature scaling)
and then the melanoma threshold (``lesionlab.metrics.threshold_for_sensitivity``); the test
split is then scored once, with lesion-level bootstrap CIs and the melanoma operating point.
Heads (``models.train_head``), fine-tuned networks (``models.finetune``) and ensembles
(``models.ensemble``, K-fold runs included) all finish here, so their cards score alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lesionlab import metrics
from lesionlab.errors import LesionLabError
from models.heads import apply_prior_correction, apply_temperature, fit_temperature

RULES = ("argmax", "prior_corrected")


@dataclass(frozen=True)
class FinishInput:
    """What the finishing step reads.

    Attributes:
        classes: the class set the labels index, length ``n_classes``.
        y_val: (n_val,) class indices of the val split.
        y_test: (n_test,) class indices of the test split.
        groups_test: (n_test,) lesion ids of the test rows (the bootstrap resamples lesions).
        val_proba: (n_val, n_classes) probabilities before any decision rule or temperature.
        test_proba: (n_test, n_classes) likewise.
        prior: (n_classes,) training class prior; given, the decision rule may be the prior
            correction (heads), else it is argmax.
        n_boot: bootstrap resamples for the test CIs (0: none).
        seed: bootstrap seed.
    """

    classes: tuple[str, ...]
    y_val: np.ndarray
    y_test: np.ndarray
    groups_test: np.ndarray
    val_proba: np.ndarray
    test_proba: np.ndarray
    prior: np.ndarray | None = None
    n_boot: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class Finished:
    """What the finishing step chose and measured.

    Attributes:
        decision_rule: ``argmax`` or ``prior_corrected``.
        rule_scores: val balanced accuracy of each rule considered (argmax only without a
            prior).
        temperature: the temperature fitted on val.
        mel_threshold: the melanoma rule's threshold on calibrated P(mel), NaN without a
            ``mel`` class or val melanoma.
        val_proba: (n_val, n_classes) calibrated val probabilities.
        test_proba: (n_test, n_classes) calibrated test probabilities.
        val: val scores (no bootstrap), ``lesionlab.metrics.evaluate``.
        test: test scores with CIs, plus ``ece_uncalibrated`` and ``mel_operating_point``.
    """

    decision_rule: str
    rule_scores: dict[str, float]
    temperature: float
    mel_threshold: float
    val_proba: np.ndarray
    test_proba: np.ndarray
    val: dict
    test: dict


def decide(proba: np.ndarray, rule: str, prior: np.ndarray | None) -> np.ndarray:
    """Probabilities under a decision rule, (n, n_classes) (before any temperature).

    Raises:
        LesionLabError: for a rule not in :data:`RULES`, or ``prior_corrected`` without a
            prior.
    """
    if rule == "argmax":
        return proba
    if rule == "prior_corrected" and prior is not None:
        return apply_prior_correction(proba, prior)
    raise LesionLabError(f"decision rule {rule!r} needs a class prior and one of {RULES}")


def calibrated(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``proba`` (n, n_classes) scaled by ``temperature`` (exactly 1: left as it is)."""
    return apply_temperature(proba, temperature) if temperature != 1.0 else proba


def choose_rule(inp: FinishInput) -> tuple[str, dict[str, float]]:
    """The decision rule with the best val balanced accuracy (argmax on ties) and the scores
    of the rules considered."""
    scores = {"argmax": metrics.balanced_accuracy(inp.y_val, inp.val_proba.argmax(1))}
    if inp.prior is not None:
        scores["prior_corrected"] = metrics.balanced_accuracy(
            inp.y_val, apply_prior_correction(inp.val_proba, inp.prior).argmax(1))
    better = scores.get("prior_corrected", -np.inf) > scores["argmax"]
    return ("prior_corrected" if better else "argmax"), scores


def score_test_split(y_test: np.ndarray, test_proba: np.ndarray, groups_test: np.ndarray,
                     classes: tuple[str, ...] | list[str], mel_threshold: float | None,
                     n_boot: int, seed: int) -> dict:
    """The test block of every card: ``lesionlab.metrics.evaluate`` with lesion-level
    bootstrap CIs, plus ``mel_operating_point`` (the melanoma rule at ``mel_threshold`` on
    P(mel), with CIs; None without a ``mel`` class or a threshold).

    Args:
        y_test: (n_test,) class indices.
        test_proba: (n_test, n_classes) calibrated probabilities.
        groups_test: (n_test,) lesion ids (the bootstrap resamples lesions).
        classes: the class set, length ``n_classes``.
        mel_threshold: the threshold on P(mel) chosen on val.
        n_boot: bootstrap resamples (0: no CIs).
        seed: bootstrap seed.
    """
    test = metrics.evaluate(y_test, test_proba, groups_test, n_boot=n_boot, seed=seed,
                            classes=classes)
    mel = metrics.mel_index(classes)
    test["mel_operating_point"] = None if mel is None or mel_threshold is None else \
        metrics.operating_point(y_test, test_proba[:, mel], mel_threshold, groups_test,
                                n_boot, seed, mel)
    return test


def finish(inp: FinishInput) -> Finished:
    """Decision rule, temperature and melanoma threshold from val; test scored once.

    Raises:
        LesionLabError: when the probabilities do not have one column per class or one row
            per label.
    """
    n = len(inp.classes)
    for name, proba, y in (("val", inp.val_proba, inp.y_val), ("test", inp.test_proba,
                                                                inp.y_test)):
        if proba.ndim != 2 or proba.shape != (len(y), n):
            raise LesionLabError(f"{name} probabilities have shape {proba.shape}, expected "
                                 f"({len(y)}, {n}) (one row per label, one column per class)")
    rule, scores = choose_rule(inp)
    val_raw = decide(inp.val_proba, rule, inp.prior)
    test_raw = decide(inp.test_proba, rule, inp.prior)
    t = fit_temperature(val_raw, inp.y_val)
    val_p, test_p = calibrated(val_raw, t), calibrated(test_raw, t)
    mel = metrics.mel_index(inp.classes)
    threshold = metrics.threshold_for_sensitivity(inp.y_val, val_p[:, mel or 0], mel=mel)
    test = score_test_split(inp.y_test, test_p, inp.groups_test, inp.classes, threshold,
                            inp.n_boot, inp.seed)
    test["ece_uncalibrated"] = metrics.expected_calibration_error(inp.y_test, test_raw)
    val = metrics.evaluate(inp.y_val, val_p, n_boot=0, classes=inp.classes)
    return Finished(rule, scores, t, threshold, val_p, test_p, val, test)
