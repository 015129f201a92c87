"""The design a head trains on: cached feature sets of the workdir (+ optional metadata),
aligned to a dataset's images, with ``oof:<K-fold ensemble>`` stacking blocks.

Above ``models.folder``: an out-of-fold block's rows outside the K-fold run's training images
are predicted by its ensemble folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from featurize.extract import FeatureSet, load_feature_set, resolve_key
from featurize.spec import parse_features
from lesionlab.data import Dataset
from lesionlab.errors import LesionLabError
from models.bundle import ModelCard, load_card, load_proba, model_path
from models.design import OOF_PREFIX, Design, align, build_design, log_proba
from models.folder import EnsembleFolder, folder_class, load_model_folder


def oof_feature_set(workdir: Path | str, dataset: Dataset, name: str) -> FeatureSet:
    """Stacking input from a K-fold ensemble (``models.kfold``): for its training images the
    out-of-fold probabilities (each from the fold model that never trained on the image), for
    every other image the ensemble's own probabilities. Never the in-fold ones: a network
    is far more confident on rows it trained on, and a head fitted on those learns that.

    Raises:
        LesionLabError: the folder is not a K-fold ensemble with out-of-fold probabilities, or
            its ``oof_proba.npy`` does not have (n_oof, n_classes) rows.
    """
    folder = model_path(workdir, name)
    card = load_card(folder)
    if not (issubclass(folder_class(card), EnsembleFolder) and card.details.out_of_fold_ids()):
        raise LesionLabError(f"--features {OOF_PREFIX}{name}: {folder} is not a K-fold ensemble "
                             f"with out-of-fold probabilities (make it with models.kfold)")
    ids = dataset.frame["image_id"].astype(str)
    held = card.details.out_of_fold_ids()
    oof = pd.DataFrame(load_proba(folder, "oof_proba.npy", len(held), len(card.classes)),
                       index=held)
    proba = np.zeros((len(ids), oof.shape[1]))
    in_oof = ids.isin(oof.index).to_numpy()
    proba[in_oof] = oof.loc[ids[in_oof]].to_numpy()
    if (~in_oof).any():
        rest = Dataset(root=dataset.root, frame=dataset.frame[~in_oof].reset_index(drop=True),
                       classes=dataset.classes)
        with load_model_folder(folder, workdir=workdir, card=card) as model:
            proba[~in_oof] = model.predict_proba(rest)
    return FeatureSet(key=f"{OOF_PREFIX}{name}", path=folder, features=log_proba(proba),
                      image_ids=ids.to_numpy(), manifest=oof_manifest(name, card, folder))


def oof_manifest(name: str, card: ModelCard, folder: Path) -> dict:
    """What the model card records about an out-of-fold block; its "weights" hash is that of
    the out-of-fold probabilities, so a retrained K-fold run starts a fresh head study."""
    digest = hashlib.sha256((folder / "oof_proba.npy").read_bytes()).hexdigest()
    return {"settings": {"backbone": f"{OOF_PREFIX}{name}", "image_size": [0, 0], "tta": "-",
                         "pool": "-", "weights": None, "color_constancy": "-"},
            "weights_sha256": digest, "data_fingerprint": card.data_fingerprint}


def load_design(workdir: Path | str, dataset: Dataset, features: str,
                metadata: bool = False) -> Design:
    """Concatenate the named cached feature sets (and metadata) for every image of ``dataset``;
    ``oof:<K-fold ensemble>`` blocks are out-of-fold probabilities (stacking).

    Returns:
        The :class:`models.design.Design`: ``x`` (n_images, n_features) float64 in ``dataset``
        order, its feature sets, whether metadata is appended.

    Raises:
        LesionLabError: a malformed ``features`` spec, a block with no cached feature set (or
            several matching it), a feature set lacking some of the images, or an ``oof:`` block
            that is not a K-fold ensemble.
    """
    data_fp = dataset.fingerprint()
    sets = [oof_feature_set(workdir, dataset, block.source) if block.kind == "oof" else
            load_feature_set(resolve_key(workdir, block.text(), data_fp))
            for block in parse_features(features)]
    blocks = [align(fs, dataset.frame["image_id"]) for fs in sets]
    return Design(x=build_design(blocks, dataset.frame, metadata), feature_sets=sets,
                  metadata=metadata)
