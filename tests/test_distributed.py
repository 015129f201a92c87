"""Past one machine, on loopback: shared Optuna studies (PostgreSQL, journal file)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from featurize.extract import FeaturizeConfig, featurize
from lesionlab.data import load_dataset
from models.bundle import load_card
from models.train_head import FINISHED, HeadConfig, make_storage, train_head
from tests import pg_server
from tests.conftest import FIXTURE, ROOT


@pytest.fixture(scope="session")
def pg_url():
    """$LESIONLAB_TEST_PG_URL, else a throw-away PostgreSQL 15 started here."""
    pytest.importorskip("psycopg2", reason="install the [distributed] extra for PostgreSQL")
    url = os.environ.get("LESIONLAB_TEST_PG_URL")
    if url:
        yield url
        return
    reason = pg_server.available()
    if reason:
        pytest.skip(f"LESIONLAB_TEST_PG_URL is unset and no server can be started: {reason}")
    root = Path(tempfile.mkdtemp(prefix="lesionlab-pg-"))
    url = pg_server.start(root)
    yield url
    pg_server.stop(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def featurized(tmp_path_factory) -> Path:
    """A workdir with the fixture's classical features, made once for this file."""
    work = tmp_path_factory.mktemp("featurized")
    featurize(load_dataset(FIXTURE), work, FeaturizeConfig(backbone="classical",
                                                           num_workers=0))
    return work


@pytest.fixture
def workdir(featurized: Path, tmp_path: Path) -> Path:
    """A fresh copy of ``featurized`` for one test."""
    shutil.copytree(featurized, tmp_path, dirs_exist_ok=True)
    return tmp_path


def _workers(workdir: Path, storage: str, study: str, n: int = 2, trials: int = 6) -> None:
    cmd = [sys.executable, "-m", "models.train_head", "--features", "classical", "--folds",
           "2", "--trials", str(trials), "--n-boot", "20", "--data", str(FIXTURE),
           "--workdir", str(workdir), "--storage", storage, "--study-name", study]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(n)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-600:]
        assert "--refit-only" in out  # a worker tunes only and says how to finish
    assert not (workdir / "models").exists() or not list((workdir / "models").glob("*/card.json"))


@pytest.mark.parametrize("kind", ["postgresql", "journal"])
def test_two_workers_share_one_study(kind: str, workdir: Path, tmp_path_factory,
                                     request) -> None:
    if kind == "postgresql":
        storage = request.getfixturevalue("pg_url")
    else:
        storage = f"journal://{tmp_path_factory.mktemp('journal') / 'study.log'}"
    study_name = f"shared-{kind}-{os.getpid()}"
    _workers(workdir, storage, study_name)
    cfg = HeadConfig(features="classical", folds=2, trials=6, n_boot=20, storage=storage,
                     study_name=study_name)
    shared = optuna.load_study(study_name=study_name, storage=make_storage(storage, workdir))
    finished = shared.get_trials(states=FINISHED)
    assert 6 <= len(finished) <= 7  # the budget is the study's: one in-flight trial may finish
    card = train_head(load_dataset(FIXTURE), workdir, cfg, stage="refit")
    folders = list((workdir / "models").glob("*/card.json"))
    assert len(folders) == 1 and load_card(folders[0].parent).details.n_trials == len(finished)
    # the same trials in a single-process study refit to the same test numbers
    local = tmp_path_factory.mktemp("local")
    shutil.copytree(workdir / "features", local / "features")
    single = HeadConfig(features="classical", folds=2, trials=len(finished), n_boot=20)
    copy = optuna.create_study(study_name="head", direction="maximize",
                               storage=f"sqlite:///{_folder(local, single)}/study.db")
    copy.add_trials(shared.trials)
    copy.set_user_attr("fingerprint", shared.user_attrs["fingerprint"])
    again = train_head(load_dataset(FIXTURE), local, single, stage="refit")
    assert again.details.best_params == card.details.best_params
    assert again.test["balanced_accuracy"] == card.test["balanced_accuracy"]
    assert again.test["macro_auc"] == card.test["macro_auc"]


def _folder(workdir: Path, cfg: HeadConfig) -> Path:
    folder = workdir / "models" / cfg.model_name()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_refit_fails_trials_of_killed_workers(workdir: Path, pg_url: str) -> None:
    """A RUNNING trial left by a killed worker is failed at refit, never counted."""
    name = f"killed-{os.getpid()}"
    cfg = HeadConfig(features="classical", folds=2, trials=3, n_boot=0, storage=pg_url,
                     study_name=name)
    ds = load_dataset(FIXTURE)
    assert train_head(ds, workdir, cfg) is None  # a worker: tunes only
    study = optuna.load_study(study_name=name, storage=pg_url)
    study.ask()  # a worker took a trial and was killed
    card = train_head(ds, workdir, cfg, stage="refit")
    states = [t.state for t in optuna.load_study(study_name=name, storage=pg_url).trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1
    assert card.details.n_trials == 3


def test_shared_study_for_other_inputs_is_refused(workdir: Path, pg_url: str) -> None:
    from lesionlab.errors import LesionLabError

    name = f"other-{os.getpid()}"
    ds = load_dataset(FIXTURE)
    train_head(ds, workdir, HeadConfig(features="classical", folds=2, trials=1, n_boot=0,
                                       storage=pg_url, study_name=name))
    with pytest.raises(LesionLabError, match="made for other features or settings"):
        train_head(ds, workdir, HeadConfig(features="classical", folds=2, trials=1, n_boot=0,
                                           metadata=True, storage=pg_url, study_name=name))


class Killed(Exception):
    """Stands in for kill -9 of the client after some chunks were written."""


@pytest.fixture(scope="module")
def cluster():
    """A Dask LocalCluster of 2 worker processes on loopback."""
    distributed = pytest.importorskip("dask.distributed",
                                      reason="install the [distributed] extra for Dask")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, host="127.0.0.1") as c:
        yield c


SMALL = dict(backbone="tf_efficientnet_lite0", image_size=(96, 128), num_workers=0,
             chunk_size=16)


def test_dask_features_equal_a_local_run(cluster, tmp_path: Path) -> None:
    ds = load_dataset(FIXTURE)
    local = featurize(ds, tmp_path / "local", FeaturizeConfig(**SMALL))
    calls: list[int] = []
    remote = featurize(ds, tmp_path / "dask",
                       FeaturizeConfig(**SMALL, scheduler=cluster.scheduler_address),
                       on_chunk=calls.append)
    assert sorted(calls) == list(range(6)) and remote.key == local.key
    assert (remote.path / "features.npy").read_bytes() == \
        (local.path / "features.npy").read_bytes()
    assert remote.manifest["runtime"]["scheduler"] == cluster.scheduler_address


def test_dask_run_survives_a_dead_worker_and_resumes(cluster, tmp_path: Path) -> None:
    from dask.distributed import Client

    ds = load_dataset(FIXTURE)
    cfg = FeaturizeConfig(**{**SMALL, "backbone": "classical", "image_size": None,
                             "chunk_size": 8}, scheduler=cluster.scheduler_address)
    seen: list[int] = []
    gone: list[bool] = []

    def kill_worker_then_client(i: int) -> None:
        seen.append(i)
        if len(seen) == 1:  # a worker dies mid-run: Dask reschedules its chunks
            with Client(cluster.scheduler_address) as c:
                victim = sorted(c.scheduler_info()["workers"])[0]
                try:
                    c.run(os._exit, 1, workers=[victim], on_error="ignore")
                except Exception:  # the worker vanishes under the call
                    pass
                deadline = time.time() + 30
                while victim in c.scheduler_info()["workers"] and time.time() < deadline:
                    time.sleep(0.2)
                gone.append(victim not in c.scheduler_info()["workers"])
        if len(seen) == 5:  # then the client itself is killed
            raise Killed

    with pytest.raises(Killed):
        featurize(ds, tmp_path / "w", cfg, on_chunk=kill_worker_then_client)
    assert gone == [True], "the worker was not killed"
    calls: list[int] = []
    resumed = featurize(ds, tmp_path / "w", cfg, on_chunk=calls.append)
    assert len(calls) == 11 - 5 and not set(calls) & set(seen)  # only the missing chunks
    clean = featurize(ds, tmp_path / "clean", FeaturizeConfig(**{**SMALL, "backbone":
                                                                 "classical",
                                                                 "image_size": None,
                                                                 "chunk_size": 8}))
    assert (resumed.path / "features.npy").read_bytes() == \
        (clean.path / "features.npy").read_bytes()


def _torchrun(workdir: Path, epochs: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "models.finetune", "--data", str(FIXTURE), "--workdir", str(workdir),
           "--epochs", str(epochs), "--patience", "9", "--image-size", "48", "64",
           "--batch-size", "8", "--num-workers", "0", "--n-boot", "20", "--tta", "none",
           "--no-tracking", *extra]  # what is tested is the processes' model, not MLflow
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_for_locks_free(workdir: Path, timeout_s: float = 30.0) -> None:
    """Wait until no process holds a model folder's lock under ``workdir`` (killed workers
    exit a moment after the launcher that ``wait`` sees, and hold the lock until then)."""
    import fcntl

    deadline = time.time() + timeout_s
    for lock in workdir.glob("models/*/.lock"):
        with open(lock, "a+") as fh:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fh, fcntl.LOCK_UN)
                    break
                except BlockingIOError:
                    assert time.time() < deadline, f"{lock} still held after {timeout_s} s"
                    time.sleep(0.05)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-800:]
    return out


EPOCHS = 4  # the kill lands after epoch 1's checkpoint, with epochs left to resume


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, str]:
    """One uninterrupted 2-process torchrun (its workdir and stdout), for both tests below."""
    work = tmp_path_factory.mktemp("straight")
    return work, _finish(_torchrun(work, EPOCHS))


def test_torchrun_two_processes_write_a_loadable_model(straight, capsys) -> None:
    import json

    from tests.conftest import run_module

    work, out = straight
    assert out.count("test balanced acc") == 1  # one process reports and writes
    folders = list((work / "models").glob("*/card.json"))
    assert len(folders) == 1
    card = load_card(folders[0].parent)
    assert card.details.processes == 2 and card.details.epochs_run == EPOCHS
    img = sorted((FIXTURE / "images").glob("*.jpg"))[0]
    proc = run_module(capsys, "models.predict", "--model", str(folders[0].parent), str(img))
    assert proc.returncode == 0, proc.stderr[-400:]
    line = json.loads(proc.stdout)
    assert set(line) == {"path", "prediction", "name", "probabilities",
        "prevalence_probabilities", "decisions"}


def test_torchrun_kill_and_resume_matches_a_straight_run(straight, tmp_path: Path) -> None:
    import signal

    import torch

    straight = straight[0]
    killed = tmp_path / "killed"
    proc = _torchrun(killed, EPOCHS)
    deadline = time.time() + 300
    while time.time() < deadline and not list(killed.glob("models/*/checkpoint.pt")):
        assert proc.poll() is None, proc.stderr.read()[-800:]
        time.sleep(0.02)
    # torchrun and both workers, mid-run (torch's launcher starts each worker in a session of
    # its own, so killing the launcher's process group alone leaves them running)
    import psutil

    workers = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for w in workers:
        try:
            w.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(workers, timeout=30)
    _wait_for_locks_free(killed)
    assert not list(killed.glob("models/*/card.json")), "the run ended before the kill"
    _finish(_torchrun(killed, EPOCHS, "--resume"))
    a = load_card(next(straight.glob("models/*")))
    b = load_card(next(killed.glob("models/*")))
    assert [h["val_balanced_accuracy"] for h in b.details.history] == \
        [h["val_balanced_accuracy"] for h in a.details.history]
    assert [h["train_loss"] for h in b.details.history] == pytest.approx(
        [h["train_loss"] for h in a.details.history], rel=1e-6)
    wa = torch.load(next(straight.glob("models/*/model.pt")))
    wb = torch.load(next(killed.glob("models/*/model.pt")))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k])
