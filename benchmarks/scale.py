"""``python -m benchmarks.scale``: the same commands with 1 vs 2 workers, on this machine.

Prints trials/minute of ``models.train_head`` workers sharing one Optuna study (a journal file,
or ``--storage URL``) and images/s of ``featurize`` over a Dask LocalCluster of 1 vs 2
workers (and without Dask). On 2 cores little is gained; the point is that the commands are
the ones a cluster runs, unchanged.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import optuna

from featurize.extract import FeaturizeConfig, featurize
from lesionlab.cli import (command_parser, config_from_args, data_option, option, resolve_data,
                           run_main, workdir_option)
from lesionlab.data import Dataset
from lesionlab.device import cpu_model
from lesionlab.download import ensure_data
from models.train_head import FINISHED, make_storage


def tuning_rate(args: ScaleConfig, workers: int, storage: str) -> float:
    """Finished trials per minute of ``workers`` processes sharing one study."""
    name = f"scale-{workers}-{time.time_ns()}"
    cmd = [sys.executable, "-m", "models.train_head", "--features", args.features,
           "--trials", str(args.trials), "--folds", "3", "--tune-timeout", "600",
           "--data", str(resolve_data(args)), "--workdir", str(args.workdir),
           "--storage", storage, "--study-name", name]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL) for _ in range(workers)]
    for proc in procs:
        proc.wait()
    study = optuna.load_study(study_name=name, storage=make_storage(storage, args.workdir))
    done = study.get_trials(states=FINISHED)
    span = (max(t.datetime_complete for t in done)
            - min(t.datetime_start for t in done)).total_seconds()
    return 60.0 * len(done) / span


def featurize_rate(dataset: Dataset, cfg: FeaturizeConfig) -> float:
    """Images/s of one cold featurize run (cluster start and model loads included)."""
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        featurize(dataset, work, cfg)
        return len(dataset) / (time.perf_counter() - t0)


@dataclass
class ScaleConfig:
    """The flags of ``python -m benchmarks.scale``."""

    features: str = option("tf_efficientnet_lite0", "cached feature set the tuning workers read "
                                                    "(featurize it first)")
    trials: int = option(12, "trials of each tuning study", ge=1)
    storage: str | None = option(None, "shared Optuna storage URL; None: a journal file in a "
                                       "temp folder")
    backbone: str = option("tf_efficientnet_lite0", "for the Dask rows")
    n_images: int = option(512, "images for the Dask rows", ge=1)
    data: Path | None = data_option()
    workdir: Path = workdir_option()


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments, from ``ScaleConfig``."""
    return command_parser("python -m benchmarks.scale", __doc__, ScaleConfig)


def main(argv: Sequence[str] | None = None) -> int:
    """Print both tables."""
    args = config_from_args(ScaleConfig, build_parser().parse_args(argv))
    dataset = ensure_data(resolve_data(args))
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(w, tuning_rate(args, w, args.storage or f"journal://{tmp}/study-{w}.log"))
                for w in (1, 2)]
    print(f"\n{cpu_model()}; {args.features}; {args.trials} trials per study\n")
    print("| tuning workers | trials/min |\n|---:|---:|")
    for w, rate in rows:
        print(f"| {w} | {rate:.1f} |")
    sub = Dataset(root=dataset.root, frame=dataset.frame.iloc[:args.n_images].reset_index(
        drop=True))
    base = FeaturizeConfig(backbone=args.backbone, num_workers=1, chunk_size=64)
    print(f"\n{args.backbone}, {len(sub)} images, cold start each\n")
    print("| featurize | images/s |\n|---|---:|")
    print(f"| this process (1 decode worker) | {featurize_rate(sub, base):.1f} |")
    for n in (1, 2):
        cfg = replace(base, scheduler=f"local:{n}", num_workers=0)
        print(f"| Dask LocalCluster, {n} worker(s) | {featurize_rate(sub, cfg):.1f} |")
    return 0


if __name__ == "__main__":
    run_main(main)
