"""Model folders: who may write one (kind, inputs, one run at a time) and what loading checks
(card fields, probability arrays, weights checksums). Folders are copies of the session's
tiny models, so nothing here trains a network."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lesionlab.data import load_dataset
from lesionlab.errors import LesionLabError
from models.bundle import load_card
from models.ensemble import EnsembleConfig, build_ensemble, oof_join
from models.finetune import FinetuneConfig, finetune
from models.predict import predict_images
from models.train_head import HeadConfig, train_head
from tests.conftest import FIXTURE, ROOT, run_module

HEAD_ARGS = dict(features="classical", trials=1, folds=2, n_boot=10)


@pytest.fixture(scope="module")
def work(trained_models, tmp_path_factory) -> Path:
    """A workdir with the session's cached features and split, a copy of its head and
    network under models/, and an ensemble ``ens`` of the two."""
    src = trained_models["head"].parent.parent
    work = tmp_path_factory.mktemp("guards")
    for sub in ("features", "splits"):
        shutil.copytree(src / sub, work / sub)
    for kind in ("head", "finetune"):
        shutil.copytree(trained_models[kind], work / "models" / trained_models[kind].name)
    build_ensemble([work / "models" / trained_models[k].name for k in ("head", "finetune")],
                   load_dataset(FIXTURE), work, EnsembleConfig(members=[], name="ens", n_boot=10))
    return work


@pytest.fixture
def members(work, trained_models) -> list[Path]:
    """The copies of the head and the network in ``work``."""
    return [work / "models" / trained_models[k].name for k in ("head", "finetune")]


def copy_model(work: Path, name: str, dest: Path) -> Path:
    shutil.copytree(work / "models" / name, dest)
    return dest


def edit_card(folder: Path, **changes) -> None:
    raw = json.loads((folder / "card.json").read_text())
    for key, value in changes.items():
        if key == "member_weights":
            raw["config"][key] = value
        else:
            raw[key] = value
    (folder / "card.json").write_text(json.dumps(raw))


# -- who may write a folder ---------------------------------------------------------------


def test_a_head_run_refuses_a_fine_tuned_folder(work, members) -> None:
    head, net = members
    with pytest.raises(LesionLabError) as err:
        train_head(load_dataset(FIXTURE), work, HeadConfig(name=net.name, **HEAD_ARGS))
    assert str(err.value) == (f"{net} holds a finetune model; a head run will not overwrite "
                              f"it (choose another --name, or delete the folder)")
    assert load_card(net).kind == "finetune"
    assert not (net / "head.skops").exists() and not (net / "study.db").exists()


def test_a_finetune_run_refuses_a_head_folder(work, members) -> None:
    head, _ = members
    cfg = FinetuneConfig(name=head.name, epochs=1, image_size=(48, 64), batch_size=16,
                         num_workers=0, n_boot=10, tta="none")
    with pytest.raises(LesionLabError) as err:
        finetune(load_dataset(FIXTURE), work, cfg)
    assert str(err.value) == (f"{head} holds a head model; a finetune run will not overwrite "
                              f"it (choose another --name, or delete the folder)")
    assert not (head / "model.pt").exists() and not (head / "checkpoint.pt").exists()


def test_an_ensemble_named_after_one_of_its_members_is_refused(work, members) -> None:
    head, net = members
    stamp = (head / "head.skops").read_bytes()
    with pytest.raises(LesionLabError) as err:
        build_ensemble([head, net], load_dataset(FIXTURE), work,
                       EnsembleConfig(members=[], name=head.name, n_boot=10))
    assert str(err.value) == (f"output folder {head} is also an input ({head}); "
                              f"choose another --name")
    assert (head / "head.skops").read_bytes() == stamp and not (head / "members").exists()
    # rebuilding an ensemble into its own folder still works (same kind)
    card = build_ensemble([head, net], load_dataset(FIXTURE), work,
                          EnsembleConfig(members=[], name="ens", n_boot=10))
    assert sorted(p.name for p in (work / "models" / "ens" / "members").iterdir()) == \
        sorted([head.name, net.name]) and card.name == "ens"


def test_a_folder_in_use_by_another_run_is_refused_naming_its_pid(work, capsys) -> None:
    folder = work / "models" / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from models.bundle import claim_folder; "
         "claim_folder(sys.argv[1], 'head'); print('held', flush=True); time.sleep(120)",
         str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_module(capsys, "models.train_head", "--features", "classical", "--trials", "1",
                          "--folds", "2", "--n-boot", "10", "--name", "busy", "--workdir",
                          str(work), "--data", str(FIXTURE))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == (
            f"error: folder {folder} is in use by another run (pid {holder.pid})")
        assert not (folder / "study.db").exists()
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its holder: the same run now goes through, and frees the folder
    card = train_head(load_dataset(FIXTURE), work, HeadConfig(name="busy", **HEAD_ARGS))
    assert card.name == "busy" and (folder / "head.skops").exists()
    again = train_head(load_dataset(FIXTURE), work, HeadConfig(name="busy", **HEAD_ARGS))
    assert again.val == card.val  # resumed into its own folder


# -- what loading a folder checks ---------------------------------------------------------


@pytest.mark.parametrize("field,value,expected", [
    ("member_weights", [0, 0], "finite numbers >= 0 with a sum > 0, got [0, 0]"),
    ("member_weights", [float("nan"), 1.0], "finite numbers >= 0 with a sum > 0, got [nan, 1.0]"),
    ("member_weights", [-0.5, 1.5], "finite numbers >= 0 with a sum > 0, got [-0.5, 1.5]"),
    ("member_weights", [1.0], "a list of 2 weights (one per member), got [1.0]"),
    ("member_weights", [1e308, 1e308], "finite numbers >= 0 with a sum > 0, got "
                                       "[1e+308, 1e+308]"),  # the sum overflows
    ("temperature", 0.0, "a number in [0.05, 20.0] (the range temperature scaling is fitted "
                         "in), got 0.0"),
    ("temperature", 1e-320, "a number in [0.05, 20.0] (the range temperature scaling is "
                            "fitted in), got 1e-320"),
    ("mel_threshold", 1.5, "null or a number in [0, 1], got 1.5"),
])
def test_a_tampered_ensemble_card_is_refused_on_load(work, tmp_path, field, value,
                                                     expected) -> None:
    ens = copy_model(work, "ens", tmp_path / "ens")
    edit_card(ens, **{field: value})
    name = f"config.{field}" if field == "member_weights" else field
    with pytest.raises(LesionLabError) as err:
        predict_images(ens, load_dataset(FIXTURE).frame["path"].tolist()[:2])
    assert str(err.value) == f"{ens / 'card.json'}: {name} must be {expected}"


def test_extreme_but_valid_member_weights_predict_like_their_ratio(work, tmp_path) -> None:
    """Weights are normalised before use: [1e-320, 0] is [1, 0], not a flat 1/7."""
    paths = load_dataset(FIXTURE).frame["path"].tolist()[:3]
    ens = copy_model(work, "ens", tmp_path / "ens")
    edit_card(ens, member_weights=[1.0, 0.0])
    expected = [r["probabilities"] for r in predict_images(ens, paths)]
    edit_card(ens, member_weights=[1e-320, 0.0])
    got = [r["probabilities"] for r in predict_images(ens, paths)]
    for e, g in zip(expected, got):
        assert g == pytest.approx(e, abs=1e-9)
        assert max(g.values()) > 1 / 7 + 0.01


def test_predict_cli_on_zero_member_weights_exits_2_with_one_line(work, tmp_path, capsys) -> None:
    ens = copy_model(work, "ens", tmp_path / "ens")
    edit_card(ens, member_weights=[0, 0])
    proc = run_module(capsys, "models.predict", "--model", str(ens),
                      load_dataset(FIXTURE).frame["path"].tolist()[0])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: {ens / 'card.json'}: config.member_weights must be finite numbers >= 0 "
        f"with a sum > 0, got [0, 0]"]


@pytest.mark.parametrize("which", ["finetune", "head"])
def test_weights_swapped_for_another_model_are_refused(work, members, trained_models, tmp_path,
                                                      which) -> None:
    ens = copy_model(work, "ens", tmp_path / "ens")
    head, net = members
    if which == "finetune":
        path = ens / "members" / net.name / "model.pt"
        state = torch.load(path, weights_only=True)
        torch.save({k: v * 0.5 if v.is_floating_point() else v for k, v in state.items()}, path)
    else:  # the head trained with metadata
        path = ens / "members" / head.name / "head.skops"
        shutil.copyfile(trained_models["head_meta"] / "head.skops", path)
    want = load_card(path.parent).files[path.name]
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(LesionLabError) as err:
        predict_images(ens, load_dataset(FIXTURE).frame["path"].tolist()[:2])
    assert str(err.value) == (
        f"{path}: sha256 {got[:12]}... is not the {want[:12]}... recorded in its card.json; "
        f"the weights were replaced or damaged since the model was saved")


@pytest.mark.parametrize("damage,expected", [
    (lambda a: a.astype(object), "holds Python objects, expected a float array (refused unread)"),
    (lambda a: (a * 100).astype(np.int64), "dtype int64, expected float probabilities"),
    (lambda a: a[:-3], "shape ({n3}, 7), expected ({n}, 7)"),
    (lambda a: np.where(np.arange(len(a))[:, None] == 0, np.nan, a),
     "1 row(s) with NaN or infinite values, expected finite probabilities"),
    (lambda a: a * 2, "values are not probabilities (each row in [0, 1], summing to 1)"),
])
def test_a_damaged_member_array_is_refused_on_load(work, members, tmp_path, damage,
                                                    expected) -> None:
    head, net = members
    dest = tmp_path / "work"
    dest.mkdir()
    for sub in ("features", "splits"):
        (dest / sub).symlink_to(work / sub)
    copies = [copy_model(work, m.name, dest / "models" / m.name) for m in (head, net)]
    path = copies[1] / "val_proba.npy"
    arr = np.load(path)
    np.save(path, damage(arr), allow_pickle=True)
    with pytest.raises(LesionLabError) as err:
        build_ensemble(copies, load_dataset(FIXTURE), dest,
                       EnsembleConfig(members=[], name="e", n_boot=10))
    assert str(err.value) == f"{path}: " + expected.format(n=len(arr), n3=len(arr) - 3)
    assert not (dest / "models" / "e" / "card.json").exists()


def test_out_of_fold_probabilities_rows_short_are_refused(work, members, tmp_path) -> None:
    """Both readers of oof_proba.npy: joining fold models, and a stacking head's input."""
    from models.train_design import oof_feature_set

    _, net = members
    fold = copy_model(work, net.name, tmp_path / "fold")
    card = load_card(fold)
    card.details.oof_image_ids = card.test_image_ids  # rows it never trained on
    n = len(card.test_image_ids)
    np.save(fold / "oof_proba.npy", np.load(fold / "test_proba.npy")[:-3])
    with pytest.raises(LesionLabError) as err:
        oof_join([card], [fold])
    assert str(err.value) == f"{fold / 'oof_proba.npy'}: shape ({n - 3}, 7), expected ({n}, 7)"

    ens = copy_model(work, "ens", work / "models" / "ens_oof")
    try:
        raw = json.loads((ens / "card.json").read_text())
        raw["details"]["oof_image_ids"] = card.test_image_ids
        (ens / "card.json").write_text(json.dumps(raw))
        np.save(ens / "oof_proba.npy", np.load(ens / "test_proba.npy")[:-3])
        with pytest.raises(LesionLabError) as err:
            oof_feature_set(work, load_dataset(FIXTURE), "ens_oof")
        assert str(err.value) == (f"{ens / 'oof_proba.npy'}: shape ({n - 3}, 7), "
                                  f"expected ({n}, 7)")
    finally:
        shutil.rmtree(ens)
