"""Exporting a fine-tuned network for ONNX Runtime, the exported folder's kind, and the
shipped default model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from lesionlab.artifacts import sha256_file
from lesionlab.data import load_dataset
from lesionlab.errors import LesionLabError
from models import export, shipped
from models.export import ExportConfig, export_model, precision_check, require_passed
from models.folder import NetworkFolder, OnnxNetworkFolder, load_model_folder
from models.predict import predict_proba
from tests.conftest import FIXTURE


@pytest.fixture(scope="module")
def network(tmp_path_factory) -> Path:
    """A tiny fine-tuned network (1 epoch, 48x64, on the fixture)."""
    from models.finetune import FinetuneConfig, finetune

    work = tmp_path_factory.mktemp("net")
    card = finetune(load_dataset(FIXTURE), work,
                    FinetuneConfig(epochs=1, image_size=(48, 64), batch_size=16,
                                   num_workers=0, n_boot=20, tta="flip"))
    return work / "models" / card.name


@pytest.fixture(scope="module")
def exported(network: Path, tmp_path_factory) -> Path:
    """``network`` exported at fp32, checked on the fixture's val split (lite0 at fp32 with
    its fp16 torch copy is 20.5 MB: over the default 20 MB)."""
    out = tmp_path_factory.mktemp("exp") / "lite0-onnx"
    export_model(ExportConfig(model=network, out=out, workdir=network.parents[1], max_mb=25),
                 load_dataset(FIXTURE))
    return out


def _images(n: int = 6) -> list[str]:
    return load_dataset(FIXTURE).frame["path"].tolist()[:n]


def test_exported_predictions_equal_the_network_s(network: Path, exported: Path) -> None:
    folder = load_model_folder(exported)
    assert type(folder) is OnnxNetworkFolder and folder.kind == "onnx"
    source = load_model_folder(network).load()
    want = export.reference_proba(source, _images())  # the network in fp32
    got = predict_proba(exported, _images())
    assert got.shape == (6, 7)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want - want[:1]).max() > 1e-3  # the images get different probabilities
    # the network as it predicts on a bf16-capable CPU (auto precision) is within 2e-3
    np.testing.assert_allclose(got, source.predict_proba(_images()), atol=2e-3)


def test_saved_weights_name_no_temp_file_inside(network: Path, exported: Path) -> None:
    import zipfile

    for weights in (network / "model.pt", exported / "model.pt"):  # finetune's and export's
        names = zipfile.ZipFile(weights).namelist()
        assert names and {n.split("/")[0] for n in names} == {"archive"}, names[:2]


def test_the_card_holds_what_a_shipped_model_must_say(network: Path, exported: Path) -> None:
    card = load_model_folder(exported).card
    rec = card.export
    assert rec["licence"] == "CC BY-NC 4.0 (HAM10000, Tschandl et al. 2018)"
    assert "not a medical device" in rec["intended_use"]
    assert rec["precision"] == "fp32" and rec["torch_copy"] == "fp16"
    assert rec["source"] == network.name and "HAM10000" in rec["data"]
    source = load_model_folder(network).card
    before = rec["scores"]["internal_test_before_export"]
    assert before["balanced_accuracy"] == source.test["balanced_accuracy"]
    assert before["ci95"] == source.test["ci95"]
    # the card's test scores are the exported network's own, scored on the same test images
    test = rec["scores"]["internal_test"]
    assert rec["scores"]["internal_test_of"] == "the exported network"
    assert test["balanced_accuracy"] == card.test["balanced_accuracy"]
    assert test["n"] == len(source.test_image_ids) == source.test["n"]
    from models.export import card_test_rows

    ds = load_dataset(FIXTURE)
    proba = predict_proba(exported, card_test_rows(source, ds).frame["path"].tolist(),
                          device="cpu")
    from lesionlab.metrics import balanced_accuracy

    assert test["balanced_accuracy"] == pytest.approx(balanced_accuracy(
        card_test_rows(source, ds).labels, proba.argmax(1)))
    # fp32: the export predicts what the network predicted, so it scores the same
    assert test["balanced_accuracy"] == pytest.approx(source.test["balanced_accuracy"], abs=1e-9)
    assert f"{source.mel_threshold:.4f}" in rec["melanoma_rule"]
    assert set(card.files) == {"model.onnx", "model.pt"}
    assert card.files["model.onnx"] == sha256_file(exported / "model.onnx")
    check = rec["check"]
    assert check["passed"] and check["decision_agreement"] == 1.0
    assert check["n_val"] == source.n_val and abs(check["balanced_accuracy_change"]) == 0.0


def test_a_tampered_onnx_file_is_refused(exported: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    with open(bad / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(LesionLabError, match=r"model\.onnx: sha256 .* not the .* recorded"):
        load_model_folder(bad).load()


def test_grad_cam_uses_the_torch_copy_or_says_it_needs_the_unexported_folder(
        exported: Path, tmp_path: Path) -> None:
    from models.explain import explain_images

    net = load_model_folder(exported).gradcam_network()
    assert type(net) is NetworkFolder and net.path == exported
    res = explain_images(exported, _images(2), tmp_path / "cam")
    assert (tmp_path / "cam" / res[0]["overlay"].rpartition("/")[2]).is_file()
    # explain says what predict says (the ONNX network's calibrated probability), not the
    # torch copy's single uncalibrated view
    from models.predict import predict_images

    said = predict_images(exported, _images(2), device="cpu")
    assert [r["class"] for r in res] == [s["prediction"] for s in said]
    assert [r["probability"] for r in res] == [s["probabilities"][s["prediction"]]
                                               for s in said]
    bare = tmp_path / "bare"
    shutil.copytree(exported, bare)
    (bare / "model.pt").unlink()
    assert load_model_folder(bare).gradcam_network() is None
    with pytest.raises(LesionLabError, match="explain the unexported folder"):
        explain_images(bare, _images(1), tmp_path / "cam2")


def test_precision_check_rule() -> None:
    labels = np.array([0, 1, 2, 3] * 50)
    ref = np.eye(7)[labels] * 0.9 + 0.1 / 7
    same = precision_check(ref, ref + 1e-4, labels, ["akiec", "bcc", "bkl", "df", "mel",
                                                     "nv", "vasc"], 0.5)
    assert same["passed"] and same["decision_agreement"] == 1.0
    moved = ref.copy()
    moved[:3] = np.roll(moved[:3], 1, axis=1)  # 3 of 200 decisions change: 98.5% agree
    check = precision_check(ref, moved, labels, list("abcdefg"), None)
    assert check["decision_agreement"] == pytest.approx(0.985)
    assert not check["passed"]
    with pytest.raises(LesionLabError, match=r"fp16 refused: on 200 val images .*98\.50%"):
        require_passed(check, "fp16")


def test_fp16_needs_data_and_is_refused_or_kept_by_the_rule(
        network: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = ExportConfig(model=network, out=tmp_path / "a", precision="fp16",
                       workdir=network.parents[1])
    with pytest.raises(LesionLabError, match="--precision fp16 needs --data"):
        export_model(cfg)
    real = export.val_probas

    def worse(*args):  # mocked val numbers: the export turns a quarter of 40 decisions
        labels = np.arange(40) % 7
        ref = np.eye(7)[labels] * 0.9 + 0.1 / 7
        return ref, np.concatenate([np.roll(ref[:10], 1, axis=1), ref[10:]]), labels

    monkeypatch.setattr(export, "val_probas", worse)
    with pytest.raises(LesionLabError, match="--precision fp16 refused"):
        export_model(cfg, load_dataset(FIXTURE))
    assert not cfg.out.exists() and not list(tmp_path.iterdir())  # nothing half-written
    monkeypatch.setattr(export, "val_probas", real)
    card = export_model(cfg, load_dataset(FIXTURE))
    assert card.export["precision"] == "fp16" and card.export["check"]["passed"]
    fp32 = (network / "model.pt").stat().st_size
    assert (cfg.out / "model.onnx").stat().st_size < 0.6 * fp32


def test_export_refuses_what_it_cannot_export(network: Path, exported: Path,
                                              tmp_path: Path) -> None:
    with pytest.raises(LesionLabError, match="holds an exported network"):
        export_model(ExportConfig(model=exported, out=tmp_path / "x"))
    with pytest.raises(LesionLabError, match="exists"):
        export_model(ExportConfig(model=network, out=exported))
    with pytest.raises(LesionLabError, match=r"MB, over --max-mb 0\.1"):
        export_model(ExportConfig(model=network, out=tmp_path / "y", max_mb=0.1))
    assert not (tmp_path / "y").exists()


def test_default_model_is_the_shipped_folder(exported: Path, tmp_path: Path,
                                              monkeypatch) -> None:
    monkeypatch.setattr(shipped, "SHIPPED_MODEL", tmp_path / "absent")
    with pytest.raises(LesionLabError, match="no shipped model is installed.*pass --model"):
        shipped.default_model_folder()
    assert shipped.default_model_folder(tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.setattr(shipped, "SHIPPED_MODEL", exported)
    assert shipped.default_model_folder() == exported
    from models.predict import main

    assert main([_images(1)[0]]) == 0  # no --model: the shipped one predicts


@pytest.mark.parametrize("command", ["models.predict", "models.evaluate", "models.explain",
                                     "serve.__main__"])
def test_commands_without_a_shipped_model_say_so_in_one_line(
        command: str, tmp_path: Path, monkeypatch, capsys) -> None:
    import importlib

    from lesionlab.cli import run_main

    monkeypatch.setattr(shipped, "SHIPPED_MODEL", tmp_path / "absent")
    argv = {"models.predict": [_images(1)[0]], "models.explain": [_images(1)[0], "--out",
                                                                  str(tmp_path / "o")],
            "models.evaluate": ["--data", str(FIXTURE)], "serve.__main__": []}[command]
    with pytest.raises(SystemExit) as stop:
        run_main(importlib.import_module(command).main, argv)
    out = capsys.readouterr()
    assert stop.value.code == 2 and out.out == ""
    assert out.err == (f"error: no shipped model is installed ({tmp_path / 'absent'} has no "
                       f"card.json); pass --model FOLDER (a model folder you trained)\n")


def test_export_cli(network: Path, tmp_path: Path, capsys) -> None:
    from models.export import main

    assert main(["--model", str(network), "--out", str(tmp_path / "e"),
                 "--torch-copy", "none"]) == 0
    said = capsys.readouterr().out
    assert re.search(r"\(fp32, 13\.\d MB\); no check \(no --data\)", said)
    card = json.loads((tmp_path / "e" / "card.json").read_text())
    assert card["export"]["check"] is None and sorted(card["files"]) == ["model.onnx"]
