"""The typed blocks of a model card (schema version 3): per kind, its settings and its record.

A card's ``config`` is the settings its run was made with and its ``details`` what the run
recorded; both are dataclasses of the card's kind (:data:`BLOCKS`), read by attribute. Every
field lives in one place: a fine-tuned network's image size, colour constancy and test-time
views are settings (``FinetuneSettings``), the input aspect it measured is its record's; a
head's feature blocks are its record's and whether it reads metadata its settings'. Stacking
and embedding heads are heads whose feature blocks say so (``models.folder``).

The settings mirror the configs of ``models`` (``HeadConfig``, ``FinetuneConfig``,
``EnsembleConfig``; a test keeps their fields equal), so the core reads a card without
importing the stages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from lesionlab.errors import LesionLabError


class Block:
    """A typed card block: built from a card's JSON object, refusing keys it does not know."""

    nested: ClassVar[dict[str, type]] = {}  # field -> the block type of each item of its list

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> "Block":
        """The block from its JSON object; ``where`` names it in errors (``card.json:
        config``).

        Raises:
            LesionLabError: (one line naming ``where`` and the key) when ``raw`` is not an
                object, holds a key this block does not have, or lacks a required one.
        """
        if not isinstance(raw, dict):
            raise LesionLabError(f"{where} must be an object, got {type(raw).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for key in raw:
            if key not in fields:
                raise LesionLabError(f"{where} has unknown key {key!r} (not a {cls.__name__} "
                                     f"field; made by another lesionlab version?)")
        for name, f in fields.items():
            if name not in raw and f.default is dataclasses.MISSING \
                    and f.default_factory is dataclasses.MISSING:
                raise LesionLabError(f"{where} lacks {name!r} (a required {cls.__name__} "
                                     f"field); retrain the model")
        values = dict(raw)
        for name, item_type in cls.nested.items():
            if isinstance(values.get(name), list):
                values[name] = [item_type.from_dict(v, f"{where}.{name}[{i}]")
                                for i, v in enumerate(values[name])]
        return cls(**values)

    def uses_metadata(self, settings: "Block") -> bool:
        """Whether the model reads age, sex and site (a record's answer; its kind's
        ``settings`` given)."""
        return False

    def out_of_fold_ids(self) -> list[str] | None:
        """A record's training image ids its model predicted out of fold (K-fold runs), or
        None."""
        return None

    def scalars(self) -> dict[str, float | None]:
        """A record's headline numbers by metric name (tracking logs the finite ones)."""
        return {}

    def curves(self) -> list[dict]:
        """A record's per-epoch history, one object per epoch with its ``epoch``."""
        return []


@dataclass
class HeadSettings(Block):
    """A head's run settings (``models.train_head.HeadConfig``)."""

    features: str
    head: str = "logreg"
    imbalance: str = "class_weight"
    metadata: bool = False  # age, sex and localization appended to the features
    trials: int = 20
    tune_timeout: float | None = 150.0
    folds: int = 3
    seed: int = 0
    split_seed: int | None = None
    train_fraction: float = 1.0
    name: str | None = None
    n_boot: int = 1000
    storage: str | None = None
    study_name: str | None = None

    @property
    def data_seed(self) -> int:
        """Seed of the train/val/test split: ``split_seed``, else ``seed``."""
        return self.seed if self.split_seed is None else self.split_seed


@dataclass
class FinetuneSettings(Block):
    """A fine-tuned network's run settings (``models.finetune.FinetuneConfig``);
    ``image_size`` is (H, W) in pixels."""

    backbone: str = "tf_efficientnet_lite0"
    image_size: tuple[int, int] | list[int] = (150, 200)
    epochs: int = 12
    batch_size: int = 32
    lr: float = 5e-4
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    drop_rate: float = 0.2
    augment: str = "isic"
    sampler: str = "balanced"
    loss: str = "ce"
    label_smoothing: float = 0.1
    train_fraction: float = 1.0
    patience: int | None = None
    freeze_stages: int = 2
    histo_weight: float = 1.0
    mixup: float = 0.0
    cutmix: float = 0.0
    ema_decay: float = 0.0
    distill_targets: str | None = None
    distill_temperature: float = 2.0
    distill_weight: float = 0.5
    tta: str = "flip"
    color_constancy: str = "shades_of_gray"
    cv_folds: int = 0
    cv_fold: int = 0
    seed: int = 0
    split_seed: int | None = None
    device: str = "auto"
    num_workers: int = 2
    precision: str = "auto"
    weights: str | None = None
    name: str | None = None
    n_boot: int = 1000
    input_pipeline: str = "workers"  # workers | batched (models.batched_input)

    @property
    def data_seed(self) -> int:
        """Seed of the train/val/test split: ``split_seed``, else ``seed``."""
        return self.seed if self.split_seed is None else self.split_seed


@dataclass
class EnsembleSettings(Block):
    """An ensemble's settings (``models.ensemble.EnsembleConfig``): member folder names
    (under ``members/``) and their weights, in one order."""

    members: list[str]
    name: str
    weights: str = "val"  # val | equal
    n_boot: int = 1000
    seed: int = 0
    member_weights: list[float] = field(default_factory=list)
    decision_rule: str = "argmax"  # argmax | val (models.ensemble.DECISION_RULES)

    @property
    def train_fraction(self) -> float:
        """1: an ensemble's members keep their own train fractions."""
        return 1.0


@dataclass(kw_only=True)
class HeadRecord(Block):
    """What tuning and refitting a head recorded; ``features`` are the feature blocks it
    reads (``models.design``), each a JSON object with its ``backbone`` and manifest."""

    features: list[dict] = field(default_factory=list)
    best_params: dict = field(default_factory=dict)
    n_estimators: int | None = None
    cv_balanced_accuracy: float | None = None
    cv_fold_scores: list[float] | None = None
    n_trials: int = 0
    val_balanced_accuracy_argmax: float | None = None
    val_balanced_accuracy_prior: float | None = None
    n_features: int | None = None

    def uses_metadata(self, settings: Block) -> bool:
        """A head reads metadata when its settings say so."""
        return isinstance(settings, HeadSettings) and settings.metadata

    def scalars(self) -> dict[str, float | None]:
        """The tuning's cross-validated score."""
        return {"cv_balanced_accuracy": self.cv_balanced_accuracy}


@dataclass(kw_only=True)
class FinetuneRecord(Block):
    """What fine-tuning recorded: the preprocessing (``mean``/``std`` per RGB channel,
    interpolation), the weights it started from, the training history (one object per
    epoch), speeds in images per second, and ``input_aspect``: the median width/height of its
    training images, the aspect images are centre-cropped to (None: HAM10000's 4:3)."""

    mean: list[float]
    std: list[float]
    interpolation: str | None = None  # None: the backbone's own (cards before it was kept)
    weights_source: str = ""
    weights_sha256: str = ""
    best_epoch: int = 0
    epochs_run: int = 0
    history: list[dict] = field(default_factory=list)
    val_balanced_accuracy: float | None = None
    epoch_time_s: float | None = None
    train_img_per_s: float | None = None
    eval_img_per_s: float | None = None
    device: str = "cpu"
    processes: int = 1
    oof_image_ids: list[str] | None = None  # --cv-folds: the train rows it never trained on
    bf16_autocast: bool = False
    input_aspect: float | None = None
    distill_targets_sha256: str | None = None  # --distill-targets: the soft targets' file

    def scalars(self) -> dict[str, float | None]:
        """Training speed (seconds per epoch, images per second) and the best epoch."""
        return {"epoch_time_s": self.epoch_time_s, "train_img_per_s": self.train_img_per_s,
                "best_epoch": self.best_epoch}

    def curves(self) -> list[dict]:
        """The training history."""
        return list(self.history)

    def out_of_fold_ids(self) -> list[str] | None:
        """The training rows predicted out of fold (None: not a K-fold run)."""
        return self.oof_image_ids


@dataclass(kw_only=True)
class MemberRecord(Block):
    """One ensemble member as recorded when the ensemble was made (its folder name and
    weight are the ensemble's settings, in the same order)."""

    kind: str
    features: str  # its table label
    val_balanced_accuracy: float | None = None
    test_balanced_accuracy: float | None = None


@dataclass(kw_only=True)
class EnsembleRecord(Block):
    """What making an ensemble recorded: its members (in the settings' order), the split
    seed they share, whether any reads metadata, and for K fold networks the training rows
    each predicted out of fold."""

    nested: ClassVar[dict[str, type]] = {"members": MemberRecord}

    members: list[MemberRecord] = field(default_factory=list)
    split_seed: int = 0
    metadata: bool = False
    oof_image_ids: list[str] | None = None
    # decision rule chosen on val (settings.decision_rule "val"): (n_classes,) factors each
    # class's mean probability is multiplied by, and val balanced accuracy of each rule tried
    class_weights: list[float] | None = None
    val_balanced_accuracy_by_rule: dict[str, float] | None = None

    def uses_metadata(self, settings: Block) -> bool:
        """An ensemble reads metadata when a member does."""
        return self.metadata

    def out_of_fold_ids(self) -> list[str] | None:
        """The training rows predicted out of fold (None: not a K-fold run)."""
        return self.oof_image_ids


class KindBlocks(NamedTuple):
    """A kind's settings and record block types."""

    settings: type[Block]
    record: type[Block]


# card kind -> its blocks
BLOCKS: dict[str, KindBlocks] = {"head": KindBlocks(HeadSettings, HeadRecord),
                                 "finetune": KindBlocks(FinetuneSettings, FinetuneRecord),
                                 "ensemble": KindBlocks(EnsembleSettings, EnsembleRecord)}
