"""Per-class results, the main errors, an artefact check and the melanoma score's calibration
of the study's chosen models, from the probabilities the run saved (nothing is retrained), or
of one model folder.

``python -m benchmarks.errors [--model DIR]`` analyses one model folder outside a study (the
shipped model by default): :func:`folder_row` lets the folder predict its val and test images
(the split its card was made on, checked against the card's test ids) and, with
``--external-test``, the external set, once; ``--report`` puts the four parts between the
``shipped_errors`` markers.

Two rows are analysed, both chosen on val (never on test): the recommended pipeline (the
main row val ranks first) and the best frozen head (the main head row on frozen inputs,
``models.design.FROZEN_INPUTS``, val ranks first). For each:

1. per-class recall and precision of the argmax decision with lesion-level bootstrap 95%
   CIs, on the internal test split and on the external set
   (:func:`lesionlab.calibration.per_class_ci`);
2. the top confusions (true -> predicted, count, share of the true class);
3. errors broken down by ``dx_type``, age band (:data:`AGE_BANDS`), anatomical site and
   image source (the external set's ``dataset`` column): n, balanced accuracy (plain
   accuracy where a cell holds one class), error rate; a cell of fewer than
   :data:`MIN_CELL` images is flagged "not interpretable";
4. an artefact check: the test images with the dermoscope vignette masked
   (:func:`mask_vignette`) are scored again through the model folder's ``predict_proba``,
   and the paired lesion-level bootstrap (:func:`lesionlab.metrics.paired_bootstrap`) gives
   the change in balanced accuracy against the saved unmasked test probabilities;
5. the calibration of P(mel): its Brier score, ECE and reliability (with CIs), the top-label
   ECE with its CI, and, where the val top-label ECE or the val ECE of P(mel) stays above
   :data:`ECE_HIGH` (or ``compare_maps`` asks), temperature, vector and Dirichlet scaling
   compared on val by lesion-grouped cross-fitting
   (:func:`lesionlab.calibration.compare_calibrators`), the map chosen by val NLL, each map
   (fitted on all of val) reported on test.

:func:`error_blocks` returns the report's ``per_class``, ``errors``, ``artefacts`` and
``calibration`` blocks and writes the numbers to ``<workdir>/results/errors/errors.json``;
:func:`write_error_blocks`, which ``benchmarks.run_all`` calls after
``benchmarks.report.write_report``, puts them between their markers in the report.

"""

from __future__ import annotations

import argparse
import hashlib
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.comparisons import Scored, load_scored  # noqa: E402
from benchmarks.report import ERROR_BLOCKS as BLOCKS, replace_block  # noqa: E402
from benchmarks.rows import row_input  # noqa: E402
from lesionlab.artifacts import atomic_path, write_json, write_text  # noqa: E402
from lesionlab.cli import (data_option, device_option, model_option, option,  # noqa: E402
                           workdir_option)
from lesionlab.calibration import (CALIBRATORS, class_score_calibration,  # noqa: E402
                                   compare_calibrators, ece_with_ci, per_class_ci,
                                   prevalence_decisions)
from lesionlab.data import Dataset  # noqa: E402
from lesionlab.errors import LesionLabError  # noqa: E402
from lesionlab.images import read_image  # noqa: E402
from lesionlab.metrics import (balanced_accuracy, expected_calibration_error,  # noqa: E402
                               fast_balanced_accuracy, mel_index, paired_bootstrap)
from lesionlab.splits import split_indices  # noqa: E402
from models.bundle import CARD as CARD_FILE, load_card, load_proba  # noqa: E402
from models.design import FROZEN_INPUTS  # noqa: E402

MIN_CELL = 30  # a breakdown cell with fewer images is flagged "not interpretable"
ECE_HIGH = 0.05  # val top-label ECE above which other calibration maps are compared
TOP_K = 5
# (low, high, label): low <= age < high; a missing age is "unknown"
AGE_BANDS = ((0.0, 30.0, "<30"), (30.0, 45.0, "30-44"), (45.0, 60.0, "45-59"),
             (60.0, 75.0, "60-74"), (75.0, math.inf, ">=75"))
UNKNOWN = "unknown"
# report label -> the frame column it reads ("age band" is made from ``age``)
FACTORS = {"dx_type": "dx_type", "age band": "age", "site": "localization",
           "image source": "dataset"}
MASK_VERSION = "ellipse-mean-v1"  # changes whenever mask_vignette's output would
SETS = ("test", "external")


@dataclass(frozen=True)
class ErrorsConfig:
    """What the error analysis computes.

    Attributes:
        n_boot: lesion-level bootstrap resamples per CI.
        seed: the bootstrap's (and the calibration folds') seed.
        top_k: confusions listed per model and set.
        min_cell: breakdown cells with fewer images are flagged "not interpretable".
        ece_high: val top-label ECE above which vector and Dirichlet scaling are compared.
        mask_scale: semi-axes of the kept ellipse as a fraction of half the image's sides.
        artefacts: run the artefact check (it predicts the test images again).
        device: where the models predict the masked images (``auto``, ``cpu``, ``cuda``).
        compare_maps: compare the calibration maps whatever the val ECE (a reliability
            diagram can show a class score off in its middle bins while the binned ECE,
            dominated by the crowded lowest bin, stays under ``ece_high``).
    """

    n_boot: int = 1000
    seed: int = 0
    top_k: int = TOP_K
    min_cell: int = MIN_CELL
    ece_high: float = ECE_HIGH
    mask_scale: float = 1.0
    artefacts: bool = True
    device: str = "auto"
    compare_maps: bool = False


# -- which rows ------------------------------------------------------------------------------


def chosen_rows(rows: list[dict]) -> dict[str, dict]:
    """The rows analysed, chosen on val: ``{"recommended": row, "best frozen head": row}``.

    Args:
        rows: the study's leaderboard rows (any group; only ``main`` rows are candidates).

    Returns:
        label -> row; a label without a candidate is left out (an empty dict for no rows).
    """
    main = [r for r in rows if r.get("group", "main") == "main"]
    frozen = [r for r in main if r["kind"] == "head" and row_input(r) in FROZEN_INPUTS]
    out = {}
    for label, cands in (("recommended", main), ("best frozen head", frozen)):
        if cands:
            out[label] = max(cands, key=lambda r: r["val_balanced_accuracy"])
    return out


# -- per class and confusions -----------------------------------------------------------------


def top_confusions(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str],
                   k: int = TOP_K) -> list[dict]:
    """The ``k`` most frequent errors, true class -> predicted class.

    Args:
        y_true: (n_images,) class indices.
        y_pred: (n_images,) predicted class indices.
        classes: the names the indices point into.
        k: how many to list.

    Returns:
        Dicts ``true``, ``predicted``, ``count`` and ``share`` (count over the images of the
        true class, in [0, 1]), by count (then share, then names), off-diagonal cells with a
        count only.

    Raises:
        LesionLabError: the two arrays differ in length.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise LesionLabError(f"confusions: {len(y_true)} labels for {len(y_pred)} predictions")
    n = len(classes)
    cm = np.zeros((n, n), dtype=int)
    np.add.at(cm, (y_true, y_pred), 1)
    support = cm.sum(axis=1)
    cells = [{"true": classes[i], "predicted": classes[j], "count": int(cm[i, j]),
              "share": float(cm[i, j] / support[i])}
             for i in range(n) for j in range(n) if i != j and cm[i, j] > 0]
    cells.sort(key=lambda c: (-c["count"], -c["share"], c["true"], c["predicted"]))
    return cells[:k]


# -- breakdowns -------------------------------------------------------------------------------


def age_band(age: float | None) -> str:
    """The :data:`AGE_BANDS` label of an age in years; ``unknown`` for a missing one.

    Raises:
        LesionLabError: a negative age.
    """
    if age is None or pd.isna(age):
        return UNKNOWN
    if age < 0:
        raise LesionLabError(f"age {age} is negative")
    return next(label for lo, hi, label in AGE_BANDS if lo <= age < hi)


def factor_values(frame: pd.DataFrame, factor: str) -> np.ndarray | None:
    """Each image's value of a breakdown factor (:data:`FACTORS`), as strings.

    Args:
        frame: (n_images, ...) metadata rows.
        factor: a key of :data:`FACTORS`.

    Returns:
        (n_images,) str, a missing value read as ``unknown``; None when the frame lacks the
        column or it is empty for every image.
    """
    column = FACTORS[factor]
    if column not in frame.columns or frame[column].isna().all():
        return None
    if factor == "age band":
        return np.asarray([age_band(a) for a in pd.to_numeric(frame[column], errors="coerce")])
    values = frame[column].astype(object).where(frame[column].notna(), UNKNOWN)
    return values.astype(str).to_numpy()


def cell_scores(y_true: np.ndarray, y_pred: np.ndarray, min_cell: int = MIN_CELL) -> dict:
    """One breakdown cell: ``n``, ``metric`` (``balanced_accuracy``, or ``accuracy`` when the
    cell holds one class), ``score``, ``error_rate`` (in [0, 1]) and ``interpretable``
    (``n >= min_cell``). ``y_true``, ``y_pred``: (n_images,) class indices."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    one_class = len(np.unique(y_true)) < 2
    acc = float((y_true == y_pred).mean()) if len(y_true) else float("nan")
    return {"n": int(len(y_true)), "metric": "accuracy" if one_class else "balanced_accuracy",
            "score": acc if one_class else balanced_accuracy(y_true, y_pred),
            "error_rate": 1.0 - acc, "interpretable": bool(len(y_true) >= min_cell)}


def breakdown(frame: pd.DataFrame, y_true: np.ndarray, y_pred: np.ndarray,
              min_cell: int = MIN_CELL) -> dict[str, dict[str, dict]]:
    """Errors per value of every factor of :data:`FACTORS` the frame carries.

    Args:
        frame: (n_images, ...) metadata, rows in the order of ``y_true``.
        y_true: (n_images,) class indices.
        y_pred: (n_images,) predicted class indices.
        min_cell: cells with fewer images are flagged not interpretable.

    Returns:
        ``{factor: {value: cell_scores(...)}}``, values by falling n.

    Raises:
        LesionLabError: the frame has not one row per label.
    """
    if len(frame) != len(y_true) or len(y_true) != len(y_pred):
        raise LesionLabError(f"breakdown: {len(frame)} metadata rows, {len(y_true)} labels, "
                             f"{len(y_pred)} predictions")
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    out: dict[str, dict[str, dict]] = {}
    for factor in FACTORS:
        values = factor_values(frame.reset_index(drop=True), factor)
        if values is None:
            continue
        names, counts = np.unique(values, return_counts=True)
        out[factor] = {str(v): cell_scores(y_true[values == v], y_pred[values == v], min_cell)
                       for v in names[np.argsort(-counts, kind="stable")]}
    return out


# -- the vignette mask ------------------------------------------------------------------------


def vignette_mask(height: int, width: int, scale: float = 1.0) -> np.ndarray:
    """Where the largest centred ellipse of an image lies: (height, width) bool, True inside.

    The ellipse is centred on the image with semi-axes ``scale`` times half its width and
    half its height (1.0: it touches the four sides), so the corners, where a dermoscope's
    round field of view leaves its dark vignette, fall outside.

    Raises:
        LesionLabError: a side below 1 pixel or ``scale`` not in (0, 1].
    """
    if height < 1 or width < 1 or not 0 < scale <= 1:
        raise LesionLabError(f"vignette mask of {width}x{height} pixels, scale {scale}: sides "
                             f"must be >= 1 and scale in (0, 1]")
    yy = (np.arange(height) + 0.5 - height / 2) / (scale * height / 2)
    xx = (np.arange(width) + 0.5 - width / 2) / (scale * width / 2)
    return (yy[:, None] ** 2 + xx[None, :] ** 2) <= 1.0


def mask_vignette(image: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """The image with every pixel outside :func:`vignette_mask` set to the mean colour of the
    pixels inside it (rounded), so the vignette carries no signal while the image keeps its
    overall colour (the inside's mean: the dark vignette would darken the whole image's).

    Args:
        image: (height, width, 3) uint8 RGB.
        scale: see :func:`vignette_mask`.

    Returns:
        (height, width, 3) uint8, a new array.

    Raises:
        LesionLabError: the image is not (height, width, 3), or see :func:`vignette_mask`.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise LesionLabError(f"vignette mask: expected a (height, width, 3) RGB image, got "
                             f"shape {image.shape}")
    inside = vignette_mask(image.shape[0], image.shape[1], scale)
    mean = np.rint(image[inside].reshape(-1, 3).mean(axis=0)).astype(image.dtype)
    out = image.copy()
    out[~inside] = mean
    return out


def masked_dataset(dataset: Dataset, image_ids: Sequence[str], folder: Path,
                   scale: float = 1.0) -> Dataset:
    """The images ``image_ids`` of ``dataset`` with their vignettes masked, written as
    lossless PNGs in ``folder`` (upright RGB as :func:`lesionlab.images.read_image` reads
    them), as a Dataset of those rows (metadata kept) in the order of ``image_ids``.

    Raises:
        LesionLabError: an image cannot be read (see ``read_image``).
    """
    frame = dataset.frame.set_index(dataset.frame["image_id"].astype(str)).loc[list(image_ids)]
    frame = frame.reset_index(drop=True)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for image_id, src in zip(frame["image_id"].astype(str), frame["path"]):
        dest = folder / f"{image_id}.png"
        Image.fromarray(mask_vignette(np.asarray(read_image(src)), scale)).save(dest)
        paths.append(str(dest))
    return Dataset(root=folder, frame=frame.assign(path=paths), classes=dataset.classes)


def masked_proba(row: dict, scored: Scored, dataset: Dataset, workdir: Path | str,
                 cfg: ErrorsConfig) -> np.ndarray:
    """A row's test probabilities on the masked test images, (n_test, n_classes), predicted
    once by its model folder and cached in ``<workdir>/results/errors/`` (keyed by the saved
    test probabilities, the mask and its scale)."""
    from models.folder import load_model_folder

    folder = Path(row["model_dir"])
    key = hashlib.sha256((folder / "test_proba.npy").read_bytes()).hexdigest()
    key += f":{MASK_VERSION}:{cfg.mask_scale}"
    cache = Path(workdir) / "results" / "errors" / f"masked_{row['name']}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key and list(z["image_ids"]) == list(scored.image_ids):
                return z["proba"].astype(float)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:  # beside the data, not /tmp
        masked = masked_dataset(dataset, scored.image_ids, Path(tmp), cfg.mask_scale)
        with load_model_folder(folder, device=cfg.device) as model:
            proba = np.asarray(model.predict_proba(masked), dtype=float)
    with atomic_path(cache) as dest, open(dest, "wb") as fh:
        np.savez(fh, key=key, image_ids=scored.image_ids, proba=proba)
    return proba


def artefact_check(row: dict, scored: Scored, dataset: Dataset, workdir: Path | str,
                   cfg: ErrorsConfig) -> dict:
    """Balanced accuracy on the test images with and without the vignette masked.

    Returns:
        ``n``, ``masked`` and ``unmasked`` balanced accuracy, ``difference`` (masked -
        unmasked), its paired lesion-level ``ci95`` and ``n_used`` resamples.
    """
    proba = masked_proba(row, scored, dataset, workdir, cfg)
    res = paired_bootstrap(scored.labels, proba, scored.proba, scored.lesion_ids,
                           fast_balanced_accuracy, n_boot=cfg.n_boot, seed=cfg.seed)
    return {"n": len(scored.labels), "masked": res["a"], "unmasked": res["b"],
            "difference": res["difference"], "ci95": res["ci95"], "n_used": res["n_used"]}


# -- calibration of P(mel) --------------------------------------------------------------------


def val_scored(row: dict, dataset: Dataset, split: pd.DataFrame) -> Scored | None:
    """A row's saved val probabilities (``val_proba.npy``, (n_val, n_classes)) with labels
    and lesion ids; None when the folder has none. ``split``: (n_images, ...) the split table
    the row was made with."""
    folder = Path(row["model_dir"])
    if not (folder / "val_proba.npy").exists():
        return None
    va = split_indices(dataset, split)[1]
    frame = dataset.frame.iloc[va]
    proba = load_proba(folder, "val_proba.npy", len(va), len(dataset.classes))
    return Scored(frame["image_id"].astype(str).to_numpy(), proba, dataset.labels[va],
                  frame["lesion_id"].astype(str).to_numpy())


def calibrator_comparison(val: Scored, test: Scored, cfg: ErrorsConfig,
                          mel: int | None) -> dict:
    """Temperature, vector and Dirichlet scaling on top of the model's calibration: compared
    on val by cross-fitting (chosen by NLL), each then fitted on all of val and scored on
    test (top-label ECE and Brier of P(mel), reported, never used to choose), with what each
    does to the decisions: the balanced accuracy of the argmax and of the
    prevalence-corrected argmax (``lesionlab.calibration.prevalence_decisions``, val's class
    frequencies), since a map that learns the data's prevalence moves the argmax toward nv.

    Returns:
        ``val`` (``{map: {"nll", "ece", "brier", "balanced_accuracy",
        "balanced_accuracy_prevalence"}}``), ``chosen`` and ``test`` (``{map: {"ece",
        "mel_brier", "mel_ece", "balanced_accuracy", "balanced_accuracy_prevalence"}}``); or ``{"skipped": why}`` when val is too small to
        cross-fit (a class with fewer than 2 lesions).
    """
    try:
        on_val = compare_calibrators(val.proba, val.labels, val.lesion_ids, seed=cfg.seed)
    except LesionLabError as exc:
        return {"skipped": str(exc)}
    chosen = min(on_val, key=lambda name: on_val[name]["nll"])
    on_test = {}
    prevalence = np.bincount(val.labels, minlength=val.proba.shape[1]) / len(val.labels)
    for name, fit in CALIBRATORS.items():
        proba = fit(val.proba, val.labels)(test.proba)
        on_mel = (None if mel is None else
                  class_score_calibration(test.labels, proba, mel))
        on_test[name] = {"ece": expected_calibration_error(test.labels, proba),
                         "mel_brier": float("nan") if on_mel is None else on_mel["brier"],
                         "mel_ece": float("nan") if on_mel is None else on_mel["ece"],
                         "balanced_accuracy": balanced_accuracy(test.labels, proba.argmax(1)),
                         "balanced_accuracy_prevalence": balanced_accuracy(
                             test.labels, prevalence_decisions(proba, prevalence))}
    return {"val": on_val, "chosen": chosen, "test": on_test}


def calibration(test: Scored, val: Scored | None, cfg: ErrorsConfig,
                classes: Sequence[str]) -> dict:
    """The calibration evidence of one model (see the module docstring, item 5).

    Returns:
        ``mel`` (:func:`lesionlab.calibration.class_score_calibration` of P(mel) on test, or
        None without a melanoma class), ``top_label`` (:func:`ece_with_ci` on test),
        ``val_ece`` (top-label; None without val probabilities), ``val_mel_ece`` (ECE of
        P(mel) on val; None without either) and ``maps`` (the
        :func:`calibrator_comparison`, or None when both val ECEs are at most
        ``cfg.ece_high`` and ``cfg.compare_maps`` is off).
    """
    mel = mel_index(classes)
    out: dict = {"mel": None if mel is None else class_score_calibration(
        test.labels, test.proba, mel, test.lesion_ids, cfg.n_boot, cfg.seed),
        "top_label": ece_with_ci(test.labels, test.proba, test.lesion_ids, cfg.n_boot,
                                 cfg.seed),
        "val_ece": None, "val_mel_ece": None, "maps": None}
    if val is not None:
        out["val_ece"] = expected_calibration_error(val.labels, val.proba)
        if mel is not None:
            out["val_mel_ece"] = class_score_calibration(val.labels, val.proba, mel)["ece"]
        worst = max(out["val_ece"], out["val_mel_ece"] or 0.0)
        if worst > cfg.ece_high or cfg.compare_maps:
            out["maps"] = calibrator_comparison(val, test, cfg, mel)
    return out


# -- one model --------------------------------------------------------------------------------


def _frame_of(data: Dataset, image_ids: np.ndarray) -> pd.DataFrame:
    return data.frame.set_index(data.frame["image_id"].astype(str)).loc[list(image_ids)]


def analyse_set(scored: Scored, data: Dataset | None, classes: Sequence[str],
                cfg: ErrorsConfig) -> dict:
    """Per-class CIs, top confusions and the breakdowns of one model on one image set.

    Args:
        scored: the model's saved predictions on the set.
        data: the set's Dataset (its metadata columns); None: no breakdowns.
        classes: the model's class names.
        cfg: what to compute.

    Returns:
        ``n``, ``per_class``, ``confusions`` and ``breakdown`` (``{}`` without ``data``).
    """
    pred = scored.proba.argmax(axis=1)
    frame = _frame_of(data, scored.image_ids) if data is not None else None
    return {"n": int(len(scored.labels)),
            "per_class": per_class_ci(scored.labels, scored.proba, scored.lesion_ids,
                                      list(classes), cfg.n_boot, cfg.seed),
            "confusions": top_confusions(scored.labels, pred, classes, cfg.top_k),
            "breakdown": {} if frame is None else breakdown(frame, scored.labels, pred,
                                                            cfg.min_cell)}


def analyse_row(row: dict, dataset: Dataset, split: pd.DataFrame, workdir: Path | str,
                external: Dataset | None, cfg: ErrorsConfig) -> dict:
    """Everything of the module docstring for one row, from its saved predictions.

    ``split`` is the (n_images, ...) split table the row was made with (its val rows).

    Returns:
        ``name``, ``sets`` (``{"test": analyse_set, "external": ...}``; external only when
        the run saved its probabilities), ``artefacts`` (:func:`artefact_check`, or None when
        ``cfg.artefacts`` is off) and ``calibration``.

    Raises:
        LesionLabError: a saved probability file is damaged, or a masked image unreadable.
    """
    classes = load_card(row["model_dir"]).classes
    test = load_scored(row, "test", dataset, workdir)
    out: dict = {"name": row["name"], "sets": {"test": analyse_set(test, dataset, classes, cfg)}}
    ext = load_scored(row, "external", dataset, workdir)
    if ext is not None:
        out["sets"]["external"] = analyse_set(ext, external, classes, cfg)
    out["artefacts"] = (artefact_check(row, test, dataset, workdir, cfg) if cfg.artefacts
                        else None)
    out["calibration"] = calibration(test, val_scored(row, dataset, split), cfg, classes)
    return out


# -- the report blocks ------------------------------------------------------------------------


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _ci(v: float | None, ci: Sequence[float] | None, digits: int = 3) -> str:
    lo, hi = ci or (None, None)
    return f"{_f(v, digits)} [{_f(lo, digits)}, {_f(hi, digits)}]"


def _title(label: str, analysis: dict) -> str:
    return f"**{label}** (`{analysis['name']}`)"


def per_class_md(analyses: dict[str, dict], n_boot: int,
                 chosen: str = " The rows were chosen on val.") -> str:
    """The ``per_class`` block: per model, per class, recall and precision [95% CI] with n, on
    the test split and the external set; ``chosen`` says how the models were picked."""
    parts = [f"Per-class recall and precision of the argmax decision, lesion-level bootstrap "
             f"95% CIs ({n_boot} resamples); n: images of the class.{chosen}\n"]
    for label, a in analyses.items():
        test, ext = a["sets"]["test"], a["sets"].get("external")
        lines = [_title(label, a) + ":\n",
                 "| class | test n | test recall [95% CI] | test precision [95% CI] | "
                 "external n | external recall [95% CI] | external precision [95% CI] |",
                 "|---|---:|---|---|---:|---|---|"]
        for cls, t in test["per_class"].items():
            e = (ext or {}).get("per_class", {}).get(cls)
            ext_cells = (f"{e['support']} | {_ci(e['recall'], e['recall_ci95'])} | "
                         f"{_ci(e['precision'], e['precision_ci95'])}" if e else
                         "n/a | n/a | n/a")
            lines.append(f"| {cls} | {t['support']} | {_ci(t['recall'], t['recall_ci95'])} | "
                         f"{_ci(t['precision'], t['precision_ci95'])} | {ext_cells} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def confusions_md(analyses: dict[str, dict]) -> str:
    """The top confusions of every model and set, as one table."""
    lines = ["| model | set | true -> predicted | count | share of the true class |",
             "|---|---|---|---:|---:|"]
    for label, a in analyses.items():
        for name, s in a["sets"].items():
            for c in s["confusions"]:
                lines.append(f"| {label} | {name} | {c['true']} -> {c['predicted']} | "
                             f"{c['count']} | {_f(c['share'], 2)} |")
    return "\n".join(lines) + "\n"


def _score_cell(cell: dict | None) -> str:
    if cell is None:
        return "n/a | n/a"
    acc = " (accuracy: one class)" if cell["metric"] == "accuracy" else ""
    return f"{_f(cell['score'])}{acc} | {_f(cell['error_rate'])}"


def breakdown_md(analyses: dict[str, dict], set_name: str, min_cell: int) -> str:
    """One set's breakdown table: a row per factor value, two columns per model."""
    have = [(label, a["sets"][set_name]["breakdown"]) for label, a in analyses.items()
            if set_name in a["sets"] and a["sets"][set_name]["breakdown"]]
    if not have:
        return f"_No metadata to break the {set_name} errors down by._\n"
    head = "| factor | value | n | " + " | ".join(
        f"{label} bal.acc | {label} error rate" for label, _ in have) + " | note |"
    lines = [head, "|---|---|---:|" + "---:|---:|" * len(have) + "---|"]
    for factor, cells in have[0][1].items():
        for value, cell in cells.items():
            scores = [_score_cell(b.get(factor, {}).get(value)) for _, b in have]
            note = "" if cell["interpretable"] else f"n < {min_cell}: not interpretable"
            lines.append(f"| {factor} | {value} | {cell['n']} | " + " | ".join(scores)
                         + f" | {note} |")
    return "\n".join(lines) + "\n"


def errors_md(analyses: dict[str, dict], min_cell: int) -> str:
    """The ``errors`` block: top confusions, then the breakdowns of each set."""
    parts = ["Top confusions (true -> predicted; share: of the true class's images):\n",
             confusions_md(analyses),
             f"Errors by `dx_type`, age band, anatomical site and image source (the external "
             f"set's `dataset` column). Balanced accuracy, or plain accuracy where a cell holds "
             f"one class; error rate: share of the cell's images misclassified. Cells with "
             f"fewer than {min_cell} images are not interpretable.\n"]
    for set_name in SETS:
        parts.append(f"{set_name.capitalize()}:\n\n" + breakdown_md(analyses, set_name,
                                                                     min_cell))
    return "\n".join(parts)


def artefacts_md(analyses: dict[str, dict], cfg: ErrorsConfig) -> str:
    """The ``artefacts`` block: balanced accuracy with and without the vignette masked."""
    checked = {label: a for label, a in analyses.items() if a["artefacts"]}
    if not checked:
        return "_The artefact check was not run._\n"
    lines = [f"Dermoscope vignette masked at prediction time: every pixel outside the largest "
             f"centred ellipse (semi-axes {cfg.mask_scale:g} x half the width and height) set "
             f"to the mean colour inside it, the test images scored again through each model "
             f"folder; unmasked: the saved test probabilities. Paired lesion-level bootstrap "
             f"({cfg.n_boot} resamples) of masked - unmasked.\n",
             "| model | n | bal.acc unmasked | bal.acc masked | Δ masked - unmasked [95% CI] |",
             "|---|---:|---:|---:|---|"]
    for label, a in checked.items():
        r = a["artefacts"]
        lo, hi = r["ci95"]
        lines.append(f"| {_title(label, a)} | {r['n']} | {_f(r['unmasked'])} | "
                     f"{_f(r['masked'])} | {r['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    return "\n".join(lines) + "\n"


def _maps_md(analyses: dict[str, dict], cfg: ErrorsConfig) -> str:
    compared = {label: a for label, a in analyses.items() if a["calibration"]["maps"]}
    if not compared:
        return (f"Val top-label ECE and val ECE of P(mel) at most {cfg.ece_high:g} for every "
                f"model (or no val probabilities saved): its temperature scaling is kept, no "
                f"other map compared.\n")
    why = ("compared as asked (`--compare-maps`)" if cfg.compare_maps else
           f"where the val top-label ECE or the val ECE of P(mel) stays above "
           f"{cfg.ece_high:g}")
    lines = [f"Calibration maps on top of the model's temperature scaling (`none`), {why}: "
             f"compared on val by lesion-grouped 5-fold cross-fitting and chosen by val NLL; "
             f"each map then fitted on all of val and scored on test (reported, not used to "
             f"choose).\n",
             "| model | map | val NLL | val ECE | val Brier | test ECE | test Brier of P(mel) "
             "| test ECE of P(mel) | val bal.acc: argmax / ÷ prevalence | test bal.acc: "
             "argmax / ÷ prevalence | chosen on val |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for label, a in compared.items():
        maps = a["calibration"]["maps"]
        if "skipped" in maps:
            lines.append(f"| {label} | not compared: {maps['skipped']} | | | | | | | | | |")
            continue
        for name, v in maps["val"].items():
            t = maps["test"][name]
            lines.append(f"| {label} | {name} | {_f(v['nll'])} | {_f(v['ece'])} | "
                         f"{_f(v['brier'])} | {_f(t['ece'])} | {_f(t['mel_brier'])} | "
                         f"{_f(t.get('mel_ece'))} | {_pair(v)} | {_pair(t)} | "
                         f"{'yes' if name == maps['chosen'] else ''} |")
    return "\n".join(lines) + "\n" + MAPS_NOTE


MAPS_NOTE = ("\nVal columns are cross-fitted (each fold's map scores the fold it did not see); "
             "÷ prevalence: the argmax of p / (val class frequency), the decision that "
             "maximises balanced accuracy for probabilities calibrated to val's prevalence "
             "(`lesionlab.calibration.prevalence_decisions`).\n")


def _pair(v: dict) -> str:
    """``argmax / ÷ prevalence`` balanced accuracies of one map (blank where not measured:
    results saved before they were)."""
    if "balanced_accuracy" not in v:
        return ""
    return f"{_f(v['balanced_accuracy'])} / {_f(v['balanced_accuracy_prevalence'])}"


def calibration_md(analyses: dict[str, dict], cfg: ErrorsConfig, figure: str | None) -> str:
    """The ``calibration`` block: Brier and ECE of P(mel) and the top-label ECE on test with
    CIs, the reliability figure, and the calibration maps compared on val."""
    lines = [f"Calibration on test of the saved (temperature-scaled) probabilities; "
             f"lesion-level bootstrap 95% CIs ({cfg.n_boot} resamples). Brier of P(mel): "
             f"mean (P(mel) - [melanoma])^2; ECE of P(mel): 10 equal-width bins; top-label "
             f"ECE: 15 bins of the largest probability.\n",
             "| model | Brier of P(mel) [95% CI] | ECE of P(mel) [95% CI] | top-label ECE "
             "[95% CI] | val top-label ECE |", "|---|---|---|---|---:|"]
    for label, a in analyses.items():
        c = a["calibration"]
        mel = c["mel"] or {}
        ci = mel.get("ci95", {})
        lines.append(f"| {_title(label, a)} | {_ci(mel.get('brier'), ci.get('brier'))} | "
                     f"{_ci(mel.get('ece'), ci.get('ece'))} | "
                     f"{_ci(c['top_label']['ece'], c['top_label']['ci95'])} | "
                     f"{_f(c['val_ece'])} |")
    out = "\n".join(lines) + "\n"
    if figure:
        out += f"\n**Reliability of P(mel) on test**\n\n![Reliability of P(mel)]({figure})\n"
    return out + "\n" + _maps_md(analyses, cfg)


def fig_mel_reliability(analyses: dict[str, dict], out: Path) -> bool:
    """Reliability diagram of P(mel) on test (predicted vs observed melanoma frequency per
    bin, marker area by count), written atomically to ``out`` (PNG). False: no model has a
    melanoma class, nothing written."""
    curves = [(label, a["calibration"]["mel"]) for label, a in analyses.items()
              if a["calibration"]["mel"]]
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    for label, mel in curves:
        rel = mel["reliability"]
        size = 12 + 120 * np.asarray(rel["count"]) / max(sum(rel["count"]), 1)
        line, = ax.plot(rel["predicted"], rel["observed"], "-", label=label)
        ax.scatter(rel["predicted"], rel["observed"], s=size, color=line.get_color())
    ax.set_xlabel("predicted P(mel)")
    ax.set_ylabel("observed melanoma frequency")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True



def results_path(workdir: Path | str) -> Path:
    """``<workdir>/results/errors/errors.json``: the numbers behind the blocks."""
    return Path(workdir) / "results" / "errors" / "errors.json"  # beside the cells


def error_blocks(summary: dict, dataset: Dataset, split: pd.DataFrame, workdir: Path | str,
                 external: Dataset | None = None, fig_dir: Path | None = None,
                 fig_rel: str = "", cfg: ErrorsConfig | None = None) -> dict[str, str]:
    """The report's error-analysis blocks for a run summary (see the module docstring).

    Args:
        summary: the run summary (its ``rows`` and ``seed``).
        dataset: the labelled set the models were trained and tested on.
        split: (n_images, ...) the split table the rows were made with (their val rows).
        workdir: the study's workdir (saved external probabilities; results written there).
        external: the external Dataset (its metadata for the breakdowns); None: none given.
        fig_dir: where the P(mel) reliability figure goes; None: no figure.
        fig_rel: ``fig_dir`` as the report links it.
        cfg: what to compute; None: the defaults with the summary's seed.

    Returns:
        ``{block: markdown}`` for the markers :data:`BLOCKS`; a row chosen under both labels
        appears once, as ``recommended = best frozen head``.

    Raises:
        LesionLabError: a saved probability file is damaged, or a masked image unreadable.
    """
    cfg = cfg or ErrorsConfig(seed=summary.get("seed", 0))
    rows = chosen_rows(summary["rows"])
    if not rows:
        return {name: "_No finished main cells to analyse yet._\n" for name in BLOCKS}
    labels_of: dict[str, list[str]] = {}  # one row chosen twice is analysed once
    for label, row in rows.items():
        labels_of.setdefault(row["name"], []).append(label)
    analyses = {" = ".join(labels): analyse_row(rows[labels[0]], dataset, split, workdir,
                                                external, cfg)
                for labels in labels_of.values()}
    write_json(results_path(workdir), {"config": asdict(cfg), "models": analyses})
    figure = None
    if fig_dir is not None and fig_mel_reliability(analyses, Path(fig_dir) / "reliability_mel.png"):
        figure = f"{fig_rel}/reliability_mel.png" if fig_rel else "reliability_mel.png"
    return {"per_class": per_class_md(analyses, cfg.n_boot),
            "errors": errors_md(analyses, cfg.min_cell),
            "artefacts": artefacts_md(analyses, cfg),
            "calibration": calibration_md(analyses, cfg, figure)}


def write_error_blocks(report: Path | str, summary: dict, dataset: Dataset,
                       split: pd.DataFrame, workdir: Path | str,
                       external: Dataset | None = None, fig_dir: Path | str | None = None,
                       cfg: ErrorsConfig | None = None) -> None:
    """Regenerate the error-analysis blocks of ``report`` (:func:`error_blocks`), prose and
    other blocks untouched; run after ``benchmarks.report.write_report``.

    Args:
        report: the Markdown file (made if absent).
        summary, dataset, workdir, external, cfg: see :func:`error_blocks`.
        split: (n_images, ...) the split table the rows were made with.
        fig_dir: where the figure goes; None: ``reports/figures`` beside the report, as
            ``write_report``'s.

    Raises:
        LesionLabError: see :func:`error_blocks`.
    """
    report = Path(report)
    fig_dir = Path(fig_dir) if fig_dir else report.parent / "reports" / "figures"
    rel = fig_dir.relative_to(report.parent) if fig_dir.is_relative_to(report.parent) else fig_dir
    text = report.read_text(encoding="utf-8") if report.exists() else "# lesionlab report\n"
    for name, block in error_blocks(summary, dataset, split, workdir, external, fig_dir,
                                    str(rel), cfg).items():
        text = replace_block(text, name, block)
    write_text(report, text)


# -- one model folder outside a study (the shipped model) -------------------------------------


def _checked_split(model_dir: Path | str, card, dataset: Dataset,
                   workdir: Path | str) -> pd.DataFrame:
    """The split ``card`` was made on, from ``dataset``; refused when it is not that data."""
    from lesionlab.splits import load_or_make_split
    from models.export import require_training_data

    if not card.test_image_ids:
        raise LesionLabError(f"{model_dir}: its card lists no test images; analyse it inside "
                             f"the study that made it")
    require_training_data(card, dataset)
    split = load_or_make_split(dataset, workdir, card.config.data_seed)
    te = split_indices(dataset, split)[2]
    ids = dataset.frame["image_id"].astype(str).to_numpy()
    if sorted(ids[te]) != sorted(map(str, card.test_image_ids)):
        raise LesionLabError(f"{model_dir}: the split of {dataset.root} with seed "
                             f"{card.config.data_seed} does not hold the "
                             f"{len(card.test_image_ids)} test images its card lists (another "
                             f"dataset or copy?)")
    return split


def _folder_copy(model_dir: Path | str, copy: Path) -> Path:
    """``model_dir`` copied to ``copy`` once (via ``copy.part``), without the probabilities it
    saved at training: the folder as it is used predicts."""
    if not (copy / CARD_FILE).exists():
        tmp = copy.with_name(copy.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model_dir, tmp, ignore=shutil.ignore_patterns("*_proba.npy"))
        shutil.rmtree(copy, ignore_errors=True)
        tmp.rename(copy)
    return copy


def folder_row(model_dir: Path | str, dataset: Dataset, workdir: Path | str,
               external: Dataset | None = None, device: str = "auto") -> tuple[dict, pd.DataFrame]:
    """A model folder outside a study as a row :func:`analyse_row` reads, with its split.

    The folder is copied to ``<workdir>/results/errors/folders/<name>/`` (the original is
    only read; probabilities it saved at training are left behind), its val and test
    probabilities are predicted there by the folder itself (``predict_proba``: calibrated,
    its own test-time views) on the split its card was made on, and the external set's, when
    given, are saved as a study saves them (``benchmarks.comparisons.save_external_proba``).
    Predictions are made once per copy.

    Args:
        model_dir: a model folder (card.json with ``test_image_ids``).
        dataset: the labelled set the model was trained and tested on.
        workdir: where the copy, the split and the probabilities go.
        external: the external labelled set; None: none.
        device: where the folder predicts.

    Returns:
        (row, split): ``{"name", "model_dir"}`` and the (n_images, 4) split table.

    Raises:
        LesionLabError: the card has no test image ids, ``dataset`` is not the data the
            card records (``models.export.require_training_data``), or the split made from it
            with the card's seed does not hold the card's test images.
    """
    from benchmarks.comparisons import external_proba_path, save_external_proba
    from lesionlab.artifacts import save_npy
    from models.export import card_test_rows
    from models.folder import load_model_folder

    card = load_card(model_dir)
    split = _checked_split(model_dir, card, dataset, workdir)
    va = split_indices(dataset, split)[1]
    copy = _folder_copy(model_dir, Path(workdir) / "results" / "errors" / "folders" / card.name)
    wanted = (("test_proba.npy", card_test_rows(card, dataset).frame["path"]),
              ("val_proba.npy", dataset.frame["path"].iloc[va]))
    todo = [(name, want) for name, want in wanted if not (copy / name).exists()]
    ext_todo = external is not None and not external_proba_path(workdir, card.name).exists()
    if todo or ext_todo:
        with load_model_folder(copy, device=device) as model:
            for name, paths in todo:
                save_npy(copy / name, np.asarray(model.predict_proba(
                    paths.astype(str).tolist()), np.float32))
            if ext_todo:
                save_external_proba(workdir, card.name, external, model.predict_proba(external))
    return {"name": card.name, "model_dir": str(copy)}, split


def folder_md(label: str, analysis: dict, cfg: ErrorsConfig, figure: str | None) -> str:
    """The four parts of the analysis for one folder, as one block (``shipped_errors``)."""
    analyses = {label: analysis}
    return "\n".join([
        "##### Per-class recall and precision\n", per_class_md(analyses, cfg.n_boot, ""),
        "##### Top confusions and errors by dx_type, age, site and image source\n",
        errors_md(analyses, cfg.min_cell),
        "##### Artefact check: the dermoscope vignette masked\n", artefacts_md(analyses, cfg),
        "##### Calibration of the melanoma score\n", calibration_md(analyses, cfg, figure)])


@dataclass
class FolderErrorsConfig:
    """The flags of ``python -m benchmarks.errors``."""

    model: Path | None = model_option(shipped=True)
    external_test: Path | None = option(None, "labelled external folder, predicted once and "
                                              "broken down by image source")
    report: Path | None = option(None, "REPORT.md whose shipped_errors block is rewritten")
    label: str = option("shipped model", "the model's name in the tables")
    compare_maps: bool = option(False, "compare temperature, vector and Dirichlet scaling on "
                                       "val even where the val ECEs are low")
    n_boot: int = option(1000, "lesion-level bootstrap resamples per CI", ge=1)
    device: str = device_option()
    data: Path | None = data_option()
    workdir: Path = workdir_option()


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments, from ``FolderErrorsConfig``."""
    from lesionlab.cli import command_parser

    return command_parser("python -m benchmarks.errors", __doc__, FolderErrorsConfig)


def main(argv: Sequence[str] | None = None) -> int:
    """Analyse one model folder; print where the numbers went."""
    from lesionlab.cli import config_from_args, resolve_data
    from lesionlab.data import load_external_labels, load_dataset
    from models.shipped import default_model_folder

    args = config_from_args(FolderErrorsConfig, build_parser().parse_args(argv))
    folder = default_model_folder(args.model)
    dataset = load_dataset(resolve_data(args))
    external = load_external_labels(args.external_test) if args.external_test else None
    row, split = folder_row(folder, dataset, args.workdir, external, args.device)
    cfg = ErrorsConfig(n_boot=args.n_boot, device=args.device, compare_maps=args.compare_maps)
    analysis = analyse_row(row, dataset, split, args.workdir, external, cfg)
    out = Path(args.workdir) / "results" / "errors" / f"{row['name']}.json"
    write_json(out, {"config": asdict(cfg), "models": {args.label: analysis}})
    figure = None
    if args.report is not None:
        report = Path(args.report)
        fig = report.parent / "reports" / "figures" / f"reliability_mel_{row['name']}.png"
        if fig_mel_reliability({args.label: analysis}, fig):
            figure = str(fig.relative_to(report.parent))
        text = report.read_text(encoding="utf-8")
        write_text(report, replace_block(text, "shipped_errors",
                                         folder_md(args.label, analysis, cfg, figure)))
    print(f"{row['name']}: test bal.acc of the saved probabilities "
          f"{balanced_accuracy(*_labels_pred(analysis, row, dataset, args.workdir)):.4f}; "
          f"numbers in {out}" + (f"; {args.report} updated" if args.report else ""))
    return 0


def _labels_pred(analysis: dict, row: dict, dataset: Dataset,
                 workdir: Path | str) -> tuple[np.ndarray, np.ndarray]:
    test = load_scored(row, "test", dataset, workdir)
    return test.labels, test.proba.argmax(axis=1)


if __name__ == "__main__":
    from lesionlab.cli import run_main

    run_main(main)
