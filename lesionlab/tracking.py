"""MLflow tracking of training commands and of the study's cells; it never fails a run.

Every model a training command or a ``run_all`` cell makes is logged as one MLflow run: its
parameters (the card's config plus head, input, imbalance, seed and train fraction, the
columns the UI filters on), metrics (val, test and, for the study, external scores;
per-class test recall; timings; a fine-tuned network's per-epoch curves as stepped
metrics), and artifacts (``card.json``, the confusion matrix). The cells of one
``run_all`` are nested under the study's parent run.

Where: by default the workdir's own SQLite store, ``sqlite:///<workdir>/mlflow.db``, with
artifacts in ``<workdir>/mlartifacts`` (MLflow 3's recommended backend without a server:
https://mlflow.org/docs/latest/self-hosting/architecture/backend-store); any tracking
server or store with ``--tracking-uri``; nothing with ``--no-tracking``. Open it with
``mlflow ui --backend-store-uri sqlite:///<workdir>/mlflow.db``.

Tracking is a by-product, never a reason to stop: any error of MLflow (unreachable server,
locked database, a value it refuses) turns into one counted warning
(:func:`lesionlab.errors.warn_once`) and the tracker switches itself off for the rest of
the process. ``mlflow`` is imported on first use only (it takes seconds to import).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from lesionlab.cli import TrackingOptions  # noqa: F401 - the flags, re-exported
from lesionlab.errors import warn_once

log = logging.getLogger(__name__)

EXPERIMENT = "lesionlab"
DB_FILE = "mlflow.db"
ARTIFACTS = "mlartifacts"
TRACKING_WARNING = "tracking off"
# A server that does not answer must not stall a study: few retries, short timeouts, unless
# the user set MLflow's own variables.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
PARAM_MAX = 500  # characters of a logged parameter value (MLflow allows 6000)
FILTER_PARAMS = ("kind", "features", "head", "input", "imbalance", "metadata", "seed",
                 "train_fraction", "backbone", "group")
SCALARS = ("balanced_accuracy", "macro_f1", "macro_auc", "mel_sensitivity", "mel_specificity",
           "ece", "ece_uncalibrated", "accuracy")
TIMINGS = ("tune_time_s", "fit_time_s", "total_time_s")

T = TypeVar("T")


def default_uri(workdir: Path | str) -> str:
    """``sqlite:///<absolute workdir>/mlflow.db``: the store a run uses without a server."""
    return f"sqlite:///{(Path(workdir).resolve() / DB_FILE).as_posix()}"


def _guarded(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Run a tracker method only while tracking is on; an error switches it off, warned once."""
    @functools.wraps(fn)
    def wrapper(self: "Tracker", *args: Any, **kwargs: Any) -> T | None:
        if not self.enabled:
            return None
        try:
            return fn(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never fail the run
            self.fail(exc)
            return None
    return wrapper


class Tracker:
    """Logs runs to one MLflow store through ``MlflowClient`` (no global active run).

    Args:
        workdir: the artifact folder; holds the default store and its artifacts.
        uri: tracking URI; None: :func:`default_uri`.
        enabled: False: every method does nothing (``--no-tracking``).
        experiment: the MLflow experiment the runs go to.
    """

    def __init__(self, workdir: Path | str, uri: str | None = None, enabled: bool = True,
                 experiment: str = EXPERIMENT) -> None:
        self.workdir = Path(workdir)
        self.local = uri is None
        self.uri = default_uri(workdir) if uri is None else uri
        self.enabled = enabled
        self.experiment = experiment
        self._client: Any = None
        self._experiment_id: str | None = None

    def fail(self, exc: BaseException) -> None:
        """Switch tracking off for good after ``exc``, with one counted warning."""
        self.enabled = False
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        warn_once(f"{TRACKING_WARNING}: MLflow at {self.uri} failed ({type(exc).__name__}: "
                  f"{first}); the run continues untracked", key=TRACKING_WARNING)

    @classmethod
    def from_options(cls, workdir: Path | str, opts: Any) -> "Tracker":
        """A tracker for parsed ``TrackingOptions`` (any object with both attributes)."""
        return cls(workdir, getattr(opts, "tracking_uri", None),
                   not getattr(opts, "no_tracking", False))

    def _connect(self) -> tuple[Any, str]:
        if self._client is None:
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
            from mlflow.tracking import MlflowClient

            if self.local:
                self.workdir.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(tracking_uri=self.uri)
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:  # artifacts beside a local store; a server decides its own
                where = (self.workdir.resolve() / ARTIFACTS).as_uri() if self.local else None
                self._experiment_id = client.create_experiment(self.experiment, where)
            else:
                self._experiment_id = exp.experiment_id
            self._client = client
        return self._client, self._experiment_id

    @_guarded
    def start(self, name: str, params: dict[str, Any] | None = None,
              tags: dict[str, str] | None = None, parent: str | None = None) -> str:
        """Open a run named ``name`` (nested under run id ``parent``); returns its run id."""
        client, exp_id = self._connect()
        all_tags = {"mlflow.runName": name, **(tags or {})}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = client.create_run(exp_id, tags=all_tags, run_name=name)
        self._log(run.info.run_id, params=params)
        return run.info.run_id

    @_guarded
    def log(self, run_id: str | None, params: dict[str, Any] | None = None,
            metrics: dict[str, float] | None = None,
            steps: Iterable[tuple[str, float, int]] = (), files: Iterable[Path] = (),
            dicts: dict[str, dict] | None = None) -> None:
        """Log to an open run: params, metrics (non-finite ones skipped), stepped metrics
        (name, value, step), files and JSON-able dicts as artifacts. Nothing without a run."""
        if run_id:
            self._log(run_id, params, metrics, steps, files, dicts)

    def _log(self, run_id: str, params: dict[str, Any] | None = None,
             metrics: dict[str, float] | None = None,
             steps: Iterable[tuple[str, float, int]] = (), files: Iterable[Path] = (),
             dicts: dict[str, dict] | None = None) -> None:
        from mlflow.entities import Metric, Param

        client, _ = self._connect()
        stamp = _now_ms()
        ms = [Metric(k, float(v), stamp, 0) for k, v in (metrics or {}).items() if _finite(v)]
        ms += [Metric(k, float(v), stamp, int(s)) for k, v, s in steps if _finite(v)]
        ps = [Param(k, _param_text(v)) for k, v in (params or {}).items()]
        for i in range(0, max(len(ms), len(ps)), 100):  # well inside MLflow's batch limits
            client.log_batch(run_id, metrics=ms[i:i + 100], params=ps[i:i + 100])
        for path in files:
            if Path(path).is_file():
                client.log_artifact(run_id, str(path))
        for name, obj in (dicts or {}).items():
            client.log_dict(run_id, obj, name)

    @_guarded
    def end(self, run_id: str | None, status: str = "FINISHED") -> None:
        """Close a run (``FINISHED``, ``FAILED`` or ``KILLED``)."""
        if run_id:
            self._connect()[0].set_terminated(run_id, status)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _param_text(value: Any) -> str:
    text = "None" if value is None else str(value)
    return text if len(text) <= PARAM_MAX else text[:PARAM_MAX - 3] + "..."


def card_params(card: Any) -> dict[str, Any]:
    """A model card's config (scalars and short lists) and kind, as MLflow parameters."""
    params = {"kind": card.kind, "name": card.name, "n_train": card.n_train,
              "n_val": card.n_val, "n_test": card.n_test, "temperature": card.temperature,
              "decision_rule": card.decision_rule, "metadata": card.metadata}
    for key, value in dataclasses.asdict(card.config).items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            params[key] = value
        elif isinstance(value, (list, tuple)) and len(str(value)) <= PARAM_MAX:
            params[key] = list(value)
    return params


def card_metrics(card: Any) -> dict[str, float]:
    """Val and test scalars, per-class test recall and timings of a card, as metric names
    (``val_balanced_accuracy``, ``test_recall_mel``, ``total_time_s``...)."""
    out: dict[str, float] = {}
    for split, scores in (("val", card.val), ("test", card.test)):
        out.update({f"{split}_{k}": scores[k] for k in SCALARS if k in (scores or {})})
    for cls, row in (card.test or {}).get("per_class", {}).items():
        out[f"test_recall_{cls}"] = row.get("recall")
    out.update({k: getattr(card, k) for k in TIMINGS})
    out.update({k: v for k, v in card.details.scalars().items() if _finite(v)})
    return out


def card_curves(card: Any) -> list[tuple[str, float, int]]:
    """A fine-tuned network's per-epoch record as stepped metrics (``epoch_train_loss``...)."""
    return [(f"epoch_{k}", v, rec["epoch"]) for rec in card.details.curves()
            for k, v in rec.items() if k != "epoch"]


def track_card(tracker: Tracker, card: Any, folder: Path | str,
               extra_params: dict[str, Any] | None = None,
               extra_metrics: dict[str, float] | None = None, parent: str | None = None,
               tags: dict[str, str] | None = None, close: bool = True) -> str | None:
    """Log one model folder as one run (see the module docstring); returns its run id.

    ``extra_params`` (e.g. a study row's head, input, group) override the card's. A card
    it cannot read switches tracking off with one warning, like a store that fails.
    """
    if not tracker.enabled:
        return None
    try:
        params = {**card_params(card), **(extra_params or {})}
        metrics = {**card_metrics(card), **(extra_metrics or {})}
        curves = card_curves(card)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail the run
        tracker.fail(exc)
        return None
    run_id = tracker.start(card.name, params, tags, parent)
    cm = (card.test or {}).get("confusion_matrix")
    tracker.log(run_id, metrics=metrics, steps=curves, files=[Path(folder) / "card.json"],
                dicts={"confusion_matrix.json": {"classes": list(card.classes), "matrix": cm}}
                if cm is not None else None)
    if close:
        tracker.end(run_id)
    return run_id


def track_command(opts: Any, workdir: Path | str, card: Any, folder: Path | str,
                  command: str, extra: Callable[[Any], dict[str, Any]] | None = None,
                  members: Iterable[tuple[Any, Path]] = ()) -> str | None:
    """A standalone training command's run, its ``members`` (e.g. K fold networks: (card,
    folder) pairs) nested under it. ``opts``: its parsed ``TrackingOptions``; ``extra(card)``:
    more params of a card (the table labels). Returns the run id (None: off or failed)."""
    tracker = Tracker.from_options(workdir, opts)
    tags = {"command": command}

    def more(c: Any) -> dict[str, Any] | None:
        try:
            return extra(c) if extra is not None and tracker.enabled else None
        except Exception as exc:  # noqa: BLE001 - tracking must never fail the run
            tracker.fail(exc)
            return None

    run_id = track_card(tracker, card, folder, more(card), tags=tags, close=False)
    for member_card, member_folder in members:
        track_card(tracker, member_card, member_folder, more(member_card), parent=run_id,
                   tags=tags)
    tracker.end(run_id)
    return run_id
