"""Shared fixtures: the small committed HAM10000 subset and the optional full copy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ham_small"
FULL = ROOT.parent / "shared" / "data" / "ham10000"
MAX_TEST_WORKERS = 4  # each worker holds its own torch, timm and session fixtures' models


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject's addopts): one pytest-xdist worker per CPU core, at most
    :data:`MAX_TEST_WORKERS` (more only multiply memory). In one process the suite keeps 1.2
    of 2 cores busy (interpreter, server and model start-up); two workers on a 2-core AMD
    EPYC ran it in 328 s against 429 s (README, "Run the tests"). ``-n 0``: one process."""
    import os

    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)  # the cores this process may use (Linux), else all
    return max(1, min(MAX_TEST_WORKERS, cores))


@pytest.fixture
def fixture_dir() -> Path:
    """The committed 87-image, 7-class fixture (read-only: copy before editing)."""
    return FIXTURE


@pytest.fixture
def data_copy(tmp_path: Path) -> Path:
    """A writable copy of the fixture folder."""
    dest = tmp_path / "ham"
    shutil.copytree(FIXTURE, dest)
    return dest


def needs_shared(path: Path, what: str) -> None:
    """Skip a test whose data from ``../shared`` (beside the repo) is absent; where
    ``LESIONLAB_REQUIRE_SHARED=1`` (CI, which always has it) its absence fails the test, so
    a moved folder cannot turn the tests on real inputs into silent skips."""
    import os

    if path.exists():
        return
    if os.environ.get("LESIONLAB_REQUIRE_SHARED") == "1":
        pytest.fail(f"{what} not present at {path} (LESIONLAB_REQUIRE_SHARED=1)")
    pytest.skip(f"{what} not present at {path}")


@pytest.fixture
def full_dir() -> Path:
    """The full HAM10000 copy beside the repo; tests using it skip where it is absent."""
    needs_shared(FULL / "HAM10000_metadata.csv", "full HAM10000 copy")
    return FULL


def run_cli(*args: str, cwd: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m ...`` like a user would; returns the finished process."""
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout)


def run_module(capsys: pytest.CaptureFixture, module: str,
               *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` without starting an interpreter (seconds each): the module's
    ``main`` through ``lesionlab.cli.run_main``, so its one-line errors and exit codes are the
    command's; its log lines go to stderr as a command's do (``run_main``'s
    ``logging.basicConfig``); stdout and stderr come from ``capsys``."""
    import importlib
    import logging

    from lesionlab.cli import run_main
    from lesionlab.errors import flush_warnings

    mod = importlib.import_module(module)  # a package runs as its __main__ (featurize, serve)
    main = getattr(mod, "main", None) or importlib.import_module(module + ".__main__").main
    flush_warnings()  # warnings counted by earlier tests in this process are not the command's
    capsys.readouterr()  # what the test printed before is not the command's
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # capsys's stderr, as it is now
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with pytest.raises(SystemExit) as exited:
            run_main(main, list(args))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    out, err = capsys.readouterr()
    code = exited.value.code
    return subprocess.CompletedProcess([module, *args], code if isinstance(code, int) else 1,
                                       out, err)


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory) -> dict[str, Path]:
    """Small models trained once on the fixture: heads with and without metadata, a network."""
    from featurize.extract import FeaturizeConfig, featurize
    from lesionlab.data import load_dataset
    from models.finetune import FinetuneConfig, finetune
    from models.train_head import HeadConfig, train_head

    work = tmp_path_factory.mktemp("trained")
    ds = load_dataset(FIXTURE)
    featurize(ds, work, FeaturizeConfig(backbone="classical", num_workers=0))
    cards = {
        "head_meta": train_head(ds, work, HeadConfig(features="classical", metadata=True,
                                                     trials=1, folds=2, n_boot=20)),
        "head": train_head(ds, work, HeadConfig(features="classical", trials=1, folds=2,
                                                n_boot=20)),
        "finetune": finetune(ds, work, FinetuneConfig(epochs=1, image_size=(48, 64),
                                                      batch_size=16, num_workers=0,
                                                      n_boot=20, tta="none")),
    }
    return {kind: work / "models" / card.name for kind, card in cards.items()}
