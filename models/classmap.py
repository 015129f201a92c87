"""Scoring a model on data with another class set: map by class name, count what does not map.

A labelled folder's class set (``Dataset.classes``, from its rows) need not be the model's
(``card.classes``): ISIC 2019 data has ``scc``, which a HAM10000 model lacks; a PAD-UFES-20
model lacks ``df`` and ``vasc``. ``models.evaluate`` maps each image's class onto the
model's by its canonical name (:data:`lesionlab.data.KNOWN_CLASSES`; the label readers have
already mapped other spellings onto those). Images whose class the model does not have are
counted per class, said in one line, and left out of the multiclass metrics; model classes
without an image in the data have no recall. Binary melanoma labels
(:data:`lesionlab.data.BINARY_CLASSES`) are scored melanoma-vs-rest instead.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lesionlab import metrics
from lesionlab.data import BINARY_CLASSES, Dataset
from lesionlab.errors import LesionLabError, warn_once

UNMAPPED = -1  # the label of an image whose class is not among the model's
UNMAPPED_WARNING = "images of classes the model does not have are left out of the metrics"


def is_binary(dataset: Dataset) -> bool:
    """True for binary melanoma labels (class set ``BINARY_CLASSES``: 1 = melanoma)."""
    return tuple(dataset.classes) == BINARY_CLASSES


def map_labels(dataset: Dataset, model_classes: Sequence[str]) -> np.ndarray:
    """The dataset's labels as indices into ``model_classes``, matched by class name.

    Returns:
        (n_images,) int array; :data:`UNMAPPED` (-1) where the image's class is not one of
        ``model_classes``. For a dataset with the model's own class set this equals
        ``dataset.labels``.
    """
    index = {c: i for i, c in enumerate(model_classes)}
    lookup = np.array([index.get(c, UNMAPPED) for c in dataset.classes], dtype=int)
    return lookup[dataset.labels]


def unmapped_counts(dx: np.ndarray, y_model: np.ndarray) -> dict[str, int]:
    """Images per class name (``dx``, (n,)) whose ``y_model`` is :data:`UNMAPPED`, sorted by
    name; {} when every image maps."""
    names, counts = np.unique(np.asarray(dx, dtype=str)[np.asarray(y_model) == UNMAPPED],
                              return_counts=True)
    return {str(n): int(k) for n, k in zip(names, counts)}


def say_unmapped(counts: dict[str, int], model_name: str,
                 model_classes: Sequence[str]) -> None:
    """One counted warning line naming the unmapped classes and their image counts."""
    if counts:
        listed = ", ".join(f"{c} {n}" for c, n in counts.items())
        warn_once(f"{sum(counts.values())} image(s) of classes model {model_name} does not have "
                  f"({listed}) are left out of the multiclass metrics; its classes: "
                  f"{', '.join(model_classes)}", key=UNMAPPED_WARNING)


def require_mappable(y_model: np.ndarray, counts: dict[str, int],
                     model_classes: Sequence[str]) -> None:
    """Refuse data of which no image has one of the model's classes.

    Args:
        y_model: (n_images,) labels as model class indices, ``UNMAPPED`` where none fits.
        counts: the data's class name -> image count.
        model_classes: the model's class set.

    Raises:
        LesionLabError: naming the data's classes and the model's.
    """
    if len(y_model) and not (np.asarray(y_model) != UNMAPPED).any():
        raise LesionLabError(f"no image has a class of the model: the data's classes "
                             f"{sorted(counts)} vs the model's {list(model_classes)}")


def melanoma_scores(y_mel: np.ndarray, proba: np.ndarray, groups: np.ndarray,
                    model_classes: Sequence[str], mel_threshold: float | None,
                    n_boot: int, seed: int) -> dict:
    """Melanoma-vs-rest scores of binary labels: AUC of P(mel), sensitivity and specificity
    at the card's melanoma threshold, with lesion-level bootstrap CIs
    (:func:`lesionlab.metrics.melanoma_vs_rest`).

    Args:
        y_mel: (n,) 1 for melanoma, 0 for anything else.
        proba: (n, len(model_classes)) calibrated probabilities of the model.
        groups: (n,) lesion ids.
        model_classes: the card's classes (must hold ``mel``).
        mel_threshold: the card's melanoma threshold (None or NaN: no operating point).
        n_boot: bootstrap resamples.
        seed: bootstrap seed.

    Raises:
        LesionLabError: the model has no ``mel`` class.
    """
    mel = metrics.mel_index(model_classes)
    if mel is None:
        raise LesionLabError(f"binary melanoma labels need a model with a mel class; this "
                             f"one has {list(model_classes)}")
    return metrics.melanoma_vs_rest(y_mel, proba[:, mel], mel_threshold, groups, n_boot, seed)
