"""The model folder: fitted estimator + ``card.json``; shared by heads and fine-tuned models."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import joblib

from lesionlab.artifacts import atomic_path, models_dir, read_json, write_json
from lesionlab.errors import LesionLabError

CARD = "card.json"
PIPELINE = "pipeline.joblib"


def model_name(*parts: str) -> str:
    """A filesystem-safe model folder name from its defining parts."""
    return "__".join(re.sub(r"[^A-Za-z0-9_.+-]", "_", p) for p in parts if p)


def model_path(workdir: Path | str, name: str) -> Path:
    """``<workdir>/models/<name>``."""
    return models_dir(workdir) / name


def save_pipeline(folder: Path, pipeline: Any) -> None:
    """Pickle the fitted pipeline atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / PIPELINE) as tmp:
        joblib.dump(pipeline, tmp)


def save_card(folder: Path, card: dict) -> None:
    """Write ``card.json`` (last, so a folder with a card is complete)."""
    write_json(folder / CARD, card)


def load_card(folder: Path | str) -> dict:
    """Read a model folder's card, with a clear error when it is not a model folder."""
    folder = Path(folder)
    if not (folder / CARD).exists():
        raise LesionLabError(f"{folder} is not a lesionlab model folder (no {CARD})")
    return read_json(folder / CARD)


def load_pipeline(folder: Path | str) -> Any:
    """Load a head model's fitted pipeline."""
    path = Path(folder) / PIPELINE
    if not path.exists():
        raise LesionLabError(f"model folder {folder} has no {PIPELINE}")
    return joblib.load(path)
