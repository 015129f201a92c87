"""``python -m benchmarks.tta_cost --model DIR``: what test-time augmentation buys, and costs.

Scores one model folder (a fine-tuned network, an ensemble or a stack) with each TTA setting
(none, flip, d4: 8 dihedral views) on the val split, which is where a setting may be chosen,
and on the test split, reported beside it but never used to choose. Prints balanced accuracy,
macro AUC, melanoma sensitivity and seconds per image, with the CPU model, as a markdown table;
``--out`` keeps the rows as JSON for REPORT.md.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lesionlab.artifacts import write_json
from lesionlab.provenance import provenance
from lesionlab.cli import (command_parser, config_from_args, data_option, model_option, option,
                           resolve_data, run_main, save_config, workdir_option)
from lesionlab.data import Dataset
from lesionlab.device import cpu_model
from lesionlab.download import ensure_data
from lesionlab.splits import load_or_make_split, split_indices
from models.bundle import load_card
from models.evaluate import evaluate_model

TTAS = ("none", "flip", "d4")


def subset(dataset: Dataset, rows) -> Dataset:
    """The rows ``rows`` of ``dataset`` as a dataset of their own.

    Args:
        dataset: the labelled images.
        rows: (n_rows,) int row indices into ``dataset``.
    """
    return Dataset(root=dataset.root, frame=dataset.frame.iloc[rows].reset_index(drop=True),
                   classes=dataset.classes)


def tta_rows(model: Path, dataset: Dataset, workdir: Path, ttas: Sequence[str] = TTAS,
             n_boot: int = 500) -> list[dict]:
    """One row per TTA setting: val and test scores and seconds per image."""
    card = load_card(model)
    split = load_or_make_split(dataset, workdir, card.config.data_seed)
    _, va, te = split_indices(dataset, split)
    rows = []
    for tta in ttas:
        row = {"tta": tta}
        for part, idx in (("val", va), ("test", te)):
            t0 = time.perf_counter()
            res = evaluate_model(model, subset(dataset, idx), workdir=workdir, n_boot=n_boot,
                                 tta=tta)["overall"]
            row[part] = {k: res[k] for k in ("balanced_accuracy", "balanced_accuracy_ci95",
                                             "macro_auc", "mel_sensitivity")}
            row[f"{part}_s_per_image"] = (time.perf_counter() - t0) / len(idx)
        rows.append(row)
        print(f"tta {tta}: val {row['val']['balanced_accuracy']:.3f}, test "
              f"{row['test']['balanced_accuracy']:.3f}, {row['test_s_per_image'] * 1000:.0f} "
              f"ms/image", flush=True)
    return rows


def table(rows: list[dict], model: str, cpu: str) -> str:
    """Markdown: one line per TTA setting."""
    lines = [f"TTA on `{model}` ({cpu}); chosen on val, test shown beside it:\n",
             "| TTA | val bal.acc | test bal.acc [95% CI] | test macro AUC | test mel sens | "
             "ms/image |", "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lo, hi = r["test"]["balanced_accuracy_ci95"]
        lines.append(f"| {r['tta']} | {r['val']['balanced_accuracy']:.3f} | "
                     f"{r['test']['balanced_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{r['test']['macro_auc']:.3f} | {r['test']['mel_sensitivity']:.3f} | "
                     f"{r['test_s_per_image'] * 1000:.0f} |")
    return "\n".join(lines) + "\n"


@dataclass
class TtaCostConfig:
    """The flags of ``python -m benchmarks.tta_cost``."""

    model: Path = model_option("a model folder")
    tta: tuple[str, ...] = option(TTAS, "TTA settings to score", choices=TTAS)
    out: Path | None = option(None, "write the rows as JSON here (the resolved config beside "
                                    "it)")
    data: Path | None = data_option()
    workdir: Path = workdir_option()


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments, from ``TtaCostConfig``."""
    return command_parser("python -m benchmarks.tta_cost", __doc__, TtaCostConfig)


def main(argv: Sequence[str] | None = None) -> int:
    """Score the model with each TTA setting and print the table."""
    args = config_from_args(TtaCostConfig, build_parser().parse_args(argv))
    dataset = ensure_data(resolve_data(args))
    rows = tta_rows(args.model, dataset, args.workdir, args.tta)
    cpu = cpu_model()
    print(table(rows, Path(args.model).name, cpu))
    if args.out:
        write_json(args.out, {"model": Path(args.model).name, "cpu": cpu, "rows": rows,
                              "provenance": provenance()})
        save_config(args.out, args, "python -m benchmarks.tta_cost")
    return 0


if __name__ == "__main__":
    run_main(main)
