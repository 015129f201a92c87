"""``python -m models.predict --model DIR IMAGE...``: one JSON line per image.

Features are computed with the same code path and settings that made the model's training
features (any image size); an unreadable image gets an error line, the others are predicted.
Model folders hold trained models: load only folders you trust or made yourself.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from lesionlab.artifacts import json_text
from lesionlab.calibration import vector_scaling_from
from lesionlab.cli import (command_parser, config_from_args, device_option, model_option,
                           option, run_main)
from lesionlab.data import CLASS_NAMES, CLASSES, Dataset, load_rgb
from lesionlab.errors import LesionLabError
from lesionlab.labels import default_vocabulary, spelled
# images_dataset is re-exported (it lived here)
from models.folder import NetworkFolder, images_dataset, load_model_folder  # noqa: F401
from models.shipped import default_model_folder

RESULT_KEYS = ("path", "prediction", "name", "probabilities", "prevalence_probabilities",
               "decisions")
# what the melanoma rule says for a model without a melanoma class (no threshold to apply)
NO_MELANOMA_RULE = "none: the model has no mel class"


class Predictor:
    """A model folder loaded once, to predict many batches of images (predict, the server).

    ``folder`` is the loaded :class:`models.folder.ModelFolder`, ``card`` its card (a head's
    with its carried embedding networks' paths), ``cam`` the network Grad-CAM explains (a
    :class:`models.folder.NetworkFolder`, or None).

    Raises:
        LesionLabError: the folder (or a member) does not load (see ``models.folder``).
    """

    def __init__(self, model_dir: Path | str, device: str = "auto") -> None:
        self.model_dir = Path(model_dir)
        self.folder = load_model_folder(model_dir, device).load()
        self.card = self.folder.card
        self.cam: NetworkFolder | None = self.folder.gradcam_network()

    def predict_proba(self, paths: Sequence[str],
                      meta: pd.DataFrame | None = None) -> np.ndarray:
        """Calibrated class probabilities, (n_paths, n_classes) (columns: ``card.classes``),
        rows summing to 1, of readable images ``paths``.

        Args:
            paths: image files.
            meta: (n_paths, k) ``age`` (years), ``sex``, ``localization`` per path (any missing);
                None: no metadata.

        Raises:
            LesionLabError: an image cannot be read or is too large.
        """
        return self.folder.predict_proba(paths, meta)

    def predict_images(self, paths: Sequence[str],
                       meta: pd.DataFrame | None = None) -> list[dict]:
        """One result dict per path, in order; unreadable images get ``{"path", "error"}``.

        Args:
            paths: image files.
            meta: (n_paths, k) ``age`` (years), ``sex``, ``localization`` per path (any missing);
                None: no metadata.

        Returns:
            One dict per path: ``RESULT_KEYS`` (probabilities of each of the n_classes classes), or
            ``path`` and ``error``.
        """
        results: list[dict] = [{"path": str(p)} for p in paths]
        ok = []
        for i, p in enumerate(paths):
            try:
                load_rgb(p)
                ok.append(i)
            except LesionLabError as exc:
                results[i]["error"] = str(exc)
        if ok:
            sub_meta = meta.iloc[ok] if meta is not None else None
            proba = self.predict_proba([str(paths[i]) for i in ok], sub_meta)
            mapped = self.prevalence_proba(proba)
            for j, (i, row) in enumerate(zip(ok, proba)):
                results[i] = result_line(paths[i], row, self.card.mel_threshold,
                                         self.card.classes,
                                         None if mapped is None else mapped[j])
        return results

    def prevalence_proba(self, proba: np.ndarray) -> np.ndarray | None:
        """(n, n_classes) ``proba`` at the training data's class frequencies (the card's
        ``prevalence_map``: ``models.calibrate``), or None when the card has no map."""
        pm = self.card.prevalence_map
        return None if pm is None else vector_scaling_from(pm)(proba)

    def close(self) -> None:
        """Free the feature extractors' engines (members' too)."""
        self.folder.close()


def predict_proba(model_dir: Path | str, paths: Sequence[str],
                  meta: pd.DataFrame | None = None, device: str = "auto") -> np.ndarray:
    """Calibrated class probabilities, (n_paths, n_classes), rows summing to 1, of readable
    images ``paths`` (columns: the card's ``classes``).

    Args:
        model_dir: a model folder.
        paths: image files.
        meta: (n_paths, k) ``age`` (years), ``sex``, ``localization`` per path (any missing);
            None: no metadata.
        device: ``auto``, ``cpu`` or ``cuda``.

    Raises:
        LesionLabError: the folder is not a valid model folder, or an image cannot be read.
    """
    predictor = Predictor(model_dir, device)
    try:
        return predictor.predict_proba(paths, meta)
    finally:
        predictor.close()


def result_line(path: str, proba: np.ndarray, mel_threshold: float | None = None,
                classes: Sequence[str] = CLASSES,
                prevalence_proba: np.ndarray | None = None) -> dict:
    """The JSON record of one predicted image (keys: ``RESULT_KEYS``).

    ``proba`` is (n_classes,), ``classes`` the card's class set. ``decisions`` holds each
    rule the card has: the balanced-accuracy rule (the most likely class) and, when the card
    has one, the melanoma rule (flag when P(mel) >= its threshold); a class set without
    ``mel`` has none, and ``melanoma_rule`` says so. ``prevalence_proba`` (n_classes,): the
    same image's probabilities at the training data's class frequencies (the card's
    ``prevalence_map``, ``models.calibrate``), or None; no decision reads them.
    """
    code = classes[int(proba.argmax())]
    decisions = {"balanced_accuracy_rule": code}
    if "mel" not in classes:
        decisions["melanoma_rule"] = NO_MELANOMA_RULE
    elif mel_threshold is not None and not np.isnan(mel_threshold):
        flagged = bool(proba[list(classes).index("mel")] >= mel_threshold)
        decisions["melanoma_rule"] = "mel" if flagged else "not mel"
    return {"path": str(path), "prediction": code, "name": CLASS_NAMES[code],
            "probabilities": {c: round(float(v), 6) for c, v in zip(classes, proba)},
            "prevalence_probabilities": None if prevalence_proba is None else {
                c: round(float(v), 6) for c, v in zip(classes, prevalence_proba)},
            "decisions": decisions}


def predict_images(model_dir: Path | str, paths: Sequence[str],
                   meta: pd.DataFrame | None = None, device: str = "auto") -> list[dict]:
    """One result dict per path, in order; unreadable images get ``{"path", "error"}``.

    Args:
        model_dir: a model folder.
        paths: image files.
        meta: (n_paths, k) ``age`` (years), ``sex``, ``localization`` per path (any missing);
            None: no metadata.
        device: ``auto``, ``cpu`` or ``cuda``.

    Returns:
        One dict per path (see :meth:`Predictor.predict_images`), probabilities over the card's
        (n_classes,) class set.

    Raises:
        LesionLabError: the folder is not a valid model folder.
    """
    predictor = Predictor(model_dir, device)
    try:
        return predictor.predict_images(paths, meta)
    finally:
        predictor.close()


def _age(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 120:
        raise argparse.ArgumentTypeError(f"age must be between 0 and 120, got {text}")
    return value


@dataclass
class PredictConfig:
    """What ``python -m models.predict`` predicts and how; its flags come from these fields."""

    images: tuple[str, ...] = option(help="image files (any format Pillow reads, any size)",
                                     positional=True)
    model: Path | None = model_option(shipped=True)
    age: float | None = option(None, "for models trained with --metadata", parse=_age)
    sex: str | None = option(None, "for models trained with --metadata (any case)",
                             choices=default_vocabulary().names("sex"),
                             parse=functools.partial(spelled, "sex"))
    localization: str | None = option(
        None, "for models trained with --metadata: a HAM10000 site or another name of "
        "lesionlab/vocabulary.csv (any case)", choices=default_vocabulary().names("site"),
        parse=functools.partial(spelled, "site"))
    device: str = device_option()


def print_results(results: list[dict]) -> int:
    """One JSON line per image on stdout, errors also on stderr; 1 if any image failed."""
    for res in results:
        print(json_text(res, indent=None))
        if "error" in res:
            print(f"error: {res['error']}", file=sys.stderr)
    return 1 if any("error" in r for r in results) else 0


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments, from ``PredictConfig``."""
    return command_parser("python -m models.predict", __doc__, PredictConfig)


def main(argv: Sequence[str] | None = None) -> int:
    """Print one JSON line per image; exit 1 if any image could not be read."""
    args = config_from_args(PredictConfig, build_parser().parse_args(argv))
    n = len(args.images)
    meta = pd.DataFrame({"age": [args.age] * n, "sex": [args.sex] * n,
                         "localization": [args.localization] * n})
    return print_results(predict_images(default_model_folder(args.model), list(args.images),
                                        meta, args.device))


if __name__ == "__main__":
    run_main(main)
