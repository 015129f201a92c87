"""Label files of the public dermoscopy formats, and the vocabulary that maps their names.

Every reader turns one format into the frame the rest of lesionlab uses: one row per image
with ``image_id``, ``lesion_id``, ``dx`` (a canonical class name of
:data:`lesionlab.data.KNOWN_CLASSES`), ``age`` (years), ``sex`` and ``localization``
(HAM10000's site names), ``dx_type`` where the format records how a label was made, and the
file's other columns unchanged. The formats (:data:`FORMATS`), detected from a CSV's columns
or a folder's layout, ``--labels FORMAT`` to force one:

- ``ham10000``: HAM10000 metadata (``image_id``, ``dx``; Tschandl et al., Sci. Data 2018).
- ``isic2018``: ISIC 2018 Task 3 ground truth (``image`` + one-hot MEL ... VASC, AKIEC).
- ``isic2019``: ISIC 2019 ground truth (``image`` + one-hot MEL, NV, BCC, AK, BKL, DF, VASC,
  SCC, UNK), with its metadata CSV (``image``, ``age_approx``, ``anatom_site_general``,
  ``lesion_id``, ``sex``) merged when the folder holds it.
- ``isic2020``: the ISIC 2020 training CSV (``image_name``, ``patient_id``, ``sex``,
  ``age_approx``, ``anatom_site_general_challenge``, ``diagnosis``, ``benign_malignant``,
  ``target``).
- ``padufes20``: PAD-UFES-20's ``metadata.csv`` (``img_id``, ``diagnostic`` in ACK, BCC,
  MEL, NEV, SCC, SEK, ``lesion_id``, ``age``, ``gender``, ``region``, ``biopsed``; Pacheco et
  al., Data in Brief 2020).
- ``imagefolder``: one folder per class below the data folder (torchvision's ImageFolder).

The vocabulary (``vocabulary.csv`` beside this module, one row per ``kind,source,target``)
maps each format's class, site and sex names onto the canonical ones; case, spacing, ``_``
and ``-`` do not matter; ``--label-map FILE`` adds a user's own rows (they win over the
shipped ones). A value outside the vocabulary is never dropped silently: where labels train
a model it stops the command (:class:`~lesionlab.errors.LesionLabError` naming the values
and their counts); where they are only scored or predicted it is a counted warning and the
value reads as ``unknown``.
"""

from __future__ import annotations

import csv
import functools
import os
import re
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lesionlab.rowcheck import blank_lesion_ids, drop_repeated_images
from lesionlab.errors import LesionLabError, warn_once
from lesionlab.images import image_extensions as image_suffixes  # one list of formats

VOCABULARY_FILE = Path(__file__).with_name("vocabulary.csv")
KINDS = ("class", "site", "sex")
# HAM10000's ``localization`` values (``unknown`` aside), the sites a model's metadata knows
SITES: tuple[str, ...] = (
    "abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand",
    "lower extremity", "neck", "scalp", "trunk", "upper extremity")
SEXES: tuple[str, ...] = ("male", "female")
UNKNOWN = "unknown"  # a site or sex that was not recorded
NO_CLASS = ""  # the target of a class name meaning "none of the classes" (ISIC 2019's UNK)
AUTO = "auto"
EXAMPLES = 5  # ids named in a message


def normalize(value: object) -> str:
    """The lookup key of a name: case-folded, ``_``/``-``/whitespace runs as one space."""
    return re.sub(r"[\s_\-]+", " ", str(value)).strip().casefold()


def _targets(kind: str) -> tuple[str, ...] | None:
    """The values a vocabulary row of ``kind`` may map onto; None: any lower-case name
    (class names are checked against ``lesionlab.data.KNOWN_CLASSES`` by
    :func:`lesionlab.data.vocabulary`, which this core module cannot import)."""
    return {"class": None, "site": (*SITES, UNKNOWN), "sex": (*SEXES, UNKNOWN)}[kind]


@dataclass(frozen=True)
class Entry:
    """One vocabulary row: ``source`` (as written) means ``target`` for names of ``kind``."""

    kind: str
    source: str
    target: str
    note: str = ""


@dataclass(frozen=True)
class Vocabulary:
    """Name tables per kind (``class``, ``site``, ``sex``), built from :class:`Entry` rows."""

    entries: tuple[Entry, ...]
    _maps: dict[str, dict[str, str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        maps: dict[str, dict[str, str]] = {k: {} for k in KINDS}
        for e in self.entries:  # later rows (a user's --label-map) win
            maps[e.kind][normalize(e.source)] = e.target
        object.__setattr__(self, "_maps", maps)

    def lookup(self, kind: str, value: object) -> str | None:
        """The canonical name of ``value`` (``NO_CLASS`` for "none"), None when outside."""
        return self._maps[kind].get(normalize(value))

    def names(self, kind: str) -> list[str]:
        """Every name of ``kind`` accepted as written in the table, canonical ones first."""
        targets = _targets(kind) or dict.fromkeys(e.target for e in self.entries
                                                  if e.kind == kind)
        canonical = [t for t in targets if t]
        seen, names = {normalize(t) for t in canonical}, list(canonical)
        for e in self.entries:
            if e.kind == kind and normalize(e.source) not in seen:
                seen.add(normalize(e.source))
                names.append(e.source)
        return names

    def with_entries(self, entries: Iterable[Entry]) -> Vocabulary:
        """This vocabulary plus ``entries`` (which win on the same source name)."""
        return Vocabulary(self.entries + tuple(entries))


def _check_entries(entries: list[Entry], origin: Path | str) -> list[Entry]:
    """Refuse unknown kinds, targets, and one source mapped onto two targets in one file."""
    seen: dict[tuple[str, str], str] = {}
    for i, e in enumerate(entries, start=2):
        if e.kind not in KINDS:
            raise LesionLabError(f"{origin} row {i}: unknown kind {e.kind!r}; expected one of "
                                 f"{list(KINDS)}")
        targets = _targets(e.kind)
        if e.target not in (targets or (e.target.strip().lower(),)):
            raise LesionLabError(
                f"{origin} row {i}: {e.kind} {e.source!r} maps onto {e.target!r}, which is not "
                f"a canonical {e.kind} name; expected one of {list(targets or ['lower case'])}")
        key = (e.kind, normalize(e.source))
        if seen.setdefault(key, e.target) != e.target:
            raise LesionLabError(f"{origin}: {e.kind} {e.source!r} maps onto both "
                                 f"{seen[key]!r} and {e.target!r}")
    return entries


def read_entries(path: Path | str) -> list[Entry]:
    """Vocabulary rows from a CSV (``kind,source,target[,note]``) or a TOML file.

    The TOML form has one table per kind: ``[site]`` then ``"left forearm" = "upper
    extremity"`` lines. A class name mapped onto ``""`` means "none of the classes".

    Raises:
        LesionLabError: a missing or unreadable file, missing columns, an unknown kind or
            target, or one source given two targets.
    """
    path = Path(path)
    if not path.is_file():
        raise LesionLabError(f"label map not found: {path}")
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(path.read_text(encoding="utf-8"))
            entries = [Entry(kind, str(src), str(dst)) for kind, table in data.items()
                       for src, dst in (table.items() if isinstance(table, dict) else [])]
            bad = [k for k, t in data.items() if not isinstance(t, dict)]
            if bad:
                raise LesionLabError(f"{path}: {bad} must be tables ([site], [class], [sex])")
        else:
            with path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            if rows and not {"kind", "source", "target"} <= set(rows[0]):
                raise LesionLabError(f"{path} needs columns kind, source, target; found "
                                     f"{list(rows[0])}")
            entries = [Entry(r["kind"].strip(), r["source"], (r["target"] or "").strip(),
                             (r.get("note") or "").strip()) for r in rows]
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise LesionLabError(f"cannot parse label map {path}: {exc}") from None
    return _check_entries(entries, path)


@functools.cache
def default_vocabulary() -> Vocabulary:
    """The shipped table (``lesionlab/vocabulary.csv``)."""
    return Vocabulary(tuple(read_entries(VOCABULARY_FILE)))


def load_vocabulary(label_map: Path | str | None = None) -> Vocabulary:
    """The shipped table, plus the rows of ``label_map`` (``--label-map FILE``) if given.

    Raises:
        LesionLabError: the ``label_map`` file is missing, unreadable or invalid
            (:func:`read_entries`).
    """
    vocab = default_vocabulary()
    return vocab if label_map is None else vocab.with_entries(read_entries(label_map))


def _counts(values: Iterable[object]) -> str:
    return ", ".join(f"{v!r} ({n})" for v, n in sorted(Counter(values).items(),
                                                       key=lambda kv: (-kv[1], str(kv[0]))))


def map_names(values: pd.Series, kind: str, vocab: Vocabulary | None = None, *,
              strict: bool = True, where: str = "labels", column: str | None = None
              ) -> pd.Series:
    """Map names of ``kind`` onto canonical ones; missing values (NaN, blank) stay NaN.

    Args:
        values: (n_rows,) one name per row, any spelling.
        kind: ``class``, ``site`` or ``sex``.
        vocab: the table; None: :func:`default_vocabulary`.
        strict: a name outside the table raises (training); else, for sites and sexes, one
            counted warning and the value becomes ``unknown`` (evaluation, prediction). Class
            names outside the table always raise: a row's label cannot be guessed.
        where: what the values come from, for messages (a file name).
        column: the column named in messages (default: ``kind``).

    Returns:
        (n_rows,) canonical names, same index; ``NO_CLASS`` ("") for a class meaning "none".

    Raises:
        LesionLabError: names outside the vocabulary (strict, or kind ``class``), listing
            each with its count.
    """
    vocab = vocab or default_vocabulary()
    present = values.notna() & (values.astype(str).str.strip() != "")
    uniques = pd.unique(values[present].astype(str))
    table = {u: vocab.lookup(kind, u) for u in uniques}
    outside = [u for u, t in table.items() if t is None]
    out = values.astype(object).where(present, np.nan)
    if outside:
        counts = _counts(v for v in values[present].astype(str) if v in outside)
        col = column or kind
        label = "class(es)" if kind == "class" else f"{kind} name(s)"
        msg = (f"{where}: unknown {label} {sorted(outside)} in {col} (rows: {counts}); "
               f"expected one of the vocabulary (lesionlab/{VOCABULARY_FILE.name}, see "
               f"README \"Bring your own data\"), or add them with --label-map FILE")
        if strict or kind == "class":
            raise LesionLabError(msg)
        warn_once(msg.replace("; expected", ", read as unknown; expected", 1),
                  key=f"vocabulary:{kind}:{where}")
        table.update({u: UNKNOWN for u in outside})
    mapped = out[present].astype(str).map(table)
    out.loc[present] = mapped
    return out


@dataclass(frozen=True)
class LabelFormat:
    """A label format: the columns that identify it, and the reader of one such CSV."""

    name: str
    needs: tuple[str, ...]  # columns a CSV of this format has; () for a folder layout
    what: str  # its name for people
    read: Callable[[pd.DataFrame, Vocabulary], pd.DataFrame] | None = None


class NoLabelFile(LesionLabError):
    """A folder holds no label file of a known format (nor a class-per-folder tree)."""


def _where(source: Path | str) -> str:
    return Path(source).name or str(source)


def _onehot(raw: pd.DataFrame, vocab: Vocabulary, where: str) -> pd.DataFrame:
    """ISIC 2018/2019 one-hot ground truth: one row per ``image``, the class its 1 marks.

    The one-hot columns are every column named in the class vocabulary (AK and AKIEC, SCC,
    UNK ...). A row must hold exactly one 1 and zeros elsewhere; a row whose 1 is UNK, or
    that holds no 1, has no class (left out and counted by :func:`finish`).
    """
    cols = [c for c in raw.columns if c != "image" and vocab.lookup("class", c) is not None]
    values = raw[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    ones = np.isclose(values, 1.0)
    bad = ~(ones | np.isclose(values, 0.0)).all(axis=1) | (ones.sum(axis=1) > 1)
    if bad.any():
        raise LesionLabError(
            f"{where}: ISIC ground-truth rows must be one-hot (exactly one 1 among {cols}, "
            f"0 elsewhere); {int(bad.sum())} row(s) are not, e.g. "
            f"{raw['image'][bad].astype(str).tolist()[:EXAMPLES]}")
    dx = np.where(ones.any(axis=1), np.array(cols, dtype=object)[ones.argmax(axis=1)], None)
    rest = raw.drop(columns=cols).rename(columns={"image": "image_id"})
    return rest.assign(dx=dx)


ISIC_METADATA = ("image", "anatom_site_general")  # the ISIC 2019 metadata CSV's key columns


def _merge_isic_metadata(frame: pd.DataFrame, meta: pd.DataFrame, where: str) -> pd.DataFrame:
    """Add age, sex, site and lesion id from ISIC 2019's metadata CSV (by ``image``)."""
    meta = meta.rename(columns={"image": "image_id", "age_approx": "age",
                                "anatom_site_general": "localization"})
    meta = meta.drop_duplicates("image_id")
    keep = ["image_id", *[c for c in ("age", "sex", "localization", "lesion_id")
                          if c in meta.columns]]
    merged = frame.drop(columns=[c for c in keep[1:] if c in frame.columns]).merge(
        meta[keep], on="image_id", how="left", validate="many_to_one")
    unmatched = int((~frame["image_id"].astype(str).isin(meta["image_id"].astype(str))).sum())
    if unmatched:
        warn_once(f"{where}: {unmatched} image(s) of the ground truth are not in the metadata "
                  f"CSV; their age, sex, site and lesion are unknown")
    return merged


def _isic2020(raw: pd.DataFrame, vocab: Vocabulary, where: str) -> pd.DataFrame:
    """ISIC 2020 training CSV; without ``lesion_id`` the patient is the group (stricter)."""
    frame = raw.rename(columns={"image_name": "image_id", "age_approx": "age", "diagnosis": "dx",
                                "anatom_site_general_challenge": "localization"})
    if "lesion_id" not in frame.columns and "patient_id" in frame.columns:
        frame["lesion_id"] = frame["patient_id"]
    if "target" in frame.columns:
        names = frame["dx"].map(lambda v: vocab.lookup("class", str(v)) if pd.notna(v) else None)
        if names.isna().any() or (names == NO_CLASS).any():
            # ISIC 2020 is a melanoma-vs-rest challenge: most of its diagnoses are "unknown",
            # its 0/1 ``target`` is the label of every row, so the set is read as binary labels
            # (scored melanoma vs rest by models.evaluate; training refuses binary labels)
            warn_once(f"{where}: diagnosis is unknown for {int((names.isna() | (names == NO_CLASS)).sum())} "
                      f"row(s); the file is read as binary melanoma labels from its target column")
            frame["dx"] = np.where(frame["target"].astype(int) == 1, "mel", "not_mel")
    return frame


def _padufes20(raw: pd.DataFrame, vocab: Vocabulary, where: str) -> pd.DataFrame:
    """PAD-UFES-20 metadata: ``biopsed`` becomes dx_type ``histo``, else ``consensus``
    (its non-biopsied labels are a dermatologists' consensus: Pacheco et al. 2020)."""
    frame = raw.rename(columns={"img_id": "image_id", "diagnostic": "dx", "gender": "sex",
                                "region": "localization"})
    frame["image_id"] = [_strip_image_ext(str(i)) for i in frame["image_id"]]
    if "biopsed" in frame.columns and "dx_type" not in frame.columns:
        biopsied = frame["biopsed"].astype(str).str.strip().str.lower().isin(("true", "1"))
        frame["dx_type"] = np.where(biopsied, "histo", "consensus")
    return frame


def _ham10000(raw: pd.DataFrame, vocab: Vocabulary, where: str) -> pd.DataFrame:
    return raw.copy()


def _strip_image_ext(image_id: str) -> str:
    stem, ext = os.path.splitext(image_id)
    return stem if ext.lower() in image_suffixes() else image_id


_ONEHOT = ("MEL", "NV", "BCC", "BKL", "DF", "VASC")
FORMATS: dict[str, LabelFormat] = {f.name: f for f in (
    LabelFormat("ham10000", ("image_id", "dx"), "HAM10000 metadata", _ham10000),
    LabelFormat("isic2019", ("image", *_ONEHOT, "AK", "SCC"), "ISIC 2019 ground truth",
                _onehot),
    LabelFormat("isic2018", ("image", *_ONEHOT, "AKIEC"), "ISIC 2018 Task 3 ground truth",
                _onehot),
    LabelFormat("isic2020", ("image_name", "diagnosis"), "ISIC 2020 training CSV", _isic2020),
    LabelFormat("padufes20", ("img_id", "diagnostic"), "PAD-UFES-20 metadata.csv", _padufes20),
    LabelFormat("imagefolder", (), "one sub-folder per class (torchvision ImageFolder)"),
)}
DX_COLUMN = {"ham10000": "dx", "isic2019": "the one-hot columns",
             "isic2018": "the one-hot columns", "isic2020": "diagnosis",
             "padufes20": "diagnostic", "imagefolder": "the folder names"}


def formats_help() -> str:
    """One line: every format and the columns (or layout) it needs."""
    return "; ".join(f"{f.name} ({f.what}): " + (", ".join(f.needs) or "no CSV")
                     for f in FORMATS.values())


def finish(frame: pd.DataFrame, vocab: Vocabulary, *, strict: bool, where: str,
           dx_column: str = "dx") -> pd.DataFrame:
    """Canonical names and the standard columns for a reader's frame.

    ``dx`` goes through the class vocabulary (outside: raise), ``localization`` and ``sex``
    through theirs (outside: raise if ``strict``, else warn and read ``unknown``); rows with
    no class (ISIC 2019's UNK, ISIC 2020's ``unknown`` ...) are left out with a counted
    warning naming some; a missing lesion id becomes the image's own (counted warning);
    missing ``age``/``sex``/``localization`` columns are added as NaN.

    Args:
        frame: (n_rows, n_columns) a reader's raw frame with ``image_id`` and ``dx_column``.
        vocab: the vocabulary table.
        strict: a site or sex outside the vocabulary raises (else warns, reads ``unknown``).
        where: what the rows come from, for messages (a file name).
        dx_column: the class column named in messages.

    Returns:
        (n_kept, n_columns') frame: one row per image with a class, canonical names, and
        ``image_id``, ``lesion_id``, ``dx``, ``age``, ``sex``, ``localization``.

    Raises:
        LesionLabError: a class name outside the vocabulary (or, ``strict``, a site or sex
            name), or no row with a class.
    """
    frame = frame.copy()
    frame["image_id"] = frame["image_id"].astype(str)
    frame["dx"] = map_names(frame["dx"], "class", vocab, where=where, column=dx_column)
    none = frame["dx"].isna() | (frame["dx"] == NO_CLASS)
    if none.any():
        warn_once(f"{where}: {int(none.sum())} row(s) carry no class lesionlab knows (UNK, "
                  f"unknown or blank) and are left out, e.g. "
                  f"{frame['image_id'][none].tolist()[:EXAMPLES]}")
        frame = frame[~none]
    if frame.empty:  # a header-only CSV, an empty tree, or only class-less rows
        raise LesionLabError(f"{where}: no labelled row (no image with a class)")
    for column, kind in (("localization", "site"), ("sex", "sex")):
        if column in frame.columns:
            frame[column] = map_names(frame[column], kind, vocab, strict=strict, where=where,
                                      column=column)
    for column in ("age", "sex", "localization"):
        if column not in frame.columns:
            frame[column] = np.nan
    if "lesion_id" not in frame.columns:
        frame["lesion_id"] = np.nan
    if pd.api.types.is_float_dtype(frame["lesion_id"]):  # numeric ids with gaps: 881, not 881.0
        frame["lesion_id"] = frame["lesion_id"].astype("Int64").astype(object)
    blank = blank_lesion_ids(frame["lesion_id"])  # missing, empty or whitespace-only
    if blank.any():
        warn_once(f"{where}: {int(blank.sum())} image(s) have no lesion_id; each counts as its "
                  f"own lesion (lesion-grouped splits and bootstraps treat them as independent)")
    frame["lesion_id"] = frame["lesion_id"].where(~blank, frame["image_id"]).astype(str)
    return drop_repeated_images(frame, where).reset_index(drop=True)


def is_imagefolder(root: Path, vocab: Vocabulary) -> bool:
    """Whether every (non-hidden) sub-folder of ``root`` is named after a class."""
    subdirs = _subdirs(root)
    return bool(subdirs) and all(vocab.lookup("class", d.name) not in (None, NO_CLASS)
                                 for d in subdirs)


def _subdirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def read_imagefolder(root: Path, vocab: Vocabulary) -> pd.DataFrame:
    """A class-per-folder tree: ``root/<class name>/**/<image>``; symlinks are followed.

    Returns the raw (n_images, 3) frame (``image_id`` = file stem, ``dx`` = folder name,
    ``path``).

    Args:
        root: the tree's top folder.
        vocab: the vocabulary table (unused by the reader; the shared reader signature).

    Raises:
        LesionLabError: no sub-folder, or one image id in two class folders.
    """
    suffixes = image_suffixes()
    rows, other = [], []
    for folder in _subdirs(root):
        for dirpath, _, names in os.walk(folder, followlinks=True):
            rows += [(os.path.splitext(n)[0], folder.name, str(Path(dirpath) / n))
                     for n in sorted(names) if os.path.splitext(n)[1].lower() in suffixes]
            other += [str(Path(dirpath) / n) for n in sorted(names)
                      if os.path.splitext(n)[1].lower() not in suffixes
                      and not n.startswith(".")]  # hidden files (.DS_Store) are no data
    if other:
        warn_once(f"{root}: {len(other)} file(s) in the class folders are not images (no "
                  f"image extension) and are left out, e.g. {other[:EXAMPLES]}",
                  key="non-image files in class folders")
    if not rows:
        raise NoLabelFile(f"{root}: no images in class folders (ImageFolder layout: "
                          f"{root}/<class>/<image>)")
    frame = pd.DataFrame(rows, columns=["image_id", "dx", "path"])
    twice = frame["image_id"][frame["image_id"].duplicated()].unique().tolist()
    if twice:
        raise LesionLabError(f"{root}: {len(twice)} image id(s) lie in two class folders, e.g. "
                             f"{twice[:EXAMPLES]}; an image has one class")
    return frame


def read_csv(csv_path: Path, what: str) -> pd.DataFrame:
    """``pd.read_csv`` with user-facing errors for a missing or unparsable file.

    Args:
        csv_path: the CSV file.
        what: what the file is, for messages (``label CSV``).

    Returns:
        (n_rows, n_columns) frame, as ``pd.read_csv`` reads it.

    Raises:
        LesionLabError: the file is missing, empty or not CSV.
    """
    if not csv_path.is_file():
        raise LesionLabError(f"{what} not found: {csv_path}")
    try:
        return pd.read_csv(csv_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise LesionLabError(f"cannot parse {what} {csv_path}: {exc}") from None


def _columns(path: Path) -> list[str]:
    try:
        return [str(c) for c in pd.read_csv(path, nrows=0).columns]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise LesionLabError(f"cannot parse label CSV {path}: {exc}") from None


def detect_format(columns: Iterable[str]) -> str | None:
    """The first CSV format whose identifying columns ``columns`` hold, else None."""
    have = set(columns)
    return next((f.name for f in FORMATS.values() if f.needs and set(f.needs) <= have), None)


@dataclass(frozen=True)
class LabelTable:
    """A folder's labels: the frame (see the module docstring), its format and file.

    ``frame`` is (n_images, n_columns), one row per labelled image.
    """

    frame: pd.DataFrame
    format: str
    source: Path


def _no_match(root: Path, headers: dict[Path, list[str]], forced: str,
              vocab: Vocabulary) -> NoLabelFile:
    known = f"known formats and what each needs: {formats_help()}"
    if forced != AUTO:
        return NoLabelFile(
            f"--labels {forced}: no CSV in {root} has the columns {list(FORMATS[forced].needs)}"
            f" (found: {_found(headers)}); {known}")
    if not headers:
        subdirs = _subdirs(root)
        odd = [d.name for d in subdirs if vocab.lookup("class", d.name) in (None, NO_CLASS)]
        tree = (f"its sub-folders {odd[:EXAMPLES]} are not class names" if odd
                else "it has no sub-folders")
        return NoLabelFile(f"{root} must hold exactly one label CSV; found [] (and {tree}, "
                           f"so it is no class-per-folder tree either); {known}")
    return NoLabelFile(f"label CSV(s) {[p.name for p in headers]} in {root} fit neither known "
                       f"format (found: {_found(headers)}); {known}; or force one with "
                       f"--labels FORMAT")


def _found(headers: dict[Path, list[str]]) -> str:
    return "; ".join(f"{p.name}: {cols}" for p, cols in headers.items()) or "no CSV"


def _pick_csv(root: Path, headers: dict[Path, list[str]], forced: str,
              vocab: Vocabulary) -> tuple[Path, str]:
    """The one label CSV among ``headers`` and its format.

    Raises:
        NoLabelFile: none fits (``forced``, or any format).
        LesionLabError: more than one fits.
    """
    fits = {p: (forced if forced != AUTO and set(FORMATS[forced].needs) <= set(cols)
                else detect_format(cols) if forced == AUTO else None)
            for p, cols in headers.items()}
    fits = {p: f for p, f in fits.items() if f}
    if len(fits) > 1:
        raise LesionLabError(
            f"{root} must hold exactly one label CSV; found {[p.name for p in fits]} "
            f"({', '.join(f'{p.name}: {f}' for p, f in fits.items())}); keep one, or pass its "
            f"folder's CSV explicitly")
    if not fits:
        raise _no_match(root, headers, forced, vocab)
    (path, fmt), = fits.items()
    return path, fmt


def _companion(headers: dict[Path, list[str]], label_csv: Path) -> Path | None:
    """ISIC 2019's metadata CSV beside its ground truth, if there is exactly one."""
    found = [p for p, cols in headers.items()
             if p != label_csv and set(ISIC_METADATA) <= set(cols) and not detect_format(cols)]
    if len(found) > 1:
        raise LesionLabError(f"{label_csv.parent}: more than one ISIC metadata CSV: "
                             f"{[p.name for p in found]}; keep one")
    return found[0] if found else None


def read_labels(root: Path | str, labels: str = AUTO, vocab: Vocabulary | None = None, *,
                strict: bool = True, csv_path: Path | str | None = None) -> LabelTable:
    """Read the labels of a data folder in any known format (see the module docstring).

    Args:
        root: the data folder (label CSV(s) at its top, or class sub-folders).
        labels: a name of :data:`FORMATS`, or ``auto``: detected from the CSVs' columns (one
            CSV must fit a format; ISIC 2019's metadata CSV rides along), else the layout.
        vocab: the name tables; None: the shipped one.
        strict: names outside the vocabulary stop (training); else sites and sexes warn.
        csv_path: read this CSV instead of looking in ``root``.

    Returns:
        The frame (canonical names; rows without a class left out), format and source.

    Raises:
        NoLabelFile: no label file of a known format (one line listing the formats).
        LesionLabError: an unparsable or ambiguous file, or a name outside the vocabulary.
    """
    root, vocab = Path(root), vocab or default_vocabulary()
    if labels not in (AUTO, *FORMATS):
        raise LesionLabError(f"unknown --labels {labels!r}; expected one of "
                             f"{[AUTO, *FORMATS]}")
    if csv_path is None and not root.is_dir():
        raise LesionLabError(f"data folder not found: {root}" if not root.exists()
                             else f"not a data folder but a file: {root}")
    csvs = [Path(csv_path)] if csv_path is not None else sorted(root.glob("*.csv"))
    headers = {p: _columns(p) for p in csvs} if labels != "imagefolder" else {}
    if labels == "imagefolder" or (labels == AUTO and not any(
            detect_format(c) for c in headers.values()) and is_imagefolder(root, vocab)):
        frame = finish(read_imagefolder(root, vocab), vocab, strict=strict, where=_where(root),
                       dx_column=DX_COLUMN["imagefolder"])
        return LabelTable(frame, "imagefolder", root)
    path, fmt = _pick_csv(root, headers, labels, vocab)
    return LabelTable(read_label_csv(path, fmt, vocab, strict=strict,
                                     metadata=_companion(headers, path)), fmt, path)


def read_label_csv(path: Path, fmt: str, vocab: Vocabulary, *, strict: bool = True,
                   metadata: Path | None = None) -> pd.DataFrame:
    """One label CSV of format ``fmt`` (+ ISIC 2019 metadata CSV) as the standard frame.

    Args:
        path: the label CSV.
        fmt: one of :data:`FORMATS` (``ham10000``, ``isic2018``, ...).
        vocab: the vocabulary table.
        strict: see :func:`finish`.
        metadata: ISIC 2018/2019 metadata CSV (age, sex, site) merged by image id.

    Returns:
        (n_images, n_columns) the standard frame of :func:`finish`.

    Raises:
        LesionLabError: the CSV is missing or unparsable (:func:`read_csv`), or see
            :func:`finish`.
    """
    raw = read_csv(path, "label CSV")
    frame = FORMATS[fmt].read(raw, vocab, path.name)  # type: ignore[misc]
    if metadata is not None and fmt in ("isic2018", "isic2019"):
        frame = _merge_isic_metadata(frame, read_csv(metadata, "ISIC metadata CSV"), path.name)
    return finish(frame, vocab, strict=strict, where=path.name, dx_column=DX_COLUMN[fmt])


def spelled(kind: str, text: str, vocab: Vocabulary | None = None) -> str:
    """``text`` as the table spells that name (any case/spacing in), else unchanged: the
    value parser of a CLI flag whose choices are :meth:`Vocabulary.names`."""
    key = normalize(text)
    return next((n for n in (vocab or default_vocabulary()).names(kind)
                 if normalize(n) == key), text)


def name_table(kind: str, vocab: Vocabulary | None = None) -> dict[str, str]:
    """Every accepted name of ``kind`` (as :meth:`Vocabulary.names` spells it) -> its
    canonical name: what the web page offers and the API accepts."""
    vocab = vocab or default_vocabulary()
    return {n: vocab.lookup(kind, n) or n for n in vocab.names(kind)}


def vocabulary_markdown(vocab: Vocabulary | None = None) -> str:
    """The table as Markdown rows (kind, name, canonical name, why): README's copy of it."""
    rows = ["| kind | name | lesionlab's name | note |", "|---|---|---|---|"]
    rows += [f"| {e.kind} | {e.source} | {e.target or '(no class: left out, counted)'} | "
             f"{e.note} |" for e in (vocab or default_vocabulary()).entries]
    return "\n".join(rows)
