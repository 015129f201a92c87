"""models.evaluate: any model folder on any labelled folder, overall and per image source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lesionlab.data import load_external_labels
from lesionlab.errors import LesionLabError
from lesionlab.metrics import balanced_accuracy
from models.evaluate import SCORE_KEYS, evaluate_model, model_proba
from tests.conftest import FIXTURE, run_module


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> Path:
    """The fixture as an external set: labels.csv with a dataset column, two sources."""
    root = tmp_path_factory.mktemp("ext")
    shutil.copytree(FIXTURE / "images", root / "images")
    meta = pd.read_csv(FIXTURE / "HAM10000_metadata.csv")
    meta["dataset"] = np.where(np.arange(len(meta)) % 3 == 0, "external", "vidir_modern")
    meta.to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture
def models(trained_models) -> dict[str, Path]:
    return trained_models


@pytest.mark.parametrize("kind", ["head_meta", "head", "finetune"])
def test_evaluate_by_source(models, two_sources: Path, kind: str, tmp_path: Path) -> None:
    ext = load_external_labels(two_sources)
    res = evaluate_model(models[kind], ext, by="dataset", n_boot=10)  # CIs present, not tight
    assert set(res) == {"model", "data", "tta", "overall", "by"} and res["tta"] is None
    assert set(res["overall"]) == set(SCORE_KEYS)
    groups = res["by"]["groups"]
    assert set(groups) == {"external", "vidir_modern"}
    assert groups["external"]["n"] == 29 and groups["vidir_modern"]["n"] == 58
    proba = model_proba(models[kind], ext)
    is_ext = ext.frame["dataset"].to_numpy() == "external"
    assert groups["external"]["balanced_accuracy"] == pytest.approx(
        balanced_accuracy(ext.labels[is_ext], proba[is_ext].argmax(1)))
    assert res["overall"]["balanced_accuracy"] == pytest.approx(
        balanced_accuracy(ext.labels, proba.argmax(1)))


def test_metadata_columns_reach_a_head_that_uses_them(models, two_sources: Path) -> None:
    ext = load_external_labels(two_sources)
    blank = load_external_labels(two_sources)
    blank.frame[["age", "sex", "localization"]] = np.nan
    assert not np.allclose(model_proba(models["head_meta"], ext),
                           model_proba(models["head_meta"], blank))
    np.testing.assert_allclose(model_proba(models["head"], ext),
                               model_proba(models["head"], blank))


def test_evaluate_cli_json_and_bad_column(models, two_sources: Path, tmp_path: Path,
                                          capsys) -> None:
    out = tmp_path / "scores.json"
    proc = run_module(capsys, "models.evaluate", "--model", str(models["head"]), "--data",
                      str(two_sources), "--by", "dataset", "--out", str(out), "--n-boot", "20",
                      "--keep-train-overlap")  # the fixture is the model's training data
    assert proc.returncode == 0, proc.stderr[-400:]
    assert "dataset=external" in proc.stdout and "bal.acc" in proc.stdout
    saved = json.loads(out.read_text())
    assert saved["by"]["column"] == "dataset" and saved["overall"]["n"] == 87
    with pytest.raises(LesionLabError, match="--by 'centre' is not a column"):
        evaluate_model(models["head"], load_external_labels(two_sources), by="centre")


def test_evaluate_names_every_unreadable_image_in_one_line(models, two_sources: Path,
                                                           tmp_path: Path, capsys) -> None:
    data = tmp_path / "ext"
    shutil.copytree(two_sources, data)
    images = sorted(data.rglob("*.jpg"))
    images[3].write_bytes(b"")
    images[7].write_text("not an image")
    images[11].write_bytes(images[12].read_bytes()[:200])
    proc = run_module(capsys, "models.evaluate", "--model", str(models["finetune"]), "--data",
                      str(data), "--n-boot", "0", "--keep-train-overlap")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 3 of 87 images cannot be read (fix or remove them): ")
    assert all(images[i].name in last for i in (3, 7, 11))


def test_d4_tta_override_changes_a_networks_probabilities_not_a_heads(models,
                                                                       two_sources: Path) -> None:
    from models.evaluate import model_proba

    ds = load_external_labels(two_sources)
    sub = type(ds)(root=ds.root, frame=ds.frame.iloc[:6].reset_index(drop=True))
    card_tta = model_proba(models["finetune"], sub)
    d4 = model_proba(models["finetune"], sub, tta="d4")
    assert d4.shape == card_tta.shape and np.allclose(d4.sum(1), 1)
    assert not np.allclose(d4, card_tta)
    assert np.array_equal(model_proba(models["head"], sub, tta="d4"),
                          model_proba(models["head"], sub))
    assert evaluate_model(models["finetune"], sub, n_boot=0, tta="d4")["tta"] == "d4"
