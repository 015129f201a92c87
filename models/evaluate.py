"""``python -m models.evaluate --model DIR --data LABELLED_DIR [--by COLUMN] [--out FILE]``.

Scores any model folder on any labelled folder, as timm's ``validate.py`` does for ImageNet:
labels in HAM10000 format (image_id, dx; lesion_id and metadata optional, extra columns such
as ``dataset`` kept) or ISIC 2018 Task 3 format (image + one-hot columns). Prints balanced
accuracy with its lesion-level bootstrap CI, macro F1 and AUC, melanoma sensitivity and
per-class recall, overall and, with ``--by``, per value of a column (e.g. image source). A
labelled folder used here is a test set: score each final model once; never tune on it.

Images the model was trained on inflate its scores: those found in the card's
``train_image_ids`` or, by identical bytes, in the folder's ``train_sha256.txt`` (written with
it) are left out, and one line says how many (``--keep-train-overlap`` keeps them). All JSON
written is strict: an undefined value (AUC of a one-class folder) is ``null``.

The data's classes map onto the model's by name (``models.classmap``): images of a class the
model lacks are counted (``unmapped``), said in one line and left out; binary melanoma labels
(``dx`` = ``mel`` / ``not_mel``) are scored melanoma vs rest (AUC of P(mel), sensitivity and
specificity at the card's melanoma threshold).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lesionlab import metrics
from lesionlab.artifacts import write_json
from lesionlab.cli import (command_parser, config_from_args, data_folder, device_option,
                           label_map_option, label_options, labels_option, model_option,
                           option, run_main, save_config)
from lesionlab.provenance import provenance
from lesionlab.data import CLASSES, Dataset, load_external_labels
from lesionlab.errors import ImageError, LesionLabError, all_problems
from lesionlab.fingerprint import read_train_digests, train_overlap
from lesionlab.images import decode_error
from models import classmap
from models.bundle import ModelCard, load_card, score_text
from models.folder import load_model_folder
from models.shipped import default_model_folder

SCORE_KEYS = ("n", "balanced_accuracy", "balanced_accuracy_ci95", "macro_f1", "macro_auc",
              "mel_sensitivity", "ece", "per_class_recall", "mel_operating_point",
              "absent_classes", "unmapped")


def model_proba(model_dir: Path | str, dataset: Dataset, workdir: Path | str | None = None,
                device: str = "auto", card: ModelCard | None = None,
                tta: str | None = None) -> np.ndarray:
    """Calibrated probabilities, (n images, n classes), of a model folder for ``dataset``.

    With ``workdir`` a head's features are cached there (rerunning costs no extraction);
    ``card`` spares reading the folder's card again when the caller has it; ``tta``
    overrides the test-time views of every fine-tuned network in the folder (members too).

    Raises:
        LesionLabError: the folder (or a member) does not load (see ``models.folder``).
    """
    with load_model_folder(model_dir, device, workdir, tta, card) as model:
        return model.predict_proba(dataset)


def scores(y: np.ndarray, proba: np.ndarray, groups: np.ndarray, n_boot: int,
           seed: int, mel_threshold: float | None = None,
           classes: Sequence[str] = CLASSES, dx: np.ndarray | None = None) -> dict:
    """The headline numbers of one prediction set (keys: ``SCORE_KEYS``); the melanoma rule
    at the card's threshold when it has one.

    ``y`` (n,) indexes ``classes`` (the model's), :data:`models.classmap.UNMAPPED` marking
    an image whose class (``dx``, (n,) names) the model lacks: those are counted in
    ``unmapped`` and left out. ``absent_classes``: model classes without an image here
    (their recall is undefined: null), not in ``per_class_recall``.
    """
    keep = y != classmap.UNMAPPED
    unmapped = {} if dx is None else classmap.unmapped_counts(dx, y)
    y, proba, groups = y[keep], proba[keep], groups[keep]
    if not len(y):
        return {**dict.fromkeys(SCORE_KEYS), "n": 0, "per_class_recall": {},
                "absent_classes": list(classes), "unmapped": unmapped}
    res = metrics.evaluate(y, proba, groups, n_boot=n_boot, seed=seed, classes=classes)
    op, mel = None, metrics.mel_index(classes)
    if mel is not None and mel_threshold is not None and not np.isnan(mel_threshold):
        op = metrics.operating_point(y, proba[:, mel], mel_threshold, groups, n_boot, seed,
                                     mel)
    return {"n": res["n"], "balanced_accuracy": res["balanced_accuracy"],
            "balanced_accuracy_ci95": res.get("ci95", {}).get("balanced_accuracy"),
            "macro_f1": res["macro_f1"], "macro_auc": res["macro_auc"],
            "mel_sensitivity": res["mel_sensitivity"], "ece": res["ece"],
            "per_class_recall": {c: v["recall"] for c, v in res["per_class"].items()
                                 if v["support"] > 0},
            "mel_operating_point": op,
            "absent_classes": [c for c, v in res["per_class"].items() if v["support"] == 0],
            "unmapped": unmapped}


def evaluate_model(model_dir: Path | str, dataset: Dataset, by: str | None = None,
                   workdir: Path | str | None = None, n_boot: int = 1000, seed: int = 0,
                   device: str = "auto", tta: str | None = None,
                   keep_proba: bool = False) -> dict:
    """Scores of a model folder on a labelled image set, overall and per value of ``by``.

    Multiclass labels give ``SCORE_KEYS`` blocks over the images whose class the model has;
    binary melanoma labels give ``mode: melanoma_vs_rest`` and
    :func:`lesionlab.metrics.melanoma_vs_rest` blocks. With ``keep_proba`` the result also
    holds the probabilities, (n_images, n_classes), as ``proba``.

    Raises:
        LesionLabError: ``by`` is not a column; no image has a class of the model; binary
            labels for a model without a ``mel`` class; the folder does not load.
    """
    if by is not None and by not in dataset.frame.columns:
        raise LesionLabError(f"--by {by!r} is not a column of the labels; columns: "
                             f"{sorted(dataset.frame.columns)}")
    card = load_card(model_dir)
    binary = classmap.is_binary(dataset)
    y = dataset.labels if binary else classmap.map_labels(dataset, card.classes)
    dx = dataset.frame["dx"].astype(str).to_numpy()
    if not binary:
        classmap.require_mappable(y, classmap.unmapped_counts(dx, y), card.classes)
    proba = model_proba(model_dir, dataset, workdir, device, card, tta)
    groups = dataset.frame["lesion_id"].astype(str).to_numpy()

    def score(rows: np.ndarray) -> dict:
        if binary:
            return classmap.melanoma_scores(y[rows], proba[rows], groups[rows], card.classes,
                                            card.mel_threshold, n_boot, seed)
        return scores(y[rows], proba[rows], groups[rows], n_boot, seed, card.mel_threshold,
                      card.classes, dx[rows])

    out = {"model": card.name, "data": str(dataset.root), "tta": tta,
           "overall": score(np.ones(len(y), bool)), "by": None}
    if binary:
        out["mode"] = "melanoma_vs_rest"
    else:
        classmap.say_unmapped(out["overall"]["unmapped"], card.name, card.classes)
    if by is not None:
        values = dataset.frame[by].astype(str).to_numpy()
        out["by"] = {"column": by,
                     "groups": {v: score(values == v) for v in sorted(set(values))}}
    if keep_proba:
        out["proba"] = proba
    return out


def leave_out_training_images(model_dir: Path | str, dataset: Dataset,
                              keep: bool = False) -> tuple[Dataset, dict]:
    """``dataset`` without the images the model was trained on, and what was found.

    An image counts as a training image when its id is in the card's ``train_image_ids`` or
    its bytes are those of a training image (``train_sha256.txt`` of the folder, written with
    it; a folder without one is checked by id only, and the returned ``content_checked``
    says so). Scores on training images are inflated, so they are left out unless ``keep``.

    Returns:
        ``(dataset to score, {"n_labelled", "in_training", "by_id", "by_content_only",
        "content_checked", "kept"})``.

    Raises:
        LesionLabError: every image is a training image (and ``keep`` is False).
    """
    card = load_card(model_dir)
    frame = dataset.frame
    by_id, by_content = train_overlap(model_dir, card.train_image_ids,
                                      frame["image_id"].tolist(), frame["path"].tolist())
    seen = by_id | by_content
    info = {"n_labelled": len(frame), "in_training": int(seen.sum()),
            "by_id": int(by_id.sum()), "by_content_only": int((by_content & ~by_id).sum()),
            "content_checked": read_train_digests(model_dir) is not None, "kept": keep}
    if keep or not seen.any():
        return dataset, info
    if seen.all():
        raise LesionLabError(
            f"all {len(frame)} images of {dataset.root} are in the training set of "
            f"{model_dir}; nothing is left to score (--keep-train-overlap scores them anyway)")
    return Dataset(root=dataset.root, frame=frame[~seen].reset_index(drop=True),
                   classes=dataset.classes), info


def overlap_line(info: dict) -> str:
    """One line: how many evaluation images are training images, and what was done."""
    how = (f"{info['by_id']} by id, {info['by_content_only']} more by content"
           if info["content_checked"] else
           f"{info['by_id']} by id; this folder records no training digests, so copies "
           f"under other names were not checked")
    done = ("kept: the scores include them" if info["kept"] else
            f"left out: scoring {info['n_labelled'] - info['in_training']} "
            f"(--keep-train-overlap keeps them)") if info["in_training"] else "none to leave out"
    return (f"train overlap: {info['in_training']} of {info['n_labelled']} evaluation images "
            f"are in the model's training set ({how}); {done}")


_fmt = score_text  # 0.123, or n/a when undefined


def _score_rows(result: dict) -> list[tuple[str, dict]]:
    """(row name, score block): overall, then one per group of ``--by``."""
    rows = [("all", result["overall"])]
    if result["by"]:
        rows += [(f"{result['by']['column']}={k}", v) for k, v in result["by"]["groups"].items()]
    return rows


def print_melanoma_scores(result: dict) -> None:
    """Melanoma-vs-rest table of binary labels: overall, then one row per group."""
    rows = _score_rows(result)
    print(f"{result['model']} on {result['data']} (melanoma vs rest)")
    print(f"{'':28s} {'n':>5s} {'mel':>5s}  {'AUC [95% CI]':24s} {'sens':>6s} {'spec':>6s}")
    for name, s in rows:
        ci = s["auc_ci95"] or [None, None]
        op = s["operating_point"] or {}
        print(f"{name[:28]:28s} {s['n']:5d} {s['n_mel']:5d}  {_fmt(s['auc'])} "
              f"[{_fmt(ci[0])}, {_fmt(ci[1])}]   {_fmt(op.get('sensitivity')):>6s} "
              f"{_fmt(op.get('specificity')):>6s}")


def print_scores(result: dict) -> None:
    """A table: overall, then one row per group."""
    if result.get("mode") == "melanoma_vs_rest":
        print_melanoma_scores(result)
        return
    rows = _score_rows(result)
    print(f"{result['model']} on {result['data']}")
    print(f"{'':28s} {'n':>5s}  {'bal.acc [95% CI]':24s} {'F1':>6s} {'AUC':>6s} {'mel sens':>8s}")
    for name, s in rows:
        ci = s["balanced_accuracy_ci95"] or [None, None]
        print(f"{name[:28]:28s} {s['n']:5d}  {_fmt(s['balanced_accuracy'])} "
              f"[{_fmt(ci[0])}, {_fmt(ci[1])}]   {_fmt(s['macro_f1']):>6s} "
              f"{_fmt(s['macro_auc']):>6s} {_fmt(s['mel_sensitivity']):>8s}")
    recall = result["overall"]["per_class_recall"]
    print("recall: " + "  ".join(f"{c} {_fmt(v)}" for c, v in recall.items()))


@dataclass
class EvaluateConfig:
    """What ``python -m models.evaluate`` scores and how; its flags come from these fields."""

    data: Path = option(help="images + one label CSV (or one folder per class)",
                        parse=data_folder)
    model: Path | None = model_option(shipped=True)
    labels: str = labels_option()
    label_map: Path | None = label_map_option()
    by: str | None = option(None, "column to score per value, e.g. dataset")
    out: Path | None = option(None, "write the scores as JSON here (and the resolved config "
                                    "beside it, as <out>.config.yaml)")
    workdir: Path | None = option(None, "cache a head's features here; None: compute them in "
                                        "memory")
    n_boot: int = option(1000, "bootstrap resamples for CIs", ge=0)
    seed: int = option(0, "bootstrap seed", ge=0, le=2**32 - 1)
    device: str = device_option()
    tta: str | None = option(None, "test-time views of the fine-tuned networks (d4: 8 dihedral "
                                   "views); None: what each card says. The temperature stays "
                                   "the card's", choices=("none", "flip", "d4"))
    keep_train_overlap: bool = option(False, "also score images the model was trained on (by "
                                             "id or identical bytes); default: leave them "
                                             "out and say how many")


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments, from ``EvaluateConfig``."""
    return command_parser("python -m models.evaluate", __doc__, EvaluateConfig)


def _every_bad_image(exc: LesionLabError, dataset: Dataset) -> LesionLabError:
    """``exc`` itself, or, where it is an :class:`~lesionlab.errors.ImageError` (one image
    that cannot be used, raised here or in a DataLoader worker), one error naming all of the
    dataset's unusable images (each decoded once more: only on this failure path)."""
    if not isinstance(exc, ImageError):
        return exc
    paths = dataset.frame["path"].tolist()
    errors = [e for e in map(decode_error, paths) if e]
    return all_problems(errors, len(paths)) if errors else exc


def main(argv: Sequence[str] | None = None) -> int:
    """Score the model and print (and optionally save) the table.

    Raises:
        LesionLabError: bad labels, model or option; unreadable images (all of them named
            in one line, see :func:`_every_bad_image`).
    """
    args = config_from_args(EvaluateConfig, build_parser().parse_args(argv))
    args.model = default_model_folder(args.model)
    dataset, overlap = leave_out_training_images(
        args.model, load_external_labels(args.data, **label_options(args)),
        args.keep_train_overlap)
    print(overlap_line(overlap))
    try:
        result = evaluate_model(args.model, dataset, args.by, args.workdir, args.n_boot,
                                args.seed, args.device, args.tta)
    except LesionLabError as exc:  # a bad image: name every bad one, not only the first
        raise _every_bad_image(exc, dataset) from None
    result["train_overlap"] = overlap
    print_scores(result)
    if args.out is not None:  # what scored it, and what made the model
        write_json(args.out, {**result, "provenance": provenance(),
                              "model_provenance": load_card(args.model).provenance})
        save_config(args.out, args, "python -m models.evaluate")
    return 0


if __name__ == "__main__":
    run_main(main)
