"""``python -m models.ensemble --members DIR [DIR ...]``: average model folders into one.

An ensemble folder holds copies of its members (under ``members/``, so the folder is
self-contained for predict, evaluate, explain and the web page) and a card of kind
``ensemble``: the members' calibrated probabilities are averaged with weights chosen on val
(``--weights val``, a grid over the simplex) or equal, a temperature and the melanoma
threshold are fitted on val, and test is scored once. Members must come from the same data
and split (same fingerprint and test images). When the members are the K fold models of one
out-of-fold run (``models.kfold``), their out-of-fold probabilities are joined into
``oof_proba.npy``: every training image predicted by the one model that never trained on it.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from lesionlab import metrics
from lesionlab.artifacts import library_versions, save_npy
from lesionlab.card_blocks import EnsembleRecord, EnsembleSettings, MemberRecord
from lesionlab.cli import (command_parser, config_from_args, data_option, option,
                           resolve_data, run_main, safe_name, save_config, workdir_option)
from lesionlab.cli import TrackingOptions  # the MLflow flags
from lesionlab.data import Dataset, load_dataset
from lesionlab.errors import LesionLabError
from lesionlab.fingerprint import save_train_digests
from lesionlab.splits import load_or_make_split, split_indices
from models.bundle import (LOCK_FILE, ModelCard, claim_folder, clear_folder, load_card,
                           load_head, load_proba, model_path, release_claims, save_card,
                           summary_line)
# member_dirs and combine are re-exported (they lived here)
from models.folder import (MEMBERS, EnsembleFolder, HeadFolder, combine,  # noqa: F401
                           folder_class, labels, load_model_folder, member_dirs)
from models.finish import Finished, FinishInput, finish
from models.train_design import load_design

WEIGHT_MODES = ("val", "equal")
GRID_STEP = 0.1  # weight grid on the simplex for --weights val
# argmax of the average; val: argmax, the class-prior correction heads choose from, or
# per-class factors (per-class thresholds on the probability ratios) fitted on val, whichever
# val's balanced accuracy ranks first
DECISION_RULES = ("argmax", "val")
FACTOR_GRID = np.exp(np.linspace(-3.0, 3.0, 31))  # per-class factors tried, times the current


@dataclass
class EnsembleConfig:
    """What an ensemble averages and how its weights are chosen."""

    members: list[str]
    name: str
    weights: str = "val"  # val | equal
    n_boot: int = 1000
    seed: int = 0
    member_weights: list[float] = field(default_factory=list)  # filled when built
    decision_rule: str = "argmax"  # argmax | val (see DECISION_RULES)


def simplex_grid(n: int, step: float = GRID_STEP) -> list[tuple[float, ...]]:
    """Weight vectors on a grid of the simplex (each a multiple of ``step``, sum 1)."""
    k = round(1 / step)
    return [tuple(c / k for c in combo) for combo in itertools.product(range(k + 1), repeat=n)
            if sum(combo) == k]


def choose_weights(val_probas: Sequence[np.ndarray], y_va: np.ndarray,
                   mode: str = "val") -> list[float]:
    """Member weights: equal, or the grid point with the best val balanced accuracy (ties go
    to the lower val log-loss). Over 5 members the grid is too large: equal weights.

    Args:
        val_probas: per member, (n_val, n_classes) calibrated val probabilities.
        y_va: (n_val,) val class indices.
        mode: ``val`` (grid search) or ``equal``.

    Returns:
        One weight per member, in [0, 1], summing to 1.
    """
    n = len(val_probas)
    if mode == "equal" or n == 1 or n > 5:
        return [1.0 / n] * n
    best, best_key = None, None
    for w in simplex_grid(n):
        p = combine(val_probas, w)
        key = (metrics.balanced_accuracy(y_va, p.argmax(1)),
               -float(np.mean(-np.log(np.clip(p[np.arange(len(y_va)), y_va], 1e-12, 1)))))
        if best_key is None or key > best_key:
            best, best_key = list(w), key
    return best


def fit_class_factors(proba: np.ndarray, y: np.ndarray, start: np.ndarray,
                      passes: int = 3) -> np.ndarray:
    """Per-class factors maximising the balanced accuracy of ``argmax(proba * factors)`` on
    (proba, y), by coordinate ascent over :data:`FACTOR_GRID` from ``start``.

    Args:
        proba: (n_images, n_classes) probabilities.
        y: (n_images,) class labels.
        start: (n_classes,) factors to start from (ties keep the current factor).
        passes: sweeps over the classes.

    Returns:
        (n_classes,) positive factors, normalised to sum to n_classes.
    """
    factors = np.asarray(start, dtype=float).copy()
    best = metrics.balanced_accuracy(y, (proba * factors).argmax(1))
    for _ in range(passes):
        for c in range(proba.shape[1]):
            for f in factors[c] * FACTOR_GRID:
                trial = factors.copy()
                trial[c] = f
                score = metrics.balanced_accuracy(y, (proba * trial).argmax(1))
                if score > best:
                    best, factors = score, trial
    return factors * len(factors) / factors.sum()


def choose_decision_rule(proba_va: np.ndarray, y_va: np.ndarray, prior: np.ndarray,
                         mode: str = "argmax") -> tuple[str, list[float] | None, dict]:
    """The ensemble's decision rule, from val only.

    Args:
        proba_va: (n_val, n_classes) averaged member probabilities on val.
        y_va: (n_val,) val labels.
        prior: (n_classes,) class frequencies of the members' training images.
        mode: ``argmax`` (keep it), or ``val``: argmax, the class-prior correction
            (factors 1 / prior, as heads choose) or per-class factors fitted on val
            (:func:`fit_class_factors`), whichever scores the highest val balanced accuracy
            (a tie keeps the simpler rule).

    Returns:
        (rule name, (n_classes,) class factors or None for argmax, val balanced accuracy of
        each rule tried).

    Raises:
        LesionLabError: an unknown ``mode``.
    """
    if mode not in DECISION_RULES:
        raise LesionLabError(f"unknown decision rule {mode!r}; expected one of {DECISION_RULES}")
    ones = np.ones(proba_va.shape[1])
    candidates = {"argmax": ones}
    if mode == "val":
        inverse = 1.0 / np.clip(np.asarray(prior, dtype=float), 1e-12, None)
        candidates["prior_corrected"] = inverse * len(inverse) / inverse.sum()
        scores = {k: metrics.balanced_accuracy(y_va, (proba_va * f).argmax(1))
                  for k, f in candidates.items()}
        start = candidates[max(scores, key=scores.get)]
        candidates["class_factors"] = fit_class_factors(proba_va, y_va, start)
    scores = {k: metrics.balanced_accuracy(y_va, (proba_va * f).argmax(1))
              for k, f in candidates.items()}
    rule = max(scores, key=scores.get)  # the first of equal scores: the simpler rule
    return rule, None if rule == "argmax" else candidates[rule].tolist(), scores


def _check_members(cards: list[ModelCard], dirs: list[Path]) -> None:
    """Members must share data, split and test images; none may be an ensemble itself."""
    if not cards:
        raise LesionLabError("an ensemble needs at least one member")
    names = [c.name for c in cards]
    if len(set(names)) != len(names):
        raise LesionLabError(f"members must have distinct names: {names}")
    for card, folder in zip(cards, dirs):
        if issubclass(folder_class(card), EnsembleFolder):
            raise LesionLabError(f"member {folder} is an ensemble; list its members instead")
        if card.data_fingerprint != cards[0].data_fingerprint or \
                card.test_image_ids != cards[0].test_image_ids or \
                card.classes != cards[0].classes:
            raise LesionLabError(f"member {folder} was made on other data or another split "
                                 f"than {dirs[0]}; ensemble models of one split only")
        if not (folder / "test_proba.npy").exists():
            raise LesionLabError(f"member {folder} has no test_proba.npy; retrain it")


def member_val_proba(folder: Path, dataset: Dataset, va: np.ndarray,
                     workdir: Path | str) -> np.ndarray:
    """A member's calibrated val probabilities: saved with the model, or (folders made before
    models saved them) computed once from the model and saved beside it.

    Args:
        folder: the member's model folder.
        dataset: the labelled images.
        va: (n_val,) val row indices into ``dataset``.
        workdir: the workdir (feature cache).

    Returns:
        (n_val, n_classes) calibrated probabilities, rows summing to 1.

    Raises:
        LesionLabError: the saved ``val_proba.npy`` is not a valid (n_val, n_classes)
            probability array (:func:`models.bundle.load_proba`).
    """
    path = folder / "val_proba.npy"
    if not path.exists():
        card = load_card(folder)
        proba = None
        if issubclass(folder_class(card), HeadFolder):  # its training features are cached
            try:
                x = load_design(workdir, dataset, card.config.features, card.metadata).x
                proba = load_head(folder).predict_proba(x[va])
            except LesionLabError:
                proba = None
        if proba is None:
            val = Dataset(root=dataset.root,
                          frame=dataset.frame.iloc[va].reset_index(drop=True),
                          classes=dataset.classes)
            with load_model_folder(folder, workdir=workdir, card=card) as model:
                proba = model.predict_proba(val)
        save_npy(path, proba)
    return load_proba(folder, path.name, len(va), len(dataset.classes))


def oof_join(cards: list[ModelCard], dirs: list[Path]) -> tuple[list[str], np.ndarray] | None:
    """Out-of-fold probabilities of K fold models joined over train, or None when the members
    are not the folds of one run. Refuses a row predicted by a model that trained on it.

    Args:
        cards: the members' cards.
        dirs: their folders, in the same order.

    Returns:
        (image ids, (n_oof, n_classes) out-of-fold probabilities, a row per id), or None.

    Raises:
        LesionLabError: a member's held-out rows overlap its training rows, or two members'
            held-out rows overlap.
    """
    if not all(c.details.out_of_fold_ids() for c in cards):
        return None
    ids, probas = [], []
    for card, folder in zip(cards, dirs):
        held = card.details.out_of_fold_ids()
        if set(held) & set(card.train_image_ids):
            raise LesionLabError(f"{card.name}: out-of-fold rows overlap its training rows")
        ids += held
        probas.append(load_proba(folder, "oof_proba.npy", len(held), len(card.classes)))
    if len(set(ids)) != len(ids):
        raise LesionLabError("the fold models' held-out rows overlap; they are not one K-fold run")
    return ids, np.concatenate(probas)


def _ensemble_card(cards: list[ModelCard], weights: list[float], cfg: EnsembleConfig,
                   name: str, classes: tuple[str, ...], done: Finished, n_val: int,
                   n_test: int, own_time_s: float) -> ModelCard:
    """The ensemble's card; its members named by their folder names inside the ensemble
    folder. ``done``: the finishing step's choices and scores (``models.finish``)."""
    cfg = replace(cfg, members=[c.name for c in cards], member_weights=weights)
    train_ids = sorted({i for c in cards for i in c.train_image_ids})
    return ModelCard(
        kind="ensemble", name=name, config=EnsembleSettings(**asdict(cfg)),
        classes=list(classes),
        val=done.val, test=done.test, temperature=done.temperature, decision_rule="argmax",
        train_image_ids=train_ids, test_image_ids=cards[0].test_image_ids,
        n_train=len(train_ids), n_val=n_val, n_test=n_test, tune_time_s=0.0,
        fit_time_s=round(sum(c.fit_time_s for c in cards), 1),
        total_time_s=round(sum(c.total_time_s for c in cards) + own_time_s, 1),
        data_fingerprint=cards[0].data_fingerprint, versions=library_versions(),
        mel_threshold=done.mel_threshold,
        details=EnsembleRecord(
            members=[MemberRecord(kind=c.kind, features=labels(c).features,
                                  val_balanced_accuracy=c.val["balanced_accuracy"],
                                  test_balanced_accuracy=c.test["balanced_accuracy"])
                     for c in cards],
            split_seed=_split_seed(cards[0]), metadata=any(c.metadata for c in cards)))


@release_claims
def build_ensemble(dirs: Sequence[Path | str], dataset: Dataset, workdir: Path | str,
                   cfg: EnsembleConfig) -> ModelCard:
    """Choose weights and temperature on val, score test once, write the ensemble folder.

    Raises:
        LesionLabError: when the members do not fit together (:func:`_check_members`), one
            of their saved arrays is damaged, or the output folder is a member, holds a model
            of another kind or is being written by another run (``claim_folder``).
    """
    t0 = time.perf_counter()
    dirs = [Path(d) for d in dirs]
    cards = [load_card(d) for d in dirs]
    _check_members(cards, dirs)
    claim_folder(model_path(workdir, cfg.name), "ensemble", inputs=dirs)
    if dataset.fingerprint() != cards[0].data_fingerprint:
        raise LesionLabError(f"the data at {dataset.root} is not what the members were made on")
    split = load_or_make_split(dataset, workdir, _split_seed(cards[0]))
    _, va, te = split_indices(dataset, split)
    if dataset.frame["image_id"].to_numpy()[te].tolist() != cards[0].test_image_ids:
        raise LesionLabError(f"the split in {workdir} is not the one the members were tested "
                             f"on; use the members' workdir")
    y, groups = dataset.labels, dataset.frame["lesion_id"].astype(str).to_numpy()
    val_p = [member_val_proba(d, dataset, va, workdir) for d in dirs]
    test_p = [load_proba(d, "test_proba.npy", len(te), len(dataset.classes)) for d in dirs]
    weights = choose_weights(val_p, y[va], cfg.weights)
    rule, factors, rule_scores = choose_decision_rule(
        combine(val_p, weights), y[va], _train_prior(cards, dataset), cfg.decision_rule)
    done = finish(FinishInput(tuple(dataset.classes), y[va], y[te], groups[te],
                              combine(val_p, weights, class_weights=factors),
                              combine(test_p, weights, class_weights=factors),
                              n_boot=cfg.n_boot, seed=cfg.seed))
    folder = _write_folder(dirs, cards, workdir, cfg.name, done.test_proba, done.val_proba)
    card = _ensemble_card(cards, weights, cfg, folder.name, dataset.classes, done, len(va),
                          len(te), time.perf_counter() - t0)
    card.decision_rule = rule
    if cfg.decision_rule != "argmax":
        card.details.class_weights = factors
        card.details.val_balanced_accuracy_by_rule = rule_scores
    joined = oof_join(cards, dirs)
    if joined is not None:
        card.details.oof_image_ids = joined[0]
        save_npy(folder / "oof_proba.npy", joined[1])
    save_train_digests(folder, dataset, card.train_image_ids)
    save_card(folder, card)
    return card


def _train_prior(cards: list[ModelCard], dataset: Dataset) -> np.ndarray:
    """(n_classes,) class frequencies of the images any member trained on."""
    seen = set().union(*(c.train_image_ids for c in cards))
    y = dataset.labels[dataset.frame["image_id"].isin(seen).to_numpy()]
    return np.bincount(y, minlength=len(dataset.classes)) / max(len(y), 1)


def _split_seed(card: ModelCard) -> int:
    return card.config.data_seed  # a head's or network's (members are no ensembles)


def _write_folder(dirs: list[Path], cards: list[ModelCard], workdir: Path | str, name: str,
                  proba_te: np.ndarray, proba_va: np.ndarray) -> Path:
    """Copy the members (not their resume checkpoints) into the emptied ensemble folder
    (claimed by the caller)."""
    folder = model_path(workdir, name)
    clear_folder(folder)
    (folder / MEMBERS).mkdir(parents=True)
    for d, c in zip(dirs, cards):
        shutil.copytree(d, folder / MEMBERS / c.name, ignore=shutil.ignore_patterns(
            "checkpoint.pt", "study*", "*.db", LOCK_FILE))
    save_npy(folder / "test_proba.npy", proba_te)
    save_npy(folder / "val_proba.npy", proba_va)
    return folder


@dataclass
class EnsembleCommand:
    """The flags of ``python -m models.ensemble`` (:class:`EnsembleConfig` is what it builds)."""

    members: tuple[Path, ...] = option(help="model folders", parse=Path)
    name: str = option(help="ensemble folder name", parse=safe_name)
    weights: str = option("val", "val: best val balanced accuracy on a 0.1 grid; equal: plain "
                                 "mean", choices=WEIGHT_MODES)
    data: Path | None = data_option()
    workdir: Path = workdir_option()
    n_boot: int = option(1000, "bootstrap resamples for test CIs", ge=0)


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments, from ``EnsembleCommand``."""
    return command_parser("python -m models.ensemble", __doc__, EnsembleCommand,
                          TrackingOptions)


def main(argv: Sequence[str] | None = None) -> int:
    """Build an ensemble folder, write its resolved config.yaml and print its test line."""
    from models.tracking import track_model  # imports the model-folder kinds
    parsed = build_parser().parse_args(argv)
    args = config_from_args(EnsembleCommand, parsed)
    cfg = EnsembleConfig(members=[str(m) for m in args.members], name=args.name,
                         weights=args.weights, n_boot=args.n_boot)
    card = build_ensemble(list(args.members), load_dataset(resolve_data(args)), args.workdir,
                          cfg)
    save_config(model_path(args.workdir, card.name), args, "python -m models.ensemble")
    track_model(parsed, args.workdir, card, model_path(args.workdir, card.name),
                "python -m models.ensemble")
    print(summary_line(card) + "  weights " + ", ".join(f"{w:.2f}" for w in
                                                         card.config.member_weights))
    return 0


if __name__ == "__main__":
    run_main(main)
