"""MLflow tracking of the standalone training commands (``lesionlab.tracking`` does the
logging; this adds the table labels only the model-folder kinds know)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from lesionlab.tracking import track_command
from models.bundle import ModelCard, load_card
from models.design import input_kind
from models.folder import HeadFolder, folder_class, labels


def label_params(card: ModelCard) -> dict[str, Any]:
    """The leaderboard's columns of a card (features, head, imbalance, input) as params."""
    label = labels(card)
    head = issubclass(folder_class(card), HeadFolder)
    return {"features": label.features, "head": label.head, "imbalance": label.imbalance,
            "input": input_kind(card.config["features"]) if head else None,
            "train_fraction": card.config.get("train_fraction", 1.0)}


def track_model(opts: Any, workdir: Path | str, card: ModelCard, folder: Path | str,
                command: str, members: Iterable[Path | str] = ()) -> str | None:
    """Log a command's model folder (and its member folders, nested) to MLflow, as
    ``opts.tracking_uri`` / ``opts.no_tracking`` say (parsed ``TrackingOptions``); the
    default store is under ``workdir``. Never raises for tracking's sake.

    Returns the MLflow run id, or None when tracking is off or failed (warned once).
    """
    return track_command(opts, workdir, card, folder, command,
                         extra=label_params, members=[(load_card(m), Path(m))
                                                      for m in members])
