"""The one place an image is found by its id and read: every command's images come through here.

Finding (:func:`index_images`): every file below a folder whose extension Pillow has a decoder
for (``PIL.Image.registered_extensions()``, any case) is indexed by its name without the
extension, the image id; symlinked sub-folders are followed (each real folder once, so a link
loop ends). An id given with its extension (``ISIC_0024306.png``) resolves as well as one
without; an id that two files carry (``x.jpg`` and ``x.png``, or two folders) is refused
naming both, never "first one wins".

Reading (:func:`read_image`), in this order:

1. decode, refusing more than :data:`MAX_IMAGE_PIXELS` before decoding (decompression bombs);
2. apply the EXIF orientation (``PIL.ImageOps.exif_transpose``): a phone photo stored
   landscape with Orientation=6 reads as the upright portrait it shows;
3. convert to 8-bit RGB (16-bit grey is scaled, not clipped);
4. the **aspect policy**: an image whose width/height differs from the model's input aspect
   (the median aspect of the images it was trained on, :func:`median_aspect`; HAM10000's 4:3
   where a model or feature set does not record one) is centre-cropped to that aspect, never
   stretched or padded, before the model's own resize. Past :data:`ASPECT_WARN_FACTOR` (1.5x
   either way) a counted warning says so. An image of the training aspect is not touched, so
   HAM10000's 600x450 (and the 200x150 copy) read exactly as before;
5. (before the crop) refuse, in one line naming the file, an image whose short side is under
   :data:`MIN_SIDE` pixels: a 1x1 or 8x8 "image" carries no lesion to classify.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lesionlab.errors import ImageError, LesionLabError, warn_once

# Decoded-pixel limit against decompression bombs: 100 MP is 4x the largest ISIC originals.
MAX_IMAGE_PIXELS = 100_000_000
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# HAM10000's images are 600x450 (the shared copy's 200x150): width/height 4:3, the aspect of
# a model or feature set that records none.
DEFAULT_ASPECT = 4 / 3
# A warning when an image's aspect differs from the model's by more than this factor
# (either way): a 3:4 portrait under a 4:3 model (1.78x) warns, a 3:2 photo (1.125x) does not.
ASPECT_WARN_FACTOR = 1.5
# The shortest side accepted, in pixels (of the upright image): a 1x1 or 8x8 placeholder or
# icon carries no lesion (resized to a 224 px input it is >14x interpolation). Not 32: 16-bit
# and colour tests read 40x30 synthetic images, which stay readable.
MIN_SIDE = 16
ASPECT_DIGITS = 4  # aspects are recorded (manifest, card) rounded to 4 decimals
_ORIENTATION_TAG = 0x0112  # EXIF Orientation; values 5-8 swap width and height
_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


@functools.lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (``".jpg"``, ``".webp"``...) Pillow can open, from its
    registry of formats (``Image.registered_extensions()`` restricted to formats it opens,
    less stubs that need an outside handler: HDF5, GRIB, BUFR, WMF), so a format Pillow
    learns is found without a hand-kept list."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN
                     and not _is_stub(Image.OPEN[fmt][0]))


def _is_stub(opener: object) -> bool:
    """Whether a format's opener is a stub class (``ImageFile.StubImageFile``); JPEG's is a
    factory function, no stub."""
    return isinstance(opener, type) and issubclass(opener, ImageFile.StubImageFile)


def is_image_file(name: str | Path) -> bool:
    """Whether a file name has an extension Pillow decodes (any case)."""
    return os.path.splitext(str(name))[1].lower() in image_extensions()


@dataclass
class ImageIndex:
    """Every image file below ``root``, by image id (file name without its extension).

    ``files[id]`` lists each distinct file (by real path) carrying that id, in walk order.
    """

    root: Path
    files: dict[str, list[Path]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)

    def first_paths(self) -> dict[str, Path]:
        """image id -> its first file (for listings; lookups use :meth:`find`)."""
        return {k: v[0] for k, v in self.files.items()}

    def find(self, image_id: str) -> Path | None:
        """The one file of ``image_id`` (with or without its extension); None if absent.

        Raises:
            LesionLabError: two files carry the id (the message names both).
        """
        image_id = str(image_id)
        found = self.files.get(image_id, [])
        stem, ext = os.path.splitext(image_id)
        if not found and ext.lower() in image_extensions():
            found = [p for p in self.files.get(stem, []) if p.suffix.lower() == ext.lower()]
        if len(found) > 1:
            raise LesionLabError(
                f"image id {image_id!r} is ambiguous below {self.root}: "
                f"{', '.join(str(p) for p in found[:3])}; remove or rename all but one")
        return found[0] if found else None


def index_images(root: Path | str) -> ImageIndex:
    """Index every image file below ``root`` (see :class:`ImageIndex`).

    Symlinked sub-folders are followed; a folder reached twice (a link loop, or a link to a
    folder already walked) is walked once, and a file reached twice is one file.
    """
    root = Path(root)
    index = ImageIndex(root)
    seen_dirs: set[str] = set()
    seen_files: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            if not is_image_file(name):
                continue
            path = Path(dirpath) / name
            key = os.path.realpath(path)
            if key not in seen_files:
                seen_files.add(key)
                index.files.setdefault(os.path.splitext(name)[0], []).append(path)
    return index


def _refuse_empty(path: Path | str) -> None:
    """An empty file gets its own message (PIL would call it unidentifiable)."""
    try:
        empty = os.stat(path).st_size == 0 and os.path.isfile(path)
    except OSError:
        return  # missing or unreadable: the open below says which
    if empty:
        raise ImageError(f"empty file: {path} (0 bytes, no image)")


def image_size(path: Path | str) -> tuple[int, int]:
    """(width, height) as the image will be read, from its header alone (no decoding): an
    EXIF orientation of 5-8 (a quarter turn) swaps them.

    Raises:
        ImageError: a missing, empty or unreadable file, or a folder.
    """
    _refuse_empty(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                turned = img.getexif().get(_ORIENTATION_TAG) in (5, 6, 7, 8)
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise ImageError(f"not an image but a folder: {path}") from None
    except (*_READ_ERRORS, Image.DecompressionBombError) as exc:
        raise ImageError(f"corrupt or unreadable image: {path} ({exc})") from None
    return (h, w) if turned else (w, h)


def median_aspect(paths: Sequence[Path | str]) -> float:
    """The median width/height of the images ``paths`` (headers only, EXIF-oriented), rounded
    to :data:`ASPECT_DIGITS` decimals: the input aspect a model trained on them records.

    A missing or unreadable image is left out of the median (reading it for the model then
    fails, naming it: resumable work before it is kept); :data:`DEFAULT_ASPECT` (rounded)
    when none is readable. Remembered per process for the same files (path, size,
    modification time): 10,015 headers take about 3 s on 2 cores.
    """
    stamps = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        stamps.append((str(p), st.st_size, st.st_mtime_ns))
    return _median_aspect(tuple(stamps))


@functools.lru_cache(maxsize=64)
def _median_aspect(stamps: tuple[tuple[str, int, int], ...]) -> float:
    ratios = []
    for path, _, _ in stamps:
        try:
            w, h = image_size(path)
        except LesionLabError:
            continue
        if w > 0 and h > 0:
            ratios.append(w / h)
    return round(float(np.median(ratios)) if ratios else DEFAULT_ASPECT, ASPECT_DIGITS)


def same_aspect(a: float | None, b: float | None) -> bool:
    """Whether two recorded aspects are one (None means :data:`DEFAULT_ASPECT`), to 1e-3."""
    return abs((a or DEFAULT_ASPECT) - (b or DEFAULT_ASPECT)) < 1e-3


def model_aspect(value: object, source: str = "model") -> float:
    """The input aspect (width/height) a card or manifest records: :data:`DEFAULT_ASPECT`
    for None (made before aspects were recorded), else the number.

    Raises:
        LesionLabError: a value that is not a positive finite number (naming ``source``).
    """
    if value is None:
        return DEFAULT_ASPECT
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value < float("inf"):
        raise LesionLabError(f"{source}: input_aspect must be a positive number (width/"
                             f"height), got {value!r}")
    return float(value)


def crop_box(size: tuple[int, int], aspect: float) -> tuple[int, int, int, int]:
    """The centred (left, top, right, bottom) box of aspect ``aspect`` (width/height) inside
    an image of ``size`` = (width, height): the whole image when rounding leaves its width and
    height as they are (a 600x450 image at 4:3)."""
    w, h = size
    if w / h > aspect:
        new_w = max(1, min(w, round(h * aspect)))
        left = (w - new_w) // 2
        return left, 0, left + new_w, h
    new_h = max(1, min(h, round(w / aspect)))
    top = (h - new_h) // 2
    return 0, top, w, top + new_h


def crop_to_aspect(img: Image.Image, aspect: float, path: Path | str = "image") -> Image.Image:
    """``img`` centre-cropped to ``aspect`` (width/height), the one aspect policy; a counted
    warning (:func:`lesionlab.errors.warn_once`) past :data:`ASPECT_WARN_FACTOR`."""
    box = crop_box(img.size, aspect)
    if box == (0, 0, *img.size):
        return img
    w, h = img.size
    factor = max(w / h / aspect, aspect * h / w)
    if factor > ASPECT_WARN_FACTOR:
        warn_once(f"{path}: {w}x{h} pixels, aspect {w / h:.3g} vs the model's {aspect:.3g} "
                  f"(over {ASPECT_WARN_FACTOR:g}x apart): centre-cropped to "
                  f"{box[2] - box[0]}x{box[3] - box[1]} (images are cropped, never stretched)",
                  key="image aspect centre-cropped", item=str(path))
    return img.crop(box)


def read_image(path: Path | str, aspect: float | None = None, *,
               max_pixels: int | None = None) -> Image.Image:
    """Read any image Pillow decodes as upright 8-bit RGB, file closed (the module's steps 1-5).

    Args:
        path: the image file.
        aspect: the model's input width/height; None: no crop (the image as given, upright).
        max_pixels: the decoded-pixel limit; None: :data:`MAX_IMAGE_PIXELS`.

    Returns:
        A PIL ``RGB`` image, (width, height) = the upright image's, or its crop.

    Raises:
        ImageError: a missing, empty, unreadable, unsupported, too large or too small
            image, or a folder.
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    _refuse_empty(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > limit:
                    raise ImageError(
                        f"image too large: {path} is {w}x{h} pixels (limit "
                        f"{limit:,}); downscale it first")
                img.load()
                rgb = _to_rgb8(ImageOps.exif_transpose(img), path)
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise ImageError(f"not an image but a folder: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large: {path} ({exc})") from None
    except _READ_ERRORS as exc:
        raise ImageError(f"corrupt or unreadable image: {path} ({exc})") from None
    check_min_side(rgb, path)
    return rgb if aspect is None else crop_to_aspect(rgb, aspect, path)


def decode_error(path: Path | str) -> str | None:
    """The one-line error :func:`read_image` raises for ``path``, or None where it reads: for
    naming every bad image of a set once one failed (a full decode of each)."""
    try:
        read_image(path)
    except ImageError as exc:
        return str(exc)
    return None


def check_min_side(img: Image.Image, path: Path | str) -> None:
    """Refuse an image whose short side is under :data:`MIN_SIDE` pixels.

    Raises:
        ImageError: one line naming the file, its size and the minimum.
    """
    if min(img.size) < MIN_SIDE:
        raise ImageError(
            f"image too small: {path} is {img.width}x{img.height} pixels; lesionlab needs at "
            f"least {MIN_SIDE} px on the short side")


# modes whose conversion to RGB loses what a dermoscopy model reads (counted warnings, one
# key each): colour, the pixels under transparency, or all but 256 colours
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N"})
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def lossy_mode_notes(img: Image.Image, path: Path | str) -> dict[str, str]:
    """What reading ``img`` as 8-bit RGB loses: ``{warning key: one-line message}`` for a
    grey, transparent or palette image (the models were trained on 8-bit RGB dermoscopy, so
    their scores on such an image are not the card's); empty for an RGB or CMYK image."""
    notes = {}
    if img.mode in GREY_MODES:
        notes["grey image read as RGB"] = (
            f"grey image {path} (mode {img.mode}): read as RGB with no colour; the models are "
            f"trained on colour images, so expect unreliable predictions")
    if img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        notes["alpha channel dropped"] = (
            f"transparent image {path} (mode {img.mode}): the alpha channel is dropped, hidden "
            f"pixels become visible")
    if img.mode in ("P", "PA"):
        notes["palette image"] = (f"palette image {path}: at most 256 colours; predictions "
                                  f"can differ from the full-colour image's")
    return notes


def image_notes(path: Path | str, name: str | None = None) -> list[str]:
    """:func:`lossy_mode_notes` of the image file at ``path`` (header only, no decoding),
    naming it ``name`` (default: the path); empty for a file PIL cannot open (reading it
    says why)."""
    try:
        with Image.open(path) as img:
            return list(lossy_mode_notes(img, path if name is None else name).values())
    except (*_READ_ERRORS, Image.DecompressionBombError):
        return []


def _warn_lossy_mode(img: Image.Image, path: Path | str) -> None:
    """A counted warning per :func:`lossy_mode_notes` entry, each image counted once."""
    for key, message in lossy_mode_notes(img, path).items():
        warn_once(message, key, str(path))


def _to_rgb8(img: Image.Image, path: Path | str) -> Image.Image:
    """8-bit RGB; 16-bit grey is scaled (PIL's ``convert`` would clip it to white). Grey,
    transparent and palette images get a counted warning (:func:`_warn_lossy_mode`).

    Raises:
        ImageError: 32-bit integer values outside 0..65535, or a floating-point image.
    """
    if img.mode != "F":
        _warn_lossy_mode(img, path)
    if img.mode in HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageError(f"unsupported pixel values in {path} (mode {img.mode}, range "
                                 f"{arr.min():g}..{arr.max():g}); save it as 8-bit RGB")
        grey = np.round(arr / 257.0).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode == "F":
        raise ImageError(f"unsupported floating-point image {path}; save it as 8-bit RGB")
    return img.convert("RGB")
