"""Workdir layout and atomic artifact writes, so a killed run never leaves a half-written file."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

DEFAULT_WORKDIR = "./runs"


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
    for pkg in ("lesionlab", "numpy", "pandas", "scikit-learn", "torch", "timm", "lightgbm",
                "imbalanced-learn", "optuna", "pillow", "scikit-image"):
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
