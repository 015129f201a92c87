"""``python -m models.predict --model DIR IMAGE...``: one JSON line per image.

Features are computed with the same code path and settings that made the model's training
features (any image size); an unreadable image gets an error line, the others are predicted.
Model folders hold trained models: load only folders you trust or made yourself.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from lesionlab.cli import (command_parser, config_from_args, device_option, model_option,
                           option, run_main)
from lesionlab.data import CLASS_NAMES, CLASSES, Dataset, load_rgb
from lesionlab.errors import LesionLabError
from models.bundle import load_card, load_head
from models.design import (LOCALIZATIONS, SEXES, card_design, card_extractors, localized,
                           stack_member_dir, stacked_blocks)

RESULT_KEYS = ("path", "prediction", "name", "probabilities", "decisions")


def images_dataset(paths: Sequence[str], meta: pd.DataFrame | None = None) -> Dataset:
    """Unlabelled images (and optional age/sex/localization) in the shape the design expects."""
    frame = pd.DataFrame({"image_id": [Path(p).stem for p in paths],
                          "path": [str(p) for p in paths]})
    if meta is not None:
        cols = [c for c in ("age", "sex", "localization") if c in meta.columns]
        frame = pd.concat([frame, meta[cols].reset_index(drop=True)], axis=1)
    return Dataset(root=Path("."), frame=frame)


class Predictor:
    """A model folder loaded once, to predict many batches of images (predict, the server)."""

    def __init__(self, model_dir: Path | str, device: str = "auto") -> None:
        self.model_dir = Path(model_dir)
        self.card = load_card(model_dir)
        self.network = self.spec = self.head = None
        self.extractors: list = []
        self.members: list[Predictor] = []
        self.cam: Predictor | None = None  # whose network Grad-CAM explains
        self.stacked: dict[str, Predictor] = {}  # a stacking head's K-fold ensembles
        if self.card.kind == "ensemble":
            from models.ensemble import member_dirs

            self.members = [Predictor(m, device)
                            for m in member_dirs(model_dir, self.card)]
            nets = [(w, m) for w, m in zip(self.card.config["member_weights"], self.members)
                    if m.network is not None]
            self.cam = max(nets, key=lambda wm: wm[0])[1] if nets else None
        elif self.card.kind == "finetune":
            from models.finetune import load_finetuned

            self.network, _, self.spec = load_finetuned(model_dir, device)
            self.cam = self
        else:
            self.head = load_head(model_dir)
            self.card = localized(self.card, model_dir)  # embedding networks it carries
            self.extractors = card_extractors(self.card, device)
            self.stacked = {b: Predictor(stack_member_dir(model_dir, b), device)
                            for b in stacked_blocks(self.card)}
            nets = [m.cam for m in self.stacked.values() if m.cam is not None]
            self.cam = nets[0] if nets else None

    def predict_proba(self, paths: Sequence[str],
                      meta: pd.DataFrame | None = None) -> np.ndarray:
        """Calibrated class probabilities (N x 7) of readable images ``paths``."""
        if self.members:
            from models.ensemble import combine

            return combine([m.predict_proba(paths, meta) for m in self.members],
                           self.card.config["member_weights"], self.card.temperature)
        if self.network is not None:
            from models.finetune import network_proba

            return network_proba(self.network, self.card, self.spec, paths)
        stacked = {b: m.predict_proba(paths, meta) for b, m in self.stacked.items()}
        design = card_design(self.card, images_dataset(paths, meta),
                             extractors=self.extractors, stacked=stacked)
        return self.head.predict_proba(design)

    def predict_images(self, paths: Sequence[str],
                       meta: pd.DataFrame | None = None) -> list[dict]:
        """One result dict per path, in order; unreadable images get ``{"path", "error"}``."""
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
            for i, row in zip(ok, proba):
                results[i] = result_line(paths[i], row, self.card.mel_threshold)
        return results

    def close(self) -> None:
        """Free the feature extractors' engines (members' too)."""
        for ext in self.extractors:
            ext.close()
        for member in [*self.members, *self.stacked.values()]:
            member.close()


def predict_proba(model_dir: Path | str, paths: Sequence[str],
                  meta: pd.DataFrame | None = None, device: str = "auto") -> np.ndarray:
    """Calibrated class probabilities (N x 7) of readable images ``paths``."""
    predictor = Predictor(model_dir, device)
    try:
        return predictor.predict_proba(paths, meta)
    finally:
        predictor.close()


def result_line(path: str, proba: np.ndarray, mel_threshold: float | None = None) -> dict:
    """The JSON record of one predicted image (keys: ``RESULT_KEYS``).

    ``decisions`` holds each rule the card has: the balanced-accuracy rule (the most likely
    class) and, when the card has one, the melanoma rule (flag when P(mel) >= its threshold).
    """
    code = CLASSES[int(proba.argmax())]
    decisions = {"balanced_accuracy_rule": code}
    if mel_threshold is not None and not np.isnan(mel_threshold):
        flagged = bool(proba[CLASSES.index("mel")] >= mel_threshold)
        decisions["melanoma_rule"] = "mel" if flagged else "not mel"
    return {"path": str(path), "prediction": code, "name": CLASS_NAMES[code],
            "probabilities": {c: round(float(v), 6) for c, v in zip(CLASSES, proba)},
            "decisions": decisions}


def predict_images(model_dir: Path | str, paths: Sequence[str],
                   meta: pd.DataFrame | None = None, device: str = "auto") -> list[dict]:
    """One result dict per path, in order; unreadable images get ``{"path", "error"}``."""
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

    model: Path = model_option()
    images: tuple[str, ...] = option(help="image files (JPEG or PNG, any size)",
                                     positional=True)
    age: float | None = option(None, "for models trained with --metadata", parse=_age)
    sex: str | None = option(None, "for models trained with --metadata",
                             choices=(*SEXES, "unknown"))
    localization: str | None = option(None, "for models trained with --metadata",
                                      choices=(*LOCALIZATIONS, "unknown"))
    device: str = device_option()


def print_results(results: list[dict]) -> int:
    """One JSON line per image on stdout, errors also on stderr; 1 if any image failed."""
    for res in results:
        print(json.dumps(res))
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
    return print_results(predict_images(args.model, list(args.images), meta, args.device))


if __name__ == "__main__":
    run_main(main)
