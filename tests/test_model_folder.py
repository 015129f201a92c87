"""The typed card in the core (schema version, migration) and the model-folder factory: one
class per kind, one way to predict, one place deciding Grad-CAM's network and table labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lesionlab import card as core_card
from lesionlab.card_blocks import HeadRecord
from lesionlab.data import load_dataset
from lesionlab.errors import LesionLabError
from models import bundle
from models.ensemble import EnsembleConfig, build_ensemble
from models.evaluate import model_proba
from models.folder import (EmbeddingHeadFolder, EnsembleFolder, HeadFolder, Labels,
                           NetworkFolder, StackFolder, folder_class, kinds, labels,
                           load_model_folder, register_kind)
from models.predict import Predictor
from tests.conftest import FIXTURE, ROOT

V2 = ROOT / "tests" / "fixtures" / "cards_v2"  # folders written at schema version 2


@pytest.fixture(scope="module")
def folders(trained_models, tmp_path_factory) -> dict[str, Path]:
    """Copies of the session's head (with metadata) and network, and an ensemble of them."""
    work = tmp_path_factory.mktemp("folders")
    src = trained_models["head"].parent.parent
    for sub in ("features", "splits"):
        shutil.copytree(src / sub, work / sub)
    out = {}
    for kind in ("head_meta", "finetune"):
        out[kind] = work / "models" / trained_models[kind].name
        shutil.copytree(trained_models[kind], out[kind])
    build_ensemble([out["head_meta"], out["finetune"]], load_dataset(FIXTURE), work,
                   EnsembleConfig(members=[], name="ens", n_boot=10))
    out["ensemble"] = work / "models" / "ens"
    return out


def _as_v1(folder: Path, dest: Path) -> Path:
    """A copy of ``folder`` (a version-2 one) whose card is as written before schema
    versions (version 1)."""
    shutil.copytree(folder, dest)
    raw = json.loads((dest / "card.json").read_text())
    for key in ("schema_version", "provenance", "files"):
        raw.pop(key, None)
    (dest / "card.json").write_text(json.dumps(raw))
    return dest


def test_the_card_lives_in_the_core_and_bundle_re_exports_it() -> None:
    assert bundle.ModelCard is core_card.ModelCard
    assert bundle.load_card is core_card.load_card and bundle.save_card is core_card.save_card
    assert core_card.SCHEMA_VERSION == 3


def test_a_new_card_records_its_schema_version(folders) -> None:
    raw = json.loads((folders["ensemble"] / "card.json").read_text())
    assert raw["schema_version"] == 3
    assert bundle.load_card(folders["ensemble"]).schema_version == 3


def test_a_version_1_card_loads_through_the_migration_and_predicts_the_same(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # the fixture network's starting weights are named from there
    ds = load_dataset(FIXTURE)
    paths = ds.frame["path"].tolist()[:5]
    meta = ds.frame[["age", "sex", "localization"]].iloc[:5]
    for kind in ("head", "finetune"):
        old = _as_v1(V2 / kind, tmp_path / kind)
        card = bundle.load_card(old)
        assert card.schema_version == 3 and card.provenance == {} and card.files == {}
        with load_model_folder(V2 / kind, "cpu") as now, \
                load_model_folder(old, "cpu") as then:
            np.testing.assert_array_equal(then.predict_proba(paths, meta),
                                          now.predict_proba(paths, meta))


def test_migrate_fills_only_what_a_version_1_card_lacks() -> None:
    raw = {"kind": "head", "details": {"a": 1}}
    got = core_card.MIGRATIONS[1](raw)
    assert got == {"kind": "head", "details": {"a": 1}, "features": [], "metadata": False,
                   "mel_threshold": None, "provenance": {}, "files": {}, "schema_version": 2}
    assert core_card.migrate({"schema_version": 3, "kind": "x"}) == {"schema_version": 3,
                                                                       "kind": "x"}


@pytest.mark.parametrize("version, message", [
    (4, "card schema_version 4 is newer than this lesionlab reads (3); update lesionlab"),
    ("2", "schema_version must be a whole number >= 1, got '2'"),
    (0, "schema_version must be a whole number >= 1, got 0"),
])
def test_a_card_of_an_unknown_version_is_refused_in_one_line(folders, tmp_path: Path,
                                                              version, message) -> None:
    dest = shutil.copytree(folders["finetune"], tmp_path / "net")
    raw = json.loads((dest / "card.json").read_text())
    (dest / "card.json").write_text(json.dumps({**raw, "schema_version": version}))
    with pytest.raises(LesionLabError) as err:
        bundle.load_card(dest)
    assert str(err.value) == f"{dest / 'card.json'}: {message}"


def test_featurize_reads_a_fine_tuned_card_through_the_core(folders) -> None:
    from featurize.backbones import default_image_size, finetuned_card

    card = finetuned_card(str(folders["finetune"]))
    assert isinstance(card, core_card.ModelCard) and card.kind == "finetune"
    assert default_image_size(str(folders["finetune"])) == (48, 64)
    assert finetuned_card(str(folders["finetune"] / "nothing")) is None
    with pytest.raises(LesionLabError) as err:
        finetuned_card(str(folders["head_meta"]))
    assert str(err.value) == (f"{folders['head_meta']} holds a 'head' model; only a "
                              f"fine-tuned network folder can embed images")


def test_the_registry_knows_every_kind_and_picks_the_class_of_each_folder(folders) -> None:
    assert kinds() == ["finetune", "onnx", "ensemble", "head", "embedding_head", "stack"]
    got = {k: type(load_model_folder(d)) for k, d in folders.items()}
    assert got == {"head_meta": HeadFolder, "finetune": NetworkFolder,
                   "ensemble": EnsembleFolder}
    card = bundle.load_card(folders["head_meta"])
    stack = {**card.__dict__, "details": HeadRecord(features=[{"backbone": "oof:kfold__k3__x"}])}
    emb = {**card.__dict__,
           "details": HeadRecord(features=[{"backbone": "runs/models/finetune__lite0__seed0"}])}
    assert folder_class(core_card.ModelCard(**stack)) is StackFolder
    assert folder_class(core_card.ModelCard(**emb)) is EmbeddingHeadFolder


def test_one_predict_proba_for_evaluate_predict_and_the_server(folders) -> None:
    full = load_dataset(FIXTURE)  # 24 of its images, every class among them: enough to compare
    ds = type(full)(full.root, full.frame.groupby("dx").head(4).reset_index(drop=True))
    paths = ds.frame["path"].tolist()
    meta = ds.frame[["age", "sex", "localization"]]
    for kind, folder in folders.items():
        with load_model_folder(folder, "cpu") as model:
            proba = model.predict_proba(paths, meta)
            assert proba.shape == (len(ds), 7) and np.allclose(proba.sum(1), 1)
            np.testing.assert_array_equal(model.predict_proba(ds), proba)  # a Dataset too
        np.testing.assert_array_equal(model_proba(folder, ds, device="cpu"), proba)
        predictor = Predictor(folder, "cpu")
        np.testing.assert_array_equal(predictor.predict_proba(paths, meta), proba)
        predictor.close()


def test_gradcam_network_is_decided_by_the_kind(folders) -> None:
    from models.explain import network_folder

    head, net, ens = (load_model_folder(folders[k]) for k in ("head_meta", "finetune",
                                                              "ensemble"))
    assert head.gradcam_network() is None and net.gradcam_network() is net
    member = ens.gradcam_network()
    assert isinstance(member, NetworkFolder)
    assert member.path == folders["ensemble"] / "members" / folders["finetune"].name
    assert network_folder(folders["ensemble"]) == member.path
    with pytest.raises(LesionLabError, match="Grad-CAM needs a fine-tuned network"):
        network_folder(folders["head_meta"])


def test_table_labels_come_from_the_kind(folders) -> None:
    net = bundle.load_card(folders["finetune"])
    assert labels(net) == Labels("tf_efficientnet_lite0 (fine-tuned 64x48, 1 ep, SoG)",
                                 "fine-tune", "balanced sampler, ce")
    ens = bundle.load_card(folders["ensemble"])
    assert labels(ens).head == "ensemble of 2" == ens.head_label
    assert labels(ens).imbalance == "weights: val"
    head = bundle.load_card(folders["head_meta"])
    assert (head.features_label, head.head_label) == ("classical", "logreg")


def test_a_new_kind_is_one_registered_class(folders, monkeypatch) -> None:
    from models import folder as registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_kind("tagged_head")
    class TaggedHead(HeadFolder):
        @classmethod
        def claims(cls, card) -> bool:
            return card.config.head == "logreg"

        @classmethod
        def labels(cls, card) -> Labels:
            return Labels("tagged", "tagged", "tagged")

    model = load_model_folder(folders["head_meta"])
    assert type(model) is TaggedHead and bundle.load_card(folders["head_meta"]).head_label \
        == "tagged"
    with pytest.raises(ValueError, match="registered twice"):
        register_kind("tagged_head")(TaggedHead)


def test_no_folder_kind_switch_outside_the_registry() -> None:
    """What a folder does is decided by its registered class (``models/folder.py``, and the
    ``onnx`` kind's claim in ``models/shipped.py``): no other module compares a ``.kind`` with a
    model-folder kind's name."""
    import ast

    from models import folder

    names = set(folder.kinds()) | {"head", "kfold", "stack"}
    root = Path(__file__).resolve().parents[1]
    allowed = {root / "models" / "folder.py", root / "models" / "shipped.py"}
    found = []
    for pkg in ("lesionlab", "featurize", "models", "serve", "benchmarks"):
        for path in sorted((root / pkg).rglob("*.py")):
            if path in allowed:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Compare):
                    continue
                sides = [node.left, *node.comparators]
                if any(isinstance(s, ast.Attribute) and s.attr == "kind" for s in sides) and any(
                        isinstance(s, ast.Constant) and s.value in names for s in sides):
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert found == []
