"""Reading and validating a HAM10000 folder and external label CSVs.

A HAM10000 folder holds ``HAM10000_metadata.csv`` and the images ``<image_id>.jpg`` anywhere
below it (flat, or the official ``HAM10000_images_part_1/`` and ``_part_2/`` folders). A
folder of another label format (ISIC 2018/2019/2020, PAD-UFES-20, class-per-folder) is read
by :mod:`lesionlab.labels`, its names mapped through the vocabulary table.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from lesionlab import images
from lesionlab.errors import LesionLabError
from lesionlab.labels import AUTO, NoLabelFile, Vocabulary, finish, load_vocabulary, read_labels
from lesionlab.labels import read_csv as _read_csv
from lesionlab.rowcheck import blank_lesion_ids, drop_repeated_images
from lesionlab.images import HIGH_BIT_MODES, MAX_IMAGE_PIXELS  # noqa: F401 (re-exported)

CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
CLASS_NAMES: dict[str, str] = {
    "akiec": "Actinic keratosis / Bowen's disease (intraepithelial carcinoma)",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis (solar lentigo / seborrheic keratosis / LPLK)",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
    "scc": "Squamous cell carcinoma",
}
CLASS_INDEX: dict[str, int] = {c: i for i, c in enumerate(CLASSES)}
# Every class name the label vocabularies map onto (HAM10000's 7, then the other public
# sets' classes), in the order a dataset's class set is listed (see ``class_set``).
KNOWN_CLASSES: tuple[str, ...] = CLASSES + ("scc",)
# The class set of binary melanoma labels (ISIC 2020's ``target``): ``label`` 1 is melanoma,
# 0 anything else; such a set is scored melanoma-vs-rest (``models.evaluate``), not trained on.
NOT_MEL = "not_mel"
BINARY_CLASSES: tuple[str, ...] = (NOT_MEL, "mel")
METADATA_FILE = "HAM10000_metadata.csv"
REQUIRED_COLUMNS: tuple[str, ...] = (
    "lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
DEFAULT_DATA_DIR = "./data/ham10000"
ISIC2018_COLUMNS: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")


def default_data_dir() -> Path:
    """The ``--data`` default: env ``LESIONLAB_DATA``, else ``./data/ham10000``."""
    return Path(os.environ.get("LESIONLAB_DATA", DEFAULT_DATA_DIR))


@dataclass(frozen=True)
class Dataset:
    """A validated image set: one row per image with its label, lesion and absolute path.

    Attributes:
        root: the folder the images were found under.
        frame: (n_images, n_columns) one row per image.
    """

    root: Path
    frame: pd.DataFrame  # columns: image_id, lesion_id, dx, label, path, (+ metadata columns)
    # the class names ``label`` indexes (``frame.label == i`` means ``classes[i]``)
    classes: tuple[str, ...] = CLASSES

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def labels(self) -> np.ndarray:
        """Integer class labels, shape ``(n_images,)``, indices into ``self.classes``."""
        return self.frame["label"].to_numpy()

    def fingerprint(self) -> str:
        """Short hash of image ids, labels and file sizes: changes whenever the image set does."""
        return frame_fingerprint(self.frame)


def frame_fingerprint(frame: pd.DataFrame) -> str:
    """Hash (image_id, dx, file size) rows; cheap enough for 10k images, sensitive to edits.

    Args:
        frame: (n_images, n_columns) labels frame with ``image_id``, ``dx`` and ``path``.

    Returns:
        16 hex digits of the sha256 of those rows.

    Raises:
        OSError: an image file listed is missing (``os.path.getsize``).
    """
    h = hashlib.sha256()
    for image_id, dx, path in zip(frame["image_id"], frame["dx"], frame["path"]):
        h.update(f"{image_id}|{dx}|{os.path.getsize(path)}\n".encode())
    return h.hexdigest()[:16]


def index_images(root: Path) -> dict[str, Path]:
    """Map image id -> path of every image file below ``root`` (any format Pillow decodes,
    symlinked folders followed; :func:`lesionlab.images.index_images`). An id carried by
    several files maps to the first; looking ids up (``_attach_paths``) refuses those."""
    return images.index_images(root).first_paths()


def vocabulary(label_map: Path | str | None = None) -> Vocabulary:
    """The name tables (the shipped one, plus ``--label-map FILE``), their class names
    checked against :data:`KNOWN_CLASSES`.

    Raises:
        LesionLabError: an unreadable map, or one mapping onto a class lesionlab lacks.
    """
    vocab = load_vocabulary(label_map)
    bad = sorted({e.target for e in vocab.entries
                  if e.kind == "class" and e.target
                  and e.target not in (*KNOWN_CLASSES, NOT_MEL)})
    if bad:
        raise LesionLabError(f"label map {label_map}: class name(s) {bad} are none of "
                             f"lesionlab's classes {list(KNOWN_CLASSES)}")
    return vocab


def read_metadata(csv_path: Path, vocab: Vocabulary | None = None) -> pd.DataFrame:
    """Read and check a HAM10000 metadata CSV: required columns, unique ids, and class, site
    and sex names in the vocabulary (mapped onto the canonical ones).

    Args:
        csv_path: the ``HAM10000_metadata.csv`` file.
        vocab: the name table; None: the default vocabulary.

    Returns:
        (n_images, n_columns) frame: one row per image, canonical ``dx``, ``sex``,
        ``localization``, ``age`` in years.

    Raises:
        LesionLabError: a missing column, no rows, a blank lesion id, an image listed twice,
            or a name outside the vocabulary (naming the values and their counts).
    """
    meta = _read_csv(csv_path, "metadata CSV")
    missing = [c for c in REQUIRED_COLUMNS if c not in meta.columns]
    if missing:
        raise LesionLabError(
            f"metadata CSV {csv_path} lacks column(s) {missing}; found {list(meta.columns)}")
    if meta.empty:
        raise LesionLabError(f"metadata CSV {csv_path} has no rows")
    blank = blank_lesion_ids(meta["lesion_id"])
    if blank.any():
        raise LesionLabError(
            f"metadata CSV {csv_path}: {int(blank.sum())} row(s) have a blank lesion_id, e.g. "
            f"image_id(s) {meta['image_id'][blank].astype(str).tolist()[:5]} (CSV rows "
            f"{[int(i) + 2 for i in meta.index[blank][:5]]}); lesion-grouped splits need every "
            f"image's lesion: fill them in (the image_id if the image is its own lesion)")
    return finish(meta, vocab or vocabulary(), strict=True, where=str(csv_path))


def class_set(dx: pd.Series | Sequence[str]) -> tuple[str, ...]:
    """The class set of a dataset from its class names (``dx``).

    HAM10000's 7 (:data:`CLASSES`, all of them even when some are absent) when every name is
    one of them; :data:`BINARY_CLASSES` when the names are ``mel`` / ``not_mel`` (binary
    melanoma labels); else the classes present, in :data:`KNOWN_CLASSES` order (ISIC 2019:
    8 with scc; PAD-UFES-20: akiec, bcc, bkl, mel, nv, scc).

    Args:
        dx: (n_images,) class names.

    Raises:
        LesionLabError: a name outside :data:`KNOWN_CLASSES` (and not a binary label set).
    """
    present = set(pd.Series(dx, dtype=object).astype(str))
    if present <= set(CLASSES):
        return CLASSES
    if NOT_MEL in present and present <= set(BINARY_CLASSES):
        return BINARY_CLASSES
    unknown = sorted(present - set(KNOWN_CLASSES))
    if unknown:
        raise LesionLabError(f"unknown class(es) {unknown} in dx; expected one of "
                             f"{list(KNOWN_CLASSES)} (or mel / {NOT_MEL} binary labels)")
    return tuple(c for c in KNOWN_CLASSES if c in present)


def _check_classes(dx: pd.Series, source: Path) -> tuple[str, ...]:
    """:func:`class_set` of ``dx``, its error naming ``source``."""
    try:
        return class_set(dx)
    except LesionLabError as exc:
        raise LesionLabError(f"{source}: {exc}") from None


def _attach_paths(meta: pd.DataFrame, root: Path,
                  source: Path) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """``meta`` with ``path`` (each image id resolved below ``root``, with or without its
    extension) and ``label`` columns, and the class set ``label`` indexes.

    Raises:
        LesionLabError: no image below ``root``, listed ids missing, or an id two files carry.
    """
    if "path" in meta.columns:  # a class-per-folder tree knows each image's file
        paths = meta["path"]
    else:
        index = images.index_images(root)
        if not len(index):
            raise LesionLabError(f"no images (any format Pillow reads: .jpg, .png, .webp, "
                                 f".tif, .bmp...) found below {root}")
        paths = meta["image_id"].astype(str).map(index.find)
    missing = meta["image_id"][paths.isna()].tolist()
    if missing:
        raise LesionLabError(
            f"{len(missing)} image(s) listed in {source} are missing below {root}, "
            f"e.g. {missing[:5]}")
    out = meta.copy()
    out["image_id"] = out["image_id"].astype(str)
    out["path"] = paths.astype(str)
    classes = class_set(out["dx"])
    out["label"] = out["dx"].map({c: i for i, c in enumerate(classes)}).astype(int)
    return out, classes


def load_dataset(root: Path | str, *, verify_images: bool = False, labels: str = AUTO,
                 label_map: Path | str | None = None) -> Dataset:
    """Load and validate a training folder; ``verify_images`` also decodes every image.

    Args:
        root: a HAM10000 folder (``HAM10000_metadata.csv``), or a folder of another label
            format (:mod:`lesionlab.labels`).
        verify_images: decode every image now.
        labels: ``--labels``: a format name, or ``auto`` (HAM10000 metadata when present,
            else detected).
        label_map: ``--label-map FILE``: the user's vocabulary rows.

    Raises:
        LesionLabError: a missing folder or label file, a bad row, a name outside the
            vocabulary (training stops on every one: values and counts named), a missing image.
    """
    root = Path(root)
    if not root.is_dir():
        raise LesionLabError(
            f"data folder not found: {root} (download it with "
            f"`python -m lesionlab.download --data {root}` or pass --data DIR)")
    vocab, csv_path = vocabulary(label_map), root / METADATA_FILE
    if labels in (AUTO, "ham10000") and csv_path.exists():
        meta, source = read_metadata(csv_path, vocab), csv_path
    else:
        try:
            table = read_labels(root, labels, vocab, strict=True)
        except NoLabelFile as exc:
            if labels != AUTO:
                raise
            raise NoLabelFile(f"metadata CSV not found: {csv_path}; {exc}") from None
        meta, source = table.frame, table.source
    frame, classes = _attach_paths(meta, root, source)
    if verify_images:
        for path in frame["path"]:
            load_rgb(path)
    return Dataset(root=root, frame=frame.reset_index(drop=True), classes=classes)


def load_rgb(path: Path | str) -> Image.Image:
    """Open any image (RGBA, grayscale, palette, 16-bit, any size) as upright 8-bit RGB, file
    closed: :func:`lesionlab.images.read_image` without an aspect crop (kept here for callers).

    Images over ``MAX_IMAGE_PIXELS`` are refused before decoding (decompression bombs): the
    one limit of predict, evaluate, explain and serve. PIL's own warning threshold (89.5 MP)
    is not a second, lower one; its hard error (twice that) lies above ours anyway.

    Raises:
        LesionLabError: a missing, unreadable, unsupported, too large or too small image.
    """
    return images.read_image(path, max_pixels=MAX_IMAGE_PIXELS)


def load_external_labels(root: Path | str, csv_path: Path | str | None = None, *,
                         labels: str = AUTO, label_map: Path | str | None = None) -> Dataset:
    """Load an evaluation folder whose labels come in any format of :mod:`lesionlab.labels`.

    HAM10000 format: columns image_id, dx (lesion_id, age, sex, localization optional).
    ISIC 2018 format: column ``image`` plus one-hot MEL, NV, BCC, AKIEC, BKL, DF, VASC; ISIC
    2019/2020, PAD-UFES-20 and class-per-folder trees as described there. A site or sex
    name outside the vocabulary is a counted warning (read as ``unknown``); a class name
    outside it stops.

    Raises:
        LesionLabError: no label file of a known format (the formats and their columns
            named), more than one, a malformed row, an unknown class, a missing image.
    """
    root = Path(root)
    table = read_labels(root, labels, vocabulary(label_map), strict=False, csv_path=csv_path)
    frame, classes = _attach_paths(table.frame, root, table.source)
    return Dataset(root=root, frame=frame.reset_index(drop=True), classes=classes)
