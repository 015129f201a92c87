"""Knowledge distillation: the loss against an independent formula, the soft-target file's
checks, and ``python -m models.distill`` from a K-fold teacher (its out-of-fold
probabilities, never in-fold ones) with the leak guard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lesionlab.artifacts import sha256_file
from lesionlab.data import load_dataset
from lesionlab.errors import LesionLabError
from models.bundle import load_card
from models.finetune import DistillLoss, FinetuneConfig, read_soft_targets
from tests.conftest import run_module

TINY = ["--image-size", "48", "64", "--batch-size", "16", "--num-workers", "0",
        "--n-boot", "20", "--tta", "none", "--epochs", "1"]


def test_distill_loss_is_hinton_et_al_per_image() -> None:
    torch.manual_seed(0)
    z = torch.randn(5, 7)
    teacher = torch.softmax(torch.randn(9, 7) * 2, 1)
    labels = torch.randint(0, 7, (9,))
    rows = torch.tensor([0, 3, 3, 8, 5])
    t = 2.0
    p_t = torch.softmax(torch.log(teacher) / t, 1)[rows]
    kl = torch.nn.functional.kl_div(torch.log_softmax(z / t, 1), p_t, reduction="none").sum(1)
    ce = torch.nn.functional.cross_entropy(z, labels[rows], reduction="none",
                                           label_smoothing=0.1)
    for w in (0.0, 0.3, 1.0):
        got = DistillLoss(labels, teacher, t, w, label_smoothing=0.1)(z, rows)
        torch.testing.assert_close(got, (1 - w) * ce + w * t * t * kl)
    # a student that matches the tempered teacher pays nothing for the teacher term
    match = torch.log(torch.softmax(torch.log(teacher) / t, 1)[rows]) * t
    assert DistillLoss(labels, teacher, t, 1.0)(match, rows).abs().max() < 1e-5


def test_soft_target_file_checks(tmp_path: Path) -> None:
    classes = ["a", "b"]
    good = pd.DataFrame({"image_id": ["x", "y"], "a": [0.25, 1.0], "b": [0.75, 0.0]})
    good.to_csv(tmp_path / "t.csv", index=False)
    np.testing.assert_allclose(read_soft_targets(tmp_path / "t.csv", ["y", "x"], classes),
                               [[1.0, 0.0], [0.25, 0.75]])
    cases = {"missing": (good, ["x", "z"], "1 of 2 images missing"),
             "class": (good.drop(columns="b"), ["x"], r"missing classes \['b'\]"),
             "repeat": (pd.concat([good, good]), ["x"], "2 repeated"),
             "sum": (good.assign(a=[0.5, 1.0]), ["x", "y"], "1 rows are not probability"),
             "negative": (good.assign(a=[-0.25, 1.0], b=[1.25, 0.0]), ["x"], "not probability")}
    for name, (frame, ids, msg) in cases.items():
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
        with pytest.raises(LesionLabError, match=msg):
            read_soft_targets(tmp_path / f"{name}.csv", ids, classes)
    with pytest.raises(LesionLabError, match="cannot read it"):
        read_soft_targets(tmp_path / "absent.csv", ["x"], classes)
    for bad in (dict(loss="focal", sampler="none"), dict(mixup=0.2)):
        with pytest.raises(LesionLabError, match="distillation .* brings its own loss"):
            FinetuneConfig(distill_targets="t.csv", **bad).validate()


def test_distill_from_a_kfold_teacher_uses_its_out_of_fold_probabilities(
        fixture_dir: Path, tmp_path: Path, capsys) -> None:
    work = tmp_path / "runs"
    common = ["--data", str(fixture_dir), "--workdir", str(work), "--no-tracking", *TINY]
    assert run_module(capsys, "models.kfold", *common, "--cv-folds", "2",
                      "--name", "teacher").returncode == 0
    teacher = work / "models" / "teacher"
    done = run_module(capsys, "models.distill", *common, "--teacher", str(teacher),
                      "--distill-temperature", "3", "--distill-weight", "0.7")
    assert done.returncode == 0, done.stderr[-400:]
    [csv] = (work / "soft_targets").glob("teacher-*-split0-frac1.csv")
    card = load_card(teacher)
    oof = pd.DataFrame(np.load(teacher / "oof_proba.npy"),
                       index=card.details.out_of_fold_ids(), columns=card.classes)
    targets = pd.read_csv(csv, dtype={"image_id": str}).set_index("image_id")
    # every training image of the student, each from the fold network that never saw it
    assert sorted(targets.index) == sorted(card.train_image_ids) == sorted(oof.index)
    np.testing.assert_allclose(targets.to_numpy(), oof.loc[targets.index].to_numpy(),
                               rtol=1e-6, atol=1e-7)
    student = load_card(next(p for p in (work / "models").iterdir() if "kd-teacher" in p.name))
    assert student.config.distill_temperature == 3 and student.config.distill_weight == 0.7
    assert student.details.distill_targets_sha256 == sha256_file(csv)
    assert student.test_image_ids == card.test_image_ids  # the same split, test untouched
    # run_all's distill cell: the same soft targets (the file is reused, not rewritten)
    from benchmarks.run_all import CELL_RUNNERS, Cell, DistillCell

    made = csv.stat().st_mtime_ns
    cfg = FinetuneConfig(image_size=(48, 64), batch_size=16, num_workers=0, n_boot=20,
                         tta="none", epochs=1, name="cellstudent")
    cell = Cell("cellstudent", "distill", DistillCell(cfg, "teacher"))
    got = CELL_RUNNERS["distill"].run(cell, load_dataset(fixture_dir), work)
    assert got.name == "cellstudent" and csv.stat().st_mtime_ns == made
    assert got.details.distill_targets_sha256 == sha256_file(csv)
    # refused in one line before any data is read: no model folder, a loss it cannot take
    for bad, msg in (([str(tmp_path / "absent")], "not a lesionlab model folder"),
                     ([str(teacher), "--loss", "focal", "--sampler", "none"],
                      "brings its own loss")):
        proc = run_module(capsys, "models.distill", *common, "--teacher", *bad)
        assert proc.returncode != 0 and msg in proc.stderr and "Traceback" not in proc.stderr
    # a student on another split would have val/test images the teacher trained on
    other = run_module(capsys, "models.distill", *common, "--teacher", str(teacher),
                       "--split-seed", "1")
    assert other.returncode != 0
    assert "trained on" in other.stderr and "val/test images (split seed 1)" in other.stderr
