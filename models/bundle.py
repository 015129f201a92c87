"""The model folder's files: fitted model + ``card.json`` (its schema: ``lesionlab.card``,
re-exported here), weights checksums, saved probabilities, and who may write a folder.

Nothing in a model folder runs code when loaded: heads are stored with skops and only the
types this project writes are trusted; network weights and checkpoints load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import shutil
from pathlib import Path
from typing import IO, Any, Callable, Iterable, TypeVar

import numpy as np

from lesionlab.artifacts import atomic_path, models_dir, read_json
# the card's schema and loader live in the core; re-exported here for older imports
from lesionlab.card import (CARD, KINDS, SCHEMA_VERSION, WEIGHT_FILES, ModelCard,  # noqa: F401
                            check_card, load_card, save_card, sha256_file)
from lesionlab.card_blocks import HeadRecord
from lesionlab.cli import safe_name
from lesionlab.data import CLASSES
from lesionlab.errors import LesionLabError

HEAD_FILE = "head.skops"
LOCK_FILE = ".lock"  # flock-ed by the run writing the folder; holds its pid
# Files that mark a folder's kind when it has no readable card yet (a run that stopped early).
KIND_MARKERS = (("finetune", ("model.pt", "checkpoint.pt")), ("head", ("head.skops", "study.db")),
                ("ensemble", ("members",)))
# Every type a saved head holds (skops refuses anything else without running it).
TRUSTED_TYPES = (
    "models.heads.HeadModel", "imblearn.pipeline.Pipeline",
    "imblearn.over_sampling._smote.base.SMOTE", "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.metrics._dist_metrics.EuclideanDistance64", "lightgbm.sklearn.LGBMClassifier",
    "lightgbm.basic.Booster", "collections.OrderedDict", "numpy.dtype",
)


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


def load_proba(folder: Path | str, name: str, rows: int | None = None,
               n_classes: int = len(CLASSES)) -> np.ndarray:
    """Load a saved probability array (``test_proba.npy`` and the like) and validate it.

    ``n_classes``: the width expected, the size of the model's class set (``card.classes``).

    Args:
        folder: the model folder.
        name: the file in it.
        rows: the expected row count (n_images); None: any.
        n_classes: the width expected.

    Returns:
        (rows, n_classes) float probabilities, each row in [0, 1] summing to 1.

    Raises:
        LesionLabError: when the file is missing or unreadable, holds objects (loaded without
            pickle, so nothing in it runs), is not float, is not ``rows`` x ``n_classes``,
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
    want = f"({'N' if rows is None else rows}, {n_classes})"
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.floating):
        raise LesionLabError(f"{path}: dtype {getattr(arr, 'dtype', type(arr).__name__)}, "
                             f"expected float probabilities")
    if arr.ndim != 2 or arr.shape[1] != n_classes or rows not in (None, arr.shape[0]):
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


def score_text(v: float | None) -> str:
    """``0.123``; ``n/a`` for an undefined value (None in a card read back, or NaN)."""
    return "n/a" if v is None or v != v else f"{v:.3f}"


def summary_line(card: ModelCard) -> str:
    """One line of headline numbers for a model card."""
    t = card.test
    lo, hi = t.get("ci95", {}).get("balanced_accuracy") or [None, None]
    cv = card.details.cv_balanced_accuracy if isinstance(card.details, HeadRecord) else None
    n = score_text
    return (f"{card.name}: test balanced acc {n(t['balanced_accuracy'])} [{n(lo)}, {n(hi)}]  "
            f"macro F1 {n(t['macro_f1'])}  AUC {n(t['macro_auc'])}  mel sens "
            f"{n(t['mel_sensitivity'])}  ECE {n(t['ece'])}  "
            + (f"(cv {n(cv)}, " if cv is not None else "(")
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
    """``<workdir>/models/<name>``; a name with a path separator is refused.

    Raises:
        LesionLabError: ``name`` is not a safe folder name (:func:`lesionlab.cli.safe_name`).
    """
    return models_dir(workdir) / safe_name(name)


_HELD: dict[Path, IO[str]] = {}  # folders this process has claimed -> their open lock file
_F = TypeVar("_F", bound=Callable[..., Any])


def folder_kind(folder: Path | str) -> str | None:
    """The kind of model a folder holds: its card's, else what its files mark (a run that
    stopped before writing its card); None for a missing or empty folder."""
    folder = Path(folder)
    try:
        recorded = read_json(folder / CARD).get("kind")
        if recorded in KINDS:
            return recorded
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
