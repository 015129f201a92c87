"""REPORT.md writer: leaderboards between markers (prose untouched) and figures on disk."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.rows import legacy_input_kind as input_kind  # noqa: E402,F401 (old rows)
from benchmarks.rows import row_input, row_spec  # noqa: E402
from benchmarks.comparisons import comparisons_block  # noqa: E402
from benchmarks.seeds import seeds_md  # noqa: E402
from lesionlab.artifacts import write_text  # noqa: E402
from lesionlab.data import Dataset  # noqa: E402
from lesionlab.metrics import reliability_curve  # noqa: E402
from lesionlab.provenance import same_code, short  # noqa: E402
from models.bundle import load_card  # noqa: E402
from models.design import INPUTS  # noqa: E402

MARKERS = {"leaderboard": ("<!-- leaderboard:start -->", "<!-- leaderboard:end -->"),
           "external": ("<!-- external:start -->", "<!-- external:end -->"),
           "sources": ("<!-- sources:start -->", "<!-- sources:end -->"),
           "melanoma": ("<!-- melanoma:start -->", "<!-- melanoma:end -->"),
           "ablation": ("<!-- ablation:start -->", "<!-- ablation:end -->"),
           "training": ("<!-- training:start -->", "<!-- training:end -->"),
           "head_input": ("<!-- head_input:start -->", "<!-- head_input:end -->"),
           "figures": ("<!-- figures:start -->", "<!-- figures:end -->"),
           "comparisons": ("<!-- comparisons:start -->", "<!-- comparisons:end -->"),
           "seeds": ("<!-- seeds:start -->", "<!-- seeds:end -->"),
           "ablation_seeds": ("<!-- ablation_seeds:start -->", "<!-- ablation_seeds:end -->"),
           "shipped_errors": ("<!-- shipped_errors:start -->", "<!-- shipped_errors:end -->")}


ABLATION = Path("reports") / "ablation_gpu.json"  # written by benchmarks.ablation on a GPU
# benchmarks.ablation --seeds 3 --base study --train-fraction 0.1, on a CPU
ABLATION_SEEDS = Path("reports") / "ablation_cpu_seeds.json"
# blocks of the error analysis, written after the rest by benchmarks.errors.write_error_blocks
ERROR_BLOCKS = ("per_class", "errors", "artefacts", "calibration")
MARKERS.update({name: (f"<!-- {name}:start -->", f"<!-- {name}:end -->")
                for name in ERROR_BLOCKS})


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def cell_cost_s(row: dict) -> float:
    """Seconds a row's cell cost in the run (fold rows are inside their K-fold cell's)."""
    if row.get("group") == "fold":
        return 0.0
    return row.get("cell_time_s", row["total_time_s"])


def leaderboard_md(rows: list[dict], title: str = "") -> str:
    """Markdown table sorted by test balanced accuracy, one row per cell."""
    head = ("| # | features | head | imbalance | metadata | train frac | balanced acc [95% CI] "
            "| macro F1 | macro AUC | mel sens | ECE | val bal.acc | time (s) |\n"
            "|---:|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for i, r in enumerate(sorted(rows, key=lambda r: -r["balanced_accuracy"]), 1):
        ci = r.get("ci95") or [None, None]
        stale = " **(stale)**" if r.get("stale") else ""
        lines.append(
            f"| {i} | {r['features']}{stale} | {r['head']} | {r['imbalance']} | "
            f"{'yes' if r.get('metadata') else 'no'} | {r.get('train_fraction', 1.0):g} | "
            f"**{_fmt(r['balanced_accuracy'])}** [{_fmt(ci[0])}, {_fmt(ci[1])}] | "
            f"{_fmt(r['macro_f1'])} | {_fmt(r['macro_auc'])} | {_fmt(r['mel_sensitivity'])} | "
            f"{_fmt(r['ece'])} | {_fmt(r.get('val_balanced_accuracy'))} | "
            f"{_time(r)} |")
    return (title + "\n\n" if title else "") + head + "\n".join(lines) + "\n"


def provenance_md(rows: list[dict], current: dict | None) -> str:
    """Which code made the cells: one line per commit (or code hash), with its cell count, the
    lock it ran on, and how many rows were reused from other code (``--reuse-stale``)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(short(r.get("provenance")), []).append(r)
    lines = []
    for label, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        rec = members[0].get("provenance") or {}
        lock = (rec.get("lock_sha256") or "none")[:10] if rec else "?"
        n_stale = sum(1 for r in members if r.get("stale"))
        here = " (this run's code)" if rec and current and same_code(rec, current) else ""
        lines.append(f"- `{label}`{here}: {len(members)} cells, lock `{lock}`"
                     + (f", {n_stale} reused as stale" if n_stale else ""))
    return "_Code that made these cells (commit, or code sha256 where there was no git):_\n\n" \
        + "\n".join(lines) + "\n"


def _time(row: dict) -> str:
    """A model's whole cost; where its cell cost less here (an ensemble of models trained by
    other cells) or more (features made first), the cell's own time beside it."""
    total, cell = row["total_time_s"], row.get("cell_time_s")
    if cell is None or abs(cell - total) <= 0.1 * total + 5:
        return _fmt(total, 0)
    return f"{_fmt(total, 0)} (cell {_fmt(cell, 0)})"


def _head(row: dict) -> str:
    """The head, with its imbalance handling where it is not the default class weights."""
    extra = row_spec(row)["imbalance"] in ("none", "smote")
    return f"{row['head']} ({row['imbalance']})" if extra else row["head"]


def sources_md(rows: list[dict]) -> str:
    """Per-source table of the external test set: balanced accuracy and macro AUC, with n."""
    with_sources = [r for r in rows if r.get("sources")]
    if not with_sources:
        return "_The external test set names no image source (no `dataset` column)._\n"
    names = sorted({s for r in with_sources for s in r["sources"]})
    first = with_sources[0]["sources"]
    head = ("| features | head | " + " | ".join(f"{n} (n={first[n]['n']})" for n in names)
            + " |\n|---|---|" + "---:|" * len(names) + "\n")
    lines = []
    for r in sorted(with_sources, key=lambda r: -r["balanced_accuracy"]):
        cells = [f"{_fmt(r['sources'][n]['balanced_accuracy'])} / "
                 f"{_fmt(r['sources'][n]['macro_auc'])}" if n in r["sources"] else "n/a"
                 for n in names]
        lines.append(f"| {r['features']} | {_head(r)} | " + " | ".join(cells) + " |")
    return ("Balanced accuracy / macro AUC per image source:\n\n" + head + "\n".join(lines)
            + "\n")


def _op_cell(op: dict | None, key: str) -> str:
    if not op:
        return "n/a"
    ci = (op.get("ci95") or {}).get(key) or [None, None]
    return f"{_fmt(op[key], 2)} [{_fmt(ci[0], 2)}, {_fmt(ci[1], 2)}]"


def melanoma_md(rows: list[dict], external: list[dict] | None) -> str:
    """The melanoma rule (threshold on P(mel) chosen on val for sensitivity >= 0.80): test
    sensitivity, specificity and benign lesions flagged per melanoma found, with CIs."""
    ext = {r["name"]: r.get("mel_operating_point") for r in external or []}
    head = ("| features | head | threshold | sensitivity | specificity | benign flagged per "
            "melanoma found | external sensitivity | external specificity |\n"
            "|---|---|---:|---|---|---|---|---|\n")
    lines = []
    for r in sorted(rows, key=lambda r: -r["balanced_accuracy"]):
        op = r.get("mel_operating_point")
        lines.append(f"| {r['features']} | {_head(r)} | {_fmt(op and op['threshold'])} | "
                     f"{_op_cell(op, 'sensitivity')} | {_op_cell(op, 'specificity')} | "
                     f"{_op_cell(op, 'benign_per_melanoma_found')} | "
                     f"{_op_cell(ext.get(r['name']), 'sensitivity')} | "
                     f"{_op_cell(ext.get(r['name']), 'specificity')} |")
    return head + "\n".join(lines) + "\n"


def ablation_md(path: Path) -> str:
    """The recipe ablation (``benchmarks.ablation`` output): each lever's change in val and
    test balanced accuracy against the baseline, external score, training time."""
    if not path.exists():
        return f"_No ablation results yet (`python -m benchmarks.ablation --out {path}`)._\n"
    saved = json.loads(path.read_text(encoding="utf-8"))
    rows = {r["lever"]: r for r in saved["rows"]}
    base = rows.get("recipe")
    if base is None:
        return "_The ablation has no baseline (`recipe`) row._\n"

    def delta(r: dict, key: str) -> str:
        return f"{_fmt(r[key])} ({r[key] - base[key]:+.3f})" if r is not base else _fmt(r[key])

    def ext(r: dict, source: str | None = None) -> str:
        e = r.get("external")
        if not e:
            return "n/a"
        return _fmt(e["overall"] if source is None else
                    e["by_source"].get(source, {}).get("balanced_accuracy"))

    lines = [f"Measured on {saved['device']} (`python -m benchmarks.ablation`, same code, "
             f"split and seed as the CPU study; fp16 autocast). Val decides; test and external "
             f"only report.\n",
             "| lever | what changes | val bal.acc (Δ) | test bal.acc (Δ) [95% CI] | test mel "
             "sens | external | `external` source | best epoch | train s (Δ) |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in saved["rows"]:
        ci = r["test_ci95"]
        lines.append(
            f"| {r['lever']} | {r['change']} | {delta(r, 'val_balanced_accuracy')} | "
            f"{delta(r, 'test_balanced_accuracy')} [{_fmt(ci[0])}, {_fmt(ci[1])}] | "
            f"{_fmt(r['test_mel_sensitivity'])} | {ext(r)} | {ext(r, 'external')} | "
            f"{r['best_epoch']}/{r['epochs_run']} | {r['train_s']:.0f} "
            f"({r['train_s'] - base['train_s']:+.0f}) |")
    return "\n".join(lines) + "\n"


def ablation_seeds_md(path: Path) -> str:
    """The seeded recipe ablation (``benchmarks.ablation --seeds N``): per lever, val and test
    balanced accuracy over model seeds (mean, sample sd, each seed) and the adoption rule's
    verdict from val alone (``benchmarks.ablation.adoption``)."""
    from benchmarks.levers import ADOPT_SE, BASE_DESCRIPTIONS, adoption

    if not path.exists():
        return (f"_No seeded ablation yet (`python -m benchmarks.ablation --seeds 3 --out "
                f"{path}`)._\n")
    saved = json.loads(path.read_text(encoding="utf-8"))
    by: dict[str, list[dict]] = {}
    for r in saved["rows"]:
        by.setdefault(r["lever"], []).append(r)
    if "recipe" not in by:
        return "_The seeded ablation has no baseline (`recipe`) rows._\n"

    def col(rows: list[dict], key: str) -> np.ndarray:
        return np.array([r[key] for r in sorted(rows, key=lambda r: r["seed"])], float)

    def spread(v: np.ndarray) -> str:
        sd = f" ({v.std(ddof=1):.3f})" if v.size > 1 else ""
        return f"{v.mean():.3f}{sd}"

    base_val, base_test = col(by["recipe"], "val_balanced_accuracy"), col(by["recipe"],
                                                                          "test_balanced_accuracy")
    fracs = sorted({r.get("train_fraction", 1.0) for r in saved["rows"]})
    base = saved.get("base", "before_color_constancy")
    lines = [f"Measured on {_ablation_devices(saved)} with `python -m benchmarks.ablation` (base "
             f"`{base}`, train fraction "
             f"{', '.join(f'{f:g}' for f in fracs)}, one split; model seeds "
             f"{sorted({r['seed'] for r in saved['rows']})}). Mean (sample sd) over seeds. "
             f"Verdict from val alone: adopt or reject when the difference of the mean val "
             f"scores exceeds {ADOPT_SE:g} Welch standard errors; test only reports.\n",
             "| lever | what changes | seeds | val bal.acc per seed | val mean (sd) | "
             "Δ val ± SE | verdict | test mean (sd) | Δ test | train s (mean) |",
             "|---|---|---:|---|---:|---:|---|---:|---:|---:|"]
    for lever, rows in by.items():
        val, test = col(rows, "val_balanced_accuracy"), col(rows, "test_balanced_accuracy")
        train = col(rows, "train_s")
        change = BASE_DESCRIPTIONS.get(base, rows[0]["change"]) if lever == "recipe" else \
            rows[0]["change"]
        if lever == "recipe":
            rule, dtest = "(the recipe)", "—"
            dval = "—"
        else:
            a = adoption(val, base_val)
            dval = f"{a['delta']:+.3f} ± {_fmt(a['se'])}"
            rule, dtest = a["verdict"], f"{test.mean() - base_test.mean():+.3f}"
        lines.append(f"| {lever} | {change} | {val.size} | "
                     f"{' / '.join(f'{v:.3f}' for v in val)} | {spread(val)} | {dval} | "
                     f"{rule} | {spread(test)} | {dtest} | {train.mean():.0f} |")
    return "\n".join(lines) + "\n"


def _ablation_devices(saved: dict) -> str:
    """The machine of the seeded ablation's rows: one name, or each machine with its
    levers where the rows came from several (a row without a ``device`` ran on the file's)."""
    levers: dict[str, list[str]] = {}
    for r in saved["rows"]:
        names = levers.setdefault(r.get("device") or saved["device"], [])
        if r["lever"] not in names:
            names.append(r["lever"])
    if len(levers) == 1:
        return next(iter(levers))
    return "; ".join(f"{d} ({', '.join(names)})" for d, names in levers.items())


def update_ablation_blocks(report: Path, results: Path | None = None,
                           seeded: bool = False) -> None:
    """Rewrite only an ablation block of ``report`` (the rest of the file, leaderboards
    included, is left as it is): from ``results`` (a ``benchmarks.ablation --out`` file) the
    ``ablation_seeds`` block when ``seeded``, else the ``ablation`` block; without
    ``results``, both from their files in ``reports/`` beside the report (:data:`ABLATION`,
    :data:`ABLATION_SEEDS`), as the full report does."""
    text = report.read_text(encoding="utf-8")
    if results is None or not seeded:
        text = replace_block(text, "ablation", ablation_md(results or report.parent / ABLATION))
    if results is None or seeded:
        text = replace_block(text, "ablation_seeds",
                             ablation_seeds_md(results or report.parent / ABLATION_SEEDS))
    write_text(report, text)


def training_md(rows: list[dict], cpu: str) -> str:
    """Cost of every fine-tuned cell of the run: size, frozen blocks, epochs, speed, minutes."""
    lines = [f"Fine-tuning cost in this run ({cpu}):\n",
             "| model | train frac | size | frozen blocks | epochs (best) | train img/s | "
             "min/epoch | total min |", "|---|---:|---|---:|---|---:|---:|---:|"]
    for r in rows:
        if r["kind"] != "finetune":
            continue
        card = load_card(r["model_dir"])
        c, d = card.config, card.details
        h, w = c.image_size
        fold = f" (fold {c.cv_fold + 1}/{c.cv_folds})" if c.cv_folds else ""
        lines.append(f"| {c.backbone}{fold} | {r['train_fraction']:g} | {w}x{h} | "
                     f"{c.freeze_stages} | {d.epochs_run} ({d.best_epoch}) | "
                     f"{d.train_img_per_s:.1f} | {d.epoch_time_s / 60:.1f} | "
                     f"{card.total_time_s / 60:.1f} |")
    return "\n".join(lines) + "\n"


def head_input_md(rows: list[dict]) -> str:
    """Logistic regression vs LightGBM per kind of input: the test balanced accuracy of the
    class-weighted, full-data cell each head scored best on val."""
    heads = [r for r in rows if r["kind"] == "head" and r.get("train_fraction", 1.0) >= 1.0
             and row_spec(r)["imbalance"] == "class_weight"]
    lines = ["| input | logistic regression | LightGBM | LightGBM - logreg |",
             "|---|---|---|---:|"]
    for kind in INPUTS:
        best = {}
        for head in ("logreg", "lightgbm"):
            cands = [r for r in heads if row_input(r) == kind and row_spec(r)["head"] == head]
            if cands:
                best[head] = max(cands, key=lambda r: r["val_balanced_accuracy"])
        cells = [f"{_fmt(best[h]['balanced_accuracy'])} (val "
                 f"{_fmt(best[h]['val_balanced_accuracy'])}"
                 f"{', +meta' if best[h].get('metadata') else ''})" if h in best else "not run"
                 for h in ("logreg", "lightgbm")]
        diff = ""
        if len(best) == 2:
            gap = best["lightgbm"]["balanced_accuracy"] - best["logreg"]["balanced_accuracy"]
            diff = f"{gap:+.3f}"
        lines.append(f"| {kind} | {cells[0]} | {cells[1]} | {diff} |")
    return ("Test balanced accuracy of the class-weighted cell each head scored best on val, "
            "per kind of input:\n\n" + "\n".join(lines) + "\n")


def replace_block(text: str, name: str, body: str) -> str:
    """Replace what lies between a marker pair (appending the pair if absent)."""
    start, end = MARKERS[name]
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip() + "\n\n" + block + "\n"


def _save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_class_distribution(dataset: Dataset, split: pd.DataFrame, out: Path) -> None:
    """Images per class and split (log scale shows the 58:1 imbalance: HAM10000's 6,705 nv
    vs 115 df images, Tschandl et al., Sci. Data 2018).

    Args:
        dataset: the labelled images (its class set orders the bars).
        split: (n_images, 4) split frame (``image_id``, ``lesion_id``, ``dx``, ``split``).
        out: the PNG to write.
    """
    table = pd.crosstab(split["dx"], split["split"]).reindex(list(dataset.classes))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    table[["train", "val", "test"]].plot.bar(ax=ax, logy=True)
    ax.set_ylabel("images (log)")
    ax.set_title("HAM10000 class distribution per split")
    _save(fig, out)


def fig_images_per_lesion(dataset: Dataset, out: Path) -> None:
    """How many photos each lesion has: why splits must group by lesion."""
    per = dataset.frame.groupby("lesion_id").size()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    counts = per.value_counts().sort_index()
    ax.bar(np.arange(len(counts)), counts.values)  # positions + labels: no categorical axis
    ax.set_xticks(np.arange(len(counts)), [str(k) for k in counts.index])
    ax.set_xlabel("images of the same lesion")
    ax.set_ylabel("lesions")
    ax.set_title(f"{len(per)} lesions, {len(dataset)} images")
    _save(fig, out)


def fig_confusion(row: dict, out: Path) -> None:
    """Row-normalised confusion matrix (recall on the diagonal)."""
    cm = np.asarray(row["confusion_matrix"], dtype=float)
    classes = list(row["per_class_recall"])  # the model's class set, in order
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5, 4.4))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{row['name'][:48]}\nbal.acc {_fmt(row['balanced_accuracy'])}", fontsize=9)
    _save(fig, out)


def fig_recall_bars(rows: list[dict], out: Path) -> None:
    """Per-class recall of the chosen models side by side (the classes of any of them; a
    model without a class has no bar there)."""
    fig, ax = plt.subplots(figsize=(7.5, 3.5))
    width = 0.8 / max(len(rows), 1)
    classes = list(dict.fromkeys(c for row in rows for c in row["per_class_recall"]))
    for k, row in enumerate(rows):
        vals = [row["per_class_recall"].get(c, float("nan")) for c in classes]
        ax.bar(np.arange(len(classes)) + k * width, vals, width, label=row["label"])
    ax.set_xticks(np.arange(len(classes)) + width * (len(rows) - 1) / 2, classes)
    ax.set_ylabel("test recall")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    _save(fig, out)


def fig_reliability(models: list[tuple[str, np.ndarray, np.ndarray]], out: Path) -> None:
    """Reliability diagram (top-label confidence vs accuracy) on the test split.

    Args:
        models: (label, y, proba) per model: y (n_test,) class indices, proba (n_test, n_classes)
            calibrated test probabilities; 10 equal-width confidence bins.
        out: the PNG to write.
    """
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    for label, y, proba in models:
        rc = reliability_curve(y, proba, n_bins=10)
        ax.plot(rc["confidence"], rc["accuracy"], "o-", label=label)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    _save(fig, out)


def fig_learning_curves(rows: list[dict], out: Path) -> None:
    """Test balanced accuracy vs train fraction, frozen+head vs fine-tuning."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for kind, label in (("head", "frozen embeddings + head"), ("finetune", "fine-tuning")):
        by_frac: dict[float, list[dict]] = {}
        for r in rows:
            if r["kind"] == kind:
                by_frac.setdefault(r["train_fraction"], []).append(r)
        if not by_frac:
            continue
        xs = sorted(by_frac)
        ys, err = [], []
        for x in xs:  # one model: its CI; several (the K fold networks): their mean and range
            accs = [r["balanced_accuracy"] for r in by_frac[x]]
            y = float(np.mean(accs))
            lo, hi = ((by_frac[x][0].get("ci95") or [y, y]) if len(accs) == 1
                      else (min(accs), max(accs)))
            ys.append(y)
            err.append([y - lo, hi - y])
        ax.errorbar(xs, ys, yerr=np.array(err).T, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks([0.1, 0.25, 0.5, 2 / 3, 1.0], ["10%", "25%", "50%", "67%", "100%"])
    ax.set_xlabel("fraction of the train split (lesion-grouped)")
    ax.set_ylabel("test balanced accuracy")
    ax.legend(fontsize=8)
    _save(fig, out)


def fig_gradcam(model_dir: Path, dataset: Dataset, out: Path, tiles: Path,
                per_class: int = 1) -> None:
    """Grad-CAM grid: one correct and one wrong test case per class where they exist."""
    from PIL import Image

    from models.explain import explain_images

    card = load_card(model_dir)
    proba = np.load(model_dir / "test_proba.npy")
    frame = dataset.frame.set_index("image_id").loc[card.test_image_ids]
    pred = proba.argmax(1)
    truth = frame["label"].to_numpy()
    picks = []
    for c in range(len(card.classes)):
        for correct in (True, False):
            idx = np.flatnonzero((truth == c) & ((pred == c) == correct))[:per_class]
            picks += [(i, correct) for i in idx]
    if not picks:
        return
    res = explain_images(model_dir, [frame["path"].iloc[i] for i, _ in picks], tiles)
    cols = 4
    rows = int(np.ceil(len(picks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.3))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, (i, correct), r in zip(np.ravel(axes), picks, res):
        ax.imshow(Image.open(r["overlay"]))
        ax.set_title(f"true {card.classes[truth[i]]} / pred {card.classes[pred[i]]}",
                     fontsize=8, color="green" if correct else "red")
    _save(fig, out)


def figures(summary: dict, dataset: Dataset, split: pd.DataFrame, workdir: Path,
            fig_dir: Path) -> list[tuple[str, str]]:
    """Make every figure; returns (caption, path) pairs relative to the report.

    Args:
        summary: the study summary (``rows``, one dict per cell).
        dataset: the labelled images.
        split: (n_images, 4) split frame (``image_id``, ``lesion_id``, ``dx``, ``split``).
        workdir: the study's workdir (model folders, test probabilities).
        fig_dir: where the PNGs go.
    """
    made = []
    fig_class_distribution(dataset, split, fig_dir / "class_distribution.png")
    made.append(("Class distribution per split", "class_distribution.png"))
    fig_images_per_lesion(dataset, fig_dir / "images_per_lesion.png")
    made.append(("Images per lesion", "images_per_lesion.png"))
    main = [r for r in summary["rows"] if r.get("group", "main") == "main"]
    chosen = []
    for kind, label in (("head", "best frozen + head"), ("finetune", "best fine-tuned"),
                        ("any", "best pipeline")):
        cands = [r for r in main if r["kind"] == kind or kind == "any"]
        if kind == "head":
            cands = [r for r in cands if row_input(r) in INPUTS[:2]]
        if cands:
            best = max(cands, key=lambda r: r["val_balanced_accuracy"])  # chosen on val
            chosen.append({**best, "label": label})
            fname = f"confusion_{kind}.png"
            fig_confusion(best, fig_dir / fname)
            made.append((f"Confusion matrix, {label} (chosen on val)", fname))
    if chosen:
        fig_recall_bars(chosen, fig_dir / "per_class_recall.png")
        made.append(("Per-class test recall", "per_class_recall.png"))
        rel = []
        for row in chosen:
            ids = load_card(row["model_dir"]).test_image_ids
            y = dataset.frame.set_index("image_id").loc[ids, "label"].to_numpy()
            rel.append((row["label"], y, np.load(Path(row["model_dir"]) / "test_proba.npy")))
        fig_reliability(rel, fig_dir / "reliability.png")
        made.append(("Reliability diagram (test, after temperature scaling on val)",
                     "reliability.png"))
    curve_rows = [r for r in summary["rows"] if r.get("group") in ("curve", "fold")]
    if curve_rows:
        # the curve's full-data points: the frozen head it was drawn for, and a fine-tuned
        # network of the curve's backbone on all of train if the run has one
        backbones = {row_spec(r)["network"] for r in curve_rows if r["kind"] == "finetune"}
        full = [r for r in chosen if r["label"] == "best frozen + head"]
        full += [r for r in main if r["kind"] == "finetune"
                 and row_spec(r)["network"] in backbones]
        fig_learning_curves(curve_rows + full, fig_dir / "learning_curves.png")
        made.append(("Learning curves: test balanced accuracy vs training data",
                     "learning_curves.png"))
    ft = [r for r in chosen if r["kind"] == "finetune"]
    if ft:
        fig_gradcam(Path(ft[0]["model_dir"]), dataset, fig_dir / "gradcam_examples.png",
                    workdir / "gradcam")
        made.append(("Grad-CAM of the fine-tuned model on test images (green: correct, red: "
                     "wrong)", "gradcam_examples.png"))
    return made


def write_report(report: Path | str, summary: dict, dataset: Dataset, split: pd.DataFrame,
                 workdir: Path | str, fig_dir: Path | str | None = None) -> None:
    """Regenerate the marked blocks of ``report`` and the figures; prose stays as written.

    Args:
        report: the Markdown file (made if absent).
        summary: the study summary (``rows``, ``preset``, ``seed``, ``wall_time_s`` ...).
        dataset: the labelled images.
        split: (n_images, 4) split frame (``image_id``, ``lesion_id``, ``dx``, ``split``).
        workdir: the study's workdir.
        fig_dir: where the figures go; None: ``reports/figures`` beside ``report``.
    """
    report = Path(report)
    fig_dir = Path(fig_dir) if fig_dir else report.parent / "reports" / "figures"
    text = report.read_text(encoding="utf-8") if report.exists() else "# lesionlab report\n"
    main_rows = [r for r in summary["rows"] if r.get("group", "main") == "main"]
    curve_rows = [r for r in summary["rows"] if r.get("group") in ("curve", "fold")]
    body = leaderboard_md(main_rows)
    if curve_rows:
        body += "\n" + leaderboard_md(curve_rows, "Learning-curve cells (train fractions; "
                                                  "2/3: the K-fold run's fold networks):")
    compute = sum(cell_cost_s(r) for r in summary["rows"]) / 60
    wall = summary["wall_time_s"]
    wall_txt = (f"wall time of the last run {wall / 60:.1f} min (cells reused from earlier "
                f"runs count as 0)" if wall is not None and not math.isnan(wall)
                else "rebuilt from saved cells")
    body += (f"\n_Preset `{summary['preset']}`, seed {summary['seed']}, {summary['n_images']} "
             f"images; {wall_txt}; the cells above took {compute:.0f} min of compute in all, "
             f"plus feature extraction (time (s): a cell's whole wall time: tuning, training, "
             f"calibration and test). Test split: lesion-grouped, touched once per cell; "
             f"CIs: lesion-level bootstrap resamples._\n")
    body += "\n" + provenance_md(summary["rows"], summary.get("provenance"))
    if summary.get("unfinished"):
        body += ("\n_Cells of this preset not finished yet: "
                 + ", ".join(f"`{m}`" for m in summary["unfinished"]) + "._\n")
    text = replace_block(text, "leaderboard", body)
    ext = summary.get("external")
    text = replace_block(text, "external", leaderboard_md(ext) if ext else
                         "_No external test set was given (`--external-test DIR`)._\n")
    if ext:
        text = replace_block(text, "sources", sources_md(ext))
    text = replace_block(text, "melanoma", melanoma_md(main_rows, ext))
    text = replace_block(text, "ablation", ablation_md(report.parent / ABLATION))
    text = replace_block(text, "ablation_seeds",
                         ablation_seeds_md(report.parent / ABLATION_SEEDS))
    text = replace_block(text, "head_input", head_input_md(main_rows))
    text = replace_block(text, "comparisons", comparisons_block(summary, dataset, workdir))
    text = replace_block(text, "seeds", seeds_md(summary.get("seeds")))
    text = replace_block(text, "training", training_md(summary["rows"],
                                                       summary.get("cpu", "CPU not recorded")))
    made = figures(summary, dataset, split, Path(workdir), fig_dir)
    rel = fig_dir.relative_to(report.parent) if fig_dir.is_relative_to(report.parent) else fig_dir
    figs = "\n\n".join(f"**{cap}**\n\n![{cap}]({rel}/{name})" for cap, name in made)
    text = replace_block(text, "figures", figs)
    write_text(report, text)
