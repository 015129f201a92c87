"""Colour constancy (Shades of Gray, p=6): known outputs, and the option through the stages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurize.color import apply_color_constancy, shades_of_gray
from featurize.extract import FeaturizeConfig, featurize, resolve_key
from lesionlab.data import load_dataset
from tests.conftest import FIXTURE


def test_constant_cast_becomes_neutral_grey() -> None:
    img = Image.new("RGB", (40, 30), (200, 100, 50))
    out = np.asarray(shades_of_gray(img))
    # illuminant (200, 100, 50) -> unit vector; each channel scaled to |e| / sqrt(3) = 132.29
    assert out.shape == (30, 40, 3) and (out == 132).all()


def test_colour_cast_is_removed_from_a_texture() -> None:
    rng = np.random.default_rng(0)
    grey = rng.uniform(40, 200, size=(60, 80))
    cast = np.stack([grey * 1.0, grey * 0.8, grey * 0.6], axis=-1)
    img = Image.fromarray(np.round(cast).astype(np.uint8))
    before = np.asarray(img, dtype=float).reshape(-1, 3).mean(0)
    after = np.asarray(shades_of_gray(img), dtype=float).reshape(-1, 3).mean(0)
    assert before[2] / before[0] < 0.65
    assert np.ptp(after) / after.mean() < 0.02  # the three channel means agree
    assert apply_color_constancy(img, "none") is img
    with pytest.raises(ValueError, match="unknown colour constancy"):
        apply_color_constancy(img, "grey_world")
    black = Image.new("RGB", (8, 8))
    assert np.asarray(shades_of_gray(black)).max() == 0


def test_option_enters_the_cache_key_and_features(tmp_path: Path) -> None:
    ds = load_dataset(FIXTURE)
    plain = featurize(ds, tmp_path, FeaturizeConfig(backbone="classical", num_workers=0))
    sog = featurize(ds, tmp_path, FeaturizeConfig(backbone="classical", num_workers=0,
                                                  color_constancy="shades_of_gray"))
    assert "shades_of_gray" in sog.key and "shades_of_gray" not in plain.key
    assert not np.allclose(plain.features, sog.features)
    assert sog.manifest["settings"]["color_constancy"] == "shades_of_gray"
    assert resolve_key(tmp_path, "classical:shades_of_gray") == sog.path
    assert resolve_key(tmp_path, "classical") == plain.path


def test_finetuned_model_records_and_reuses_it(tmp_path: Path) -> None:
    from models.finetune import FinetuneConfig, finetune
    from models.predict import predict_images

    ds = load_dataset(FIXTURE)
    card = finetune(ds, tmp_path, FinetuneConfig(epochs=1, image_size=(48, 64), batch_size=16,
                                                 num_workers=0, n_boot=0, tta="none",
                                                 color_constancy="shades_of_gray"))
    # the recipe's default: only the other choice is spelled out in the folder name
    assert "cc-" not in card.name
    assert "cc-none" in FinetuneConfig(color_constancy="none").model_name()
    assert card.config.color_constancy == "shades_of_gray"  # a setting, kept once:
    assert "color_constancy" not in dataclasses.asdict(card.details)
    folder = tmp_path / "models" / card.name
    ids = card.test_image_ids[:3]
    paths = ds.frame.set_index("image_id").loc[ids, "path"].tolist()
    got = [[r["probabilities"][c] for c in card.classes] for r in predict_images(folder, paths)]
    np.testing.assert_allclose(got, np.load(folder / "test_proba.npy")[:3], atol=2e-3)
