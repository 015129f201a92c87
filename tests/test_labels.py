"""Label formats and vocabularies (issue 21, items 1-2): every public format read from a tiny
file the test writes over the fixture images, detection and --labels, the one no-match
error, class and site spellings, ISIC site names reaching the model (they were silently
``unknown``), unknown values stopping training with counts, --label-map, and serve."""

from __future__ import annotations

import logging
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from lesionlab.data import BINARY_CLASSES, NOT_MEL, CLASS_NAMES, CLASSES, KNOWN_CLASSES, load_dataset, load_external_labels
from lesionlab.errors import LesionLabError
from lesionlab.labels import (FORMATS, SITES, VOCABULARY_FILE, default_vocabulary, normalize,
                              read_labels)
from tests.conftest import FIXTURE, ROOT

META = pd.read_csv(FIXTURE / "HAM10000_metadata.csv")
ISIC2019_CODES = {"akiec": "AK", "bcc": "BCC", "bkl": "BKL", "df": "DF", "mel": "MEL",
                  "nv": "NV", "vasc": "VASC"}


@pytest.fixture
def images_only(tmp_path: Path) -> Path:
    """The fixture's images in a folder without any label file."""
    root = tmp_path / "set"
    shutil.copytree(FIXTURE / "images", root / "images")
    return root


def _isic2019(root: Path, with_metadata: bool = True) -> pd.DataFrame:
    """ISIC 2019 ground truth (+ metadata CSV) for the fixture; row 0 SCC, row 1 UNK."""
    cols = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    gt = pd.DataFrame(0.0, index=META.index, columns=cols)
    for i, dx in enumerate(META["dx"]):
        gt.loc[i, ISIC2019_CODES[dx]] = 1.0
    gt.loc[0] = 0.0
    gt.loc[0, "SCC"] = 1.0
    gt.loc[1] = 0.0
    gt.loc[1, "UNK"] = 1.0
    gt.insert(0, "image", META["image_id"])
    gt.to_csv(root / "ISIC_2019_Training_GroundTruth.csv", index=False)
    if with_metadata:
        sites = ["anterior torso", "posterior torso", "head/neck", "palms/soles"]
        pd.DataFrame({"image": META["image_id"], "age_approx": META["age"],
                      "anatom_site_general": [sites[i % 4] for i in range(len(META))],
                      "lesion_id": META["lesion_id"], "sex": META["sex"]}).to_csv(
            root / "ISIC_2019_Training_Metadata.csv", index=False)
    return gt


def test_isic2019_ground_truth_and_metadata(images_only: Path, caplog) -> None:
    _isic2019(images_only)
    with caplog.at_level(logging.WARNING, logger="lesionlab"):
        ds = load_dataset(images_only)
    assert len(ds) == len(META) - 1  # the UNK row is left out, counted and named
    assert "1 row(s) carry no class" in caplog.text and META["image_id"][1] in caplog.text
    frame = ds.frame.set_index("image_id")
    assert frame.loc[META["image_id"][0], "dx"] == "scc"  # a valid SCC row
    assert ds.classes == KNOWN_CLASSES  # 8 classes: HAM10000's 7 + scc, in that order
    assert (ds.frame["dx"] == [ds.classes[i] for i in ds.labels]).all()
    expect = META.set_index("image_id").loc[frame.index[1:]]
    assert (frame["dx"].iloc[1:] == expect["dx"]).all()  # AK -> akiec and the rest
    assert set(frame["localization"]) == {"trunk", "back", "face", "acral"}
    ham = META.set_index("image_id").loc[frame.index]
    assert (frame["lesion_id"] == ham["lesion_id"]).all() and frame["age"].equals(ham["age"])


def test_isic2018_with_an_scc_column_is_not_misread(images_only: Path) -> None:
    """The issue's case: AK renamed AKIEC, a valid SCC row must not fail 'one-hot'."""
    gt = _isic2019(images_only, with_metadata=False).rename(columns={"AK": "AKIEC"})
    (images_only / "ISIC_2019_Training_GroundTruth.csv").unlink()
    gt.to_csv(images_only / "gt.csv", index=False)
    ds = load_external_labels(images_only)
    assert ds.frame["dx"].iloc[0] == "scc" and len(ds) == len(META) - 1
    gt.loc[5, "MEL"] = 1.0  # now two 1s: named
    gt.to_csv(images_only / "gt.csv", index=False)
    with pytest.raises(LesionLabError, match=rf"one-hot.*1 row\(s\).*{META['image_id'][5]}"):
        load_external_labels(images_only)


def test_isic2020_training_csv(images_only: Path) -> None:
    names = {"akiec": "unknown", "bcc": "unknown", "bkl": "seborrheic keratosis",
             "df": "cafe-au-lait macule", "mel": "melanoma", "nv": "nevus",
             "vasc": "lentigo NOS"}
    pd.DataFrame({"image_name": META["image_id"], "patient_id": META["lesion_id"] + "_p",
                  "sex": META["sex"], "age_approx": META["age"],
                  "anatom_site_general_challenge": "torso",
                  "diagnosis": META["dx"].map(names),
                  "benign_malignant": np.where(META["dx"] == "mel", "malignant", "benign"),
                  "target": (META["dx"] == "mel").astype(int)}).to_csv(
        images_only / "train.csv", index=False)
    # most ISIC 2020 diagnoses are "unknown": the file is binary labels from ``target``,
    # every row kept (scored melanoma vs rest; training refuses binary labels)
    ds = load_dataset(images_only)
    assert ds.classes == BINARY_CLASSES and len(ds) == len(META)
    assert ds.frame["dx"].tolist() == np.where(META["dx"] == "mel", "mel", "not_mel").tolist()
    assert set(ds.frame["localization"]) == {"trunk"}
    assert ds.frame["lesion_id"].str.endswith("_p").all()  # the patient groups the images
    # every diagnosis known: the multiclass labels (lentigo NOS -> bkl)
    csv = pd.read_csv(images_only / "train.csv")
    kept = META["dx"].isin(["bkl", "mel", "nv", "vasc"])
    csv[kept.to_numpy()].to_csv(images_only / "train.csv", index=False)
    ds = load_dataset(images_only)
    assert len(ds) == int(kept.sum())
    assert ds.frame["dx"].tolist() == META["dx"][kept].replace("vasc", "bkl").tolist()
    assert ds.frame["target"].tolist() == (META["dx"][kept] == "mel").astype(int).tolist()


def test_padufes20_metadata(images_only: Path) -> None:
    codes = {"akiec": "ACK", "bcc": "BCC", "bkl": "SEK", "df": "SCC", "mel": "MEL",
             "nv": "NEV", "vasc": "NEV"}
    regions = ["FACE", "FOREARM", "THIGH", "NOSE"]
    pd.DataFrame({"patient_id": "PAT_1", "lesion_id": range(len(META)),
                  "img_id": META["image_id"] + ".jpg", "diagnostic": META["dx"].map(codes),
                  "age": META["age"], "gender": META["sex"].str.upper(),
                  "region": [regions[i % 4] for i in range(len(META))],
                  "biopsed": [i % 2 == 0 for i in range(len(META))]}).to_csv(
        images_only / "metadata.csv", index=False)
    ds = load_dataset(images_only)
    assert ds.classes == ("akiec", "bcc", "bkl", "mel", "nv", "scc")
    expected = META["dx"].map({"akiec": "akiec", "bcc": "bcc", "bkl": "bkl", "df": "scc",
                               "mel": "mel", "nv": "nv", "vasc": "nv"})
    assert ds.frame["dx"].tolist() == expected.tolist()
    assert ds.frame["image_id"].tolist() == META["image_id"].tolist()
    assert ds.frame["localization"].tolist()[:4] == ["face", "upper extremity",
                                                     "lower extremity", "face"]
    assert set(ds.frame["sex"]) == set(META["sex"])
    assert ds.frame["dx_type"].tolist()[:2] == ["histo", "consensus"]


def _imagefolder(root: Path, names: dict[str, str]) -> None:
    for image_id, dx in zip(META["image_id"], META["dx"]):
        (root / names[dx]).mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURE / "images" / f"{image_id}.jpg", root / names[dx])


def test_imagefolder_tree_with_class_spellings(tmp_path: Path) -> None:
    names = {"akiec": "AK", "bcc": "Basal cell carcinoma", "bkl": "seborrheic_keratosis",
             "df": "DF", "mel": "Melanoma", "nv": "nevus", "vasc": "vascular lesion"}
    _imagefolder(tmp_path / "tree", names)
    ds = load_dataset(tmp_path / "tree")
    frame = ds.frame.set_index("image_id").loc[META["image_id"]]
    assert frame["dx"].tolist() == META["dx"].tolist() and ds.classes == CLASSES
    assert all(Path(p).parent.name == names[d] for p, d in zip(frame["path"], frame["dx"]))
    # a non-image file among the images is left out with a counted warning, never silently
    from lesionlab.errors import flush_warnings, warning_counts

    flush_warnings()
    (tmp_path / "tree" / "Melanoma" / "notes.txt").write_text("scanned 2024")
    (tmp_path / "tree" / "nevus" / ".DS_Store").write_bytes(b"\0")  # hidden: no data
    assert len(load_dataset(tmp_path / "tree").frame) == len(META)
    assert warning_counts()["non-image files in class folders"] == 1
    flush_warnings()
    (tmp_path / "tree" / "keratoacanthoma").mkdir()
    shutil.copy(FIXTURE / "images" / f"{META['image_id'][0]}.jpg",
                tmp_path / "tree" / "keratoacanthoma" / "extra.jpg")
    with pytest.raises(LesionLabError, match=r"unknown class\(es\) \['keratoacanthoma'\]"):
        load_dataset(tmp_path / "tree", labels="imagefolder")


def test_run_all_downloads_only_into_a_missing_empty_or_half_downloaded_folder(
        tmp_path: Path, monkeypatch) -> None:
    """``ensure_data(download=True)`` (run_all's default) reads a user's ImageFolder or a
    folder without labels and never fetches HAM10000 into it; it fetches only where there is
    nothing, or only an interrupted download's own files."""
    from lesionlab import download

    fetched: list[Path] = []
    monkeypatch.setattr(download, "download_ham10000", lambda root: fetched.append(root))
    names = {c: c for c in CLASSES}
    _imagefolder(tmp_path / "tree", names)
    before = sorted(p.name for p in (tmp_path / "tree").iterdir())
    ds = download.ensure_data(tmp_path / "tree", download=True)
    assert len(ds) == len(META) and fetched == []
    assert sorted(p.name for p in (tmp_path / "tree").iterdir()) == before
    (tmp_path / "loose").mkdir()
    shutil.copy(FIXTURE / "images" / f"{META['image_id'][0]}.jpg", tmp_path / "loose")
    with pytest.raises(LesionLabError, match="metadata CSV not found"):
        download.ensure_data(tmp_path / "loose", download=True)
    assert fetched == [] and [p.name for p in (tmp_path / "loose").iterdir()] == \
        [f"{META['image_id'][0]}.jpg"]
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "HAM10000_images_part_1.zip.part").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "new", tmp_path / "empty", tmp_path / "half"):
        download.ensure_data(root, download=True)
    assert fetched == [tmp_path / "new", tmp_path / "empty", tmp_path / "half"]
    with pytest.raises(LesionLabError, match="metadata CSV not found"):
        download.ensure_data(tmp_path / "empty", download=False)


@pytest.mark.parametrize("spelling", ["MEL", "Melanoma", " mel "])
def test_class_spellings_are_one_in_training_and_evaluation(data_copy: Path,
                                                             spelling: str) -> None:
    meta = META.copy()
    meta.loc[meta["dx"] == "mel", "dx"] = spelling
    meta.to_csv(data_copy / "HAM10000_metadata.csv", index=False)
    assert load_dataset(data_copy).frame["dx"].tolist() == META["dx"].tolist()
    (data_copy / "HAM10000_metadata.csv").rename(data_copy / "labels.csv")
    assert load_external_labels(data_copy).frame["dx"].tolist() == META["dx"].tolist()


def test_detection_forcing_and_the_no_match_error(data_copy: Path, images_only: Path) -> None:
    assert read_labels(data_copy).format == "ham10000"
    _isic2019(images_only)
    assert read_labels(images_only).format == "isic2019"
    with pytest.raises(LesionLabError, match=r"--labels padufes20: no CSV .* has the columns "
                                             r"\['img_id', 'diagnostic'\]"):
        load_dataset(images_only, labels="padufes20")
    with pytest.raises(LesionLabError, match="unknown --labels 'isic2021'"):
        load_dataset(images_only, labels="isic2021")
    for p in images_only.glob("*.csv"):
        p.unlink()
    pd.DataFrame({"file": ["a"], "label": ["mel"]}).to_csv(images_only / "l.csv", index=False)
    with pytest.raises(LesionLabError) as err:
        load_dataset(images_only)
    msg = str(err.value)
    assert "fit neither known format" in msg and "l.csv: ['file', 'label']" in msg
    assert len(msg.splitlines()) == 1
    for name, fmt in FORMATS.items():  # every format named with the columns it needs
        assert f"{name} ({fmt.what}): " + (", ".join(fmt.needs) or "no CSV") in msg


def test_a_missing_folder_a_header_only_csv_and_odd_folders_stop_in_one_line(
        images_only: Path, tmp_path: Path, capsys) -> None:
    from tests.conftest import run_module

    # models.evaluate on a folder that does not exist: one line, exit 2 (was a traceback)
    res = run_module(capsys, "models.evaluate", "--data", str(tmp_path / "nope"), "--n-boot",
                     "10")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last == f"error: data folder not found: {tmp_path / 'nope'}"
    with pytest.raises(LesionLabError, match="not a data folder but a file"):
        read_labels(FIXTURE / "HAM10000_metadata.csv")
    # a header-only label CSV: no labelled row, an error, not an empty result
    (images_only / "HAM10000_metadata.csv").write_text("image_id,lesion_id,dx\n")
    with pytest.raises(LesionLabError, match=r"HAM10000_metadata.csv: no labelled row"):
        read_labels(images_only)
    # a class-per-folder tree with one folder that is no class: the folder is named
    (images_only / "HAM10000_metadata.csv").unlink()
    for name in ("mel", "weird_class"):
        (images_only / name).mkdir()
    with pytest.raises(LesionLabError) as err:
        read_labels(images_only)
    assert "its sub-folders ['images', 'weird_class'] are not class names" in str(err.value)


def test_unknown_site_stops_training_with_counts_and_warns_in_evaluation(data_copy: Path,
                                                                          caplog) -> None:
    meta = META.copy()
    meta.loc[:2, "localization"] = "elbow"
    meta.loc[3, "localization"] = "Knee"
    meta.to_csv(data_copy / "HAM10000_metadata.csv", index=False)
    with pytest.raises(LesionLabError, match=r"unknown site name\(s\) \['Knee', 'elbow'\] in "
                                             r"localization \(rows: 'elbow' \(3\), 'Knee' \(1\)\)"):
        load_dataset(data_copy)
    (data_copy / "HAM10000_metadata.csv").rename(data_copy / "labels.csv")
    with caplog.at_level(logging.WARNING, logger="lesionlab"):
        ds = load_external_labels(data_copy)
    assert "'elbow' (3), 'Knee' (1)" in caplog.text and "read as unknown" in caplog.text
    assert ds.frame["localization"].tolist()[:5] == ["unknown"] * 4 + [META["localization"][4]]


@pytest.mark.parametrize("suffix", [".csv", ".toml"])
def test_label_map_adds_a_users_names(data_copy: Path, tmp_path: Path, suffix: str) -> None:
    meta = META.copy()
    meta.loc[0, "localization"] = "left forearm"
    meta.loc[meta["dx"] == "mel", "dx"] = "melanoma in situ"
    meta.to_csv(data_copy / "HAM10000_metadata.csv", index=False)
    with pytest.raises(LesionLabError, match="melanoma in situ"):
        load_dataset(data_copy)
    path = tmp_path / f"map{suffix}"
    path.write_text('[site]\n"Left Forearm" = "upper extremity"\n[class]\n'
                    '"melanoma in situ" = "mel"\n' if suffix == ".toml" else
                    "kind,source,target\nsite,Left Forearm,upper extremity\n"
                    "class,melanoma in situ,mel\n")
    ds = load_dataset(data_copy, label_map=path)
    assert ds.frame["localization"][0] == "upper extremity"
    assert ds.frame["dx"].tolist() == META["dx"].tolist()
    bad = tmp_path / "bad.csv"  # a target that is no class of lesionlab's
    bad.write_text("kind,source,target\nclass,melanoma in situ,melanoma\n")
    with pytest.raises(LesionLabError, match=r"class name\(s\) \['melanoma'\] are none of"):
        load_dataset(data_copy, label_map=bad)


def test_the_table_maps_onto_the_canonical_names_and_ships() -> None:
    vocab = default_vocabulary()
    targets = {e.kind: set() for e in vocab.entries}
    for e in vocab.entries:
        targets[e.kind].add(e.target)
    assert targets["class"] - {"", NOT_MEL} <= set(KNOWN_CLASSES)
    assert set(KNOWN_CLASSES) <= targets["class"] and NOT_MEL in targets["class"]  # binary
    assert targets["site"] == {*SITES, "unknown"}
    for code, full in CLASS_NAMES.items():  # the names lesionlab itself prints
        assert vocab.lookup("class", full) == code and vocab.lookup("class", code) == code
    for isic, ham in [("anterior torso", "trunk"), ("posterior torso", "back"),
                      ("head/neck", "face"), ("palms/soles", "acral"),
                      ("oral/genital", "genital"), ("lateral torso", "trunk")]:
        assert vocab.lookup("site", isic.upper()) == ham
    assert normalize("  Lower_Extremity ") == "lower extremity"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert VOCABULARY_FILE.name in project["tool"]["setuptools"]["package-data"]["lesionlab"]


ISIC_SITES = {"anterior torso": "trunk", "posterior torso": "back", "head/neck": "face",
              "palms/soles": "acral", "oral/genital": "genital", "lateral torso": "trunk"}


def _with_sites(root: Path, sites: list[str]) -> Path:
    """Six fixture images (few: the head featurizes them), one site each, as labels.csv."""
    meta = META.iloc[::15].iloc[:len(sites)].assign(localization=sites)
    (root / "images").mkdir(parents=True)
    for image_id in meta["image_id"]:
        shutil.copy(FIXTURE / "images" / f"{image_id}.jpg", root / "images")
    meta.to_csv(root / "labels.csv", index=False)
    return root


def test_isic_site_names_reach_the_model(trained_models, tmp_path: Path) -> None:
    """The issue's first problem: ISIC names gave the probabilities of ``unknown``."""
    from models.evaluate import model_proba

    head = trained_models["head_meta"]
    isic = list(ISIC_SITES)
    proba = {name: model_proba(head, load_external_labels(_with_sites(tmp_path / name, sites)))
             for name, sites in [("isic", isic), ("ham", [ISIC_SITES[s] for s in isic]),
                                 ("unknown", ["unknown"] * len(isic))]}
    np.testing.assert_allclose(proba["isic"], proba["ham"], rtol=0, atol=1e-12)
    assert np.abs(proba["isic"] - proba["unknown"]).max() > 1e-3


def test_serve_accepts_the_clis_site_names(trained_models) -> None:
    from serve.app import create_app

    client = TestClient(create_app(trained_models["head_meta"]))
    info = client.get("/api/model").json()
    assert "anterior torso" in info["localizations"]
    assert info["vocabulary"]["site"]["anterior torso"] == "trunk"
    image = sorted((FIXTURE / "images").glob("*.jpg"))[3].read_bytes()

    def post(site: str) -> dict:
        res = client.post("/api/predict", files={"image": ("x.jpg", image, "image/jpeg")},
                          data={"age": "55", "sex": "male", "localization": site})
        assert res.status_code == 200, res.text
        return res.json()["probabilities"]

    assert post("Anterior Torso") == post("trunk") != post("unknown")
    res = client.post("/api/predict", files={"image": ("x.jpg", image, "image/jpeg")},
                      data={"localization": "elbow"})
    assert res.status_code == 422 and "anterior torso" in res.text


def test_readme_shows_the_table_as_shipped() -> None:
    from lesionlab.labels import vocabulary_markdown

    assert vocabulary_markdown() in (ROOT / "README.md").read_text()


def test_the_split_command_takes_labels_and_label_map(data_copy: Path, tmp_path: Path,
                                                     capsys) -> None:
    from lesionlab import splits

    meta = META.copy()
    meta.loc[[0, 1], "localization"] = "Left Forearm"
    meta.to_csv(data_copy / "HAM10000_metadata.csv", index=False)
    argv = ["--data", str(data_copy), "--workdir", str(tmp_path / "w")]
    with pytest.raises(LesionLabError, match=r"'Left Forearm' \(2\)"):
        splits.main(argv)
    with pytest.raises(LesionLabError, match="--labels isic2018: no CSV"):
        splits.main([*argv, "--labels", "isic2018"])
    (tmp_path / "map.csv").write_text("kind,source,target\nsite,left forearm,upper extremity\n")
    assert splits.main([*argv, "--labels", "ham10000", "--label-map",
                        str(tmp_path / "map.csv")]) == 0
    assert f"({len(META)} images" in capsys.readouterr().out
