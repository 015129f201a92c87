"""Option ranges (argparse and configs built in Python) and bounded connections to services.

Every numeric option has a range checked at parse time (one ``error:`` line, exit 2, before any
data or model is read). Optuna storages and Dask schedulers that cannot be used end in one line
naming them, also when the peer is not that kind of service or accepts and never answers: the
throw-away servers here listen on 127.0.0.1 only.
"""

from __future__ import annotations

import dataclasses
import importlib
import socket
import threading
import time
import typing
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from lesionlab.cli import check_choices, run_main
from lesionlab.errors import LesionLabError
from tests.conftest import FIXTURE


def cli(module: str, *args: str, capsys) -> tuple[int, list[str]]:
    """Run ``module``'s main through ``run_main`` as ``python -m`` does: (exit code, stderr lines)."""
    mod = importlib.import_module(module + ".__main__" if module in ("serve", "featurize")
                                  else module)
    with pytest.raises(SystemExit) as exit_info:
        run_main(mod.main, list(args))
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


# -- 1. ranges ------------------------------------------------------------------------------

SERVE = "error: argument --{flag}: must be {range}, got {value} (see python -m serve --help)"


@pytest.mark.parametrize("flag, value, shown, bounds", [
    ("threads", "0", "0", "in [1, 256]"),
    ("threads", "-1", "-1", "in [1, 256]"),
    ("port", "70000", "70000", "in [1, 65535]"),
    ("port", "0", "0", "in [1, 65535]"),
    ("max-mb", "0", "0.0", "in (0, 1024]"),
    ("max-mb", "-1", "-1.0", "in (0, 1024]"),
])
def test_serve_flags_out_of_range_fail_in_argparse(flag: str, value: str, shown: str,
                                                   bounds: str, tmp_path: Path,
                                                   capsys) -> None:
    code, err = cli("serve", "--model", str(tmp_path / "no_model"), f"--{flag}", value,
                    capsys=capsys)
    assert code == 2
    assert err == [SERVE.format(flag=flag, range=bounds, value=shown)]


def test_serve_non_finite_size_is_refused(tmp_path: Path, capsys) -> None:
    code, err = cli("serve", "--model", str(tmp_path / "m"), "--max-mb", "inf", capsys=capsys)
    assert code == 2
    assert err == ["error: argument --max-mb: must be a finite number in (0, 1024], got inf "
                   "(see python -m serve --help)"]


@pytest.mark.parametrize("module, args, message", [
    ("models.train_head", ["--features", "classical", "--trials", "0"],
     "argument --trials: must be >= 1, got 0"),
    ("models.train_head", ["--features", "classical", "--folds", "1"],
     "argument --folds: must be >= 2, got 1"),
    ("models.train_head", ["--features", "classical", "--train-fraction", "0"],
     "argument --train-fraction: must be in (0, 1], got 0.0"),
    ("models.train_head", ["--features", "classical", "--train-fraction", "1.5"],
     "argument --train-fraction: must be in (0, 1], got 1.5"),
    ("models.train_head", ["--features", "classical", "--seed", "-1"],
     "argument --seed: must be in [0, 4294967295], got -1"),
    ("models.train_head", ["--features", "classical", "--tune-timeout", "0"],
     "argument --tune-timeout: must be > 0, got 0.0"),
    ("models.train_head", ["--features", "classical", "--n-boot", "-5"],
     "argument --n-boot: must be >= 0, got -5"),
    ("featurize", ["--backbone", "classical", "--batch-size", "0"],
     "argument --batch-size: must be >= 1, got 0"),
    ("featurize", ["--backbone", "classical", "--num-workers", "-1"],
     "argument --num-workers: must be >= 0, got -1"),
    ("featurize", ["--backbone", "classical", "--image-size", "0", "224"],
     "argument --image-size: must be >= 1, got 0"),
    ("models.finetune", ["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    ("models.finetune", ["--drop-rate", "1"], "argument --drop-rate: must be in [0, 1), got 1.0"),
    ("models.finetune", ["--lr", "-0.1"], "argument --lr: must be > 0, got -0.1"),
    ("models.finetune", ["--patience", "0"], "argument --patience: must be >= 1, got 0"),
    ("models.finetune", ["--label-smoothing", "nan"],
     "argument --label-smoothing: must be a finite number in [0, 1), got nan"),
])
def test_config_flags_out_of_range_fail_in_argparse(module: str, args: list[str], message: str,
                                                    tmp_path: Path, capsys) -> None:
    code, err = cli(module, *args, "--data", str(tmp_path / "nowhere"), "--workdir",
                    str(tmp_path / "w"), capsys=capsys)
    assert code == 2
    assert err == [f"error: {message} (see python -m {module} --help)"]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("module, args, message", [
    ("lesionlab.splits", ["--split-seed", "-3"],
     "argument --split-seed: must be in [0, 4294967295], got -3"),
    ("lesionlab.download", ["--http-timeout", "0"], "argument --http-timeout: must be > 0, got 0.0"),
    ("models.evaluate", ["--model", "m", "--data", "d", "--n-boot", "-1"],
     "argument --n-boot: must be >= 0, got -1"),
    ("models.ensemble", ["--members", "a", "b", "--name", "e", "--n-boot", "-1"],
     "argument --n-boot: must be >= 0, got -1"),
])
def test_hand_built_flags_out_of_range_fail_in_argparse(module: str, args: list[str],
                                                        message: str, capsys) -> None:
    code, err = cli(module, *args, capsys=capsys)
    assert code == 2
    assert err == [f"error: {message} (see python -m {module} --help)"]


def _configs() -> list[type]:
    from featurize.extract import FeaturizeConfig
    from models.finetune import FinetuneConfig
    from models.train_head import HeadConfig
    from serve.app import ServeConfig

    return [FeaturizeConfig, HeadConfig, FinetuneConfig, ServeConfig]


def test_every_numeric_option_has_a_range() -> None:
    missing = []
    for cls in _configs():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            text = str(hints[f.name])
            numeric = any(t in text for t in ("int", "float")) and "bool" not in text
            if numeric and f.metadata.get("range") is None:
                missing.append(f"{cls.__name__}.{f.name}")
    assert missing == []


@pytest.mark.parametrize("build, message", [
    (lambda: __import__("models.train_head", fromlist=["x"]).HeadConfig(
        features="classical", trials=0), "--trials must be >= 1, got 0"),
    (lambda: __import__("models.finetune", fromlist=["x"]).FinetuneConfig(
        train_fraction=0.0), "--train-fraction must be in (0, 1], got 0.0"),
    (lambda: __import__("featurize.extract", fromlist=["x"]).FeaturizeConfig(
        backbone="classical", image_size=(150, -2)), "--image-size must be >= 1, got -2"),
    (lambda: __import__("featurize.extract", fromlist=["x"]).FeaturizeConfig(
        backbone="classical", num_workers=-1), "--num-workers must be >= 0, got -1"),
])
def test_configs_built_in_python_are_range_checked(build, message: str) -> None:
    with pytest.raises(LesionLabError) as exc:
        check_choices(build())
    assert str(exc.value) == message


@pytest.mark.parametrize("kwargs, message", [
    ({"threads": 0}, "--threads must be in [1, 256], got 0"),
    ({"threads": -1}, "--threads must be in [1, 256], got -1"),
    ({"max_mb": 0}, "--max-mb must be in (0, 1024], got 0"),
])
def test_create_app_refuses_a_pool_or_limit_that_can_never_serve(kwargs: dict, message: str,
                                                                 tmp_path: Path) -> None:
    from serve.app import create_app

    with pytest.raises(LesionLabError) as exc:  # before the (missing) model folder is read
        create_app(tmp_path / "no_model", **kwargs)
    assert str(exc.value) == message


class FakePredictor:
    """Stands in for a model folder: records the files it was given, predicts ``bcc``."""

    def __init__(self, model_dir: Path | str, device: str) -> None:
        self.card = type("Card", (), {"mel_threshold": None, "name": "fake",
                                      "prevalence_map": None,
                                      "classes": ["akiec", "bcc", "bkl", "df", "mel", "nv",
                                                  "vasc"]})()
        self.cam = None
        self.paths: list[str] = []

    def predict_proba(self, paths: list[str], meta) -> np.ndarray:
        from lesionlab.data import load_rgb

        self.paths.extend(paths)
        assert load_rgb(paths[0]).size == (200, 150)
        return np.array([[0.1, 0.4, 0.1, 0.1, 0.1, 0.1, 0.1]])

    def prevalence_proba(self, proba: np.ndarray) -> None:
        return None  # an uncalibrated card (models.calibrate not run)


@pytest.mark.parametrize("name", ["x." + "a" * 300, "lesion.jpg/..", "a" * 300, ".." * 200])
def test_upload_filename_does_not_matter(name: str, monkeypatch) -> None:
    from fastapi.testclient import TestClient

    import serve.app

    monkeypatch.setattr(serve.app, "Predictor", FakePredictor)
    app = serve.app.create_app("unused")
    client = TestClient(app, raise_server_exceptions=False)
    data = sorted((FIXTURE / "images").glob("*.jpg"))[0].read_bytes()
    res = client.post("/api/predict", files={"image": (name, data, "image/jpeg")})
    assert res.status_code == 200, res.text
    assert res.json()["prediction"] == "bcc" and res.json()["path"] == name
    used = app.state.service.predictor.paths
    assert len(used) == 1 and used[0].endswith(serve.app.UPLOAD_SUFFIX)


# -- 2. external services -------------------------------------------------------------------

@pytest.fixture
def tcp_server(request) -> Iterator[int]:
    """A throw-away TCP server on 127.0.0.1: ``garbage`` answers with HTTP bytes at once,
    ``silent`` accepts and never sends anything. Yields its port."""
    mode = request.param
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            conns.append(conn)
            if mode == "garbage":
                try:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello" * 8)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    stop.set()
    thread.join(2)
    for conn in conns:
        conn.close()
    srv.close()


def _within(seconds: float, fn, *args, **kwargs) -> BaseException | None:
    """Run ``fn`` in a daemon thread; the exception it raised, failing the test past ``seconds``."""
    box: list[BaseException | None] = []

    def target() -> None:
        try:
            fn(*args, **kwargs)
            box.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert box, f"still waiting after {seconds} s"
    return box[0]


def test_journal_storage_in_a_folder_that_cannot_be_made(tmp_path: Path) -> None:
    from models.train_head import make_storage

    with pytest.raises(LesionLabError) as exc:
        make_storage("journal:///proc/x/s.log", tmp_path)
    assert str(exc.value) == ("cannot use journal storage journal:///proc/x/s.log: "
                              "No such file or directory: /proc/x")


def test_journal_storage_in_a_file_not_a_folder(tmp_path: Path) -> None:
    from models.train_head import make_storage

    (tmp_path / "f").write_text("x")
    with pytest.raises(LesionLabError) as exc:
        make_storage(f"journal://{tmp_path}/f/s.log", tmp_path)
    assert str(exc.value).startswith(f"cannot use journal storage journal://{tmp_path}/f/s.log: ")
    assert "\n" not in str(exc.value)


def test_journal_storage_error_is_one_cli_line(tmp_path: Path, capsys) -> None:
    """Through ``run_main``, as every CLI: no FileNotFoundError traceback, exit 2."""
    from models.train_head import make_storage

    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda argv: make_storage("journal:///proc/x/s.log", tmp_path) and 0, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: cannot use journal storage journal:///proc/x/s.log: "
        "No such file or directory: /proc/x"]


@pytest.mark.parametrize("tcp_server, why", [
    ("garbage", "received invalid response to SSL negotiation"),
    ("silent", "timeout expired"),
], indirect=["tcp_server"])
def test_rdb_storage_that_is_not_postgres(tcp_server: int, why: str, tmp_path: Path) -> None:
    pytest.importorskip("psycopg2")
    from models.train_head import make_storage

    url = f"postgresql+psycopg2://user:secret@127.0.0.1:{tcp_server}/db"
    start = time.monotonic()
    exc = _within(20, make_storage, url, tmp_path, timeout=1)
    assert time.monotonic() - start < 10
    assert isinstance(exc, LesionLabError)
    prefix = (f"cannot open Optuna storage postgresql+psycopg2://user:***@127.0.0.1:"
              f"{tcp_server}/db: ")
    assert str(exc).startswith(prefix) and why in str(exc) and "\n" not in str(exc)


def test_rdb_storage_url_that_is_not_a_url(tmp_path: Path) -> None:
    from models.train_head import make_storage

    with pytest.raises(LesionLabError) as exc:
        make_storage("postgres-at-home", tmp_path)
    assert str(exc.value) == ("cannot open Optuna storage 'postgres-at-home': not a SQLAlchemy "
                              "URL (dialect://user@host/db) or journal:///path/file.log")


@pytest.mark.parametrize("tcp_server, message", [
    ("garbage", "tcp://127.0.0.1:{port} is not a Dask scheduler: its reply is not the Dask "
                "protocol (MemoryError)"),
    ("silent", "the Dask scheduler tcp://127.0.0.1:{port} did not answer within 1 s"),
], indirect=["tcp_server"])
def test_dask_scheduler_that_is_not_dask(tcp_server: int, message: str) -> None:
    pytest.importorskip("distributed")
    from featurize.cluster import dask_client

    def connect() -> None:
        with dask_client(f"tcp://127.0.0.1:{tcp_server}", timeout=1):
            pass

    start = time.monotonic()
    exc = _within(20, connect)
    assert time.monotonic() - start < 10
    assert isinstance(exc, LesionLabError) and str(exc) == message.format(port=tcp_server)


@pytest.mark.parametrize("tcp_server", ["garbage", "silent"], indirect=True)
def test_featurize_cli_on_a_scheduler_that_is_not_dask(tcp_server: int, tmp_path: Path,
                                                       capsys) -> None:
    """The featurize command: exit 2 and one line, within Dask's connect timeout (1 s here)."""
    pytest.importorskip("distributed")
    import dask

    start = time.monotonic()
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        code, err = cli("featurize", "--backbone", "classical", "--num-workers", "0",
                        "--scheduler", f"tcp://127.0.0.1:{tcp_server}", "--data", str(FIXTURE),
                        "--workdir", str(tmp_path / "w"), capsys=capsys)
    assert code == 2 and time.monotonic() - start < 30
    lines = [ln for ln in err if "img/s]" not in ln]  # the progress bar may show 0%
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    assert f"tcp://127.0.0.1:{tcp_server}" in lines[0]
