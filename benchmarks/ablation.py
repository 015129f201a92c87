"""``python -m benchmarks.ablation``: what each lever of the fine-tuning recipe is worth.

One fine-tuning run per lever, each the baseline recipe (``FinetuneConfig()``'s defaults
without colour constancy, the state before this ablation chose it) with one thing changed;
every run is chosen and calibrated on val, scored once on test and, with
``--external-test``, once on the external set per image source. Results are written after
every lever to ``--out`` (JSON), which ``benchmarks.report`` renders between the
``ablation`` markers of REPORT.md. Val decides; test and external only report.

The runs are sized for a GPU (about a minute each there); on a 2-core CPU each is ~25 min, so
pass ``--levers`` to run a few.
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
from lesionlab.errors import LesionLabError
from models.finetune import FinetuneConfig, finetune

# lever -> (what changes, FinetuneConfig overrides); "recipe" is the baseline.
LEVERS: dict[str, tuple[str, dict]] = {
    "recipe": ("the recipe before colour constancy: 200x150, ISIC augmentation, balanced "
               "sampler + CE, stem + 2 blocks frozen, 12 epochs, schedule finished, epoch "
               "chosen on val", {}),
    "weighted_ce": ("inverse-frequency weighted CE instead of the balanced sampler",
                    dict(sampler="none", loss="weighted_ce")),
    "focal": ("focal loss (gamma 2, class weights) instead of the balanced sampler",
              dict(sampler="none", loss="focal")),
    "previous_recipe": ("the previous report's recipe: 160x120, basic augmentation, all layers "
                        "trained, 10 epochs, early stopping with patience 3",
                        dict(image_size=(120, 160), augment="basic", freeze_stages=0, epochs=10,
                             patience=3)),
    "basic_augment": ("basic augmentation (right-angle turns, mild affine) instead of ISIC",
                      dict(augment="basic")),
    "early_stopping": ("early stopping with patience 3 instead of finishing the schedule",
                       dict(patience=3)),
    "train_all_layers": ("nothing frozen", dict(freeze_stages=0)),
    "shades_of_gray": ("Shades of Gray colour constancy (p=6) before training and prediction "
                       "(chosen on val: the study's recipe)",
                       dict(color_constancy="shades_of_gray")),
    "histo_weight_2": ("histopathology-confirmed images weigh 2 in the loss",
                       dict(histo_weight=2.0)),
    "lr_1e-3": ("peak learning rate 1e-3 (recipe: 5e-4)", dict(lr=1e-3)),
    "lr_2.5e-4": ("peak learning rate 2.5e-4 (recipe: 5e-4)", dict(lr=2.5e-4)),
    "size_160x120": ("trained and evaluated at 160x120", dict(image_size=(120, 160))),
    "freeze_4": ("stem + 4 blocks frozen", dict(freeze_stages=4)),
    "epochs_20": ("20 epochs (more compute)", dict(epochs=20)),
}


def device_name(device: str) -> str:
    """The accelerator's or the CPU's model name, for every timing written."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_model()} ({platform.machine()}, {torch.get_num_threads()} threads)"


def lever_config(lever: str, base: FinetuneConfig) -> FinetuneConfig:
    """The recipe with one lever changed; the folder name says which.

    Raises:
        LesionLabError: ``lever`` is not one of ``LEVERS``.
    """
    if lever not in LEVERS:
        raise LesionLabError(f"unknown lever {lever!r}; expected some of {list(LEVERS)}")
    cfg = replace(base, **LEVERS[lever][1])
    return replace(cfg, name=f"ablation__{lever}__seed{cfg.seed}")


def run_lever(lever: str, cfg: FinetuneConfig, dataset, external, workdir: Path) -> dict:
    """Train one lever's model and return its row (val, test, external per source, cost)."""
    from models.evaluate import evaluate_model

    t0 = time.perf_counter()
    card = finetune(dataset, workdir, cfg, resume=True)
    row = {"lever": lever, "change": LEVERS[lever][0], "config": asdict(cfg),
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
    device: str = device_option()
    num_workers: int = option(2, "image decoding processes", ge=0)
    weights: str | None = option(None, "local lite0 checkpoint (offline machines)")
    seed: int = option(0, "model seed", ge=0)
    data: Path | None = data_option()
    workdir: Path = workdir_option()


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments, from ``AblationConfig``."""
    return command_parser("python -m benchmarks.ablation", __doc__, AblationConfig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the levers; keep earlier rows of ``--out`` for levers not rerun."""
    args = config_from_args(AblationConfig, build_parser().parse_args(argv))
    levers = [v.strip() for v in args.levers.split(",") if v.strip()]
    base = FinetuneConfig(seed=args.seed, device=args.device, num_workers=args.num_workers,
                          weights=args.weights, n_boot=500, color_constancy="none")
    configs = {lever: lever_config(lever, base) for lever in levers}  # fail before training
    dataset = ensure_data(resolve_data(args))
    external = load_external_labels(args.external_test) if args.external_test else None
    done = read_json(args.out) if args.out.exists() else {"rows": []}
    done["device"] = device_name(args.device)
    done["provenance"] = provenance()
    for lever in levers:
        row = run_lever(lever, configs[lever], dataset, external, args.workdir)
        done["rows"] = [r for r in done["rows"] if r["lever"] != lever] + [row]
        write_json(args.out, done)
        save_config(args.out, args, "python -m benchmarks.ablation")
        ext = row["external"]["overall"] if row["external"] else float("nan")
        print(f"{lever}: val {row['val_balanced_accuracy']:.3f}  test "
              f"{row['test_balanced_accuracy']:.3f}  external {ext:.3f}  best epoch "
              f"{row['best_epoch']}/{row['epochs_run']}  train {row['train_s']:.0f} s "
              f"({row['train_img_per_s']:.0f} img/s)  [{done['device']}]", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
