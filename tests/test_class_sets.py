"""Issue 21 item 3: the class set comes from the data (an 8-class ISIC-2019-style set with scc),
mapping classes at evaluation, and melanoma-vs-rest scoring of binary labels."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from lesionlab import metrics
from lesionlab.data import (BINARY_CLASSES, CLASSES, KNOWN_CLASSES, class_set,
                            load_dataset, load_external_labels)
from lesionlab.errors import LesionLabError
from tests.conftest import FIXTURE

LESIONS_PER_CLASS = 4  # the fewest a train/val/test split takes (lesionlab.splits)


def _write(root: Path, meta: pd.DataFrame) -> Path:
    (root / "images").mkdir(parents=True)
    for image_id in meta["image_id"]:
        shutil.copy(FIXTURE / "images" / f"{image_id}.jpg", root / "images")
    meta.to_csv(root / "HAM10000_metadata.csv", index=False)
    return root


@pytest.fixture(scope="module")
def class_sets(tmp_path_factory) -> dict:
    """Two small HAM10000-format folders from the fixture images: ``ham7`` (4 lesions of each
    of the 7 classes) and ``isic8`` (the same plus 4 other lesions relabelled ``scc``), and a
    classical-feature head trained on each."""
    from featurize.extract import FeaturizeConfig, featurize
    from models.train_head import HeadConfig, train_head

    work = tmp_path_factory.mktemp("class_sets")
    meta = pd.read_csv(FIXTURE / "HAM10000_metadata.csv")
    sizes = meta.groupby("lesion_id")["image_id"].transform("size")
    lesions = {dx: list(g.assign(n=sizes).sort_values("n", kind="stable")["lesion_id"]
                        .drop_duplicates()) for dx, g in meta.groupby("dx")}  # fewest images first
    base = [lesion for dx in CLASSES for lesion in lesions[dx][:LESIONS_PER_CLASS]]
    scc = [lesions[dx][LESIONS_PER_CLASS] for dx in ("akiec", "bcc", "df", "mel")]
    ham7 = meta[meta["lesion_id"].isin(base)]
    isic8 = meta[meta["lesion_id"].isin(base + scc)].copy()
    isic8.loc[isic8["lesion_id"].isin(scc), "dx"] = "scc"
    out = {"work": work, "ham7": _write(work / "ham7", ham7),
           "isic8": _write(work / "isic8", isic8),
           "n_scc": int(isic8["lesion_id"].isin(scc).sum())}
    for name in ("ham7", "isic8"):
        ds, workdir = load_dataset(out[name]), work / f"work_{name}"
        featurize(ds, workdir, FeaturizeConfig(backbone="classical", num_workers=0))
        card = train_head(ds, workdir, HeadConfig(features="classical", trials=1, folds=2,
                                                  n_boot=10, name=f"head_{name}"))
        out[f"model_{name}"] = workdir / "models" / card.name
    return out


def test_class_set_from_the_rows() -> None:
    assert class_set(["nv", "mel"]) == CLASSES  # HAM10000's 7 stay the default
    assert class_set(["mel", "scc", "nv", "akiec", "bcc", "bkl", "df", "vasc"]) == KNOWN_CLASSES
    pad = ["scc", "nv", "mel", "bkl", "bcc", "akiec"]  # PAD-UFES-20's 6, in canonical order
    assert class_set(pad) == ("akiec", "bcc", "bkl", "mel", "nv", "scc")
    assert class_set(["mel", "not_mel"]) == BINARY_CLASSES
    with pytest.raises(LesionLabError, match=r"unknown class\(es\) \['xyz'\]"):
        class_set(["nv", "xyz"])


def test_eight_classes_train_evaluate_predict_serve(class_sets) -> None:
    from lesionlab.card import load_card
    from models.evaluate import evaluate_model
    from models.predict import predict_proba
    from serve.app import create_app

    ds = load_dataset(class_sets["isic8"])
    assert ds.classes == KNOWN_CLASSES and set(ds.frame["label"]) == set(range(8))
    assert ds.labels[ds.frame["dx"].eq("scc").to_numpy()].tolist() == [7] * class_sets["n_scc"]
    model = class_sets["model_isic8"]
    card = load_card(model)
    assert card.classes == list(KNOWN_CLASSES)
    assert list(card.test["per_class"]) == list(KNOWN_CLASSES)
    paths = ds.frame["path"].tolist()[:3]
    proba = predict_proba(model, paths)
    assert proba.shape == (3, 8) and np.allclose(proba.sum(axis=1), 1)
    res = evaluate_model(model, load_external_labels(class_sets["isic8"]), n_boot=10,
                         workdir=class_sets["work"] / "eval")
    overall = res["overall"]
    assert list(overall["per_class_recall"]) == list(KNOWN_CLASSES)
    assert overall["unmapped"] == {} and overall["absent_classes"] == []
    assert overall["balanced_accuracy"] == pytest.approx(
        np.mean(list(overall["per_class_recall"].values())))
    client = TestClient(create_app(model))
    info = client.get("/api/model").json()
    assert list(info["classes"]) == list(KNOWN_CLASSES)
    assert info["classes"]["scc"] == "Squamous cell carcinoma"
    with open(paths[0], "rb") as fh:
        out = client.post("/api/predict", files={"image": ("x.jpg", fh.read(), "image/jpeg")})
    assert out.status_code == 200, out.text
    probs = out.json()["probabilities"]
    assert list(probs) == list(KNOWN_CLASSES)
    np.testing.assert_allclose(list(probs.values()), proba[0], atol=1e-5)


def test_seven_class_model_on_eight_class_data_counts_the_unmapped(class_sets, caplog) -> None:
    from models.evaluate import evaluate_model

    data = load_external_labels(class_sets["isic8"])
    with caplog.at_level("WARNING", logger="lesionlab"):
        res = evaluate_model(class_sets["model_ham7"], data, n_boot=10,
                             workdir=class_sets["work"] / "eval")
    n_scc = class_sets["n_scc"]
    overall = res["overall"]
    assert overall["unmapped"] == {"scc": n_scc}
    assert overall["n"] == len(data) - n_scc
    assert list(overall["per_class_recall"]) == list(CLASSES)
    lines = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(lines) == 1 and f"(scc {n_scc})" in lines[0]


def test_model_classes_absent_from_the_data_and_no_mappable_image(class_sets,
                                                                  tmp_path: Path) -> None:
    from models.evaluate import evaluate_model

    meta = pd.read_csv(class_sets["isic8"] / "HAM10000_metadata.csv")
    sub = meta[meta["dx"].isin(["nv", "mel", "scc"])]
    folder = _write(tmp_path / "three", sub)
    res = evaluate_model(class_sets["model_ham7"], load_external_labels(folder), n_boot=0,
                         workdir=class_sets["work"] / "eval")
    assert res["overall"]["absent_classes"] == ["akiec", "bcc", "bkl", "df", "vasc"]
    assert set(res["overall"]["per_class_recall"]) == {"mel", "nv"}
    only_scc = _write(tmp_path / "scc", meta[meta["dx"] == "scc"])
    with pytest.raises(LesionLabError, match="no image has a class of the model"):
        evaluate_model(class_sets["model_ham7"], load_external_labels(only_scc), n_boot=0)


def test_binary_melanoma_labels_are_scored_melanoma_vs_rest(class_sets,
                                                            tmp_path: Path) -> None:
    from lesionlab.card import load_card
    from models.evaluate import evaluate_model, model_proba

    meta = pd.read_csv(class_sets["ham7"] / "HAM10000_metadata.csv")
    meta["dx"] = np.where(meta["dx"] == "mel", "mel", "not_mel")
    data = load_external_labels(_write(tmp_path / "binary", meta[["image_id", "lesion_id",
                                                                  "dx"]]))
    assert data.classes == BINARY_CLASSES
    model = class_sets["model_ham7"]
    cache = class_sets["work"] / "eval"
    res = evaluate_model(model, data, n_boot=20, workdir=cache)
    assert res["mode"] == "melanoma_vs_rest"
    card = load_card(model)
    p_mel = model_proba(model, data, cache, card=card)[:, CLASSES.index("mel")]
    y = (data.frame["dx"] == "mel").to_numpy().astype(int)
    from sklearn.metrics import roc_auc_score

    overall = res["overall"]
    assert overall["n"] == len(data) and overall["n_mel"] == int(y.sum()) > 0
    assert overall["auc"] == pytest.approx(roc_auc_score(y, p_mel))
    op = overall["operating_point"]
    flagged = p_mel >= card.mel_threshold
    assert op["threshold"] == card.mel_threshold
    assert op["sensitivity"] == pytest.approx(flagged[y == 1].mean())
    assert op["specificity"] == pytest.approx(1 - flagged[y == 0].mean())
    assert overall["auc_ci95"][0] <= overall["auc"] <= overall["auc_ci95"][1]
    from lesionlab.splits import make_split

    with pytest.raises(LesionLabError, match="binary melanoma labels"):
        make_split(data)


def test_metrics_follow_the_class_set() -> None:
    pad = ("akiec", "bcc", "bkl", "mel", "nv", "scc")
    y = np.array([0, 1, 2, 3, 4, 5, 3, 3])
    proba = np.eye(6)[[0, 1, 2, 3, 4, 5, 4, 3]]
    res = metrics.evaluate(y, proba, classes=pad)
    assert list(res["per_class"]) == list(pad)
    assert res["mel_sensitivity"] == pytest.approx(2 / 3)  # mel is index 3 here, not 4
    no_mel = ("bcc", "nv", "scc")
    res = metrics.evaluate(np.array([0, 1, 2]), np.eye(3), classes=no_mel)
    assert np.isnan(res["mel_sensitivity"]) and res["balanced_accuracy"] == 1.0


def test_without_a_mel_class_there_is_no_melanoma_rule() -> None:
    from models.heads import HeadModel
    from models.predict import NO_MELANOMA_RULE, result_line

    classes = ("bcc", "nv", "scc")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), np.repeat([0, 1, 2], 10)
    head = HeadModel(params={"C": 1.0, "pca": 0}, class_names=classes).fit(x + y[:, None], y)
    assert head.predict_proba(x).shape == (30, 3)
    assert np.isnan(head.choose_mel_threshold(x, y))
    line = result_line("a.jpg", np.array([0.2, 0.3, 0.5]), 0.4, classes)
    assert line["prediction"] == "scc" and line["name"] == "Squamous cell carcinoma"
    assert line["decisions"]["melanoma_rule"] == NO_MELANOMA_RULE
    assert list(line["probabilities"]) == list(classes)
