"""Classification metrics of a class set (HAM10000's 7 by default), with lesion-level
bootstrap CIs.

Headline: balanced multiclass accuracy (mean per-class recall; ISIC 2018 Task 3 metric).
Averages run over the classes present in the labels scored; a class absent from them has no
recall (NaN, ``null`` in JSON), and :func:`evaluate` says so once via a counted warning.
Labels index a class set (``classes``, default :data:`lesionlab.data.CLASSES`); the melanoma
metrics take melanoma's index in it (``mel``; None: the set has no melanoma, they are NaN).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
from sklearn.metrics import (confusion_matrix, f1_score, precision_recall_fscore_support,
                             recall_score, roc_auc_score)

from lesionlab.data import CLASS_INDEX, CLASSES
from lesionlab.errors import LesionLabError, warn_once

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

    Args:
        y_true: (n_images,) true class indices.
        y_pred: (n_images,) predicted class indices.

    Returns:
        Balanced multiclass accuracy in [0, 1] (the ISIC 2018 Task 3 headline metric).
    """
    present = np.unique(y_true)
    if len(present) == 0:
        return float("nan")
    return float(recall_score(y_true, y_pred, labels=present, average="macro"))


def macro_auc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC over classes present in ``y_true`` (NaN if fewer than two).

    Args:
        y_true: (n_images,) class indices.
        proba: (n_images, n_classes) probabilities (column c: P(class c)).

    Returns:
        Mean one-vs-rest ROC AUC in [0, 1] (scikit-learn's ``roc_auc_score`` per class).
    """
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    aucs = [roc_auc_score(y_true == c, proba[:, c]) for c in present]
    return float(np.mean(aucs))


def binned_reliability(score: np.ndarray, outcome: np.ndarray,
                       n_bins: int) -> tuple[list[float], list[float], list[int]]:
    """The one binning behind every reliability diagram and ECE of lesionlab.

    Args:
        score: (n,) predicted probabilities in [0, 1] (a row's top-label confidence, or one
            class's probability such as P(mel)).
        outcome: (n,) 0/1, the event the score predicts (top label correct; image is the class).
        n_bins: equal-width bins on [0, 1], right edges closed (the first also holds 0).

    Returns:
        (mean score, observed frequency, count) per non-empty bin, in bin order.
    """
    score, outcome = np.asarray(score), np.asarray(outcome, dtype=float)  # score: its dtype
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(score, edges[1:-1], right=True), 0, n_bins - 1)
    means: list[float] = []
    observed: list[float] = []
    counts: list[int] = []
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            means.append(float(score[mask].mean()))
            observed.append(float(outcome[mask].mean()))
            counts.append(int(mask.sum()))
    return means, observed, counts


def binned_ece(means: Sequence[float], observed: Sequence[float],
               counts: Sequence[int]) -> float:
    """Count-weighted mean |observed - predicted| over reliability bins (Naeini et al.,
    AAAI 2015; Guo et al., ICML 2017 for the top-label form); 0.0 for no rows."""
    n = sum(counts)
    ece = 0.0
    for mean, obs, count in zip(means, observed, counts):
        ece += (count / n) * abs(obs - mean)
    return float(ece)


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE (Guo et al., ICML 2017): bin by confidence, weight |accuracy -
    confidence| by bin size (:func:`binned_ece` over :func:`binned_reliability`).

    The expected calibration error of Guo et al., "On calibration of modern neural
    networks", ICML 2017 (Naeini et al., AAAI 2015, for its binned form).

    Args:
        y_true: (n,) class indices.
        proba: (n, n_classes) probabilities.
        n_bins: equal-width confidence bins on [0, 1] (the bins of :func:`reliability_curve`).

    Returns:
        The ECE in [0, 1]; 0.0 for no rows.
    """
    return binned_ece(*binned_reliability(proba.max(axis=1),
                                          proba.argmax(axis=1) == y_true, n_bins))


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
    conf, acc, count = binned_reliability(proba.max(axis=1), proba.argmax(axis=1) == y_true,
                                          n_bins)
    return {"confidence": conf, "accuracy": acc, "count": count}


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro F1 over the classes present in ``y_true``.

    Args:
        y_true: (n_images,) true class indices.
        y_pred: (n_images,) predicted class indices.

    Returns:
        Macro F1 in [0, 1] (scikit-learn's ``f1_score``, ``zero_division=0``).
    """
    return float(f1_score(y_true, y_pred, labels=list(np.unique(y_true)), average="macro",
                          zero_division=0))


def mel_sensitivity_specificity(y_true: np.ndarray, y_pred: np.ndarray,
                                mel: int | None = MEL) -> tuple[float, float]:
    """Melanoma-vs-rest sensitivity and specificity of the argmax decision (``mel``: the
    melanoma class index; None: NaN, NaN).

    Args:
        y_true: (n_images,) true class indices.
        y_pred: (n_images,) predicted class indices.
        mel: melanoma's class index, or None.

    Returns:
        (sensitivity, specificity), each in [0, 1]; NaN where a side has no image.
    """
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
    """Scalar metrics of one prediction set (no CIs); ``mel``: melanoma's class index.

    Args:
        y_true: (n_images,) true class indices.
        proba: (n_images, n_classes) probabilities, rows summing to 1.
        y_pred: (n_images,) predicted class indices; None: the argmax of ``proba``.
        mel: melanoma's class index, or None.

    Returns:
        Metric name -> value in [0, 1] (balanced accuracy, macro F1 and AUC, melanoma
        sensitivity and specificity, ECE, accuracy).
    """
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


def lesion_resamples(groups: np.ndarray, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Row indices of ``n_boot`` lesion-level bootstrap resamples, from one seeded generator.

    Each resample draws as many lesions as ``groups`` has, uniformly with replacement, and
    takes every image of each lesion drawn (a lesion photographed three times counts three
    times, never split across draws): the lesions, not the images, are the independent
    units resampled (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993).

    Args:
        groups: (n_images,) lesion id of each image.
        n_boot: how many resamples.
        seed: seed of the one ``numpy.random.default_rng`` all resamples come from.

    Yields:
        (m,) int row indices into the images, m varying with the lesions drawn.
    """
    rng = np.random.default_rng(seed)
    _, group_idx = np.unique(groups, return_inverse=True)
    order = np.argsort(group_idx, kind="stable")
    starts = np.searchsorted(group_idx[order], np.arange(group_idx.max() + 1))
    ends = np.append(starts[1:], len(order))
    lengths = ends - starts
    n_groups = len(starts)
    for _ in range(n_boot):
        pick = rng.integers(0, n_groups, n_groups)
        # the members of each lesion drawn, in draw order (a vectorised concatenation)
        lens = lengths[pick]
        first = np.repeat(starts[pick] - np.cumsum(lens) + lens, lens)
        yield order[first + np.arange(lens.sum())]


def bootstrap_ci(y_true: np.ndarray, proba: np.ndarray, groups: np.ndarray,
                 metric: Callable[[np.ndarray, np.ndarray], float], n_boot: int = 1000,
                 seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile CI of ``metric(y_true, proba)`` resampling whole lesions with replacement
    (:func:`lesion_resamples`; draws with fewer than two classes or a NaN value are skipped).

    Args:
        y_true: (n_images,) class indices.
        proba: (n_images, n_classes) probabilities.
        groups: (n_images,) lesion id of each image.
        metric: ``fn(y_true, proba) -> float``.
        n_boot: bootstrap resamples.
        seed: seed of the resamples.
        alpha: 1 - the coverage (0.05: a 95% interval).

    Returns:
        (lo, hi), the ``alpha/2`` and ``1 - alpha/2`` quantiles of the resampled values
        (the percentile bootstrap, Efron & Tibshirani 1993); NaN, NaN when no draw counted.
    """
    return bootstrap_cis(y_true, proba, groups, {"m": metric}, n_boot, seed, alpha)["m"]


def bootstrap_cis(y_true: np.ndarray, proba: np.ndarray, groups: np.ndarray,
                  metrics: dict[str, Callable[[np.ndarray, np.ndarray], float]],
                  n_boot: int = 1000, seed: int = 0,
                  alpha: float = 0.05) -> dict[str, tuple[float, float]]:
    """:func:`bootstrap_ci` of several metrics on one set of lesion resamples: each draw is
    made once and scored by every metric, so the intervals equal one :func:`bootstrap_ci`
    call per metric (same seed, same draws) at a fraction of the cost.

    Args:
        y_true: (n_images,) class indices.
        proba: (n_images, n_classes) probabilities.
        groups: (n_images,) lesion id of each image.
        metrics: name -> ``fn(y_true, proba) -> float``.
        n_boot: bootstrap resamples.
        seed: seed of the resamples.
        alpha: 1 - the coverage.

    Returns:
        name -> (lo, hi); NaN, NaN for a metric no draw counted for.
    """
    values: dict[str, list[float]] = {name: [] for name in metrics}
    for idx in lesion_resamples(groups, n_boot, seed):
        y = y_true[idx]
        if len(np.unique(y)) < 2:
            continue
        p = proba[idx]
        for name, fn in metrics.items():
            values[name].append(fn(y, p))
    out = {}
    for name, vals in values.items():
        arr = np.asarray([v for v in vals if not np.isnan(v)])
        if len(arr) == 0:
            out[name] = (float("nan"), float("nan"))
            continue
        lo, hi = np.quantile(arr, [alpha / 2, 1 - alpha / 2])
        out[name] = (float(lo), float(hi))
    return out


def _ci_metrics(mel: int | None) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    """The metrics :func:`evaluate` bootstraps, ``mel`` being melanoma's class index: the
    counting and rank forms (:func:`fast_balanced_accuracy`, :func:`fast_macro_f1`,
    :func:`fast_macro_auc`), equal to the scikit-learn ones (tested) without their per-call
    checks, since every resample calls them."""
    return {
        "balanced_accuracy": fast_balanced_accuracy,
        "macro_f1": fast_macro_f1,
        "macro_auc": fast_macro_auc,
        "mel_sensitivity": lambda y, p: mel_sensitivity_specificity(y, p.argmax(axis=1),
                                                                    mel)[0],
    }


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
        cis = bootstrap_cis(y_true, proba, np.asarray(groups), _ci_metrics(mel),
                            n_boot=n_boot, seed=seed)
        result["ci95"] = {name: list(ci) for name, ci in cis.items()}
    return result


def warn_absent_classes(y_true: np.ndarray, classes: Sequence[str] = CLASSES) -> None:
    """One counted warning (:func:`lesionlab.errors.warn_once`) when ``y_true`` lacks classes.

    The first occurrence names them; repeats (every group of ``evaluate --by``, every small
    val or test split) are counted under one key and reported once on exit.

    Args:
        y_true: (n_images,) class indices into ``classes``.
        classes: the class set's names.
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
    (or without a melanoma class: ``mel`` None).

    Args:
        y_true: (n_images,) class indices.
        p_mel: (n_images,) P(mel) of each image, in [0, 1].
        target: the sensitivity to reach, in [0, 1].
        mel: melanoma's class index, or None.
    """
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


PAIRED_METRICS = ("balanced_accuracy", "macro_auc", "mel_sensitivity")


def paired_metric(name: str, mel_threshold: float = float("nan")
                  ) -> Callable[[np.ndarray, np.ndarray], float]:
    """``fn(y_true, proba)`` for one of :data:`PAIRED_METRICS`, for one model.

    ``mel_sensitivity`` is that of the model's own melanoma rule, "flag when P(mel) >=
    ``mel_threshold``" (its card's threshold); with a NaN threshold (no rule), that of the
    argmax decision.

    Args:
        name: one of :data:`PAIRED_METRICS`.
        mel_threshold: the model's P(mel) threshold, or NaN.

    Returns:
        ``fn(y_true, proba) -> float``: y_true (n_images,) class indices, proba
        (n_images, n_classes) probabilities.

    Raises:
        LesionLabError: ``name`` is not one of :data:`PAIRED_METRICS`.
    """
    if name not in PAIRED_METRICS:
        raise LesionLabError(f"unknown paired metric {name!r}; expected one of "
                             f"{', '.join(PAIRED_METRICS)}")
    if name == "mel_sensitivity" and not np.isnan(mel_threshold):
        sens = _op_metrics(mel_threshold)["sensitivity"]
        return lambda y, p: sens(y, p[:, [MEL]])
    return {"balanced_accuracy": fast_balanced_accuracy, "macro_auc": fast_macro_auc,
            "mel_sensitivity": _ci_metrics(MEL)["mel_sensitivity"]}[name]


def fast_balanced_accuracy(y_true: np.ndarray, proba: np.ndarray) -> float:
    """:func:`balanced_accuracy` of the argmax of ``proba`` (n, n_classes), by counting.

    The same value (tested), without scikit-learn's per-call checks: thousands of bootstrap
    resamples call it. NaN when ``y_true`` is empty.
    """
    y_true = np.asarray(y_true)
    if len(y_true) == 0:
        return float("nan")
    k = proba.shape[1]
    support = np.bincount(y_true, minlength=k)
    hits = np.bincount(y_true[proba.argmax(axis=1) == y_true], minlength=k)
    present = support > 0
    return float(np.mean(hits[present] / support[present]))


def fast_macro_f1(y_true: np.ndarray, proba: np.ndarray) -> float:
    """:func:`macro_f1` of the argmax of ``proba`` (n, n_classes), by counting: per class
    present in ``y_true``, F1 = 2 TP / (2 TP + FP + FN) (0 where the class is never
    predicted, as ``zero_division=0``). The same value (tested); NaN when ``y_true`` is
    empty.
    """
    y_true = np.asarray(y_true)
    if len(y_true) == 0:
        return float("nan")
    k = proba.shape[1]
    y_pred = proba.argmax(axis=1)
    tp = np.bincount(y_true[y_pred == y_true], minlength=k).astype(float)
    support = np.bincount(y_true, minlength=k)
    predicted = np.bincount(y_pred, minlength=k)
    present = support > 0
    f1 = 2 * tp[present] / (support[present] + predicted[present])
    return float(np.mean(f1))


def fast_macro_auc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """:func:`macro_auc` from ranks: each class's one-vs-rest AUC is the Mann-Whitney U of
    its scores over its positives' count times its negatives' (ties share their average
    rank), as in Hanley & McNeil, Radiology 143 (1982) 29-36. ``proba``: (n, n_classes).
    NaN when ``y_true`` holds fewer than two classes.
    """
    from scipy.stats import rankdata

    y_true = np.asarray(y_true)
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    ranks = rankdata(proba[:, present], axis=0)
    pos = y_true[:, None] == present[None, :]
    n_pos = pos.sum(axis=0)
    n_neg = len(y_true) - n_pos
    u = (ranks * pos).sum(axis=0) - n_pos * (n_pos + 1) / 2
    return float(np.mean(u / (n_pos * n_neg)))


def align_to(image_ids: Sequence[str], model_ids: Sequence[str], proba: np.ndarray,
             model: str = "model") -> np.ndarray:
    """The rows of ``proba`` (scored on ``model_ids``) in the order of ``image_ids``.

    Args:
        image_ids: (n,) the images both models of a comparison are scored on.
        model_ids: (n,) the images ``proba``'s rows belong to, in row order.
        proba: (n, n_classes) the model's probabilities.
        model: the model's name, for the error message.

    Returns:
        (n, n_classes) ``proba`` reordered.

    Raises:
        LesionLabError: the two id lists are not the same set of distinct images, or
            ``proba`` has not one row per id.
    """
    want, have = np.asarray(image_ids, dtype=str), np.asarray(model_ids, dtype=str)
    if len(have) != len(proba):
        raise LesionLabError(f"{model}: {len(proba)} probability rows for {len(have)} image ids")
    if len(np.unique(have)) != len(have) or len(np.unique(want)) != len(want):
        raise LesionLabError(f"{model}: repeated image ids; a paired comparison needs each "
                             f"image once")
    if len(want) != len(have) or set(want) != set(have):
        extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        raise LesionLabError(
            f"{model} was scored on other images than the comparison's: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(extra)} extra (e.g. {extra[:2]}); compare models "
            f"scored on the same split")
    pos = {i: k for k, i in enumerate(have)}
    return np.asarray(proba)[[pos[i] for i in want]]


def paired_bootstrap(y_true: np.ndarray, proba_a: np.ndarray, proba_b: np.ndarray,
                     groups: np.ndarray, metric_a: Callable[[np.ndarray, np.ndarray], float],
                     metric_b: Callable[[np.ndarray, np.ndarray], float] | None = None,
                     n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Paired, lesion-level bootstrap of ``metric(A) - metric(B)`` on the same images.

    Both models are scored on every resample of :func:`lesion_resamples` (one seeded
    generator; the same lesions for A and B), so the CI is that of the difference, not of
    either score: the paired design cancels the variation the two share. The interval is
    the percentile interval of the resampled differences (Efron & Tibshirani, *An
    Introduction to the Bootstrap*, 1993, ch. 13). Resamples with fewer than two classes,
    or where either value is NaN, are skipped (``n_used`` counts the rest).

    Args:
        y_true: (n,) class indices of the images.
        proba_a: (n, n_classes) model A's probabilities, rows in ``y_true``'s order.
        proba_b: (n, n_classes) model B's, same rows (see :func:`align_to`).
        groups: (n,) lesion id of each image.
        metric_a: ``fn(y_true, proba) -> float`` for A (see :func:`paired_metric`).
        metric_b: the same for B when it differs (each model's own melanoma rule);
            None: ``metric_a``.
        n_boot: resamples.
        seed: the generator's seed.
        alpha: 0.05 for a 95% interval.

    Returns:
        ``a``, ``b`` (the scores on all images), ``difference`` (a - b), ``ci95``
        ([low, high] of the difference, NaN when no resample was usable), ``n_used``.

    Raises:
        LesionLabError: the arrays do not have one row per image.
    """
    pair = (metric_a, metric_a if metric_b is None else metric_b)
    return paired_bootstrap_all(y_true, proba_a, proba_b, groups, {"m": pair}, n_boot, seed,
                                alpha)["m"]


MetricPair = tuple[Callable[[np.ndarray, np.ndarray], float],
                   Callable[[np.ndarray, np.ndarray], float]]


def paired_bootstrap_all(y_true: np.ndarray, proba_a: np.ndarray, proba_b: np.ndarray,
                         groups: np.ndarray, metrics: dict[str, MetricPair],
                         n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """:func:`paired_bootstrap` of several metrics over one set of resamples (the same
    lesions for every metric, drawn once). ``metrics``: name -> (metric of A, metric of B).

    Returns name -> the dict :func:`paired_bootstrap` returns.

    Args:
        y_true: (n_images,) class indices.
        proba_a: (n_images, n_classes) probabilities of model A.
        proba_b: (n_images, n_classes) probabilities of model B, rows aligned with A's.
        groups: (n_images,) lesion id of each image.
        metrics: name -> (metric of A, metric of B), each ``fn(y_true, proba) -> float``.
        n_boot: bootstrap resamples.
        seed: seed of the resamples.
        alpha: 1 - the coverage of the interval.

    Raises:
        LesionLabError: the arrays do not have one row per image.
    """
    y_true, groups = np.asarray(y_true), np.asarray(groups)
    proba_a, proba_b = np.asarray(proba_a, dtype=float), np.asarray(proba_b, dtype=float)
    if not len(y_true) == len(proba_a) == len(proba_b) == len(groups):
        raise LesionLabError(f"paired comparison: {len(y_true)} labels, {len(groups)} lesion "
                             f"ids, {len(proba_a)} and {len(proba_b)} probability rows")
    diffs: dict[str, list[float]] = {name: [] for name in metrics}
    for idx in lesion_resamples(groups, n_boot, seed):
        y = y_true[idx]
        if len(np.unique(y)) < 2:
            continue
        pa, pb = proba_a[idx], proba_b[idx]
        for name, (fa, fb) in metrics.items():
            diffs[name].append(fa(y, pa) - fb(y, pb))
    out = {}
    for name, (fa, fb) in metrics.items():
        a, b = float(fa(y_true, proba_a)), float(fb(y_true, proba_b))
        usable = np.asarray([d for d in diffs[name] if not np.isnan(d)])
        ci = (np.quantile(usable, [alpha / 2, 1 - alpha / 2]).tolist() if len(usable)
              else [float("nan"), float("nan")])
        out[name] = {"a": a, "b": b, "difference": a - b,
                     "ci95": [float(ci[0]), float(ci[1])], "n_used": int(len(usable))}
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
