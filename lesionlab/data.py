"""Reading and validating a HAM10000 folder and external label CSVs.

A HAM10000 folder holds ``HAM10000_metadata.csv`` and the images ``<image_id>.jpg`` anywhere
below it (flat, or the official ``HAM10000_images_part_1/`` and ``_part_2/`` folders).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from lesionlab import images
from lesionlab.errors import LesionLabError
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
}
CLASS_INDEX: dict[str, int] = {c: i for i, c in enumerate(CLASSES)}
# Every class name the label vocabularies map onto (HAM10000's 7, then the other public
# sets' classes), in the order a dataset's class set is listed (see ``class_set``).
KNOWN_CLASSES: tuple[str, ...] = CLASSES + ("scc",)
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
    """A validated image set: one row per image with its label, lesion and absolute path."""

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
    """Hash (image_id, dx, file size) rows; cheap enough for 10k images, sensitive to edits."""
    h = hashlib.sha256()
    for image_id, dx, path in zip(frame["image_id"], frame["dx"], frame["path"]):
        h.update(f"{image_id}|{dx}|{os.path.getsize(path)}\n".encode())
    return h.hexdigest()[:16]


def index_images(root: Path) -> dict[str, Path]:
    """Map image id -> path of every image file below ``root`` (any format Pillow decodes,
    symlinked folders followed; :func:`lesionlab.images.index_images`). An id carried by
    several files maps to the first; looking ids up (``_attach_paths``) refuses those."""
    return images.index_images(root).first_paths()


def _read_csv(csv_path: Path, what: str) -> pd.DataFrame:
    """``pd.read_csv`` with user-facing errors for a missing or unparsable file."""
    if not csv_path.is_file():
        raise LesionLabError(f"{what} not found: {csv_path}")
    try:
        return pd.read_csv(csv_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise LesionLabError(f"cannot parse {what} {csv_path}: {exc}") from None


def read_metadata(csv_path: Path) -> pd.DataFrame:
    """Read and check a HAM10000 metadata CSV: required columns, known classes, unique ids."""
    meta = _read_csv(csv_path, "metadata CSV")
    missing = [c for c in REQUIRED_COLUMNS if c not in meta.columns]
    if missing:
        raise LesionLabError(
            f"metadata CSV {csv_path} lacks column(s) {missing}; found {list(meta.columns)}")
    if meta.empty:
        raise LesionLabError(f"metadata CSV {csv_path} has no rows")
    _check_classes(meta["dx"], csv_path)
    blank = meta["lesion_id"].isna() | (meta["lesion_id"].astype(str).str.strip() == "")
    if blank.any():
        raise LesionLabError(
            f"metadata CSV {csv_path}: {int(blank.sum())} row(s) have a blank lesion_id, e.g. "
            f"image_id(s) {meta['image_id'][blank].astype(str).tolist()[:5]} (CSV rows "
            f"{[int(i) + 2 for i in meta.index[blank][:5]]}); lesion-grouped splits need every "
            f"image's lesion: fill them in (the image_id if the image is its own lesion)")
    dup = meta["image_id"][meta["image_id"].duplicated()]
    if len(dup):
        raise LesionLabError(
            f"metadata CSV {csv_path} lists {len(dup)} image_id(s) twice, e.g. {list(dup[:3])}")
    return meta


def _check_classes(dx: pd.Series, source: Path) -> None:
    unknown = sorted(set(dx.astype(str)) - set(CLASSES))
    if unknown:
        raise LesionLabError(
            f"{source}: unknown class(es) {unknown} in dx; expected one of {list(CLASSES)}")


def _attach_paths(meta: pd.DataFrame, root: Path, source: Path) -> pd.DataFrame:
    """``meta`` with ``path`` (each image id resolved below ``root``, with or without its
    extension) and ``label`` columns.

    Raises:
        LesionLabError: no image below ``root``, listed ids missing, or an id two files carry.
    """
    index = images.index_images(root)
    if not len(index):
        raise LesionLabError(f"no images (any format Pillow reads: .jpg, .png, .webp, .tif, "
                             f".bmp...) found below {root}")
    paths = meta["image_id"].astype(str).map(index.find)
    missing = meta["image_id"][paths.isna()].tolist()
    if missing:
        raise LesionLabError(
            f"{len(missing)} image(s) listed in {source} are missing below {root}, "
            f"e.g. {missing[:5]}")
    out = meta.copy()
    out["image_id"] = out["image_id"].astype(str)
    out["path"] = paths.astype(str)
    out["label"] = out["dx"].map(CLASS_INDEX).astype(int)
    return out


def load_dataset(root: Path | str, *, verify_images: bool = False) -> Dataset:
    """Load and validate a HAM10000 folder; ``verify_images`` also decodes every image."""
    root = Path(root)
    if not root.is_dir():
        raise LesionLabError(
            f"data folder not found: {root} (download it with "
            f"`python -m lesionlab.download --data {root}` or pass --data DIR)")
    csv_path = root / METADATA_FILE
    meta = read_metadata(csv_path)
    frame = _attach_paths(meta, root, csv_path)
    if verify_images:
        for path in frame["path"]:
            load_rgb(path)
    return Dataset(root=root, frame=frame.reset_index(drop=True))


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


def load_external_labels(root: Path | str, csv_path: Path | str | None = None) -> Dataset:
    """Load an external test folder whose labels come in HAM10000 or ISIC 2018 Task 3 format.

    HAM10000 format: columns image_id, dx (lesion_id, age, sex, localization optional).
    ISIC 2018 format: column ``image`` plus one-hot MEL, NV, BCC, AKIEC, BKL, DF, VASC.
    """
    root = Path(root)
    if csv_path is None:
        csvs = sorted(root.glob("*.csv"))
        if len(csvs) != 1:
            raise LesionLabError(
                f"external test folder {root} must hold exactly one label CSV; found "
                f"{[c.name for c in csvs]}")
        csv_path = csvs[0]
    raw = _read_csv(Path(csv_path), "label CSV")
    if {"image_id", "dx"} <= set(raw.columns):
        meta = raw.copy()
    elif {"image", *ISIC2018_COLUMNS} <= set(raw.columns):
        onehot = raw[list(ISIC2018_COLUMNS)].to_numpy(dtype=float)
        if not np.all(np.isclose(onehot.sum(axis=1), 1.0)):
            bad = raw["image"][~np.isclose(onehot.sum(axis=1), 1.0)].tolist()
            raise LesionLabError(
                f"{csv_path}: ISIC 2018 rows must be one-hot; not so for {bad[:5]}")
        meta = pd.DataFrame({
            "image_id": raw["image"].astype(str),
            "dx": [ISIC2018_COLUMNS[i].lower() for i in onehot.argmax(axis=1)],
        })
    else:
        raise LesionLabError(
            f"label CSV {csv_path} is in neither known format: need columns image_id + dx "
            f"(HAM10000) or image + {list(ISIC2018_COLUMNS)} (ISIC 2018 Task 3); "
            f"found {list(raw.columns)}")
    meta["dx"] = meta["dx"].astype(str).str.lower()
    _check_classes(meta["dx"], csv_path)
    if "lesion_id" not in meta.columns:
        meta["lesion_id"] = meta["image_id"]  # unknown grouping: treat each image as a lesion
    meta["lesion_id"] = meta["lesion_id"].fillna(meta["image_id"])
    for col in ("age", "sex", "localization"):
        if col not in meta.columns:
            meta[col] = np.nan
    frame = _attach_paths(meta, root, csv_path)
    return Dataset(root=root, frame=frame.reset_index(drop=True))
