"""Design matrices for the heads: cached feature sets (+ optional metadata), aligned to images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from featurize.extract import FeaturizeConfig, FeatureSet, load_feature_set, resolve_key
from lesionlab.data import Dataset
from lesionlab.errors import LesionLabError
from models.bundle import ModelCard

SEXES = ("male", "female")
LOCALIZATIONS = ("abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand",
                 "lower extremity", "neck", "scalp", "trunk", "upper extremity")


def metadata_matrix(frame: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """age (NaN kept for imputation), sex and localization one-hot; unknown -> all zeros."""
    age = pd.to_numeric(frame.get("age"), errors="coerce").to_numpy(dtype=float)
    cols = [age[:, None]]
    names = ["age"]
    sex = frame.get("sex", pd.Series(index=frame.index, dtype=object)).astype(str).str.lower()
    loc = frame.get("localization", pd.Series(index=frame.index, dtype=object)).astype(
        str).str.lower()
    for value in SEXES:
        cols.append((sex == value).to_numpy(dtype=float)[:, None])
        names.append(f"sex={value}")
    for value in LOCALIZATIONS:
        cols.append((loc == value).to_numpy(dtype=float)[:, None])
        names.append(f"loc={value}")
    return np.hstack(cols), names


def split_keys(spec: str) -> list[str]:
    """'a+b' -> ['a', 'b']."""
    keys = [k.strip() for k in spec.split("+") if k.strip()]
    if not keys:
        raise LesionLabError(f"empty --features {spec!r}")
    return keys


@dataclass
class Design:
    """Features of every image in ``dataset`` order, with their provenance."""

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
    # feature sets cached before colour constancy existed were made without it
    return FeaturizeConfig(backbone=block["backbone"], image_size=tuple(block["image_size"]),
                           tta=block["tta"], pool=block["pool"], weights=block["weights"],
                           color_constancy=block.get("color_constancy", "none"), **runtime)


def align(fs: FeatureSet, image_ids: pd.Series) -> np.ndarray:
    """Rows of ``fs`` in the order of ``image_ids``; every id must be present."""
    pos = pd.Series(np.arange(len(fs.image_ids)), index=fs.image_ids)
    missing = image_ids[~image_ids.isin(pos.index)]
    if len(missing):
        raise LesionLabError(
            f"feature set {fs.key} lacks {len(missing)} image(s), e.g. {list(missing[:3])}")
    return fs.features[pos[image_ids].to_numpy()]


def build_design(blocks: list[np.ndarray], frame: pd.DataFrame, metadata: bool) -> np.ndarray:
    """The head's input matrix: feature blocks side by side, then metadata if the model uses it.

    The one builder used by training, prediction and external evaluation.
    """
    parts = list(blocks)
    if metadata:
        parts.append(metadata_matrix(frame.reset_index(drop=True))[0])
    return np.hstack(parts).astype(np.float64)


def load_design(workdir: Path | str, dataset: Dataset, features: str,
                metadata: bool = False) -> Design:
    """Concatenate the named cached feature sets (and metadata) for every image of ``dataset``."""
    data_fp = dataset.fingerprint()
    sets = [load_feature_set(resolve_key(workdir, key, data_fp)) for key in split_keys(features)]
    blocks = [align(fs, dataset.frame["image_id"]) for fs in sets]
    return Design(x=build_design(blocks, dataset.frame, metadata), feature_sets=sets,
                  metadata=metadata)


def _check_weights(block: dict, sha256: str) -> None:
    if sha256 != block["weights_sha256"]:
        raise LesionLabError(
            f"backbone {block['backbone']} weights here ({sha256[:12]}) differ from the ones "
            f"the model was trained on ({block['weights_sha256'][:12]})")


def card_extractors(card: ModelCard, device: str = "auto") -> list:
    """One loaded ``Extractor`` per feature block of a head's card (weights checked)."""
    from featurize.extract import Extractor

    extractors = []
    try:
        for block in card.features:
            ext = Extractor(block_config(block, device=device, num_workers=0))
            extractors.append(ext)
            _check_weights(block, ext.spec.weights_sha256)
    except BaseException:
        for ext in extractors:
            ext.close()
        raise
    return extractors


def card_design(card: ModelCard, dataset: Dataset, workdir: Path | str | None = None,
                device: str = "auto", extractors: list | None = None) -> np.ndarray:
    """A head model's input for the images of ``dataset``, made as its training features were.

    With ``workdir`` the features are cached there (external test sets); without, they are
    computed in memory by ``extractors`` (loaded here and closed after, when not given).
    """
    from featurize.extract import featurize

    if workdir is not None:
        blocks = []
        for block in card.features:
            fs = featurize(dataset, workdir, block_config(block, device=device))
            _check_weights(block, fs.manifest["weights_sha256"])
            blocks.append(align(fs, dataset.frame["image_id"]))
        return build_design(blocks, dataset.frame, card.metadata)
    owned = extractors is None
    extractors = card_extractors(card, device) if owned else extractors
    try:
        paths = dataset.frame["path"].tolist()
        blocks = [ext.embed_paths(paths) for ext in extractors]
    finally:
        if owned:
            for ext in extractors:
                ext.close()
    return build_design(blocks, dataset.frame, card.metadata)
