"""Workdir layout and atomic artifact writes, so a killed run never leaves a half-written file.

Temporary files are named ``.<dest>.lltmp.<pid>.<host>.<token>.tmp`` and hold an exclusive
``flock`` for as long as their writer lives. A write removes its temp file on any failure; a
temp file whose writer died without cleaning up (SIGKILL, SIGBUS, power loss) is removed by the
next write into the same folder, once no process holds its lock. A temp file that another live
process is writing is never touched, and files with other names are never touched.

A write that fails because the disk is full or the folder is read-only raises ``OSError``
naming the destination (not the temp file); :func:`write_failure` turns such an error (also an
SQLite "database or disk is full") into the one line that ``lesionlab.cli.run_main`` prints.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import secrets
import shutil
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lesionlab.errors import LesionLabError, warn_once

DEFAULT_WORKDIR = "./runs"
log = logging.getLogger(__name__)

TEMP_TAG = "lltmp"
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
PROBE_BYTES = 1 << 20  # after a failed write: can 1 MiB more be reserved there?
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", platform.node())[:32] or "host"
_TEMP_RE = re.compile(rf"\.{TEMP_TAG}\.(\d+)\.([A-Za-z0-9_-]+)\.[0-9a-f]+\.tmp$")
_LEGACY_RE = re.compile(r"\.[a-z0-9_]{8}\.tmp$")  # tempfile.mkstemp names of older versions


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _remove_if_orphaned(path: Path) -> None:
    """Remove a temp file of ours whose writer is gone (no lock on it, pid dead here)."""
    match = _TEMP_RE.search(path.name)
    if match is None:
        return
    if match.group(2) == _HOST and _pid_alive(int(match.group(1))):
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # already gone, or not ours to read
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its writer still holds it (another machine on a shared folder)
            return
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # not ours to remove (a shared folder): leave it
            log.info("cannot remove %s, left by a writer that is gone: %s", path, exc.strerror)
            return
        log.info("removed %s, left by a writer that is gone", path)
    finally:
        os.close(fd)


def remove_stale_temps(folder: Path | str, dest_name: str | None = None) -> None:
    """Remove the temp files in ``folder`` that writers which have died left behind.

    Only files named by :func:`atomic_path` are considered, and only those no live process
    holds; ``dest_name`` also warns (once) about a leftover of an older lesionlab for that
    destination, whose owner cannot be told, so it is left for the user to remove.
    """
    folder = Path(folder)
    try:
        names = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    except OSError:
        return
    for path in names:
        if f".{TEMP_TAG}." in path.name:
            _remove_if_orphaned(path)
        elif (dest_name and path.name.startswith(f".{dest_name}.")
              and _LEGACY_RE.fullmatch(path.name[len(dest_name) + 1:])):
            warn_once(f"{path} looks like a temp file an older lesionlab left behind; remove "
                      f"it if no lesionlab process is running", key=f"legacy-temp:{path}")


def _new_temp(dest: Path) -> tuple[Path, int]:
    """Create and lock a fresh temp file beside ``dest``; (path, fd holding the lock)."""
    while True:
        tmp = dest.with_name(f".{dest.name[:100]}.{TEMP_TAG}.{os.getpid()}.{_HOST}."
                             f"{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits out a cleaner that saw it before it was locked
        try:
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return tmp, fd
        except FileNotFoundError:  # a cleaner removed it before the lock: take another name
            pass
        os.close(fd)


def _disk_full_probe(fd: int) -> OSError | None:
    """The ENOSPC/EDQUOT error that reserving :data:`PROBE_BYTES` more gives, or None."""
    try:
        os.posix_fallocate(fd, os.fstat(fd).st_size, PROBE_BYTES)
    except OSError as exc:
        return exc if exc.errno in DISK_FULL else None
    return None


def _naming(exc: BaseException, tmp: Path, dest: Path, fd: int) -> BaseException:
    """``exc`` raised while writing ``tmp``, as the error to show: naming ``dest``, and a
    full disk seen as such even where the writer (torch, a C++ stream) hid the ``OSError``."""
    if isinstance(exc, OSError):
        if exc.filename in (None, str(tmp)) and exc.errno is not None:
            return OSError(exc.errno, exc.strerror, str(dest))
        return exc
    if isinstance(exc, Exception) and not isinstance(exc, LesionLabError):
        full = _disk_full_probe(fd)
        if full is not None:
            return OSError(full.errno, full.strerror, str(dest))
    return exc


@contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """Yield a temp path beside ``dest``; on success it is renamed over ``dest`` atomically.

    The temp file is removed on any failure, and temp files that dead writers left in the
    folder are removed first (see the module docstring).

    Raises:
        OSError: the folder cannot be created or written (read-only, not ours, disk full or
            over quota); its ``filename`` is ``dest`` or the folder. Other exceptions of the
            body propagate unchanged, except one that a full disk caused (then ``OSError``
            ENOSPC naming ``dest``).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest.parent, dest.name)
    try:
        tmp_path, fd = _new_temp(dest)
    except OSError as exc:  # name what the user asked for, not the temp file
        raise OSError(exc.errno, exc.strerror, str(dest)) from exc
    try:
        try:
            yield tmp_path
        except BaseException as exc:
            shown = _naming(exc, tmp_path, dest, fd)
            if shown is exc:
                raise
            raise shown from exc
        try:
            os.replace(tmp_path, dest)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(dest)) from exc
    finally:
        tmp_path.unlink(missing_ok=True)
        os.close(fd)


def reserve(fh: Any, size: int, dest: Path | str) -> None:
    """Allocate ``size`` bytes for the open file ``fh`` now, so later writes cannot run out
    of space (and a memory map of it can never fault with SIGBUS).

    Raises:
        LesionLabError: not enough space: says how many MB are needed and how many are free.
    """
    try:
        os.posix_fallocate(fh.fileno(), 0, size)
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return  # no preallocation here; plain writes still fail cleanly
            raise
        os.ftruncate(fh.fileno(), 0)
        raise LesionLabError(
            f"cannot write {dest}: {exc.strerror} ({size / 1e6:.2f} MB needed, "
            f"{_free_mb(Path(dest).parent):.2f} MB free; free some space and rerun: finished "
            f"work is kept)") from None


def check_room(folder: Path | str, size: int, what: str) -> None:
    """Fail now, not hours later, when ``folder`` has less than ``size`` bytes free.

    Raises:
        LesionLabError: says how many MB ``what`` needs and how many are free.
    """
    free = shutil.disk_usage(_existing(Path(folder))).free
    if free < size:
        raise LesionLabError(
            f"cannot write {what}: not enough disk space ({size / 1e6:.2f} MB needed, "
            f"{free / 1e6:.2f} MB free; free some space and rerun: finished work is kept)")


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free_mb(path: Path) -> float:
    try:
        return shutil.disk_usage(_existing(path)).free / 1e6
    except OSError:
        return float("nan")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what caused it (``__cause__``, ``__context__``, SQLAlchemy's ``orig``)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__


def write_failure(exc: BaseException) -> str | None:
    """The one-line message for an error caused by an unwritable folder or a full disk.

    ``OSError`` with errno EROFS, EACCES, EPERM, ENOSPC or EDQUOT (on ``exc`` or what caused
    it), or SQLite's "database or disk is full" / "readonly database". None for anything
    else: other errors are bugs or failures a traceback helps with.
    """
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.errno in DISK_FULL | NOT_WRITABLE:
            return _os_message(cause)
        if isinstance(cause, sqlite3.OperationalError):
            name = getattr(cause, "sqlite_errorname", "")
            if name in ("SQLITE_FULL", "SQLITE_READONLY"):
                hint = _hint(errno.ENOSPC if name == "SQLITE_FULL" else errno.EROFS, None)
                return f"cannot write an SQLite database: {cause} ({hint})"
    return None


def _os_message(exc: OSError) -> str:
    path = exc.filename2 if exc.filename is None else exc.filename
    reason = exc.strerror or os.strerror(exc.errno)
    hint = _hint(exc.errno, Path(os.fsdecode(path)) if path is not None else None)
    if path is None:
        return f"cannot write to disk: {reason} ({hint})"
    where = Path(os.fsdecode(path))
    verb = "read" if where.exists() and not os.access(where, os.R_OK) else "write"
    return f"cannot {verb} {where}: {reason} ({hint})"


def _hint(code: int, path: Path | None) -> str:
    if code in DISK_FULL:
        free = f"{_free_mb(path):.2f} MB free there; " if path is not None else ""
        return (f"{free}free some space or point --workdir / --out elsewhere, then rerun: "
                f"finished work is kept")
    return "the folder is read-only or not yours: choose a writable --workdir / --out"


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
        try:  # who holds it, for the message of a waiting process; the flock is the lock
            fh.write(f"pid {os.getpid()} on {platform.node()}\n")
            fh.flush()
        except OSError as exc:  # a full disk: the writes of the locked work will say so
            log.debug("cannot note the holder in %s: %s", path, exc.strerror)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_text(dest: Path | str, text: str) -> None:
    """Write text atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def strict_json_value(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf; numpy's included) as None, numpy
    scalars and arrays as Python numbers and lists, and paths as strings.

    Strict JSON (RFC 8259) has no NaN or Infinity: Python's ``json`` would write bare ``NaN``,
    which other parsers refuse. An undefined metric is ``null`` instead.

    Raises:
        TypeError: a value JSON cannot hold (names its type).
    """
    if isinstance(obj, dict):
        return {k: strict_json_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json_value(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return strict_json_value(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def json_text(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (see :func:`strict_json_value`; NaN and inf as null)."""
    return json.dumps(strict_json_value(obj), indent=indent, allow_nan=False)


def write_json(dest: Path | str, obj: Any) -> None:
    """Write strict JSON atomically (numpy scalars and arrays allowed; NaN and inf as null)."""
    write_text(dest, json_text(obj) + "\n")


def read_json(path: Path | str) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_npy(dest: Path | str, array: np.ndarray) -> None:
    """Save a numpy array atomically.

    Args:
        dest: the ``.npy`` file to write.
        array: any shape and dtype, e.g. (n_images, dim) float32 features.
    """
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


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
