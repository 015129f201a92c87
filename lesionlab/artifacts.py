"""Workdir layout and atomic artifact writes, so a killed run never leaves a half-written file."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

DEFAULT_WORKDIR = "./runs"
log = logging.getLogger(__name__)


@contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """Yield a temp path beside ``dest``; on success it is renamed over ``dest`` atomically."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def exclusive_lock(path: Path | str, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed); wait, saying who holds it.

    Two processes filling one cache entry would overwrite each other's chunks; the second one
    waits here until the first is done, then finds the finished entry.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            log.warning("%s is being written by %s; waiting for it to finish", what, holder)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {platform.node()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_text(dest: Path | str, text: str) -> None:
    """Write text atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(dest: Path | str, obj: Any) -> None:
    """Write JSON atomically (numpy scalars and arrays allowed)."""
    write_text(dest, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: Path | str) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_npy(dest: Path | str, array: np.ndarray) -> None:
    """Save a numpy array atomically."""
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape results, for manifests and model cards."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("lesionlab", "numpy", "pandas", "scikit-learn", "torch", "torchvision", "timm", "lightgbm",
                "imbalanced-learn", "optuna", "pillow", "scikit-image", "onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def splits_dir(workdir: Path | str) -> Path:
    """``<workdir>/splits``."""
    return Path(workdir) / "splits"


def features_dir(workdir: Path | str) -> Path:
    """``<workdir>/features``."""
    return Path(workdir) / "features"


def models_dir(workdir: Path | str) -> Path:
    """``<workdir>/models``."""
    return Path(workdir) / "models"
