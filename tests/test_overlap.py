"""models.evaluate leaves out the model's training images; strict JSON; the audit command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from lesionlab import audit
from lesionlab.data import load_external_labels
from lesionlab.errors import LesionLabError
from lesionlab.fingerprint import TRAIN_DIGESTS, read_train_digests
from models.bundle import load_card
from models.evaluate import leave_out_training_images, main as evaluate_main
from tests.conftest import FIXTURE


def _refuse(name: str) -> None:
    raise ValueError(f"not strict JSON: {name}")


def _folder(root: Path, ids: list[str], meta: pd.DataFrame,
            renamed: dict[str, str] | None = None) -> Path:
    """A labelled folder of fixture images (``renamed``: image id -> the id it is stored as)."""
    renamed = renamed or {}
    (root / "images").mkdir(parents=True)
    rows = meta.set_index("image_id").loc[ids, ["dx"]].reset_index()
    rows["image_id"] = [renamed.get(i, i) for i in ids]
    for i in ids:
        shutil.copy(FIXTURE / "images" / f"{i}.jpg", root / "images" / f"{renamed.get(i, i)}.jpg")
    rows.to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture(scope="module")
def head(trained_models) -> Path:
    return trained_models["head"]


def test_evaluate_leaves_out_the_training_images_it_finds(head: Path, tmp_path: Path,
                                                          capsys) -> None:
    card = load_card(head)
    meta = pd.read_csv(FIXTURE / "HAM10000_metadata.csv")
    ids = card.train_image_ids[:10] + card.test_image_ids[:4]  # the 10 of 14
    data = _folder(tmp_path / "ten", ids, meta)
    out = tmp_path / "scores.json"
    assert evaluate_main(["--model", str(head), "--data", str(data), "--n-boot", "0",
                          "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ("train overlap: 10 of 14 evaluation images are in the model's training set "
            "(10 by id, 0 more by content); left out: scoring 4") in printed
    saved = json.loads(out.read_text(), parse_constant=_refuse)
    assert saved["overall"]["n"] == 4
    assert saved["train_overlap"] == {"n_labelled": 14, "in_training": 10, "by_id": 10,
                                      "by_content_only": 0, "content_checked": True,
                                      "kept": False}
    assert evaluate_main(["--model", str(head), "--data", str(data), "--n-boot", "0",
                          "--keep-train-overlap", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["overall"]["n"] == 14


def test_a_training_image_under_another_name_is_found_by_content(head: Path,
                                                                 tmp_path: Path) -> None:
    card = load_card(head)
    assert len(read_train_digests(head)) == len(set(card.train_image_ids))
    meta = pd.read_csv(FIXTURE / "HAM10000_metadata.csv")
    ids = card.train_image_ids[:2] + card.test_image_ids[:3]
    data = _folder(tmp_path / "renamed", ids, meta, {i: f"copy_{i}" for i in ids[:2]})
    kept, info = leave_out_training_images(head, load_external_labels(data))
    assert (info["in_training"], info["by_id"], info["by_content_only"]) == (2, 0, 2)
    assert kept.frame["image_id"].tolist() == ids[2:]
    with pytest.raises(LesionLabError, match="all 2 images .* are in the training set"):
        leave_out_training_images(head, load_external_labels(
            _folder(tmp_path / "all", ids[:2], meta)))


def test_a_folder_without_digests_is_checked_by_id_and_says_so(head: Path,
                                                               tmp_path: Path) -> None:
    from models.evaluate import overlap_line

    bare = tmp_path / "model"
    shutil.copytree(head, bare)
    (bare / TRAIN_DIGESTS).unlink()
    card = load_card(head)
    meta = pd.read_csv(FIXTURE / "HAM10000_metadata.csv")
    ids = card.train_image_ids[:1] + card.test_image_ids[:2]
    data = _folder(tmp_path / "d", ids, meta, {ids[0]: "renamed"})
    _, info = leave_out_training_images(bare, load_external_labels(data))
    assert info["in_training"] == 0 and info["content_checked"] is False
    assert "records no training digests" in overlap_line(info)


def test_one_class_folder_writes_strict_json_with_nulls(head: Path, tmp_path: Path) -> None:
    card = load_card(head)
    meta = pd.read_csv(FIXTURE / "HAM10000_metadata.csv").set_index("image_id")
    unseen = sorted(set(meta.index) - set(card.train_image_ids))
    nv = [i for i in unseen if meta.loc[i, "dx"] == "nv"][:3]
    data = _folder(tmp_path / "nv", nv, meta.reset_index())
    out = tmp_path / "one_class.json"
    assert evaluate_main(["--model", str(head), "--data", str(data), "--n-boot", "20",
                          "--out", str(out)]) == 0
    text = out.read_text()
    assert "NaN" not in text
    saved = json.loads(text, parse_constant=_refuse)
    assert saved["overall"]["n"] == 3
    assert saved["overall"]["macro_auc"] is None  # undefined with one class present


def test_audit_counts_exact_and_near_copies_within_and_between(tmp_path: Path,
                                                              capsys) -> None:
    images = sorted((FIXTURE / "images").glob("*.jpg"))
    train, ext = tmp_path / "train", tmp_path / "ext"
    train.mkdir()
    ext.mkdir()
    for p in images[:6]:
        shutil.copy(p, train)
    shutil.copy(images[0], train / "dup_of_0.jpg")  # exact, inside train
    shutil.copy(images[1], ext / "same_as_1.jpg")  # exact, between
    Image.open(images[2]).save(ext / "reencoded_2.jpg", quality=50)  # near, between
    shutil.copy(images[10], ext / "other.jpg")
    out = tmp_path / "audit.json"
    assert audit.main([str(train), "--against", str(ext), "--out", str(out),
                       "--workdir", str(tmp_path / "work")]) == 0
    res = json.loads(out.read_text(), parse_constant=_refuse)
    assert res["n_images"] == 7 and res["within"]["exact_pairs"] == 1
    assert sorted(res["within"]["exact"][0][:2]) == sorted([images[0].stem, "dup_of_0"])
    between = res["against"]["between"]
    assert between["exact"] == [[images[1].stem, "same_as_1", 0]]
    assert [p[:2] for p in between["near"]] == [[images[2].stem, "reencoded_2"]]
    assert (res["against"]["images_with_exact_copy"], res["against"]["images_with_near_copy"]) \
        == (1, 1)
    printed = capsys.readouterr().out
    assert "1 of its images have an exact copy" in printed and "1 more a near one" in printed
