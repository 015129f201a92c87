"""The cached, resumable extraction loop: images -> ``<workdir>/features/<key>/``.

A cache entry holds ``features.npy`` (float32, N x F), ``index.csv`` (image_id order) and
``manifest.json`` (settings, weights sha256, data fingerprint, versions, timing). The manifest is
written last, so an entry without one is incomplete. Work proceeds in chunks written atomically
under ``chunks/``; a killed run resumes from the last complete chunk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset
from tqdm import tqdm

from featurize.backbones import (CLASSICAL, BackboneSpec, Embedder, create_backbone,
                                 default_image_size, sha256_file, weights_file)
from featurize.classical import FEATURE_NAMES, classical_features
from lesionlab.artifacts import (atomic_path, features_dir, library_versions, read_json,
                                 save_npy, write_json)
from lesionlab.data import Dataset, frame_fingerprint, load_rgb
from lesionlab.errors import LesionLabError

log = logging.getLogger(__name__)

TTA_MODES = ("none", "flip", "d4")
POOL_MODES = ("avg", "multistage")
ENGINES = ("auto", "eager", "onnx")


@dataclass
class FeaturizeConfig:
    """Settings of one extraction; all but the runtime ones enter the cache key."""

    backbone: str
    image_size: tuple[int, int] | None = None  # (H, W); None: the backbone's default
    tta: str = "none"
    pool: str = "avg"
    weights: str | None = None
    # runtime only (do not change the numbers beyond float tolerance):
    batch_size: int = 64
    device: str = "auto"
    engine: str = "auto"
    num_workers: int = 1
    chunk_size: int = 1024

    def validate(self) -> None:
        """Reject unknown option values with a message naming them."""
        if self.tta not in TTA_MODES:
            raise LesionLabError(f"unknown --tta {self.tta!r}; expected one of {TTA_MODES}")
        if self.pool not in POOL_MODES:
            raise LesionLabError(f"unknown --pool {self.pool!r}; expected one of {POOL_MODES}")
        if self.engine not in ENGINES:
            raise LesionLabError(f"unknown --engine {self.engine!r}; expected one of {ENGINES}")
        if self.backbone == CLASSICAL and (self.tta != "none" or self.pool != "avg"):
            raise LesionLabError("the classical backbone takes no --tta or --pool options")

    def size(self) -> tuple[int, int]:
        """(H, W) actually used."""
        return tuple(self.image_size) if self.image_size else default_image_size(self.backbone)


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LesionLabError("--device cuda asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise LesionLabError(f"unknown --device {device!r}; expected auto, cpu or cuda")
    return torch.device(device)


class ImageFolderSet(TorchDataset):
    """Decodes and resizes images in DataLoader workers; returns (tensor or vector, index)."""

    def __init__(self, paths: Sequence[str], size: tuple[int, int], mean: Sequence[float],
                 std: Sequence[float], classical: bool = False) -> None:
        self.paths = list(paths)
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.classical = classical

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = load_rgb(self.paths[i])
        if self.classical:
            return torch.from_numpy(classical_features(img, self.size)), i
        return eval_tensor(img, self.size, self.mean, self.std), i


def eval_tensor(img, size: tuple[int, int], mean: torch.Tensor,
                std: torch.Tensor) -> torch.Tensor:
    """Deterministic eval transform: bicubic resize to (H, W), scale to [0,1], normalise."""
    from PIL import Image

    img = img.resize((size[1], size[0]), Image.BICUBIC)
    arr = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    return (arr - mean) / std


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The batch under each test-time view: identity, + h-flip, or the 8 dihedral transforms."""
    if mode == "none":
        return [x]
    if mode == "flip":
        return [x, x.flip(3)]
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
        import warnings

        import onnxruntime as ort

        self._tmp = tempfile.mkdtemp(prefix="lesionlab-onnx-")
        path = os.path.join(self._tmp, "embedder.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(self.embedder, (example,), path, input_names=["x"],
                              output_names=["y"], opset_version=17, dynamo=False,
                              dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "y": {0: "b"}})
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

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
        self.cfg = cfg
        self.size = cfg.size()
        self.device = resolve_device(cfg.device)
        if cfg.backbone == CLASSICAL:
            self.spec = BackboneSpec(name=CLASSICAL, image_size=self.size, mean=(0, 0, 0),
                                     std=(1, 1, 1), weights_source="scikit-image features",
                                     weights_sha256=_classical_code_hash())
            self.runner = None
        else:
            model, self.spec = create_backbone(cfg.backbone, cfg.weights)
            example = torch.zeros(2, 3, *self.size)
            self.runner = Runner(Embedder(model, cfg.pool), self.device, cfg.engine, example)

    @property
    def engine(self) -> str:
        """Which engine runs the model ('features' for classical)."""
        return self.runner.engine if self.runner else "features"

    def loader(self, paths: Sequence[str]) -> DataLoader:
        """A DataLoader decoding ``paths`` in workers, order preserved."""
        ds = ImageFolderSet(paths, self.size, self.spec.mean, self.spec.std,
                            classical=self.runner is None)
        workers = self.cfg.num_workers
        return DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=False,
                          num_workers=workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=False, prefetch_factor=4 if workers else None)

    def embed_batch(self, x: torch.Tensor) -> np.ndarray:
        """Embeddings of one preprocessed batch, averaged over the TTA views."""
        if self.runner is None:
            return x.numpy().astype(np.float32)
        outs = [self.runner(v.contiguous()) for v in tta_views(x, self.cfg.tta)]
        return np.mean(outs, axis=0).astype(np.float32)

    def embed_paths(self, paths: Sequence[str], progress: bool = False) -> np.ndarray:
        """Embeddings of ``paths`` (no cache): used by predict on new images."""
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
    return (f"{cfg.backbone}-{h}x{w}-{cfg.tta}-{cfg.pool}-w{weights_sha256[:8]}"
            f"-d{data_fp[:8]}")


@dataclass
class FeatureSet:
    """A completed cache entry, loaded."""

    key: str
    path: Path
    features: np.ndarray
    image_ids: np.ndarray
    manifest: dict


def load_feature_set(path: Path | str) -> FeatureSet:
    """Load a completed cache entry (its manifest must exist)."""
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
              on_chunk: Callable[[int], None] | None = None) -> FeatureSet:
    """Compute (or reuse) the cached features of every image in ``dataset``."""
    cfg.validate()
    frame = dataset.frame
    data_fp = frame_fingerprint(frame)
    known = _weights_sha_without_model(cfg)
    if known is not None:  # a cache hit then costs no model load or graph export
        hit = _cached(features_dir(workdir) / cache_key(cfg, known, data_fp))
        if hit is not None:
            return hit
    extractor = Extractor(cfg)
    try:
        key = cache_key(cfg, extractor.spec.weights_sha256, data_fp)
        out = features_dir(workdir) / key
        hit = _cached(out)
        return hit if hit is not None else _extract(frame, out, key, cfg, extractor, data_fp,
                                                    on_chunk)
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


def _chunk_bounds(n: int, size: int) -> Iterator[tuple[int, int, int]]:
    for i, start in enumerate(range(0, n, size)):
        yield i, start, min(n, start + size)


def _extract(frame: pd.DataFrame, out: Path, key: str, cfg: FeaturizeConfig,
             extractor: Extractor, data_fp: str,
             on_chunk: Callable[[int], None] | None) -> FeatureSet:
    chunks = out / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    for stale in chunks.glob(".*.tmp"):
        stale.unlink()
    paths = frame["path"].tolist()
    n = len(paths)
    bounds = list(_chunk_bounds(n, cfg.chunk_size))
    done = {i for i, s, e in bounds if _read_chunk(chunks / f"{i:05d}.npy", e - s) is not None}
    todo = [(i, s, e) for i, s, e in bounds if i not in done]
    resumed = sum(e - s for i, s, e in bounds if i in done)
    if resumed:
        log.info("resuming %s: %d of %d images already done", key, resumed, n)
    t0 = time.perf_counter()
    computed = 0
    with tqdm(total=n, initial=resumed, unit="img", desc=cfg.backbone, smoothing=0.1) as bar:
        for i, s, e in todo:
            parts = []
            for x, _ in extractor.loader(paths[s:e]):
                parts.append(extractor.embed_batch(x))
                bar.update(len(x))
            save_npy(chunks / f"{i:05d}.npy", np.concatenate(parts))
            computed += e - s
            if on_chunk is not None:
                on_chunk(i)
    wall = time.perf_counter() - t0
    dim = _read_chunk(chunks / "00000.npy", bounds[0][2]).shape[1]
    with atomic_path(out / "features.npy") as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        for i, s, e in bounds:
            mm[s:e] = _read_chunk(chunks / f"{i:05d}.npy", e - s)
        mm.flush()
        del mm
    with atomic_path(out / "index.csv") as tmp:
        frame[["image_id"]].to_csv(tmp, index=False)
    manifest = {
        "key": key,
        "settings": {k: v for k, v in asdict(cfg).items()
                     if k in ("backbone", "tta", "pool", "weights")} | {
            "image_size": list(cfg.size())},
        "runtime": {"engine": extractor.engine, "device": str(extractor.device),
                    "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
                    "torch_threads": torch.get_num_threads()},
        "weights_source": extractor.spec.weights_source,
        "weights_sha256": extractor.spec.weights_sha256,
        "mean": list(extractor.spec.mean), "std": list(extractor.spec.std),
        "data_fingerprint": data_fp,
        "n_images": n, "dim": int(dim),
        "feature_names": FEATURE_NAMES if cfg.backbone == CLASSICAL else None,
        "wall_time_s": round(wall, 2),
        "images_per_s": round(computed / wall, 2) if wall > 0 and computed else None,
        "resumed_images": resumed,
        "versions": library_versions(),
    }
    write_json(out / "manifest.json", manifest)
    shutil.rmtree(chunks, ignore_errors=True)
    log.info("features written: %s (%d x %d, %.1f img/s)", out, n, dim,
             manifest["images_per_s"] or 0.0)
    return load_feature_set(out)


def find_feature_sets(workdir: Path | str) -> list[Path]:
    """Completed cache entries under ``<workdir>/features``."""
    root = features_dir(workdir)
    return sorted(p.parent for p in root.glob("*/manifest.json")) if root.exists() else []


def resolve_key(workdir: Path | str, name: str, data_fp: str | None = None) -> Path:
    """A feature set by exact key, or by backbone name (default settings preferred).

    ``name`` may carry options after a colon: ``tf_efficientnet_lite0:multistage`` or
    ``tf_efficientnet_lite0:flip``.
    """
    root = features_dir(workdir)
    if (root / name / "manifest.json").exists():
        return root / name
    backbone, _, opts = name.partition(":")
    wanted = set(filter(None, opts.split(",")))
    matches = []
    for path in find_feature_sets(workdir):
        man = read_json(path / "manifest.json")
        st = man["settings"]
        if st["backbone"] != backbone or (data_fp and man["data_fingerprint"] != data_fp):
            continue
        if wanted - {st["tta"], st["pool"]}:
            continue
        matches.append((path, st))
    if not matches:
        known = [p.name for p in find_feature_sets(workdir)]
        raise LesionLabError(
            f"no computed features match {name!r} under {root}; run "
            f"`python -m featurize --backbone {backbone}` first (found: {known or 'none'})")
    if len(matches) == 1:
        return matches[0][0]
    def extra(item: tuple[Path, dict]) -> int:  # non-default settings nobody asked for
        st = item[1]
        return sum(v not in wanted and v != d for v, d in ((st["tta"], "none"),
                                                            (st["pool"], "avg")))
    ranked = sorted(matches, key=lambda it: (extra(it), it[0].name))
    best = ranked[0]
    if extra(ranked[1]) == extra(best):
        raise LesionLabError(
            f"{name!r} matches several feature sets {[p.name for p, _ in matches]}; "
            f"name one by its key")
    return best[0]
