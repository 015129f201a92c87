"""The model folder: fitted model + ``card.json`` (one schema for heads and fine-tuned networks).

Nothing in a model folder runs code when loaded: heads are stored with skops and only the
types this project writes are trusted; network weights and checkpoints load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lesionlab.artifacts import atomic_path, models_dir, read_json, write_json
from lesionlab.cli import safe_name
from lesionlab.errors import LesionLabError
from lesionlab.provenance import provenance

CARD = "card.json"
HEAD_FILE = "head.skops"
KINDS = ("head", "finetune", "ensemble")
# Every type a saved head holds (skops refuses anything else without running it).
TRUSTED_TYPES = (
    "models.heads.HeadModel", "imblearn.pipeline.Pipeline",
    "imblearn.over_sampling._smote.base.SMOTE", "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.metrics._dist_metrics.EuclideanDistance64", "lightgbm.sklearn.LGBMClassifier",
    "lightgbm.basic.Booster", "collections.OrderedDict", "numpy.dtype",
)


@dataclass
class ModelCard:
    """What a model is, how it was made and how it scored; ``card.json`` of every model folder.

    Times: ``tune_time_s`` is the hyper-parameter search (0 without one), ``fit_time_s`` the
    training of the final model, ``total_time_s`` the whole stage's wall time (data, tuning,
    training, calibration and evaluation).
    """

    kind: str  # head | finetune | ensemble
    name: str
    config: dict
    classes: list[str]
    val: dict
    test: dict
    temperature: float
    decision_rule: str  # argmax | prior_corrected
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
    features: list[dict] = field(default_factory=list)  # head: the feature blocks it reads
    metadata: bool = False  # head: age, sex and site appended to the features
    mel_threshold: float | None = None  # melanoma rule: flag when calibrated P(mel) >= this
    details: dict = field(default_factory=dict)  # kind-specific: tuning or training record
    # commit, dirty, code and lock sha256, library versions (lesionlab.provenance); a card
    # written before this field existed loads with {} (unknown provenance, so stale)
    provenance: dict = field(default_factory=provenance)

    @property
    def features_label(self) -> str:
        """What the model reads, for tables."""
        if self.kind == "finetune":
            c = self.config
            h, w = c["image_size"]
            cc = ", SoG" if c.get("color_constancy") == "shades_of_gray" else ""
            fold = f", fold {c['cv_fold'] + 1}/{c['cv_folds']}" if c.get("cv_folds") else ""
            return f"{c['backbone']} (fine-tuned {w}x{h}, {c['epochs']} ep{cc}{fold})"
        if self.kind == "ensemble":
            label = members_label([m["features"] for m in self.details["members"]])
            k = len(self.details["members"])
            return f"{label} x{k} folds" if self.details.get("oof_image_ids") else label
        # a fine-tuned network's folder as backbone: "ft:<backbone> [fold k/K]", not its path
        return short_oof(re.sub(
            r"[^+:]*/finetune__(?:tf_efficientnet_)?(\w+?)__[^+:]*?(?:__cv(\d+)of(\d+))?__seed\d+",
            lambda m: f"ft:{m[1]}" + (f" fold {m[2]}/{m[3]}" if m[2] else ""),
            self.config["features"]))

    @property
    def head_label(self) -> str:
        """The classifier, for tables."""
        if self.kind == "ensemble":
            return f"ensemble of {len(self.config['members'])}"
        if self.kind == "head" and "oof:" in self.config["features"]:
            return f"stack ({self.config['head']})"
        return "fine-tune" if self.kind == "finetune" else self.config["head"]

    @property
    def imbalance_label(self) -> str:
        """How the class imbalance was handled, for tables."""
        if self.kind == "finetune":
            return f"{self.config['sampler']} sampler, {self.config['loss']}"
        if self.kind == "ensemble":
            return f"weights: {self.config['weights']}"
        return self.config["imbalance"]


def members_label(labels: list[str]) -> str:
    """An ensemble's members for tables: fold networks once, common prefixes dropped."""
    unique = dict.fromkeys(re.sub(r", fold \d+/\d+\)", ")", label) for label in labels)
    text = " + ".join(unique).replace("tf_efficientnet_", "").replace(":multistage", "")
    return short_oof(text)


def short_oof(spec: str) -> str:
    """``oof:kfold__k3__finetune__<backbone>__...`` -> ``oof:<backbone> 3-fold`` for tables."""
    return re.sub(r"oof:kfold__k(\d+)__finetune__(?:tf_efficientnet_)?(\w+?)__[^+ ]*",
                  r"oof:\2 \1-fold", spec)


def save_card(folder: Path, card: ModelCard) -> None:
    """Write ``card.json`` (last, so a folder with a card is complete)."""
    write_json(folder / CARD, asdict(card))


def load_card(folder: Path | str) -> ModelCard:
    """Read a model folder's card, with a clear error when it is not a model folder."""
    folder = Path(folder)
    if not (folder / CARD).exists():
        raise LesionLabError(f"{folder} is not a lesionlab model folder (no {CARD})")
    raw = read_json(folder / CARD)
    names = {f.name for f in dataclasses.fields(ModelCard)}
    missing = {f.name for f in dataclasses.fields(ModelCard)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if not isinstance(raw, dict) or missing - set(raw) or raw.get("kind") not in KINDS:
        raise LesionLabError(
            f"{folder / CARD} is not a card this version reads (retrain the model); "
            f"missing: {sorted(missing - set(raw)) if isinstance(raw, dict) else 'all'}")
    return ModelCard(**{"provenance": {}, **{k: v for k, v in raw.items() if k in names}})


class TrainingRun:
    """Shared by the head and fine-tuning configs: the data seed and the name's tail parts.

    Subclasses are dataclasses with ``seed``, ``split_seed`` and ``train_fraction`` fields.
    """

    seed: int
    split_seed: int | None
    train_fraction: float

    @property
    def data_seed(self) -> int:
        """Seed of the train/val/test split (and train subsets): ``split_seed``, else ``seed``."""
        return self.seed if self.split_seed is None else self.split_seed

    def name_tail(self) -> list[str]:
        """The folder-name parts every run has: train fraction, split seed, model seed."""
        frac = f"frac{self.train_fraction:g}" if self.train_fraction < 1 else ""
        split = f"split{self.split_seed}" if self.split_seed not in (None, self.seed) else ""
        return [frac, split, f"seed{self.seed}"]


def model_name(*parts: str) -> str:
    """A filesystem-safe model folder name from its defining parts."""
    return "__".join(re.sub(r"[^A-Za-z0-9_.+-]", "_", p) for p in parts if p)


def model_path(workdir: Path | str, name: str) -> Path:
    """``<workdir>/models/<name>``; a name with a path separator is refused."""
    return models_dir(workdir) / safe_name(name)


def save_head(folder: Path, model: Any) -> None:
    """Store a fitted head with skops (a format that loads without running code)."""
    import skops.io as sio

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / HEAD_FILE) as tmp:
        sio.dump(model, tmp)


def load_head(folder: Path | str) -> Any:
    """Load a fitted head; types other than the ones this project writes are refused."""
    import skops.io as sio

    path = Path(folder) / HEAD_FILE
    if not path.exists():
        raise LesionLabError(f"model folder {folder} has no {HEAD_FILE}")
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:  # a damaged file fails in many ways
        raise LesionLabError(f"cannot read {path}: {exc}") from None
    unknown = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if unknown:
        raise LesionLabError(
            f"{path} holds types lesionlab does not write ({unknown[:5]}); refusing to load it")
    return sio.load(path, trusted=list(untrusted))
