"""Issue 19: exact feature resolution, metrics over the classes present without warning
floods, and one documented image-size limit."""

from __future__ import annotations

import logging
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks import run_all as ra
from featurize.extract import FeaturizeConfig, featurize, resolve_key
from lesionlab import metrics
from lesionlab.data import CLASSES, MAX_IMAGE_PIXELS, load_dataset, load_external_labels, load_rgb
from lesionlab.errors import LesionLabError, flush_warnings, warning_counts
from models.bundle import load_card
from models.train_head import HeadConfig, train_head
from tests.conftest import FIXTURE

SMALL, OTHER = (48, 64), (36, 48)  # small image sizes (the classical default is 150x200)


def _classical(size: tuple[int, int] | None = None) -> FeaturizeConfig:
    return FeaturizeConfig(backbone="classical", image_size=size, num_workers=0)


# --- 1. feature resolution -------------------------------------------------------------------

def test_study_cells_read_the_sets_they_made_not_another_size(tmp_path: Path,
                                                              monkeypatch) -> None:
    ds = load_dataset(FIXTURE)
    other = featurize(ds, tmp_path, _classical(OTHER))  # made earlier at another size
    head = HeadConfig(features="classical", trials=1, folds=2, n_boot=0)
    plan = ra.Plan(featurize=[_classical(SMALL)], cells=[ra._head_cell(head)],
                   curve_fractions=())
    monkeypatch.setattr(ra, "plan_for", lambda preset, seed, workdir, gpu=False: plan)
    summary = ra.run_all(FIXTURE, tmp_path, "smoke", report=None, download=False)
    mine = featurize(ds, tmp_path, _classical(SMALL))
    assert mine.key != other.key
    card = load_card(summary["rows"][0]["model_dir"])
    assert [b["key"] for b in card.details.features] == [mine.key]
    assert card.details.features[0]["image_size"] == list(SMALL)
    assert card.config.features == "classical"  # names and labels keep the short form


def test_short_name_needs_one_match_or_says_how_to_pick(tmp_path: Path) -> None:
    from featurize.extract import pinned_feature_sets

    ds = load_dataset(FIXTURE)
    small = featurize(ds, tmp_path, _classical(SMALL))
    with pytest.raises(LesionLabError, match="unknown option 'bogus'"):
        resolve_key(tmp_path, "classical:bogus")
    assert resolve_key(tmp_path, "classical") == small.path  # one set: the short form works
    other_set = featurize(ds, tmp_path, _classical(OTHER))
    with pytest.raises(LesionLabError) as exc:
        resolve_key(tmp_path, "classical")
    text = str(exc.value)
    assert "\n" not in text and small.key in text and other_set.key in text
    assert "--features classical:none,avg,48x64" in text
    assert "--features classical:none,avg,36x48" in text
    assert resolve_key(tmp_path, "classical:none,avg,48x64") == small.path
    assert resolve_key(tmp_path, "classical:36x48") == other_set.path
    sha = small.manifest["weights_sha256"][:8]
    assert resolve_key(tmp_path, f"classical:w{sha},48x64") == small.path
    with pinned_feature_sets([other_set.key]):
        assert resolve_key(tmp_path, "classical") == other_set.path
    with pytest.raises(LesionLabError, match="several"):  # the pin ends with the block
        resolve_key(tmp_path, "classical")


# --- 2. metrics over the classes present, one counted warning ---------------------------------

def test_balanced_accuracy_ignores_predicted_classes_absent_from_labels() -> None:
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 2, 1, 1])  # class 2 is predicted, never true
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.balanced_accuracy(y_true, y_pred) == pytest.approx(0.75)
    proba = np.eye(7)[y_pred] * 0.9 + 0.1 / 7
    flush_warnings()
    res = metrics.evaluate(y_true, proba, n_boot=0)
    assert res["balanced_accuracy"] == pytest.approx(0.75)
    absent = res["per_class"][CLASSES[2]]
    assert np.isnan(absent["recall"]) and absent["precision"] == 0.0 and absent["support"] == 0
    assert np.isnan(res["per_class"][CLASSES[5]]["precision"])  # never true, never predicted
    assert res["per_class"][CLASSES[0]]["recall"] == pytest.approx(0.5)
    assert warning_counts() == {metrics.ABSENT_CLASSES_WARNING: 1}
    flush_warnings()


@pytest.fixture(scope="module")
def head_and_sources(tmp_path_factory) -> tuple[Path, Path, list]:
    """A classical head trained on the fixture (warnings recorded), and a labelled folder
    without df and vasc whose images come from two sources."""
    work = tmp_path_factory.mktemp("work")
    ds = load_dataset(FIXTURE)
    featurize(ds, work, _classical(SMALL))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        card = train_head(ds, work, HeadConfig(features="classical", trials=2, folds=2,
                                               n_boot=20))
    flush_warnings()
    ext = tmp_path_factory.mktemp("ext")
    shutil.copytree(FIXTURE / "images", ext / "images")
    meta = pd.read_csv(FIXTURE / "HAM10000_metadata.csv")
    meta = meta[~meta["dx"].isin(["df", "vasc"])].reset_index(drop=True)
    meta["dataset"] = np.where(np.arange(len(meta)) % 2 == 0, "site_a", "site_b")
    meta.to_csv(ext / "labels.csv", index=False)
    return work / "models" / card.name, ext, list(caught)


def _sklearn_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught if "sklearn" in str(w.filename)
            or "y_pred contains classes" in str(w.message)]


def test_train_head_on_small_data_raises_no_sklearn_metric_warnings(head_and_sources) -> None:
    assert _sklearn_warnings(head_and_sources[2]) == []


def test_evaluate_by_source_warns_once_with_a_count(head_and_sources, caplog) -> None:
    from models.evaluate import evaluate_model

    model, ext, _ = head_and_sources
    dataset = load_external_labels(ext)
    flush_warnings()
    with warnings.catch_warnings(record=True) as caught, \
            caplog.at_level(logging.WARNING, logger="lesionlab"):
        warnings.simplefilter("always")
        res = evaluate_model(model, dataset, by="dataset", n_boot=50)
    assert _sklearn_warnings(caught) == []
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warning")]
    assert len(lines) == 1 and "df, vasc" in lines[0]
    assert warning_counts() == {metrics.ABSENT_CLASSES_WARNING: 3}  # overall + 2 sources
    flush_warnings()
    recall = res["overall"]["per_class_recall"]
    assert set(recall) == set(CLASSES) - {"df", "vasc"}
    assert res["overall"]["balanced_accuracy"] == pytest.approx(np.mean(list(recall.values())))
    assert sum(g["n"] for g in res["by"]["groups"].values()) == len(dataset) == 63


# --- 3. one image-size limit ------------------------------------------------------------------

def _png_header(path: Path, width: int, height: int) -> Path:
    """A few-hundred-byte PNG whose header claims ``width`` x ``height`` (pixels truncated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_the_documented_100_mp_limit_is_the_one_applied(head_and_sources,
                                                        tmp_path: Path) -> None:
    from models.predict import predict_images

    assert MAX_IMAGE_PIXELS == 100_000_000
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "100 MP" in readme
    under = _png_header(tmp_path / "under.png", 11314, 8459)  # 95.7 MP
    over = _png_header(tmp_path / "over.png", 11314, 8900)  # 100.7 MP
    with pytest.raises(LesionLabError, match="corrupt or unreadable") as exc:
        load_rgb(under)  # the size is accepted; only its truncated pixels fail
    assert "too large" not in str(exc.value)
    with pytest.raises(LesionLabError, match=r"too large.*11314x8900.*100,000,000"):
        load_rgb(over)
    good = sorted((FIXTURE / "images").glob("*.jpg"))[0]
    res = predict_images(head_and_sources[0], [str(under), str(over), str(good)])
    assert "corrupt or unreadable" in res[0]["error"]
    assert "too large" in res[1]["error"] and res[2]["prediction"] in CLASSES
