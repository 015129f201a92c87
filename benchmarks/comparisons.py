"""The study's claims ("A beats B") as data, each tested by a paired lesion-level bootstrap.

``benchmarks/claims.toml`` lists every comparison REPORT.md section 6 draws: two rows of the
study (a cell by name, or the row val ranks first among those matching some fields), the
metric that decides and what the claim supports. :func:`compare_claims` scores both models
on the same images from the probabilities the run saved (test: the model folders'
``test_proba.npy``; external: ``<workdir>/results/external/<name>.npz``), without
retraining, and :func:`comparisons_md` writes the report's comparisons block: each claim's
difference in balanced accuracy, macro AUC and melanoma sensitivity (each model at its own
melanoma rule) with 95% CIs, and whether it survives (the CI of the deciding metric lies
above 0). A claim whose rows the run does not have is listed as "not run".
"""

from __future__ import annotations

import functools
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lesionlab.artifacts import atomic_path
from lesionlab.data import Dataset
from lesionlab.errors import LesionLabError
from lesionlab.metrics import PAIRED_METRICS, align_to, paired_bootstrap_all, paired_metric
from models.bundle import load_card, load_proba

CLAIMS = Path(__file__).with_name("claims.toml")
DATA_SETS = ("test", "external")
N_BOOT = 1000  # resamples per metric and claim; the per-model CIs use as many


@dataclass(frozen=True)
class RowSelector:
    """Which row of the study a side of a claim is.

    ``name``: a cell's (model's) name, ``{seed}`` standing for the study's seed. ``where``:
    row fields that must match (a list: any of its values), e.g. ``kind``, ``group``,
    ``input``, ``head``, ``imbalance``, ``train_fraction``; of several matches the one val
    ranks first is taken (never test).
    """

    name: str | None = None
    where: dict[str, Any] = field(default_factory=dict)

    def pick(self, rows: list[dict], seed: int) -> dict | None:
        """The row selected among ``rows`` (leaderboard rows), or None when none matches."""
        if self.name is not None:
            name = self.name.format(seed=seed)
            return next((r for r in rows if r["name"] == name), None)
        hits = [r for r in rows if all(_matches(r.get(k, _DEFAULTS.get(k)), v)
                                       for k, v in self.where.items())]
        return max(hits, key=lambda r: r["val_balanced_accuracy"]) if hits else None

    def describe(self, seed: int = 0) -> str:
        """How the claim names this side, for the report."""
        if self.name is not None:
            return f"`{self.name.format(seed=seed)}`"
        return "best by val of " + ", ".join(f"{k}={v}" for k, v in self.where.items())


_DEFAULTS = {"group": "main", "train_fraction": 1.0}  # fields older rows may lack


def _matches(value: Any, want: Any) -> bool:
    if isinstance(want, list):
        return any(_matches(value, w) for w in want)
    if isinstance(want, float) and isinstance(value, (int, float)):
        return math.isclose(value, want, abs_tol=1e-3)
    return value == want


@dataclass(frozen=True)
class Claim:
    """One comparison of the report: "A beats B" on ``metric`` over the ``data`` images."""

    id: str
    claim: str
    supports: str
    a: RowSelector
    b: RowSelector
    metric: str = "balanced_accuracy"
    data: str = "test"


def load_claims(path: Path | str = CLAIMS) -> list[Claim]:
    """Read the claims file (a TOML array of ``[[claim]]`` tables).

    Raises:
        LesionLabError: the file is missing or not TOML, a claim lacks a key or has an
            unknown one, names an unknown metric or data set, or an id repeats.
    """
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LesionLabError(f"cannot read claims {path}: {exc}") from None
    claims = [_claim(entry, path) for entry in raw.get("claim", [])]
    ids = [c.id for c in claims]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise LesionLabError(f"{path}: claim ids repeat: {twice}")
    return claims


def _claim(entry: dict, path: Path | str) -> Claim:
    known = {"id", "claim", "supports", "a", "b", "metric", "data"}
    cid = entry.get("id", "?")
    if set(entry) - known or {"id", "claim", "supports", "a", "b"} - set(entry):
        raise LesionLabError(f"{path}: claim {cid!r} has keys {sorted(entry)}; expected "
                             f"id, claim, supports, a, b (metric, data optional)")
    sides = []
    for side in ("a", "b"):
        sel = entry[side]
        if not isinstance(sel, dict) or set(sel) - {"name", "where"} or len(sel) != 1:
            raise LesionLabError(f"{path}: claim {cid!r}: {side} must be {{name = ...}} or "
                                 f"{{where = {{...}}}}, got {sel!r}")
        sides.append(RowSelector(name=sel.get("name"), where=sel.get("where", {})))
    claim = Claim(cid, entry["claim"], entry["supports"], *sides,
                  metric=entry.get("metric", "balanced_accuracy"), data=entry.get("data", "test"))
    if claim.metric not in PAIRED_METRICS or claim.data not in DATA_SETS:
        raise LesionLabError(f"{path}: claim {cid!r}: metric {claim.metric!r} / data "
                             f"{claim.data!r}; expected one of {PAIRED_METRICS} / {DATA_SETS}")
    return claim


@dataclass
class Scored:
    """One model's saved predictions on a labelled image set.

    ``image_ids``, ``labels`` (class indices) and ``lesion_ids``: (n,); ``proba``:
    (n, n_classes) calibrated probabilities; ``mel_threshold``: the card's melanoma rule
    (NaN: none).
    """

    image_ids: np.ndarray
    proba: np.ndarray
    labels: np.ndarray
    lesion_ids: np.ndarray
    mel_threshold: float = float("nan")


def external_proba_path(workdir: Path | str, name: str) -> Path:
    """``<workdir>/results/external/<name>.npz``: a model's external-test probabilities."""
    return Path(workdir) / "results" / "external" / f"{name}.npz"


def save_external_proba(workdir: Path | str, name: str, dataset: Dataset,
                        proba: np.ndarray) -> Path:
    """Save (atomically) a model's probabilities on an external labelled set, with the image
    ids, labels and lesion ids they were scored against: ``proba`` is (n images, n classes)
    in ``dataset``'s row order. Returns the path."""
    frame = dataset.frame
    dest = external_proba_path(workdir, name)
    with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
        # str arrays, not object ones: the file is read back without pickle
        np.savez(fh, image_ids=frame["image_id"].to_numpy(dtype=str),
                 proba=np.asarray(proba, dtype=np.float32), labels=dataset.labels,
                 lesion_ids=frame["lesion_id"].to_numpy(dtype=str))
    return dest


def load_scored(row: dict, data: str, dataset: Dataset, workdir: Path | str) -> Scored | None:
    """A row's saved predictions on ``data`` (``test``: its folder's test probabilities,
    labelled from ``dataset``; ``external``: the run's npz); None when none were saved.

    Raises:
        LesionLabError: a saved file is damaged (see ``models.bundle.load_proba``) or holds
            object arrays (read without pickle).
    """
    folder = Path(row["model_dir"])
    card = load_card(folder)
    threshold = float("nan") if card.mel_threshold is None else float(card.mel_threshold)
    if data == "external":
        path = external_proba_path(workdir, row["name"])
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                return Scored(z["image_ids"], z["proba"].astype(float), z["labels"],
                              z["lesion_ids"], threshold)
        except ValueError as exc:  # object arrays, as older code saved them
            raise LesionLabError(f"{path}: unreadable without pickle ({exc}); delete it and "
                                 f"rerun, which scores the external set again") from None
    ids = np.asarray(card.test_image_ids, dtype=str)
    proba = load_proba(folder, "test_proba.npy", len(ids))
    frame = dataset.frame.set_index(dataset.frame["image_id"].astype(str)).loc[ids]
    return Scored(ids, proba, frame["label"].to_numpy(), frame["lesion_id"].astype(str)
                  .to_numpy(), threshold)


def compare(a: Scored, b: Scored, n_boot: int = N_BOOT, seed: int = 0,
            names: tuple[str, str] = ("A", "B")) -> dict[str, dict]:
    """Every paired metric of A - B on A's images (B's rows aligned to them).

    Returns ``{metric: paired_bootstrap(...) result}`` for :data:`PAIRED_METRICS` (one set
    of resamples for all three).

    Raises:
        LesionLabError: B was scored on other images than A (:func:`align_to`).
    """
    proba_b = align_to(a.image_ids, b.image_ids, b.proba, model=names[1])
    pairs = {m: (paired_metric(m, a.mel_threshold), paired_metric(m, b.mel_threshold))
             for m in PAIRED_METRICS}
    return paired_bootstrap_all(a.labels, a.proba, proba_b, a.lesion_ids, pairs,
                                n_boot=n_boot, seed=seed)


Loader = Callable[[dict, str], Scored | None]  # (row, data set) -> saved predictions


def compare_claims(claims: list[Claim], rows: list[dict], load: Loader, seed: int = 0,
                   n_boot: int = N_BOOT) -> list[dict]:
    """One result per claim: the rows picked and the paired differences (None: not run).

    ``rows``: the study's leaderboard rows (every group); ``load(row, data)``: a row's saved
    predictions on ``data`` (:func:`load_scored`). A claim is "not run" when either row is
    absent or (external claims) has no saved external probabilities.

    Raises:
        LesionLabError: the two rows of a claim were scored on different images.
    """
    out = []
    for claim in claims:
        ra, rb = claim.a.pick(rows, seed), claim.b.pick(rows, seed)
        res = {"claim": claim, "a": ra and ra["name"], "b": rb and rb["name"],
               "diffs": None, "n": None}
        scored = [load(r, claim.data) for r in (ra, rb)] if ra and rb else [None]
        if all(s is not None for s in scored):
            res["diffs"] = compare(*scored, n_boot=n_boot, seed=seed,
                                   names=(ra["name"], rb["name"]))
            res["n"] = len(scored[0].image_ids)
        out.append(res)
    return out


def verdict(diff: dict) -> str:
    """``yes`` (the 95% CI lies above 0), ``reversed`` (below 0) or ``no`` (it holds 0)."""
    lo, hi = diff["ci95"]
    if lo > 0:
        return "yes"
    return "reversed" if hi < 0 else "no"


def _cell(d: dict) -> str:
    lo, hi = d["ci95"]
    return "n/a" if math.isnan(d["difference"]) else \
        f"{d['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def comparisons_md(results: list[dict], n_boot: int = N_BOOT, seed: int = 0) -> str:
    """The comparisons block: one table row per claim (see the module docstring); ``seed``:
    the study's, naming the cells of claims not run."""
    lines = [f"Paired lesion-level bootstrap ({n_boot} resamples of the same lesions for both "
             f"models) of A - B on the same images; survives: the 95% CI of the deciding "
             f"metric (*) lies above 0. Melanoma sensitivity: each model at its own rule "
             f"(the threshold on P(mel) its card holds).\n",
             "| claim | supports | set (n) | A | B | Δ bal.acc [95% CI] | Δ macro AUC [95% CI] "
             "| Δ mel sens [95% CI] | survives |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["claim"]
        a = f"`{r['a']}`" if r["a"] else c.a.describe(seed)
        b = f"`{r['b']}`" if r["b"] else c.b.describe(seed)
        if r["diffs"] is None:
            lines.append(f"| {c.claim} | {c.supports} | {c.data} | {a} | {b} | not run | "
                         f"not run | not run | not run |")
            continue
        cells = [_cell(r["diffs"][m]) + (" *" if m == c.metric else "") for m in PAIRED_METRICS]
        lines.append(f"| {c.claim} | {c.supports} | {c.data} ({r['n']}) | {a} | {b} | "
                     + " | ".join(cells) + f" | {verdict(r['diffs'][c.metric])} |")
    return "\n".join(lines) + "\n"


def comparisons_block(summary: dict, dataset: Dataset, workdir: Path | str,
                      claims: Path | str = CLAIMS, n_boot: int = N_BOOT) -> str:
    """The report's comparisons block for a run summary (its rows and seed)."""
    load = functools.partial(load_scored, dataset=dataset, workdir=workdir)
    results = compare_claims(load_claims(claims), summary["rows"], load,
                             summary.get("seed", 0), n_boot)
    return comparisons_md(results, n_boot, summary.get("seed", 0))
