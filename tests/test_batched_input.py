"""The batched input pipeline (the GPU path), run here on the CPU: its decoded cache, its
augmentation's statistics against the worker pipeline's, its batches and a tiny run."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featurize.color import apply_color_constancy
from featurize.extract import eval_transform
from lesionlab.data import load_dataset
from lesionlab.errors import LesionLabError, flush_warnings
from lesionlab.images import read_image
from models.batched_input import (CACHE_DIR, BatchedLoader, IndexSet, batch_augment,
                                  cache_key, cached_proba, decoded_cache, to_device)
from models.finetune import FinetuneConfig, TrainSet, build_model, finetune, train_loader

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def small_images(tmp_path_factory) -> list[str]:
    """12 fixture images at 100x75, lossless: the worker pipeline then reads exactly the
    pixels the cache holds at (75, 100), so the two pipelines start from the same image."""
    from tests.conftest import FIXTURE

    out = tmp_path_factory.mktemp("small")
    paths = []
    for p in load_dataset(FIXTURE).frame["path"].tolist()[:12]:
        dest = out / (Path(p).stem + ".png")
        Image.open(p).convert("RGB").resize((100, 75), Image.BICUBIC).save(dest)
        paths.append(str(dest))
    return paths


def test_cache_rows_are_the_eval_transforms_image(fixture_dir: Path, tmp_path: Path) -> None:
    paths = load_dataset(fixture_dir).frame["path"].tolist()[:5]
    cache = decoded_cache(paths, (48, 64), tmp_path, 4 / 3, "shades_of_gray", "bicubic",
                          num_workers=0)
    assert cache.shape == (5, 48, 64, 3) and cache.dtype == np.uint8
    m, s = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for i, p in enumerate(paths):
        want = eval_transform((48, 64), MEAN, STD, "bicubic")(
            apply_color_constancy(read_image(p, 4 / 3), "shades_of_gray"))
        got = (to_device(cache[i:i + 1], torch.device("cpu"))[0] - m) / s
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_cache_is_reused_keyed_and_rebuilt_when_damaged(fixture_dir: Path, tmp_path: Path,
                                                        caplog) -> None:
    src = load_dataset(fixture_dir).frame["path"].tolist()[:3]
    paths = []
    for p in src:
        (tmp_path / Path(p).name).write_bytes(Path(p).read_bytes())
        paths.append(str(tmp_path / Path(p).name))
    decoded_cache(paths, (24, 32), tmp_path, num_workers=0)
    files = list((tmp_path / CACHE_DIR).glob("*"))
    assert len(files) == 1 and files[0].suffix == ".npy"  # no temp file left
    stamp = files[0].stat().st_mtime_ns
    decoded_cache(paths, (24, 32), tmp_path, num_workers=0)  # reused, not rebuilt
    assert files[0].stat().st_mtime_ns == stamp
    key = cache_key(paths, (24, 32), None, "none", "bicubic")
    assert files[0].stem == key
    assert key != cache_key(paths, (24, 32), None, "shades_of_gray", "bicubic")
    assert key != cache_key(paths, (24, 24), None, "none", "bicubic")
    good = np.array(np.load(files[0]))
    for damage in (lambda f: np.save(f, np.zeros((2, 24, 32, 3), np.uint8)),  # 2 rows, not 3
                   lambda f: f.write_bytes(f.read_bytes()[:300]),  # truncated
                   lambda f: f.write_bytes(b""),  # emptied
                   lambda f: f.write_bytes(b"not a numpy file at all" * 20)):  # overwritten
        damage(files[0])
        flush_warnings()
        with caplog.at_level(logging.WARNING, logger="lesionlab"):
            again = decoded_cache(paths, (24, 32), tmp_path, num_workers=0)
        assert np.array_equal(again, good)  # decoded again, the same rows
        assert "is damaged" in caplog.text and "decoded again" in caplog.text
        caplog.clear()
    os.utime(paths[0], ns=(1, 1))  # a changed image: another key, never the stale rows
    assert cache_key(paths, (24, 32), None, "none", "bicubic") != key
    assert decoded_cache(paths, (24, 32), tmp_path, num_workers=0).shape == (3, 24, 32, 3)


def test_an_unreadable_image_fails_the_build_and_leaves_no_cache(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(LesionLabError, match="bad.jpg"):
        decoded_cache([str(bad)], (24, 32), tmp_path, num_workers=0)
    assert not list((tmp_path / CACHE_DIR).glob("*"))


def _stats(x: torch.Tensor) -> np.ndarray:
    """Per-channel mean and std, the erased fraction (all channels exactly 0 after
    normalisation) and the affine fill fraction (black before normalisation)."""
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    fill = ((x * s + m).abs().amax(1) < 1e-4).float().mean()
    erased = (x.abs().amax(1) == 0).float().mean()
    return np.r_[x.mean((0, 2, 3)).numpy(), x.std((0, 2, 3)).numpy(), float(erased), float(fill)]


def test_batched_augmentation_matches_the_worker_pipelines_statistics(
        small_images: list[str], tmp_path: Path) -> None:
    torch.set_num_threads(2)
    size, draws = (75, 100), 32
    data = TrainSet(small_images, np.zeros(len(small_images), int), size, MEAN, STD,
                    augment="isic")
    cache = np.array(decoded_cache(small_images, size, tmp_path, num_workers=0))
    x = to_device(cache, torch.device("cpu"))
    aug = batch_augment(size, MEAN, STD)
    torch.manual_seed(0)
    workers = _stats(torch.stack([data[i][0] for _ in range(draws)
                                  for i in range(len(small_images))]))
    torch.manual_seed(0)
    batched = _stats(torch.cat([aug(x) for _ in range(draws)]))
    plain = _stats((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    # measured over 4 seeds at 24 draws: seed-to-seed sd of the means 0.02-0.03, of the stds
    # 0.01, of the fractions 0.003; the worker pipeline's PIL colour jitter darkens by about
    # 0.005 in [0, 1] units (uint8 rounding at each step: 0.02 after normalising)
    tol = np.r_[[0.1] * 3, [0.04] * 3, 0.015, 0.012]
    assert np.all(np.abs(batched - workers) < tol), (batched, workers)
    assert 0.03 < batched[6] < 0.06 and 0.03 < batched[7] < 0.09  # erasing and fill happen
    assert np.any(np.abs(plain - workers) > tol)  # no augmentation would be caught


def test_batched_loader_draws_the_worker_loaders_batches(small_images: list[str],
                                                         tmp_path: Path) -> None:
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4])
    weights = np.linspace(1, 2, 12).astype(np.float32)
    cfg = FinetuneConfig(batch_size=5, num_workers=0, seed=3)
    data = TrainSet(small_images, labels, (75, 100), MEAN, STD, weights=weights)
    want = [(t.tolist(), w.tolist()) for _, t, w in train_loader(data, labels, cfg, 2)]
    cache = decoded_cache(small_images, (75, 100), tmp_path, num_workers=0)
    loader = BatchedLoader(train_loader(IndexSet(labels, weights), labels, cfg, 2), cache,
                           np.arange(12), batch_augment((75, 100), MEAN, STD),
                           torch.device("cpu"))
    got = [(x, t.tolist(), w.tolist()) for x, t, w in loader]
    assert len(loader) == len(want) == 2  # drop_last: 12 // 5
    assert [g[1:] for g in got] == want
    assert all(x.shape == (5, 3, 75, 100) and x.dtype == torch.float32 for x, _, _ in got)


def test_cached_val_probabilities_equal_the_eval_transforms(small_images: list[str],
                                                            tmp_path: Path) -> None:
    from models.finetune import predict_proba
    from featurize.extract import tta_views

    torch.manual_seed(0)
    model, spec = build_model(FinetuneConfig(), 7)
    cache = decoded_cache(small_images, (75, 100), tmp_path, 4 / 3, "shades_of_gray",
                          spec.interpolation, num_workers=0)
    rows = np.array([3, 0, 7, 11])
    got = cached_proba(model, cache, rows, spec.mean, spec.std, torch.device("cpu"),
                       lambda x: tta_views(x, "flip"), torch.no_grad)
    want = predict_proba(model, [small_images[i] for i in rows], spec, (75, 100),
                         torch.device("cpu"), tta="flip", color_constancy="shades_of_gray",
                         aspect=4 / 3)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_batched_pipeline_config_and_name() -> None:
    cfg = FinetuneConfig(input_pipeline="batched")
    assert "batched" in cfg.model_name() and "batched" not in FinetuneConfig().model_name()
    with pytest.raises(LesionLabError, match="isic augmentation only"):
        FinetuneConfig(input_pipeline="batched", augment="basic").validate()
    with pytest.raises(LesionLabError, match="isic augmentation only"):
        batch_augment((24, 32), MEAN, STD, "basic")


def test_tiny_batched_run_is_seeded_and_keeps_one_cache(fixture_dir: Path,
                                                        tmp_path: Path) -> None:
    from tests.test_finetune import TINY

    ds = load_dataset(fixture_dir)
    cfg = FinetuneConfig(epochs=1, input_pipeline="batched", **TINY)
    a = finetune(ds, tmp_path, cfg)
    b = finetune(ds, tmp_path, replace(cfg, name="again"))  # the same cache, the same run
    assert a.config.input_pipeline == "batched" and a.details.epochs_run == 1
    assert a.details.history[0]["train_loss"] == b.details.history[0]["train_loss"]
    assert a.val["balanced_accuracy"] == b.val["balanced_accuracy"]
    assert len(list((tmp_path / CACHE_DIR).glob("*.npy"))) == 1
