"""Card schema version 3: typed blocks per kind, read by attribute; version-2 folders (written
by the schema-2 code, tests/fixtures/cards_v2) load through the migration and predict the
same; unknown versions and keys are refused in one line."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lesionlab import card as core_card
from lesionlab.card_blocks import (EnsembleRecord, EnsembleSettings, FinetuneRecord,
                                   FinetuneSettings, HeadRecord, HeadSettings)
from lesionlab.data import load_dataset
from lesionlab.errors import LesionLabError
from models.bundle import load_card, save_card
from models.ensemble import EnsembleConfig
from models.finetune import FinetuneConfig
from models.folder import load_model_folder
from models.train_head import HeadConfig
from tests.conftest import FIXTURE, ROOT

V2 = ROOT / "tests" / "fixtures" / "cards_v2"
KINDS = {"head": (HeadSettings, HeadRecord), "finetune": (FinetuneSettings, FinetuneRecord),
         "ensemble": (EnsembleSettings, EnsembleRecord)}


@pytest.fixture
def at_root(monkeypatch) -> None:
    """The fixture network's starting weights are named relative to the repository root."""
    monkeypatch.chdir(ROOT)


def _predict(folder: Path, ids: list[str]) -> np.ndarray:
    frame = load_dataset(FIXTURE).frame.set_index("image_id").loc[ids].reset_index()
    with load_model_folder(folder, "cpu") as model:
        return model.predict_proba(frame["path"].tolist(),
                                   frame[["age", "sex", "localization"]])


@pytest.mark.parametrize("kind", ["head", "finetune", "ensemble"])
def test_a_version_2_folder_loads_through_the_migration_and_predicts_the_same(
        at_root, kind: str) -> None:
    assert json.loads((V2 / kind / "card.json").read_text())["schema_version"] == 2
    expected = json.loads((V2 / "expected.json").read_text())
    card = load_card(V2 / kind)
    assert card.schema_version == 3 == core_card.SCHEMA_VERSION
    assert (type(card.config), type(card.details)) == KINDS[kind]
    got = _predict(V2 / kind, expected["image_ids"])
    assert got.shape == (3, 7)
    # the expected values were recorded on an avx512 CPU; fp32 convolution kernels of a CPU
    # without avx512 move a network's probabilities by up to 4e-5 (seen on a 2-core AMD EPYC,
    # family 25 model 1). Mutations measured against the fixture (2026-12-04): the fine-tuned
    # fixture network is nearly uniform, so its smallest swap of two adjacent classes moves
    # its probabilities by 3.0e-4 and its classifier's weights scaled by 1.01 by 1.1e-4; the
    # head's and ensemble's smallest swaps move them by 0.038
    np.testing.assert_allclose(got, expected[kind], atol=1e-4)


def test_the_migration_keeps_each_field_once(at_root) -> None:
    net, head, ens = (load_card(V2 / k) for k in ("finetune", "head", "ensemble"))
    assert list(net.config.image_size) == [48, 64] and net.config.color_constancy == \
        "shades_of_gray" and net.config.tta == "none"
    assert 0.5 < net.details.input_aspect < 2 and net.metadata is False
    record = dataclasses.asdict(net.details)
    assert not {"image_size", "color_constancy", "tta", "backbone"} & set(record)
    assert head.config.metadata is True and head.metadata is True
    assert [b["backbone"] for b in head.details.features] == ["classical"]
    assert ens.config.members == ["head", "finetune"] and ens.metadata is True
    assert [m.kind for m in ens.details.members] == ["head", "finetune"]
    assert len(ens.config.member_weights) == 2 and ens.external is None


def test_a_saved_version_3_card_reads_back_equal(at_root, tmp_path: Path) -> None:
    for kind in KINDS:
        dest = shutil.copytree(V2 / kind, tmp_path / kind)
        card = load_card(dest)
        save_card(dest, card)
        raw = json.loads((dest / "card.json").read_text())
        assert raw["schema_version"] == 3 and "metadata" not in raw
        assert load_card(dest) == card


def _edited(tmp_path: Path, kind: str, edit) -> Path:
    dest = shutil.copytree(V2 / kind, tmp_path / kind)
    card = load_card(dest)
    save_card(dest, card)
    raw = json.loads((dest / "card.json").read_text())
    edit(raw)
    (dest / "card.json").write_text(json.dumps(raw))
    return dest


def test_a_version_4_card_is_refused_in_one_line(tmp_path: Path) -> None:
    dest = _edited(tmp_path, "head", lambda raw: raw.update(schema_version=4))
    with pytest.raises(LesionLabError) as err:
        load_card(dest)
    assert str(err.value) == (f"{dest / 'card.json'}: card schema_version 4 is newer than "
                              f"this lesionlab reads (3); update lesionlab")


@pytest.mark.parametrize("block, kind, cls", [("config", "finetune", "FinetuneSettings"),
                                              ("details", "head", "HeadRecord")])
def test_an_unknown_key_in_a_block_is_refused_in_one_line(tmp_path: Path, block: str,
                                                          kind: str, cls: str) -> None:
    dest = _edited(tmp_path, kind, lambda raw: raw[block].update(sharpness=2))
    with pytest.raises(LesionLabError) as err:
        load_card(dest)
    assert str(err.value) == (f"{dest / 'card.json'}: {block} has unknown key 'sharpness' "
                              f"(not a {cls} field; made by another lesionlab version?)")
    assert "\n" not in str(err.value)


def test_a_missing_required_key_is_refused_in_one_line(tmp_path: Path) -> None:
    dest = _edited(tmp_path, "finetune", lambda raw: raw["details"].pop("mean"))
    with pytest.raises(LesionLabError, match=r"details lacks 'mean' \(a required "
                                             r"FinetuneRecord field\); retrain the model$"):
        load_card(dest)


def test_check_card_still_checks_the_typed_ensemble_settings(tmp_path: Path) -> None:
    dest = _edited(tmp_path, "ensemble",
                   lambda raw: raw["config"].update(member_weights=[1.0, -1.0]))
    with pytest.raises(LesionLabError, match=r"config.member_weights must be finite numbers "
                                             r">= 0 with a sum > 0, got \[1.0, -1.0\]"):
        load_card(dest)


@pytest.mark.parametrize("settings, config", [(HeadSettings, HeadConfig),
                                              (FinetuneSettings, FinetuneConfig),
                                              (EnsembleSettings, EnsembleConfig)])
def test_the_settings_blocks_mirror_the_configs_of_models(settings, config) -> None:
    ours = {f.name: f.default for f in dataclasses.fields(settings)}
    theirs = {f.name: f.default for f in dataclasses.fields(config)}
    assert list(ours) == list(theirs)
    assert ours == theirs  # the same defaults (MISSING where required)
