"""The cached, resumable extraction loop: images -> ``<workdir>/features/<key>/``.

A cache entry holds ``features.npy`` (float32, N x F), ``index.csv`` (image_id order) and
``manifest.json`` (settings, weights sha256, data fingerprint, versions, timing). The manifest is
written last, so an entry without one is incomplete. Work proceeds in chunks written atomically
under ``chunks/``; a killed run resumes from the last complete chunk.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset
from tqdm import tqdm

from featurize.backbones import (CLASSICAL, BackboneSpec, Embedder, backbone_label,
                                 check_backbone, create_backbone, default_image_size,
                                 finetuned_backbone, finetuned_card, sha256_file, weights_file)
from featurize.classical import FEATURE_NAMES, classical_features
from featurize.cluster import run_on_cluster
from featurize.color import COLOR_CONSTANCY, apply_color_constancy
from featurize.spec import POOL_MODES, TTA_MODES, FeatureBlock, parse_block, source_kind
from lesionlab.artifacts import (atomic_path, check_room, exclusive_lock, features_dir,
                                 library_versions, read_json, reserve, save_npy, write_json)
from lesionlab.cli import check_choices, device_option, option
from lesionlab.data import Dataset, frame_fingerprint
from lesionlab.images import median_aspect, model_aspect, read_image, same_aspect
from lesionlab.device import DEVICES, resolve_device
from lesionlab.errors import LesionLabError
from lesionlab.provenance import move_aside, provenance, same_code

log = logging.getLogger(__name__)

ENGINES = ("auto", "eager", "onnx")


def check_scheduler(value: str) -> str:
    """``tcp://HOST:PORT`` (any Dask address) or ``local:N``.

    Raises:
        LesionLabError: neither a ``://`` address nor ``local:N`` with N >= 1.
    """
    if value.startswith("local:"):
        if not value[6:].isdigit() or int(value[6:]) < 1:
            raise LesionLabError(f"--scheduler {value!r}: local:N needs a worker count >= 1")
    elif "://" not in value:
        raise LesionLabError(f"--scheduler {value!r}: expected tcp://HOST:PORT or local:N")
    return value


@dataclass
class FeaturizeConfig:
    """Settings of one extraction; all but the runtime ones enter the cache key."""

    backbone: str = option(help="timm model name (tagged names too), 'classical', or a "
                                "fine-tuned model folder from models.finetune",
                           parse=lambda v: check_backbone(v))
    image_size: tuple[int, int] | None = option(
        None, "input (H, W); None: the backbone's size, 4:3", metavar=("H", "W"), ge=1)
    tta: str = option("none", "test-time views averaged per image", choices=TTA_MODES)
    pool: str = option("avg", "pooling: final layer, or the last stages too", choices=POOL_MODES)
    color_constancy: str = option("none", "colour constancy before the model sees the image",
                                  choices=COLOR_CONSTANCY)
    weights: str | None = option(None, "local checkpoint instead of packaged/hub weights")
    input_aspect: float | None = option(
        None, "width/height images are centre-cropped to before the resize; None: the "
              "median of the data's images (a fine-tuned backbone: its own)", gt=0)
    # runtime only (do not change the numbers beyond float tolerance):
    batch_size: int = option(64, "images per forward pass", ge=1)
    device: str = device_option()
    engine: str = option("auto", "CPU engine (auto: ONNX Runtime when installed)",
                         choices=ENGINES)
    num_workers: int = option(1, "image decoding worker processes", ge=0)
    chunk_size: int = option(1024, "images per resumable chunk", ge=1)
    scheduler: str | None = option(None, "Dask scheduler to fan chunks out to: tcp://HOST:8786, "
                                         "or local:N for a LocalCluster of N workers; None: "
                                         "this process", parse=lambda v: check_scheduler(v))

    def validate(self) -> None:
        """Reject unknown option values with a message naming them.

        Raises:
            LesionLabError: an option outside its choices, ``--tta``/``--pool`` with the classical
                backbone, or a chunk or batch size under 1.
        """
        check_choices(self)
        if self.backbone == CLASSICAL and (self.tta != "none" or self.pool != "avg"):
            raise LesionLabError("the classical backbone takes no --tta or --pool options")
        if self.chunk_size < 1 or self.batch_size < 1:
            raise LesionLabError("--chunk-size and --batch-size must be at least 1")

    def resolved(self) -> "FeaturizeConfig":
        """The settings actually used: a fine-tuned folder brings its own colour constancy
        and input aspect.

        Raises:
            LesionLabError: ``--color-constancy`` differs from the fine-tuned network's own.
        """
        card = finetuned_card(self.backbone)
        if card is None:
            return self
        own = card.config.color_constancy
        if self.color_constancy not in ("none", own):
            raise LesionLabError(f"{self.backbone} was trained with colour constancy {own!r}; "
                                 f"drop --color-constancy {self.color_constancy}")
        aspect = model_aspect(card.details.input_aspect, f"{self.backbone} card")
        return replace(self, color_constancy=own, input_aspect=aspect)

    def with_aspect(self, paths: Sequence[str]) -> "FeaturizeConfig":
        """These settings with ``input_aspect`` set: as given, else the median aspect of the
        images ``paths`` (headers only; see :func:`lesionlab.images.median_aspect`)."""
        if self.input_aspect is not None:
            return self
        return replace(self, input_aspect=median_aspect(paths))

    def size(self) -> tuple[int, int]:
        """(H, W) actually used."""
        return tuple(self.image_size) if self.image_size else default_image_size(self.backbone)


EVAL_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")  # any other name: bicubic


class ImagePathDataset(TorchDataset):
    """A list of image paths, decoded and resized in DataLoader workers: (tensor, index).

    Item ``i``: a (3, H, W) float32 tensor from :func:`eval_transform` (or, ``classical``, the
    (F,) hand-made features) and ``i``. Images are read by :func:`lesionlab.images.read_image`
    (EXIF-oriented, centre-cropped to ``aspect``, width/height; None: HAM10000's 4:3).
    """

    def __init__(self, paths: Sequence[str], size: tuple[int, int], mean: Sequence[float],
                 std: Sequence[float], classical: bool = False,
                 interpolation: str = "bicubic", color_constancy: str = "none",
                 aspect: float | None = None) -> None:
        self.paths = list(paths)
        self.aspect = model_aspect(aspect)
        self.size = size
        self.classical = classical
        self.transform = None if classical else eval_transform(size, mean, std, interpolation)
        self.color_constancy = color_constancy

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = apply_color_constancy(read_image(self.paths[i], self.aspect),
                                    self.color_constancy)
        if self.classical:
            return torch.from_numpy(classical_features(img, self.size)), i
        return self.transform(img), i


def eval_transform(size: tuple[int, int], mean: Sequence[float] | torch.Tensor,
                   std: Sequence[float] | torch.Tensor,
                   interpolation: str = "bicubic") -> Callable:
    """timm's deterministic eval transform, PIL RGB image -> (3, H, W) float32 tensor: resize
    to ``size`` = (H, W) (squashed to it: no crop, no padding), scale to [0, 1], then
    ``(x - mean) / std`` per channel (``mean``, ``std``: 3 values each, in [0, 1] units)."""
    return _eval_transform(tuple(int(v) for v in size), _three(mean), _three(std),
                           interpolation if interpolation in EVAL_INTERPOLATIONS else "bicubic")


def _three(values: Sequence[float] | torch.Tensor) -> tuple[float, ...]:
    return tuple(torch.as_tensor(values, dtype=torch.float32).flatten().tolist())


@functools.lru_cache(maxsize=16)
def _eval_transform(size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...],
                    interpolation: str) -> Callable:
    from timm.data import create_transform

    return create_transform(input_size=(3, *size), is_training=False, interpolation=interpolation,
                            mean=mean, std=std, crop_pct=1.0, crop_mode="squash")


def eval_tensor(img, size: tuple[int, int], mean: Sequence[float] | torch.Tensor,
                std: Sequence[float] | torch.Tensor,
                interpolation: str = "bicubic") -> torch.Tensor:
    """One PIL image through :func:`eval_transform`: a (3, H, W) float32 tensor."""
    return eval_transform(size, mean, std, interpolation)(img)


def view_mean_proba(model: torch.nn.Module, views: list[torch.Tensor],
                    autocast: Callable) -> np.ndarray:
    """Softmax of ``model``'s logits averaged over test-time views of one batch.

    Args:
        model: a classifier, (batch, n_classes) logits.
        views: :func:`tta_views` of a (batch, 3, H, W) normalised batch.
        autocast: a context-manager factory (the run's precision).

    Returns:
        (batch, n_classes) probabilities on the CPU, rows summing to 1.
    """
    probs = []
    for view in views:
        with autocast():
            logits = model(view.contiguous(memory_format=torch.channels_last))
        probs.append(torch.softmax(logits.float(), dim=1))
    return torch.stack(probs).mean(0).cpu().numpy()


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The batch under each test-time view: identity, + h-flip, or the 8 dihedral transforms.

    Args:
        x: (batch, 3, H, W) image batch.
        mode: ``none``, ``flip`` or ``d4``.

    Returns:
        1, 2 or 8 tensors, (batch, 3, H, W) or, for ``d4``'s odd quarter turns,
        (batch, 3, W, H).

    Raises:
        LesionLabError: ``mode`` is not one of ``TTA_MODES``.
    """
    if mode == "none":
        return [x]
    if mode == "flip":
        return [x, x.flip(3)]
    if mode != "d4":
        raise LesionLabError(f"unknown test-time augmentation {mode!r}; expected {TTA_MODES}")
    views = []
    for base in (x, x.flip(3)):
        views += [torch.rot90(base, k, dims=(2, 3)) for k in range(4)]
    return views


class Runner:
    """Runs an ``Embedder`` on batches with the fastest exact engine for the device."""

    def __init__(self, embedder: Embedder, device: torch.device, engine: str,
                 example: torch.Tensor) -> None:
        self.device = device
        self.engine = "eager" if device.type == "cuda" else engine
        if self.engine == "auto":
            self.engine = "onnx" if _onnx_available() else "eager"
        self.embedder = embedder.to(device).eval()
        self._tmp: str | None = None
        if self.engine == "onnx":
            self._session = self._export_onnx(example)
        elif device.type == "cpu":
            self.embedder = self.embedder.to(memory_format=torch.channels_last)

    def _export_onnx(self, example: torch.Tensor):
        self._tmp = tempfile.mkdtemp(prefix="lesionlab-onnx-")
        path = os.path.join(self._tmp, "embedder.onnx")
        export_onnx(self.embedder, example, path)
        return onnx_session(path)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> np.ndarray:
        if self.engine == "onnx":
            return self._session.run(None, {"x": x.numpy()})[0]
        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                return self.embedder(x).float().cpu().numpy()
        return self.embedder(x.contiguous(memory_format=torch.channels_last)).numpy()

    def close(self) -> None:
        """Remove the exported graph."""
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path | str) -> None:
    """Write ``module`` (eval mode, on the CPU) as an ONNX graph to ``path``: input ``x``
    (batch, 3, H, W) float32, any batch and image size; output ``y`` (batch, ...), as
    ``module`` returns it. ``example`` is one such input (its values are not stored)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=["x"],
                          output_names=["y"], opset_version=17, dynamo=False,
                          dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "y": {0: "b"}})


def onnx_session(path: Path | str):
    """An ONNX Runtime CPU session on the graph at ``path``, with torch's thread count and
    every graph optimisation."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class Extractor:
    """Loaded backbone + preprocessing; turns image paths into embedding batches."""

    def __init__(self, cfg: FeaturizeConfig) -> None:
        cfg.validate()
        cfg = cfg.resolved()
        self.cfg = cfg
        self.size = cfg.size()
        self.device = resolve_device(cfg.device)
        if cfg.backbone == CLASSICAL:
            self.spec = BackboneSpec(name=CLASSICAL, image_size=self.size, mean=(0, 0, 0),
                                     std=(1, 1, 1), weights_source="scikit-image features",
                                     weights_sha256=_classical_code_hash())
            self.runner = None
        else:
            model, self.spec = (finetuned_backbone(cfg.backbone)
                                if finetuned_card(cfg.backbone) is not None
                                else create_backbone(cfg.backbone, cfg.weights))
            example = torch.zeros(2, 3, *self.size)
            self.runner = Runner(Embedder(model, cfg.pool), self.device, cfg.engine, example)

    @property
    def engine(self) -> str:
        """Which engine runs the model ('features' for classical)."""
        return self.runner.engine if self.runner else "features"

    def loader(self, paths: Sequence[str]) -> DataLoader:
        """A DataLoader decoding ``paths`` in workers, order preserved."""
        ds = ImagePathDataset(paths, self.size, self.spec.mean, self.spec.std,
                              classical=self.runner is None,
                              interpolation=self.spec.interpolation,
                              color_constancy=self.cfg.color_constancy,
                              aspect=self.cfg.input_aspect)
        workers = self.cfg.num_workers
        return DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=False,
                          num_workers=workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=False, prefetch_factor=4 if workers else None)

    def embed_batch(self, x: torch.Tensor) -> np.ndarray:
        """Embeddings of one preprocessed batch, averaged over the TTA views.

        Args:
            x: (batch, 3, H, W) float images, normalised (classical: (batch, dim) features).

        Returns:
            (batch, dim) float32 embeddings.
        """
        if self.runner is None:
            return x.numpy().astype(np.float32)
        outs = [self.runner(v.contiguous()) for v in tta_views(x, self.cfg.tta)]
        return np.mean(outs, axis=0).astype(np.float32)

    def embed_paths(self, paths: Sequence[str], progress: bool = False) -> np.ndarray:
        """Embeddings of ``paths`` (no cache): used by predict on new images.

        Args:
            paths: image files.
            progress: show a progress bar.

        Returns:
            (n_paths, dim) float32 embeddings, in ``paths`` order; (0, 0) for no paths.
        """
        out = []
        for x, _ in tqdm(self.loader(paths), disable=not progress, unit="batch"):
            out.append(self.embed_batch(x))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def close(self) -> None:
        """Free engine resources."""
        if self.runner:
            self.runner.close()


def _classical_code_hash() -> str:
    from featurize import classical

    return hashlib.sha256(Path(classical.__file__).read_bytes()).hexdigest()


def cache_key(cfg: FeaturizeConfig, weights_sha256: str, data_fp: str) -> str:
    """Readable cache key: every setting that changes the numbers, plus input fingerprints."""
    h, w = cfg.size()
    cc = "" if cfg.color_constancy == "none" else f"-{cfg.color_constancy}"
    # an aspect crop other than HAM10000's 4:3 changes the numbers; 4:3 keeps the old keys
    aspect = "" if same_aspect(cfg.input_aspect, None) else f"-a{cfg.input_aspect:.4f}"
    return (f"{backbone_label(cfg.backbone)}-{h}x{w}-{cfg.tta}-{cfg.pool}{cc}{aspect}"
            f"-w{weights_sha256[:8]}-d{data_fp[:8]}")


@dataclass
class FeatureSet:
    """A completed cache entry, loaded.

    Attributes:
        key: the cache key (backbone and settings).
        path: its folder under ``features/``.
        features: (n_images, dim) float32 embeddings, a row per image.
        image_ids: (n_images,) the image id of each row.
        manifest: ``manifest.json``: settings, weights sha256, versions.
    """

    key: str
    path: Path
    features: np.ndarray
    image_ids: np.ndarray
    manifest: dict


def load_feature_set(path: Path | str) -> FeatureSet:
    """Load a completed cache entry (its manifest must exist).

    Raises:
        LesionLabError: ``manifest.json`` is missing, or ``index.csv`` and ``features.npy``
            have different row counts.
    """
    path = Path(path)
    if not (path / "manifest.json").exists():
        raise LesionLabError(f"feature set {path} is incomplete or missing (no manifest.json)")
    manifest = read_json(path / "manifest.json")
    feats = np.load(path / "features.npy", mmap_mode="r")
    ids = pd.read_csv(path / "index.csv", dtype={"image_id": str})["image_id"].to_numpy()
    if len(ids) != feats.shape[0]:
        raise LesionLabError(f"feature set {path}: index.csv and features.npy disagree")
    return FeatureSet(key=path.name, path=path, features=np.asarray(feats), image_ids=ids,
                      manifest=manifest)


def _read_chunk(path: Path, rows: int) -> np.ndarray | None:
    """A chunk file if complete and well-formed, else None (it will be recomputed)."""
    try:
        arr = np.load(path)
    except (OSError, ValueError, EOFError):
        return None
    if arr.ndim != 2 or arr.shape[0] != rows or arr.dtype != np.float32:
        return None
    return arr


def featurize(dataset: Dataset, workdir: Path | str, cfg: FeaturizeConfig,
              on_chunk: Callable[[int], None] | None = None,
              fresh_code: bool = False) -> FeatureSet:
    """Compute (or reuse) the cached features of every image in ``dataset``.

    One process at a time fills a cache entry (a lock file beside it); a second one waits,
    then finds the finished entry. With ``fresh_code`` (the study runner's default) an entry
    made by other code or another lock (:func:`lesionlab.provenance.same_code`) is moved under
    ``<workdir>/stale/`` and computed again.

    Raises:
        LesionLabError: bad options (:meth:`FeaturizeConfig.validate`), an unknown backbone or
            weights that cannot be loaded, an unreadable image, or a fine-tuned backbone's colour
            constancy overridden.
    """
    cfg.validate()
    frame = dataset.frame
    cfg = cfg.resolved().with_aspect(frame["path"].tolist())
    data_fp = frame_fingerprint(frame)
    known = _weights_sha_without_model(cfg)
    if known is not None:  # a cache hit then costs no model load or graph export
        hit = _cached(features_dir(workdir) / cache_key(cfg, known, data_fp))
        if hit is not None and (not fresh_code or same_code(hit.manifest.get("provenance"))):
            return hit
    extractor = Extractor(cfg)
    try:
        key = cache_key(cfg, extractor.spec.weights_sha256, data_fp)
        out = features_dir(workdir) / key
        with exclusive_lock(out.with_name(f".{key}.lock"), f"feature set {key}"):
            hit = _cached(out)
            if hit is not None and fresh_code and not same_code(hit.manifest.get("provenance")):
                log.info("features made by other code: moved to %s",
                         move_aside(out, workdir, hit.manifest.get("provenance")))
                hit = None
            if hit is not None:
                return hit
            return _extract(frame, out, key, cfg, extractor, data_fp, on_chunk)
    finally:
        extractor.close()


def _cached(out: Path) -> FeatureSet | None:
    """The finished feature set in ``out`` (its manifest is written last), or None."""
    if not (out / "manifest.json").exists():
        return None
    log.info("features cached: %s", out)
    return load_feature_set(out)


def _weights_sha_without_model(cfg: FeaturizeConfig) -> str | None:
    """The weights checksum when it can be had from a file alone (None for hub weights)."""
    if cfg.backbone == CLASSICAL:
        return _classical_code_hash()
    path = weights_file(cfg.backbone, cfg.weights)
    return sha256_file(path) if path is not None and path.is_file() else None


def chunk_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """(start, end) row ranges of ``n`` rows in chunks of ``size``."""
    return [(start, min(n, start + size)) for start in range(0, n, size)]


def chunk_file(chunks: Path, start: int, end: int) -> Path:
    """A chunk is named by its row range, so a rerun with another chunk size reuses none."""
    return chunks / f"rows_{start:08d}_{end:08d}.npy"


def _todo_chunks(n: int, chunks: Path, chunk_size: int) -> list[tuple[int, int, int]]:
    """(index, start, end) of the chunks still to compute; stale files are removed first."""
    chunks.mkdir(parents=True, exist_ok=True)
    bounds = chunk_bounds(n, chunk_size)
    wanted = {chunk_file(chunks, s, e).name for s, e in bounds}
    for stale in chunks.iterdir():  # temp files and chunks of another chunk size
        if stale.name not in wanted:
            stale.unlink()
    return [(i, s, e) for i, (s, e) in enumerate(bounds)
            if _read_chunk(chunk_file(chunks, s, e), e - s) is None]


def embed_chunk(extractor: Extractor, paths: Sequence[str]) -> np.ndarray:
    """Embeddings of one chunk of images, (n_paths, dim) float32 (the unit of work, local
    or on a Dask worker)."""
    return np.concatenate([extractor.embed_batch(x) for x, _ in extractor.loader(paths)])


_EXTRACTORS: dict[str, Extractor] = {}  # per Dask worker process: loaded once per settings


def worker_embed(settings: dict, paths: Sequence[str], threads: int | None) -> np.ndarray:
    """Runs on a Dask worker: embed one chunk, (n_paths, dim) float32, with a backbone loaded
    once per worker process (``settings``: a ``FeaturizeConfig`` as a dict)."""
    key = json.dumps(settings, sort_keys=True)
    if key not in _EXTRACTORS:
        if threads:
            torch.set_num_threads(threads)
        _EXTRACTORS[key] = Extractor(FeaturizeConfig(**settings))
    return embed_chunk(_EXTRACTORS[key], paths)


def _fill_chunks(paths: list[str], chunks: Path, cfg: FeaturizeConfig, extractor: Extractor,
                 on_chunk: Callable[[int], None] | None) -> tuple[int, int, float]:
    """Compute every missing chunk, here or on a Dask cluster; (rows resumed, computed, s)."""
    todo = _todo_chunks(len(paths), chunks, cfg.chunk_size)
    resumed = len(paths) - sum(e - s for _, s, e in todo)
    if resumed:
        log.info("resuming: %d of %d images already done", resumed, len(paths))
    t0 = time.perf_counter()
    with tqdm(total=len(paths), initial=resumed, unit="img", desc=cfg.backbone,
              smoothing=0.1) as bar:
        if cfg.scheduler:  # workers are daemon processes: no DataLoader workers
            settings = asdict(replace(cfg, scheduler=None, num_workers=0))
            done = run_on_cluster(cfg.scheduler, settings, worker_embed, paths, todo)
        else:
            done = ((i, s, e, embed_chunk(extractor, paths[s:e])) for i, s, e in todo)
        for k, (i, s, e, features) in enumerate(done):
            if k == 0:  # the dimension is known now: fail before hours of work, not after
                _check_room(chunks, todo, len(paths), features.shape[1])
            save_npy(chunk_file(chunks, s, e), features)
            bar.update(e - s)
            if on_chunk is not None:
                on_chunk(i)
    return resumed, len(paths) - resumed, time.perf_counter() - t0


def _check_room(chunks: Path, todo: list[tuple[int, int, int]], n: int, dim: int) -> None:
    """Enough free space for the chunks still to write and then ``features.npy`` beside them.

    Raises:
        LesionLabError: not enough: how many MB are needed and how many are free.
    """
    rows = sum(e - s for _, s, e in todo) + n  # chunks to come, then the assembled array
    check_room(chunks, rows * dim * 4 + 4096 * (len(todo) + 1), str(chunks.parent))


def _assemble(chunks: Path, out: Path, n: int, chunk_size: int) -> int:
    """Concatenate the chunks into ``features.npy`` (atomically); returns the dimension.

    The file's space is reserved before any row is written and the rows are written with
    plain writes (no memory map of a sparse file, which dies of SIGBUS on a full disk).

    Raises:
        LesionLabError: not enough disk space for the file (chunks are kept for a rerun).
    """
    bounds = chunk_bounds(n, chunk_size)
    first = _read_chunk(chunk_file(chunks, *bounds[0]), bounds[0][1] - bounds[0][0])
    dim = first.shape[1]
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
              "shape": (n, int(dim))}
    dest = out / "features.npy"
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, header)
    with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
        reserve(fh, len(head.getvalue()) + n * dim * 4, dest)
        fh.write(head.getvalue())
        for s, e in bounds:
            fh.write(np.ascontiguousarray(_read_chunk(chunk_file(chunks, s, e), e - s),
                                          dtype="<f4").tobytes())
    return int(dim)


def _manifest(key: str, cfg: FeaturizeConfig, extractor: Extractor, data_fp: str, n: int,
              dim: int, timing: tuple[int, int, float]) -> dict:
    """What made a cache entry: settings, weights, data fingerprint, versions, speed."""
    resumed, computed, wall = timing
    return {
        "key": key,
        "settings": {k: v for k, v in asdict(cfg).items()
                     if k in ("backbone", "tta", "pool", "weights", "color_constancy")} | {
            "image_size": list(cfg.size()), "input_aspect": model_aspect(cfg.input_aspect)},
        "runtime": {"engine": extractor.engine, "device": str(extractor.device),
                    "scheduler": cfg.scheduler,
                    "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
                    "torch_threads": torch.get_num_threads()},
        "weights_source": extractor.spec.weights_source,
        "weights_sha256": extractor.spec.weights_sha256,
        "mean": list(extractor.spec.mean), "std": list(extractor.spec.std),
        "data_fingerprint": data_fp,
        "n_images": n, "dim": dim,
        "feature_names": FEATURE_NAMES if cfg.backbone == CLASSICAL else None,
        "wall_time_s": round(wall, 2),
        "images_per_s": round(computed / wall, 2) if wall > 0 and computed else None,
        "resumed_images": resumed,
        "versions": library_versions(),
        "provenance": provenance(),
    }


def _extract(frame: pd.DataFrame, out: Path, key: str, cfg: FeaturizeConfig,
             extractor: Extractor, data_fp: str,
             on_chunk: Callable[[int], None] | None) -> FeatureSet:
    chunks = out / "chunks"
    n = len(frame)
    timing = _fill_chunks(frame["path"].tolist(), chunks, cfg, extractor, on_chunk)
    dim = _assemble(chunks, out, n, cfg.chunk_size)
    with atomic_path(out / "index.csv") as tmp:
        frame[["image_id"]].to_csv(tmp, index=False)
    manifest = _manifest(key, cfg, extractor, data_fp, n, dim, timing)
    write_json(out / "manifest.json", manifest)
    shutil.rmtree(chunks, ignore_errors=True)
    log.info("features written: %s (%d x %d, %.1f img/s)", out, n, dim,
             manifest["images_per_s"] or 0.0)
    return load_feature_set(out)


def find_feature_sets(workdir: Path | str) -> list[Path]:
    """Completed cache entries under ``<workdir>/features``."""
    root = features_dir(workdir)
    return sorted(p.parent for p in root.glob("*/manifest.json")) if root.exists() else []


_PINNED: ContextVar[tuple[str, ...]] = ContextVar("lesionlab_pinned_feature_sets", default=())


@contextmanager
def pinned_feature_sets(keys: Iterable[str]) -> Iterator[None]:
    """Inside the block, a ``--features`` name resolves to the one of ``keys`` it matches.

    A caller that made its feature sets from known settings (a study's cells) pins their exact
    cache keys, so a short name such as ``tf_efficientnet_lite0:none`` reads them and no other
    entry of the cache (another image size, TTA or pooling someone computed there).
    """
    token = _PINNED.set(_PINNED.get() + tuple(keys))
    try:
        yield
    finally:
        _PINNED.reset(token)


def settings_block(settings: dict) -> FeatureBlock:
    """The ``--features`` block stating every setting of a manifest's ``settings``:
    ``backbone:tta,pool[,colour constancy],HxW``."""
    cc = settings.get("color_constancy", "none")
    h, w = settings["image_size"]
    opts = [settings["tta"], settings["pool"]] + ([cc] if cc != "none" else []) + [f"{h}x{w}"]
    return FeatureBlock(source_kind(settings["backbone"]), settings["backbone"], tuple(opts))


def feature_spec(settings: dict) -> str:
    """:func:`settings_block` as written in ``--features``."""
    return settings_block(settings).text()


def _matching_sets(workdir: Path | str, name: str,
                   data_fp: str | None) -> list[tuple[Path, dict]]:
    """(path, manifest) of every completed feature set whose settings ``name`` names."""
    block = parse_block(name)
    backbone, words, size, weights = block.source, block.words, block.image_size, block.weights
    matches = []
    for path in find_feature_sets(workdir):
        man = read_json(path / "manifest.json")
        st = man["settings"]
        if st["backbone"] != backbone or (data_fp and man["data_fingerprint"] != data_fp):
            continue
        if words - {st["tta"], st["pool"], st.get("color_constancy", "none")}:
            continue
        if size is not None and tuple(st["image_size"]) != size:
            continue
        if weights is not None and not man["weights_sha256"].startswith(weights):
            continue
        matches.append((path, man))
    return matches


def resolve_key(workdir: Path | str, name: str, data_fp: str | None = None) -> Path:
    """A feature set by exact key, or by backbone name and the settings it states.

    ``name`` may carry options after a colon, any of: TTA, pooling, colour constancy, the
    image size ``HxW`` and ``w<sha8>`` of the weights, e.g. ``tf_efficientnet_lite0:flip``
    or ``tf_efficientnet_lite0:none,avg,168x224``. Among the sets it matches, one pinned by
    :func:`pinned_feature_sets` wins; otherwise a single match, or the only one without
    non-default TTA, pooling or colour constancy that nobody asked for.

    Raises:
        LesionLabError: no set matches, several match equally (the message lists each with
            the ``--features`` value that picks it), or an option is unknown.
    """
    root = features_dir(workdir)
    if (root / name / "manifest.json").exists():
        return root / name
    matches = _matching_sets(workdir, name, data_fp)
    if not matches:
        known = [p.name for p in find_feature_sets(workdir)]
        raise LesionLabError(
            f"no computed features match {name!r} under {root}; run "
            f"`python -m featurize --backbone {parse_block(name).source}` first "
            f"(found: {known or 'none'})")
    pinned = [m for m in matches if m[0].name in _PINNED.get()]
    matches = pinned or matches
    if len(matches) == 1:
        return matches[0][0]
    return _least_extra(name, matches)


def _least_extra(name: str, matches: list[tuple[Path, dict]]) -> Path:
    """The match with the fewest non-default settings ``name`` did not ask for.

    Raises:
        LesionLabError: a tie; the message lists the candidates and how to pick one.
    """
    words = parse_block(name).words

    def extra(item: tuple[Path, dict]) -> int:
        st = item[1]["settings"]
        return sum(v not in words and v != d for v, d in (
            (st["tta"], "none"), (st["pool"], "avg"),
            (st.get("color_constancy", "none"), "none")))

    ranked = sorted(matches, key=lambda it: (extra(it), it[0].name))
    tied = [it for it in ranked if extra(it) == extra(ranked[0])]
    if len(tied) == 1:
        return tied[0][0]
    specs = [feature_spec(m["settings"]) for _, m in tied]
    picks = specs if len(set(specs)) == len(specs) else [p.name for p, _ in tied]
    raise LesionLabError(
        f"{name!r} matches several feature sets: "
        + "; ".join(f"{p.name} (--features {pick})" for (p, _), pick in zip(tied, picks))
        + "; pick one with --features")
