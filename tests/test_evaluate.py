"""models.evaluate: any model folder on any labelled folder, overall and per image source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from featurize.extract import FeaturizeConfig, featurize
from lesionlab.data import load_dataset, load_external_labels
from lesionlab.errors import LesionLabError
from lesionlab.metrics import balanced_accuracy
from models.evaluate import SCORE_KEYS, evaluate_model, model_proba
from models.finetune import FinetuneConfig, finetune
from models.train_head import HeadConfig, train_head
from tests.conftest import FIXTURE, run_cli


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> Path:
    """The fixture as an external set: labels.csv with a dataset column, two sources."""
    root = tmp_path_factory.mktemp("ext")
    shutil.copytree(FIXTURE / "images", root / "images")
    meta = pd.read_csv(FIXTURE / "HAM10000_metadata.csv")
    meta["dataset"] = np.where(np.arange(len(meta)) % 3 == 0, "external", "vidir_modern")
    meta.to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("models")
    ds = load_dataset(FIXTURE)
    featurize(ds, work, FeaturizeConfig(backbone="classical", num_workers=0))
    head = train_head(ds, work, HeadConfig(features="classical", metadata=True, trials=1,
                                           folds=2, n_boot=0))
    plain = train_head(ds, work, HeadConfig(features="classical", trials=1, folds=2, n_boot=0))
    net = finetune(ds, work, FinetuneConfig(epochs=1, image_size=(48, 64), batch_size=16,
                                            num_workers=0, n_boot=0, tta="none"))
    return {k: work / "models" / c.name for k, c in
            (("head_meta", head), ("head", plain), ("finetune", net))}


@pytest.mark.parametrize("kind", ["head_meta", "head", "finetune"])
def test_evaluate_by_source(models, two_sources: Path, kind: str, tmp_path: Path) -> None:
    ext = load_external_labels(two_sources)
    res = evaluate_model(models[kind], ext, by="dataset", n_boot=50)
    assert set(res) == {"model", "data", "overall", "by"}
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


def test_evaluate_cli_json_and_bad_column(models, two_sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.json"
    proc = run_cli("models.evaluate", "--model", str(models["head"]), "--data",
                   str(two_sources), "--by", "dataset", "--out", str(out), "--n-boot", "20")
    assert proc.returncode == 0, proc.stderr[-400:]
    assert "dataset=external" in proc.stdout and "bal.acc" in proc.stdout
    saved = json.loads(out.read_text())
    assert saved["by"]["column"] == "dataset" and saved["overall"]["n"] == 87
    with pytest.raises(LesionLabError, match="--by 'centre' is not a column"):
        evaluate_model(models["head"], load_external_labels(two_sources), by="centre")
