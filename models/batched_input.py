"""The batched input pipeline of fine-tuning (``--input-pipeline batched``): every image
decoded once into a uint8 cache, and the augmentation run on whole batches where the network
runs.

The worker pipeline (``models.finetune.TrainSet``) decodes and augments every image in
DataLoader worker processes, every epoch; on a GPU that is what bounds training (REPORT.md:
about 1,100 img/s on an H200 with 12 workers). Here each image is read once, as the eval
transform reads it (``lesionlab.images.read_image``: EXIF-oriented and centre-cropped to the
model's aspect; colour constancy; resized to the training size (H, W) with the backbone's
interpolation, timm's "squash"), into an ``(n_images, H, W, 3)`` uint8 array memory-mapped
from a cache file under the workdir (10,015 images at 200x150: 0.9 GB). Each batch is
gathered from it (in a background thread), moved to the device and augmented there, per
image, by kornia (``kornia.augmentation``): the ``isic`` recipe of
``models.finetune.train_transform`` transform for transform (affine: any rotation, scale
0.8-1.2, shear 10, nearest; random resized crop, scale 0.6-1, ratio 1.15-1.5; both flips;
colour jitter 0.3 / 0.3 / 0.3 / 0.05; normalisation; random erasing, p 0.5, scale 0.02-0.15,
value 0).

By design the two pipelines differ in two ways: the augmentation starts from the image at
the training size rather than the file's (the same on the 200x150 copy; on 600x450 originals
the random crops are enlarged from the 200x150 image), and the random draws come from torch's
generator on the device, so the same batches (the sampler is shared) get different, equally
distributed augmentations. ``tests/test_batched_input.py`` compares the two pipelines' output
statistics and checks that val scored from the cache equals the eval transform's.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset as TorchDataset
from tqdm.auto import tqdm

from featurize.color import apply_color_constancy
from featurize.extract import view_mean_proba
from lesionlab.artifacts import atomic_path
from lesionlab.errors import LesionLabError, warn_once
from lesionlab.images import model_aspect, read_image

PIPELINES = ("workers", "batched")
CACHE_VERSION = 1  # bump when what a cache row holds changes
CACHE_DIR = Path("cache") / "decoded"


def cache_key(paths: Sequence[str], size: tuple[int, int], aspect: float | None,
              color_constancy: str, interpolation: str) -> str:
    """The cache file's name: a sha256 over what decides a row (every path with its size and
    modification time, the size, aspect, colour constancy, interpolation, CACHE_VERSION), so
    a changed image or setting never reads a stale cache."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, list(size), model_aspect(aspect),
                                   color_constancy, interpolation]).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


class _DecodeSet(TorchDataset):
    """Item i: image i read as the eval transform reads it, (H, W, 3) uint8."""

    def __init__(self, paths: Sequence[str], size: tuple[int, int], aspect: float | None,
                 color_constancy: str, interpolation: str) -> None:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.functional import resize

        self.paths, self.size = list(paths), (int(size[0]), int(size[1]))
        self.aspect, self.cc = model_aspect(aspect), color_constancy
        self.mode = InterpolationMode(interpolation if interpolation in
                                      ("bilinear", "bicubic", "nearest") else "bicubic")
        self.resize = resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        img = apply_color_constancy(read_image(self.paths[i], self.aspect), self.cc)
        return np.array(self.resize(img, list(self.size), self.mode), dtype=np.uint8)


def decoded_cache(paths: Sequence[str], size: tuple[int, int], workdir: Path | str,
                  aspect: float | None = None, color_constancy: str = "none",
                  interpolation: str = "bicubic", num_workers: int = 2) -> np.ndarray:
    """The images of ``paths``, decoded once, as a read-only memory map.

    Built on first use (a progress bar; ``num_workers`` decoding processes), written to a
    temporary file and renamed into ``<workdir>/cache/decoded/<key>.npy``
    (:func:`cache_key`), so an interrupted build leaves no cache behind. A damaged cache
    file (truncated, emptied, overwritten or of another shape) is decoded again, with a
    counted warning. Caches of earlier data or settings stay until deleted (each is about
    ``n_images x H x W x 3`` bytes).

    Args:
        paths: image files, in the row order of the result.
        size: (H, W) in pixels.
        workdir: the run's workdir.
        aspect: width / height the images are centre-cropped to (None: 4:3).
        color_constancy: ``none`` or ``shades_of_gray``, applied before resizing.
        interpolation: the backbone's resize interpolation (its eval transform's).
        num_workers: DataLoader worker processes for the build.

    Returns:
        (n_paths, H, W, 3) uint8, memory-mapped.

    Raises:
        LesionLabError: an image cannot be read (naming it), or the cache just written
            cannot be read back.
    """
    size = (int(size[0]), int(size[1]))
    path = Path(workdir) / CACHE_DIR / (cache_key(paths, size, aspect, color_constancy,
                                                  interpolation) + ".npy")
    shape = (len(paths), *size, 3)
    if path.is_file():
        cache, damage = _open_cache(path, shape)
        if cache is not None:
            return cache
        warn_once(f"decoded-image cache {path} is damaged ({damage}): decoded again",
                  key="decoded-image cache rebuilt")
    _build_cache(path, shape, _DecodeSet(paths, size, aspect, color_constancy, interpolation),
                 num_workers)
    cache, damage = _open_cache(path, shape)
    if cache is None:
        raise LesionLabError(f"decoded-image cache {path} is damaged right after it was "
                             f"written ({damage}): is the disk full or failing?")
    return cache


def _open_cache(path: Path, shape: tuple[int, ...]) -> tuple[np.ndarray | None, str]:
    """(the memory map, "") or (None, what is wrong with the file: a truncated, emptied or
    overwritten file, or one of another shape)."""
    try:
        cache = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]
    if not isinstance(cache, np.ndarray) or cache.shape != shape or cache.dtype != np.uint8:
        what = (f"{cache.dtype} {cache.shape}" if isinstance(cache, np.ndarray)
                else type(cache).__name__)
        return None, f"holds {what}, expected uint8 {shape}"
    return cache, ""


def _build_cache(path: Path, shape: tuple[int, ...], images: _DecodeSet,
                 num_workers: int) -> None:
    """Decode ``images`` into ``path`` through a temporary file renamed on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    loader = DataLoader(images, batch_size=64, num_workers=num_workers)
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        at = 0
        for batch in tqdm(loader, desc="decoding images once", unit="batch", leave=False):
            out[at:at + len(batch)] = batch.numpy()
            at += len(batch)
        out.flush()
        del out


def batch_augment(size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                  augment: str = "isic") -> nn.Module:
    """The ``isic`` training augmentation on a batch, per image (kornia).

    Input: (batch, 3, H, W) float in [0, 1] on any device; output: (batch, 3, *size),
    normalised by ``mean`` / ``std`` (3 values each, in [0, 1] units).

    Raises:
        LesionLabError: ``augment`` is not ``isic`` (the ``basic`` recipe's quarter turns
            with ``expand`` change an image's shape, which a batch cannot hold: use
            ``--input-pipeline workers``).
    """
    import kornia.augmentation as K

    if augment != "isic":
        raise LesionLabError(f"--input-pipeline batched implements the isic augmentation "
                             f"only, not {augment!r}; use --input-pipeline workers")
    return nn.Sequential(
        K.RandomAffine(degrees=180, scale=(0.8, 1.2), shear=10, resample="nearest", p=1.0),
        K.RandomResizedCrop(tuple(int(v) for v in size), scale=(0.6, 1.0), ratio=(1.15, 1.5)),
        K.RandomHorizontalFlip(), K.RandomVerticalFlip(),
        K.ColorJitter(0.3, 0.3, 0.3, 0.05, p=1.0),
        K.Normalize(torch.tensor(list(mean)), torch.tensor(list(std))),
        K.RandomErasing(scale=(0.02, 0.15), ratio=(0.3, 3.3), value=0.0, p=0.5))


def to_device(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """(batch, H, W, 3) uint8 -> (batch, 3, H, W) float32 in [0, 1] on ``device``."""
    x = torch.from_numpy(np.require(batch, requirements=["C", "W"]))  # a copy if read-only
    if device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)


class IndexSet(TorchDataset):
    """Item i: (i, label, loss weight); what the shared sampler draws in the batched
    pipeline (the images come from the cache)."""

    def __init__(self, labels: np.ndarray, weights: np.ndarray) -> None:
        self.labels, self.weights = labels, weights

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[int, int, float]:
        return i, int(self.labels[i]), float(self.weights[i])


class BatchedLoader:
    """Batches of the training rows, augmented on the device: yields ((batch, 3, H, W)
    float images, (batch,) labels, (batch,) loss weights), like the worker pipeline's loader.

    Args:
        index_loader: a loader over :class:`IndexSet` (``models.finetune.train_loader``: the
            same sampler and generator as the worker pipeline).
        cache: (n_images, H, W, 3) uint8, :func:`decoded_cache`.
        rows: (n_train,) the training rows' indices into ``cache``.
        augment: :func:`batch_augment`'s module.
        device: where the batches are augmented and go.
    """

    def __init__(self, index_loader: DataLoader, cache: np.ndarray, rows: np.ndarray,
                 augment: nn.Module, device: torch.device) -> None:
        self.index_loader, self.cache, self.rows = index_loader, cache, np.asarray(rows)
        self.augment, self.device = augment.to(device), device

    def __len__(self) -> int:
        return len(self.index_loader)

    def _gather(self, i: torch.Tensor) -> np.ndarray:
        return self.cache[self.rows[i.numpy()]]  # a copy in memory, read from the map

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = iter(self.index_loader)
        with ThreadPoolExecutor(1) as pool:  # the next batch is read while this one trains
            nxt = next(batches, None)
            pending = None if nxt is None else (nxt, pool.submit(self._gather, nxt[0]))
            while pending is not None:
                (_, target, weight), images = pending[0], pending[1].result()
                nxt = next(batches, None)
                pending = None if nxt is None else (nxt, pool.submit(self._gather, nxt[0]))
                with torch.no_grad():
                    x = self.augment(to_device(images, self.device))
                yield x, target, weight


@torch.inference_mode()
def cached_proba(model: nn.Module, cache: np.ndarray, rows: np.ndarray,
                 mean: Sequence[float], std: Sequence[float], device: torch.device,
                 views, autocast, batch_size: int = 64) -> np.ndarray:
    """Softmax probabilities of ``model`` on cached rows, averaged over test-time views:
    what ``models.finetune.predict_proba`` gives on the same images (the cache holds the
    eval transform's resized image).

    Args:
        model: the network, (batch, n_classes) logits.
        cache: (n_images, H, W, 3) uint8.
        rows: (n,) indices into ``cache``.
        mean: 3 normalisation means, [0, 1] units; ``std`` likewise.
        device: where to run.
        views: ``featurize.extract.tta_views`` with its mode bound, batch -> list of views.
        autocast: a context-manager factory (the run's precision).
        batch_size: images per batch.

    Returns:
        (n, n_classes) probabilities, rows summing to 1 (uncalibrated).
    """
    model.eval()
    m = torch.tensor(list(mean), device=device).view(1, 3, 1, 1)
    s = torch.tensor(list(std), device=device).view(1, 3, 1, 1)
    out = []
    for at in range(0, len(rows), batch_size):
        x = (to_device(cache[np.asarray(rows[at:at + batch_size])], device) - m) / s
        out.append(view_mean_proba(model, views(x), autocast))
    return np.concatenate(out)
