"""``python -m models.distill --teacher FOLDER``: one network trained on a teacher's soft
targets beside the hard labels (knowledge distillation: Hinton, Vinyals and Dean 2015).

The soft targets are the teacher's probabilities for every training image of the student's
split: out of fold where the teacher's card has out-of-fold probabilities (a K-fold ensemble,
``models.kfold``: each image from the fold network that never trained on it), else the
teacher's calibrated predictions (in-sample for the images it trained on, as in Hinton et
al.). They are written once, atomically, to ``<workdir>/soft_targets/`` (named by the
teacher, a digest of its card and the student's split), then the student is
``models.finetune`` with ``--distill-targets`` that file and the same flags otherwise
(``--distill-temperature``, ``--distill-weight``). A teacher that trained on any of the
student's val or test images is refused: what it learnt there would reach the student.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from lesionlab.artifacts import atomic_path, sha256_file
from lesionlab.card import ModelCard
from lesionlab.cli import (TrackingOptions, add_config_args, config_from_args, config_parser,
                           label_options, option, resolve_data, run_main, save_config)
from lesionlab.data import Dataset
from lesionlab.download import ensure_data
from lesionlab.errors import LesionLabError
from models.bundle import CARD, load_card, load_proba, model_path, summary_line
from models.finetune import FinetuneConfig, FinetuneRunOptions, finetune, run_rows
from models.folder import load_model_folder

SOFT_TARGETS = "soft_targets"


def teacher_soft_targets(teacher: Path | str, dataset: Dataset, workdir: Path | str,
                         cfg: FinetuneConfig, card: ModelCard | None = None) -> pd.DataFrame:
    """The teacher's probabilities for the student's training images (``card``: the
    teacher's, when the caller has read it already).

    Returns:
        (n_train, n_classes) frame indexed by ``image_id``, one column per class, rows
        summing to 1.

    Raises:
        LesionLabError: the teacher has no valid card, other classes than the data, or
            trained on one of the student's val or test images; or its folder does not load.
    """
    teacher = Path(teacher)
    card = load_card(teacher) if card is None else card
    if list(card.classes) != list(dataset.classes):
        raise LesionLabError(f"--teacher {teacher}: its classes {card.classes} are not the "
                             f"data's {list(dataset.classes)}")
    tr, va, te, _ = run_rows(dataset, workdir, cfg)  # the student's, as finetune cuts them
    held_out = np.concatenate([va, te])
    ids = dataset.frame["image_id"].astype(str).to_numpy()
    leaked = set(card.train_image_ids) & set(ids[held_out])
    if leaked:
        raise LesionLabError(f"--teacher {teacher} trained on {len(leaked)} of the student's "
                             f"val/test images (split seed {cfg.data_seed}); distil from a "
                             f"teacher of the same split")
    proba = pd.DataFrame(np.nan, index=pd.Index(ids[tr], name="image_id"),
                         columns=list(card.classes))
    oof_ids = card.details.out_of_fold_ids() or []
    if oof_ids:
        oof = pd.DataFrame(load_proba(teacher, "oof_proba.npy", len(oof_ids), len(card.classes)),
                           index=oof_ids, columns=proba.columns)
        have = proba.index.isin(oof.index)
        proba.loc[have] = oof.loc[proba.index[have]].to_numpy()
    rest = proba.index[proba.isna().any(axis=1)]
    if len(rest):
        frame = dataset.frame[dataset.frame["image_id"].astype(str).isin(rest)]
        sub = Dataset(root=dataset.root, frame=frame.reset_index(drop=True),
                      classes=dataset.classes)
        with load_model_folder(teacher, device=cfg.device, workdir=workdir,
                               card=card) as model:
            proba.loc[frame["image_id"].astype(str).to_numpy()] = model.predict_proba(sub)
    return proba


def write_soft_targets(teacher: Path | str, dataset: Dataset, workdir: Path | str,
                       cfg: FinetuneConfig, card: ModelCard | None = None) -> Path:
    """:func:`teacher_soft_targets` as a CSV under ``<workdir>/soft_targets/``, written
    atomically; a file already made from the same teacher card for the same rows is reused
    (``card``: the teacher's, when the caller has read it already).

    Returns:
        The CSV's path (what ``--distill-targets`` takes).

    Raises:
        LesionLabError: ``teacher`` is not a model folder; see :func:`teacher_soft_targets`.
    """
    teacher = Path(teacher)
    card = load_card(teacher) if card is None else card  # one line for a non-model folder
    digest = sha256_file(teacher / CARD)[:12]
    rows = f"split{cfg.data_seed}-frac{cfg.train_fraction:g}"
    rows += f"-cv{cfg.cv_fold + 1}of{cfg.cv_folds}" if cfg.cv_folds else ""
    path = Path(workdir) / SOFT_TARGETS / f"{teacher.name}-{digest}-{rows}.csv"
    if not path.exists():
        frame = teacher_soft_targets(teacher, dataset, workdir, cfg, card)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, float_format="%.7g")
    return path


@dataclass
class DistillOptions:
    """The flag of ``python -m models.distill`` beyond ``models.finetune``'s."""

    teacher: str | None = option(None, "the teacher's model folder (any kind: a K-fold "
                                       "ensemble, a stacking head, an ensemble of them)")


def build_parser() -> argparse.ArgumentParser:
    """``models.finetune``'s flags plus ``--teacher``."""
    p = config_parser("python -m models.distill", __doc__, FinetuneConfig)
    add_config_args(p, FinetuneRunOptions)
    add_config_args(p, DistillOptions)
    add_config_args(p, TrackingOptions)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Write the teacher's soft targets, train the student on them, print its line.

    Raises:
        LesionLabError: no ``--teacher`` or not a model folder, or the errors of
            :func:`write_soft_targets` and ``models.finetune``.
    """
    from models.tracking import track_model  # imports the model-folder kinds
    args = build_parser().parse_args(argv)
    if not args.teacher:
        raise LesionLabError("python -m models.distill needs --teacher FOLDER")
    teacher = load_card(args.teacher)  # before the data: a wrong folder fails at once
    cfg = config_from_args(FinetuneConfig, args)
    replace(cfg, distill_targets=str(args.teacher)).validate()  # its loss, before the data
    dataset = ensure_data(resolve_data(args), **label_options(args))
    targets = write_soft_targets(args.teacher, dataset, args.workdir, cfg, teacher)
    card = finetune(dataset, args.workdir, replace(cfg, distill_targets=str(targets)),
                    resume=args.resume)
    if card is None:  # a torchrun worker other than the main one
        return 0
    folder = model_path(args.workdir, card.name)
    save_config(folder, args, "python -m models.distill")
    track_model(args, args.workdir, card, folder, "python -m models.distill")
    print(summary_line(card) + f"  distilled from {args.teacher} (soft targets {targets})")
    return 0


if __name__ == "__main__":
    run_main(main)
