"""``python -m benchmarks.ablation``: what each lever of the fine-tuning recipe is worth.

One fine-tuning run per lever, each the baseline recipe (``FinetuneConfig()``'s defaults
without colour constancy, the state before this ablation chose it) with one thing changed;
every run is chosen and calibrated on val, scored once on test and, with
``--external-test``, once on the external set per image source. Results are written after
every lever to ``--out`` (JSON), which ``benchmarks.report`` renders between the
``ablation`` markers of REPORT.md. Val decides; test and external only report.

The runs are sized for a GPU (about a minute each there); on a 2-core CPU each is ~25 min, so
pass ``--levers`` to run a few. ``--seeds N`` trains every lever at model seeds ``--seed`` ..
``--seed + N - 1`` (same split, same training images); :func:`adoption` then applies the study's
one adoption rule to each lever from val alone. ``--base study`` measures the levers against
the study's adopted recipe (``FinetuneConfig()``, Shades of Gray on) instead of the recipe
before colour constancy, and ``--train-fraction`` shrinks train (lesion-grouped) so seeds fit a
CPU.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence


from lesionlab.artifacts import read_json, write_json
from lesionlab.provenance import provenance
from lesionlab.cli import (command_parser, config_from_args, data_option, device_option, option,
                           resolve_data, run_main, save_config, workdir_option)
from lesionlab.data import load_external_labels
from lesionlab.device import cpu_model
from lesionlab.download import ensure_data
from lesionlab.errors import LesionLabError, warn_once
from models.batched_input import PIPELINES
from models.finetune import FinetuneConfig, finetune
from benchmarks.levers import (ADOPT_SE, BASE_DESCRIPTIONS, BASES, LEVERS,  # noqa: F401
                               MIN_SEEDS, adoption)

def device_name(device: str) -> str:
    """The accelerator's or the CPU's model name, for every timing written."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_model()}, {platform.machine()}, {torch.get_num_threads()} threads"


def lever_config(lever: str, base: FinetuneConfig, base_name: str = "before_color_constancy"
                 ) -> FinetuneConfig:
    """The recipe with one lever changed; the folder name says which (and, for ``--base
    study`` or a train fraction under 1, that too, so runs of different bases never share a
    folder).

    With ``--input-pipeline batched`` (the GPU path) a lever of basic augmentation, which that
    pipeline does not implement, runs with the worker pipeline, with a counted warning; each
    row's ``config`` says which pipeline it ran.

    Raises:
        LesionLabError: ``lever`` is not one of ``LEVERS``, or it changes nothing in ``base``
            (e.g. ``shades_of_gray`` against ``--base study``).
    """
    if lever not in LEVERS:
        raise LesionLabError(f"unknown lever {lever!r}; expected some of {list(LEVERS)}")
    cfg = replace(base, **LEVERS[lever][1])
    if lever != "recipe" and cfg == base:
        raise LesionLabError(f"lever {lever!r} changes nothing in the {base_name!r} base")
    if cfg.input_pipeline == "batched" and cfg.augment != "isic":
        warn_once(f"lever {lever!r}: the batched input pipeline has the isic augmentation only; "
                  f"this lever runs with the worker pipeline", key="ablation lever on workers")
        cfg = replace(cfg, input_pipeline="workers")
    tag = "" if base_name == "before_color_constancy" else f"{base_name}-"
    frac = "" if cfg.train_fraction == 1.0 else f"frac{cfg.train_fraction:g}__"
    split = "" if cfg.data_seed == cfg.seed else f"split{cfg.data_seed}__"
    pipe = "" if cfg.input_pipeline == "workers" else f"{cfg.input_pipeline}__"
    return replace(cfg, name=f"ablation__{tag}{lever}__{frac}{split}{pipe}seed{cfg.seed}")


def run_lever(lever: str, cfg: FinetuneConfig, dataset, external, workdir: Path,
              base: str = "before_color_constancy") -> dict:
    """Train one lever's model and return its row (val, test, external per source, cost)."""
    from models.evaluate import evaluate_model

    t0 = time.perf_counter()
    card = finetune(dataset, workdir, cfg, resume=True)
    change = BASE_DESCRIPTIONS[base] if lever == "recipe" else LEVERS[lever][0]
    row = {"lever": lever, "change": change, "seed": cfg.seed,
           "train_fraction": cfg.train_fraction, "config": asdict(cfg),
           "val_balanced_accuracy": card.val["balanced_accuracy"],
           "val_best_epoch_score": card.details.val_balanced_accuracy,
           "best_epoch": card.details.best_epoch, "epochs_run": card.details.epochs_run,
           "test_balanced_accuracy": card.test["balanced_accuracy"],
           "test_ci95": card.test["ci95"]["balanced_accuracy"],
           "test_macro_auc": card.test["macro_auc"],
           "test_mel_sensitivity": card.test["mel_sensitivity"],
           "train_s": card.fit_time_s, "train_img_per_s": card.details.train_img_per_s,
           "wall_s": None, "external": None}
    if external is not None:
        res = evaluate_model(Path(workdir) / "models" / card.name, external, by="dataset",
                             workdir=workdir, n_boot=200, device=cfg.device)
        row["external"] = {"overall": res["overall"]["balanced_accuracy"],
                           "by_source": {k: {"n": v["n"], "balanced_accuracy":
                                             v["balanced_accuracy"]}
                                         for k, v in res["by"]["groups"].items()}}
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


@dataclass
class AblationConfig:
    """The flags of ``python -m benchmarks.ablation``."""

    levers: str = option(",".join(LEVERS), "comma-separated levers to run, in order")
    external_test: Path | None = option(None, "labelled external folder, scored once per lever, "
                                              "per image source")
    out: Path = option(Path("reports/ablation.json"), "JSON results, rewritten after every "
                                                      "lever (the resolved config beside it)")
    report: Path | None = option(None, "REPORT.md whose ablation block (the seeded one with "
                                       "--seeds > 1) is rewritten from --out after every "
                                       "lever")
    device: str = device_option()
    num_workers: int = option(2, "image decoding processes", ge=0)
    input_pipeline: str = option("workers", "training input of every run: worker processes, "
                                            "or batched (decoded once, augmented on the "
                                            "device: the GPU path; basic-augmentation levers "
                                            "fall back to workers)", choices=PIPELINES)
    weights: str | None = option(None, "local lite0 checkpoint (offline machines)")
    seed: int = option(0, "model seed (the first of --seeds)", ge=0)
    seeds: int = option(1, "model seeds per lever: --seed .. --seed + N - 1, same split and "
                           "training images (the adoption rule needs 3)", ge=1)
    base: str = option("before_color_constancy", "the recipe the levers change: the one before "
                                                 "colour constancy (the GPU ablation) or the "
                                                 "study's (Shades of Gray on)",
                       choices=tuple(BASES))
    train_fraction: float = option(1.0, "lesion-grouped fraction of train every run uses "
                                        "(0.1: seeds on a CPU)", gt=0, le=1)
    data: Path | None = data_option()
    workdir: Path = workdir_option()


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments, from ``AblationConfig``."""
    return command_parser("python -m benchmarks.ablation", __doc__, AblationConfig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the levers, seed by seed (every lever at one seed, then the next seed, so a
    stopped run has whole seeds); keep earlier rows of ``--out`` for (lever, seed) pairs not
    rerun."""
    args = config_from_args(AblationConfig, build_parser().parse_args(argv))
    levers = [v.strip() for v in args.levers.split(",") if v.strip()]
    seeds = range(args.seed, args.seed + args.seeds)
    configs = {(lever, s): lever_config(lever, FinetuneConfig(
        seed=s, split_seed=args.seed, device=args.device, num_workers=args.num_workers,
        input_pipeline=args.input_pipeline,
        weights=args.weights, n_boot=500, train_fraction=args.train_fraction,
        **BASES[args.base]), args.base)
        for s in seeds for lever in levers}  # fail before training
    dataset = ensure_data(resolve_data(args))
    external = load_external_labels(args.external_test) if args.external_test else None
    done = read_json(args.out) if args.out.exists() else {"rows": []}
    done["device"] = device_name(args.device)
    done["provenance"] = provenance()  # the latest run's; each row keeps its own commit
    done["base"] = args.base
    for (lever, s), cfg in configs.items():
        row = run_lever(lever, cfg, dataset, external, args.workdir, args.base)
        row["commit"] = done["provenance"]["commit"]
        row["device"] = done["device"]  # rows of one file may come from several machines
        done["rows"] = [r for r in done["rows"]
                        if (r["lever"], r.get("seed", 0)) != (lever, s)] + [row]
        write_json(args.out, done)
        save_config(args.out, args, "python -m benchmarks.ablation")
        if args.report is not None:
            from benchmarks.report import update_ablation_blocks

            update_ablation_blocks(args.report, args.out, seeded=args.seeds > 1)
        ext = row["external"]["overall"] if row["external"] else float("nan")
        print(f"{lever} (seed {s}): val {row['val_balanced_accuracy']:.3f}  test "
              f"{row['test_balanced_accuracy']:.3f}  external {ext:.3f}  best epoch "
              f"{row['best_epoch']}/{row['epochs_run']}  train {row['train_s']:.0f} s "
              f"({row['train_img_per_s']:.0f} img/s)  [{done['device']}]", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
