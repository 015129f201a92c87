"""``python -m models.train_head``: Optuna-tuned light head on cached features, evaluated once.

Tuning uses lesion-grouped stratified K folds of the train split only; the val split picks the
decision rule (argmax or class-prior correction) and the temperature; the test split is scored
once at the end, with lesion-level bootstrap CIs. Model folders hold a skops file: load only
folders you trust or made yourself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import optuna

from featurize.backbones import finetuned_card
from featurize.spec import parse_features
from lesionlab.artifacts import library_versions, save_npy
from lesionlab.card_blocks import HeadRecord, HeadSettings
from lesionlab.cli import (add_config_args, check_choices, config_from_args, config_parser,
                           label_options, option, resolve_data, run_main, safe_name, save_config)
from lesionlab.cli import TrackingOptions  # the MLflow flags
from lesionlab.data import CLASSES, Dataset
from lesionlab.download import ensure_data
from lesionlab.errors import LesionLabError
from lesionlab.fingerprint import save_train_digests
from lesionlab.splits import grouped_folds, load_or_make_split, split_indices
from models import heads
from models.bundle import (ModelCard, TrainingRun, claim_folder, model_name, model_path,
                           release_claims, save_card, save_head, summary_line)
from models.design import Design, copy_members
from models.finish import FinishInput, finish
from models.train_design import load_design

log = logging.getLogger(__name__)
STUDY_FILE = "study.db"
HEARTBEAT_S = 20
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
STAGES = ("all", "tune", "refit")


@dataclass
class HeadConfig(TrainingRun):
    """One cell of the study: features x head x imbalance strategy x metadata."""

    features: str = option(help="feature set key(s) or backbone name(s) joined by '+', e.g. "
                                "tf_efficientnet_lite0+classical; name:opt picks options")
    head: str = option("logreg", "classifier on the features", choices=heads.HEADS)
    imbalance: str = option("class_weight", "against the class imbalance",
                            choices=heads.IMBALANCE)
    metadata: bool = option(False, "append age, sex and localization")
    trials: int = option(20, "Optuna trials (completed or pruned) the study must hold", ge=1)
    tune_timeout: float | None = option(150.0, "tuning time cap in seconds (results are "
                                               "reproducible when --trials ends the study)", gt=0)
    folds: int = option(3, "lesion-grouped CV folds of the train split", ge=2)
    seed: int = option(0, "model and tuning seed", ge=0, le=2**32 - 1)
    split_seed: int | None = option(None, "seed of the train/val/test split; None: the same "
                                          "as --seed", ge=0, le=2**32 - 1)
    train_fraction: float = option(1.0, "lesion-grouped fraction of train to use", gt=0, le=1)
    name: str | None = option(None, "model folder name; None: made from the settings",
                              parse=safe_name)
    n_boot: int = option(1000, "bootstrap resamples for the test CIs", ge=0)
    storage: str | None = option(None, "Optuna storage shared by workers: a SQLAlchemy URL "
                                       "(postgresql+psycopg2://user@host/db) or "
                                       "journal:///path/file.log; None: study.db in the "
                                       "model folder")
    study_name: str | None = option(None, "study name in --storage; None: the model name")

    def validate(self) -> None:
        """Reject unknown option values and a malformed ``--features`` (``featurize.spec``)
        with a message naming them.

        Raises:
            LesionLabError: an option outside its choices or range, or a malformed ``--features``.
        """
        check_choices(self)
        parse_features(self.features)

    def model_name(self) -> str:
        """Default folder name: the defining settings."""
        return self.name or model_name(self.features, self.head, self.imbalance,
                                       "meta" if self.metadata else "", *self.name_tail())


def study_fingerprint(design: Design, cfg: HeadConfig, n_train: int) -> str:
    """What a study's trials depend on: the exact feature sets, data and CV settings."""
    parts = {"features": [(fs.key, fs.manifest["weights_sha256"], fs.manifest["data_fingerprint"])
                          for fs in design.feature_sets],
             "metadata": cfg.metadata, "head": cfg.head, "imbalance": cfg.imbalance,
             "folds": cfg.folds, "seed": cfg.seed, "data_seed": cfg.data_seed,
             "train_fraction": cfg.train_fraction, "n_train": n_train}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def make_storage(url: str | None, folder: Path,
                 timeout: float = 10.0) -> str | optuna.storages.BaseStorage:
    """Optuna storage: the model folder's SQLite file, a journal file, or any SQLAlchemy URL.

    RDB storages get heartbeats, so a trial whose worker died is failed by the next worker.
    An RDB server must accept a connection within ``timeout`` seconds (PostgreSQL and MySQL
    drivers; a peer that accepts and never answers would otherwise hang every worker).

    Raises:
        LesionLabError: the journal file's folder cannot be made or written, or the RDB URL is
            malformed, lacks its driver, or its server does not connect within ``timeout``.
    """
    import math
    import os

    import sqlalchemy

    if url is None:
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / STUDY_FILE}"
    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len("journal://"):])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(path.parent, os.W_OK | os.X_OK):
                raise PermissionError(f"folder {path.parent} is not writable")
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            why = f"{exc.strerror}: {exc.filename}" if exc.strerror else str(exc)
            raise LesionLabError(f"cannot use journal storage {url}: {why}") from None
    try:
        parsed = sqlalchemy.make_url(url)
        shown = parsed.render_as_string(hide_password=True)
    except Exception:  # sqlalchemy.exc.ArgumentError, and whatever a dialect plug-in raises
        raise LesionLabError(f"cannot open Optuna storage {url!r}: not a SQLAlchemy URL "
                             "(dialect://user@host/db) or journal:///path/file.log") from None
    connect_args = ({"connect_timeout": max(1, math.ceil(timeout))}
                    if parsed.get_backend_name() in ("postgresql", "mysql") else {})
    try:
        engine = sqlalchemy.create_engine(parsed, connect_args=connect_args)
        try:
            engine.connect().close()
        finally:
            engine.dispose()
    except Exception as exc:  # driver missing, refused, timed out, not that kind of server
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise LesionLabError(f"cannot open Optuna storage {shown}: {why}") from None
    return _rdb_storage(url)


def _rdb_storage(url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """An RDB storage; retried, since workers starting together race to create the schema."""
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental; we use them
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S,
                                                  grace_period=3 * HEARTBEAT_S)
        except Exception as exc:  # bad URL, driver missing, server down, schema race
            race = any(w in str(exc).lower() for w in ("duplicate", "already exists"))
            if attempt + 1 == attempts or not race:
                raise LesionLabError(f"cannot open Optuna storage {url}: "
                                     f"{str(exc).splitlines()[0][:200]}") from None
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def fail_running(study: optuna.Study, why: str) -> None:
    """Mark every RUNNING trial failed: only when no other worker can be alive."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        log.warning("trial %d was left running %s: marked failed", trial.number, why)
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def open_study(folder: Path, cfg: HeadConfig, fingerprint: str) -> optuna.Study:
    """The cell's Optuna study: resumed if made for the same inputs.

    The default per-model SQLite study belongs to one process: a stale one (other inputs) is
    started anew and trials a killed run left RUNNING are failed. A shared study (--storage)
    made for other inputs is refused rather than deleted under other workers.

    Raises:
        LesionLabError: a shared study (``--storage``) was made for other features or settings.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(cfg.storage, folder)
    name = cfg.study_name or ("head" if cfg.storage is None else folder.name)
    kwargs = dict(study_name=name, storage=storage, direction="maximize",
                  sampler=optuna.samplers.TPESampler(seed=cfg.seed),
                  pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0))
    study = optuna.create_study(load_if_exists=True, **kwargs)
    if study.trials and study.user_attrs.get("fingerprint") != fingerprint:
        if cfg.storage is not None:
            raise LesionLabError(
                f"study {name!r} in {cfg.storage} was made for other features or settings; "
                f"use another --study-name")
        log.warning("study in %s was made for other features or settings; starting afresh",
                    folder)
        optuna.delete_study(study_name=name, storage=storage)
        study = optuna.create_study(**kwargs)
    study.set_user_attr("fingerprint", fingerprint)
    if cfg.storage is None:
        fail_running(study, "by a stopped process")
    return study


def finished_trials(study: optuna.Study) -> int:
    """Trials that count towards the budget: completed or pruned (failed ones do not)."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def tune(study: optuna.Study, x: np.ndarray, y: np.ndarray, groups: np.ndarray,
         cfg: HeadConfig, classes: tuple[str, ...] = CLASSES) -> float:
    """Run trials until the study holds ``cfg.trials`` finished ones; returns the seconds spent.

    The budget is counted in the study, so several workers on one storage share it (one that
    is mid-trial when the count is reached still finishes that trial).

    Args:
        study: the Optuna study.
        x: (n_train, n_features) training rows of the design matrix.
        y: (n_train,) class indices.
        groups: (n_train,) lesion ids (the CV is lesion-grouped).
        cfg: the head config (trials, folds, timeout).
        classes: the class set's names.

    Raises:
        LesionLabError: a class has too few lesions for ``cfg.folds`` grouped folds
            (:func:`lesionlab.splits.grouped_folds`).
    """
    study.enqueue_trial(heads.default_params(cfg.head, x.shape[1]), skip_if_exists=True)
    remaining = max(0, cfg.trials - finished_trials(study))
    if not remaining:
        return 0.0
    folds = grouped_folds(y, groups, cfg.folds, cfg.seed, "head tuning CV",
                          keep_singletons=True, classes=classes)
    t0 = time.perf_counter()
    study.optimize(heads.cv_objective(x, y, folds, cfg.head, cfg.imbalance, cfg.seed, groups,
                                      len(classes)),
                   n_trials=remaining, timeout=cfg.tune_timeout, show_progress_bar=True,
                   callbacks=[optuna.study.MaxTrialsCallback(cfg.trials, states=FINISHED)])
    return time.perf_counter() - t0


def fit_final(study: optuna.Study, x_tr: np.ndarray, y_tr: np.ndarray, cfg: HeadConfig,
              classes: tuple[str, ...] = CLASSES) -> tuple[heads.HeadModel, dict, float]:
    """Refit the best trial on all of train; val and test are the finishing step's
    (:func:`test_and_save`).

    Args:
        study: the tuned study.
        x_tr: (n_train, n_features) training rows.
        y_tr: (n_train,) their class indices.
        cfg: the head config.
        classes: the class set's names.

    Returns:
        (the fitted head, its tuning record, refit seconds).
    """
    best = study.best_trial
    t0 = time.perf_counter()
    model = heads.HeadModel(cfg.head, cfg.imbalance, dict(best.params), cfg.seed,
                            best.user_attrs.get("best_iteration", heads.MAX_TREES),
                            tuple(classes))
    model.fit(x_tr, y_tr)
    fit_s = time.perf_counter() - t0
    details = {"best_params": dict(best.params),
               "n_estimators": model.n_estimators if cfg.head == "lightgbm" else None,
               "cv_balanced_accuracy": float(best.value),
               "cv_fold_scores": best.user_attrs.get("fold_scores"),
               "n_trials": finished_trials(study)}
    return model, details, fit_s


@release_claims
def train_head(dataset: Dataset, workdir: Path | str, cfg: HeadConfig,
               stage: str | None = None) -> ModelCard | None:
    """Tune, refit, calibrate on val, test once; save the model folder; return its card.

    ``stage``: ``all`` (the default without --storage), ``tune`` (a worker on a shared study,
    the default with --storage: returns None) or ``refit`` (once, after the workers: refit the
    best trial and write the model folder).

    Raises:
        LesionLabError: bad options, an unknown ``stage``, a shared study made for other inputs,
            or a fine-tuned embedding network that trained on the rows scored or on all of train.
    """
    cfg.validate()
    stage = stage or ("tune" if cfg.storage else "all")
    if stage not in STAGES:
        raise LesionLabError(f"unknown stage {stage!r}; expected one of {STAGES}")
    t_start = time.perf_counter()
    split = load_or_make_split(dataset, workdir, cfg.data_seed)
    design = load_design(workdir, dataset, cfg.features, cfg.metadata)
    tr, va, te = split_indices(dataset, split, cfg.train_fraction, cfg.data_seed)
    tr = unseen_train_rows(design, dataset, tr, (va, te))
    x, y = design.x, dataset.labels
    groups = dataset.frame["lesion_id"].astype(str).to_numpy()
    # tune workers share a --storage study and write nothing into the folder: no lock
    folder = claim_folder(model_path(workdir, cfg.model_name()), "head",
                          exclusive=stage != "tune")
    study = open_study(folder, cfg, study_fingerprint(design, cfg, len(tr)))
    tune_s = (tune(study, x[tr], y[tr], groups[tr], cfg, dataset.classes)
              if stage != "refit" else 0.0)
    if stage == "tune":
        return None
    fail_running(study, "by a worker that stopped")  # no worker is left at refit time
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise LesionLabError(f"study {study.study_name!r} has no completed trial to refit")
    model, details, fit_s = fit_final(study, x[tr], y[tr], cfg, dataset.classes)
    card = test_and_save(model, dataset, design, (tr, va, te), folder, cfg,
                         {**details, "n_features": int(x.shape[1])})
    card.tune_time_s = round(tune_s, 1)
    card.fit_time_s = round(fit_s, 2)
    card.total_time_s = round(time.perf_counter() - t_start, 1)
    copy_members(workdir, cfg.features, folder)
    save_train_digests(folder, dataset, card.train_image_ids)
    save_card(folder, card)
    return card


def unseen_train_rows(design: Design, dataset: Dataset, tr: np.ndarray,
                      scored: tuple[np.ndarray, ...]) -> np.ndarray:
    """The train rows no fine-tuned embedding network of ``design`` trained on.

    A network embeds its own training images far more separably than unseen ones, so a head
    fitted on those rows learns a separation it will not meet at test time. With a K-fold fold
    network (``models.kfold``) that leaves the fold it held out; a network trained on all of
    train leaves nothing, which is refused. Val and test rows must be unseen by it too.

    Args:
        design: the design matrix and its feature sets.
        dataset: the labelled images.
        tr: (n_train,) train row indices.
        scored: the val and test row indices, each (n_rows,).

    Returns:
        (n_kept,) the train rows no embedding network trained on.

    Raises:
        LesionLabError: a network trained on val or test rows, or on every train row.
    """
    ids = dataset.frame["image_id"].astype(str).to_numpy()
    for fs in design.feature_sets:
        card = finetuned_card(str(fs.manifest["settings"]["backbone"]))
        if card is None:
            continue
        seen = np.isin(ids, np.asarray(card.train_image_ids, dtype=str))
        if any(seen[rows].any() for rows in scored):
            raise LesionLabError(f"embedding network {fs.manifest['settings']['backbone']} "
                                 f"trained on val or test images of this split")
        tr = tr[~seen[tr]]
        if len(tr) == 0:
            raise LesionLabError(
                f"embedding network {fs.manifest['settings']['backbone']} was fine-tuned on "
                f"every training image, so a head on its embedding would learn from leaked "
                f"separability; embed with a fold network of `python -m models.kfold` (the "
                f"head then trains on the fold it held out)")
    return tr


def test_and_save(model: heads.HeadModel, dataset: Dataset, design: Design,
                  rows: tuple[np.ndarray, np.ndarray, np.ndarray], folder: Path,
                  cfg: HeadConfig, details: dict) -> ModelCard:
    """The finishing step (decision rule, temperature and melanoma threshold on val, the one
    look at test: ``models.finish``); writes the head and its val and test probabilities;
    returns the card.

    Args:
        model: the fitted head.
        dataset: the labelled images.
        design: (n_images, n_features) design matrix (``design.x``).
        rows: (train, val, test) row indices, each (n_rows,).
        folder: the model folder.
        cfg: the head config.
        details: its tuning record from :func:`fit_final`.
    """
    tr, va, te = rows
    x, y = design.x, dataset.labels
    groups = dataset.frame["lesion_id"].astype(str).to_numpy()
    done = finish(FinishInput(tuple(dataset.classes), y[va], y[te], groups[te],
                              model.raw_proba(x[va]), model.raw_proba(x[te]), model.prior_,
                              cfg.n_boot, cfg.seed))
    model.decision_rule_, model.temperature_ = done.decision_rule, done.temperature
    model.mel_threshold_ = done.mel_threshold
    details = {**details, "val_balanced_accuracy_argmax": done.rule_scores["argmax"],
               "val_balanced_accuracy_prior": done.rule_scores["prior_corrected"]}
    save_head(folder, model)
    save_npy(folder / "test_proba.npy", done.test_proba)
    save_npy(folder / "val_proba.npy", done.val_proba)  # what ensembles choose their weights on
    ids = dataset.frame["image_id"].to_numpy()
    return ModelCard(
        kind="head", name=folder.name, config=HeadSettings(**asdict(cfg)),
        classes=list(dataset.classes),
        val=done.val, test=done.test, temperature=done.temperature,
        decision_rule=done.decision_rule, train_image_ids=ids[tr].tolist(),
        test_image_ids=ids[te].tolist(), n_train=len(tr), n_val=len(va), n_test=len(te),
        tune_time_s=0.0, fit_time_s=0.0, total_time_s=0.0,
        data_fingerprint=dataset.fingerprint(), versions=library_versions(),
        details=HeadRecord(features=design.describe(), **details),
        mel_threshold=done.mel_threshold)


@dataclass
class HeadRunOptions:
    """The flags of ``python -m models.train_head`` beyond :class:`HeadConfig` and the data."""

    refit_only: bool = option(False, "after the workers of a shared --storage study: refit its "
                                     "best trial, calibrate, test and write the model folder",
                              switch=True)


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments, from ``HeadConfig`` and ``HeadRunOptions``."""
    p = config_parser("python -m models.train_head", __doc__, HeadConfig)
    add_config_args(p, HeadRunOptions)
    add_config_args(p, TrackingOptions)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, train one head, and write its resolved config.yaml in its folder."""
    from models.tracking import track_model  # imports the model-folder kinds
    args = build_parser().parse_args(argv)
    cfg = config_from_args(HeadConfig, args)
    dataset = ensure_data(resolve_data(args), **label_options(args))
    card = train_head(dataset, args.workdir, cfg, "refit" if args.refit_only else None)
    if card is None:
        print(f"tuning worker done: study {cfg.study_name or cfg.model_name()!r} in "
              f"{cfg.storage}; when every worker has stopped, run the same command with "
              f"--refit-only to write the model folder")
        return 0
    save_config(model_path(args.workdir, card.name), args, "python -m models.train_head")
    track_model(args, args.workdir, card, model_path(args.workdir, card.name),
                "python -m models.train_head")
    print(summary_line(card))
    return 0


if __name__ == "__main__":
    run_main(main)
