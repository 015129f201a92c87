"""``python -m models.calibrate``: the second output per image (probabilities at the training
data's class frequencies), fitted on val, measured on test, carried by the card, given by
predict and the API, and never deciding anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lesionlab.calibration import fit_vector_scaling
from lesionlab.card import load_card
from lesionlab.data import load_dataset
from lesionlab.errors import LesionLabError
from lesionlab.splits import load_or_make_split, split_indices
from models.calibrate import CalibrateConfig, calibrate, prevalence_map
from models.predict import predict_images, predict_proba
from tests.conftest import run_module


def test_the_map_moves_uniform_prior_probabilities_to_the_data_prevalence() -> None:
    """Gaussian classes of prevalence 0.7 / 0.2 / 0.1 scored by the exact posterior under a
    uniform prior (what a balanced sampler trains toward): the fitted map's biases recover
    log prevalence up to a constant, and P(mel)'s Brier score and ECE on fresh rows drop."""
    rng = np.random.default_rng(0)
    prior, means = np.array([0.1, 0.7, 0.2]), np.array([0.0, 1.5, 3.0])

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.choice(3, n, p=prior)
        x = rng.normal(means[y], 1.0)
        lik = np.exp(-0.5 * (x[:, None] - means[None]) ** 2)
        return lik / lik.sum(1, keepdims=True), y

    (pv, yv), (pt, yt) = draw(4000), draw(4000)
    card = SimpleNamespace(classes=["mel", "nv", "bkl"])
    block = prevalence_map(card, (pv, yv), (pt, yt, np.arange(len(yt)).astype(str)), n_boot=50)
    bias = np.array(block["bias"])
    np.testing.assert_allclose(bias - bias.mean(), np.log(prior) - np.log(prior).mean(),
                               atol=0.15)
    np.testing.assert_allclose(block["weight"], 1.0, atol=0.1)
    test = block["test"]
    assert test["calibrated"]["mel"]["brier"] < test["model"]["mel"]["brier"] - 0.005
    assert test["calibrated"]["mel"]["ece"] < 0.5 * test["model"]["mel"]["ece"]
    assert block["val_class_frequencies"]["nv"] == pytest.approx((yv == 1).mean())
    lo, hi = test["model"]["mel"]["ci95"]["brier"]
    assert lo <= test["model"]["mel"]["brier"] <= hi


def test_calibrate_writes_the_map_and_predict_gives_both_outputs(trained_models,
                                                                 fixture_dir: Path,
                                                                 tmp_path: Path,
                                                                 capsys) -> None:
    ds = load_dataset(fixture_dir)
    work = tmp_path / "runs"
    folder = tmp_path / "network"  # a copy: calibrate writes into the card
    shutil.copytree(trained_models["finetune"], folder)
    img = [str(p) for p in sorted((fixture_dir / "images").glob("*.jpg"))[:4]]
    before = predict_images(folder, img)
    assert all(r["prevalence_probabilities"] is None for r in before)
    weights = (folder / "model.pt").read_bytes()
    done = run_module(capsys, "models.calibrate", "--model", str(folder), "--data",
                      str(fixture_dir), "--workdir", str(work), "--n-boot", "20")
    assert done.returncode == 0, done.stderr[-400:]
    assert "decisions unchanged" in done.stdout
    calibrated = load_card(folder)
    assert (folder / "model.pt").read_bytes() == weights  # the network is untouched
    # the map is vector scaling fitted on the model's own val probabilities
    _, va, _ = split_indices(ds, load_or_make_split(ds, work, 0))
    p_val = predict_proba(folder, ds.frame["path"].iloc[va].tolist())
    want = fit_vector_scaling(p_val, ds.labels[va])
    np.testing.assert_allclose(calibrated.prevalence_map["weight"], want.weight, atol=1e-4)
    np.testing.assert_allclose(calibrated.prevalence_map["bias"], want.bias, atol=1e-4)
    after = predict_images(folder, img)
    for b, a in zip(before, after):
        assert (a["prediction"], a["decisions"], a["probabilities"]) == (
            b["prediction"], b["decisions"], b["probabilities"])  # nothing decided moves
        p = np.array(list(a["probabilities"].values()))
        q = np.array(list(a["prevalence_probabilities"].values()))
        np.testing.assert_allclose(q, want(p[None])[0], atol=2e-5)
        assert abs(q.sum() - 1) < 1e-5 and np.abs(q - p).max() > 1e-3


def test_calibrate_refuses_other_data_and_the_card_checks_the_map(fixture_dir: Path,
                                                                   tmp_path: Path) -> None:
    from tests.conftest import ROOT

    folder = tmp_path / "shipped"
    shutil.copytree(ROOT / "pretrained" / "lesionlab-lite0", folder)
    before = (folder / "card.json").read_bytes()
    with pytest.raises(LesionLabError, match="is not the data model lesionlab-lite0 was trained"):
        calibrate(CalibrateConfig(model=folder, data=fixture_dir, workdir=tmp_path / "w"))
    assert (folder / "card.json").read_bytes() == before  # nothing written
    raw = json.loads((folder / "card.json").read_text())
    raw["prevalence_map"] = {"weight": [1.0] * 6, "bias": [0.0] * 7}
    (folder / "card.json").write_text(json.dumps(raw))
    with pytest.raises(LesionLabError, match="prevalence_map"):
        load_card(folder)
