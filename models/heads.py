"""Light heads on cached embeddings: pipelines, Optuna search spaces, grouped-CV objective.

Every fitted step (imputation, scaling, PCA, SMOTE) lives inside an imblearn ``Pipeline`` that
is fitted on the training part of a fold only; samplers act during ``fit`` and never touch
validation or test rows.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.decomposition import PCA
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from lesionlab.calibration import prior_corrected
from lesionlab.data import CLASSES
from lesionlab.errors import LesionLabError, warn_once
from lesionlab.metrics import (MEL_TARGET_SENSITIVITY, N_CLASSES, balanced_accuracy, mel_index,
                               threshold_for_sensitivity)

if TYPE_CHECKING:  # the search and the pipeline libraries load only where heads are fitted
    import optuna
    from imblearn.pipeline import Pipeline

log = logging.getLogger(__name__)

HEADS = ("logreg", "lightgbm")
IMBALANCE = ("none", "class_weight", "smote")
EARLY_STOPPING_ROUNDS = 20
# With class weights the early-stopping loss kept improving to ~1,000 trees (2 min a fit on
# 2 cores); 300 trees at learning rate >= 0.05 keeps a tuned cell near 3 minutes.
MAX_TREES = 300


def check_choice(head: str, imbalance: str) -> None:
    """Reject unknown head / imbalance names.

    Raises:
        LesionLabError: ``head`` is not in ``HEADS`` or ``imbalance`` not in ``IMBALANCE``.
    """
    if head not in HEADS:
        raise LesionLabError(f"unknown --head {head!r}; expected one of {HEADS}")
    if imbalance not in IMBALANCE:
        raise LesionLabError(f"unknown --imbalance {imbalance!r}; expected one of {IMBALANCE}")


def suggest_params(trial: optuna.Trial, head: str, n_features: int) -> dict[str, Any]:
    """The search space of each head."""
    # Full-width logreg on >1k dims costs ~10 s a fit on 2 cores; PCA keeps a cell in budget.
    pca_choices = [c for c in (64, 128, 256, 512) if c < n_features]
    if n_features <= 1024 or not pca_choices:
        pca_choices = [0, *pca_choices]
    if head == "logreg":
        return {
            "C": trial.suggest_float("C", 1e-4, 10.0, log=True),
            "pca": trial.suggest_categorical("pca", pca_choices),
        }
    lgb_pca = [c for c in (32, 64, 128) if c < n_features] or [0]
    return {
        "pca": trial.suggest_categorical("pca", lgb_pca),
        "learning_rate": trial.suggest_float("learning_rate", 0.05, 0.3, log=True),
        "num_leaves": trial.suggest_int("num_leaves", 7, 63, log=True),
        "max_depth": trial.suggest_int("max_depth", 3, 8),
        "min_child_samples": trial.suggest_int("min_child_samples", 5, 60, log=True),
        "colsample_bytree": trial.suggest_float("colsample_bytree", 0.3, 1.0),
        "subsample": trial.suggest_float("subsample", 0.5, 1.0),
        "reg_alpha": trial.suggest_float("reg_alpha", 1e-3, 10.0, log=True),
        "reg_lambda": trial.suggest_float("reg_lambda", 1e-3, 10.0, log=True),
    }


def default_params(head: str, n_features: int) -> dict[str, Any]:
    """Untuned reference settings (the first trial enqueued in every study)."""
    if head == "logreg":
        return {"C": 0.01, "pca": 0 if n_features <= 1024 else 256}
    return {"pca": 64 if n_features > 64 else 0, "learning_rate": 0.1, "num_leaves": 15,
            "max_depth": 6, "min_child_samples": 20, "colsample_bytree": 0.8,
            "subsample": 0.8, "reg_alpha": 0.01, "reg_lambda": 1.0}


def build_pipeline(head: str, imbalance: str, params: dict[str, Any], seed: int,
                   n_estimators: int = MAX_TREES) -> Pipeline:
    """impute -> scale -> [PCA] -> [SMOTE] -> classifier, as one imblearn Pipeline.

    SMOTE: Chawla et al., "SMOTE: synthetic minority over-sampling technique", JAIR 16
    (2002), imbalanced-learn's implementation; ``class_weight``: scikit-learn's ``balanced``
    weights, n_samples / (n_classes * count of the class).
    """
    steps: list[tuple[str, Any]] = [
        ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
        ("scale", StandardScaler()),
    ]
    if params.get("pca"):
        # whitening keeps lbfgs well conditioned: ~10x fewer iterations than raw components
        steps.append(("pca", PCA(n_components=int(params["pca"]), svd_solver="randomized",
                                 whiten=True, random_state=seed)))
    if imbalance == "smote":
        from imblearn.over_sampling import SMOTE

        steps.append(("smote", SMOTE(random_state=seed)))
    weight = "balanced" if imbalance == "class_weight" else None
    if head == "logreg":
        clf: Any = LogisticRegression(C=params["C"], class_weight=weight, max_iter=2000,
                                      random_state=seed)
    else:
        import lightgbm as lgb

        clf = lgb.LGBMClassifier(
            objective="multiclass", n_estimators=n_estimators,
            learning_rate=params["learning_rate"], num_leaves=params["num_leaves"],
            max_depth=params["max_depth"], min_child_samples=params["min_child_samples"],
            colsample_bytree=params["colsample_bytree"], subsample=params["subsample"],
            subsample_freq=1, reg_alpha=params["reg_alpha"], reg_lambda=params["reg_lambda"],
            class_weight=weight, random_state=seed, n_jobs=2, verbose=-1, deterministic=True,
            force_row_wise=True)
    steps.append(("clf", clf))
    from imblearn.pipeline import Pipeline

    return Pipeline(steps)


def adapt_to_data(pipe: Pipeline, x: np.ndarray, y: np.ndarray,
                  classes: tuple[str, ...] = CLASSES) -> Pipeline:
    """Shrink PCA width and SMOTE's k to what this training part allows (tiny folds);
    ``classes`` names the labels ``y`` indexes (for the warning).

    Args:
        pipe: the unfitted pipeline (changed in place and returned).
        x: (n_rows, n_features) the training part.
        y: (n_rows,) class indices.
        classes: the class set's names.
    """
    if "pca" in pipe.named_steps:
        pca = pipe.named_steps["pca"]
        pipe.set_params(pca__n_components=min(pca.n_components, *x.shape))
    if "smote" in pipe.named_steps:
        counts = {int(c): int(n) for c, n in zip(*np.unique(y, return_counts=True))}
        top = max(counts.values())
        # SMOTE interpolates between a sample and its neighbours: a class with one sample in
        # this training part has none, so it keeps its one row (said once, counted)
        lone = sorted(c for c, n in counts.items() if n < 2)
        if lone:
            warn_once("SMOTE: class(es) " + ", ".join(classes[c] for c in lone) + " have a "
                      "single image in a training part; they are not oversampled there",
                      key="smote_single_image")
        targets = {c: top for c, n in counts.items() if 2 <= n < top}
        k = min([5] + [counts[c] - 1 for c in targets])
        # 'auto' (every class up to the largest) where it can; else the classes it can
        # (a class at its own count: nothing generated)
        strategy = "auto" if not lone else targets or {lone[0]: counts[lone[0]]}
        pipe.set_params(smote__k_neighbors=k, smote__sampling_strategy=strategy)
    return pipe


def early_stopping_split(y: np.ndarray, groups: np.ndarray,
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, early-stopping rows) of a fold's training part: a lesion-grouped, stratified
    fifth is held out to stop boosting on, so the rows a fold is scored on never choose the
    number of trees. Every class keeps a lesion in the fit rows (a class with one lesion has
    none to stop on); see :func:`lesionlab.splits.grouped_holdout`.

    Args:
        y: (n_rows,) class indices of the fold's training part.
        groups: (n_rows,) lesion ids.
        seed: seed of the holdout.

    Returns:
        (fit_rows, stop_rows): (n_fit,) and (n_stop,) int row indices, n_fit + n_stop = n_rows.
    """
    from lesionlab.splits import grouped_holdout, lesions_per_class

    stop = grouped_holdout(y, groups, 0.2, seed, "early-stopping split", min_held=0)
    counts = lesions_per_class(y, groups)
    largest = max(counts, key=counts.get)
    if not stop.any() and counts[largest] >= 2:  # tiny folds: one lesion of the largest class
        lesion = np.random.default_rng(seed).choice(np.unique(groups[y == largest]))
        stop = groups == lesion
    return np.flatnonzero(~stop), np.flatnonzero(stop)


def _transform(pipe: Pipeline, x_fit: np.ndarray, y_fit: np.ndarray,
               others: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Fit the pipeline's steps before the classifier on (x_fit, y_fit) only (samplers too);
    transform ``others`` with them."""
    adapt_to_data(pipe, x_fit, y_fit)
    xt, yt = x_fit, y_fit
    for _, step in pipe.steps[:-1]:
        if hasattr(step, "fit_resample"):
            xt, yt = step.fit_resample(xt, yt)  # training rows only
        else:
            xt = step.fit_transform(xt, yt)
            others = [step.transform(o) for o in others]
    return xt, yt, others


def fit_fold(pipe: Pipeline, x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray,
             y_va: np.ndarray, groups_tr: np.ndarray | None = None,
             seed: int = 0, n_classes: int = N_CLASSES) -> tuple[np.ndarray, int | None]:
    """Fit on the fold's training part (samplers here only) and predict the validation part.

    LightGBM stops early on a lesion-grouped part of the training rows (``groups_tr``), never
    on the validation part it is scored on. Returns (val probabilities, (n_val,
    n_classes), and LightGBM's best iteration, None for other heads).

    Args:
        pipe: the unfitted pipeline.
        x_tr: (n_train, n_features) training rows.
        y_tr: (n_train,) their class indices.
        x_va: (n_val, n_features) the rows to predict.
        y_va: (n_val,) their class indices (unused for fitting).
        groups_tr: (n_train,) lesion ids of the training rows; None: one lesion per row.
        seed: seed of the early-stopping split.
        n_classes: the class set's size.
    """
    clf = pipe.steps[-1][1]
    if not _is_lightgbm(clf):
        xt, yt, (xv,) = _transform(pipe, x_tr, y_tr, [x_va])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf.fit(xt, yt)
        return full_proba(clf, xv, n_classes), None
    import lightgbm as lgb

    groups_tr = np.arange(len(y_tr)) if groups_tr is None else groups_tr
    fit_rows, stop_rows = early_stopping_split(y_tr, groups_tr, seed)
    ys = y_tr[stop_rows]
    seen = np.isin(ys, np.unique(y_tr[fit_rows]))  # LightGBM rejects classes it never saw
    xt, yt, (xs, xv) = _transform(pipe, x_tr[fit_rows], y_tr[fit_rows],
                                  [x_tr[stop_rows][seen] if seen.any() else x_va, x_va])
    stopping = ({"eval_set": [(xs, ys[seen])],
                 "callbacks": [lgb.early_stopping(EARLY_STOPPING_ROUNDS, verbose=False)]}
                if seen.any() else {})  # one lesion per class: nothing to stop on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(xt, yt, **stopping)
    return (full_proba(clf, xv, n_classes),
            int(getattr(clf, "best_iteration_", 0) or clf.n_estimators))


def _is_lightgbm(clf: Any) -> bool:
    """True for a LightGBM classifier (imported only when LightGBM is in use)."""
    import sys

    lgb = sys.modules.get("lightgbm")
    return lgb is not None and isinstance(clf, lgb.LGBMClassifier)


def full_proba(clf: Any, x: np.ndarray, n_classes: int = N_CLASSES) -> np.ndarray:
    """``predict_proba`` spread onto all ``n_classes`` classes, (len(x), n_classes) (a fold
    may miss a rare class).

    Args:
        clf: a fitted classifier with ``predict_proba`` and ``classes_``.
        x: (n_rows, n_features).
        n_classes: the class set's size.

    Returns:
        (n_rows, n_classes) probabilities; classes the classifier never saw get 0.
    """
    proba = clf.predict_proba(x)
    out = np.zeros((len(x), n_classes))
    out[:, np.asarray(clf.classes_, dtype=int)] = proba
    return out


def cv_objective(x: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]],
                 head: str, imbalance: str, seed: int, groups: np.ndarray | None = None,
                 n_classes: int = N_CLASSES):
    """Optuna objective: mean balanced accuracy over the grouped folds, pruned per fold
    (``n_classes``: the size of the class set ``y`` indexes).

    Args:
        x: (n_images, n_features) float design matrix (:func:`models.design.build_design`).
        y: (n_images,) class indices.
        folds: (train rows, val rows) index arrays per fold.
        head: ``logreg`` or ``lightgbm``.
        imbalance: ``class_weight``, ``smote`` or ``none``.
        seed: model seed.
        groups: (n_images,) lesion ids, for LightGBM's early-stopping split.
        n_classes: the class set's size.

    Returns:
        ``objective(trial) -> float``, the trial's mean balanced accuracy in [0, 1]; it raises
        ``optuna.TrialPruned`` when Optuna's pruner stops the trial.
    """

    def objective(trial: optuna.Trial) -> float:
        params = suggest_params(trial, head, x.shape[1])
        scores, iters = [], []
        for k, (tr, va) in enumerate(folds):
            pipe = build_pipeline(head, imbalance, params, seed)
            proba, best_iter = fit_fold(pipe, x[tr], y[tr], x[va], y[va],
                                        None if groups is None else groups[tr], seed,
                                        n_classes)
            scores.append(balanced_accuracy(y[va], proba.argmax(1)))
            if best_iter is not None:
                iters.append(best_iter)
            trial.report(float(np.mean(scores)), k)
            if trial.should_prune():
                import optuna

                raise optuna.TrialPruned()
        if iters:
            trial.set_user_attr("best_iteration", int(np.median(iters)))
        trial.set_user_attr("fold_scores", [float(s) for s in scores])
        return float(np.mean(scores))

    return objective


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> float:
    """Temperature T minimising the NLL of softmax(log p / T) on held-out data.

    scikit-learn's ``CalibratedClassifierCV(FrozenEstimator(...), method="temperature")``
    finds the same T (to 1e-6, pinned by a test) but cannot fit when the held-out rows lack a
    class or hold fewer rows of a class than its internal CV folds (small val splits, learning-
    curve subsets), so the one-parameter fit stays here.

    Args:
        proba: (n_images, n_classes) held-out probabilities, rows summing to 1.
        y: (n_images,) class indices.

    Returns:
        T in [0.05, 20] (temperature scaling, Guo et al., ICML 2017), bounded scalar search.
    """
    from scipy.optimize import minimize_scalar

    logp = np.log(np.clip(proba, 1e-12, 1.0))

    def nll(t: float) -> float:
        z = logp / t
        z = z - z.max(axis=1, keepdims=True)
        logq = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-logq[np.arange(len(y)), y].mean())

    return float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x)


def apply_temperature(proba: np.ndarray, t: float) -> np.ndarray:
    """Rescale probabilities by temperature ``t`` (argmax unchanged).

    Args:
        proba: (n_images, n_classes) probabilities.
        t: the temperature, > 0 (T > 1 softens).

    Returns:
        (n_images, n_classes) softmax(log p / t), rows summing to 1.
    """
    z = np.log(np.clip(proba, 1e-12, 1.0)) / t
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def apply_prior_correction(proba: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Divide by the training class prior and renormalise (a balanced-accuracy decision rule).

    Args:
        proba: (n_images, n_classes) probabilities.
        prior: (n_classes,) training class frequencies.

    Returns:
        (n_images, n_classes) p / prior, renormalised; rows summing to 1.
    """
    return prior_corrected(proba, prior)


class HeadModel(ClassifierMixin, BaseEstimator):
    """A light head on embeddings as one scikit-learn estimator.

    ``fit`` fits the imblearn pipeline on training rows; ``choose_rule`` (argmax or class-prior
    correction), ``calibrate`` (temperature) and ``choose_mel_threshold`` (the melanoma rule)
    use held-out rows. Fitted state lives in ``pipeline_``, ``classes_``, ``prior_``,
    ``decision_rule_``, ``temperature_`` and ``mel_threshold_``. ``class_names`` is the class
    set the labels index (the data's; HAM10000's 7 by default); probabilities have one column
    per name, and without ``mel`` among them there is no melanoma threshold (NaN).
    """

    def __init__(self, head: str = "logreg", imbalance: str = "class_weight",
                 params: dict[str, Any] | None = None, seed: int = 0,
                 n_estimators: int = MAX_TREES,
                 class_names: tuple[str, ...] = CLASSES) -> None:
        self.head = head
        self.imbalance = imbalance
        self.params = params
        self.seed = seed
        self.n_estimators = n_estimators
        self.class_names = class_names

    def __setstate__(self, state: dict) -> None:
        """Unpickling (skops too): a head saved before class sets were recorded has
        HAM10000's 7."""
        super().__setstate__({"class_names": CLASSES, **state})

    @property
    def n_classes_(self) -> int:
        """Number of classes (columns of the probabilities)."""
        return len(self.class_names)

    def fit(self, x: np.ndarray, y: np.ndarray) -> "HeadModel":
        """Fit the pipeline (samplers act here only); the rule starts as argmax, T as 1.

        Args:
            x: (n_images, n_features) float design matrix (:func:`models.design.build_design`).
            y: (n_images,) class indices.
        """
        params = self.params or default_params(self.head, x.shape[1])
        pipe = build_pipeline(self.head, self.imbalance, params, self.seed, self.n_estimators)
        self.pipeline_ = adapt_to_data(pipe, x, y, tuple(self.class_names)).fit(x, y)
        self.classes_ = np.arange(self.n_classes_)
        self.prior_ = np.bincount(y, minlength=self.n_classes_) / len(y)
        self.decision_rule_ = "argmax"
        self.temperature_ = 1.0
        self.mel_threshold_ = float("nan")
        return self

    def raw_proba(self, x: np.ndarray) -> np.ndarray:
        """Pipeline probabilities on all classes, (n_images, n_classes_) (no decision rule, no
        temperature)."""
        check_is_fitted(self, "pipeline_")
        return full_proba(self.pipeline_, x, self.n_classes_)

    def decide(self, proba: np.ndarray) -> np.ndarray:
        """Apply the decision rule chosen on held-out rows (before any temperature).

        Args:
            proba: (n_images, n_classes) pipeline probabilities.

        Returns:
            (n_images, n_classes) probabilities under the rule (prior-corrected or unchanged).
        """
        if self.decision_rule_ == "prior_corrected":
            return apply_prior_correction(proba, self.prior_)
        return proba

    def choose_rule(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Keep the class-prior correction if it beats argmax in balanced accuracy on (x, y).

        Args:
            x: (n_images, n_features) held-out rows of the design matrix
                (:func:`models.design.build_design`).
            y: (n_images,) class indices.

        Returns:
            Rule name -> balanced accuracy in [0, 1] on (x, y).
        """
        raw = self.raw_proba(x)
        scores = {"argmax": balanced_accuracy(y, raw.argmax(1)),
                  "prior_corrected": balanced_accuracy(
                      y, apply_prior_correction(raw, self.prior_).argmax(1))}
        better = scores["prior_corrected"] > scores["argmax"]
        self.decision_rule_ = "prior_corrected" if better else "argmax"
        return scores

    def calibrate(self, x: np.ndarray, y: np.ndarray) -> "HeadModel":
        """Fit the temperature on held-out rows (argmax unchanged).

        Args:
            x: (n_images, n_features) held-out rows of the design matrix
                (:func:`models.design.build_design`).
            y: (n_images,) class indices.
        """
        self.temperature_ = fit_temperature(self.decide(self.raw_proba(x)), y)
        return self

    def choose_mel_threshold(self, x: np.ndarray, y: np.ndarray,
                             target: float = MEL_TARGET_SENSITIVITY) -> float:
        """The melanoma rule's threshold on calibrated P(mel), chosen on held-out rows for
        sensitivity >= ``target`` (NaN without a ``mel`` class).

        Args:
            x: (n_images, n_features) held-out rows of the design matrix
                (:func:`models.design.build_design`).
            y: (n_images,) class indices.
            target: the melanoma sensitivity to reach, in [0, 1].
        """
        mel = mel_index(self.class_names)
        if mel is None:
            self.mel_threshold_ = float("nan")
        else:
            self.mel_threshold_ = threshold_for_sensitivity(y, self.predict_proba(x)[:, mel],
                                                            target, mel)
        return self.mel_threshold_

    def uncalibrated_proba(self, x: np.ndarray) -> np.ndarray:
        """Probabilities after the decision rule, before the temperature.

        Args:
            x: (n_images, n_features) float design matrix (:func:`models.design.build_design`).

        Returns:
            (n_images, n_classes) probabilities, rows summing to 1.
        """
        return self.decide(self.raw_proba(x))

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Final, calibrated probabilities.

        Args:
            x: (n_images, n_features) float design matrix (:func:`models.design.build_design`).

        Returns:
            (n_images, n_classes) calibrated probabilities, rows summing to 1.
        """
        proba = self.uncalibrated_proba(x)
        t = self.temperature_
        return apply_temperature(proba, t) if t != 1.0 else proba

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class indices under the chosen decision rule.

        Args:
            x: (n_images, n_features) float design matrix (:func:`models.design.build_design`).

        Returns:
            (n_images,) class indices.
        """
        return self.predict_proba(x).argmax(1)
