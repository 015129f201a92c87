"""The split-seed study of heads on cached features: runs, spread, resume, report block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks import run_all as ra
from benchmarks.report import replace_block
from benchmarks.seeds import (SeedStudy, head_seed_study, load_seed_record, pair_differences,
                              per_seed, results_path, seeds_md, spread)
from lesionlab.artifacts import read_json, write_json
from lesionlab.data import load_dataset
from lesionlab.errors import LesionLabError
from models.bundle import load_card
from models.train_head import HeadConfig
from tests.conftest import FIXTURE

BASE = HeadConfig(features="classical", trials=1, folds=2, n_boot=20, tune_timeout=None)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> tuple[Path, SeedStudy, dict]:
    """Two pipelines x two split seeds on the fixture's hand-made features."""
    from featurize.extract import FeaturizeConfig, featurize

    work = tmp_path_factory.mktemp("seeds")
    ds = load_dataset(FIXTURE)
    featurize(ds, work, FeaturizeConfig(backbone="classical", num_workers=0))
    full = head_seed_study(BASE, (0, 1))
    study = SeedStudy({k: full.pipelines[k] for k in ("logreg, class weights", "logreg, SMOTE")},
                      (0, 1), (("logreg, class weights", "logreg, SMOTE"),))
    plan = ra.Plan(featurize=[], seeds=study)
    return work, study, ra.run_seeds(plan, ds, work)


def test_each_seed_resplits_and_scores_its_own_test_images(seeded) -> None:
    work, study, record = seeded
    assert record == read_json(results_path(work / "results")) == load_seed_record(
        work / "results")
    for label in study.pipelines:
        seeds = record["pipelines"][label]["seeds"]
        assert sorted(seeds) == ["0", "1"]
        cards = [load_card(work / "models" / seeds[s]["name"]) for s in ("0", "1")]
        assert [c.config.split_seed for c in cards] == [None, 1]
        assert [c.config.seed for c in cards] == [0, 0]  # the model seed stays
        assert set(cards[0].test_image_ids) != set(cards[1].test_image_ids)
        vals = [seeds[s]["balanced_accuracy"] for s in ("0", "1")]
        assert all(0 <= v <= 1 for v in vals)
        assert vals == [c.test["balanced_accuracy"] for c in cards]
        auc = per_seed(record, label, "macro_auc")
        assert auc == {0: cards[0].test["macro_auc"], 1: cards[1].test["macro_auc"]}
        assert auc[0] != auc[1]  # 14 test images: balanced accuracy alone may tie


def test_spread_and_paired_differences_are_numpys(seeded) -> None:
    _, _, record = seeded
    a, b = "logreg, class weights", "logreg, SMOTE"
    va = [record["pipelines"][a]["seeds"][s]["macro_auc"] for s in ("0", "1")]
    vb = [record["pipelines"][b]["seeds"][s]["macro_auc"] for s in ("0", "1")]
    st = spread(va)
    assert st["mean"] == pytest.approx(np.mean(va)) and st["n"] == 2
    assert st["sd"] == pytest.approx(np.std(va, ddof=1)) and st["sd"] > 0
    diffs = pair_differences(record, a, b, "macro_auc")
    assert diffs == {0: va[0] - vb[0], 1: va[1] - vb[1]}
    assert np.isnan(spread([0.5])["sd"])
    block = seeds_md(record)
    row = next(line for line in block.splitlines()
               if line.startswith(f"| {a} | classical | macro AUC |"))
    assert f"| {np.mean(va):.3f} | {np.std(va, ddof=1):.3f} | {va[0]:.3f} | {va[1]:.3f} |" in row
    pair = next(line for line in block.splitlines()
                if line.startswith(f"| {a} - {b} | macro AUC |"))
    d = list(diffs.values())
    assert f"| {np.mean(d):+.3f} | {np.std(d, ddof=1):.3f} | {sum(x > 0 for x in d)}/2 |" in pair
    report = replace_block("# R\n\nprose\n", "seeds", block)
    assert "<!-- seeds:start -->" in report and "split 1" in report and "prose" in report
    assert "No split-seed study" in seeds_md(None)


def test_a_rerun_reuses_saved_seeds_and_redoes_only_missing_ones(seeded, monkeypatch) -> None:
    work, study, record = seeded
    ds = load_dataset(FIXTURE)
    plan = ra.Plan(featurize=[], seeds=study)
    calls = []

    def counted(cell, *args, **kwargs):
        calls.append(cell.cell_id)
        return real(cell, *args, **kwargs)

    real = ra.run_cell
    monkeypatch.setattr(ra, "run_cell", counted)
    assert ra.run_seeds(plan, ds, work) == record and calls == []
    # one seed's entry lost: that seed alone is taken again (from its cell's saved result)
    path = results_path(work / "results")
    saved = read_json(path)
    gone = saved["pipelines"]["logreg, SMOTE"]["seeds"].pop("1")
    write_json(path, saved)
    again = ra.run_seeds(plan, ds, work)
    assert calls == [gone["name"]]
    assert again["pipelines"]["logreg, SMOTE"]["seeds"]["1"]["balanced_accuracy"] == \
        gone["balanced_accuracy"]
    # fewer seeds asked for: the record holds only those
    fewer = ra.run_seeds(ra.with_split_seeds(ra.Plan(featurize=[], seeds=study), 0, 1), ds,
                         work)
    assert all(list(p["seeds"]) == ["0"] for p in fewer["pipelines"].values())


def test_a_seed_study_rejects_unknown_pairs_and_repeated_seeds() -> None:
    study = head_seed_study(BASE, (0, 1))
    with pytest.raises(LesionLabError, match="unknown pipelines"):
        SeedStudy(study.pipelines, (0, 1), (("logreg, class weights", "SVM"),))
    with pytest.raises(LesionLabError, match="repeat"):
        SeedStudy(study.pipelines, (0, 0))
    assert study.config("LightGBM, class weights", 0).head == "lightgbm"
    assert study.config("logreg, SMOTE", 3).model_name() == \
        "classical__logreg__smote__split3__seed0"
