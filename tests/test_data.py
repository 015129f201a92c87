"""Data layer: loading, validation errors, image modes, layouts, external label formats."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesionlab.data import CLASSES, load_dataset, load_external_labels, load_rgb
from lesionlab.errors import LesionLabError
from tests.conftest import run_module


def test_fixture_loads_all_classes(fixture_dir: Path) -> None:
    ds = load_dataset(fixture_dir, verify_images=True)
    assert len(ds) == 87
    assert set(ds.frame["dx"]) == set(CLASSES)
    assert ds.labels.min() == 0 and ds.labels.max() == 6
    assert all(Path(p).is_file() for p in ds.frame["path"])


def test_official_part_folders_layout(data_copy: Path) -> None:
    imgs = sorted((data_copy / "images").glob("*.jpg"))
    for i, img in enumerate(imgs):
        part = data_copy / f"HAM10000_images_part_{1 + i % 2}"
        part.mkdir(exist_ok=True)
        shutil.move(img, part / img.name)
    (data_copy / "images").rmdir()
    ds = load_dataset(data_copy)
    assert len(ds) == 87
    assert ds.frame["path"].str.contains("part_2").any()


def test_fingerprint_changes_with_images(data_copy: Path) -> None:
    fp1 = load_dataset(data_copy).fingerprint()
    meta = pd.read_csv(data_copy / "HAM10000_metadata.csv")
    meta.iloc[:-1].to_csv(data_copy / "HAM10000_metadata.csv", index=False)
    assert load_dataset(data_copy).fingerprint() != fp1


@pytest.mark.parametrize("edit, expected", [
    (lambda d: (d / "HAM10000_metadata.csv").unlink(), "metadata CSV not found"),
    (lambda d: pd.read_csv(d / "HAM10000_metadata.csv").drop(columns=["lesion_id"]).to_csv(
        d / "HAM10000_metadata.csv", index=False), "lacks column(s) ['lesion_id']"),
    (lambda d: pd.read_csv(d / "HAM10000_metadata.csv").assign(dx="keratoacanthoma").to_csv(
        d / "HAM10000_metadata.csv", index=False), "unknown class(es) ['keratoacanthoma']"),
    (lambda d: [p.unlink() for p in sorted((d / "images").glob("*.jpg"))[:3]],
     "3 image(s) listed"),
    (lambda d: shutil.rmtree(d / "images"), "no images"),
])
def test_bad_folders_get_named_errors(data_copy: Path, edit, expected: str) -> None:
    edit(data_copy)
    with pytest.raises(LesionLabError, match=None) as err:
        load_dataset(data_copy)
    assert expected in str(err.value)


def test_missing_folder_and_empty_csv(tmp_path: Path) -> None:
    with pytest.raises(LesionLabError, match="data folder not found"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "HAM10000_metadata.csv").write_text("")
    with pytest.raises(LesionLabError, match="cannot parse"):
        load_dataset(tmp_path)


def test_corrupt_image_is_named(data_copy: Path) -> None:
    victim = sorted((data_copy / "images").glob("*.jpg"))[5]
    victim.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(LesionLabError, match=victim.name):
        load_dataset(data_copy, verify_images=True)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "RGB"])
def test_any_mode_and_size_loads_as_rgb(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"x_{mode}.png"
    Image.new(mode, (600, 450)).save(path)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (600, 450)


def test_cli_user_errors_are_one_line(tmp_path: Path, capsys) -> None:
    proc = run_module(capsys, "lesionlab.splits", "--data", str(tmp_path / "missing"), "--workdir",
                      str(tmp_path / "wd"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "data folder not found" in proc.stderr


def test_cli_bad_dx_exits_nonzero(data_copy: Path, tmp_path: Path, capsys) -> None:
    meta = pd.read_csv(data_copy / "HAM10000_metadata.csv")
    meta.loc[0, "dx"] = "xyz"
    meta.to_csv(data_copy / "HAM10000_metadata.csv", index=False)
    proc = run_module(capsys, "lesionlab.splits", "--data", str(data_copy), "--workdir",
                      str(tmp_path))
    assert proc.returncode == 2
    assert "unknown class(es) ['xyz']" in proc.stderr and "Traceback" not in proc.stderr


def test_external_ham_format(data_copy: Path) -> None:
    meta = pd.read_csv(data_copy / "HAM10000_metadata.csv")[["image_id", "dx"]]
    (data_copy / "HAM10000_metadata.csv").unlink()
    meta.to_csv(data_copy / "labels.csv", index=False)
    ds = load_external_labels(data_copy)
    assert len(ds) == 87
    assert (ds.frame["lesion_id"] == ds.frame["image_id"]).all()


def test_external_isic2018_format(data_copy: Path) -> None:
    meta = pd.read_csv(data_copy / "HAM10000_metadata.csv")
    (data_copy / "HAM10000_metadata.csv").unlink()
    cols = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    onehot = pd.DataFrame(0.0, index=meta.index, columns=cols)
    for i, dx in enumerate(meta["dx"]):
        onehot.loc[i, dx.upper()] = 1.0
    gt = pd.concat([meta[["image_id"]].rename(columns={"image_id": "image"}), onehot], axis=1)
    gt.to_csv(data_copy / "ISIC2018_Task3_GroundTruth.csv", index=False)
    ds = load_external_labels(data_copy)
    assert list(ds.frame["dx"]) == list(meta["dx"])


def test_external_malformed_csv(data_copy: Path) -> None:
    (data_copy / "HAM10000_metadata.csv").unlink()
    pd.DataFrame({"file": ["a"], "label": ["mel"]}).to_csv(data_copy / "l.csv", index=False)
    with pytest.raises(LesionLabError, match="neither known format"):
        load_external_labels(data_copy)
    pd.DataFrame({"image": ["a"], **{c: [0.5] for c in
                  ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]}}).to_csv(
        data_copy / "l.csv", index=False)
    with pytest.raises(LesionLabError, match="one-hot"):
        load_external_labels(data_copy)


def test_labels_follow_the_isic_class_order(fixture_dir: Path) -> None:
    """Label k is the k-th class of the ISIC 2018 order, written out here, not recomputed."""
    assert CLASSES == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    ds = load_dataset(fixture_dir)
    expected = {"akiec": 0, "bcc": 1, "bkl": 2, "df": 3, "mel": 4, "nv": 5, "vasc": 6}
    for dx, label in zip(ds.frame["dx"], ds.labels):
        assert label == expected[dx]
    assert np.bincount(ds.labels, minlength=7).min() > 0


def test_external_needs_exactly_one_label_csv(data_copy: Path) -> None:
    (data_copy / "HAM10000_metadata.csv").rename(data_copy / "a.csv")
    pd.read_csv(data_copy / "a.csv").to_csv(data_copy / "b.csv", index=False)
    with pytest.raises(LesionLabError, match=r"exactly one label CSV; found \['a.csv', 'b.csv'\]"):
        load_external_labels(data_copy)
    (data_copy / "a.csv").unlink()
    (data_copy / "b.csv").unlink()
    with pytest.raises(LesionLabError, match=r"exactly one label CSV; found \[\]"):
        load_external_labels(data_copy)
