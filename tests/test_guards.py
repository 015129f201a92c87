"""Inputs a hostile or careless user gives: each ends in a clear error or a correct result."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from featurize.extract import FeaturizeConfig, featurize
from lesionlab import data as data_mod
from lesionlab.artifacts import exclusive_lock
from lesionlab.data import load_dataset, load_rgb
from lesionlab.errors import LesionLabError
from tests.conftest import ROOT, run_module


class Killed(Exception):
    """Stands in for kill -9 after some chunks were written."""


def test_resume_with_another_chunk_size_reuses_no_wrong_rows(fixture_dir: Path,
                                                            tmp_path: Path) -> None:
    ds = load_dataset(fixture_dir)
    small = FeaturizeConfig(backbone="classical", num_workers=0, chunk_size=4)

    def kill_after_three(i: int) -> None:
        if i == 2:
            raise Killed

    with pytest.raises(Killed):
        featurize(ds, tmp_path / "w", small, on_chunk=kill_after_three)
    # 87 rows in chunks of 83: the second chunk (rows 83-86) has 4 rows like the leftover
    # chunk of rows 4-7, which must not be taken for it
    big = FeaturizeConfig(backbone="classical", num_workers=0, chunk_size=83)
    calls: list[int] = []
    resumed = featurize(ds, tmp_path / "w", big, on_chunk=calls.append)
    assert calls == [0, 1]
    clean = featurize(ds, tmp_path / "clean", big)
    np.testing.assert_array_equal(resumed.features, clean.features)


def test_second_featurize_waits_for_the_first(fixture_dir: Path, tmp_path: Path) -> None:
    """One cache entry, one writer: the second process waits and says who holds the lock."""
    ds = load_dataset(fixture_dir)
    cfg = FeaturizeConfig(backbone="classical", num_workers=0, chunk_size=16)
    done = featurize(ds, tmp_path / "ref", cfg)
    lock = tmp_path / "w" / "features" / f".{done.key}.lock"
    err_lines: list[str] = []
    waiting = threading.Event()

    def read_stderr(stream) -> None:  # until the second run says it waits
        for line in stream:
            err_lines.append(line)
            if "waiting for it to finish" in line:
                waiting.set()

    with exclusive_lock(lock, "test"):
        proc = subprocess.Popen(
            [sys.executable, "-m", "featurize", "--backbone", "classical", "--data",
             str(fixture_dir), "--workdir", str(tmp_path / "w"), "--num-workers", "0",
             "--chunk-size", "16"], cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        reader = threading.Thread(target=read_stderr, args=(proc.stderr,), daemon=True)
        reader.start()
        assert waiting.wait(timeout=120), "".join(err_lines)[-400:]
        time.sleep(1)  # it waits on the lock, not merely says so
        assert proc.poll() is None, "the second run did not wait for the lock"
        assert not (tmp_path / "w" / "features" / done.key).exists()
    returncode = proc.wait(timeout=120)
    reader.join(timeout=30)
    err = "".join(err_lines)
    assert returncode == 0, err[-400:]
    assert "waiting for it to finish" in err and f"pid {os.getpid()}" in err
    again = featurize(ds, tmp_path / "w", cfg)
    np.testing.assert_array_equal(again.features, done.features)


def test_decompression_bomb_is_refused_and_others_are_predicted(fixture_dir: Path,
                                                                 tmp_path: Path,
                                                                 monkeypatch) -> None:
    from models.predict import predict_images
    from models.train_head import HeadConfig, train_head

    big = tmp_path / "big.png"
    Image.new("RGB", (800, 600), (120, 80, 60)).save(big)
    monkeypatch.setattr(data_mod, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(LesionLabError, match="image too large"):
        load_rgb(big)
    monkeypatch.setattr(data_mod, "MAX_IMAGE_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # PIL's own bomb check
    with pytest.raises(LesionLabError, match="image too large"):
        load_rgb(big)
    ds = load_dataset(fixture_dir)
    featurize(ds, tmp_path, FeaturizeConfig(backbone="classical", num_workers=0))
    card = train_head(ds, tmp_path, HeadConfig(features="classical", trials=1, folds=2,
                                               n_boot=0))
    good = ds.frame["path"].tolist()[:2]
    res = predict_images(tmp_path / "models" / card.name, [good[0], str(big), good[1]])
    assert "image too large" in res[1]["error"]
    assert res[0]["prediction"] and res[2]["prediction"]


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "grey16.png"
    arr = np.full((30, 40), 32768, dtype=np.uint16)
    arr[:, :20] = 1000
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_rgb(path))
    assert rgb.shape == (30, 40, 3)
    assert rgb[0, 30].tolist() == [128, 128, 128] and rgb[0, 5].tolist() == [4, 4, 4]


def test_blank_lesion_id_is_refused_with_its_rows(data_copy: Path, tmp_path: Path, capsys) -> None:
    meta = pd.read_csv(data_copy / "HAM10000_metadata.csv")
    meta.loc[3, "lesion_id"] = np.nan
    meta.loc[7, "lesion_id"] = "  "
    meta.to_csv(data_copy / "HAM10000_metadata.csv", index=False)
    with pytest.raises(LesionLabError, match="2 row.* blank lesion_id") as err:
        load_dataset(data_copy)
    assert meta.loc[3, "image_id"] in str(err.value) and "[5, 9]" in str(err.value)
    proc = run_module(capsys, "lesionlab.splits", "--data", str(data_copy), "--workdir",
                      str(tmp_path))
    assert proc.returncode == 2 and "blank lesion_id" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_model_name_cannot_escape_the_workdir(tmp_path: Path) -> None:
    from models.bundle import model_path
    from models.train_head import HeadConfig

    for bad in ("../../../x", "a/b", "..", "/etc/x", ""):
        with pytest.raises(LesionLabError, match="invalid name"):
            model_path(tmp_path, bad)
    with pytest.raises(LesionLabError, match="invalid name"):
        HeadConfig(features="classical", name="../x").validate()
    assert model_path(tmp_path, "ok_name-1.2+x").parent == tmp_path / "models"


def test_untrusted_types_in_a_head_file_are_refused(tmp_path: Path) -> None:
    import collections

    import skops.io as sio

    from models.bundle import HEAD_FILE, load_head

    sio.dump({"model": collections.Counter("abc")}, tmp_path / HEAD_FILE)
    with pytest.raises(LesionLabError, match="types lesionlab does not write"):
        load_head(tmp_path)
    (tmp_path / HEAD_FILE).write_bytes(b"not a zip")
    with pytest.raises(LesionLabError, match="cannot read"):
        load_head(tmp_path)


def test_stale_study_is_not_reused(fixture_dir: Path, tmp_path: Path) -> None:
    """Same --features name, other features: the study starts afresh."""
    from models.train_head import HeadConfig, train_head

    ds = load_dataset(fixture_dir)
    featurize(ds, tmp_path, FeaturizeConfig(backbone="classical", num_workers=0))
    cfg = HeadConfig(features="classical", trials=2, folds=2, n_boot=0)
    first = train_head(ds, tmp_path, cfg)
    shutil.rmtree(tmp_path / "features" / first.details.features[0]["key"])
    featurize(ds, tmp_path, FeaturizeConfig(backbone="classical", num_workers=0,
                                           image_size=(90, 120)))
    second = train_head(ds, tmp_path, cfg)
    assert second.details.features[0]["key"] != first.details.features[0]["key"]
    assert second.tune_time_s > 0 and second.details.n_trials == 2
    import optuna

    study = optuna.load_study(study_name="head",
                              storage=f"sqlite:///{tmp_path / 'models' / second.name}/study.db")
    assert len(study.trials) == 2


def test_killed_trial_is_failed_not_counted(fixture_dir: Path, tmp_path: Path) -> None:
    """A trial left RUNNING by a killed worker is marked failed; the budget is still met."""
    import optuna

    from models.train_head import HeadConfig, train_head

    ds = load_dataset(fixture_dir)
    featurize(ds, tmp_path, FeaturizeConfig(backbone="classical", num_workers=0))
    first = train_head(ds, tmp_path, HeadConfig(features="classical", trials=2, folds=2,
                                                n_boot=0))
    storage = f"sqlite:///{tmp_path / 'models' / first.name}/study.db"
    study = optuna.load_study(study_name="head", storage=storage)
    study.ask()  # a worker took a trial and was killed before telling
    card = train_head(ds, tmp_path, HeadConfig(features="classical", trials=4, folds=2,
                                               n_boot=0))
    states = [t.state for t in optuna.load_study(study_name="head", storage=storage).trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1
    assert states.count(optuna.trial.TrialState.RUNNING) == 0
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert sum(s in finished for s in states) == 4 == card.details.n_trials
