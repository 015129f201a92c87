"""What a model folder is, what kinds there are, and what one can do: the model-folder factory.

A model folder (``<workdir>/models/<name>``) holds a fitted model and its ``card.json``
(schema: ``lesionlab.card``). :func:`load_model_folder` reads the card and returns an object
of its kind, as timm's ``create_model`` does from its registry; every kind has the same small
interface:

- ``predict_proba(images, metadata) -> (n, n_classes)``: calibrated class probabilities;
- ``gradcam_network()``: the fine-tuned network Grad-CAM should explain, or None;
- ``labels(card)``: what it reads, its classifier and its imbalance handling, for tables.

Kinds (``kinds()``): ``head`` (a tuned head on frozen embeddings or hand-made features),
``embedding_head`` (a head on a fine-tuned network's embedding, carried in ``members/``),
``stack`` (a head on the out-of-fold probabilities of a K-fold ensemble, carried in
``members/``), ``finetune`` (a fine-tuned network) and ``ensemble`` (a weighted mean of
member folders under ``members/``). A new kind is one class registered with
``@register_kind("name")``; :func:`folder_class` picks, among the classes that read a card's
``kind`` and claim the card, the most specific one.

Loading is in two steps: building the object reads cards only (cheap: explain uses it to find
its network); ``load()`` (done by the first ``predict_proba``) loads weights, the head and the
feature extractors, checking every checksum. Nothing in a folder runs code when loaded.
"""

from __future__ import annotations

import re
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence, TypeVar

import numpy as np
import pandas as pd

from featurize.spec import FeatureBlock, parse_features
from lesionlab.card import ModelCard, load_card, require_kind, set_labeler
from lesionlab.data import Dataset
from lesionlab.errors import LesionLabError
from models.bundle import load_head
from models.design import (card_design, card_extractors, is_finetuned_key, localized,
                           stack_member_dir, stacked_blocks)
from models.finetune import load_finetuned, network_proba
from models.heads import apply_temperature
from models.shipped import TORCH_FILE, card_spec, is_exported, load_onnx_network

MEMBERS = "members"  # an ensemble's (and a stack's, an embedding head's) copied folders


@dataclass(frozen=True)
class Labels:
    """A model's table labels: what it reads, its classifier, its imbalance handling."""

    features: str
    head: str
    imbalance: str


class ModelFolder:
    """A model folder of one kind: its card, its children (members), how it predicts.

    Args:
        path: the folder.
        card: its card (read once by :func:`load_model_folder`).
        device: where networks and extractors run (``auto``, ``cpu``, ``cuda``).
        workdir: with a workdir, a head's features are computed through the feature cache
            there (rerunning costs no extraction); None: in memory.
        tta: overrides the test-time views of every fine-tuned network in the folder
            (members too); None: what each card says.
    """

    kind: ClassVar[str] = ""  # the registry name, set by register_kind
    card_kind: ClassVar[str] = ""  # the card ``kind`` this class reads
    description: ClassVar[str] = ""
    no_gradcam: ClassVar[str] = "a head on embeddings"  # why gradcam_network() is None

    def __init__(self, path: Path, card: ModelCard, device: str = "auto",
                 workdir: Path | str | None = None, tta: str | None = None) -> None:
        self.path, self.card, self.device = Path(path), card, device
        self.workdir, self.tta = workdir, tta
        self.loaded = False

    @classmethod
    def claims(cls, card: ModelCard) -> bool:
        """Whether this class is for ``card`` (among those reading its ``kind``)."""
        return True

    @classmethod
    def labels(cls, card: ModelCard) -> Labels:
        """The card's table labels.

        Raises:
            NotImplementedError: on the base class; every registered kind defines it.
        """
        raise NotImplementedError

    def children(self) -> list[ModelFolder]:
        """The member folders this one predicts with."""
        return []

    def load(self) -> ModelFolder:
        """Load weights, heads and extractors (members too), once; returns self.

        Raises:
            LesionLabError: a weights file is missing, damaged or not the one its card
                recorded, or an embedding backbone's weights differ from the training ones.
        """
        if not self.loaded:
            try:
                self._load()
                for child in self.children():
                    child.load()
            except BaseException:
                self.close()  # what did load is freed
                raise
            self.loaded = True
        return self

    def _load(self) -> None:
        """Load what this folder itself holds (not its members)."""

    def predict_proba(self, images: Sequence[str] | Dataset,
                      metadata: pd.DataFrame | None = None) -> np.ndarray:
        """Calibrated class probabilities, (n, n_classes) float, rows summing to 1.

        Args:
            images: n image paths (readable images), or a Dataset (its ``path`` column and
                metadata columns).
            metadata: with paths, n rows of ``age``, ``sex``, ``localization`` (any missing);
                ignored with a Dataset.

        Raises:
            NotImplementedError: on the base class; every registered kind defines it.
        """
        raise NotImplementedError

    def gradcam_network(self) -> NetworkFolder | None:
        """The fine-tuned network Grad-CAM explains for this model, or None."""
        return None

    def close(self) -> None:
        """Free the feature extractors' engines (members' too); a later predict loads again."""
        for child in self.children():
            child.close()
        self.loaded = False

    def __enter__(self) -> ModelFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_REGISTRY: dict[str, type[ModelFolder]] = {}
_M = TypeVar("_M", bound=type[ModelFolder])


def register_kind(name: str) -> Callable[[_M], _M]:
    """Class decorator: register a model-folder kind under ``name``."""
    def register(cls: _M) -> _M:
        if name in _REGISTRY:
            raise ValueError(f"model-folder kind {name!r} is registered twice")
        cls.kind = name
        _REGISTRY[name] = cls
        return cls
    return register


def kinds() -> list[str]:
    """The registered model-folder kinds."""
    return list(_REGISTRY)


def folder_class(card: ModelCard) -> type[ModelFolder]:
    """The most specific registered class that reads ``card`` (from the card alone).

    Raises:
        LesionLabError: no registered kind reads the card.
    """
    found = [c for c in _REGISTRY.values() if c.card_kind == card.kind and c.claims(card)]
    found = [c for c in found if not any(o is not c and issubclass(o, c) for o in found)]
    if len(found) != 1:
        raise LesionLabError(f"model {card.name}: no single model-folder kind reads a card of "
                             f"kind {card.kind!r} (registered: {kinds()})")
    return found[0]


def load_model_folder(path: Path | str, device: str = "auto",
                      workdir: Path | str | None = None, tta: str | None = None,
                      card: ModelCard | None = None) -> ModelFolder:
    """The model folder at ``path`` as an object of its kind (cards read, nothing loaded yet:
    see :meth:`ModelFolder.load`). ``card`` spares reading its card again.

    Raises:
        LesionLabError: the folder, or a member folder, has no valid card.
    """
    card = card or load_card(path)
    return folder_class(card)(Path(path), card, device, workdir, tta)


def labels(card: ModelCard) -> Labels:
    """A card's table labels, from its kind."""
    return folder_class(card).labels(card)


set_labeler(lambda card: astuple(labels(card)))  # ModelCard.features_label and the like


def images_dataset(paths: Sequence[str], meta: pd.DataFrame | None = None) -> Dataset:
    """Unlabelled images (and optional age/sex/localization) in the shape the design expects.

    Args:
        paths: image files; the image id is the file name without its extension.
        meta: (n_paths, k) ``age`` (years), ``sex``, ``localization`` per path (any missing);
            None: no metadata.

    Returns:
        A Dataset of (n_paths, 2 + k) rows: ``image_id``, ``path`` and the metadata columns.
    """
    frame = pd.DataFrame({"image_id": [Path(p).stem for p in paths],
                          "path": [str(p) for p in paths]})
    if meta is not None:
        cols = [c for c in ("age", "sex", "localization") if c in meta.columns]
        frame = pd.concat([frame, meta[cols].reset_index(drop=True)], axis=1)
    return Dataset(root=Path("."), frame=frame)


def _as_dataset(images: Sequence[str] | Dataset, metadata: pd.DataFrame | None) -> Dataset:
    return images if isinstance(images, Dataset) else images_dataset(images, metadata)


def _paths(images: Sequence[str] | Dataset) -> list:
    return images.frame["path"].tolist() if isinstance(images, Dataset) else list(images)


# -- labels shared by the kinds ----------------------------------------------------------


def members_label(labels: list[str]) -> str:
    """An ensemble's members for tables: fold networks once, common prefixes dropped."""
    unique = dict.fromkeys(re.sub(r", fold \d+/\d+\)", ")", label) for label in labels)
    text = " + ".join(unique).replace("tf_efficientnet_", "").replace(":multistage", "")
    return short_oof(text)


def short_oof(spec: str) -> str:
    """``oof:kfold__k3__finetune__<backbone>__...`` -> ``oof:<backbone> 3-fold`` for tables."""
    return re.sub(r"oof:kfold__k(\d+)__finetune__(?:tf_efficientnet_)?(\w+?)__[^+ ]*",
                  r"oof:\2 \1-fold", spec)


# the names models.kfold / models.finetune give their folders (read for table labels only)
_KFOLD_NAME = re.compile(r"kfold__k(\d+)__finetune__(?:tf_efficientnet_)?(\w+?)__.*")
_NETWORK_NAME = re.compile(
    r"finetune__(?:tf_efficientnet_)?(\w+?)__[^+:]*?(?:__cv(\d+)of(\d+))?__seed\d+")


def block_label(block: FeatureBlock) -> str:
    """A ``--features`` block for tables: a fine-tuned network's folder reads
    ``ft:<backbone>[ fold k/K]`` (not its path), a K-fold ensemble's out-of-fold block
    ``oof:<backbone> K-fold``; other blocks as written."""
    if block.kind == "oof" and (m := _KFOLD_NAME.fullmatch(block.source)):
        return f"oof:{m[2]} {m[1]}-fold"
    name = block.source.rpartition("/")[2]
    if block.kind == "finetuned" and "/" in block.source and (m := _NETWORK_NAME.match(name)):
        fold = f" fold {m[2]}/{m[3]}" if m[2] else ""
        rest = name[m.end():] + (":" + ",".join(block.options) if block.options else "")
        return f"ft:{m[1]}{fold}{rest}"
    return block.text()


def _head_features_label(features: str) -> str:
    """A head's ``--features`` for tables, block by block (:func:`block_label`)."""
    return "+".join(block_label(b) for b in parse_features(features))


# -- the kinds ---------------------------------------------------------------------------


@register_kind("finetune")
class NetworkFolder(ModelFolder):
    """A fine-tuned timm network (``model.pt``), calibrated by its card's temperature."""

    card_kind = "finetune"
    description = "a fine-tuned network"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.network: Any = None  # torch.nn.Module in eval mode, once loaded
        self.spec: Any = None  # its featurize.backbones.BackboneSpec (preprocessing)

    @classmethod
    def labels(cls, card: ModelCard) -> Labels:
        c = card.config
        h, w = c.image_size
        cc = ", SoG" if c.color_constancy == "shades_of_gray" else ""
        fold = f", fold {c.cv_fold + 1}/{c.cv_folds}" if c.cv_folds else ""
        return Labels(f"{c.backbone} (fine-tuned {w}x{h}, {c.epochs} ep{cc}{fold})",
                      "fine-tune", f"{c.sampler} sampler, {c.loss}")

    def _load(self) -> None:
        self.network, _, self.spec = load_finetuned(self.path, self.device)

    def predict_proba(self, images: Sequence[str] | Dataset,
                      metadata: pd.DataFrame | None = None) -> np.ndarray:
        """Calibrated class probabilities, (n, n_classes); ``metadata`` is not read."""
        self.load()
        return network_proba(self.network, self.card, self.spec, _paths(images), self.tta)

    def gradcam_network(self) -> NetworkFolder:
        """Itself."""
        return self


@register_kind("onnx")
class OnnxNetworkFolder(NetworkFolder):
    """A fine-tuned network exported for inference (``model.onnx``, ``models.export``), run
    by ONNX Runtime; Grad-CAM explains its torch copy (``model.pt``) when it keeps one."""

    description = "a fine-tuned network exported for ONNX Runtime"
    no_gradcam = "an export without its torch copy model.pt: explain the unexported folder"

    @classmethod
    def claims(cls, card: ModelCard) -> bool:
        return is_exported(card)

    def _load(self) -> None:
        self.network, self.spec = load_onnx_network(self.path, self.card), card_spec(self.card)

    def gradcam_network(self) -> NetworkFolder | None:
        """The torch copy, as a plain network folder; None when the export keeps none."""
        if not (self.path / TORCH_FILE).is_file():
            return None
        return NetworkFolder(self.path, self.card, self.device, self.workdir, self.tta)


def member_dirs(folder: Path | str, card: ModelCard | None = None) -> list[Path]:
    """The member folders inside an ensemble folder, in the card's order.

    Raises:
        LesionLabError: the folder is not an ensemble.
    """
    card = card or load_card(folder)
    require_kind(card, "ensemble", f"{folder} holds a {{have}} model, not an ensemble")
    return [Path(folder) / MEMBERS / name for name in card.config.members]


def combine(probas: Sequence[np.ndarray], weights: Sequence[float],
            temperature: float = 1.0,
            class_weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted mean of calibrated probabilities (each (n, n_classes)), then the ensemble's
    decision rule (``class_weights``: (n_classes,) factors each class's probability is
    multiplied by before renormalising; None: argmax of the mean) and its own temperature;
    (n, n_classes)."""
    w = np.asarray(weights, dtype=float)
    w = w / w.sum()  # normalised first: extreme but valid weights neither overflow nor vanish
    mean = sum(wi * p for wi, p in zip(w, probas))
    if class_weights is not None:
        mean = mean * np.asarray(class_weights, dtype=float)
        mean = mean / mean.sum(axis=1, keepdims=True)
    return apply_temperature(mean, temperature)


@register_kind("ensemble")
class EnsembleFolder(ModelFolder):
    """Member folders (copies under ``members/``), averaged with the card's weights, then
    calibrated by the card's temperature."""

    card_kind = "ensemble"
    description = "a weighted mean of member model folders"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.members = [load_model_folder(d, self.device, self.workdir, self.tta)
                        for d in member_dirs(self.path, self.card)]

    @classmethod
    def labels(cls, card: ModelCard) -> Labels:
        label = members_label([m.features for m in card.details.members])
        k = len(card.details.members)
        features = f"{label} x{k} folds" if card.details.oof_image_ids else label
        rule = (f", decision rule chosen on val: {card.decision_rule}"
                if card.config.decision_rule != "argmax" else "")
        return Labels(features, f"ensemble of {len(card.config.members)}",
                      f"weights: {card.config.weights}{rule}")

    def children(self) -> list[ModelFolder]:
        return list(self.members)

    def predict_proba(self, images: Sequence[str] | Dataset,
                      metadata: pd.DataFrame | None = None) -> np.ndarray:
        """Calibrated class probabilities, (n, n_classes): the members' weighted mean."""
        self.load()
        return combine([m.predict_proba(images, metadata) for m in self.members],
                       self.card.config.member_weights, self.card.temperature,
                       self.card.details.class_weights)

    def gradcam_network(self) -> NetworkFolder | None:
        """The network member with the largest weight (the map explains that member, not the
        average); None without one."""
        nets = [(w, m) for w, m in zip(self.card.config.member_weights, self.members)
                if isinstance(m, NetworkFolder)]
        return max(nets, key=lambda wm: wm[0])[1] if nets else None


@register_kind("head")
class HeadFolder(ModelFolder):
    """A tuned head (``head.skops``) on feature blocks recomputed as its training features
    were (and on metadata when its card says so)."""

    card_kind = "head"
    description = "a tuned head on frozen embeddings or hand-made features"

    def __init__(self, path: Path, card: ModelCard, *args: Any, **kwargs: Any) -> None:
        super().__init__(path, localized(card, path), *args, **kwargs)  # its carried networks
        self.head: Any = None  # models.heads.HeadModel, once loaded
        self.extractors: list = []  # featurize.extract.Extractor per block (in-memory only)

    @classmethod
    def labels(cls, card: ModelCard) -> Labels:
        c = card.config
        return Labels(_head_features_label(c.features), c.head, c.imbalance)

    def _load(self) -> None:
        self.head = load_head(self.path)
        if self.workdir is None:
            self.extractors = card_extractors(self.card, self.device)

    def _stacked(self, dataset: Dataset) -> dict[str, np.ndarray]:
        """Per ``oof:<name>`` block, its ensemble's probabilities for ``dataset``."""
        return {}

    def predict_proba(self, images: Sequence[str] | Dataset,
                      metadata: pd.DataFrame | None = None) -> np.ndarray:
        """Calibrated class probabilities, (n, n_classes), of the head on the images'
        features (and metadata)."""
        self.load()
        dataset = _as_dataset(images, metadata)
        design = card_design(self.card, dataset, self.workdir, self.device,
                             extractors=None if self.workdir is not None else self.extractors,
                             stacked=self._stacked(dataset))
        return self.head.predict_proba(design)

    def close(self) -> None:
        for ext in self.extractors:
            ext.close()
        self.extractors = []
        super().close()


@register_kind("embedding_head")
class EmbeddingHeadFolder(HeadFolder):
    """A head on a fine-tuned network's embedding; the network is carried under
    ``members/`` (the folder predicts after being moved). Grad-CAM: none (the head, not the
    network, decides)."""

    description = "a head on a fine-tuned network's embedding"

    @classmethod
    def claims(cls, card: ModelCard) -> bool:
        return any(is_finetuned_key(b["backbone"]) for b in card.details.features) \
            and not stacked_blocks(card)


@register_kind("stack")
class StackFolder(HeadFolder):
    """A head on the out-of-fold probabilities of K-fold ensembles (``oof:<name>`` blocks,
    each carried under ``members/``); new images get each ensemble's own probabilities."""

    description = "a head stacked on a K-fold ensemble's out-of-fold probabilities"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stacked = {b: load_model_folder(stack_member_dir(self.path, b), self.device,
                                             self.workdir, self.tta)
                        for b in stacked_blocks(self.card)}

    @classmethod
    def claims(cls, card: ModelCard) -> bool:
        return bool(stacked_blocks(card))

    @classmethod
    def labels(cls, card: ModelCard) -> Labels:
        plain = super().labels(card)
        return Labels(plain.features, f"stack ({card.config.head})", plain.imbalance)

    def children(self) -> list[ModelFolder]:
        return list(self.stacked.values())

    def _stacked(self, dataset: Dataset) -> dict[str, np.ndarray]:
        return {b: m.predict_proba(dataset) for b, m in self.stacked.items()}

    def gradcam_network(self) -> NetworkFolder | None:
        """The network of its first K-fold ensemble (that ensemble's largest-weight fold)."""
        nets = [m.gradcam_network() for m in self.stacked.values()]
        nets = [n for n in nets if n is not None]
        return nets[0] if nets else None
