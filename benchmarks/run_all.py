"""``python -m benchmarks.run_all``: the whole study, resumable cell by cell, then REPORT.md.

Stages: data (download on first use) -> split -> featurize -> tuned heads -> fine-tuning ->
learning curves -> optional external test -> leaderboard and figures in the report. Every
cell's result is saved as ``<workdir>/results/<cell>.json`` as soon as it is done; a rerun skips
finished cells, so a killed run resumes.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.rows import CARD_KEYS, card_fields
from featurize.backbones import sha256_file
from featurize.extract import FeaturizeConfig, featurize, pinned_feature_sets
from featurize.spec import parse_features
from lesionlab.artifacts import read_json, write_json
from lesionlab.cli import (command_parser, config_from_args, data_option, label_map_option,
                           label_options, labels_option, option, resolve_data, run_main,
                           save_config, workdir_option)
from benchmarks.comparisons import external_proba_path, save_external_proba
from benchmarks.seeds import (SeedStudy, first_seeds, head_seed_study, load_seed_record,
                              run_seed_study)
from benchmarks.study_tracking import StudyTracking
from lesionlab.cli import TrackingOptions  # the MLflow flags
from lesionlab.data import Dataset, load_external_labels
from lesionlab.device import cpu_flags, cpu_model
from lesionlab.download import ensure_data
from lesionlab.errors import LesionLabError, warn_once
from lesionlab.provenance import move_aside, provenance, same_code, short
from lesionlab.splits import class_counts, load_or_make_split
from models.bundle import CARD, ModelCard, load_card, model_path, save_card, score_text
from models.design import FROZEN_INPUTS
from models.distill import write_soft_targets
from models.ensemble import EnsembleConfig, build_ensemble, member_dirs
from models.finetune import FinetuneConfig, finetune
from models.kfold import fold_configs, kfold_finetune, kfold_name
from models.train_head import HeadConfig, train_head

log = logging.getLogger(__name__)

LITE = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
FRACTIONS = (0.1, 0.25, 0.5, 1.0)


@dataclass
class Cell:
    """One unit of the study: a name, what it runs, and how to run it.

    Raises:
        LesionLabError: ``kind`` is not one of :data:`CELL_RUNNERS`.
    """

    cell_id: str
    kind: str  # a key of CELL_RUNNERS: head | finetune | kfold | ensemble | distill
    config: Any
    group: str = "main"  # main | curve
    needs: list[FeaturizeConfig] = field(default_factory=list)  # features made first, if missing

    def __post_init__(self) -> None:
        if self.kind not in CELL_RUNNERS:
            raise LesionLabError(f"cell {self.cell_id}: unknown kind {self.kind!r}; expected "
                                 f"one of {', '.join(CELL_RUNNERS)}")

    @property
    def runner(self) -> CellRunner:
        """How a cell of this kind is run (:data:`CELL_RUNNERS`)."""
        return CELL_RUNNERS[self.kind]


@dataclass
class Plan:
    """What a preset runs."""

    featurize: list[FeaturizeConfig]
    cells: list[Cell] = field(default_factory=list)
    late_cells: list[Cell] = field(default_factory=list)  # run after the learning curves
    curve_fractions: tuple[float, ...] = FRACTIONS
    curve_finetune: FinetuneConfig | None = None
    curve_finetune_fractions: tuple[float, ...] | None = None  # None: curve_fractions
    curve_head_trials: int = 10
    seeds: SeedStudy | None = None  # heads on cached features over split seeds


@dataclass(frozen=True)
class CellRunner:
    """How one kind of cell is run: ``run(cell, dataset, workdir) -> ModelCard``, the model
    folders it writes besides ``<workdir>/models/<cell_id>``, whether its cost is the
    card's training time (summed over resumed parts and folds) rather than the call's wall
    time, and ``work(cell) -> (cost class, units)``: what its wall time scales with, for the
    progress line's estimate (:func:`cell_work`)."""

    run: Callable[[Cell, Dataset, Path], ModelCard]
    extra_folders: Callable[[Cell, Path], list[Path]] = lambda cell, workdir: []
    cost_is_training_time: bool = False
    work: Callable[[Cell], tuple[str, float]] = lambda cell: (cell.kind, 1.0)


def _run_head(cell: Cell, dataset: Dataset, workdir: Path) -> ModelCard:
    return train_head(dataset, workdir, cell.config)


def _run_ensemble(cell: Cell, dataset: Dataset, workdir: Path) -> ModelCard:
    members = [Path(workdir) / "models" / m for m in cell.config.members]
    return build_ensemble(members, dataset, workdir, cell.config)


@dataclass(frozen=True)
class DistillCell:
    """A distillation cell's settings: the student's fine-tuning config (its ``name`` set,
    as the soft targets' file is only known once the teacher exists) and the teacher's cell
    id (``models.distill``)."""

    student: FinetuneConfig
    teacher: str


def _run_distill(cell: Cell, dataset: Dataset, workdir: Path) -> ModelCard:
    cfg = cell.config.student
    targets = write_soft_targets(model_path(workdir, cell.config.teacher), dataset, workdir, cfg)
    return finetune(dataset, workdir, replace(cfg, distill_targets=str(targets)), resume=True)


# the share of an epoch's cost that is the val pass (1,431 of 8,584 train + val images of the
# HAM10000 split, forward only, about a third of a training step's cost per image)
VAL_EPOCH_SHARE = 0.1


def _network_work(cfg: FinetuneConfig, networks: int) -> tuple[str, float]:
    """``network`` units: epochs x (the share of train each network trains on +
    :data:`VAL_EPOCH_SHARE`), summed over ``networks`` networks."""
    k = cfg.cv_folds
    share = cfg.train_fraction * ((k - 1) / k if k else 1.0)
    return "network", cfg.epochs * networks * (share + VAL_EPOCH_SHARE)


def _head_work(cell: Cell) -> tuple[str, float]:
    """``head`` units: Optuna trials x CV folds + 1 (the refit)."""
    return "head", float(cell.config.trials * cell.config.folds + 1)


def _kfold_folders(cell: Cell, workdir: Path) -> list[Path]:
    return [model_path(workdir, c.model_name()) for c in fold_configs(cell.config)]


# One entry per kind of cell; a new kind is one runner registered here, nothing else changes.
CELL_RUNNERS: dict[str, CellRunner] = {
    "head": CellRunner(_run_head, work=_head_work),
    "finetune": CellRunner(lambda cell, dataset, workdir:
                           finetune(dataset, workdir, cell.config, resume=True),
                           cost_is_training_time=True,
                           work=lambda cell: _network_work(cell.config, 1)),
    # K fold networks, then their ensemble (the cell's folder)
    "kfold": CellRunner(lambda cell, dataset, workdir:
                        kfold_finetune(dataset, workdir, cell.config),
                        extra_folders=_kfold_folders, cost_is_training_time=True,
                        work=lambda cell: _network_work(cell.config, cell.config.cv_folds)),
    "ensemble": CellRunner(_run_ensemble),
    # the teacher's soft targets (models.distill), then one network trained on them
    "distill": CellRunner(_run_distill, cost_is_training_time=True,
                          work=lambda cell: _network_work(cell.config.student, 1)),
}


# The full preset's head studies end on their trial count, never on a time cap, so the same
# command gives the same numbers on a slower or busier CPU. The counts are sized to what the
# former 60 s cap gave, timed on the 2-core AMD EPYC with nothing beside it (2026-12-02):
# logistic regression on lite0 multistage (1,712 columns) ran 10 trials in 99 s (6.1/min),
# so 60 s holds 6. Earlier rounds measured 8.7/min on a machine of the same CPU name (why this
# one is slower was not found) and the concatenated backbones (5,136+ columns) at 3.3/min;
# scaled by the same 0.7, 60 s holds about 2-3: 3. A
# LightGBM trial fits 3 folds of up to 300 trees at 30-40 s a fit (models.heads.MAX_TREES);
# the cap, checked only between trials, let 2-3 through: 3. A head cell then costs about what
# it did under the cap (77-128 s; REPORT.md section 5), which keeps the preset inside 150 min.
FULL_TRIALS = {"logreg": 6, "lightgbm": 3}
FULL_CONCAT_TRIALS = 3  # logistic regression on two or more ImageNet backbones concatenated


def full_trials(features: str, head: str) -> int:
    """Optuna trials of a full-preset head cell on ``features`` (see :data:`FULL_TRIALS`)."""
    backbones = sum(b.source in LITE for b in parse_features(features))
    return FULL_CONCAT_TRIALS if head == "logreg" and backbones > 1 else FULL_TRIALS[head]


def plan_for(preset: str, seed: int, workdir: Path | str = "runs", gpu: bool = False) -> Plan:
    """The cells of the ``quick``, ``full``, ``best``, ``seeds`` (or ``smoke``) preset.

    Raises:
        LesionLabError: ``preset`` is not quick, full, best, seeds or smoke.
    """
    if preset in ("quick", "smoke"):
        return quick_plan(seed, smoke=preset == "smoke", gpu=gpu)
    if preset == "best":
        return best_plan(seed, workdir, gpu)
    if preset == "seeds":
        return seeds_plan(seed, workdir, gpu)
    if preset != "full":
        raise LesionLabError(f"unknown --preset {preset!r}; expected quick, full, best or "
                             f"seeds (or smoke)")
    return full_plan(seed, workdir, gpu)


def on_gpu(gpu: bool) -> tuple[dict, dict]:
    """(FinetuneConfig, FeaturizeConfig) overrides of ``--gpu``: networks train on CUDA with
    the batched input pipeline (``models.batched_input``) and featurize runs there; the
    recipe (batch size, learning rate, epochs) is the CPU's. Empty without ``--gpu``."""
    if not gpu:
        return {}, {}
    return dict(device="cuda", input_pipeline="batched", num_workers=8), dict(device="cuda")


def quick_plan(seed: int, smoke: bool = False, gpu: bool = False) -> Plan:
    """The default preset (lite0 only, small budgets); ``smoke``: tiny budgets for tests."""
    size = (72, 96) if smoke else (168, 224)
    net, fz = on_gpu(gpu)
    feats = [FeaturizeConfig(backbone="tf_efficientnet_lite0", tta="none", image_size=size,
                             **fz)]
    plan = Plan(featurize=feats, curve_fractions=(0.25, 1.0),
                curve_head_trials=2 if smoke else 4)
    for head in ("logreg", "lightgbm"):
        cfg = HeadConfig(features="tf_efficientnet_lite0:none", head=head,
                         imbalance="class_weight", trials=2 if smoke else 6, folds=3,
                         seed=seed, n_boot=50 if smoke else 500,
                         tune_timeout=None)  # the trial count ends the study: same numbers on any CPU
        plan.cells.append(_head_cell(cfg))
    # the split-seed study doubles the heads' cost (~7 min on 2 cores), so the first job a new
    # user runs holds it with no seeds (--split-seeds 2 adds them); smoke keeps 2 for tests
    plan.seeds = head_seed_study(plan.cells[0].config, first_seeds(seed, 2 if smoke else 0))
    ft = FinetuneConfig(image_size=(48, 64) if smoke else (96, 128), epochs=1,
                        train_fraction=0.25 if not smoke else 1.0, seed=seed,
                        n_boot=50 if smoke else 500, tta="none",
                        **{"num_workers": 0 if smoke else 2, **net})
    plan.cells.append(Cell(ft.model_name(), "finetune", ft))
    plan.curve_finetune = None
    return plan


def full_plan(seed: int, workdir: Path | str = "runs", gpu: bool = False) -> Plan:
    """The whole study (``gpu``: its networks and feature extraction on CUDA, see
    :func:`on_gpu`)."""
    # Budgets are sized so the study's cells fit 150 min on a 2-core CPU (AMD EPYC with
    # avx512_bf16): heads end on a trial count sized to the former 60 s cap (FULL_TRIALS);
    # lite0 is fine-tuned 3-fold with the study's recipe (FinetuneConfig's defaults: 200x150,
    # ISIC augmentation, 12 epochs, schedule finished, epoch chosen on val, stem + 2 blocks
    # frozen; 60 min for the 3 folds), lite2 with 6 epochs on all of train. A single lite0 on
    # all of train, fine-tuned lite1 and the 50% fine-tuning curve point gave way to the
    # K-fold run; its fold networks (2/3 of train) are the curve's last point. The split-seed
    # study adds 4 seeds x 3 head cells (about 20-25 min at those budgets); the controls reuse
    # the K-fold run's probabilities (a few minutes).
    net, fz = on_gpu(gpu)
    feats = [FeaturizeConfig(backbone=b, tta="flip", pool="multistage", **fz) for b in LITE]
    feats += [FeaturizeConfig(backbone="classical", num_workers=2)]
    plan = Plan(featurize=feats, curve_finetune_fractions=(0.1, 0.25))
    ms = [f"{b}:multistage" for b in LITE]

    def cell(features: str, head: str, imbalance: str = "class_weight",
             metadata: bool = False) -> Cell:
        return _head_cell(HeadConfig(features=features, head=head, imbalance=imbalance,
                                     metadata=metadata, seed=seed,
                                     trials=full_trials(features, head), tune_timeout=None))

    grid = [cell(ms[0], "logreg", imb)  # the imbalance grid on the cheapest backbone
            for imb in ("none", "class_weight", "smote")]
    plan.cells += grid
    plan.cells.append(cell(ms[0], "lightgbm", "class_weight"))
    concat = "+".join(ms)
    frozen = cell(concat + "+classical", "logreg", metadata=True)
    plan.cells += [cell(concat, "logreg"), cell(concat + "+classical", "logreg"), frozen,
                   cell(ms[1], "logreg"), cell(ms[2], "logreg"),
                   # boosting where it should be strongest: 75 informative hand-made columns
                   cell("classical", "logreg"), cell("classical", "lightgbm")]
    networks = [FinetuneConfig(backbone=LITE[2], epochs=6, seed=seed, **net)]
    plan.cells += [Cell(n.model_name(), "finetune", n) for n in networks]
    ft = FinetuneConfig(seed=seed, cv_folds=3, **net)
    plan.cells.append(Cell(kfold_name(ft), "kfold", ft))
    plan.curve_finetune = FinetuneConfig(seed=seed, **net)
    # stacks: out-of-fold probabilities + metadata (+ hand-made features), logreg vs LightGBM
    stacks = [cell(f"oof:{kfold_name(ft)}{extra}", head, metadata=True)
              for extra in ("", "+classical") for head in ("logreg", "lightgbm")]
    plan.cells += stacks + control_cells(ft, seed) + embedding_cells(ft, seed, workdir, fz)
    # the logreg stack, lite2 and the richest frozen head, weights chosen on val
    members = [stacks[2].cell_id] + [n.model_name() for n in networks] + [frozen.cell_id]
    ens = EnsembleConfig(members=members, name=f"ensemble__stack+lite2-finetuned+head__seed{seed}",
                         weights="val", seed=seed)
    plan.late_cells.append(Cell(ens.name, "ensemble", ens))
    if gpu:  # the rows that do not fit 2 CPU cores
        extra, late = gpu_cells(ft, members[1:], seed)
        plan.cells += extra
        plan.late_cells += late
    # the imbalance and head comparisons on lite0 multistage, over 5 split seeds
    plan.seeds = head_seed_study(grid[1].config, first_seeds(seed, 5), full_trials)
    return plan


# distillation's (temperature, teacher weight) grid in the GPU study; val chooses among them
DISTILL_GRID = ((1.0, 0.5), (2.0, 0.5), (2.0, 0.9), (4.0, 0.9))


def gpu_cells(ft: FinetuneConfig, others: list[str], seed: int) -> tuple[list[Cell], list[Cell]]:
    """What only ``--gpu`` runs: K-fold lite1 and lite2 with the recipe beside lite0's (more
    diverse out-of-fold members), the logreg stack on all three's out-of-fold probabilities
    + hand-made features + metadata, lite0 on all of train with the recipe (the network
    trained plainly), and (late) the ensemble of that stack with ``others`` (lite2 on all of
    train, the richest frozen head; weights on val) and lite0 distilled from it at each
    :data:`DISTILL_GRID` point.

    Returns:
        (cells, late cells).
    """
    kfolds = [ft] + [replace(ft, backbone=b) for b in LITE[1:]]
    oof = "+".join(f"oof:{kfold_name(k)}" for k in kfolds) + "+classical"
    pipe = "" if ft.input_pipeline == "workers" else f"{ft.input_pipeline}__"
    stack = _head_cell(HeadConfig(  # named: three K-fold names would pass 255 bytes
        features=oof, head="logreg", metadata=True, seed=seed, trials=full_trials(oof, "logreg"),
        tune_timeout=None, name=f"stack__oof-kfold-lite012+classical__logreg__class_weight__"
                                f"meta__{pipe}seed{seed}"))
    plain = replace(ft, cv_folds=0)
    cells = [Cell(kfold_name(k), "kfold", k) for k in kfolds[1:]]
    cells += [stack, Cell(plain.model_name(), "finetune", plain)]
    ens = EnsembleConfig(members=[stack.cell_id, *others], weights="val", seed=seed,
                         name=f"ensemble__stack-lite012+lite2-finetuned+head__seed{seed}")
    late = [Cell(ens.name, "ensemble", ens)]
    for t, w in DISTILL_GRID:
        student = replace(plain, distill_temperature=t, distill_weight=w,
                          name=f"distill__{plain.model_name()}__T{t:g}-a{w:g}")
        late.append(Cell(student.name, "distill", DistillCell(student, ens.name)))
    return cells, late


def control_cells(ft: FinetuneConfig, seed: int) -> list[Cell]:
    """The controls of "stacking is where the points came from" (``benchmarks/claims.toml``),
    from the K-fold run's saved probabilities, no network trained again: its fold networks
    averaged with a decision rule chosen on val (argmax, class-prior correction or per-class
    factors: ``models.ensemble.choose_decision_rule``), and the logreg stack without metadata,
    with and without the hand-made features (the stack without hand-made features but with
    metadata is the plan's ``oof:`` + metadata cell)."""
    folds = [c.model_name() for c in fold_configs(ft)]
    rule = EnsembleConfig(members=folds, name=f"{kfold_name(ft)}__rule-val", weights="equal",
                          decision_rule="val", seed=seed)
    stacks = [_head_cell(HeadConfig(features=f"oof:{kfold_name(ft)}{extra}", head="logreg",
                                    seed=seed, trials=FULL_TRIALS["logreg"],
                                    tune_timeout=None))
              for extra in ("+classical", "")]
    return [Cell(rule.name, "ensemble", rule)] + stacks


def embedding_cells(ft: FinetuneConfig, seed: int, workdir: Path | str,
                    featurize_kw: dict | None = None) -> list[Cell]:
    """Heads on the embedding of fold network 0 of the K-fold run, trained only on the fold it
    held out (``train_head`` drops the rows it trained on): the fine-tuned-embedding input."""
    fold0 = fold_configs(ft)[0]
    backbone = str(model_path(workdir, fold0.model_name()))
    emb = FeaturizeConfig(backbone=backbone, tta="flip", num_workers=2, **(featurize_kw or {}))
    short = f"{fold0.backbone.removeprefix('tf_efficientnet_')}-fold1of{fold0.cv_folds}"
    cfgs = [HeadConfig(features=f"{backbone}:flip", head=head, seed=seed,
                       trials=full_trials(f"{backbone}:flip", head), tune_timeout=None,
                       name=f"ftemb__{short}__{head}__class_weight__seed{seed}")
            for head in ("logreg", "lightgbm")]
    return [Cell(cfg.name, "head", cfg, needs=[emb]) for cfg in cfgs]


def best_plan(seed: int, workdir: Path | str = "runs", gpu: bool = False) -> Plan:
    """``--preset best``: only the pipeline the full study recommends, its recipe written down
    here (not re-chosen): the full preset's late ensemble, which val ranked first (0.821).

    Three lite0 networks fine-tuned with the study's recipe, each on two thirds of train
    (lesion-grouped folds), give out-of-fold probabilities; with the hand-made
    colour/texture/shape features and age, sex and site they feed a logistic-regression stack.
    The stack, lite2 fine-tuned for 6 epochs and the frozen 3-backbone + hand-made + metadata
    head are averaged with weights chosen on val. The final model folder is the ensemble's.
    """
    full = full_plan(seed, workdir, gpu)
    ens = full.late_cells[0]
    wanted = set(ens.config.members) | {c.cell_id for c in full.cells
                                         if c.runner is CELL_RUNNERS["kfold"]}
    return Plan(featurize=full.featurize, cells=[c for c in full.cells if c.cell_id in wanted],
                late_cells=[ens], curve_fractions=())


# the model seeds of the seeds preset's networks: 3, the fewest for a spread
NETWORK_SEEDS = 3
NETWORK_SEED_FRACTION = 0.1  # the learning curve's first fine-tuning point


def seeds_plan(seed: int, workdir: Path | str = "runs", gpu: bool = False) -> Plan:
    """``--preset seeds``: the full study's spread over seeds alone, where a full run does not
    fit (about 55 min on a 2-core AMD EPYC against about 4.3 h for the full preset).

    The full preset's split-seed study as it is there (lite0 multistage features; logistic
    regression with class weights and with SMOTE, LightGBM with class weights; the same trial
    counts, 5 split seeds), its split-seed-``seed`` cells being the full preset's own cells;
    and the cheapest network of the study, the learning curve's first fine-tuning point (lite0
    with the study's recipe on 10% of train), at :data:`NETWORK_SEEDS` model seeds from
    ``seed`` on the same split and the same 10%: how far training alone moves a network.
    """
    full = full_plan(seed, workdir, gpu)
    assert full.seeds is not None
    heads = [full.seeds.config(label, seed) for label in full.seeds.pipelines]
    backbones = {b.source for h in heads for b in parse_features(h.features)}
    plan = Plan(featurize=[f for f in full.featurize if f.backbone in backbones],
                cells=[_head_cell(h) for h in heads], curve_fractions=(), seeds=full.seeds)
    assert full.curve_finetune is not None
    for s in range(seed, seed + NETWORK_SEEDS):
        ft = replace(full.curve_finetune, seed=s, split_seed=seed,
                     train_fraction=NETWORK_SEED_FRACTION)
        plan.cells.append(Cell(ft.model_name(), "finetune", ft))
    return plan


def _head_cell(cfg: HeadConfig, group: str = "main") -> Cell:
    return Cell(cfg.model_name(), "head", cfg, group)


def summarize(card: ModelCard) -> dict:
    """The leaderboard row of a model card: its typed ``spec``, the kind of input a head
    reads and the display labels made from them (``benchmarks.rows``), then its scores."""
    t, scalars = card.test, card.details.scalars()
    return {
        "name": card.name, "kind": card.kind, **card_fields(card), "metadata": card.metadata,
        "train_fraction": card.config.train_fraction,
        "balanced_accuracy": t["balanced_accuracy"],
        "ci95": t.get("ci95", {}).get("balanced_accuracy"),
        "macro_f1": t["macro_f1"], "macro_auc": t["macro_auc"],
        "mel_sensitivity": t["mel_sensitivity"], "ece": t["ece"],
        "ece_uncalibrated": t["ece_uncalibrated"],
        "per_class_recall": {c: v["recall"] for c, v in t["per_class"].items()},
        "mel_operating_point": t["mel_operating_point"],
        "confusion_matrix": t["confusion_matrix"],
        "val_balanced_accuracy": card.val["balanced_accuracy"],
        "cv_balanced_accuracy": scalars.get("cv_balanced_accuracy"),
        "total_time_s": card.total_time_s,
        "epoch_time_s": scalars.get("epoch_time_s"),
        "train_img_per_s": scalars.get("train_img_per_s"),
        "model_dir": None,
    }


def results_dir(workdir: Path | str) -> Path:
    """``<workdir>/results``."""
    return Path(workdir) / "results"


def run_cell(cell: Cell, dataset: Dataset, workdir: Path, reuse_stale: bool = False) -> dict:
    """Run one cell (or load its saved result) and return its leaderboard row.

    A saved result is reused only when the code and lock that made it are this process's
    (:func:`lesionlab.provenance.same_code`). Otherwise the cell is run again, its old result
    and model folders moved under ``<workdir>/stale/`` first (nothing is deleted); with
    ``reuse_stale`` the old row is kept and marked ``"stale": True``.
    """
    out = results_dir(workdir) / f"{cell.cell_id}.json"
    if out.exists():  # finished earlier; its labels follow the card's current wording
        row = read_json(out)
        if same_code(row.get("provenance")):
            return with_current_labels(row)
        if reuse_stale:
            warn_once(f"reusing cells made by other code (--reuse-stale), e.g. {cell.cell_id} "
                      f"({short(row.get('provenance'))}); their rows are marked stale",
                      key="reuse_stale")
            return {**with_current_labels(row), "stale": True}
    archive_stale(cell, workdir)
    t0 = time.perf_counter()
    # e.g. the embedding of a network an earlier cell fine-tuned; the cell reads exactly these
    made = [featurize(dataset, workdir, need, fresh_code=not reuse_stale).key
            for need in cell.needs]
    with pinned_feature_sets(made):  # a head reads exactly the sets made for it
        card = cell.runner.run(cell, dataset, Path(workdir))
    row = summarize(card)
    row["group"] = cell.group
    row["model_dir"] = str(Path(workdir) / "models" / card.name)
    # what this cell cost: a network's training time (summed over resumed parts and folds),
    # otherwise this call's wall time (an ensemble's card also counts its members' training)
    row["cell_time_s"] = (card.total_time_s if cell.runner.cost_is_training_time
                          else round(time.perf_counter() - t0, 1))
    row["provenance"] = card.provenance
    write_json(out, row)
    return row


def cell_folders(cell: Cell, workdir: Path | str) -> list[Path]:
    """The model folders a cell writes (a K-fold cell: its fold networks and their ensemble)."""
    return [model_path(workdir, cell.cell_id)] + cell.runner.extra_folders(cell, Path(workdir))


def archive_stale(cell: Cell, workdir: Path | str) -> list[Path]:
    """Move a cell's result and model folders made by other code (or of unknown provenance)
    to ``<workdir>/stale/<code sha256[:12]>/``, so the rerun starts clean and nothing is lost.

    A folder whose card was made by this code (a resumed or finished part of this run) stays.
    Returns the paths moved.
    """
    moved = []
    result = results_dir(workdir) / f"{cell.cell_id}.json"
    for folder in cell_folders(cell, workdir):
        if not (folder / CARD).exists() or same_code(load_card(folder).provenance):
            continue
        moved.append(move_aside(folder, workdir, load_card(folder).provenance))
    if result.exists():
        moved.append(move_aside(result, workdir, read_json(result).get("provenance")))
    for path in moved:
        log.info("stale (made by %s): moved to %s", path.parent.name, path)
    return moved


def with_current_labels(row: dict) -> dict:
    """A saved row with its typed fields and display labels made again from its model card:
    the one place a row saved by older code (without ``spec``) gets them, and labels follow
    the current wording."""
    return {**row, **card_fields(load_card(row["model_dir"]))}


def cell_work(cell: Cell) -> tuple[str, float]:
    """What a cell's wall time scales with, for the progress line's estimate: its cost class
    (``network``: fine-tuning cells and K-fold runs; ``head``; ``ensemble``) and its size in
    that class's units, as its kind's :class:`CellRunner` gives them. A network: epochs x
    (the share of train it trains on, summed over its networks, + :data:`VAL_EPOCH_SHARE`);
    a head: Optuna trials x CV folds + 1 (the refit); anything else: 1. Backbone size is
    ignored (lite2 trains about 1.5x slower than lite0 on a 2-core CPU), so the estimate is
    rough."""
    return cell.runner.work(cell)


def eta_text(timed: dict[str, list[tuple[float, float]]], left: list[Cell]) -> str:
    """The progress line's "remaining" text for the cells ``left``.

    Args:
        timed: cost class -> (seconds, units) of each cell of that class run in this process
            (:func:`cell_work`).
        left: the cells not yet run.

    Returns:
        e.g. ``"12.5 min"``, ``"3.0 min + 2 network cells not timed yet"`` while a class has
        no timed cell (its cost cannot be guessed from other classes), or ``"0.0 min"``.
    """
    seconds, untimed = 0.0, {}
    for cell in left:
        cls, units = cell_work(cell)
        if timed.get(cls):
            rate = sum(s for s, _ in timed[cls]) / sum(u for _, u in timed[cls])
            seconds += rate * units
        else:
            untimed[cls] = untimed.get(cls, 0) + 1
    text = f"{seconds / 60:.1f} min"
    for cls, n in sorted(untimed.items()):
        text += f" + {n} {cls} cell{'s' if n > 1 else ''} not timed yet"
    return text


def _run_cells(cells: list[Cell], dataset: Dataset, workdir: Path, t0: float,
               rows: list[dict], timed: dict[str, list[tuple[float, float]]],
               reuse_stale: bool = False,
               on_row: Callable[[dict, bool], None] = lambda row, reused: None) -> None:
    for i, cell in enumerate(cells):
        ts = time.perf_counter()
        saved = results_dir(workdir) / f"{cell.cell_id}.json"
        cached = saved.exists() and (reuse_stale or same_code(read_json(saved).get("provenance")))
        row = run_cell(cell, dataset, workdir, reuse_stale)
        took = time.perf_counter() - ts
        if not cached:
            cls, units = cell_work(cell)
            timed.setdefault(cls, []).append((took, units))
        rows.append(row)
        on_row(row, cached)  # e.g. MLflow tracking
        lo, hi = row["ci95"] or (None, None)
        print(f"[{i + 1}/{len(cells)}] {cell.cell_id}: bal.acc "
              f"{score_text(row['balanced_accuracy'])} [{score_text(lo)}, {score_text(hi)}] {'(stale, reused) ' if row.get('stale') else '(cached) ' if cached else ''}{took:.0f} s | elapsed "
              f"{(time.perf_counter() - t0) / 60:.1f} min, remaining ~"
              f"{eta_text(timed, cells[i + 1:])} of this stage", flush=True)


def curve_cells(plan: Plan, main_rows: list[dict], seed: int) -> list[Cell]:
    """Learning-curve cells for the best frozen recipe (chosen on val, not test) and fine-tuning."""
    heads_rows = [r for r in main_rows if r["kind"] == "head" and r["input"] in FROZEN_INPUTS]
    cells: list[Cell] = []
    if heads_rows:
        best = max(heads_rows, key=lambda r: r["val_balanced_accuracy"])
        base = asdict(load_card(best["model_dir"]).config)
        for frac in plan.curve_fractions:
            if frac >= 1.0:
                continue
            cfg = HeadConfig(**{**base, "train_fraction": frac, "name": None,
                                "trials": plan.curve_head_trials})
            cells.append(_head_cell(cfg, group="curve"))
    if plan.curve_finetune is not None:
        for frac in plan.curve_finetune_fractions or plan.curve_fractions:
            if frac >= 1.0:
                continue
            cfg = FinetuneConfig(**{**asdict(plan.curve_finetune), "train_fraction": frac})
            cells.append(Cell(cfg.model_name(), "finetune", cfg, group="curve"))
    return cells


def fold_rows(rows: list[dict]) -> list[dict]:
    """The fold networks of each K-fold cell as rows of group ``fold``: single networks on
    (K-1)/K of train, the fine-tuning learning curve's last point (their cost is the cell's).
    Each fold network once, though several ensembles average it (a control's decision rule);
    each row carries its network's own provenance (the code that trained it)."""
    out, seen = [], set()
    for row in rows:
        if row["kind"] != "ensemble" or row.get("group", "main") != "main":
            continue
        card = load_card(row["model_dir"])
        if not card.details.out_of_fold_ids():
            continue
        for member in member_dirs(row["model_dir"], card):
            fold = load_card(member)
            if fold.name in seen:
                continue
            seen.add(fold.name)
            k = fold.config.cv_folds
            out.append({**summarize(fold), "group": "fold", "model_dir": str(member),
                        "train_fraction": round((k - 1) / k, 3),
                        "provenance": fold.provenance})
    return out


def run_seeds(plan: Plan, dataset: Dataset, workdir: Path, reuse_stale: bool = False,
              on_row: Callable[[dict, bool], None] = lambda row, reused: None) -> dict | None:
    """The plan's split-seed study (``benchmarks.seeds``): every pipeline at every split
    seed, each a head cell run through :func:`run_cell` (the study's own split seed is the
    study's cell, already run); returns the saved record, None when the plan has none.
    ``on_row`` (e.g. MLflow tracking) sees the cells of the other seeds."""
    if plan.seeds is None or not plan.seeds.split_seeds:
        return None

    def one(cfg: HeadConfig) -> dict:
        ts = time.perf_counter()
        row = run_cell(_head_cell(cfg, group="seeds"), dataset, workdir, reuse_stale)
        if cfg.data_seed != cfg.seed:
            on_row(row, False)
        print(f"[split seed {cfg.data_seed}] {row['name']}: bal.acc "
              f"{score_text(row['balanced_accuracy'])}, {time.perf_counter() - ts:.0f} s",
              flush=True)
        return row

    return run_seed_study(plan.seeds, one, results_dir(workdir), reuse_stale)


def study_plan(preset: str, seed: int, workdir: Path | str, split_seeds: int | None,
               gpu: bool = False) -> Plan:
    """The preset's plan (:func:`plan_for`) with its split-seed study (:func:`with_split_seeds`);
    with ``gpu`` (:func:`on_gpu`; the report's machine line names the GPU) CUDA is checked
    first.

    Raises:
        LesionLabError: ``gpu`` where torch sees no CUDA device, or an unknown preset.
    """
    if gpu:
        require_cuda()
    return with_split_seeds(plan_for(preset, seed, workdir, gpu=gpu), seed, split_seeds)


def with_split_seeds(plan: Plan, seed: int, n: int | None) -> Plan:
    """``plan`` with its split-seed study over ``n`` seeds from ``seed`` (None: the preset's
    count; 0: no seed study)."""
    if n is not None and plan.seeds is not None:
        plan.seeds = replace(plan.seeds, split_seeds=first_seeds(seed, n)) if n else None
    return plan


def external_eval(rows: list[dict], external: Dataset, workdir: Path) -> list[dict]:
    """Score every model once on an external labelled folder, overall and per image source.

    Goes through ``models.evaluate`` (features cached per image set); the score also goes onto
    the model's card, where the web page shows it.
    """
    from models.evaluate import evaluate_model

    by = "dataset" if "dataset" in external.frame.columns else None
    out = []
    for row in rows:
        folder = Path(row["model_dir"])
        cache = results_dir(workdir) / "external" / f"{row['name']}.json"
        # the same images scored by the same trained model (its saved test probabilities)
        key = {"data": str(external.root), "n": len(external),
               "model": sha256_file(folder / "test_proba.npy")}
        saved = external_proba_path(workdir, row["name"])  # what the comparisons read
        if cache.exists() and read_json(cache).get("key") == key and saved.exists():
            out.append(read_json(cache)["row"])  # scored in an earlier part of this run
            continue
        res = evaluate_model(folder, external, by=by, workdir=workdir, n_boot=500,
                             keep_proba=True)
        save_external_proba(workdir, row["name"], external, res.pop("proba"))
        overall = res["overall"]
        card = load_card(folder)
        card.external = {"data": str(external.root), **overall}
        save_card(folder, card)
        out.append({**{k: row[k] for k in ("name", "kind", *CARD_KEYS, "metadata",
                                            "train_fraction", "total_time_s")},
                    "balanced_accuracy": overall["balanced_accuracy"],
                    "ci95": overall["balanced_accuracy_ci95"], "macro_f1": overall["macro_f1"],
                    "macro_auc": overall["macro_auc"],
                    "mel_sensitivity": overall["mel_sensitivity"], "ece": overall["ece"],
                    "mel_operating_point": overall["mel_operating_point"],
                    "sources": res["by"]["groups"] if res["by"] else None,
                    "provenance": provenance()})
        write_json(cache, {"key": key, "row": out[-1]})
    return out


def run_all(data: Path, workdir: Path, preset: str = "quick", seed: int = 0,
            external: Path | None = None, report: Path | None = Path("REPORT.md"),
            download: bool = True, report_only: bool = False,
            reuse_stale: bool = False, labels: str = "auto",
            label_map: Path | None = None, tracking: Any = None,
            split_seeds: int | None = None, gpu: bool = False) -> dict:
    """The whole study; returns the rows written to the report.

    ``labels``/``label_map`` say how ``data`` is labelled (``load_dataset``; the map applies
    to ``external`` too). ``tracking``: parsed ``TrackingOptions`` (MLflow,
    ``benchmarks.study_tracking``), None: off. ``split_seeds``: split seeds of the heads on
    cached features (None: the preset's). ``gpu``: networks and featurize on CUDA
    (:func:`study_plan`). ``report_only`` rebuilds the report from finished cells, running
    nothing; a cell made by other code runs again unless ``reuse_stale`` (marked stale).

    Raises:
        LesionLabError: ``gpu`` where torch sees no CUDA device, or bad data or options.
    """
    t0 = time.perf_counter()
    plan = study_plan(preset, seed, workdir, split_seeds, gpu)
    dataset = ensure_data(data, download=download, labels=labels, label_map=label_map)
    split = load_or_make_split(dataset, workdir, seed)
    print(f"data: {len(dataset)} images, {dataset.frame['lesion_id'].nunique()} lesions; "
          f"split seed {seed}:\n{class_counts(split).to_string()}", flush=True)
    ext_ds = load_external_labels(external, label_map=label_map) if external else None
    if report_only:
        return _report_from_saved(plan, dataset, split, workdir, report, preset, seed, ext_ds)
    study = StudyTracking(workdir, tracking, preset, seed, data, external)
    made = []  # the cells read these exact sets, whatever else the workdir's cache holds
    for cfg in plan.featurize:
        ts = time.perf_counter()
        fs = featurize(dataset, workdir, cfg, fresh_code=not reuse_stale)
        made.append(fs.key)
        print(f"features {fs.key}: {fs.features.shape[1]} dims, "
              f"{time.perf_counter() - ts:.0f} s", flush=True)
    rows: list[dict] = []
    timed: dict[str, list[tuple[float, float]]] = {}  # cost class -> (s, units) per cell run
    with pinned_feature_sets(made):
        _run_cells(plan.cells, dataset, workdir, t0, rows, timed, reuse_stale, study.cell)
        curve = curve_cells(plan, rows, seed)
        _run_cells(curve, dataset, workdir, t0, rows, timed, reuse_stale, study.cell)
        _run_cells(plan.late_cells, dataset, workdir, t0, rows, timed, reuse_stale, study.cell)
        seeds = run_seeds(plan, dataset, workdir, reuse_stale, study.cell)
    rows += study.cells(fold_rows(rows))  # trained inside their K-fold cell
    ext_rows = study.external(external_eval([r for r in rows if r.get("group", "main") == "main"],
                                            ext_ds, workdir) if ext_ds is not None else None)
    wall = time.perf_counter() - t0
    summary = {"preset": preset, "seed": seed, "wall_time_s": round(wall, 1),
               "rows": rows, "external": ext_rows, "n_images": len(dataset),
               "cpu": machine_label(gpu), "provenance": provenance(), "seeds": seeds}
    write_json(Path(workdir) / "results" / f"summary_{preset}.json", summary)
    if report is not None:
        from benchmarks.errors import write_error_blocks
        from benchmarks.report import write_report

        write_report(report, summary, dataset, split, workdir)
        write_error_blocks(report, summary, dataset, split, workdir, ext_ds)
    study.finish(summary, report)
    _print_done(plan, rows, wall, preset, report)
    return summary


def _print_done(plan: Plan, rows: list[dict], wall: float, preset: str,
                report: Path | None) -> None:
    """The study's last lines: its time, the best cell by val and (``best``) its folder."""
    best = max((r for r in rows if r.get("group", "main") == "main"),
               key=lambda r: r["val_balanced_accuracy"])
    print(f"done in {wall / 60:.1f} min; {len(rows)} cells; best by val: {best['name']} "
          f"test bal.acc {score_text(best['balanced_accuracy'])}; report: {report}")
    if preset == "best":  # the recommended pipeline's folder: the last cell's
        final = (plan.late_cells or plan.cells)[-1].cell_id
        folder = next(r["model_dir"] for r in rows if r["name"] == final)
        print(f"model folder (predict, evaluate, explain, serve): {folder}")


def _report_from_saved(plan: Plan, dataset: Dataset, split, workdir: Path,
                       report: Path | None, preset: str, seed: int,
                       ext_ds: Dataset | None = None) -> dict:
    """Rebuild the report from finished cells (no training); unfinished cells are listed."""
    def saved(cells: list[Cell]) -> list[dict]:  # the planned cells that finished
        paths = [results_dir(workdir) / f"{c.cell_id}.json" for c in cells]
        rows = [with_current_labels(read_json(p)) for p in paths if p.exists()]
        return [{**r, "stale": True} if not same_code(r.get("provenance")) else r
                for r in rows]

    rows = saved(plan.cells)
    rows += saved(curve_cells(plan, rows, seed))
    rows += saved(plan.late_cells)
    rows += fold_rows(rows)
    planned = {c.cell_id for c in plan.cells + plan.late_cells}
    missing = sorted(planned - {r["name"] for r in rows})
    prev = results_dir(workdir) / f"summary_{preset}.json"
    saved = read_json(prev) if prev.exists() else {}
    labels = {r["name"]: r for r in rows}
    external = [{**e, **{k: labels[e["name"]][k] for k in CARD_KEYS}}
                if e["name"] in labels else e for e in saved.get("external") or []]
    summary = {"preset": preset, "seed": seed,
               "wall_time_s": saved.get("wall_time_s", float("nan")), "rows": rows,
               "external": external or None, "n_images": len(dataset),
               "unfinished": missing, "cpu": saved.get("cpu", machine_label()),
               "provenance": provenance(), "seeds": load_seed_record(results_dir(workdir))}
    if report is not None:
        from benchmarks.errors import write_error_blocks
        from benchmarks.report import write_report

        write_report(report, summary, dataset, split, workdir)
        write_error_blocks(report, summary, dataset, split, workdir, ext_ds)
    print(f"report rebuilt from {len(rows)} finished cells; unfinished: {missing or 'none'}")
    return summary


def machine_label(gpu: bool = False) -> str:
    """The CPU model, its core count and whether bf16 autocast is used, for every timing;
    with ``gpu``, first the GPU the networks ran on."""
    import os

    bf16 = "avx512_bf16" in cpu_flags() or "amx_bf16" in cpu_flags()
    cpu = (f"{cpu_model()}, {os.cpu_count()} cores, "
           f"{'bf16 autocast (avx512_bf16)' if bf16 else 'fp32 (no avx512_bf16/AMX)'}")
    if not gpu:
        return cpu
    import torch

    return (f"GPU run (--gpu): {torch.cuda.get_device_name(0)}, fp16 AMP, batched input "
            f"pipeline; heads on {cpu}")


def require_cuda() -> None:
    """Stop, in one line, where torch sees no CUDA device.

    Raises:
        LesionLabError: ``torch.cuda.is_available()`` is False.
    """
    import torch

    if not torch.cuda.is_available():
        raise LesionLabError("--gpu needs a CUDA GPU; torch.cuda.is_available() is False "
                             "here (run without --gpu: the CPU presets are the reference)")


def default_report(preset: str, workdir: Path | str) -> Path:
    """Where a run writes its report when ``--report`` is not given.

    Only the full study rewrites the committed REPORT.md; the quick preset writes beside its
    artifacts, so a first try never replaces the study's tables with small-budget numbers.
    """
    return Path("REPORT.md") if preset == "full" else Path(workdir) / f"REPORT_{preset}.md"


def report_path(preset: str, workdir: Path | str, gpu: bool = False) -> Path:
    """:func:`default_report`, except that a ``--gpu`` run never writes the committed
    REPORT.md (the CPU run is the reference): it writes ``WORKDIR/REPORT_<preset>-gpu.md``."""
    return Path(workdir) / f"REPORT_{preset}-gpu.md" if gpu else default_report(preset, workdir)


PRESETS = ("quick", "full", "best", "seeds", "smoke")


@dataclass
class RunAllConfig:
    """The flags of ``python -m benchmarks.run_all``."""

    preset: str = option("quick", "quick (<= 10 min) | full (the study, 2.5-4.5 h on 2 "
                                  "cores) | best (its recommended pipeline) | seeds (its "
                                  "spread over seeds alone, ~1 h) | smoke (tests)",
                         choices=PRESETS)
    external_test: Path | None = option(None, "folder of images + one label CSV (HAM10000 or "
                                              "ISIC 2018 format)")
    report: Path | None = option(None, "markdown file to update; None: REPORT.md for --preset "
                                       "full, WORKDIR/REPORT_<preset>.md otherwise")
    no_download: bool = option(False, "fail instead of downloading", switch=True)
    report_only: bool = option(False, "rebuild the report from finished cells without running "
                                      "anything", switch=True)
    reuse_stale: bool = option(False, "reuse finished cells made by other code (lesionlab/, "
                                      "featurize/, models/ or the lock differ) instead of "
                                      "running them again; their rows are marked stale in the "
                                      "report", switch=True)
    seed: int = option(0, "model seed of every cell", ge=0)
    gpu: bool = option(False, "networks and feature extraction on the CUDA GPU, the networks "
                              "with the batched input pipeline; the report (default "
                              "WORKDIR/REPORT_<preset>-gpu.md) names the GPU", switch=True)
    split_seeds: int | None = option(None, "split seeds (--seed and the next ones) the heads "
                                           "on cached features are re-run over; None: the "
                                           "preset's (full 5, quick 0), 0: none", ge=0)
    data: Path | None = data_option()
    labels: str = labels_option()
    label_map: Path | None = label_map_option()
    workdir: Path = workdir_option()


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments, from ``RunAllConfig``."""
    return command_parser("python -m benchmarks.run_all", __doc__, RunAllConfig,
                          TrackingOptions)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the study, and write the resolved config.yaml in its results."""
    parsed = build_parser().parse_args(argv)
    args = config_from_args(RunAllConfig, parsed)
    report = args.report or report_path(args.preset, args.workdir, args.gpu)
    run_all(resolve_data(args), args.workdir, args.preset, args.seed, args.external_test,
            report, download=not args.no_download, report_only=args.report_only,
            reuse_stale=args.reuse_stale, **label_options(args),
            tracking=config_from_args(TrackingOptions, parsed), split_seeds=args.split_seeds,
            gpu=args.gpu)
    results_dir(args.workdir).mkdir(parents=True, exist_ok=True)
    save_config(results_dir(args.workdir), args, "python -m benchmarks.run_all")
    return 0


if __name__ == "__main__":
    run_main(main)
