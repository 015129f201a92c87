"""Content fingerprints, duplicates in the split, the split cache's key, label rows, strict JSON."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesionlab import fingerprint
from lesionlab.artifacts import write_json
from lesionlab.data import load_dataset, load_external_labels
from lesionlab.errors import LesionLabError, flush_warnings, warning_counts
from lesionlab.fingerprint import (cache_path, exact_pairs, fingerprint_paths,
                                   merge_duplicate_groups, near_pairs, perceptual_hash,
                                   phash_bits)
from lesionlab.splits import load_or_make_split, make_split
from tests.conftest import FIXTURE

IMAGES = sorted((FIXTURE / "images").glob("*.jpg"))


def _refuse(name: str) -> None:
    raise ValueError(f"not strict JSON: {name}")


def _distance(a: str, b: str) -> int:
    return int(near_pairs(phash_bits([a]), phash_bits([b]), 256)[0, 2])


def test_exif_orientation_is_applied_before_hashing(tmp_path: Path) -> None:
    img = Image.open(IMAGES[0]).convert("RGB")  # 200x150 landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: display rotated 90 degrees clockwise
    img.save(tmp_path / "tagged.png", exif=exif)
    img.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")
    img.save(tmp_path / "untagged.png")
    tagged, upright = perceptual_hash(tmp_path / "tagged.png"), perceptual_hash(
        tmp_path / "upright.png")
    assert tagged == upright
    assert _distance(tagged, perceptual_hash(tmp_path / "untagged.png")) > fingerprint.NEAR_DISTANCE


def test_cache_is_reused_and_refreshed_by_size_and_mtime(tmp_path: Path, monkeypatch) -> None:
    paths = []
    for i, src in enumerate(IMAGES[:3]):
        paths.append(tmp_path / f"im{i}.jpg")
        shutil.copy(src, paths[-1])
    shutil.copy(IMAGES[0], tmp_path / "copy.jpg")
    paths.append(tmp_path / "copy.jpg")
    cache = cache_path(tmp_path / "work", tmp_path)
    first = fingerprint_paths([str(p) for p in paths], cache, progress=False)
    assert cache.is_file() and first["sha256"][0] == first["sha256"][3]
    assert first["sha256"].nunique() == 3 and first["phash"].str.len().eq(64).all()
    calls: list[str] = []
    real = fingerprint._fingerprint_one
    monkeypatch.setattr(fingerprint, "_fingerprint_one",
                        lambda p: calls.append(p) or real(p))
    again = fingerprint_paths([str(p) for p in paths], cache, progress=False)
    pd.testing.assert_frame_equal(first, again)
    assert calls == []
    Image.open(IMAGES[5]).save(paths[1], quality=50)  # an edited image: new bytes and mtime
    edited = fingerprint_paths([str(p) for p in paths], cache, progress=False)
    assert calls == [str(paths[1])]
    assert edited["sha256"][1] != first["sha256"][1]


def test_every_unreadable_image_is_named_in_one_run_and_good_hashes_are_kept(
        tmp_path: Path) -> None:
    good = [tmp_path / f"ok{i}.jpg" for i in range(3)]
    for src, dst in zip(IMAGES, good):
        shutil.copy(src, dst)
    bad = [tmp_path / "empty.jpg", tmp_path / "text.jpg", tmp_path / "cut.jpg"]
    bad[0].write_bytes(b"")
    bad[1].write_text("not an image")
    bad[2].write_bytes(IMAGES[3].read_bytes()[:300])
    cache = cache_path(tmp_path / "work", tmp_path)
    paths = [str(p) for p in good + bad]
    with pytest.raises(LesionLabError) as err:
        fingerprint_paths(paths, cache, progress=False)
    msg = str(err.value)
    assert msg.startswith("3 of 6 images cannot be read (fix or remove them): ")
    assert len(msg.splitlines()) == 1 and all(p.name in msg for p in bad)
    assert sorted(pd.read_csv(cache)["path"]) == sorted(map(str, good))  # not lost
    with pytest.raises(LesionLabError, match=r"^corrupt or unreadable image: .*text.jpg"):
        fingerprint_paths(paths[:3] + paths[4:5], cache, progress=False)  # one: as it is
    with pytest.raises(LesionLabError, match=r"^2 of 3 images cannot be read .*image not "
                                             r"found: .*gone1.jpg; image not found: .*gone2"):
        fingerprint_paths([paths[0], str(tmp_path / "gone1.jpg"), str(tmp_path / "gone2.jpg")])


def test_pairs_and_merged_groups() -> None:
    assert exact_pairs(["a", "b", "a", "c", "a"]).tolist() == [[0, 2], [0, 4], [2, 4]]
    assert exact_pairs(["a", "b"], ["b", "x", "a"]).tolist() == [[0, 2], [1, 0]]
    bits = phash_bits([f"{v:064x}" for v in (0, 0b111, 0b1111111 << 64, (1 << 256) - 1)])
    assert near_pairs(bits, max_distance=3).tolist() == [[0, 1, 3]]
    assert near_pairs(bits, max_distance=10).tolist() == [[0, 1, 3], [0, 2, 7], [1, 2, 10]]
    # L2 and L3 share a picture, L3 and L4 another: one group, named by the smallest id
    groups, pairs, folded = merge_duplicate_groups(
        ["L3", "L2", "L3", "L4", "L1", "L1"], ["x", "x", "y", "y", "z", "z"])
    assert groups.tolist() == ["L2", "L2", "L2", "L2", "L1", "L1"]
    assert (pairs, folded) == (2, 2)  # the L1 pair shares a lesion id: not counted


def _two_apart(split: pd.DataFrame) -> tuple[str, str]:
    """Two images of different lesions that the split puts on different sides."""
    a = split.iloc[0]
    b = split[(split["split"] != a["split"]) & (split["lesion_id"] != a["lesion_id"])].iloc[0]
    return a["image_id"], b["image_id"]


def test_exact_duplicates_under_other_lesion_ids_share_a_split(data_copy: Path, tmp_path: Path,
                                                                caplog) -> None:
    ds = load_dataset(data_copy)
    plain = make_split(ds, seed=0)
    a, b = _two_apart(plain)
    paths = ds.frame.set_index("image_id")["path"]
    shutil.copy(paths[a], paths[b])  # b is now a byte-identical copy of a
    flush_warnings()
    with caplog.at_level(logging.WARNING, logger="lesionlab"):
        split = load_or_make_split(load_dataset(data_copy), tmp_path, seed=0)
    side = split.set_index("image_id")["split"]
    assert side[a] == side[b]
    lines = [r.getMessage() for r in caplog.records if "byte-identical" in r.getMessage()]
    assert len(lines) == 1 and "1 pair(s)" in lines[0] and "1 lesion id(s) joined" in lines[0]
    moved = (split["split"] != plain["split"]).sum()
    assert moved >= 1  # the pair moved together, other lesions may follow


def test_cached_split_is_remade_when_lesion_ids_change(data_copy: Path, tmp_path: Path) -> None:
    first = load_or_make_split(load_dataset(data_copy), tmp_path)
    a, b = _two_apart(first)
    meta = pd.read_csv(data_copy / "HAM10000_metadata.csv")
    meta.loc[meta["image_id"] == b, "lesion_id"] = meta.loc[meta["image_id"] == a,
                                                             "lesion_id"].iloc[0]
    meta.to_csv(data_copy / "HAM10000_metadata.csv", index=False)
    flush_warnings()
    again = load_or_make_split(load_dataset(data_copy), tmp_path)
    assert any(k.startswith("stale-split:") for k in warning_counts())
    side = again.set_index("image_id")
    assert side.loc[a, "lesion_id"] == side.loc[b, "lesion_id"]
    assert side.loc[a, "split"] == side.loc[b, "split"]
    assert (again.groupby("lesion_id")["split"].nunique() == 1).all()
    # unchanged labels: the file is reused as it is
    pd.testing.assert_frame_equal(again, load_or_make_split(load_dataset(data_copy), tmp_path))


def _labels_folder(tmp_path: Path, rows: list[dict]) -> Path:
    root = tmp_path / "ext"
    (root / "images").mkdir(parents=True)
    for r in rows:
        shutil.copy(FIXTURE / "images" / f"{r['image_id']}.jpg", root / "images")
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def test_whitespace_lesion_ids_are_blank_not_one_group(tmp_path: Path) -> None:
    ids = [p.stem for p in IMAGES[:3]]
    root = _labels_folder(tmp_path, [{"image_id": ids[0], "dx": "nv", "lesion_id": "   "},
                                     {"image_id": ids[1], "dx": "nv", "lesion_id": " "},
                                     {"image_id": ids[2], "dx": "nv", "lesion_id": "L9"}])
    ds = load_external_labels(root)
    assert ds.frame["lesion_id"].tolist() == [ids[0], ids[1], "L9"]


def test_an_image_listed_twice(tmp_path: Path) -> None:
    ids = [p.stem for p in IMAGES[:3]]
    rows = [{"image_id": ids[0], "dx": "nv"}, {"image_id": ids[1], "dx": "mel"},
            {"image_id": ids[0], "dx": "nv"}, {"image_id": ids[2], "dx": "bcc"}]
    flush_warnings()
    ds = load_external_labels(_labels_folder(tmp_path / "same", rows))
    assert ds.frame["image_id"].tolist() == [ids[0], ids[1], ids[2]]
    assert sum(v for k, v in warning_counts().items() if k.startswith("repeated-rows:")) == 1
    rows[2] = {"image_id": ids[0], "dx": "mel"}
    with pytest.raises(LesionLabError, match=rf"1 image\(s\) twice with different \['dx'\]: "
                                             rf"\['{ids[0]}'\]"):
        load_external_labels(_labels_folder(tmp_path / "conflict", rows))


def test_training_metadata_listing_an_image_twice(data_copy: Path) -> None:
    meta = pd.read_csv(data_copy / "HAM10000_metadata.csv")
    pd.concat([meta, meta.iloc[[4]]]).to_csv(data_copy / "HAM10000_metadata.csv", index=False)
    assert len(load_dataset(data_copy)) == len(meta)
    bad = meta.iloc[[4]].assign(lesion_id="HAM_other")
    pd.concat([meta, bad]).to_csv(data_copy / "HAM10000_metadata.csv", index=False)
    with pytest.raises(LesionLabError, match=r"different \['lesion_id'\]"):
        load_dataset(data_copy)


def test_write_json_is_strict(tmp_path: Path) -> None:
    write_json(tmp_path / "x.json", {"a": float("nan"), "b": [np.float32("inf"), 1.5],
                                     "c": np.int64(3), "d": np.array([np.nan, 2.0]),
                                     "e": np.bool_(True), "f": -float("inf")})
    text = (tmp_path / "x.json").read_text()
    assert json.loads(text, parse_constant=_refuse) == {
        "a": None, "b": [None, 1.5], "c": 3, "d": [None, 2.0], "e": True, "f": None}

