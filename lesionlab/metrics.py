"""Classification metrics of a class set (HAM10000's 7 by default), with lesion-level
bootstrap CIs.

Headline: balanced multiclass accuracy (mean per-class recall; ISIC 2018 Task 3 metric).
Averages run over the classes present in the labels scored; a class absent from them has no
recall (NaN, ``null`` in JSON), and :func:`evaluate` says so once via a counted warning.
Labels index a class set (``classes``, default :data:`lesionlab.data.CLASSES`); the melanoma
metrics take melanoma's index in it (``mel``; None: the set has no melanoma, they are NaN).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from sklearn.metrics import (confusion_matrix, f1_score, precision_recall_fscore_support,
                             recall_score, roc_auc_score)

from lesionlab.data import CLASS_INDEX, CLASSES
from lesionlab.errors import warn_once

N_CLASSES = len(CLASSES)
MEL = CLASS_INDEX["mel"]


def mel_index(classes: Sequence[str]) -> int | None:
    """Index of melanoma (``mel``) in ``classes``; None when the class set has none."""
    return list(classes).index("mel") if "mel" in classes else None


ABSENT_CLASSES_WARNING = ("scored labels lack some classes: averages use the classes present, "
                          "per-class values of the absent ones are null")


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (NaN when it is empty).

    Predictions of a class absent from ``y_true`` count as errors of the true class; unlike
    scikit-learn's ``balanced_accuracy_score`` this raises no warning about them.
    """
    present = np.unique(y_true)
    if len(present) == 0:
        return float("nan")
    return float(recall_score(y_true, y_pred, labels=present, average="macro"))


def macro_auc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC over classes present in ``y_true`` (NaN if fewer than two)."""
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    aucs = [roc_auc_score(y_true == c, proba[:, c]) for c in present]
    return float(np.mean(aucs))


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: bin by confidence, weight |accuracy - confidence| by bin size.

    Args:
        y_true: (n,) class indices.
        proba: (n, n_classes) probabilities.
        n_bins: equal-width confidence bins on [0, 1] (the bins of :func:`reliability_curve`).

    Returns:
        The ECE in [0, 1]; 0.0 for no rows.
    """
    curve = reliability_curve(y_true, proba, n_bins)
    n = sum(curve["count"])
    ece = 0.0
    for conf, acc, count in zip(curve["confidence"], curve["accuracy"], curve["count"]):
        ece += (count / n) * abs(acc - conf)
    return float(ece)


def reliability_curve(y_true: np.ndarray, proba: np.ndarray,
                      n_bins: int = 15) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and count, for reliability diagrams and the ECE.

    Args:
        y_true: (n,) class indices.
        proba: (n, n_classes) probabilities; a row's confidence is its largest one.
        n_bins: equal-width bins on [0, 1], right edges closed (the first also holds 0).

    Returns:
        ``confidence``, ``accuracy`` (both in [0, 1]) and ``count`` per non-empty bin, in
        bin order.
    """
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    out: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": []}
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            out["confidence"].append(float(conf[mask].mean()))
            out["accuracy"].append(float(correct[mask].mean()))
            out["count"].append(int(mask.sum()))
    return out


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro F1 over the classes present in ``y_true``."""
    return float(f1_score(y_true, y_pred, labels=list(np.unique(y_true)), average="macro",
                          zero_division=0))


def mel_sensitivity_specificity(y_true: np.ndarray, y_pred: np.ndarray,
                                mel: int | None = MEL) -> tuple[float, float]:
    """Melanoma-vs-rest sensitivity and specificity of the argmax decision (``mel``: the
    melanoma class index; None: NaN, NaN)."""
    if mel is None:
        return float("nan"), float("nan")
    mel_true = y_true == mel
    mel_pred = y_pred == mel
    sens = float((mel_pred & mel_true).sum() / mel_true.sum()) if mel_true.any() else float("nan")
    spec = (float((~mel_pred & ~mel_true).sum() / (~mel_true).sum())
            if (~mel_true).any() else float("nan"))
    return sens, spec


def point_metrics(y_true: np.ndarray, proba: np.ndarray,
                  y_pred: np.ndarray | None = None, mel: int | None = MEL) -> dict[str, float]:
    """Scalar metrics of one prediction set (no CIs); ``mel``: melanoma's class index."""
    y_true = np.asarray(y_true)
    if y_pred is None:
        y_pred = proba.argmax(axis=1)
    sens, spec = mel_sensitivity_specificity(y_true, y_pred, mel)
    return {
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred),
        "macro_auc": macro_auc(y_true, proba),
        "mel_sensitivity": sens,
        "mel_specificity": spec,
        "ece": expected_calibration_error(y_true, proba),
        "accuracy": float((y_true == y_pred).mean()),
    }


def bootstrap_ci(y_true: np.ndarray, proba: np.ndarray, groups: np.ndarray,
                 metric: Callable[[np.ndarray, np.ndarray], float], n_boot: int = 1000,
                 seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile CI of ``metric(y_true, proba)`` resampling whole lesions with replacement."""
    rng = np.random.default_rng(seed)
    _, group_idx = np.unique(groups, return_inverse=True)
    order = np.argsort(group_idx, kind="stable")
    starts = np.searchsorted(group_idx[order], np.arange(group_idx.max() + 1))
    ends = np.append(starts[1:], len(order))
    members = [order[s:e] for s, e in zip(starts, ends)]
    n_groups = len(members)
    values = []
    for _ in range(n_boot):
        pick = rng.integers(0, n_groups, n_groups)
        idx = np.concatenate([members[g] for g in pick])
        if len(np.unique(y_true[idx])) < 2:
            continue
        values.append(metric(y_true[idx], proba[idx]))
    values_arr = np.asarray([v for v in values if not np.isnan(v)])
    if len(values_arr) == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values_arr, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _ci_metrics(mel: int | None) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    """The metrics :func:`evaluate` bootstraps, ``mel`` being melanoma's class index."""
    return {
        "balanced_accuracy": lambda y, p: balanced_accuracy(y, p.argmax(axis=1)),
        "macro_f1": lambda y, p: macro_f1(y, p.argmax(axis=1)),
        "macro_auc": macro_auc,
        "mel_sensitivity": lambda y, p: mel_sensitivity_specificity(y, p.argmax(axis=1),
                                                                    mel)[0],
    }


_CI_METRICS = _ci_metrics(MEL)  # HAM10000's 7 classes


def evaluate(y_true: np.ndarray, proba: np.ndarray, groups: np.ndarray | None = None,
             n_boot: int = 1000, seed: int = 0,
             classes: Sequence[str] = CLASSES) -> dict:
    """Full evaluation: scalar metrics, per-class table, confusion matrix, bootstrap 95% CIs.

    Args:
        y_true: (n,) class indices into ``classes``.
        proba: (n, len(classes)) probabilities.
        groups: (n,) lesion ids, the bootstrap's resampling unit; None: no CIs.
        n_boot: bootstrap resamples (0: no CIs).
        seed: bootstrap seed.
        classes: the class names the labels and columns index (per-class keys, melanoma).
    """
    y_true = np.asarray(y_true)
    proba = np.asarray(proba, dtype=float)
    y_pred = proba.argmax(axis=1)
    mel = mel_index(classes)
    result: dict = point_metrics(y_true, proba, y_pred, mel)
    labels = list(range(len(classes)))
    warn_absent_classes(y_true, classes)
    # undefined ratios (no true or no predicted case of a class) are NaN, never a made-up 0
    prec, rec, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=np.nan)
    result["per_class"] = {
        c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
            "support": int(support[i])}
        for i, c in enumerate(classes)}
    result["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    result["n"] = int(len(y_true))
    if groups is not None and n_boot > 0:
        result["ci95"] = {name: list(bootstrap_ci(y_true, proba, np.asarray(groups), fn,
                                                  n_boot=n_boot, seed=seed))
                          for name, fn in _ci_metrics(mel).items()}
    return result


def warn_absent_classes(y_true: np.ndarray, classes: Sequence[str] = CLASSES) -> None:
    """One counted warning (:func:`lesionlab.errors.warn_once`) when ``y_true`` lacks classes.

    The first occurrence names them; repeats (every group of ``evaluate --by``, every small
    val or test split) are counted under one key and reported once on exit.
    """
    absent = [c for i, c in enumerate(classes) if not np.any(np.asarray(y_true) == i)]
    if absent:
        warn_once(f"{ABSENT_CLASSES_WARNING} (first case: {len(y_true)} labels without "
                  f"{', '.join(absent)})", key=ABSENT_CLASSES_WARNING)


MEL_TARGET_SENSITIVITY = 0.80


def threshold_for_sensitivity(y_true: np.ndarray, p_mel: np.ndarray,
                              target: float = MEL_TARGET_SENSITIVITY,
                              mel: int | None = MEL) -> float:
    """The highest threshold on P(mel) that flags at least ``target`` of the melanomas in
    (y_true, p_mel); a case is flagged when its P(mel) >= the threshold. NaN without any
    (or without a melanoma class: ``mel`` None)."""
    if mel is None:
        return float("nan")
    scores = np.sort(np.asarray(p_mel)[np.asarray(y_true) == mel])[::-1]
    if len(scores) == 0:
        return float("nan")
    return float(scores[int(np.ceil(target * len(scores))) - 1])


def _flag_counts(y_true: np.ndarray, p_mel: np.ndarray, threshold: float,
                 mel_label: int = MEL) -> tuple:
    flag, mel = p_mel >= threshold, y_true == mel_label
    return (flag & mel).sum(), (flag & ~mel).sum(), mel.sum(), (~mel).sum()


def _op_metrics(threshold: float,
                mel: int = MEL) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    """Sensitivity, specificity and benign lesions flagged per melanoma found, at one
    threshold; ``p`` is a column of P(mel), ``mel`` the label of melanoma in ``y``."""
    def sens(y, p):
        tp, _, pos, _ = _flag_counts(y, p[:, 0], threshold, mel)
        return tp / pos if pos else float("nan")

    def spec(y, p):
        _, fp, _, neg = _flag_counts(y, p[:, 0], threshold, mel)
        return (neg - fp) / neg if neg else float("nan")

    def per_found(y, p):
        tp, fp, _, _ = _flag_counts(y, p[:, 0], threshold, mel)
        return fp / tp if tp else float("nan")

    return {"sensitivity": sens, "specificity": spec, "benign_per_melanoma_found": per_found}


def operating_point(y_true: np.ndarray, p_mel: np.ndarray, threshold: float,
                    groups: np.ndarray | None = None, n_boot: int = 1000,
                    seed: int = 0, mel: int = MEL) -> dict:
    """The melanoma rule "flag when P(mel) >= threshold" on a labelled set, with lesion-level
    bootstrap CIs: sensitivity, specificity, benign lesions flagged per melanoma found.

    Args:
        y_true: (n,) labels; ``y_true == mel`` marks the melanomas (1 for binary labels).
        p_mel: (n,) calibrated P(mel).
        threshold: flag when P(mel) >= it.
        groups: (n,) lesion ids for the bootstrap; None: no CIs.
        n_boot: bootstrap resamples.
        seed: bootstrap seed.
        mel: the label of melanoma in ``y_true``.
    """
    y_true = np.asarray(y_true)
    col = np.asarray(p_mel, dtype=float)[:, None]
    fns = _op_metrics(threshold, mel)
    out: dict = {"threshold": float(threshold),
                 **{name: float(fn(y_true, col)) for name, fn in fns.items()}}
    if groups is not None and n_boot > 0:
        out["ci95"] = {name: list(bootstrap_ci(y_true, col, np.asarray(groups), fn,
                                               n_boot=n_boot, seed=seed))
                       for name, fn in fns.items()}
    return out


def _binary_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC of column 0 of ``p`` for ``y == 1``; NaN unless both classes occur."""
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y == 1, p[:, 0]))


def melanoma_vs_rest(y_mel: np.ndarray, p_mel: np.ndarray, threshold: float | None,
                     groups: np.ndarray | None = None, n_boot: int = 1000,
                     seed: int = 0) -> dict:
    """Melanoma-vs-rest scores of binary labels (ISIC 2020's ``target``).

    Args:
        y_mel: (n,) 1 for melanoma, 0 for anything else.
        p_mel: (n,) calibrated P(mel) of a multiclass model.
        threshold: the card's melanoma threshold (flag when P(mel) >= it); None or NaN: no
            operating point.
        groups: (n,) lesion ids, resampled whole by the bootstrap; None: no CIs.
        n_boot: bootstrap resamples (0: no CIs).
        seed: bootstrap seed.

    Returns:
        ``n``, ``n_mel``, ``auc`` (ROC AUC of P(mel); NaN with one class only), ``auc_ci95``
        (lesion-level percentile bootstrap, or None) and ``operating_point`` (sensitivity,
        specificity and benign flagged per melanoma found at ``threshold``, with CIs; see
        :func:`operating_point`), or None without a threshold.
    """
    y = np.asarray(y_mel).astype(int)
    col = np.asarray(p_mel, dtype=float)[:, None]
    out: dict = {"n": int(len(y)), "n_mel": int((y == 1).sum()), "auc": _binary_auc(y, col),
                 "auc_ci95": None, "operating_point": None}
    if groups is not None and n_boot > 0:
        out["auc_ci95"] = list(bootstrap_ci(y, col, np.asarray(groups), _binary_auc,
                                            n_boot=n_boot, seed=seed))
    if threshold is not None and not np.isnan(threshold):
        out["operating_point"] = operating_point(y, col[:, 0], threshold, groups, n_boot, seed,
                                                 mel=1)
    return out
