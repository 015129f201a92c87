"""MLflow tracking of the standalone training commands (``lesionlab.tracking`` does the
logging; this adds the leaderboard's columns of a card)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from lesionlab.card_blocks import FinetuneSettings, HeadSettings
from lesionlab.errors import LesionLabError, warn_once
from lesionlab.tracking import TRACKING_WARNING, track_command
from models.bundle import ModelCard, load_card
from models.design import input_kind


def label_params(card: ModelCard) -> dict[str, Any]:
    """The leaderboard's columns of a card (features, head, imbalance, input, train
    fraction) as MLflow params. The table labels come from the model-folder kinds where
    ``models.folder`` is loaded (it registers them); otherwise from the card's settings."""
    cfg = card.config
    head = isinstance(cfg, HeadSettings)  # stacks and embedding heads too
    net = isinstance(cfg, FinetuneSettings)
    try:
        shown = {"features": card.features_label, "head": card.head_label,
                 "imbalance": card.imbalance_label}
    except LesionLabError:  # no labeler registered in this process
        shown = {"features": cfg.features if head else cfg.backbone if net else None,
                 "head": cfg.head if head else card.kind,
                 "imbalance": cfg.imbalance if head else None}
    return {**shown, "input": input_kind(cfg.features) if head else None,
            "train_fraction": cfg.train_fraction}


def track_model(opts: Any, workdir: Path | str, card: ModelCard, folder: Path | str,
                command: str, members: Iterable[Path | str] = ()) -> str | None:
    """Log a command's model folder (and its member folders, nested) to MLflow, as
    ``opts.tracking_uri`` / ``opts.no_tracking`` say (parsed ``TrackingOptions``); the
    default store is under ``workdir``. Never raises for tracking's sake.

    Returns the MLflow run id, or None when tracking is off or failed (warned once).
    """
    if getattr(opts, "no_tracking", False):
        return None
    try:
        loaded = [(load_card(m), Path(m)) for m in members]
    except LesionLabError as exc:  # the members go untracked, the command still succeeds
        warn_once(f"{TRACKING_WARNING}: member folders not logged ({exc})",
                  key=TRACKING_WARNING)
        loaded = []
    return track_command(opts, workdir, card, folder, command, extra=label_params,
                         members=loaded)
