"""Heads on cached features re-run over split seeds: how far a score moves with the split.

The features do not depend on the split, so each pipeline of a :class:`SeedStudy` (a head
cell of the study on its main frozen input) is run again at every split seed: the data are
re-split by lesion at that seed (``lesionlab.splits``, through ``HeadConfig.split_seed``),
then tuned, fitted, calibrated on val and tested once, as the cell does; the model seed stays
the study's. The split seed equal to the study's seed is the study's own cell. The per-seed
scores (test balanced accuracy, macro AUC, melanoma sensitivity; val balanced accuracy) go
to ``<workdir>/results/seeds/heads.json``, written atomically after every seed; a rerun
takes a seed it holds (made by the same code) from there and runs only the missing ones.
:func:`seeds_md` renders the report's seeds block: each pipeline's mean, standard deviation
and per-seed values, and the paired difference of the pipelines the report compares, per
seed (both scored on the same test images) and over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from lesionlab.artifacts import read_json, write_json
from lesionlab.errors import LesionLabError
from lesionlab.provenance import same_code
from models.train_head import HeadConfig

SEED_METRICS = ("balanced_accuracy", "macro_auc", "mel_sensitivity")
METRIC_LABELS = {"balanced_accuracy": "bal.acc", "macro_auc": "macro AUC",
                 "mel_sensitivity": "mel sens"}
RESULTS = Path("seeds") / "heads.json"  # under <workdir>/results
# the pipelines on the main frozen input and the comparisons the report draws from them
PIPELINES = {"logreg, class weights": ("logreg", "class_weight"),
             "logreg, SMOTE": ("logreg", "smote"),
             "LightGBM, class weights": ("lightgbm", "class_weight")}
PAIRS = (("logreg, class weights", "logreg, SMOTE"),
         ("logreg, class weights", "LightGBM, class weights"))


@dataclass
class SeedStudy:
    """Which head pipelines are re-run over which split seeds, and which pairs are compared.

    ``pipelines``: label -> the head cell's config at the study's split; ``split_seeds``: the
    seeds to re-split at; ``pairs``: (A, B) labels whose difference A - B is reported.
    """

    pipelines: dict[str, HeadConfig]
    split_seeds: tuple[int, ...]
    pairs: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        """Reject pairs naming no pipeline and repeated seeds.

        Raises:
            LesionLabError: a pair names an unknown pipeline, or a seed repeats.
        """
        unknown = {p for pair in self.pairs for p in pair} - set(self.pipelines)
        if unknown:
            raise LesionLabError(f"seed study: pairs name unknown pipelines {sorted(unknown)}; "
                                 f"known: {sorted(self.pipelines)}")
        if len(set(self.split_seeds)) != len(self.split_seeds):
            raise LesionLabError(f"seed study: split seeds repeat: {self.split_seeds}")

    def config(self, label: str, split_seed: int) -> HeadConfig:
        """The pipeline ``label``'s cell at ``split_seed`` (its own name: the seed is in it);
        at the pipeline's own split, the pipeline's config itself."""
        base = self.pipelines[label]
        if split_seed == base.data_seed:
            return base
        return replace(base, split_seed=split_seed, name=None)


def head_seed_study(base: HeadConfig, split_seeds: tuple[int, ...],
                    trials: Callable[[str, str], int] | None = None) -> SeedStudy:
    """The :data:`PIPELINES` on ``base``'s input (``base``: a head cell's config; its head
    and imbalance are replaced), compared as :data:`PAIRS`.

    ``trials(features, head)``: each pipeline's Optuna trials (None: ``base.trials``), so a
    pipeline at the study's split seed is exactly the study's cell of that head.
    """
    pipelines = {label: replace(base, head=head, imbalance=imbalance, name=None,
                                trials=trials(base.features, head) if trials else base.trials)
                 for label, (head, imbalance) in PIPELINES.items()}
    return SeedStudy(pipelines, tuple(split_seeds), PAIRS)


def first_seeds(seed: int, n: int) -> tuple[int, ...]:
    """The ``n`` split seeds of a study with seed ``seed``: ``seed, seed + 1, ...``.

    Raises:
        LesionLabError: ``n`` is negative.
    """
    if n < 0:
        raise LesionLabError(f"--split-seeds must be >= 0, got {n}")
    return tuple(range(seed, seed + n))


def results_path(results: Path | str) -> Path:
    """``<results>/seeds/heads.json``, ``results`` being ``<workdir>/results``."""
    return Path(results) / RESULTS


def _entry(row: dict) -> dict:
    """What a seed keeps of its cell's leaderboard row."""
    return {"name": row["name"], **{m: row[m] for m in SEED_METRICS},
            "val_balanced_accuracy": row["val_balanced_accuracy"],
            "provenance": row.get("provenance"), "stale": bool(row.get("stale"))}


def _saved_entry(entry: dict | None, name: str, reuse_stale: bool) -> dict | None:
    """A saved seed's entry if it is this cell's and made by this code (or ``reuse_stale``:
    then marked stale where it was not); else None."""
    if entry is None or entry.get("name") != name:
        return None
    if same_code(entry.get("provenance")):
        return entry
    return {**entry, "stale": True} if reuse_stale else None


def run_seed_study(study: SeedStudy, run_one: Callable[[HeadConfig], dict],
                   results: Path | str, reuse_stale: bool = False) -> dict:
    """Run (or take from the saved file) every pipeline at every split seed.

    Args:
        study: the pipelines and seeds.
        run_one: runs one head cell (or loads its saved result) and returns its leaderboard
            row (``benchmarks.run_all.run_cell``).
        results: ``<workdir>/results``; the per-seed scores go to :func:`results_path`.
        reuse_stale: keep saved seeds made by other code (marked stale).

    Returns:
        The saved record: ``{"split_seeds": [...], "pairs": [[A, B], ...], "pipelines":
        {label: {"features", "head", "imbalance", "seeds": {str(seed): entry}}}}``, each entry
        the seed's scores (:data:`SEED_METRICS`, ``val_balanced_accuracy``), cell name and
        provenance.
    """
    path = results_path(results)
    saved = (read_json(path) if path.exists() else {}).get("pipelines", {})
    record = {"split_seeds": list(study.split_seeds),
              "pairs": [list(p) for p in study.pairs], "pipelines": {}}
    for label, base in study.pipelines.items():
        old = saved.get(label, {}).get("seeds", {})
        seeds = dict(old)  # kept until redone: a killed run loses nothing it had
        record["pipelines"][label] = {"features": base.features, "head": base.head,
                                      "imbalance": base.imbalance, "seeds": seeds}
        for s in study.split_seeds:
            cfg = study.config(label, s)
            entry = _saved_entry(old.get(str(s)), cfg.model_name(), reuse_stale)
            seeds[str(s)] = entry if entry is not None else _entry(run_one(cfg))
            write_json(path, {**record, "pipelines": {**saved, **record["pipelines"]}})
        for s in set(seeds) - {str(s) for s in study.split_seeds}:
            del seeds[s]  # seeds of another --split-seeds: not this study's
    write_json(path, record)
    return record


def load_seed_record(results: Path | str) -> dict | None:
    """The saved record of :func:`run_seed_study`, or None when no seed study ran."""
    path = results_path(results)
    return read_json(path) if path.exists() else None


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof=1; NaN for one value) of per-seed values."""
    x = np.asarray(values, dtype=float)
    sd = float(np.std(x, ddof=1)) if len(x) > 1 else float("nan")
    return {"mean": float(np.mean(x)) if len(x) else float("nan"), "sd": sd, "n": int(len(x))}


def per_seed(record: dict, label: str, metric: str) -> dict[int, float]:
    """{split seed: test ``metric``} of one pipeline, in the record's seed order."""
    seeds = record["pipelines"][label]["seeds"]
    return {int(s): seeds[str(s)][metric] for s in record["split_seeds"] if str(s) in seeds}


def pair_differences(record: dict, a: str, b: str, metric: str) -> dict[int, float]:
    """{split seed: A - B} of ``metric`` over the seeds both pipelines hold (each seed's two
    models scored on that seed's test images)."""
    va, vb = per_seed(record, a, metric), per_seed(record, b, metric)
    return {s: va[s] - vb[s] for s in va if s in vb}


def _num(v: float | None, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    return f"{v:+.3f}" if sign else f"{v:.3f}"


def seeds_md(record: dict | None) -> str:
    """The report's seeds block: per pipeline and metric the mean, standard deviation and
    each seed's test value; per compared pair the difference per seed and over seeds."""
    if not record or not record.get("pipelines"):
        return ("_No split-seed study in this run (`--split-seeds N`; the full preset runs "
                "5)._\n")
    seeds = record["split_seeds"]
    cols = " | ".join(f"split {s}" for s in seeds)
    lines = [f"Heads on cached features re-run over {len(seeds)} lesion-grouped split seeds "
             f"({', '.join(map(str, seeds))}; the model seed stays the study's): test scores, "
             f"mean and sample standard deviation over seeds.\n",
             f"| pipeline | input | metric | mean | sd | {cols} |",
             "|---|---|---|---:|---:|" + "---:|" * len(seeds)]
    for label, p in record["pipelines"].items():
        for m in SEED_METRICS:
            vals = per_seed(record, label, m)
            st = spread(list(vals.values()))
            lines.append(f"| {label} | {p['features']} | {METRIC_LABELS[m]} | "
                         f"{_num(st['mean'])} | {_num(st['sd'])} | "
                         + " | ".join(_num(vals.get(s)) for s in seeds) + " |")
    if record.get("pairs"):
        lines += ["", "Paired differences A - B per split seed (both on that seed's test "
                      "images), their mean and standard deviation over seeds:\n",
                  f"| A - B | metric | mean | sd | A ahead | {cols} |",
                  "|---|---|---:|---:|---:|" + "---:|" * len(seeds)]
        for a, b in record["pairs"]:
            for m in SEED_METRICS:
                diffs = pair_differences(record, a, b, m)
                st = spread(list(diffs.values()))
                ahead = sum(d > 0 for d in diffs.values())
                lines.append(f"| {a} - {b} | {METRIC_LABELS[m]} | {_num(st['mean'], True)} | "
                             f"{_num(st['sd'])} | {ahead}/{len(diffs)} | "
                             + " | ".join(_num(diffs.get(s), True) for s in seeds) + " |")
    return "\n".join(lines) + "\n"
