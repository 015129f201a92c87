"""K-fold out-of-fold fine-tuning and ensemble folders (predict, evaluate, explain, serve)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lesionlab.data import Dataset, load_dataset
from lesionlab.errors import LesionLabError
from lesionlab.splits import load_or_make_split, split_indices
from models.bundle import load_card
from models.ensemble import EnsembleConfig, build_ensemble, choose_weights, combine
from models.finetune import FinetuneConfig
from models.kfold import kfold_finetune
from tests.conftest import FIXTURE, run_module

TINY = dict(epochs=1, image_size=(48, 64), batch_size=16, num_workers=0, n_boot=20,
            tta="none")


@pytest.fixture(scope="module")
def kfold(tmp_path_factory) -> tuple[Path, Path]:
    """A 3-fold run on the fixture: (workdir, ensemble folder)."""
    work = tmp_path_factory.mktemp("kfold")
    card = kfold_finetune(load_dataset(FIXTURE), work, FinetuneConfig(cv_folds=3, **TINY))
    return work, work / "models" / card.name


def test_out_of_fold_rows_never_come_from_a_model_trained_on_them(kfold) -> None:
    work, folder = kfold
    ds = load_dataset(FIXTURE)
    tr, _, _ = split_indices(ds, load_or_make_split(ds, work, 0))
    train_ids = set(ds.frame["image_id"].to_numpy()[tr])
    lesion = dict(zip(ds.frame["image_id"], ds.frame["lesion_id"]))
    held_all = []
    for member in load_card(folder).config.members:
        card = load_card(folder / "members" / member)
        held = card.details.oof_image_ids
        assert held and not set(held) & set(card.train_image_ids)
        # lesion-grouped: no lesion of a held-out row is among the rows the model trained on
        assert not {lesion[i] for i in held} & {lesion[i] for i in card.train_image_ids}
        assert set(held) | set(card.train_image_ids) == train_ids
        held_all += held
    assert sorted(held_all) == sorted(train_ids)  # each train row held out exactly once
    ens = load_card(folder)
    oof = np.load(folder / "oof_proba.npy")
    assert ens.details.oof_image_ids == held_all
    assert oof.shape == (len(train_ids), 7) and np.allclose(oof.sum(1), 1)


def test_fold_models_resume_instead_of_retraining(kfold) -> None:
    work, folder = kfold
    stamps = {m: (folder.parent / m / "model.pt").stat().st_mtime_ns
              for m in load_card(folder).config.members}
    kfold_finetune(load_dataset(FIXTURE), work, FinetuneConfig(cv_folds=3, **TINY))
    assert stamps == {m: (folder.parent / m / "model.pt").stat().st_mtime_ns for m in stamps}


def test_fold_rows_carry_the_provenance_of_the_code_that_trained_them(kfold) -> None:
    from benchmarks.run_all import fold_rows
    from lesionlab.provenance import same_code, short

    _, folder = kfold
    rows = fold_rows([{"kind": "ensemble", "model_dir": str(folder)}] * 2)  # 2 ensembles, 1 set
    assert len(rows) == 3 and {r["train_fraction"] for r in rows} == {0.667}
    assert all(same_code(r["provenance"]) for r in rows)  # this process's code trained them
    assert not any(short(r["provenance"]).startswith("unknown") for r in rows)


def test_ensemble_folder_round_trips_through_predict_evaluate_explain(
        kfold, trained_models, tmp_path: Path, capsys) -> None:
    from models.evaluate import evaluate_model
    from models.explain import explain_images
    from models.predict import predict_images

    work = tmp_path / "work"
    ds = load_dataset(FIXTURE)
    members = [trained_models["head"], trained_models["finetune"]]
    card = build_ensemble(members, ds, work, EnsembleConfig(members=[], name="ens", n_boot=20))
    folder = work / "models" / "ens"
    loaded = load_card(folder)
    assert loaded.kind == "ensemble" and loaded.head_label == "ensemble of 2"
    assert np.isclose(sum(loaded.config.member_weights), 1.0)
    assert (folder / "members" / members[1].name / "model.pt").exists()
    images = ds.frame["path"].tolist()[:3]
    results = predict_images(folder, images)
    for r in results:
        assert len(r["probabilities"]) == 7
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-4
        assert set(r["decisions"]) == {"balanced_accuracy_rule", "melanoma_rule"}
    res = evaluate_model(folder, ds, n_boot=10)
    assert 0 <= res["overall"]["balanced_accuracy"] <= 1
    cams = explain_images(folder, images[:1], tmp_path / "cam")
    assert Path(cams[0]["overlay"]).exists()
    proc = run_module(capsys, "models.predict", "--model", str(folder), images[0])
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout.splitlines()[0])["decisions"]) == {
        "balanced_accuracy_rule", "melanoma_rule"}
    assert card.test["balanced_accuracy"] == loaded.test["balanced_accuracy"]


def test_weights_are_chosen_on_val_only(trained_models, tmp_path: Path) -> None:
    ds = load_dataset(FIXTURE)
    members = [trained_models["head"], trained_models["finetune"]]
    a = build_ensemble(members, ds, tmp_path, EnsembleConfig(members=[], name="a", n_boot=10))
    for m in members:  # scramble what the members say about test: the weights must not move
        np.save(m / "test_proba.npy", np.load(m / "test_proba.npy")[::-1].copy())
    try:
        b = build_ensemble(members, ds, tmp_path, EnsembleConfig(members=[], name="b",
                                                                 n_boot=10))
    finally:
        for m in members:
            np.save(m / "test_proba.npy", np.load(m / "test_proba.npy")[::-1].copy())
    assert a.config.member_weights == b.config.member_weights
    assert a.mel_threshold == b.mel_threshold and a.temperature == b.temperature


def test_choose_weights_prefers_the_member_that_is_right_on_val() -> None:
    y = np.array([0, 1, 2, 3, 4, 5, 6] * 3)
    good = np.eye(7)[y] * 0.9 + 0.1 / 7
    bad = np.roll(good, 1, axis=1)
    w = choose_weights([bad, good], y)
    assert w[1] > w[0]
    assert choose_weights([bad, good], y, "equal") == [0.5, 0.5]
    assert np.allclose(combine([good, bad], [1, 0]).sum(1), 1)


def test_members_from_another_split_are_refused(trained_models, tmp_path: Path) -> None:
    ds = load_dataset(FIXTURE)
    other = tmp_path / "other"
    import shutil

    shutil.copytree(trained_models["head"], other)
    raw = json.loads((other / "card.json").read_text())
    raw["test_image_ids"] = raw["test_image_ids"][1:]
    (other / "card.json").write_text(json.dumps(raw))
    with pytest.raises(LesionLabError, match="another split"):
        build_ensemble([trained_models["finetune"], other], ds, tmp_path,
                       EnsembleConfig(members=[], name="x"))


def test_stacking_head_reads_out_of_fold_probabilities(kfold, tmp_path: Path) -> None:
    """A head on oof:<K-fold ensemble> + classical + metadata: its training rows see the
    out-of-fold probabilities, never the ensemble's in-fold ones; the folder is self-contained
    and round-trips through predict and evaluate."""
    import shutil

    from featurize.extract import FeaturizeConfig, featurize
    from models.train_design import load_design
    from models.evaluate import evaluate_model
    from models.explain import network_folder
    from models.predict import predict_images
    from models.train_head import HeadConfig, train_head

    work, ens = kfold
    ds = load_dataset(FIXTURE)
    featurize(ds, work, FeaturizeConfig(backbone="classical", num_workers=0))
    features = f"oof:{ens.name}+classical"
    design = load_design(work, ds, features, metadata=True)
    oof_ids = load_card(ens).details.oof_image_ids
    oof = np.load(ens / "oof_proba.npy")
    row = {i: k for k, i in enumerate(ds.frame["image_id"])}
    got = design.x[[row[i] for i in oof_ids], :7]
    assert np.allclose(got, np.log(np.clip(oof, 1e-6, 1)))
    card = train_head(ds, work, HeadConfig(features=features, metadata=True, trials=1, folds=2,
                                           n_boot=20, tune_timeout=None))
    assert card.head_label == "stack (logreg)"
    folder = work / "models" / card.name
    moved = tmp_path / "elsewhere"  # self-contained: works away from its workdir
    shutil.copytree(folder, moved)
    results = predict_images(moved, ds.frame["path"].tolist()[:2])
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in results)
    assert evaluate_model(moved, ds, n_boot=5)["overall"]["n"] == len(ds)
    assert network_folder(moved).parent.parent.parent.name == "members"


def test_members_without_saved_val_probabilities_get_them_computed(trained_models,
                                                                   tmp_path: Path) -> None:
    import shutil

    ds = load_dataset(FIXTURE)
    members = []
    for kind in ("head", "finetune"):
        dest = tmp_path / "models" / trained_models[kind].name
        shutil.copytree(trained_models[kind], dest)
        (dest / "val_proba.npy").unlink()  # as made before models saved them
        members.append(dest)
    card = build_ensemble(members, ds, tmp_path, EnsembleConfig(members=[], name="e", n_boot=5))
    for kind, dest in zip(("head", "finetune"), members):
        assert np.allclose(np.load(dest / "val_proba.npy"),
                           np.load(trained_models[kind] / "val_proba.npy"), atol=1e-5)
    assert card.kind == "ensemble"


def test_head_on_a_fine_tuned_embedding_trains_only_on_rows_the_network_never_saw(
        kfold, trained_models, tmp_path: Path) -> None:
    """Embedding with fold network 0: the head's training rows are exactly the fold that network
    held out; a network fine-tuned on all of train is refused as an embedder for a head."""
    from featurize.extract import FeaturizeConfig, featurize
    from models.train_head import HeadConfig, train_head

    work, ens = kfold
    ds = load_dataset(FIXTURE)
    fold0 = ens / "members" / load_card(ens).config.members[0]
    net = load_card(fold0)
    featurize(ds, work, FeaturizeConfig(backbone=str(fold0), num_workers=0))
    card = train_head(ds, work, HeadConfig(features=str(fold0), trials=1, folds=2, n_boot=20,
                                           tune_timeout=None, name="ftemb_head"))
    assert sorted(card.train_image_ids) == sorted(net.details.oof_image_ids)
    assert card.features_label == "ft:lite0 fold 1/3"  # the table label, not the folder path
    import shutil

    from models.predict import Predictor

    moved = tmp_path / "moved"  # the head carries its embedding network: it works elsewhere
    shutil.copytree(work / "models" / "ftemb_head", moved)
    predictor = Predictor(moved)
    assert predictor.card.details.features[0]["backbone"] == str(moved / "members" / fold0.name)
    proba = predictor.predict_proba(ds.frame["path"].tolist()[:3])
    predictor.close()
    assert proba.shape == (3, 7) and np.allclose(proba.sum(1), 1)
    assert not set(card.train_image_ids) & set(net.train_image_ids)
    full = trained_models["finetune"]  # fine-tuned on every training image of the same split
    featurize(ds, work, FeaturizeConfig(backbone=str(full), num_workers=0))
    with pytest.raises(LesionLabError, match="fine-tuned on every training image"):
        train_head(ds, work, HeadConfig(features=str(full), trials=1, folds=2, n_boot=20,
                                        tune_timeout=None, name="leaky_head"))


def test_decision_rule_chosen_on_val_fixes_an_under_predicted_class() -> None:
    from models.ensemble import choose_decision_rule, fit_class_factors
    from lesionlab.metrics import balanced_accuracy

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    proba = np.eye(3)[y] * 0.5 + rng.uniform(0, 0.3, (60, 3))
    proba[y == 2] = proba[y == 2][:, [2, 1, 0]]  # class 2 reads as class 0 ...
    proba[y == 2, 2] += 0.25  # ... unless class 2 is boosted
    proba /= proba.sum(1, keepdims=True)
    plain = balanced_accuracy(y, proba.argmax(1))
    rule, factors, scores = choose_decision_rule(proba, y, np.array([0.5, 0.3, 0.2]), "val")
    assert set(scores) == {"argmax", "prior_corrected", "class_factors"}
    assert scores["argmax"] == plain
    assert rule != "argmax" and scores[rule] == max(scores.values()) > plain
    assert np.isclose(sum(factors), 3) and balanced_accuracy(
        y, (proba * factors).argmax(1)) == scores[rule]
    assert choose_decision_rule(proba, y, np.ones(3) / 3) == ("argmax", None, {"argmax": plain})
    # already right: nothing to gain, the factors stay where they started
    assert np.allclose(fit_class_factors(np.eye(3)[y], y, np.ones(3)), 1.0)
    with pytest.raises(LesionLabError, match="unknown decision rule"):
        choose_decision_rule(proba, y, np.ones(3) / 3, "thresholds")


def test_fold_average_with_a_val_rule_predicts_what_its_card_scored(kfold,
                                                                     tmp_path: Path) -> None:
    """The K fold networks averaged with a rule chosen on val (the stack's control): its
    folder applies the same rule at predict time as when it was scored."""
    from models.folder import load_model_folder

    work, folder = kfold
    ds = load_dataset(FIXTURE)
    members = [folder.parent / m for m in load_card(folder).config.members]
    card = build_ensemble(members, ds, work, EnsembleConfig(
        members=[], name="folds_rule", weights="equal", decision_rule="val", n_boot=10))
    assert card.decision_rule in ("argmax", "prior_corrected", "class_factors")
    assert set(card.details.val_balanced_accuracy_by_rule) == {
        "argmax", "prior_corrected", "class_factors"}
    best = max(card.details.val_balanced_accuracy_by_rule.values())
    assert card.val["balanced_accuracy"] == pytest.approx(best)
    assert ("decision rule chosen on val" in load_card(work / "models" / "folds_rule")
            .imbalance_label)
    _, _, te = split_indices(ds, load_or_make_split(ds, work, 0))
    test = Dataset(root=ds.root, frame=ds.frame.iloc[te].reset_index(drop=True),
                   classes=ds.classes)
    saved = np.load(work / "models" / "folds_rule" / "test_proba.npy")
    with load_model_folder(work / "models" / "folds_rule", workdir=work) as model:
        again = model.predict_proba(test)
    assert np.allclose(again, saved, atol=1e-4)
