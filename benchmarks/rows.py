"""What a study row says about its model: typed fields, and the display labels made from them.

A result row (``<workdir>/results/<cell>.json``, ``summary_<preset>.json``) carries:

- ``spec``: what the cell is, typed: ``inputs`` (the head's ``--features`` blocks, each
  ``{kind, source, options}`` from ``featurize.spec``; empty for other kinds), ``head``
  (``logreg`` | ``lightgbm``; None for a network or an ensemble), ``imbalance`` (the head's
  ``--imbalance``; None otherwise), ``network`` (a fine-tuned network's timm backbone; None
  otherwise) and ``members`` (an ensemble's member folders; empty otherwise);
- ``metadata``: whether age, sex and site are inputs;
- ``input``: a head's kind of input (``models.design.INPUTS``) from its blocks; None otherwise;
- ``features``, ``head``, ``imbalance``: the display labels (``models.folder.labels``).

Tables read the typed fields; nothing parses a display label, except :func:`legacy_spec`,
which derives the typed fields once for a row saved before rows carried them and whose
model card is not at hand.
"""

from __future__ import annotations

from featurize.spec import FeatureBlock, parse_features
from lesionlab.card import ModelCard
from models.design import INPUTS, input_kind
from models.folder import EnsembleFolder, HeadFolder, NetworkFolder, folder_class, labels

SPEC_KEYS = ("inputs", "head", "imbalance", "network", "members")
CARD_KEYS = ("spec", "input", "features", "head", "imbalance")  # what card_fields makes


def card_spec(card: ModelCard) -> dict:
    """The typed ``spec`` of a model card's row (see the module docstring)."""
    cls, c = folder_class(card), card.config
    head = issubclass(cls, HeadFolder)
    blocks = parse_features(c.features) if head else ()
    return {"inputs": [b.to_dict() for b in blocks],
            "head": c.head if head else None,
            "imbalance": c.imbalance if head else None,
            "network": c.backbone if issubclass(cls, NetworkFolder) else None,
            "members": list(c.members) if issubclass(cls, EnsembleFolder) else []}


def card_fields(card: ModelCard) -> dict:
    """A card's row fields: ``spec``, ``input`` and the display labels made from them."""
    spec, label = card_spec(card), labels(card)
    blocks = [FeatureBlock.from_dict(b) for b in spec["inputs"]]
    return {"spec": spec, "input": input_kind(blocks) if blocks else None,
            "features": label.features, "head": label.head, "imbalance": label.imbalance}


def legacy_input_kind(features: str) -> str:
    """The kind of input of a saved row without ``input``, from its ``features`` display label.

    The label is a spec with fine-tuned folders written ``ft:<backbone> fold k/K``; only
    :func:`legacy_spec` calls this.
    """
    parts = [p.strip() for p in features.split("+")]
    if any(p.startswith("oof:") for p in parts):
        return INPUTS[3]
    if any(p.startswith("ft:") for p in parts):
        return INPUTS[2]
    return input_kind(features)


def legacy_spec(row: dict) -> dict:
    """The typed fields of a row saved before rows carried ``spec``, from its labels: a head's
    classifier (``stack (<head>)`` -> ``<head>``), a network's backbone (the label's first
    word). ``inputs`` stays empty: a label does not state its blocks' options."""
    head = row.get("kind") == "head"
    classifier = row["head"].removeprefix("stack (").removesuffix(")") if head else None
    network = row["features"].split(" (")[0] if row.get("kind") == "finetune" else None
    return {"inputs": [], "head": classifier, "imbalance": row["imbalance"] if head else None,
            "network": network, "members": []}


def row_spec(row: dict) -> dict:
    """A row's typed ``spec`` (derived by :func:`legacy_spec` for a row saved without one)."""
    return row["spec"] if "spec" in row else legacy_spec(row)


def row_input(row: dict) -> str | None:
    """A head row's kind of input (``models.design.INPUTS``); None for other kinds."""
    if "input" in row:
        return row["input"]
    return legacy_input_kind(row["features"]) if row.get("kind") == "head" else None
