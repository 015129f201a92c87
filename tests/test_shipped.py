"""The model shipped in the repo (``pretrained/lesionlab-lite0``): it loads with no training,
its card says what a shipped model must, and it predicts what the network it was exported from
predicts.

``tests/fixtures/shipped_reference.json`` holds that network's fp32 probabilities for the
first fixture images, computed once from the unexported folder (``models.export.reference_proba``)
when the model was exported; the shipped weights are fp16 (the export's precision check on val
kept them), so they agree to fp16 accuracy, not to the 1e-4 of an fp32 export
(``tests/test_export.py``).
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np

from lesionlab.artifacts import sha256_file
from models import shipped
from models.folder import OnnxNetworkFolder, load_model_folder
from models.predict import predict_proba
from tests.conftest import FIXTURE

REFERENCE = Path(__file__).parent / "fixtures" / "shipped_reference.json"


def test_the_shipped_model_is_the_default_and_loads_without_training() -> None:
    folder = shipped.default_model_folder()
    assert folder == shipped.SHIPPED_MODEL and (folder / "card.json").is_file()
    model = load_model_folder(folder)
    assert type(model) is OnnxNetworkFolder and model.kind == "onnx"
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert size <= 20 * 2**20, f"{size / 2**20:.1f} MB"
    card = model.card
    assert set(card.files) == {"model.onnx", "model.pt"}
    for name, digest in card.files.items():
        assert sha256_file(folder / name) == digest
    # torch.save wrote to a file object: the zip's folder names no temp file, pid or host
    assert {n.split("/")[0] for n in zipfile.ZipFile(folder / "model.pt").namelist()} == {
        "archive"}
    text = (folder / "card.json").read_text()  # committed: it names no path of a machine
    assert not re.search(r'"(/|[A-Za-z]:\\\\|\.\./)', text)


def test_the_shipped_card_says_data_licence_scores_and_use() -> None:
    card = load_model_folder(shipped.SHIPPED_MODEL).card
    rec = card.export
    assert rec["licence"] == "CC BY-NC 4.0 (HAM10000, Tschandl et al. 2018)"
    assert "not a medical device" in rec["intended_use"] and "HAM10000" in rec["data"]
    assert rec["precision"] == "fp16" and rec["check"]["passed"]
    assert abs(rec["check"]["balanced_accuracy_change"]) < 0.005
    assert rec["check"]["decision_agreement"] >= 0.99 and rec["check"]["n_val"] > 1000
    test = rec["scores"]["internal_test"]
    lo, hi = test["ci95"]["balanced_accuracy"]
    assert 0.5 < lo < test["balanced_accuracy"] < hi < 1.0
    assert test["balanced_accuracy"] == card.test["balanced_accuracy"]
    assert f"{card.mel_threshold:.4f}" in rec["melanoma_rule"]
    external = rec["scores"]["external"]  # scored once, after the export
    assert external["n"] == 754 and "ISIC 2018" in external["data"]
    lo, hi = external["balanced_accuracy_ci95"]
    assert 0.5 < lo < external["balanced_accuracy"] < hi < 1.0


def test_the_shipped_model_predicts_what_its_network_predicted() -> None:
    ref = json.loads(REFERENCE.read_text())
    images = [str(FIXTURE / "images" / name) for name in ref["images"]]
    want = np.array(ref["proba"])
    got = predict_proba(shipped.SHIPPED_MODEL, images)
    assert got.shape == want.shape == (len(images), 7)
    np.testing.assert_allclose(got, want, atol=ref["atol"])
    assert (got.argmax(1) == want.argmax(1)).all()
    assert np.abs(want - want[:1]).max() > 0.05  # the images get different probabilities
