"""``python -m models.train_head``: Optuna-tuned light head on cached features, evaluated once.

Tuning uses lesion-grouped stratified K folds of the train split only; the val split picks the
decision rule (argmax or class-prior correction) and the temperature; the test split is scored
once at the end, with lesion-level bootstrap CIs.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import optuna

from lesionlab.artifacts import library_versions
from lesionlab.cli import add_data_args, resolve_data, run_main
from lesionlab.data import CLASSES, Dataset
from lesionlab.download import ensure_data
from lesionlab.metrics import balanced_accuracy, evaluate, expected_calibration_error
from lesionlab.splits import grouped_folds, load_or_make_split, train_fraction
from models import heads
from models.bundle import model_name, model_path, save_card, save_pipeline
from models.design import load_design

log = logging.getLogger(__name__)


@dataclass
class HeadConfig:
    """One cell of the study: features x head x imbalance strategy x metadata."""

    features: str
    head: str = "logreg"
    imbalance: str = "class_weight"
    metadata: bool = False
    trials: int = 20
    timeout: float | None = 150.0
    folds: int = 3
    seed: int = 0
    train_fraction: float = 1.0
    name: str | None = None
    n_boot: int = 1000

    def model_name(self) -> str:
        """Default folder name: the defining settings."""
        frac = f"frac{self.train_fraction:g}" if self.train_fraction < 1 else ""
        return self.name or model_name(self.features, self.head, self.imbalance,
                                       "meta" if self.metadata else "", frac, f"seed{self.seed}")


def _study(folder: Path, cfg: HeadConfig) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder.mkdir(parents=True, exist_ok=True)
    return optuna.create_study(
        study_name="head", storage=f"sqlite:///{folder / 'study.db'}", load_if_exists=True,
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0))


def train_head(dataset: Dataset, workdir: Path | str, cfg: HeadConfig) -> dict:
    """Tune, refit, calibrate on val, test once; save the model folder; return its card."""
    heads.check_choice(cfg.head, cfg.imbalance)
    t_start = time.perf_counter()
    split = load_or_make_split(dataset, workdir, cfg.seed)
    design = load_design(workdir, dataset, cfg.features, cfg.metadata)
    where = dataset.frame["image_id"].map(split.set_index("image_id")["split"]).to_numpy()
    y = dataset.labels
    groups = dataset.frame["lesion_id"].astype(str).to_numpy()
    tr, va, te = (np.flatnonzero(where == s) for s in ("train", "val", "test"))
    if cfg.train_fraction < 1.0:
        tr = tr[train_fraction(y[tr], groups[tr], cfg.train_fraction, cfg.seed)]
    x = design.x
    folder = model_path(workdir, cfg.model_name())

    study = _study(folder, cfg)
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                       optuna.trial.TrialState.PRUNED)]
    if not study.trials:
        study.enqueue_trial(heads.default_params(cfg.head, x.shape[1]))
    remaining = max(0, cfg.trials - len(finished))
    folds = grouped_folds(y[tr], groups[tr], cfg.folds, cfg.seed)
    t_tune = time.perf_counter()
    if remaining:
        study.optimize(heads.cv_objective(x[tr], y[tr], folds, cfg.head, cfg.imbalance, cfg.seed),
                       n_trials=remaining, timeout=cfg.timeout, show_progress_bar=True)
    tune_s = time.perf_counter() - t_tune
    best = study.best_trial
    params = dict(best.params)
    n_trees = best.user_attrs.get("best_iteration", heads.MAX_TREES)

    t_fit = time.perf_counter()
    pipe = heads.build_pipeline(cfg.head, cfg.imbalance, params, cfg.seed, n_estimators=n_trees)
    heads.adapt_to_data(pipe, x[tr], y[tr]).fit(x[tr], y[tr])
    fit_s = time.perf_counter() - t_fit
    model = heads.HeadModel(pipe)

    # Decision rule and temperature are chosen on val only.
    raw_va = model.raw_proba(x[va])
    prior = np.bincount(y[tr], minlength=len(CLASSES)) / len(tr)
    ba_plain = balanced_accuracy(y[va], raw_va.argmax(1))
    ba_prior = balanced_accuracy(y[va], heads.apply_prior_correction(raw_va, prior).argmax(1))
    if ba_prior > ba_plain:
        model.prior = prior
    model.temperature = heads.fit_temperature(model.decide(raw_va), y[va])

    # The test split: touched once, here.
    raw_te = model.raw_proba(x[te])
    # Before temperature scaling: the decision rule alone.
    uncal_te = raw_te if model.prior is None else heads.apply_prior_correction(raw_te, prior)
    proba_te = model.decide(raw_te)
    test = evaluate(y[te], proba_te, groups[te], n_boot=cfg.n_boot, seed=cfg.seed)
    test["ece_uncalibrated"] = expected_calibration_error(y[te], uncal_te)
    val = evaluate(y[va], model.predict_proba(x[va]), n_boot=0)

    save_pipeline(folder, model)
    np.save(folder / "test_proba.npy", proba_te)
    card = {
        "kind": "head",
        "name": folder.name,
        "config": asdict(cfg),
        "classes": list(CLASSES),
        "features": design.describe(),
        "metadata": cfg.metadata,
        "n_features": int(x.shape[1]),
        "best_params": params,
        "n_estimators": int(n_trees) if cfg.head == "lightgbm" else None,
        "cv_balanced_accuracy": float(best.value),
        "cv_fold_scores": best.user_attrs.get("fold_scores"),
        "n_trials": len(study.trials),
        "decision_rule": "prior_corrected" if model.prior is not None else "argmax",
        "val_balanced_accuracy_argmax": ba_plain,
        "val_balanced_accuracy_prior": ba_prior,
        "temperature": model.temperature,
        "val": val,
        "test": test,
        "test_image_ids": dataset.frame["image_id"].to_numpy()[te].tolist(),
        "n_train": int(len(tr)), "n_val": int(len(va)), "n_test": int(len(te)),
        "tune_time_s": round(tune_s, 1),
        "fit_time_s": round(fit_s, 2),
        "total_time_s": round(time.perf_counter() - t_start, 1),
        "data_fingerprint": dataset.fingerprint(),
        "versions": library_versions(),
    }
    save_card(folder, card)
    return card


def summary_line(card: dict) -> str:
    """One line of headline numbers for a model card."""
    t = card["test"]
    lo, hi = t.get("ci95", {}).get("balanced_accuracy", [float("nan")] * 2)
    return (f"{card['name']}: test balanced acc {t['balanced_accuracy']:.3f} "
            f"[{lo:.3f}, {hi:.3f}]  macro F1 {t['macro_f1']:.3f}  AUC {t['macro_auc']:.3f}  "
            f"mel sens {t['mel_sensitivity']:.3f}  ECE {t['ece']:.3f}  "
            f"(cv {card.get('cv_balanced_accuracy', float('nan')):.3f}, "
            f"{card.get('total_time_s', 0)} s)")


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments."""
    p = argparse.ArgumentParser(prog="python -m models.train_head", description=__doc__)
    p.add_argument("--features", required=True,
                   help="feature set key(s) or backbone name(s) joined by '+', "
                        "e.g. tf_efficientnet_lite0+classical")
    p.add_argument("--head", default="logreg", help="logreg | lightgbm")
    p.add_argument("--imbalance", default="class_weight", help="none | class_weight | smote")
    p.add_argument("--metadata", action="store_true", help="append age, sex, localization")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--timeout", type=float, default=150.0,
                   help="tuning time cap in seconds (results are reproducible when --trials, "
                        "not the cap, ends the study)")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--train-fraction", type=float, default=1.0)
    p.add_argument("--name", default=None, help="model folder name (default: from settings)")
    add_data_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and train one head."""
    args = build_parser().parse_args(argv)
    dataset = ensure_data(resolve_data(args))
    cfg = HeadConfig(features=args.features, head=args.head, imbalance=args.imbalance,
                     metadata=args.metadata, trials=args.trials, timeout=args.timeout,
                     folds=args.folds, seed=args.seed, train_fraction=args.train_fraction,
                     name=args.name)
    card = train_head(dataset, args.workdir, cfg)
    print(summary_line(card))
    return 0


if __name__ == "__main__":
    run_main(main)
