"""run_all on the fixture (quick preset), resume, report markers, external test sets."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from benchmarks import run_all as ra
from benchmarks.report import leaderboard_md, replace_block
from lesionlab.errors import LesionLabError
from models.design import input_kind
from models.kfold import fold_configs

PROSE = "# Report\n\nHand-written intro.\n\n<!-- leaderboard:start -->\nold table\n" \
        "<!-- leaderboard:end -->\n\nHand-written conclusions.\n"


def _isic_copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    meta = pd.read_csv(dest / "HAM10000_metadata.csv")
    (dest / "HAM10000_metadata.csv").unlink()
    cols = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    gt = pd.DataFrame({"image": meta["image_id"]})
    for c in cols:
        gt[c] = (meta["dx"].str.upper() == c).astype(float)
    gt.to_csv(dest / "ISIC2018_Task3_Training_GroundTruth.csv", index=False)
    return dest


# A 25% learning-curve subset of the 87-image fixture holds 2 lesions of its rarest classes:
# the splits must never hand scikit-learn more folds than a class has members.
@pytest.mark.filterwarnings("error:The least populated class:UserWarning")
@pytest.mark.filterwarnings("error:n_splits=:UserWarning")
def test_quick_pipeline_end_to_end_tiny_budgets(fixture_dir: Path, tmp_path: Path,
                                                 monkeypatch) -> None:
    report = tmp_path / "REPORT.md"
    report.write_text(PROSE)
    external = _isic_copy(fixture_dir, tmp_path / "ext")
    work = tmp_path / "runs"
    summary = ra.run_all(fixture_dir, work, "smoke", external=external, report=report,
                         download=False)
    kinds = {r["kind"] for r in summary["rows"]}
    assert kinds == {"head", "finetune"}
    assert any(r["group"] == "curve" for r in summary["rows"])
    # one result per cell, the summary, and the split-seed study's cells beyond the study's
    seeds = {e["name"] for p in summary["seeds"]["pipelines"].values()
             for e in p["seeds"].values()}
    assert len(seeds) == 3 * 2 and summary["seeds"]["split_seeds"] == [0, 1]
    assert len(list((work / "results").glob("*.json"))) == \
        len(summary["rows"]) + 1 + len(seeds - {r["name"] for r in summary["rows"]})
    assert "<!-- seeds:start -->" in report.read_text()
    assert summary["external"] and len(summary["external"]) == 3
    text = report.read_text()
    assert "Hand-written intro." in text and "Hand-written conclusions." in text
    assert "old table" not in text and "balanced acc [95% CI]" in text
    external_block = text.split("<!-- external:start -->")[1].split("<!-- external:end -->")[0]
    names = {r["name"] for r in summary["external"]}
    rows = [line for line in external_block.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 3  # one row per main model (header dropped)
    assert all(0.0 <= r["balanced_accuracy"] <= 1.0 for r in summary["external"])
    assert names == {r["name"] for r in summary["rows"] if r["group"] == "main"}
    from models.bundle import load_card

    melanoma = text.split("<!-- melanoma:start -->")[1].split("<!-- melanoma:end -->")[0]
    assert "benign flagged per melanoma found" in melanoma
    assert len([line for line in melanoma.splitlines() if line.startswith("| ")]) == 1 + 3
    for r in summary["rows"]:
        assert 0 <= r["mel_operating_point"]["sensitivity"] <= 1
    for r in summary["external"]:  # the card carries its external score (the page shows it)
        ext = load_card(work / "models" / r["name"]).external
        assert ext["balanced_accuracy"] == r["balanced_accuracy"] and ext["n"] == 87
    for block in ("per_class", "errors", "artefacts", "calibration"):  # benchmarks.errors
        assert f"<!-- {block}:end -->" in text and "bal.acc masked" in text
    for fig in ("class_distribution", "confusion_head", "confusion_finetune",
                "learning_curves", "reliability", "per_class_recall", "gradcam_examples",
                "reliability_mel"):
        assert (tmp_path / "reports" / "figures" / f"{fig}.png").is_file(), fig
        assert f"{fig}.png" in text

    # resume: every cell is cached now, so nothing is trained again
    def boom(*a, **k):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(ra, "train_head", boom)
    monkeypatch.setattr(ra, "finetune", boom)
    again = ra.run_all(fixture_dir, work, "smoke", report=None, download=False)
    assert [r["balanced_accuracy"] for r in again["rows"]] == \
        [r["balanced_accuracy"] for r in summary["rows"]]
    _stale_cells_are_rerun_or_marked(summary, work, fixture_dir, tmp_path, monkeypatch)
    (work / "results" / f"{summary['rows'][0]['name']}.json").unlink()
    rebuilt = ra.run_all(fixture_dir, work, "smoke", report=report, download=False,
                         report_only=True)
    assert rebuilt["unfinished"] == [summary["rows"][0]["name"]]
    assert "not finished yet" in report.read_text()


def _stale_cells_are_rerun_or_marked(summary: dict, work: Path, fixture_dir: Path,
                                     tmp_path: Path, monkeypatch) -> None:
    """Every result, card and feature manifest names its commit and lock; a cell whose
    recorded code differs is run again (old files kept under stale/) or, with reuse_stale,
    reused and marked."""
    from lesionlab.artifacts import read_json, write_json
    from lesionlab.provenance import provenance
    from models.bundle import load_card, save_card

    now = provenance()
    assert now["commit"] and len(now["lock_sha256"]) == 64
    head_row = next(r for r in summary["rows"] if r["kind"] == "head")
    name = head_row["name"]
    saved = read_json(work / "results" / f"{name}.json")
    card = load_card(work / "models" / name)
    for record in (saved["provenance"], card.provenance, summary["provenance"],
                   read_json(next((work / "features").glob("*/manifest.json")))["provenance"]):
        assert record["commit"] == now["commit"] and record["lock_sha256"] == now["lock_sha256"]
        assert record["versions"]["scikit-learn"] == now["versions"]["scikit-learn"]
    # the cell was made by other code: rewrite its recorded code hash
    old = {**saved["provenance"], "code_sha256": "0" * 64, "commit": "f" * 40, "dirty": False}
    write_json(work / "results" / f"{name}.json", {**saved, "provenance": old})
    card.provenance = old
    save_card(work / "models" / name, card)
    manifest_path = next((work / "features").glob("*/manifest.json"))
    write_json(manifest_path, {**read_json(manifest_path), "provenance": old})
    marked = ra.run_all(fixture_dir, work, "smoke", report=None, download=False,
                        reuse_stale=True)  # train_head and finetune still raise here
    assert [r["name"] for r in marked["rows"] if r.get("stale")] == [name]
    from benchmarks.report import provenance_md

    assert "**(stale)**" in leaderboard_md(marked["rows"])
    listed = provenance_md(marked["rows"], marked["provenance"])
    assert "`ffffffffff`: 1 cells" in listed and "(this run's code)" in listed
    monkeypatch.undo()  # training allowed again: the stale cell alone is rerun
    rerun = ra.run_all(fixture_dir, work, "smoke", report=None, download=False)
    assert not any(r.get("stale") for r in rerun["rows"])
    fresh = read_json(work / "results" / f"{name}.json")["provenance"]
    assert fresh["code_sha256"] == now["code_sha256"]
    kept = list((work / "stale" / ("0" * 12)).iterdir())
    assert sorted(p.name for p in kept) == sorted([name, f"{name}.json",
                                                   manifest_path.parent.name])
    kept = [p for p in kept if p.name != manifest_path.parent.name]
    assert read_json(manifest_path)["provenance"]["code_sha256"] == now["code_sha256"]
    assert read_json(kept[0] / "card.json" if kept[0].is_dir() else kept[1] / "card.json")


def test_markers_regenerate_without_touching_prose() -> None:
    rows = [{"features": "f", "head": "logreg", "imbalance": "smote", "metadata": False,
             "balanced_accuracy": 0.5, "ci95": [0.4, 0.6], "macro_f1": 0.4, "macro_auc": 0.8,
             "mel_sensitivity": 0.5, "ece": 0.05, "val_balanced_accuracy": 0.5,
             "total_time_s": 12.0}]
    once = replace_block(PROSE, "leaderboard", leaderboard_md(rows))
    twice = replace_block(once, "leaderboard", leaderboard_md(rows))
    assert once == twice
    assert once.replace(leaderboard_md(rows).rstrip(), "old table") == PROSE
    added = replace_block("# R\n\nprose\n", "external", "table")
    assert added.startswith("# R\n\nprose\n") and "<!-- external:end -->" in added


def test_unknown_preset_and_bad_external(fixture_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(LesionLabError, match="unknown --preset"):
        ra.plan_for("medium", 0)
    bad = tmp_path / "bad"
    shutil.copytree(fixture_dir, bad)
    (bad / "HAM10000_metadata.csv").rename(bad / "labels.csv")
    pd.read_csv(bad / "labels.csv").rename(columns={"dx": "diagnosis"}).to_csv(
        bad / "labels.csv", index=False)
    with pytest.raises(LesionLabError, match="neither known format"):
        ra.run_all(fixture_dir, tmp_path / "w", "quick", external=bad, report=None,
                   download=False)


def test_every_cell_kind_runs_through_one_registered_runner(tmp_path: Path) -> None:
    """Each preset's cells name a registered runner; an unknown kind stops when the cell is
    made; a K-fold cell's folders are its ensemble's and its fold networks'."""
    kinds = {c.kind for p in ("quick", "full", "best") for gpu in (False, True)
             for c in ra.plan_for(p, 0, gpu=gpu).cells + ra.plan_for(p, 0, gpu=gpu).late_cells}
    assert kinds == set(ra.CELL_RUNNERS) == {"head", "finetune", "kfold", "ensemble", "distill"}
    with pytest.raises(LesionLabError, match="unknown kind 'stack'"):
        ra.Cell("x", "stack", None)
    kfold = next(c for c in ra.plan_for("full", 0).cells if c.kind == "kfold")
    folders = ra.cell_folders(kfold, tmp_path)
    assert folders[0].name == kfold.cell_id and len(folders) == 1 + kfold.config.cv_folds
    assert [f.name for f in folders[1:]] == [c.model_name() for c in fold_configs(kfold.config)]
    head = next(c for c in ra.plan_for("quick", 0).cells if c.kind == "head")
    assert ra.cell_folders(head, tmp_path) == [tmp_path / "models" / head.cell_id]
    assert [ra.CELL_RUNNERS[k].cost_is_training_time for k in ("head", "finetune", "kfold",
                                                              "ensemble", "distill")] == [
        False, True, True, False, True]


def test_gpu_flag_moves_every_network_and_backbone_to_cuda(tmp_path: Path) -> None:
    """``--gpu``: the same study, its networks on CUDA with the batched input pipeline (their
    names say so, and the stacks and the ensemble read those networks), the recipe
    unchanged; without CUDA it stops in one line; it never writes REPORT.md."""
    import torch

    for preset in ("quick", "full", "best", "seeds"):
        cpu, gpu = ra.plan_for(preset, 0), ra.plan_for(preset, 0, gpu=True)
        on_cpu = {c.cell_id for c in cpu.cells + cpu.late_cells}
        nets = [c.config for c in gpu.cells + gpu.late_cells if c.kind in ("finetune", "kfold")
                and c.cell_id.replace("__batched", "") in on_cpu]  # the GPU-only rows: below
        assert nets and all(n.device == "cuda" and n.input_pipeline == "batched" for n in nets)
        cpu_nets = [c.config for c in cpu.cells + cpu.late_cells
                    if c.kind in ("finetune", "kfold")]
        assert [(n.epochs, n.batch_size, n.lr, n.image_size) for n in nets] == \
            [(n.epochs, n.batch_size, n.lr, n.image_size) for n in cpu_nets]
        assert all(f.device == "cuda" for f in gpu.featurize if f.backbone != "classical")
        assert all(c.device == "auto" for c in cpu_nets)
    full = ra.plan_for("full", 0, gpu=True)
    kfold = next(c for c in full.cells if c.kind == "kfold")
    assert "batched" in kfold.cell_id
    stacks = [c for c in full.cells if c.kind == "head" and c.config.features.startswith("oof:")]
    assert stacks and all(kfold.cell_id in c.config.features for c in stacks)
    assert any("batched" in m for m in full.late_cells[0].config.members)
    # the rows only a GPU runs: lite1 and lite2 K-fold beside lite0's, the stack on all
    # three's out-of-fold probabilities, the plain lite0 and lite0 distilled from the new
    # ensemble at each grid point, all with the recipe; the CPU plan has none of them
    cpu_full = ra.plan_for("full", 0)
    assert not {c.kind for c in cpu_full.cells + cpu_full.late_cells} & {"distill"}
    kfolds = [c.config for c in full.cells if c.kind == "kfold"]
    assert [k.backbone for k in kfolds] == list(ra.LITE)
    stack3 = next(c for c in full.cells if c.cell_id.startswith("stack__oof-kfold-lite012"))
    assert stack3.config.features.count("oof:") == 3 and stack3.config.metadata
    assert all(f"oof:{ra.kfold_name(k)}" in stack3.config.features for k in kfolds)
    ids = [c.cell_id for c in full.cells + full.late_cells]
    assert len(ids) == len(set(ids)) and max(map(len, ids)) < 200  # folder names fit
    ens3 = next(c for c in full.late_cells if stack3.cell_id in c.config.members)
    students = [c for c in full.late_cells if c.kind == "distill"]
    assert [(s.config.student.distill_temperature, s.config.student.distill_weight)
            for s in students] == list(ra.DISTILL_GRID)
    assert all(s.config.teacher == ens3.cell_id and ids.index(s.cell_id) > ids.index(
        ens3.cell_id) for s in students)
    plain = next(c.config for c in full.cells if c.kind == "finetune"
                 and c.config.backbone == ra.LITE[0])
    for s in students:
        assert replace(s.config.student, distill_temperature=2.0, distill_weight=0.5,
                       name=None) == plain and s.cell_id == s.config.student.name
    assert replace(plain, cv_folds=3) == kfolds[0]
    assert ra.report_path("full", tmp_path, gpu=True) == tmp_path / "REPORT_full-gpu.md"
    assert ra.report_path("full", tmp_path) == Path("REPORT.md")
    if not torch.cuda.is_available():
        with pytest.raises(LesionLabError, match="--gpu needs a CUDA GPU"):
            ra.run_all(tmp_path, tmp_path, "quick", gpu=True, report=None, download=False)


def test_full_plan_covers_the_study() -> None:
    """The full preset holds every comparison the study claims, each cell once."""
    plan = ra.plan_for("full", 0)
    cells = plan.cells + plan.late_cells
    ids = [c.cell_id for c in cells]
    assert len(ids) == len(set(ids))
    assert {f.backbone for f in plan.featurize} == set(ra.LITE) | {"classical"}
    heads = [c.config for c in cells if c.kind == "head"]
    grid = {(h.head, h.imbalance) for h in heads if h.features == f"{ra.LITE[0]}:multistage"}
    assert grid == {("logreg", i) for i in ("none", "class_weight", "smote")} | {
        ("lightgbm", "class_weight")}
    logreg = {c.features for c in heads if c.head == "logreg" and not c.metadata}
    assert {f"{b}:multistage" for b in ra.LITE} | {"classical"} <= logreg
    assert any("+" in f for f in logreg)  # concatenated feature sets
    assert any(c.metadata for c in heads if c.head == "logreg")
    # boosting where it should be strongest (few informative columns), never on 5k columns
    kfold = [c for c in cells if c.kind == "kfold"]
    assert len(kfold) == 1 and kfold[0].config.cv_folds == 3
    oof = f"oof:{kfold[0].cell_id}"
    by_input = {}
    for h in heads:
        by_input.setdefault(input_kind(h.features), set()).add(h.head)
    assert all(heads_ == {"logreg", "lightgbm"} for heads_ in by_input.values())
    assert {h.features for h in heads if h.head == "lightgbm" and input_kind(h.features) in
            ("ImageNet embedding", "hand-made features")} == {f"{ra.LITE[0]}:multistage",
                                                             "classical"}
    assert {h.features for h in heads if h.features.startswith("oof:")} == {
        oof, oof + "+classical"}
    assert all(c.train_fraction == 1.0 for c in heads)
    # the fine-tuned-embedding heads embed with fold network 1 of the K-fold run, featurized first
    emb = [c for c in cells if input_kind(c.config.features if c.kind == "head" else "x")
           == "fine-tuned embedding"]
    fold1 = fold_configs(kfold[0].config)[0].model_name()
    assert len(emb) == 2 and all(c.needs[0].backbone.endswith(fold1) for c in emb)
    networks = [c.config for c in cells if c.kind == "finetune"]
    assert [n.backbone for n in networks] == [ra.LITE[2]]
    assert plan.curve_finetune.backbone == ra.LITE[0] and plan.curve_finetune.cv_folds == 0
    assert plan.curve_finetune_fractions == (0.1, 0.25)
    # the late ensemble of the study's cells (the other ensemble is a control: see below)
    ensemble = [c for c in cells if c.kind == "ensemble" and c.config.decision_rule == "argmax"]
    assert len(ensemble) == 1 and set(ensemble[0].config.members) <= set(ids)
    assert ensemble[0].config.members[0] == f"{oof}+classical".replace(":", "_") + \
        "__logreg__class_weight__meta__seed0"


def test_full_plan_has_the_controls_and_no_time_cap() -> None:
    """Every head study of the full preset ends on its trial count; the stack's controls are
    cells that reuse the K-fold run (its fold networks, its out-of-fold blocks)."""
    plan = ra.plan_for("full", 2)
    cells = plan.cells + plan.late_cells
    heads = [c.config for c in cells if c.kind == "head"]
    assert heads and all(h.tune_timeout is None for h in heads)
    assert {(h.head, h.trials) for h in heads} == {("logreg", 6), ("logreg", 3),
                                                   ("lightgbm", 3)}
    assert all(h.trials == 3 for h in heads if h.features.count("multistage") > 1)
    ids = [c.cell_id for c in cells]
    kfold = next(c for c in cells if c.kind == "kfold")
    folds = [f.model_name() for f in fold_configs(kfold.config)]
    rule = next(c for c in cells if c.cell_id == f"{kfold.cell_id}__rule-val")
    assert rule.kind == "ensemble" and rule.config.members == folds
    assert rule.config.decision_rule == "val" and rule.config.weights == "equal"
    assert ids.index(kfold.cell_id) < ids.index(rule.cell_id)  # its members exist by then
    oof = f"oof:{kfold.cell_id}"
    stacks = {(h.features, h.head, h.metadata) for h in heads if h.features.startswith("oof:")}
    assert {(oof + "+classical", "logreg", False), (oof, "logreg", False),  # no metadata
            (oof, "logreg", True)} <= stacks  # no hand-made features
    assert not any(c.kind in ("finetune", "kfold") for c in cells if "rule" in c.cell_id)
    # the seeds study: 5 split seeds, its pipelines at the study's seed are the study's cells
    seeds = plan.seeds
    assert seeds.split_seeds == (2, 3, 4, 5, 6) and len(seeds.pipelines) == 3
    by_id = {c.cell_id: c.config for c in cells}
    for label in seeds.pipelines:
        same = seeds.config(label, 2)
        assert by_id[same.model_name()] == same and same.tune_timeout is None
        assert seeds.config(label, 3).model_name() not in by_id
    assert ra.with_split_seeds(ra.plan_for("full", 2), 2, 0).seeds is None
    assert ra.with_split_seeds(ra.plan_for("quick", 2), 2, 3).seeds.split_seeds == (2, 3, 4)
    # the quick preset (a new user's first job) runs no seed study unless asked
    quick = ra.with_split_seeds(ra.plan_for("quick", 2), 2, None)
    assert quick.seeds.split_seeds == () and ra.run_seeds(quick, None, Path(".")) is None
    assert ra.plan_for("smoke", 2).seeds.split_seeds == (2, 3)


def test_progress_estimate_scales_networks_by_their_epochs_and_names_untimed_ones() -> None:
    # the first full run printed "remaining ~13 min" with 3 h of fine-tuning left: a mean
    # over head cells said nothing about networks
    plan = ra.plan_for("full", 0)
    lite2 = next(c for c in plan.cells if c.kind == "finetune")
    kfold = next(c for c in plan.cells if c.kind == "kfold")
    head = next(c for c in plan.cells if c.kind == "head")
    assert ra.cell_work(lite2) == ("network", pytest.approx(6 * (1.0 + 0.1)))
    assert ra.cell_work(kfold) == ("network", pytest.approx(12 * (3 * 2 / 3 + 3 * 0.1)))
    assert ra.cell_work(head) == ("head", head.config.trials * head.config.folds + 1.0)
    student = next(c for c in ra.plan_for("full", 0, gpu=True).late_cells if c.kind == "distill")
    assert ra.cell_work(student) == ("network", pytest.approx(12 * (1.0 + 0.1)))
    one_head = {"head": [(60.0, ra.cell_work(head)[1])]}
    assert ra.eta_text(one_head, [head, head, kfold]) == \
        "2.0 min + 1 network cell not timed yet"
    # lite2 timed at 2,072 s (6.6 units): the K-fold run's 27.6 units at that rate
    timed = {**one_head, "network": [(2072.0, 6.6)]}
    assert ra.eta_text(timed, [kfold]) == f"{2072 / 6.6 * 27.6 / 60:.1f} min"
    assert ra.eta_text(timed, []) == "0.0 min"


def test_default_report_keeps_the_study_report(tmp_path: Path) -> None:
    """Only the full preset rewrites REPORT.md; quick runs report beside their artifacts."""
    assert ra.default_report("full", tmp_path) == Path("REPORT.md")
    assert ra.default_report("quick", tmp_path) == tmp_path / "REPORT_quick.md"


def test_best_preset_is_the_full_studys_ensemble_and_nothing_else() -> None:
    from benchmarks.run_all import plan_for

    best, full = plan_for("best", 0), plan_for("full", 0)
    assert [c.kind for c in best.late_cells] == ["ensemble"]
    ens = best.late_cells[0].config
    assert ens.members == full.late_cells[0].config.members and ens.weights == "val"
    kinds = sorted(c.kind for c in best.cells)
    assert kinds == ["finetune", "head", "head", "kfold"]
    kfold = next(c for c in best.cells if c.kind == "kfold")
    stack = next(c for c in best.cells if c.cell_id == ens.members[0])
    assert kfold.config.cv_folds == 3
    assert stack.config.features == f"oof:{kfold.cell_id}+classical" and stack.config.metadata
    assert [c.cell_id for c in best.cells].index(kfold.cell_id) < \
        [c.cell_id for c in best.cells].index(stack.cell_id)  # the stack reads the K-fold run
    assert set(ens.members) | {kfold.cell_id} == {c.cell_id for c in best.cells}
    assert not best.curve_fractions and best.curve_finetune is None


def test_seeds_preset_is_the_full_studys_seed_study_and_three_network_seeds() -> None:
    """``--preset seeds`` reruns exactly the full study's seed cells (same names, so a workdir
    shares them) on only the features they read, plus lite0 at the curve's 10% at 3 model
    seeds that differ in the model seed alone."""
    from dataclasses import asdict

    seeds, full = ra.plan_for("seeds", 3), ra.plan_for("full", 3)
    assert seeds.seeds == full.seeds and seeds.seeds.split_seeds == (3, 4, 5, 6, 7)
    full_heads = {c.cell_id: c.config for c in full.cells}
    heads = [c for c in seeds.cells if c.kind == "head"]
    assert [c.config.imbalance for c in heads] == ["class_weight", "smote", "class_weight"]
    assert all(full_heads[c.cell_id] == c.config for c in heads)
    assert [(f.backbone, f.pool) for f in seeds.featurize] == [
        ("tf_efficientnet_lite0", "multistage")]
    nets = [c.config for c in seeds.cells if c.kind == "finetune"]
    assert [n.seed for n in nets] == [3, 4, 5] and {n.data_seed for n in nets} == {3}
    curve_point = next(c for c in ra.curve_cells(full, [], 3) if c.kind == "finetune")
    assert curve_point.cell_id == seeds.cells[3].cell_id  # the full study's own curve cell
    assert len({c.cell_id for c in seeds.cells}) == 6
    drop = ("seed", "split_seed", "name")
    assert len({tuple((k, v) for k, v in asdict(n).items() if k not in drop)
                for n in nets}) == 1
    assert not seeds.late_cells and not seeds.curve_fractions


def test_ablation_levers_change_one_thing_and_render_as_deltas(tmp_path) -> None:
    import json

    from benchmarks.ablation import LEVERS, lever_config
    from benchmarks.report import ablation_md
    from lesionlab.errors import LesionLabError
    from models.finetune import FinetuneConfig

    base = FinetuneConfig(color_constancy="none")
    cfg = lever_config("weighted_ce", base)
    assert (cfg.sampler, cfg.loss, cfg.image_size) == ("none", "weighted_ce", base.image_size)
    assert cfg.name == "ablation__weighted_ce__seed0"
    assert lever_config("shades_of_gray", base).color_constancy == "shades_of_gray"
    with pytest.raises(LesionLabError, match="unknown lever"):
        lever_config("nope", base)
    # the GPU path: its own folders; a basic-augmentation lever falls back to the workers
    from lesionlab.errors import warning_counts

    gpu = replace(base, input_pipeline="batched")
    assert lever_config("ema", gpu).name == "ablation__ema__batched__seed0"
    assert lever_config("ema", gpu).ema_decay == 0.999
    before = warning_counts().get("ablation lever on workers", 0)
    basic = lever_config("basic_augment", gpu)
    assert (basic.input_pipeline, basic.name) == ("workers", "ablation__basic_augment__seed0")
    assert warning_counts().get("ablation lever on workers", 0) == before + 1
    assert lever_config("size_300x225", base).image_size == (225, 300)

    def row(lever: str, val: float, test: float) -> dict:
        return {"lever": lever, "change": LEVERS[lever][0], "val_balanced_accuracy": val,
                "test_balanced_accuracy": test, "test_ci95": [test - 0.05, test + 0.05],
                "test_mel_sensitivity": 0.5, "best_epoch": 3, "epochs_run": 12,
                "train_s": 100.0, "external": {"overall": 0.6, "by_source": {
                    "external": {"n": 10, "balanced_accuracy": 0.55}}}}

    path = tmp_path / "abl.json"
    path.write_text(json.dumps({"device": "a GPU", "rows": [row("recipe", 0.70, 0.64),
                                                             row("focal", 0.72, 0.61)]}))
    md = ablation_md(path)
    assert "0.720 (+0.020)" in md and "0.610 (-0.030)" in md and "a GPU" in md
    assert "No ablation results" in ablation_md(tmp_path / "missing.json")


def test_adoption_rule_decides_from_val_seeds_by_welch_standard_errors(tmp_path) -> None:
    import json

    from benchmarks.ablation import LEVERS, adoption, lever_config
    from benchmarks.report import ablation_seeds_md
    from lesionlab.errors import LesionLabError
    from models.finetune import FinetuneConfig

    recipe = [0.50, 0.52, 0.54]  # mean 0.52, sd 0.02
    # +0.05 with the same spread: SE = sqrt(2 * 0.02^2 / 3) = 0.01633, 0.05 > 2 SE
    a = adoption([0.55, 0.57, 0.59], recipe)
    assert a["verdict"] == "adopt" and a["n"] == 3
    assert a["delta"] == pytest.approx(0.05) and a["se"] == pytest.approx(0.0163299, abs=1e-6)
    # +0.03 < 2 SE = 0.0327: the recipe stays
    assert adoption([0.53, 0.55, 0.57], recipe)["verdict"] == "no difference"
    assert adoption([0.45, 0.47, 0.49], recipe)["verdict"] == "reject"
    assert adoption([0.70, 0.71], recipe)["verdict"] == "too few seeds"

    study = FinetuneConfig(train_fraction=0.1, split_seed=0, seed=2)
    cfg = lever_config("no_color_constancy", study, "study")
    assert cfg.color_constancy == "none" and cfg.name == (
        "ablation__study-no_color_constancy__frac0.1__split0__seed2")
    with pytest.raises(LesionLabError, match="changes nothing"):
        lever_config("shades_of_gray", study, "study")

    def row(lever: str, seed: int, val: float, test: float) -> dict:
        return {"lever": lever, "change": LEVERS[lever][0], "seed": seed,
                "train_fraction": 0.1, "val_balanced_accuracy": val,
                "test_balanced_accuracy": test, "train_s": 500.0 + seed}

    rows = [row("recipe", s, v, 0.50) for s, v in enumerate(recipe)]
    rows += [row("weighted_ce", s, v, 0.48 + 0.01 * s) for s, v in enumerate([0.55, 0.57, 0.59])]
    path = tmp_path / "seeds.json"
    path.write_text(json.dumps({"device": "a CPU", "base": "study", "rows": rows}))
    md = ablation_seeds_md(path)
    line = next(ln for ln in md.splitlines() if ln.startswith("| weighted_ce"))
    assert "0.550 / 0.570 / 0.590" in line and "0.570 (0.020)" in line
    assert "+0.050 ± 0.016" in line and "| adopt |" in line and "-0.010" in line
    assert "a CPU" in md and "base `study`" in md and "train fraction 0.1" in md
    recipe_line = next(ln for ln in md.splitlines() if ln.startswith("| recipe"))
    assert "the study's recipe" in recipe_line and "Shades of Gray" in recipe_line
    assert "No seeded ablation" in ablation_seeds_md(tmp_path / "missing.json")
    # rows from two machines: each named with its levers (a row without one ran on the file's)
    rows[3:] = [{**r, "device": "CPU B"} for r in rows[3:]]
    path.write_text(json.dumps({"device": "CPU A", "base": "study", "rows": rows}))
    assert "Measured on CPU A (recipe); CPU B (weighted_ce) with" in ablation_seeds_md(path)
    path.write_text(json.dumps({"device": "a CPU", "base": "study", "rows": rows[:3] + [
        {k: v for k, v in r.items() if k != "device"} for r in rows[3:]]}))
    # --report renders the run's own --out into the seeded block, nothing else
    from benchmarks.report import update_ablation_blocks

    report = tmp_path / "R.md"
    report.write_text("prose\n<!-- ablation:start -->\nGPU table\n<!-- ablation:end -->\n")
    update_ablation_blocks(report, path, seeded=True)
    text = report.read_text()
    assert "GPU table" in text and "| weighted_ce |" in text and "| adopt |" in text


def test_head_input_table_pairs_heads_per_kind_of_input() -> None:
    from benchmarks.report import head_input_md, input_kind

    assert input_kind("oof:kfold__x+classical") == "OOF probabilities"
    assert input_kind("ft_finetune__a") == "fine-tuned embedding"
    assert input_kind("runs/models/finetune__lite0__cv1of3__seed0:flip") == \
        "fine-tuned embedding"
    assert input_kind("ft:lite0 fold 1/3:flip") == "fine-tuned embedding"  # its table label
    assert input_kind("classical") == "hand-made features"
    assert input_kind("tf_efficientnet_lite0:multistage+classical") == "ImageNet embedding"

    def row(features: str, head: str, val: float, test: float, imbalance="class_weight"):
        return {"kind": "head", "features": features, "head": head, "imbalance": imbalance,
                "train_fraction": 1.0, "val_balanced_accuracy": val,
                "balanced_accuracy": test, "metadata": False}

    md = head_input_md([row("classical", "logreg", 0.6, 0.59), row("classical", "lightgbm",
                                                                   0.5, 0.52),
                        row("oof:k+classical", "stack (lightgbm)", 0.8, 0.78),
                        row("classical", "logreg", 0.9, 0.1, imbalance="smote")])
    assert "| hand-made features | 0.590 (val 0.600) | 0.520 (val 0.500) | -0.070 |" in md
    assert "| OOF probabilities | not run | 0.780 (val 0.800) |  |" in md
    assert "| fine-tuned embedding | not run | not run |  |" in md


def test_tta_cost_scores_val_and_test_per_setting(trained_models) -> None:
    """Each TTA setting is scored on val (where it may be chosen) and test, with its cost;
    flip views change the network's probabilities, so the two settings differ somewhere."""
    from benchmarks.tta_cost import table, tta_rows
    from lesionlab.data import load_dataset
    from tests.conftest import FIXTURE

    folder = trained_models["finetune"]
    rows = tta_rows(folder, load_dataset(FIXTURE), folder.parent.parent, ("none", "flip"),
                    n_boot=5)
    assert [r["tta"] for r in rows] == ["none", "flip"]
    assert all(0 <= r[p]["balanced_accuracy"] <= 1 and r[f"{p}_s_per_image"] > 0
               for r in rows for p in ("val", "test"))
    assert rows[0]["test"] != rows[1]["test"] or rows[0]["val"] != rows[1]["val"]
    assert "| flip |" in table(rows, folder.name, "a CPU")
