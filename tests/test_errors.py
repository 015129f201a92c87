"""benchmarks.errors: confusions, breakdowns, the vignette mask, calibration evidence and the
report blocks, on hand-made arrays and the small fixture models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks import errors as er
from benchmarks.comparisons import Scored
from benchmarks.report import MARKERS, replace_block
from lesionlab.artifacts import read_json
from lesionlab.errors import LesionLabError


def test_top_confusions_count_and_share_by_hand() -> None:
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([1, 1, 0, 0, 1, 0])
    got = er.top_confusions(y, pred, ["a", "b", "c"], k=2)
    # a -> b twice (2 of 3 a's); then c -> a (1 of 1) before b -> a (1 of 2): ties by share
    assert got == [{"true": "a", "predicted": "b", "count": 2, "share": 2 / 3},
                   {"true": "c", "predicted": "a", "count": 1, "share": 1.0}]
    assert len(er.top_confusions(y, pred, ["a", "b", "c"], k=5)) == 3  # only real errors
    with pytest.raises(LesionLabError, match="3 labels for 2 predictions"):
        er.top_confusions(y[:3], pred[:2], ["a", "b", "c"])


@pytest.mark.parametrize("age, band", [(0.0, "<30"), (29.9, "<30"), (30.0, "30-44"),
                                       (44.9, "30-44"), (45.0, "45-59"), (59.0, "45-59"),
                                       (60.0, "60-74"), (74.5, "60-74"), (75.0, ">=75"),
                                       (85.0, ">=75"), (float("nan"), "unknown"),
                                       (None, "unknown")])
def test_age_bands(age: float | None, band: str) -> None:
    assert er.age_band(age) == band


def test_negative_age_is_refused() -> None:
    with pytest.raises(LesionLabError, match="negative"):
        er.age_band(-1.0)


def test_breakdown_scores_cells_and_flags_small_ones() -> None:
    # 40 histo images: classes 0/1 (20 each), 15 of class 0 right, 10 of class 1 right;
    # 10 consensus images, all class 1, 7 right
    y = np.array([0] * 20 + [1] * 20 + [1] * 10)
    pred = np.array([0] * 15 + [1] * 5 + [1] * 10 + [0] * 10 + [1] * 7 + [0] * 3)
    frame = pd.DataFrame({"dx_type": ["histo"] * 40 + ["consensus"] * 10,
                          "age": [50.0] * 40 + [np.nan] * 10,
                          "localization": ["back"] * 50})
    got = er.breakdown(frame, y, pred, min_cell=30)
    assert set(got) == {"dx_type", "age band", "site"}  # no `dataset` column: no source
    histo, cons = got["dx_type"]["histo"], got["dx_type"]["consensus"]
    assert histo == {"n": 40, "metric": "balanced_accuracy", "score": (15 / 20 + 10 / 20) / 2,
                     "error_rate": 15 / 40, "interpretable": True}
    assert cons["metric"] == "accuracy" and cons["score"] == pytest.approx(0.7)
    assert cons["error_rate"] == pytest.approx(0.3) and cons["interpretable"] is False
    assert list(got["age band"]) == ["45-59", "unknown"]  # by falling n
    assert got["age band"]["unknown"]["n"] == 10
    with pytest.raises(LesionLabError, match="49 metadata rows"):
        er.breakdown(frame.iloc[:49], y, pred)


def test_vignette_mask_sets_corners_to_the_inside_mean() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    img[:3, :3] = 0  # a dark vignette corner
    out = er.mask_vignette(img)
    inside = er.vignette_mask(30, 40)
    mean = np.rint(img[inside].mean(axis=0)).astype(np.uint8)
    assert out.shape == img.shape and out.dtype == np.uint8
    for corner in ((0, 0), (0, 39), (29, 0), (29, 39)):
        assert (out[corner] == mean).all()
    assert (out[15, 20] == img[15, 20]).all() and (out[inside] == img[inside]).all()
    # the ellipse touches the sides' middles and leaves the corners out
    assert inside[15, 0] and inside[0, 20] and not inside[0, 0]
    assert er.vignette_mask(30, 40, 0.5).sum() < inside.sum()
    with pytest.raises(LesionLabError, match="height, width, 3"):
        er.mask_vignette(img[..., 0])
    with pytest.raises(LesionLabError, match="scale"):
        er.vignette_mask(30, 40, 0.0)


def _row(name: str, kind: str, val: float, test: float, input_kind: str | None = None) -> dict:
    return {"name": name, "kind": kind, "group": "main", "input": input_kind,
            "val_balanced_accuracy": val, "balanced_accuracy": test}


def test_rows_are_chosen_on_val_never_test() -> None:
    rows = [_row("stack", "head", 0.80, 0.70, "fine-tuned embedding"),
            _row("net", "finetune", 0.70, 0.90),
            _row("frozen-a", "head", 0.60, 0.75, "ImageNet embedding"),
            _row("frozen-b", "head", 0.65, 0.60, "hand-made features"),
            {**_row("curve", "head", 0.99, 0.99, "ImageNet embedding"), "group": "curve"}]
    got = er.chosen_rows(rows)
    assert {k: r["name"] for k, r in got.items()} == {"recommended": "stack",
                                                      "best frozen head": "frozen-b"}
    assert er.chosen_rows([]) == {}


def _scored(n: int, seed: int, sharp: float) -> Scored:
    """n images of 3 classes; the true class's logit raised by ``sharp`` (overconfident)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 1.0
    p = np.exp(sharp * logits)
    p /= p.sum(axis=1, keepdims=True)
    return Scored(np.array([f"img{seed}_{i}" for i in range(n)]), p, y,
                  np.array([f"les{seed}_{i // 2}" for i in range(n)]))


def test_per_class_cis_hold_their_point_estimates() -> None:
    s = _scored(300, 1, 1.0)
    got = er.analyse_set(s, None, ("akiec", "mel", "nv"), er.ErrorsConfig(n_boot=200))
    assert got["n"] == 300 and got["breakdown"] == {}
    pred = s.proba.argmax(axis=1)
    mel = got["per_class"]["mel"]
    assert mel["support"] == int((s.labels == 1).sum())
    assert mel["recall"] == pytest.approx(((pred == 1) & (s.labels == 1)).sum()
                                          / (s.labels == 1).sum())
    for row in got["per_class"].values():
        for kind in ("recall", "precision"):
            lo, hi = row[f"{kind}_ci95"]
            assert lo <= row[kind] <= hi and hi - lo > 0


def test_overconfident_model_gets_the_maps_compared_on_val() -> None:
    classes = ("akiec", "mel", "nv")
    val, test = _scored(400, 2, 4.0), _scored(300, 3, 4.0)  # sharp: top-label ECE high
    cfg = er.ErrorsConfig(n_boot=100)
    got = er.calibration(test, val, cfg, classes)
    assert got["val_ece"] > cfg.ece_high
    maps = got["maps"]
    assert set(maps["val"]) == {"none", "temperature", "vector", "dirichlet"}
    assert maps["chosen"] == min(maps["val"], key=lambda m: maps["val"][m]["nll"])
    assert maps["chosen"] != "none"  # a temperature < 1 fixes a sharpened softmax
    assert maps["test"][maps["chosen"]]["ece"] < maps["test"]["none"]["ece"]
    mel = got["mel"]
    brier = float(np.mean((test.proba[:, 1] - (test.labels == 1)) ** 2))
    assert mel["brier"] == pytest.approx(brier)
    lo, hi = mel["ci95"]["brier"]
    assert lo <= brier <= hi
    lo, hi = got["top_label"]["ci95"]
    assert lo <= got["top_label"]["ece"] <= hi
    assert got["val_mel_ece"] == pytest.approx(er.class_score_calibration(
        val.labels, val.proba, 1)["ece"])
    chosen_test = maps["test"][maps["chosen"]]
    assert 0 <= chosen_test["mel_ece"] <= 1 and 0 <= chosen_test["mel_brier"] <= 1
    prevalence = np.bincount(val.labels, minlength=3) / len(val.labels)
    none = maps["test"]["none"]  # the model's own probabilities: decisions from test.proba
    assert none["balanced_accuracy"] == pytest.approx(er.balanced_accuracy(
        test.labels, test.proba.argmax(1)))
    assert none["balanced_accuracy_prevalence"] == pytest.approx(er.balanced_accuracy(
        test.labels, er.prevalence_decisions(test.proba, prevalence)))
    md = er._maps_md({"m": {"calibration": got}}, cfg)
    row = next(line for line in md.splitlines() if line.startswith("| m | none |"))
    assert f"{none['balanced_accuracy']:.3f} / {none['balanced_accuracy_prevalence']:.3f}" in row
    # both val ECEs at most the bar: the model's own temperature scaling is kept, unless asked
    assert er.calibration(test, val, er.ErrorsConfig(n_boot=20, ece_high=0.9),
                          classes)["maps"] is None
    forced = er.calibration(test, val, er.ErrorsConfig(n_boot=20, ece_high=0.9,
                                                       compare_maps=True), classes)["maps"]
    assert forced["chosen"] == maps["chosen"]
    assert er.calibration(test, None, cfg, classes)["maps"] is None


def test_blocks_render_flags_and_cis() -> None:
    cell = {"n": 9, "metric": "accuracy", "score": 1.0, "error_rate": 0.0,
            "interpretable": False}
    analyses = {"recommended": {"name": "m", "sets": {"test": {
        "n": 9, "confusions": [{"true": "mel", "predicted": "nv", "count": 3, "share": 0.25}],
        "breakdown": {"image source": {"vienna_dias": cell}}, "per_class": {}}},
        "artefacts": {"n": 9, "masked": 0.5, "unmasked": 0.6, "difference": -0.1,
                      "ci95": [-0.2, 0.05], "n_used": 100}}}
    text = er.errors_md(analyses, 30)
    assert "| recommended | test | mel -> nv | 3 | 0.25 |" in text
    assert ("| image source | vienna_dias | 9 | 1.000 (accuracy: one class) | 0.000 | "
            "n < 30: not interpretable |") in text
    assert "_No metadata to break the external errors down by._" in text
    arte = er.artefacts_md(analyses, er.ErrorsConfig())
    assert "| 9 | 0.600 | 0.500 | -0.100 [-0.200, +0.050] |" in arte
    for name in er.BLOCKS:  # each block has its report markers
        assert MARKERS[name][0] in replace_block("", name, "x")


def test_error_blocks_on_fixture_models(trained_models, fixture_dir: Path, tmp_path: Path,
                                        monkeypatch) -> None:
    from benchmarks.comparisons import save_external_proba
    from benchmarks.run_all import summarize
    from lesionlab.data import Dataset
    from lesionlab.data import load_dataset
    from lesionlab.splits import load_or_make_split
    from models.bundle import load_card

    ds = load_dataset(fixture_dir)
    split = load_or_make_split(ds, trained_models["head"].parents[1], 0)
    rows = [{**summarize(load_card(trained_models[k])), "group": "main",
             "model_dir": str(trained_models[k])} for k in ("head", "finetune")]
    # the fixture again as an "external" set of two image sources (60 + 27 images)
    ext = Dataset(root=ds.root, frame=ds.frame.assign(dataset=["a"] * 60 + ["b"] * 27),
                  classes=ds.classes)
    rng = np.random.default_rng(0)
    for r in rows:
        save_external_proba(tmp_path, r["name"], ext, rng.dirichlet(np.ones(7), len(ext)))
    cfg = er.ErrorsConfig(n_boot=50, device="cpu")
    blocks = er.error_blocks({"rows": rows, "seed": 0}, ds, split, tmp_path, external=ext,
                             fig_dir=tmp_path / "fig", fig_rel="fig", cfg=cfg)
    assert set(blocks) == set(er.BLOCKS)
    saved = read_json(er.results_path(tmp_path))
    by_label = {label: a for key, a in saved["models"].items() for label in key.split(" = ")}
    frozen = by_label["best frozen head"]
    assert frozen["name"] == rows[0]["name"]
    art = frozen["artefacts"]
    assert art["n"] == len(load_card(trained_models["head"]).test_image_ids)
    assert 0 <= art["masked"] <= 1 and art["unmasked"] == pytest.approx(rows[0]
                                                                        ["balanced_accuracy"])
    assert math.isclose(art["difference"], art["masked"] - art["unmasked"])
    assert (tmp_path / "fig" / "reliability_mel.png").is_file()
    assert "![Reliability of P(mel)](fig/reliability_mel.png)" in blocks["calibration"]
    assert "| class | test n |" in blocks["per_class"]
    external = by_label["recommended"]["sets"]["external"]
    assert external["n"] == 87 and external["breakdown"]["image source"]["a"]["n"] == 60
    assert "| image source | b | 27 |" in blocks["errors"]
    assert blocks["errors"].count("n < 30: not interpretable") >= 1

    def boom(*a, **k):
        raise AssertionError("masked images predicted again")

    import models.folder

    monkeypatch.setattr(models.folder, "load_model_folder", boom)  # cached now
    again = er.error_blocks({"rows": rows, "seed": 0}, ds, split, tmp_path, cfg=cfg)
    assert again["artefacts"] == blocks["artefacts"]
    single = er.error_blocks({"rows": rows[:1], "seed": 0}, ds, split, tmp_path, cfg=cfg)
    assert list(read_json(er.results_path(tmp_path))["models"]) == \
        ["recommended = best frozen head"]  # one row chosen twice: analysed and shown once
    assert single["artefacts"].count(rows[0]["name"]) == 1
    report = tmp_path / "R.md"
    report.write_text("# R\n\nprose\n\n<!-- errors:start -->\nstale table\n<!-- errors:end -->\n")
    er.write_error_blocks(report, {"rows": rows, "seed": 0}, ds, split, tmp_path, cfg=cfg)
    text = report.read_text()
    assert text.startswith("# R\n\nprose\n\n<!-- errors:start -->\nTop confusions")
    assert "stale table" not in text and all(MARKERS[b][1] in text for b in er.BLOCKS)
    assert "](reports/figures/reliability_mel.png)" in text
    assert (tmp_path / "reports" / "figures" / "reliability_mel.png").is_file()


def test_one_folder_outside_a_study_is_predicted_once_and_analysed(trained_models,
                                                                    fixture_dir: Path,
                                                                    tmp_path: Path,
                                                                    monkeypatch) -> None:
    from benchmarks.comparisons import load_scored
    from lesionlab.data import Dataset, load_dataset
    from models.bundle import load_card
    from models.folder import load_model_folder

    ds = load_dataset(fixture_dir)
    net = trained_models["finetune"]
    card = load_card(net)
    before = sorted(p.name for p in net.iterdir())
    row, split = er.folder_row(net, ds, tmp_path, external=ds, device="cpu")
    assert Path(row["model_dir"]).parent == tmp_path / "results" / "errors" / "folders"
    assert sorted(p.name for p in net.iterdir()) == before  # the original is only read
    test = load_scored(row, "test", ds, tmp_path)
    # the copy's test probabilities are the folder's own predictions, in the card's order
    with load_model_folder(net, device="cpu") as model:
        by_id = ds.frame.set_index("image_id")
        want = model.predict_proba(by_id.loc[list(card.test_image_ids), "path"].tolist())
    np.testing.assert_allclose(test.proba, want, atol=1e-6)
    assert list(test.image_ids) == list(card.test_image_ids)
    assert load_scored(row, "external", ds, tmp_path).proba.shape == (len(ds), 7)
    cfg = er.ErrorsConfig(n_boot=20, artefacts=False, device="cpu")
    analysis = er.analyse_row(row, ds, split, tmp_path, ds, cfg)
    md = er.folder_md("shipped model", {**analysis}, cfg, None)
    assert "| class | test n |" in md and "**shipped model**" in md
    assert sum(c["support"] for c in analysis["sets"]["test"]["per_class"].values()) == \
        len(card.test_image_ids)

    def boom(*a, **k):
        raise AssertionError("predicted again")

    import models.folder

    monkeypatch.setattr(models.folder, "load_model_folder", boom)
    assert er.folder_row(net, ds, tmp_path, external=ds, device="cpu")[0] == row  # saved
    other = Dataset(root=ds.root, frame=ds.frame.iloc[:-5].reset_index(drop=True),
                    classes=ds.classes)
    with pytest.raises(LesionLabError,
                       match=r"not the data model .* was trained on \(fingerprint"):
        er.folder_row(net, other, tmp_path / "other", device="cpu")
    assert not (tmp_path / "other").exists()  # refused before any split is written
