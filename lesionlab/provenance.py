"""What code and which libraries made an artifact: recorded in every result JSON, model card
and feature manifest, so a stale result can be told from a fresh one.

``code_sha256`` hashes the source of the packages that shape results (``lesionlab/``,
``featurize/``, ``models/``); ``lock_sha256`` hashes ``requirements.lock`` (the tested set of
every dependency). Two artifacts with the same pair were made by the same code on the same
libraries, whatever the git commit says (a change to README or benchmarks/ leaves both alone).
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path
from typing import Any

from lesionlab.artifacts import library_versions

CODE_PACKAGES: tuple[str, ...] = ("lesionlab", "featurize", "models")
LOCK_FILE = "requirements.lock"
# what `git status` looks at to call a tree dirty: the code and what installs it
TRACKED_FOR_DIRTY: tuple[str, ...] = ("lesionlab", "featurize", "models", "benchmarks", "serve",
                                      "pyproject.toml", LOCK_FILE)
GIT_TIMEOUT_S = 10.0


def source_root() -> Path:
    """The folder holding the ``lesionlab`` package (the repository in a checkout)."""
    return Path(__file__).resolve().parents[1]


def code_sha256(root: Path | None = None) -> str:
    """sha256 of every ``*.py`` file of :data:`CODE_PACKAGES` (relative path and bytes)."""
    root = root or source_root()
    h = hashlib.sha256()
    for pkg in CODE_PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            h.update(path.relative_to(root).as_posix().encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def lock_sha256(root: Path | None = None) -> str | None:
    """sha256 of ``requirements.lock`` beside the packages; None where there is none (an
    install from pyproject.toml's ranges into one's own environment)."""
    path = (root or source_root()) / LOCK_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _git(root: Path, *args: str) -> str | None:
    """Output of one git command in ``root``; None without git, a checkout or in time."""
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=GIT_TIMEOUT_S, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state(root: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty): HEAD's sha and whether the code differs from it; (None, None) outside
    a git checkout. Untracked files under the code packages count as dirty."""
    root = root or source_root()
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return None, None
    status = _git(root, "status", "--porcelain", "--", *TRACKED_FOR_DIRTY)
    return commit, bool(status) if status is not None else None


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """The record every artifact carries (computed once per process).

    Keys: ``commit`` (str or None), ``dirty`` (bool or None), ``code_sha256``, ``lock_sha256``
    (str or None) and ``versions`` (python and the main libraries).
    """
    commit, dirty = git_state()
    return {"commit": commit, "dirty": dirty, "code_sha256": code_sha256(),
            "lock_sha256": lock_sha256(), "versions": library_versions()}


def same_code(recorded: dict | None, current: dict | None = None) -> bool:
    """True when ``recorded`` (an artifact's provenance) names the code and lock of
    ``current`` (default: this process's). A missing record is never the same code."""
    current = current or provenance()
    return bool(recorded) and all(recorded.get(k) == current[k]
                                  for k in ("code_sha256", "lock_sha256"))


def move_aside(path: Path, workdir: Path | str, record: dict | None) -> Path:
    """Rename ``path`` (an artifact made by other code) into
    ``<workdir>/stale/<its code sha256[:12] or "unknown">/``, never over an earlier copy (a
    numbered suffix is added), so a rerun starts clean and nothing is lost. Returns the new
    path."""
    dest_dir = Path(workdir) / "stale" / ((record or {}).get("code_sha256", "unknown")[:12])
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest, i = dest_dir / path.name, 1
    while dest.exists():
        dest, i = dest_dir / f"{path.name}.{i}", i + 1
    path.rename(dest)
    return dest


def short(record: dict | None) -> str:
    """``<commit[:10]>[+dirty]`` or ``code <sha[:10]>`` (no commit) or ``unknown``."""
    if not record:
        return "unknown (made before provenance was recorded)"
    if record.get("commit"):
        return record["commit"][:10] + ("+dirty" if record.get("dirty") else "")
    return f"code {record.get('code_sha256', '?')[:10]}"
