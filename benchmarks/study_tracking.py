"""MLflow tracking of one ``run_all`` study: a parent run, one nested run per cell.

Each cell's run carries the leaderboard row's columns as params (kind, features, head,
input, imbalance, metadata, train fraction, group) on top of its card's config (seed,
backbone...), the card's val/test metrics, per-class recall and timings, the cell's cost
(``cell_time_s``), and later the external scores (``external_*``); artifacts: the card and
the confusion matrix (``lesionlab.tracking``). A cell reused from an earlier run is logged
again, tagged ``reused``, so every parent run shows the whole study. The parent holds the
preset, seed and data, the wall time, and the report and summary as artifacts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lesionlab.tracking import FILTER_PARAMS, Tracker, track_card
from models.bundle import load_card

EXTERNAL_KEYS = ("balanced_accuracy", "macro_f1", "macro_auc", "mel_sensitivity", "ece")


class StudyTracking:
    """The tracking of one study run; every method is a no-op when tracking is off.

    Args:
        workdir: the study's workdir (the default store lives there).
        opts: parsed ``TrackingOptions`` (``tracking_uri``, ``no_tracking``); None: off.
        preset, seed, data, external: the study's, logged as the parent run's params.
    """

    def __init__(self, workdir: Path | str, opts: Any, preset: str, seed: int,
                 data: Path | str, external: Path | str | None = None) -> None:
        self.workdir = Path(workdir)
        self.tracker = (Tracker.from_options(workdir, opts) if opts is not None
                        else Tracker(workdir, enabled=False))
        self.runs: dict[str, str] = {}  # model name -> its cell's run id
        self.overhead_s = 0.0  # time spent logging, all cells together
        params = {"preset": preset, "seed": seed, "data": str(data), "external": str(external),
                  "workdir": str(workdir)}
        self._start = (f"run_all {preset} seed{seed}", params,
                       {"command": "python -m benchmarks.run_all"})
        self._parent: str | None = None

    @property
    def parent(self) -> str | None:
        """The study's parent run id, started with the first thing logged (so a study that
        stops before its first cell, e.g. on a read-only workdir, leaves no store behind)."""
        if self._parent is None and self.tracker.enabled:
            self._parent = self.tracker.start(*self._start)
        return self._parent

    def cell(self, row: dict, reused: bool = False) -> None:
        """Log one finished cell (its leaderboard row and model folder), nested."""
        t0 = time.perf_counter()
        if self.tracker.enabled:
            try:
                card = load_card(row["model_dir"])
            except Exception as exc:  # noqa: BLE001 - tracking must never fail the study
                self.tracker.fail(exc)
                return
            extra = {k: row[k] for k in FILTER_PARAMS if k in row and k not in ("seed",)}
            run_id = track_card(self.tracker, card, row["model_dir"], extra,
                                {"cell_time_s": row.get("cell_time_s")}, parent=self.parent,
                                tags={"reused": str(bool(reused)).lower(),
                                      "stale": str(bool(row.get("stale"))).lower()})
            if run_id:
                self.runs[row["name"]] = run_id
        self.overhead_s += time.perf_counter() - t0

    def cells(self, rows: list[dict]) -> list[dict]:
        """Log rows made inside other cells (a K-fold cell's fold networks); returns them."""
        for row in rows:
            self.cell(row, reused=True)
        return rows

    def external(self, rows: list[dict] | None) -> list[dict] | None:
        """Add each model's external-test scores (overall and per source) to its cell's run;
        returns ``rows``."""
        for row in rows or []:
            metrics = {f"external_{k}": row.get(k) for k in EXTERNAL_KEYS}
            for source, s in (row.get("sources") or {}).items():
                metrics[f"external_{source}_balanced_accuracy"] = s.get("balanced_accuracy")
            self.tracker.log(self.runs.get(row["name"]), metrics=metrics)
        return rows

    def finish(self, summary: dict, report: Path | str | None) -> None:
        """Close the parent run: the study's wall time and cell count, the time spent
        logging, the summary JSON and the report as artifacts; print where to look."""
        files = [self.workdir / "results" / f"summary_{summary['preset']}.json"]
        files += [Path(report)] if report is not None else []
        self.tracker.log(self.parent, metrics={"wall_time_s": summary.get("wall_time_s"),
                                               "n_cells": len(summary.get("rows", [])),
                                               "tracking_overhead_s": self.overhead_s},
                         files=files)
        self.tracker.end(self.parent)
        if self.tracker.enabled:
            print(f"MLflow: {len(self.runs)} cell runs under run {self.parent} in "
                  f"{self.tracker.uri} ({self.overhead_s:.1f} s of logging); browse with "
                  f"mlflow ui --backend-store-uri {self.tracker.uri}", flush=True)
