"""Fine-tuning: a tiny epoch, exact resume, deterministic eval transforms, Grad-CAM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from featurize.extract import ImageFolderSet
from lesionlab.data import load_dataset
from models.explain import explain_images, grad_cam
from models.finetune import FinetuneConfig, finetune, load_finetuned
from models.predict import predict_images
from tests.conftest import run_cli

TINY = dict(image_size=(48, 64), batch_size=16, num_workers=0, n_boot=20, tta="flip")


class Interrupted(Exception):
    """Stands in for a kill after an epoch's checkpoint was written."""


def test_tiny_run_writes_loadable_model(fixture_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset(fixture_dir)
    card = finetune(ds, tmp_path, FinetuneConfig(epochs=1, **TINY))
    folder = tmp_path / "models" / card["name"]
    assert card["kind"] == "finetune" and card["epochs_run"] == 1
    assert card["train_img_per_s"] > 0 and "ci95" in card["test"]
    model, _, _ = load_finetuned(folder)
    assert model.get_classifier().out_features == 7
    # predict reloads the folder and reproduces the stored calibrated test probabilities
    ids = card["test_image_ids"][:3]
    paths = ds.frame.set_index("image_id").loc[ids, "path"].tolist()
    got = [r["probabilities"] for r in predict_images(folder, paths)]
    want = np.load(folder / "test_proba.npy")[:3]
    np.testing.assert_allclose([[g[c] for c in card["classes"]] for g in got], want, atol=2e-3)


def test_resume_continues_exactly(fixture_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset(fixture_dir)
    cfg = FinetuneConfig(epochs=2, patience=5, **TINY)
    straight = finetune(ds, tmp_path / "a", cfg)

    def stop(epoch: int) -> None:
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        finetune(ds, tmp_path / "b", cfg, on_epoch_end=stop)
    resumed = finetune(ds, tmp_path / "b", cfg, resume=True)
    assert [h["val_balanced_accuracy"] for h in resumed["history"]] == \
        [h["val_balanced_accuracy"] for h in straight["history"]]
    assert resumed["history"][1]["train_loss"] == pytest.approx(
        straight["history"][1]["train_loss"], rel=1e-6)
    a = torch.load(tmp_path / "a" / "models" / straight["name"] / "model.pt")
    b = torch.load(tmp_path / "b" / "models" / resumed["name"] / "model.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_eval_transform_is_deterministic(fixture_dir: Path) -> None:
    paths = load_dataset(fixture_dir).frame["path"].tolist()[:2]
    ds = ImageFolderSet(paths, (48, 64), (0.5,) * 3, (0.5,) * 3)
    torch.manual_seed(0)
    a = ds[0][0]
    torch.manual_seed(123)
    assert torch.equal(a, ds[0][0]) and a.shape == (3, 48, 64)


def test_grad_cam_map(fixture_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset(fixture_dir)
    card = finetune(ds, tmp_path, FinetuneConfig(epochs=1, **TINY))
    folder = tmp_path / "models" / card["name"]
    model, _, _ = load_finetuned(folder)
    x = torch.randn(1, 3, 48, 64)
    cam, cls, proba = grad_cam(model, x)
    assert cam.shape == (48, 64) and 0 <= cam.min() and cam.max() <= 1
    assert cam.std() > 0.01, "map must not be constant"
    assert cls == int(np.argmax(proba))
    imgs = ds.frame["path"].tolist()[:2]
    res = explain_images(folder, imgs, tmp_path / "cams")
    assert all(Path(r["overlay"]).is_file() for r in res)
    proc = run_cli("models.explain", "--model", str(folder), imgs[0], "--out",
                   str(tmp_path / "cli"), "--target", "mel")
    assert proc.returncode == 0, proc.stderr[-400:]
    assert json.loads(proc.stdout.splitlines()[0])["class"] == "mel"
