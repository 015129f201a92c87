"""The model folder: fitted model + ``card.json`` (one schema for heads and fine-tuned networks).

Nothing in a model folder runs code when loaded: heads are stored with skops and only the
types this project writes are trusted; network weights and checkpoints load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, TypeVar

import numpy as np

from lesionlab.artifacts import atomic_path, models_dir, read_json, write_json
from lesionlab.cli import safe_name
from lesionlab.data import CLASSES
from lesionlab.errors import LesionLabError
from lesionlab.provenance import provenance

CARD = "card.json"
HEAD_FILE = "head.skops"
LOCK_FILE = ".lock"  # flock-ed by the run writing the folder; holds its pid
WEIGHT_FILES = ("model.pt", "head.skops")  # their sha256 is recorded in the card
# Files that mark a folder's kind when it has no readable card yet (a run that stopped early).
KIND_MARKERS = (("finetune", ("model.pt", "checkpoint.pt")), ("head", ("head.skops", "study.db")),
                ("ensemble", ("members",)))
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
    files: dict = field(default_factory=dict)  # sha256 of each weights file, set by save_card

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
    """Write ``card.json`` (last, so a folder with a card is complete), recording the sha256
    of each weights file of the folder in ``card.files``."""
    card.files = {name: sha256_file(Path(folder) / name) for name in WEIGHT_FILES
                  if (Path(folder) / name).is_file()}
    write_json(folder / CARD, asdict(card))


def load_card(folder: Path | str) -> ModelCard:
    """Read and validate a model folder's card.

    Raises:
        LesionLabError: (one line naming the folder and the field) when the folder has no
            card, the card is not one this version reads, or a field holds a value no
            lesionlab run writes (see :func:`check_card`).
    """
    folder = Path(folder)
    if not (folder / CARD).exists():
        raise LesionLabError(f"{folder} is not a lesionlab model folder (no {CARD})")
    try:
        raw = read_json(folder / CARD)
    except (OSError, ValueError) as exc:
        raise LesionLabError(f"cannot read {folder / CARD}: {exc}") from None
    names = {f.name for f in dataclasses.fields(ModelCard)}
    missing = {f.name for f in dataclasses.fields(ModelCard)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if not isinstance(raw, dict) or missing - set(raw) or raw.get("kind") not in KINDS:
        raise LesionLabError(
            f"{folder / CARD} is not a card this version reads (retrain the model); "
            f"missing: {sorted(missing - set(raw)) if isinstance(raw, dict) else 'all'}")
    card = ModelCard(**{"provenance": {}, **{k: v for k, v in raw.items() if k in names}})
    check_card(folder, card)
    return card


def _card_error(folder: Path, what: str, expected: str, got: Any) -> LesionLabError:
    text = repr(got)
    return LesionLabError(f"{Path(folder) / CARD}: {what} must be {expected}, got "
                          f"{text if len(text) <= 80 else text[:77] + '...'}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_card(folder: Path, card: ModelCard) -> None:
    """Refuse card fields no lesionlab run writes (a damaged or edited card).

    Raises:
        LesionLabError: naming the field and what was expected, for: classes other than
            ``CLASSES``; a temperature that is not a finite number > 0; a melanoma threshold
            outside [0, 1]; image ids that are not a list of strings; sha256 records that
            are not 64 hex digits; and, for an ensemble, members that are not distinct plain
            folder names or member weights that are not one finite number >= 0 per member
            with a sum > 0.
    """
    for name in ("config", "details", "val", "test", "files"):
        if not isinstance(getattr(card, name), dict):
            raise _card_error(folder, name, "an object", getattr(card, name))
    if card.classes != list(CLASSES):
        raise _card_error(folder, "classes", f"{list(CLASSES)}", card.classes)
    if not (_is_number(card.temperature) and math.isfinite(card.temperature)
            and card.temperature > 0):
        raise _card_error(folder, "temperature", "a finite number > 0", card.temperature)
    t = card.mel_threshold
    if t is not None and not (_is_number(t) and (math.isnan(t) or 0 <= t <= 1)):
        raise _card_error(folder, "mel_threshold", "null or a number in [0, 1]", t)
    for name in ("train_image_ids", "test_image_ids"):
        ids = getattr(card, name)
        if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise _card_error(folder, name, "a list of image ids", ids)
    for name, digest in card.files.items():
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise _card_error(folder, f"files[{name!r}]", "a sha256 (64 hex digits)", digest)
    if card.kind == "ensemble":
        _check_ensemble_config(folder, card.config)


def _check_ensemble_config(folder: Path, config: dict) -> None:
    members, weights = config.get("members"), config.get("member_weights")
    if not (isinstance(members, list) and members and len(set(map(str, members))) == len(members)
            and all(isinstance(m, str) and m not in (".", "..") and "/" not in m
                    and "\\" not in m for m in members)):
        raise _card_error(folder, "config.members", "a list of distinct folder names", members)
    if not (isinstance(weights, list) and len(weights) == len(members)):
        raise _card_error(folder, "config.member_weights",
                          f"a list of {len(members)} weights (one per member)", weights)
    if not all(_is_number(w) and math.isfinite(w) and w >= 0 for w in weights) \
            or sum(weights) <= 0:
        raise _card_error(folder, "config.member_weights",
                          "finite numbers >= 0 with a sum > 0", weights)


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_weights(folder: Path | str, name: str, card: ModelCard | None = None) -> Path:
    """Check a weights file against the sha256 its card recorded; call before loading it.

    Cards written before checksums were recorded have none (nor has a folder without a
    card), and pass. Returns the path.

    Raises:
        LesionLabError: when the file is missing, or its sha256 is not the recorded one (the
            file was replaced or damaged after the model was saved).
    """
    if card is None and (Path(folder) / CARD).exists():
        card = load_card(folder)
    path = Path(folder) / name
    if not path.is_file():
        raise LesionLabError(f"model folder {folder} has no {name}")
    want = card.files.get(name) if card is not None else None
    if want is not None:
        got = sha256_file(path)
        if got != want:
            raise LesionLabError(
                f"{path}: sha256 {got[:12]}... is not the {want[:12]}... recorded in its "
                f"{CARD}; the weights were replaced or damaged since the model was saved")
    return path


def load_proba(folder: Path | str, name: str, rows: int | None = None) -> np.ndarray:
    """Load a saved probability array (``test_proba.npy`` and the like) and validate it.

    Raises:
        LesionLabError: when the file is missing or unreadable, holds objects (loaded without
            pickle, so nothing in it runs), is not float, is not ``rows`` x ``len(CLASSES)``,
            or holds values that are not finite probabilities (each row in [0, 1], sum 1).
    """
    path = Path(folder) / name
    if not path.is_file():
        raise LesionLabError(f"model folder {folder} has no {name}; retrain it")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise LesionLabError(f"{path}: holds Python objects, expected a float array "
                                 f"(refused unread)") from None
        raise LesionLabError(f"cannot read {path}: {exc}") from None
    except (OSError, EOFError) as exc:
        raise LesionLabError(f"cannot read {path}: {exc}") from None
    want = f"({'N' if rows is None else rows}, {len(CLASSES)})"
    if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
        raise LesionLabError(f"{path}: dtype {getattr(arr, 'dtype', type(arr).__name__)}, "
                             f"expected float probabilities")
    if arr.ndim != 2 or arr.shape[1] != len(CLASSES) or rows not in (None, arr.shape[0]):
        raise LesionLabError(f"{path}: shape {arr.shape}, expected {want}")
    bad = int((~np.isfinite(arr)).any(axis=1).sum())
    if bad:
        raise LesionLabError(f"{path}: {bad} row(s) with NaN or infinite values, expected "
                             f"finite probabilities")
    if arr.size and ((arr < -1e-6).any() or (arr > 1 + 1e-6).any()
                     or not np.allclose(arr.sum(axis=1), 1, atol=1e-3)):
        raise LesionLabError(f"{path}: values are not probabilities (each row in [0, 1], "
                             f"summing to 1)")
    return arr


def summary_line(card: ModelCard) -> str:
    """One line of headline numbers for a model card."""
    t = card.test
    lo, hi = t.get("ci95", {}).get("balanced_accuracy", [float("nan")] * 2)
    cv = card.details.get("cv_balanced_accuracy")
    return (f"{card.name}: test balanced acc {t['balanced_accuracy']:.3f} "
            f"[{lo:.3f}, {hi:.3f}]  macro F1 {t['macro_f1']:.3f}  AUC {t['macro_auc']:.3f}  "
            f"mel sens {t['mel_sensitivity']:.3f}  ECE {t['ece']:.3f}  "
            + (f"(cv {cv:.3f}, " if cv is not None else "(")
            + f"{card.total_time_s} s)")


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


_HELD: dict[Path, IO[str]] = {}  # folders this process has claimed -> their open lock file
_F = TypeVar("_F", bound=Callable[..., Any])


def folder_kind(folder: Path | str) -> str | None:
    """The kind of model a folder holds: its card's, else what its files mark (a run that
    stopped before writing its card); None for a missing or empty folder."""
    folder = Path(folder)
    try:
        kind = read_json(folder / CARD).get("kind")
        if kind in KINDS:
            return kind
    except (OSError, ValueError, AttributeError):
        pass
    for kind, markers in KIND_MARKERS:
        if any((folder / m).exists() for m in markers):
            return kind
    return None


def claim_folder(folder: Path | str, kind: str, inputs: Iterable[Path | str] = (),
                 exclusive: bool = True) -> Path:
    """Claim ``folder`` as the output of a ``kind`` run, before anything is written to it.

    Resuming or rerunning the same kind into its own folder is allowed. With ``exclusive``
    (every run that writes the folder) an exclusive ``flock`` on its lock file is held until
    the run ends (:func:`release_claims` or process exit); a folder this process already holds
    is claimed again at no cost. Returns the folder.

    Raises:
        LesionLabError: when the folder is one of ``inputs`` (or holds one, or lies in one),
            holds a model of another kind, or is held by another running process.
    """
    folder = Path(folder)
    here = folder.resolve()
    for source in inputs:
        src = Path(source)
        if src.is_dir() and (src.resolve() == here or here in src.resolve().parents
                             or src.resolve() in here.parents):
            raise LesionLabError(f"output folder {folder} is also an input ({src}); "
                                 f"choose another --name")
    acquired = exclusive and here not in _HELD
    if acquired:
        _HELD[here] = _lock(folder)
    have = folder_kind(folder)
    if have is not None and have != kind:
        if acquired:
            release_folder(folder)
        raise LesionLabError(f"{folder} holds a {have} model; a {kind} run will not "
                             f"overwrite it (choose another --name, or delete the folder)")
    return folder


def _lock(folder: Path) -> IO[str]:
    """The folder's lock file, flock-ed (non-blocking) and stamped with this process's pid."""
    folder.mkdir(parents=True, exist_ok=True)
    fh = open(folder / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise LesionLabError(f"folder {folder} is in use by another run (pid {holder})") from None
    try:  # the pid is a note for the error above; the flock is what holds the folder
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
    except OSError:  # a full disk: the run's first real write says so, naming its file
        pass
    return fh


def release_folder(folder: Path | str) -> None:
    """Release this process's claim on ``folder`` (nothing if it holds none)."""
    fh = _HELD.pop(Path(folder).resolve(), None)
    if fh is not None:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def release_claims(fn: _F) -> _F:
    """Decorator of a stage: the folders claimed during a call are released when it returns
    or raises (claims made before the call, by a caller, are kept)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = set(_HELD)
        try:
            return fn(*args, **kwargs)
        finally:
            for folder in set(_HELD) - before:
                release_folder(folder)
    return wrapper  # type: ignore[return-value]


def clear_folder(folder: Path) -> None:
    """Empty a claimed folder for a fresh write, keeping its lock file."""
    for child in Path(folder).iterdir():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def save_head(folder: Path, model: Any) -> None:
    """Store a fitted head with skops (a format that loads without running code)."""
    import skops.io as sio

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / HEAD_FILE) as tmp:
        sio.dump(model, tmp)


def load_head(folder: Path | str) -> Any:
    """Load a fitted head; types other than the ones this project writes are refused.

    Raises:
        LesionLabError: when the file is missing, not the one its card recorded (sha256),
            unreadable, or holds types lesionlab does not write.
    """
    import skops.io as sio

    path = verify_weights(folder, HEAD_FILE)
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:  # a damaged file fails in many ways
        raise LesionLabError(f"cannot read {path}: {exc}") from None
    unknown = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if unknown:
        raise LesionLabError(
            f"{path} holds types lesionlab does not write ({unknown[:5]}); refusing to load it")
    return sio.load(path, trusted=list(untrusted))
