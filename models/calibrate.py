"""``python -m models.calibrate --model FOLDER``: a second output per image, probabilities
calibrated to the training data's class frequencies, beside the model's own.

A network trained with the class-balanced sampler (the study's recipe) gives probabilities at
a uniform class prior: the right ones for the balanced-accuracy decision, but they overstate
a minority class where the data's prevalence is low (REPORT.md: the shipped model's P(mel)
of 0.45 is a melanoma about a quarter of the time on test). Vector scaling (Guo et al.,
ICML 2017: ``softmax(w * log p + b)``, one weight and bias per class), fitted by NLL on the
model's probabilities for the val split, maps them to val's class frequencies (HAM10000's,
for the default data). The map is written into the card (``prevalence_map``) with what it
does on test to P(mel)'s Brier score and ECE and to the top-label ECE, each measured once;
``models.predict``, ``python -m serve`` and its API then give ``prevalence_probabilities``
beside ``probabilities``. Every decision (the class, the melanoma rule) stays on the model's
own probabilities: the map changes what a probability reads as, never what is decided.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lesionlab.calibration import class_score_calibration, ece_with_ci, fit_vector_scaling
from lesionlab.card import ModelCard, load_card, save_card
from lesionlab.cli import (command_parser, config_from_args, data_option, device_option,
                           label_map_option, label_options, labels_option, model_option,
                           option, resolve_data, run_main, workdir_option)
from lesionlab.download import ensure_data
from models.export import card_test_rows, val_rows
from models.folder import load_model_folder

METHOD = "vector scaling (Guo et al. 2017) of the model's probabilities, fitted on val by NLL"


@dataclass
class CalibrateConfig:
    """The flags of ``python -m models.calibrate``."""

    model: Path = model_option("the model folder whose card gains the map")
    data: Path | None = data_option()
    labels: str = labels_option()
    label_map: Path | None = label_map_option()
    workdir: Path = workdir_option()
    n_boot: int = option(1000, "lesion bootstrap resamples for the test CIs", ge=0)
    seed: int = option(0, "bootstrap seed", ge=0, le=2**32 - 1)
    device: str = device_option()


def prevalence_map(card: ModelCard, val: tuple[np.ndarray, np.ndarray],
                   test: tuple[np.ndarray, np.ndarray, np.ndarray], n_boot: int = 1000,
                   seed: int = 0) -> dict:
    """Fit the map on val and measure it once on test.

    Args:
        card: the model's card (its classes).
        val: (n_val, n_classes) the model's probabilities and (n_val,) labels.
        test: (n_test, n_classes) probabilities, (n_test,) labels and (n_test,) lesion ids.
        n_boot: lesion bootstrap resamples of the test CIs.
        seed: the bootstrap's seed.

    Returns:
        The card's ``prevalence_map`` block: ``weight`` and ``bias`` (n_classes,), the
        method, val's size and class frequencies, and ``test``: top-label ECE and (with a
        ``mel`` class) P(mel)'s Brier score and ECE, of the model's and of the mapped
        probabilities, with lesion-level 95% CIs.
    """
    (p_val, y_val), (p_test, y_test, groups) = val, test
    vs = fit_vector_scaling(p_val, y_val)
    k = len(card.classes)
    scored = {"model": p_test, "calibrated": vs(p_test)}
    out = {name: {"ece": ece_with_ci(y_test, p, groups, n_boot=n_boot, seed=seed)}
           for name, p in scored.items()}
    if "mel" in card.classes:
        mel = list(card.classes).index("mel")
        for name, p in scored.items():
            res = class_score_calibration(y_test, p, mel, groups, n_boot=n_boot, seed=seed)
            out[name]["mel"] = {key: res[key] for key in ("brier", "ece", "ci95")}
    freq = np.bincount(y_val, minlength=k) / len(y_val)
    return {"method": METHOD, "weight": [float(w) for w in vs.weight],
            "bias": [float(b) for b in vs.bias], "n_val": int(len(y_val)),
            "val_class_frequencies": dict(zip(card.classes, map(float, freq))),
            "test": {"n": int(len(y_test)), "n_boot": n_boot, "bootstrap_seed": seed, **out}}


def calibrate(cfg: CalibrateConfig) -> ModelCard:
    """Score the model on its val and test split, fit and measure the map, write it into
    the card (atomically; weights untouched) and return the card.

    Raises:
        LesionLabError: the folder does not load, the data is not the model's
            (``models.export.val_rows``, ``card_test_rows``), or an image cannot be read.
    """
    card = load_card(cfg.model)
    dataset = ensure_data(resolve_data(cfg), **label_options(cfg))
    val = val_rows(card, dataset, cfg.workdir)  # refuses data the model was not trained on
    test = card_test_rows(card, dataset)
    with load_model_folder(cfg.model, cfg.device, cfg.workdir, card=card) as model:
        p_val, p_test = model.predict_proba(val), model.predict_proba(test)
    lesions = test.frame["lesion_id"].astype(str).to_numpy()
    card.prevalence_map = prevalence_map(card, (p_val, val.labels), (p_test, test.labels, lesions),
                                         cfg.n_boot, cfg.seed)
    save_card(Path(cfg.model), card)
    return card


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments, from ``CalibrateConfig``."""
    return command_parser("python -m models.calibrate", __doc__, CalibrateConfig)


def main(argv: Sequence[str] | None = None) -> int:
    """Calibrate the folder and print what the map did on test."""
    args = config_from_args(CalibrateConfig, build_parser().parse_args(argv))
    card = calibrate(args)
    t = card.prevalence_map["test"]
    line = f"{card.name}: test top-label ECE {t['model']['ece']['ece']:.3f} -> " \
           f"{t['calibrated']['ece']['ece']:.3f}"
    if "mel" in t["model"]:
        line += (f"; P(mel) Brier {t['model']['mel']['brier']:.3f} -> "
                 f"{t['calibrated']['mel']['brier']:.3f}, ECE {t['model']['mel']['ece']:.3f} "
                 f"-> {t['calibrated']['mel']['ece']:.3f}")
    print(line + f" (n = {t['n']}; decisions unchanged)")
    return 0


if __name__ == "__main__":
    run_main(main)
