"""The model card: ``card.json`` of every model folder, its schema, validation and migration.

It lives in the core so that every stage reads a card the same way: ``featurize`` reads a
fine-tuned folder's card (to embed with its network) and ``models`` every folder's. What a
folder of each kind *does* (predict, explain, its table labels) is ``models.folder``'s.

Schema versions: a card records the ``schema_version`` it was written with. A card without
one is version 1 (written before versions were recorded); version 2 held ``config`` and
``details`` as free-form objects; version 3 holds them as the typed blocks of its kind
(``lesionlab.card_blocks``). Older cards load through :func:`migrate`; a card newer than
:data:`SCHEMA_VERSION` is refused with one line naming its version.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from lesionlab.artifacts import read_json, sha256_file, write_json
from lesionlab.card_blocks import BLOCKS, EnsembleSettings
from lesionlab.data import KNOWN_CLASSES
from lesionlab.errors import LesionLabError
from lesionlab.provenance import provenance

CARD = "card.json"
SCHEMA_VERSION = 3  # 1: no schema_version field; 2: schema_version recorded; 3: typed blocks
KINDS = tuple(BLOCKS)  # the ``kind`` a card may hold: head, finetune, ensemble
WEIGHT_FILES = ("model.pt", "head.skops", "model.onnx")  # their sha256 is recorded in the card
# temperature scaling is fitted inside these bounds (models.heads.fit_temperature); a card
# outside them was not written by lesionlab, and a tiny one overflows the softmax
TEMPERATURE_RANGE: tuple[float, float] = (0.05, 20.0)
# (features, head, imbalance) table labels of a card; set by models.folder (each kind's own)
_LABELER: list[Callable[["ModelCard"], tuple[str, str, str]]] = []


@dataclass
class ModelCard:
    """What a model is, how it was made and how it scored; ``card.json`` of every model folder.

    Times: ``tune_time_s`` is the hyper-parameter search (0 without one), ``fit_time_s`` the
    training of the final model, ``total_time_s`` the whole stage's wall time (data, tuning,
    training, calibration and evaluation).
    """

    kind: str  # head | finetune | ensemble
    name: str
    config: Any  # its kind's settings block (lesionlab.card_blocks: HeadSettings...)
    classes: list[str]
    val: dict
    test: dict
    temperature: float
    decision_rule: str  # argmax | prior_corrected | class_factors (ensembles)
    train_image_ids: list[str]
    test_image_ids: list[str]
    n_train: int
    n_val: int
    n_test: int
    tune_time_s: float
    fit_time_s: float
    total_time_s: float
    data_fingerprint: str
    versions: dict
    details: Any  # its kind's record block (lesionlab.card_blocks: HeadRecord...)
    mel_threshold: float | None = None  # melanoma rule: flag when calibrated P(mel) >= this
    # a second output per image (models.calibrate): probabilities calibrated to the training
    # data's class frequencies, beside the model's own, which every decision keeps using
    prevalence_map: dict | None = None
    external: dict | None = None  # its score on an external labelled set (benchmarks)
    # an exported network's (models.export): precision, its check on val, source, data,
    # licence, scores, the melanoma rule, intended use; None: not exported
    export: dict | None = None
    # commit, dirty, code and lock sha256, library versions (lesionlab.provenance); a card
    # written before this field existed loads with {} (unknown provenance, so stale)
    provenance: dict = field(default_factory=provenance)
    files: dict = field(default_factory=dict)  # sha256 of each weights file, set by save_card
    schema_version: int = SCHEMA_VERSION

    @property
    def metadata(self) -> bool:
        """Whether the model reads age, sex and site (its kind's blocks say)."""
        return self.details.uses_metadata(self.config)

    def _labels(self) -> tuple[str, str, str]:
        if not _LABELER:
            raise LesionLabError("table labels of a card come from its model-folder kind; "
                                 "import models.folder first")
        return _LABELER[0](self)

    @property
    def features_label(self) -> str:
        """What the model reads, for tables (its kind's, ``models.folder``)."""
        return self._labels()[0]

    @property
    def head_label(self) -> str:
        """The classifier, for tables (its kind's, ``models.folder``)."""
        return self._labels()[1]

    @property
    def imbalance_label(self) -> str:
        """How the class imbalance was handled, for tables (its kind's, ``models.folder``)."""
        return self._labels()[2]


def set_labeler(labeler: Callable[[ModelCard], tuple[str, str, str]]) -> None:
    """Install the function that gives a card's (features, head, imbalance) table labels."""
    _LABELER[:] = [labeler]


def save_card(folder: Path, card: ModelCard) -> None:
    """Write ``card.json`` (last, so a folder with a card is complete), recording the sha256
    of each weights file of the folder in ``card.files``."""
    card.files = {name: sha256_file(Path(folder) / name) for name in WEIGHT_FILES
                  if (Path(folder) / name).is_file()}
    write_json(folder / CARD, asdict(card))


def _from_v1(raw: dict) -> dict:
    """A version-1 card (no ``schema_version``) as version 2: the optional fields a v1 card
    may lack get the values its readers gave them (no provenance: unknown, so stale)."""
    filled = {"features": [], "metadata": False, "mel_threshold": None, "details": {},
              "provenance": {}, "files": {}}
    return {**filled, **raw, "schema_version": 2}


def _head_v3(config: dict, details: dict, top: dict) -> None:
    details["features"] = top.get("features", [])  # its feature blocks: the record's


def _finetune_v3(config: dict, details: dict, top: dict) -> None:
    for key in ("backbone", "image_size", "tta", "color_constancy"):  # settings, written twice
        details.pop(key, None)
    details["input_aspect"] = top.get("input_aspect")


def _ensemble_v3(config: dict, details: dict, top: dict) -> None:
    details["metadata"] = bool(top.get("metadata", False))
    details["members"] = [{k: v for k, v in m.items() if k not in ("name", "weight")}
                          for m in details.get("members", []) if isinstance(m, dict)]


_BLOCKS_V3: dict[str, Callable[[dict, dict, dict], None]] = {
    "head": _head_v3, "finetune": _finetune_v3, "ensemble": _ensemble_v3}


def _from_v2(raw: dict) -> dict:
    """A version-2 card as version 3: ``config`` and ``details`` become its kind's blocks.
    The top-level ``features`` (a head's), ``input_aspect`` (a network's) and ``metadata``
    move into the record (an ensemble's) or go (a head's is its settings'); fields written
    twice (a network's image size, colour constancy and test-time views; an ensemble's member
    names and weights) keep their settings' copy; ``details.external`` becomes ``external``."""
    top = {k: raw[k] for k in ("features", "input_aspect", "metadata") if k in raw}
    out = {k: v for k, v in raw.items() if k not in top}
    config = dict(raw["config"]) if isinstance(raw.get("config"), dict) else raw.get("config")
    details = dict(raw["details"]) if isinstance(raw.get("details"), dict) else {}
    external = details.pop("external", None)
    if isinstance(config, dict) and raw.get("kind") in _BLOCKS_V3:
        _BLOCKS_V3[raw["kind"]](config, details, top)
    return {**out, "config": config, "details": details, "external": external,
            "schema_version": 3}


MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _from_v1, 2: _from_v2}  # -> next version


def migrate(raw: dict, path: Path | str = CARD) -> dict:
    """A raw card of any version this code knows, brought to :data:`SCHEMA_VERSION`.

    Raises:
        LesionLabError: (one line naming ``path`` and the version) when ``schema_version`` is
            not a whole number >= 1, or is newer than this code reads.
    """
    version = raw.get("schema_version", 1)
    if not (isinstance(version, int) and not isinstance(version, bool) and version >= 1):
        raise LesionLabError(f"{path}: schema_version must be a whole number >= 1, got "
                             f"{version!r}")
    if version > SCHEMA_VERSION:
        raise LesionLabError(f"{path}: card schema_version {version} is newer than this "
                             f"lesionlab reads ({SCHEMA_VERSION}); update lesionlab")
    while version < SCHEMA_VERSION:
        raw = MIGRATIONS[version](raw)
        version = raw["schema_version"]
    return raw


def load_card(folder: Path | str) -> ModelCard:
    """Read, migrate and validate a model folder's card.

    Raises:
        LesionLabError: (one line naming the folder and the field) when the folder has no
            card, the card is newer than this version reads or lacks a required field, its
            ``config`` or ``details`` holds a key its kind's block does not have or lacks a
            required one (``lesionlab.card_blocks``), or a field holds a value no lesionlab
            run writes (see :func:`check_card`).
    """
    folder = Path(folder)
    if not (folder / CARD).exists():
        raise LesionLabError(f"{folder} is not a lesionlab model folder (no {CARD})")
    try:
        raw = read_json(folder / CARD)
    except (OSError, ValueError) as exc:
        raise LesionLabError(f"cannot read {folder / CARD}: {exc}") from None
    if isinstance(raw, dict):
        raw = migrate(raw, folder / CARD)
    names = {f.name for f in dataclasses.fields(ModelCard)}
    missing = {f.name for f in dataclasses.fields(ModelCard)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if not isinstance(raw, dict) or missing - set(raw) or raw.get("kind") not in KINDS:
        raise LesionLabError(
            f"{folder / CARD} is not a card this version reads (retrain the model); "
            f"missing: {sorted(missing - set(raw)) if isinstance(raw, dict) else 'all'}")
    blocks = BLOCKS[raw["kind"]]
    raw = {**raw, "config": blocks.settings.from_dict(raw["config"], f"{folder / CARD}: config"),
           "details": blocks.record.from_dict(raw["details"], f"{folder / CARD}: details")}
    card = ModelCard(**{"provenance": {}, **{k: v for k, v in raw.items() if k in names}})
    check_card(folder, card)
    return card


def load_card_cached(folder: Path | str) -> ModelCard:
    """:func:`load_card`, read once per modification of the card file (callers must not
    change the card they get: it is shared)."""
    path = Path(folder) / CARD
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return load_card(folder)  # says why: no card
    return _cached_card(str(folder), stamp)


@functools.lru_cache(maxsize=32)
def _cached_card(folder: str, stamp: int) -> ModelCard:
    return load_card(folder)


def require_kind(card: ModelCard, kind: str, error: str) -> None:
    """Refuse a card of another kind than ``kind``.

    Raises:
        LesionLabError: ``error``, its ``{have}`` replaced by the card's kind (quoted).
    """
    if card.kind != kind:
        raise LesionLabError(error.replace("{have}", repr(card.kind)))


def _card_error(folder: Path, what: str, expected: str, got: Any) -> LesionLabError:
    text = repr(got)
    return LesionLabError(f"{Path(folder) / CARD}: {what} must be {expected}, got "
                          f"{text if len(text) <= 80 else text[:77] + '...'}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_card(folder: Path, card: ModelCard) -> None:
    """Refuse card fields no lesionlab run writes (a damaged or edited card).

    Raises:
        LesionLabError: naming the field and what was expected, for: ``config`` or
            ``details`` that are not its kind's blocks; classes not >= 2 distinct
            ``KNOWN_CLASSES``; a temperature outside ``TEMPERATURE_RANGE``; a melanoma threshold
            outside [0, 1]; image ids that are not a list of strings; sha256 records that
            are not 64 hex digits; and, for an ensemble, members that are not distinct plain
            folder names or member weights that are not one finite number >= 0 per member
            with a sum > 0.
    """
    blocks = BLOCKS.get(card.kind)
    for name, block in (("config", blocks and blocks.settings), ("details",
                                                                 blocks and blocks.record)):
        if block is None or not isinstance(getattr(card, name), block):
            raise _card_error(folder, name, f"a {card.kind} card's "
                              f"{block.__name__ if block else 'block'}", getattr(card, name))
    for name in ("val", "test", "files"):
        if not isinstance(getattr(card, name), dict):
            raise _card_error(folder, name, "an object", getattr(card, name))
    classes = card.classes
    if not (isinstance(classes, list) and len(classes) >= 2 and len(set(classes)) == len(classes)
            and all(isinstance(c, str) and c in KNOWN_CLASSES for c in classes)):
        raise _card_error(folder, "classes", f">= 2 distinct names of {list(KNOWN_CLASSES)}",
                          classes)
    lo, hi = TEMPERATURE_RANGE
    if not (_is_number(card.temperature) and lo <= card.temperature <= hi):
        raise _card_error(folder, "temperature", f"a number in [{lo}, {hi}] (the range "
                          f"temperature scaling is fitted in)", card.temperature)
    t = card.mel_threshold
    if t is not None and not (_is_number(t) and (math.isnan(t) or 0 <= t <= 1)):
        raise _card_error(folder, "mel_threshold", "null or a number in [0, 1]", t)
    pm = card.prevalence_map
    if pm is not None and not (
            isinstance(pm, dict) and all(
                isinstance(pm.get(k), list) and len(pm[k]) == len(classes)
                and all(_is_number(v) and math.isfinite(v) for v in pm[k])
                for k in ("weight", "bias"))):
        raise _card_error(folder, "prevalence_map", f"null or {{weight, bias: {len(classes)} "
                          f"finite numbers each, ...}}", pm)
    for name in ("train_image_ids", "test_image_ids"):
        ids = getattr(card, name)
        if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise _card_error(folder, name, "a list of image ids", ids)
    for name, digest in card.files.items():
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise _card_error(folder, f"files[{name!r}]", "a sha256 (64 hex digits)", digest)
    check_config = CONFIG_CHECKS.get(card.kind)
    if check_config is not None:
        check_config(folder, card.config)


def _check_ensemble_config(folder: Path, config: EnsembleSettings) -> None:
    members, weights = config.members, config.member_weights
    if not (isinstance(members, list) and members and len(set(map(str, members))) == len(members)
            and all(isinstance(m, str) and m not in (".", "..") and "/" not in m
                    and "\\" not in m for m in members)):
        raise _card_error(folder, "config.members", "a list of distinct folder names", members)
    if not (isinstance(weights, list) and len(weights) == len(members)):
        raise _card_error(folder, "config.member_weights",
                          f"a list of {len(members)} weights (one per member)", weights)
    if not all(_is_number(w) and math.isfinite(w) and w >= 0 for w in weights) \
            or not 0 < sum(float(w) for w in weights) < math.inf:
        raise _card_error(folder, "config.member_weights",
                          "finite numbers >= 0 with a sum > 0", weights)


# kind -> the check of its ``config`` beyond the common fields
CONFIG_CHECKS: dict[str, Callable[[Path, Any], None]] = {"ensemble": _check_ensemble_config}
