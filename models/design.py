"""Design matrices for the heads: feature blocks (+ optional metadata), aligned to images.

What a head's card reads and how its input is rebuilt for new images lives here; the
training design from the workdir's feature cache (with out-of-fold stacking blocks, whose
other rows are predicted by their ensemble) is ``models.train_design``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.preprocessing import OneHotEncoder

from featurize.extract import Extractor, FeaturizeConfig, FeatureSet, featurize
from featurize.spec import (OOF_PREFIX, FeatureBlock, as_blocks, parse_block, parse_features,
                            source_kind)
from lesionlab.data import Dataset
from lesionlab.errors import LesionLabError
from lesionlab.labels import SEXES, map_names
from lesionlab.labels import SITES as LOCALIZATIONS  # HAM10000's site names (one source)
from lesionlab.images import model_aspect
from models.bundle import ModelCard, model_path



@functools.cache
def metadata_encoder() -> OneHotEncoder:
    """sex and localization one-hot, columns in ``SEXES`` then ``LOCALIZATIONS`` order; a
    value outside them (missing, "unknown", a typo) encodes as all zeros."""
    encoder = OneHotEncoder(categories=[list(SEXES), list(LOCALIZATIONS)],
                            handle_unknown="ignore", sparse_output=False, dtype=np.float64,
                            feature_name_combiner=lambda column, value: f"{column}={value}")
    return encoder.fit(np.array([[SEXES[0], LOCALIZATIONS[0]]], dtype=object))


def metadata_matrix(frame: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """The metadata block of a head's input and its column names.

    Args:
        frame: one row per image; ``age`` (years), ``sex`` and ``localization`` columns, any
            of them may be missing (then NaN age, all-zero one-hots).

    Returns:
        (n, 17) float64: age (NaN kept for imputation), then sex (2) and localization (14)
        one-hot; names go through the vocabulary (``lesionlab/vocabulary.csv``: ``anterior
        torso`` is ``trunk``); missing or outside it (one counted warning) -> all zeros; and
        the 17 names (``age``, ``sex=male``, ..., ``loc=upper extremity``).
    """
    age = pd.to_numeric(frame.get("age", pd.Series(np.nan, index=frame.index)),
                        errors="coerce").to_numpy(dtype=float)
    sex, loc = _canonical(frame, "sex", "sex"), _canonical(frame, "localization", "site")
    encoder = metadata_encoder()
    names = ["age", *encoder.get_feature_names_out(["sex", "loc"])]
    values = np.column_stack([sex.to_numpy(object), loc.to_numpy(object)])
    onehot = encoder.transform(values) if len(values) else np.zeros((0, len(names) - 1))
    return np.hstack([age[:, None], onehot]), names


def _canonical(frame: pd.DataFrame, column: str, kind: str) -> pd.Series:
    """A metadata column in canonical names, lower case, missing as ``"nan"`` (no one-hot)."""
    values = frame.get(column, pd.Series(index=frame.index, dtype=object))
    return map_names(values, kind, strict=False, where="metadata", column=column).astype(
        str).str.lower()


@dataclass
class Design:
    """Features of every image in ``dataset`` order, with their provenance.

    Attributes:
        x: (n_images, n_features) float64 design matrix (:func:`build_design`).
        feature_sets: the cached feature sets its blocks come from.
        metadata: whether the last 17 columns are metadata (:func:`metadata_matrix`).
    """

    x: np.ndarray
    feature_sets: list[FeatureSet]
    metadata: bool

    def describe(self) -> list[dict]:
        """What each feature block is, for the model card (enough to recompute it)."""
        return [{"key": fs.key, **fs.manifest["settings"],
                 "weights_sha256": fs.manifest["weights_sha256"], "dim": int(fs.features.shape[1])}
                for fs in self.feature_sets]


def block_config(block: dict, **runtime) -> FeaturizeConfig:
    """The featurize settings that made one feature block of a model card (to recompute it)."""
    # feature sets cached before colour constancy (or input aspects) existed were made
    # without it (with HAM10000's 4:3)
    return FeaturizeConfig(backbone=block["backbone"], image_size=tuple(block["image_size"]),
                           tta=block["tta"], pool=block["pool"], weights=block["weights"],
                           color_constancy=block.get("color_constancy", "none"),
                           input_aspect=model_aspect(block.get("input_aspect"),
                                                     f"feature block {block['backbone']}"),
                           **runtime)


def align(fs: FeatureSet, image_ids: pd.Series) -> np.ndarray:
    """Rows of ``fs`` in the order of ``image_ids``; every id must be present.

    Args:
        fs: a cached feature set, (n_cached, dim) features.
        image_ids: (n_images,) the ids wanted, in order.

    Returns:
        (n_images, dim) float32 rows of ``fs.features``.

    Raises:
        LesionLabError: an id of ``image_ids`` is not in the feature set.
    """
    pos = pd.Series(np.arange(len(fs.image_ids)), index=fs.image_ids)
    missing = image_ids[~image_ids.isin(pos.index)]
    if len(missing):
        raise LesionLabError(
            f"feature set {fs.key} lacks {len(missing)} image(s), e.g. {list(missing[:3])}")
    return fs.features[pos[image_ids].to_numpy()]


def build_design(blocks: list[np.ndarray], frame: pd.DataFrame, metadata: bool) -> np.ndarray:
    """The head's input matrix: feature blocks side by side, then metadata if the model uses it.

    The one builder used by training, prediction and external evaluation.

    Args:
        blocks: feature blocks, each (n_images, dim_i), rows in ``frame`` order.
        frame: (n_images, n_columns) labels frame (``age``, ``sex``, ``localization``).
        metadata: append :func:`metadata_matrix`'s (n_images, 17) block.

    Returns:
        (n_images, sum(dim_i) [+ 17]) float64.
    """
    parts = list(blocks)
    if metadata:
        parts.append(metadata_matrix(frame.reset_index(drop=True))[0])
    return np.hstack(parts).astype(np.float64)


def stack_members(features: str | tuple[FeatureBlock, ...]) -> list[str]:
    """The K-fold ensemble folders named by ``oof:<name>`` blocks of a ``--features`` spec."""
    return [b.source for b in as_blocks(features) if b.kind == "oof"]


def is_stacked(block: dict) -> bool:
    """Whether a card's feature block is an ``oof:<name>`` block (out-of-fold probabilities)."""
    return block["backbone"].startswith(OOF_PREFIX)


def stacked_blocks(card: ModelCard) -> list[str]:
    """The ``oof:<name>`` blocks a head's card stacks on (empty for a plain head)."""
    return [b["backbone"] for b in card.details.features if is_stacked(b)]


def stack_member_dir(model_dir: Path | str, block: str) -> Path:
    """Where a stacking head keeps its copy of the K-fold ensemble behind ``oof:<name>``."""
    return Path(model_dir) / "members" / parse_block(block).source


def copy_members(workdir: Path | str, features: str, folder: Path) -> None:
    """Copy the K-fold ensembles a stacking head reads, and the fine-tuned networks it embeds
    with, into its folder (self-contained: it predicts after being moved)."""
    import shutil

    blocks = parse_features(features)
    sources = [model_path(workdir, name) for name in stack_members(blocks)]
    sources += [b.finetuned_folder for b in blocks if b.finetuned_folder is not None]
    for source in sources:
        dest = folder / "members" / source.name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(source, dest, ignore=shutil.ignore_patterns("checkpoint.pt"))


def localized(card: ModelCard, model_dir: Path | str) -> ModelCard:
    """``card`` with each fine-tuned embedding network read from the copy inside its folder
    (``members/<network>``) where there is one, so a moved head folder still predicts."""
    import dataclasses

    blocks = []
    for block in card.details.features:
        copy = Path(model_dir) / "members" / Path(block["backbone"]).name
        if is_finetuned_key(block["backbone"]) and (copy / "card.json").exists():
            block = {**block, "backbone": str(copy)}
        blocks.append(block)
    return dataclasses.replace(card, details=dataclasses.replace(card.details, features=blocks))


INPUTS = ("ImageNet embedding", "hand-made features", "fine-tuned embedding",
          "OOF probabilities")
FROZEN_INPUTS = INPUTS[:2]


def is_finetuned_key(backbone: str) -> bool:
    """Whether a card block's backbone is a fine-tuned network folder (or its cache key)."""
    return not backbone.startswith(OOF_PREFIX) and source_kind(backbone) == "finetuned"


def input_kind(features: str | tuple[FeatureBlock, ...]) -> str:
    """Which kind of input (``INPUTS``) a head's ``--features`` reads: its richest block
    decides (out-of-fold probabilities, then a fine-tuned embedding, then ImageNet).

    Raises:
        LesionLabError: a malformed spec.
    """
    kinds = {b.kind for b in as_blocks(features)}
    if "oof" in kinds:
        return INPUTS[3]
    if "finetuned" in kinds:
        return INPUTS[2]
    return INPUTS[1] if kinds == {"classical"} else INPUTS[0]


def log_proba(proba: np.ndarray) -> np.ndarray:
    """Probabilities as a head's input: logs, so a linear head can weigh evidence.

    Args:
        proba: (n_images, n_classes) probabilities.

    Returns:
        (n_images, n_classes) natural logs, probabilities clipped to [1e-6, 1] first.
    """
    return np.log(np.clip(proba, 1e-6, 1.0))


def _check_weights(block: dict, sha256: str) -> None:
    if sha256 != block["weights_sha256"]:
        raise LesionLabError(
            f"backbone {block['backbone']} weights here ({sha256[:12]}) differ from the ones "
            f"the model was trained on ({block['weights_sha256'][:12]})")


def card_extractors(card: ModelCard, device: str = "auto") -> list:
    """One loaded ``Extractor`` per feature block of a head's card (weights checked).

    Raises:
        LesionLabError: a backbone's weights here differ from those the card records (sha256), or
            its weights cannot be loaded; the extractors loaded so far are closed first.
    """
    extractors = []
    try:
        for block in card.details.features:
            if is_stacked(block):
                continue  # a stack's CNN input comes from its ensemble member, not an extractor
            ext = Extractor(block_config(block, device=device, num_workers=0))
            extractors.append(ext)
            _check_weights(block, ext.spec.weights_sha256)
    except BaseException:
        for ext in extractors:
            ext.close()
        raise
    return extractors


def card_design(card: ModelCard, dataset: Dataset, workdir: Path | str | None = None,
                device: str = "auto", extractors: list | None = None,
                stacked: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """A head model's input for the images of ``dataset``, made as its training features were.

    With ``workdir`` the features are cached there (external test sets); without, they are
    computed in memory by ``extractors`` (loaded here and closed after, when not given).
    ``stacked`` holds, per ``oof:<name>`` block of a stacking head, its ensemble member's
    probabilities for these images (new images have no out-of-fold rows: the ensemble's own).

    Args:
        card: the head's model card.
        dataset: the labelled images (n_images rows).
        workdir: where features are cached; None: computed in memory.
        device: ``auto``, ``cpu`` or ``cuda``.
        extractors: loaded extractors (:func:`card_extractors`); None: loaded here.
        stacked: ``oof:<name>`` -> (n_images, n_classes) member probabilities.

    Returns:
        (n_images, n_features) float64 design matrix, columns as at training.

    Raises:
        LesionLabError: a stacked block's probabilities are missing, or a backbone's weights
            differ from the card's.
    """
    stacked = stacked or {}
    missing = [b["backbone"] for b in card.details.features
               if is_stacked(b) and b["backbone"] not in stacked]
    if missing:
        raise LesionLabError(f"model {card.name} stacks on {missing}; their probabilities "
                             f"were not given")
    cnn = [b for b in card.details.features if not is_stacked(b)]
    if workdir is not None:
        made = {}
        for block in cnn:
            fs = featurize(dataset, workdir, block_config(block, device=device))
            _check_weights(block, fs.manifest["weights_sha256"])
            made[id(block)] = align(fs, dataset.frame["image_id"])
    else:
        owned = extractors is None
        extractors = card_extractors(card, device) if owned else extractors
        try:
            paths = dataset.frame["path"].tolist()
            made = {id(b): ext.embed_paths(paths) for b, ext in zip(cnn, extractors)}
        finally:
            if owned:
                for ext in extractors:
                    ext.close()
    blocks = [log_proba(stacked[b["backbone"]]) if is_stacked(b) else made[id(b)]
              for b in card.details.features]
    return build_design(blocks, dataset.frame, card.metadata)
