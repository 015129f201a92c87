"""Fine-tuning: a tiny epoch, exact resume, deterministic eval transforms, Grad-CAM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from featurize.extract import ImagePathDataset
from lesionlab.data import load_dataset
from lesionlab.errors import LesionLabError
from models.explain import explain_images, grad_cam
from models.finetune import FinetuneConfig, finetune, load_finetuned
from models.predict import predict_images
from tests.conftest import ROOT, run_module

TINY = dict(image_size=(48, 64), batch_size=16, num_workers=0, n_boot=20, tta="flip")


class Interrupted(Exception):
    """Stands in for a kill after an epoch's checkpoint was written."""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, object]:
    """One tiny fine-tuned model folder (and its card) shared by the tests of this file."""
    from tests.conftest import FIXTURE

    work = tmp_path_factory.mktemp("ft")
    card = finetune(load_dataset(FIXTURE), work, FinetuneConfig(epochs=1, **TINY))
    return work / "models" / card.name, card


def test_tiny_run_writes_loadable_model(tiny_model, fixture_dir: Path) -> None:
    ds = load_dataset(fixture_dir)
    folder, card = tiny_model
    assert card.kind == "finetune" and card.details.epochs_run == 1
    assert card.details.train_img_per_s > 0 and "ci95" in card.test
    assert card.tune_time_s == 0.0 and 0 < card.fit_time_s <= card.total_time_s
    model, _, _ = load_finetuned(folder)
    assert model.get_classifier().out_features == 7
    # predict reloads the folder and reproduces the stored calibrated test probabilities
    ids = card.test_image_ids[:3]
    paths = ds.frame.set_index("image_id").loc[ids, "path"].tolist()
    got = [r["probabilities"] for r in predict_images(folder, paths)]
    want = np.load(folder / "test_proba.npy")[:3]
    np.testing.assert_allclose([[g[c] for c in card.classes] for g in got], want, atol=2e-3)


@pytest.mark.parametrize("extra", [{}, dict(mixup=0.2, cutmix=1.0, ema_decay=0.99)],
                         ids=["recipe", "mixup-cutmix-ema"])
def test_resume_continues_exactly(fixture_dir: Path, tmp_path: Path, extra: dict) -> None:
    ds = load_dataset(fixture_dir)
    # test-time views and the bootstrap play no part in a resume: one view, no CIs
    cfg = FinetuneConfig(epochs=2, patience=5, **{**TINY, "tta": "none", "n_boot": 0},
                         **extra)
    straight = finetune(ds, tmp_path / "a", cfg)

    def stop(epoch: int) -> None:
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        finetune(ds, tmp_path / "b", cfg, on_epoch_end=stop)
    resumed = finetune(ds, tmp_path / "b", cfg, resume=True)
    hist_a, hist_b = straight.details.history, resumed.details.history
    assert [h["val_balanced_accuracy"] for h in hist_b] == \
        [h["val_balanced_accuracy"] for h in hist_a]
    assert hist_b[1]["train_loss"] == pytest.approx(hist_a[1]["train_loss"], rel=1e-6)
    a = torch.load(tmp_path / "a" / "models" / straight.name / "model.pt")
    b = torch.load(tmp_path / "b" / "models" / resumed.name / "model.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_eval_transform_is_deterministic(fixture_dir: Path) -> None:
    paths = load_dataset(fixture_dir).frame["path"].tolist()[:2]
    ds = ImagePathDataset(paths, (48, 64), (0.5,) * 3, (0.5,) * 3)
    torch.manual_seed(0)
    a = ds[0][0]
    torch.manual_seed(123)
    assert torch.equal(a, ds[0][0]) and a.shape == (3, 48, 64)


def test_grad_cam_map(tiny_model, fixture_dir: Path, tmp_path: Path, capsys) -> None:
    ds = load_dataset(fixture_dir)
    folder, _ = tiny_model
    model, _, _ = load_finetuned(folder)
    x = torch.randn(1, 3, 48, 64)
    cam, cls, proba = grad_cam(model, x)
    assert cam.shape == (48, 64) and 0 <= cam.min() and cam.max() <= 1
    assert cam.std() > 0.01, "map must not be constant"
    assert cls == int(np.argmax(proba))
    imgs = ds.frame["path"].tolist()[:2]
    res = explain_images(folder, imgs, tmp_path / "cams")
    assert all(Path(r["overlay"]).is_file() for r in res)
    proc = run_module(capsys, "models.explain", "--model", str(folder), imgs[0], "--out",
                      str(tmp_path / "cli"), "--target", "mel")
    assert proc.returncode == 0, proc.stderr[-400:]
    assert json.loads(proc.stdout.splitlines()[0])["class"] == "mel"


def test_predict_cli_with_finetuned_model_exact_keys(tiny_model, fixture_dir: Path,
                                                     capsys) -> None:
    folder, _ = tiny_model
    imgs = sorted((fixture_dir / "images").glob("*.jpg"))[:2]
    proc = run_module(capsys, "models.predict", "--model", str(folder), *map(str, imgs), "--age",
                      "45", "--sex", "female", "--localization", "back")
    assert proc.returncode == 0, proc.stderr[-400:]
    lines = [json.loads(t) for t in proc.stdout.strip().splitlines()]
    assert len(lines) == 2
    for line, img in zip(lines, imgs):
        assert set(line) == {"path", "prediction", "name", "probabilities",
            "prevalence_probabilities", "decisions"}
        assert line["path"] == str(img)
        assert list(line["probabilities"]) == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
        assert line["decisions"]["balanced_accuracy_rule"] == line["prediction"]
        assert abs(sum(line["probabilities"].values()) - 1) < 1e-4


def test_crafted_checkpoint_does_not_run_code(fixture_dir: Path, tmp_path: Path) -> None:
    """--resume loads checkpoints with weights_only=True: a pickle payload is refused."""
    import pickle

    from lesionlab.errors import LesionLabError

    cfg = FinetuneConfig(epochs=1, **TINY)
    folder = tmp_path / "models" / cfg.model_name()
    folder.mkdir(parents=True)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (folder / "checkpoint.pt").write_bytes(pickle.dumps({"config": Payload()}, protocol=2))
    with pytest.raises(LesionLabError, match="cannot load checkpoint"):
        finetune(load_dataset(fixture_dir), tmp_path, cfg, resume=True)
    assert not marker.exists()


def test_explain_bad_file_same_stem_and_head_folder(tiny_model, fixture_dir: Path,
                                                    tmp_path: Path, capsys) -> None:
    folder, _ = tiny_model
    img = sorted((fixture_dir / "images").glob("*.jpg"))[0]
    twin = tmp_path / "other" / img.name
    twin.parent.mkdir()
    twin.write_bytes(img.read_bytes())
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"garbage")
    proc = run_module(capsys, "models.explain", "--model", str(folder), str(bad), str(img),
                      str(twin), "--out", str(tmp_path / "cams"))
    assert proc.returncode == 1
    lines = [json.loads(t) for t in proc.stdout.strip().splitlines()]
    assert "error" in lines[0] and "broken.jpg" in lines[0]["error"]
    overlays = [Path(line["overlay"]) for line in lines[1:]]
    assert len(set(overlays)) == 2 and all(p.is_file() for p in overlays)
    head_dir = shutil.copytree(ROOT / "tests" / "fixtures" / "cards_v2" / "head",
                               tmp_path / "head_model")  # a head's folder
    proc = run_module(capsys, "models.explain", "--model", str(head_dir), str(img), "--out",
                      str(tmp_path / "x"))
    assert proc.returncode == 2 and "needs a fine-tuned network" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_schedule_is_warmup_then_cosine() -> None:
    """SequentialLR(LinearLR, CosineAnnealingLR) gives (s+1)/warm, then a cosine to zero."""
    import math

    from models.finetune import build_scheduler

    cfg = FinetuneConfig(epochs=3, warmup_epochs=1.0, lr=1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, 10, cfg)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [(s + 1) / 10 for s in range(10)] + [
        0.5 * (1 + math.cos(math.pi * k / 20)) for k in range(20)]
    np.testing.assert_allclose(lrs, want, atol=1e-9)


def test_param_groups_no_decay_on_norms_and_head_lr() -> None:
    from models.finetune import build_model, param_groups

    cfg = FinetuneConfig(lr=1e-3, head_lr_mult=10.0, weight_decay=0.05)
    model, _ = build_model(cfg)
    groups = param_groups(model, cfg)
    head = {id(p) for p in model.get_classifier().parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable) < len(list(model.parameters()))
    for g in groups:
        in_head = {id(p) in head for p in g["params"]}
        assert len(in_head) == 1
        assert g["lr"] == (1e-2 if in_head == {True} else 1e-3)
        if g["weight_decay"]:
            assert all(p.ndim > 1 for p in g["params"])  # no decay on norms and biases
    assert any(g["weight_decay"] == 0 for g in groups)


def test_finetuned_card_train_and_test_lesions_are_disjoint(tiny_model,
                                                            fixture_dir: Path) -> None:
    _, card = tiny_model
    lesion = load_dataset(fixture_dir).frame.set_index("image_id")["lesion_id"]
    train, test = set(lesion[card.train_image_ids]), set(lesion[card.test_image_ids])
    assert train and test and not train & test


def test_cpu_features_choose_fp32_or_bf16() -> None:
    """auto: bf16 only where the CPU has it natively (a VNNI-only Xeon stays in fp32)."""
    from lesionlab.device import cpu_flags, use_bf16

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_bf16("auto", cpu, {"avx512f", "avx512_vnni"})
    assert use_bf16("auto", cpu, {"avx512f", "avx512_bf16"})
    assert use_bf16("auto", cpu, {"amx_bf16", "amx_tile"})
    assert not use_bf16("auto", cpu, set())
    assert not use_bf16("fp32", cpu, {"avx512_bf16"}) and use_bf16("bf16", cpu, set())
    assert not use_bf16("auto", cuda, {"avx512_bf16"})  # CUDA uses fp16 AMP instead
    assert use_bf16("auto", cpu) == bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@pytest.mark.parametrize("augment", ["basic", "isic"])
def test_augmentations_keep_shape_and_follow_the_seed(fixture_dir: Path, augment: str) -> None:
    from models.finetune import TrainSet

    paths = load_dataset(fixture_dir).frame["path"].tolist()[:2]
    data = TrainSet(paths, np.array([0, 1]), (48, 64), (0.5,) * 3, (0.5,) * 3,
                    augment=augment)
    torch.manual_seed(7)
    a, label, weight = data[0]
    torch.manual_seed(7)
    b, _, _ = data[0]
    torch.manual_seed(8)
    c, _, _ = data[0]
    assert a.shape == (3, 48, 64) and a.dtype == torch.float32 and label == 0 and weight == 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert -1.01 <= float(a.min()) and float(a.max()) <= 1.01  # normalised with mean=std=0.5


def test_frozen_stages_keep_weights_and_batchnorm_statistics() -> None:
    from models.finetune import build_model, train_mode

    model, _ = build_model(FinetuneConfig(freeze_stages=2))
    frozen = list(model.conv_stem.parameters()) + list(model.blocks[1].parameters())
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in model.blocks[2].parameters())
    train_mode(model)
    assert not model.bn1.training and not model.blocks[1][0].bn1.training
    assert model.blocks[2][0].bn1.training
    before = model.blocks[0][0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 48, 64))
    assert torch.equal(model.blocks[0][0].bn1.running_mean, before)
    with pytest.raises(LesionLabError, match="blocks"):
        build_model(FinetuneConfig(freeze_stages=99))


def test_histopathology_weights_only_the_loss(fixture_dir: Path) -> None:
    from models.finetune import sample_weights

    frame = load_dataset(fixture_dir).frame
    rows = np.arange(len(frame))
    w = sample_weights(frame, rows, 2.0)
    histo = frame["dx_type"].to_numpy() == "histo"
    assert histo.any() and (~histo).any()
    assert np.all(w[histo] == 2.0) and np.all(w[~histo] == 1.0)
    assert np.all(sample_weights(frame, rows, 1.0) == 1.0)


def test_batch_mixer_mixes_images_and_targets_alike() -> None:
    from models.finetune import batch_mixer

    assert batch_mixer(FinetuneConfig(), 7) is None  # the recipe mixes nothing
    x = torch.rand(8, 3, 12, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])
    torch.manual_seed(3)
    mixed, target = batch_mixer(FinetuneConfig(mixup=0.4), 7)(x, labels)
    assert target.shape == (8, 7) and target.dtype == torch.float32
    torch.testing.assert_close(target.sum(1), torch.ones(8))
    lam = float(target[1, 1])  # image 1 is blended with image 0 (the batch rolled by one)
    assert 0.0 < lam < 1.0 and target[1, 0] == pytest.approx(1 - lam)
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0))
    torch.manual_seed(3)  # the draw follows torch's seeded global generator
    again, _ = batch_mixer(FinetuneConfig(mixup=0.4), 7)(x, labels)
    torch.testing.assert_close(again, mixed)
    # CutMix pastes a box of the rolled batch: each pixel is one image's or the other's, and
    # the target is the pasted area's share
    torch.manual_seed(5)
    cut, target = batch_mixer(FinetuneConfig(cutmix=1.0), 7)(x, labels)
    pasted = (cut[1] == x[0]).all(0) & (cut[1] != x[1]).any(0)
    assert ((cut == x) | (cut == x.roll(1, 0))).all()
    assert float(target[1, 0]) == pytest.approx(float(pasted.float().mean()), abs=1e-6)


def test_mixup_needs_one_target_per_loss_term() -> None:
    for bad in (dict(loss="focal", sampler="none"), dict(histo_weight=2.0)):
        with pytest.raises(LesionLabError, match="--mixup and --cutmix mix"):
            FinetuneConfig(cutmix=1.0, **bad).validate()
    FinetuneConfig(mixup=0.2, loss="weighted_ce", sampler="none").validate()
    assert "mix0.2-cut1-ema0.999" in FinetuneConfig(mixup=0.2, cutmix=1.0,
                                                   ema_decay=0.999).model_name()


def test_ema_weights_are_what_val_scores_and_the_folder_keeps(fixture_dir: Path,
                                                              tmp_path: Path) -> None:
    card = finetune(load_dataset(fixture_dir), tmp_path,
                    FinetuneConfig(epochs=1, ema_decay=0.999, mixup=0.2, cutmix=1.0, **TINY))
    folder = tmp_path / "models" / card.name
    assert card.config.ema_decay == 0.999 and card.config.cutmix == 1.0
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
    saved = torch.load(folder / "model.pt", weights_only=True)
    moved = [k for k in saved if saved[k].is_floating_point()
             and not torch.equal(ckpt["ema"][k], ckpt["model"][k])]
    assert len(moved) > 10  # the average lags the trained weights
    for k in saved:  # one epoch: its (only) val epoch is the averaged weights
        torch.testing.assert_close(saved[k], ckpt["ema"][k])
