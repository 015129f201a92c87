"""MLflow tracking: a tiny study cell logged to a tmp_path store and read back (no network)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from lesionlab.card_blocks import FinetuneRecord, FinetuneSettings
from lesionlab.errors import flush_warnings, warning_counts
from lesionlab.tracking import TRACKING_WARNING, Tracker, default_uri


def _card(name: str) -> SimpleNamespace:
    """The attributes of a model card the tracker reads (a fine-tuned network's)."""
    return SimpleNamespace(
        kind="finetune", name=name, classes=["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
        config=FinetuneSettings(backbone="tf_efficientnet_lite0", seed=3, train_fraction=0.25,
                                image_size=[48, 64]),
        val={"balanced_accuracy": 0.5}, n_train=40, n_val=10, n_test=12, metadata=False,
        test={"balanced_accuracy": 0.625, "macro_auc": 0.875, "ece": float("nan"),
              "per_class": {"mel": {"recall": 0.75}, "nv": {"recall": 1.0}},
              "confusion_matrix": [[3, 1], [0, 8]]},
        temperature=1.5, decision_rule="argmax", tune_time_s=0.0, fit_time_s=2.0,
        total_time_s=4.5,
        details=FinetuneRecord(mean=[0.5] * 3, std=[0.5] * 3, epoch_time_s=1.0,
                               history=[{"epoch": 1, "train_loss": 2.0},
                                        {"epoch": 2, "train_loss": 1.25}]))


def test_a_study_cell_is_logged_nested_and_reads_back(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from benchmarks import study_tracking

    folder = tmp_path / "models" / "cell_a"
    folder.mkdir(parents=True)
    (folder / "card.json").write_text(json.dumps({"name": "cell_a"}), encoding="utf-8")
    monkeypatch.setattr(study_tracking, "load_card", lambda d: _card(Path(d).name))
    opts = SimpleNamespace(tracking_uri=None, no_tracking=False)
    study = study_tracking.StudyTracking(tmp_path, opts, "smoke", 3, tmp_path / "ham")
    row = {"name": "cell_a", "model_dir": str(folder), "kind": "finetune", "head": "fine-tune",
           "input": None, "imbalance": "balanced sampler, ce", "train_fraction": 0.25,
           "group": "curve", "cell_time_s": 7.0}
    study.cell(row)
    study.external([{"name": "cell_a", "balanced_accuracy": 0.55,
                     "sources": {"external": {"balanced_accuracy": 0.4}}}])
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summary_smoke.json").write_text("{}", encoding="utf-8")
    study.finish({"preset": "smoke", "wall_time_s": 9.0, "rows": [row]}, None)

    client = MlflowClient(tracking_uri=default_uri(tmp_path))
    assert (tmp_path / "mlflow.db").exists()
    exp = client.get_experiment_by_name("lesionlab")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    cell, parent = runs["cell_a"], runs["run_all smoke seed3"]
    assert cell.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert cell.data.params["seed"] == "3" and cell.data.params["train_fraction"] == "0.25"
    assert cell.data.params["imbalance"] == "balanced sampler, ce"
    assert cell.data.params["group"] == "curve" and cell.data.params["backbone"].endswith("lite0")
    m = cell.data.metrics
    assert m["test_balanced_accuracy"] == 0.625 and m["test_recall_mel"] == 0.75
    assert m["cell_time_s"] == 7.0 and m["external_balanced_accuracy"] == 0.55
    assert m["external_external_balanced_accuracy"] == 0.4 and "test_ece" not in m
    curve = client.get_metric_history(cell.info.run_id, "epoch_train_loss")
    assert [(h.step, h.value) for h in curve] == [(1, 2.0), (2, 1.25)]
    files = {f.path for f in client.list_artifacts(cell.info.run_id)}
    assert files == {"card.json", "confusion_matrix.json"}
    assert parent.data.metrics["wall_time_s"] == 9.0 and parent.info.status == "FINISHED"
    assert {f.path for f in client.list_artifacts(parent.info.run_id)} == {"summary_smoke.json"}
    # the nested runs, filtered as in the UI
    hits = client.search_runs([exp.experiment_id], "params.group = 'curve' and "
                                                   "metrics.test_balanced_accuracy > 0.6")
    assert [r.info.run_name for r in hits] == ["cell_a"]


def test_an_unreachable_server_is_one_warning_and_the_run_goes_on(tmp_path: Path,
                                                                   caplog) -> None:
    flush_warnings()
    tracker = Tracker(tmp_path, uri="http://127.0.0.1:9")  # nothing listens on port 9
    with caplog.at_level(logging.WARNING, logger="lesionlab"):
        assert tracker.start("study") is None
        assert tracker.start("cell") is None and tracker.log("x", metrics={"a": 1.0}) is None
    assert not tracker.enabled and warning_counts() == {TRACKING_WARNING: 1}
    assert sum(TRACKING_WARNING in r.message for r in caplog.records) == 1
    assert not (tmp_path / "mlflow.db").exists()
    flush_warnings()


def test_no_tracking_logs_nothing(tmp_path: Path) -> None:
    tracker = Tracker.from_options(tmp_path, SimpleNamespace(tracking_uri=None,
                                                             no_tracking=True))
    assert tracker.start("study") is None and tracker.end("x") is None
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("command", ["models.train_head", "models.finetune", "models.ensemble",
                                     "models.kfold", "benchmarks.run_all"])
def test_every_training_command_has_the_tracking_flags(command: str) -> None:
    import importlib

    parser = importlib.import_module(command).build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    assert {"--tracking-uri", "--no-tracking"} <= flags


def test_a_card_tracking_cannot_read_turns_tracking_off_not_the_run(tmp_path: Path) -> None:
    from lesionlab.tracking import track_card

    flush_warnings()
    tracker = Tracker(tmp_path)  # never connects: the card fails before any store is used
    broken = SimpleNamespace(kind="head", name="x", config=None)  # no .items(), no scores
    assert track_card(tracker, broken, tmp_path) is None
    assert not tracker.enabled and warning_counts() == {TRACKING_WARNING: 1}
    assert not (tmp_path / "mlflow.db").exists()
    flush_warnings()
