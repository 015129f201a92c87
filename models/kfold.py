"""``python -m models.kfold --cv-folds K``: K-fold fine-tuning, out-of-fold predictions, and
the K fold networks as one ensemble folder.

Train is cut into K lesion-grouped, class-stratified folds; fold model k trains on the other
K-1 folds (its epoch, temperature and melanoma threshold chosen on the shared val split) and
predicts fold k, which it never saw. Joined, those out-of-fold probabilities cover every
training image without leakage: what a stacking head may be fitted on. The K networks
averaged are the CNN ensemble for val, test, external data and predict. Each fold is its own
model folder, so a killed run resumes fold by fold.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from lesionlab.cli import config_from_args, label_options, resolve_data, run_main, save_config
from lesionlab.data import Dataset
from lesionlab.download import ensure_data
from lesionlab.errors import LesionLabError
from models.bundle import CARD, ModelCard, model_name, model_path, summary_line
from models.ensemble import EnsembleConfig, build_ensemble, member_dirs
from models.finetune import FinetuneConfig, build_parser as finetune_parser, finetune

DEFAULT_FOLDS = 3


def fold_configs(cfg: FinetuneConfig) -> list[FinetuneConfig]:
    """One config per fold of ``cfg.cv_folds`` (default 3), each holding out its fold.

    Raises:
        LesionLabError: ``cfg.cv_folds`` is 1 (a K-fold run needs at least 2).
    """
    k = cfg.cv_folds or DEFAULT_FOLDS
    if k < 2:
        raise LesionLabError(f"--cv-folds must be at least 2 for a K-fold run, got {k}")
    return [replace(cfg, cv_folds=k, cv_fold=i, name=None) for i in range(k)]


def kfold_name(cfg: FinetuneConfig) -> str:
    """The ensemble folder's name: the fold models' name without the fold part."""
    k = cfg.cv_folds or DEFAULT_FOLDS
    return cfg.name or model_name("kfold", f"k{k}",
                                  replace(cfg, cv_folds=0, name=None).model_name())


def kfold_finetune(dataset: Dataset, workdir: Path | str, cfg: FinetuneConfig) -> ModelCard:
    """Train (or reuse) every fold model, then write and return the K-fold ensemble.

    Raises:
        LesionLabError: ``--cv-folds`` of 1, a class with fewer lesions than folds, or the
            errors of :func:`models.finetune.finetune` and :func:`models.ensemble.build_ensemble`.
    """
    members = []
    for fold_cfg in fold_configs(cfg):
        folder = model_path(workdir, fold_cfg.model_name())
        if not ((folder / CARD).exists() and (folder / "oof_proba.npy").exists()):
            finetune(dataset, workdir, fold_cfg, resume=True)
        members.append(folder)
    ens = EnsembleConfig(members=[str(m) for m in members], name=kfold_name(cfg),
                         weights="equal", n_boot=cfg.n_boot, seed=cfg.seed)
    return build_ensemble(members, dataset, workdir, ens)


def build_parser() -> argparse.ArgumentParser:
    """The fine-tuning CLI; ``--cv-folds`` sets K (default 3), ``--name`` the ensemble's."""
    p = finetune_parser()
    p.prog = "python -m models.kfold"
    p.description = __doc__
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the K folds, write the resolved config.yaml in the ensemble folder, print its line."""
    from models.tracking import track_model  # imports the model-folder kinds
    args = build_parser().parse_args(argv)
    cfg = config_from_args(FinetuneConfig, args)
    card = kfold_finetune(ensure_data(resolve_data(args), **label_options(args)), args.workdir, cfg)
    folder = model_path(args.workdir, card.name)
    save_config(folder, args, "python -m models.kfold")
    track_model(args, args.workdir, card, folder, "python -m models.kfold",
                members=member_dirs(folder, card))
    print(summary_line(card) + f"  ({len(card.config.members)} fold networks; out-of-fold "
                               f"probabilities for {len(card.details.oof_image_ids)} "
                               f"training images)")
    return 0


if __name__ == "__main__":
    run_main(main)
