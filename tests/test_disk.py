"""Disks that refuse writes: read-only workdirs, full disks, temp files of killed writers.

Tests run as root in CI, where permission bits do not stop writes, so a read-only or full
disk is simulated in-process: the file-system calls lesionlab writes through (``os.mkdir``,
``os.open``, ``open``, ``os.replace``, ``os.posix_fallocate``, a file's ``write``) raise the
``OSError`` a real one raises, for paths under one folder only.
"""

from __future__ import annotations

import builtins
import errno
import importlib
import io
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lesionlab import artifacts
from lesionlab.artifacts import atomic_path, write_json
from lesionlab.cli import run_main
from tests.conftest import FIXTURE, ROOT

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class Disk:
    """Makes the folder ``root`` read-only (``code`` EROFS) or full (ENOSPC) in-process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path, code: int) -> None:
        self.root, self.code, self.mp = root.resolve(), code, monkeypatch
        self.full = code in (errno.ENOSPC, errno.EDQUOT)
        real = {name: getattr(os, name) for name in ("mkdir", "open", "replace", "rename",
                                                     "unlink", "posix_fallocate")}
        real_open = builtins.open

        def inside(path: Any) -> bool:
            if isinstance(path, int):
                return False
            return Path(os.path.abspath(os.fsdecode(path))).is_relative_to(self.root)

        def deny(path: Any) -> None:
            raise OSError(self.code, os.strerror(self.code), os.fsdecode(path))

        def mkdir(path, *a, **k):
            if inside(path) and not self.full:
                deny(path)
            return real["mkdir"](path, *a, **k)

        def os_open(path, flags, *a, **k):
            if inside(path) and flags & WRITE_FLAGS and not self.full:
                deny(path)
            return real["open"](path, flags, *a, **k)

        def move(name):
            def run(src, dst, *a, **k):
                if inside(dst) and not self.full:
                    deny(dst)
                return real[name](src, dst, *a, **k)
            return run

        def unlink(path, *a, **k):
            if inside(path) and not self.full:
                deny(path)
            return real["unlink"](path, *a, **k)

        def fallocate(fd, offset, length):
            if self.full:
                raise OSError(self.code, os.strerror(self.code))
            return real["posix_fallocate"](fd, offset, length)

        def py_open(file, mode="r", *a, **k):
            writing = any(c in mode for c in "wax+")
            if writing and not isinstance(file, int) and inside(file):
                if not self.full:
                    deny(file)
                return FullFile(real_open(file, mode, *a, **k), self.code)
            return real_open(file, mode, *a, **k)

        for name, fn in (("mkdir", mkdir), ("open", os_open), ("replace", move("replace")),
                         ("rename", move("rename")), ("unlink", unlink),
                         ("posix_fallocate", fallocate)):
            monkeypatch.setattr(os, name, fn)
        monkeypatch.setattr(builtins, "open", py_open)
        monkeypatch.setattr(io, "open", py_open)

    def free(self) -> None:
        """'Free space' / 'make writable': undo every patch."""
        self.mp.undo()


class FullFile:
    """A file on a full disk: opening works, writing any byte fails with ENOSPC."""

    def __init__(self, fh: Any, code: int) -> None:
        self._fh, self._code = fh, code

    def write(self, data: Any) -> int:
        if len(data):
            raise OSError(self._code, os.strerror(self._code))
        return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def __enter__(self) -> "FullFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._fh.close()

    def __iter__(self):
        return iter(self._fh)


def cli(module: str, *args: str, capsys) -> tuple[int, str]:
    """Run ``python -m module args`` in-process through ``run_main``: (exit code, stderr)."""
    mod = importlib.import_module(module + (".__main__" if module == "featurize" else ""))
    with pytest.raises(SystemExit) as stop:
        run_main(mod.main, list(args))
    return stop.value.code, capsys.readouterr().err


def temp_files(root: Path) -> list[Path]:
    """Every temp file (any naming) under ``root``."""
    return sorted(p for p in root.rglob("*.tmp"))


def assert_one_line(err: str, path_part: str, reason: str) -> None:
    """stderr ends in exactly one ``error: cannot write ...`` line and holds no traceback."""
    assert "Traceback" not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith("error: cannot write "), lines[0]
    assert path_part in lines[0] and reason in lines[0], lines[0]


@pytest.fixture
def workdir(trained_models, tmp_path: Path) -> Path:
    """A copy of the trained workdir (classical features, split, heads, a network)."""
    src = trained_models["head"].parent.parent
    dest = tmp_path / "runs"
    shutil.copytree(src, dest)
    return dest


def readonly_cases(w: Path, models: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """Each writing command, with inputs present so that it gets as far as writing."""
    data = ["--data", str(FIXTURE), "--workdir", str(w)]
    head, net = (w / "models" / models[k].name for k in ("head", "finetune"))
    image = str(next((FIXTURE / "images").glob("*.jpg")))
    tiny = ["--epochs", "1", "--image-size", "48", "64", "--batch-size", "16",
            "--num-workers", "0", "--n-boot", "20", "--tta", "none", "--seed", "5"]
    return [
        ("featurize", ["--backbone", "tf_efficientnet_lite0", "--image-size", "48", "64",
                       "--engine", "eager", "--num-workers", "0", *data]),
        ("featurize", ["--backbone", "classical", "--color-constancy", "shades_of_gray",
                       "--num-workers", "0", *data]),
        ("lesionlab.splits", ["--split-seed", "7", *data]),
        ("models.train_head", ["--features", "classical", "--trials", "1", "--folds", "2",
                               "--n-boot", "20", "--seed", "5", *data]),
        ("models.finetune", [*tiny, *data]),
        ("models.kfold", ["--cv-folds", "2", *tiny, *data]),
        ("models.ensemble", ["--members", str(head), str(w / "models" /
                             models["head_meta"].name), "--name", "ens", "--n-boot", "20",
                             *data]),
        ("models.evaluate", ["--model", str(head), "--data", str(FIXTURE), "--n-boot", "20",
                             "--out", str(w / "scores.json")]),
        ("models.explain", ["--model", str(net), image, "--out", str(w / "cams"),
                            "--device", "cpu"]),
        ("benchmarks.run_all", ["--preset", "smoke", "--no-download", *data]),
    ]


@pytest.mark.parametrize("case", range(10))
def test_readonly_workdir_gives_one_line(case: int, workdir: Path, trained_models,
                                         monkeypatch, capsys) -> None:
    module, args = readonly_cases(workdir, trained_models)[case]
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    Disk(monkeypatch, workdir, errno.EROFS)
    code, err = cli(module, *args, capsys=capsys)
    assert code == 2
    assert_one_line(err, str(workdir), "Read-only file system")
    assert ".tmp" not in err  # names what was asked for, not a temp file
    assert "writable --workdir" in err
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before


def test_full_disk_featurize_resumes(workdir: Path, tmp_path: Path, monkeypatch,
                                     capsys) -> None:
    w = tmp_path / "fresh"
    args = ["--backbone", "classical", "--num-workers", "0", "--chunk-size", "30",
            "--data", str(FIXTURE), "--workdir", str(w)]
    disk = Disk(monkeypatch, w, errno.ENOSPC)
    code, err = cli("featurize", *args, capsys=capsys)
    assert code == 2
    assert_one_line(err, "chunks/rows_00000000_00000030.npy", "No space left on device")
    assert "free some space" in err
    assert temp_files(w) == []
    disk.free()
    code, err = cli("featurize", *args, capsys=capsys)
    assert code == 0, err[-2000:]
    [entry] = (w / "features").glob("classical-*")
    expected = next((workdir / "features").glob("classical-*"))
    assert entry.name == expected.name
    np.testing.assert_array_equal(np.load(entry / "features.npy"),
                                  np.load(expected / "features.npy"))
    assert temp_files(w) == []


def _stop_after_chunks(w: Path) -> Path:
    """Compute every chunk of the classical features, then stop before assembling."""
    from featurize.extract import FeaturizeConfig, featurize
    from lesionlab.data import load_dataset

    def stop(i: int) -> None:
        if i == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        featurize(load_dataset(FIXTURE), w, FeaturizeConfig(
            backbone="classical", num_workers=0, chunk_size=30), on_chunk=stop)
    [entry] = (w / "features").glob("classical-*")
    return entry


def test_full_disk_at_assembly_says_mb_needed(workdir: Path, tmp_path: Path, monkeypatch,
                                              capsys) -> None:
    w = tmp_path / "fresh"
    entry = _stop_after_chunks(w)
    args = ["--backbone", "classical", "--num-workers", "0", "--chunk-size", "30",
            "--data", str(FIXTURE), "--workdir", str(w)]
    disk = Disk(monkeypatch, w, errno.ENOSPC)
    code, err = cli("featurize", *args, capsys=capsys)
    assert code == 2
    need = (128 + 87 * 75 * 4) / 1e6
    assert_one_line(err, str(entry / "features.npy"), f"{need:.2f} MB needed")
    assert "MB free" in err
    assert temp_files(w) == [] and len(list((entry / "chunks").iterdir())) == 3
    disk.free()
    assert cli("featurize", *args, capsys=capsys)[0] == 0
    expected = next((workdir / "features").glob("classical-*"))
    assert (entry / "features.npy").read_bytes() == (expected / "features.npy").read_bytes()


def test_featurize_checks_free_space_before_the_work(tmp_path: Path, monkeypatch,
                                                     capsys) -> None:
    w = tmp_path / "fresh"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(artifacts.shutil, "disk_usage",
                        lambda p: usage._replace(free=20_000))
    code, err = cli("featurize", "--backbone", "classical", "--num-workers", "0",
                    "--chunk-size", "30", "--data", str(FIXTURE), "--workdir", str(w),
                    capsys=capsys)
    assert code == 2
    assert_one_line(err, "classical-", "not enough disk space")
    needed = float(err.split("(")[-1].split(" MB needed")[0])
    assert needed == pytest.approx(2 * 87 * 75 * 4 / 1e6, abs=0.02)
    assert "0.02 MB free" in err
    [entry] = (w / "features").glob("classical-*")
    assert list((entry / "chunks").iterdir()) == []  # stopped before writing a chunk


def test_full_disk_train_head_resumes(workdir: Path, trained_models, monkeypatch,
                                      capsys) -> None:
    args = ["--features", "classical", "--trials", "1", "--folds", "2", "--n-boot", "20",
            "--data", str(FIXTURE), "--workdir", str(workdir)]
    folder = workdir / "models" / trained_models["head"].name
    shutil.rmtree(folder)
    disk = Disk(monkeypatch, workdir, errno.ENOSPC)
    code, err = cli("models.train_head", *args, capsys=capsys)
    assert code == 2
    assert_one_line(err, str(folder), "No space left on device")
    assert temp_files(workdir) == []
    disk.free()
    code, err = cli("models.train_head", *args, capsys=capsys)
    assert code == 0, err[-2000:]
    np.testing.assert_allclose(np.load(folder / "test_proba.npy"),
                               np.load(trained_models["head"] / "test_proba.npy"))


def test_full_disk_hidden_by_torch_save_is_named(workdir: Path, trained_models, monkeypatch,
                                                 capsys) -> None:
    """torch.save writes through C++ and raises RuntimeError; the full disk is still told."""
    import torch

    def failing_save(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")
    monkeypatch.setattr(torch, "save", failing_save)
    Disk(monkeypatch, workdir, errno.ENOSPC)
    code, err = cli("models.finetune", "--epochs", "1", "--image-size", "48", "64",
                    "--batch-size", "16", "--num-workers", "0", "--n-boot", "20", "--tta",
                    "none", "--train-fraction", "0.25", "--data", str(FIXTURE),
                    "--workdir", str(workdir), capsys=capsys)
    assert code == 2
    assert_one_line(err, "/checkpoint.pt: No space left on device", str(workdir / "models"))
    assert temp_files(workdir) == []


def test_other_errors_inside_a_write_are_unchanged(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bug"):
        with atomic_path(tmp_path / "x.json"):
            raise ValueError("bug")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC,
                                  errno.EDQUOT])
def test_run_main_turns_disk_errors_into_one_line(code: int, tmp_path: Path, capsys) -> None:
    dest = tmp_path / "out" / "card.json"

    def main(argv):
        raise OSError(code, os.strerror(code), str(dest))
    with pytest.raises(SystemExit) as stop:
        run_main(main, [])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith(f"error: cannot write {dest}: {os.strerror(code)} (")


def test_run_main_keeps_other_os_errors(capsys) -> None:
    def main(argv):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/nowhere")
    with pytest.raises(FileNotFoundError):
        run_main(main, [])


def test_run_main_names_a_full_sqlite_database(capsys) -> None:
    import sqlalchemy.exc

    db = sqlite3.connect(":memory:")
    db.execute("PRAGMA max_page_count = 2")
    db.execute("CREATE TABLE t (x TEXT)")
    with pytest.raises(sqlite3.OperationalError) as full:
        db.execute("INSERT INTO t VALUES (?)", ("x" * 100_000,))

    def main(argv):
        raise sqlalchemy.exc.OperationalError("INSERT", {}, full.value) from full.value
    with pytest.raises(SystemExit) as stop:
        run_main(main, [])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith("error: cannot write an SQLite database: database or disk is full")


KILLED_WRITER = """
import os, signal, sys
from lesionlab.artifacts import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGBUS)  # what writing a sparse memmap on a full disk does
"""

LIVE_WRITER = """
import sys
from lesionlab.artifacts import write_text, atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("theirs")
    print("ready", flush=True)
    sys.stdin.read()
"""


def test_a_rerun_removes_the_temp_file_of_a_killed_writer(tmp_path: Path) -> None:
    dest = tmp_path / "features.npy"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(dest)], cwd=ROOT)
    assert proc.returncode == -signal.SIGBUS
    [stale] = temp_files(tmp_path)
    assert stale.name.startswith(".features.npy.")
    write_json(tmp_path / "features.npy", {"ok": 1})
    assert temp_files(tmp_path) == [] and dest.read_text() == '{\n  "ok": 1\n}\n'


def test_the_temp_file_of_a_live_writer_is_left_alone(tmp_path: Path) -> None:
    dest = tmp_path / "card.json"
    other = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(dest)], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "ready\n"
        [theirs] = temp_files(tmp_path)
        write_json(dest, {"mine": 1})
        assert temp_files(tmp_path) == [theirs] and theirs.read_text() == "theirs"
    finally:
        other.communicate("", timeout=60)
    assert other.returncode == 0
    assert dest.read_text() == "theirs" and temp_files(tmp_path) == []


def test_featurize_rerun_after_sigbus_leaves_no_temp(workdir: Path, tmp_path: Path) -> None:
    """The issue's run: featurize killed by SIGBUS while writing features.npy, then rerun."""
    w = tmp_path / "fresh"
    entry = _stop_after_chunks(w)
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(entry / "features.npy")],
                          cwd=ROOT)
    assert proc.returncode == -signal.SIGBUS and len(temp_files(w)) == 1
    from featurize.extract import FeaturizeConfig, featurize
    from lesionlab.data import load_dataset

    fs = featurize(load_dataset(FIXTURE), w, FeaturizeConfig(
        backbone="classical", num_workers=0, chunk_size=30))
    assert temp_files(w) == []
    expected = next((workdir / "features").glob("classical-*"))
    np.testing.assert_array_equal(fs.features, np.load(expected / "features.npy"))
