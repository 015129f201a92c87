"""``python -m benchmarks.train_speed``: fine-tuning images/s per engineering choice, on this CPU.

Times optimiser steps (forward, backward, AdamW) of the fine-tuning model on fixed batches:
NCHW vs channels_last, fp32 vs bf16 autocast (fast only where the CPU has avx512_bf16 or
AMX), torch.compile, and freezing the first stages; then the input side: JPEG decode +
augmentation in DataLoader workers vs the same augmentation on decoded uint8 images held in
RAM. Prints the CPU model and its bf16 flags beside the figures.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from benchmarks.featurize_speed import ModelBenchConfig
from lesionlab.cli import (command_parser, config_from_args, data_option, option, resolve_data,
                           run_main)
from lesionlab.data import load_rgb
from lesionlab.device import cpu_flags, cpu_model
from lesionlab.download import ensure_data
from models.finetune import FinetuneConfig, TrainSet, build_model, freeze_stages, param_groups


def step_rate(cfg: FinetuneConfig, batch: int, steps: int, channels_last: bool = True,
              bf16: bool = False, compile_model: bool = False,
              frozen_stages: int = 0) -> tuple[float, float]:
    """(training images/s, seconds before the first timed step) of one configuration."""
    torch.manual_seed(0)
    model, _ = build_model(cfg)
    freeze_stages(model, frozen_stages)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.train().to(memory_format=fmt)
    opt = torch.optim.AdamW([g for g in param_groups(model, cfg)
                             if any(p.requires_grad for p in g["params"])])
    net: Callable = torch.compile(model) if compile_model else model
    x = torch.randn(batch, 3, *cfg.image_size).contiguous(memory_format=fmt)
    y = torch.randint(0, 7, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def one() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    one()  # warm-up (and compilation)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    return batch * steps / (time.perf_counter() - t0), warm


def loader_rate(paths: Sequence[str], cfg: FinetuneConfig, in_ram: bool,
                workers: int) -> float:
    """Images/s of the training input pipeline alone: decode + augmentation, or augmentation
    of images decoded once into RAM as uint8 (10,015 x 150 x 200 x 3 is 0.9 GB)."""
    data = TrainSet(paths, np.zeros(len(paths), dtype=int), cfg.image_size, (0.5,) * 3,
                    (0.5,) * 3)
    if in_ram:
        data = InRam([np.asarray(load_rgb(p)) for p in paths], data.transform)
    loader = torch.utils.data.DataLoader(data, batch_size=32, num_workers=workers)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return len(paths) / (time.perf_counter() - t0)


class InRam(torch.utils.data.Dataset):
    """Decoded uint8 images held in memory, augmented on the fly."""

    def __init__(self, images: list[np.ndarray], transform: Callable) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), 0


@dataclass
class TrainSpeedConfig(ModelBenchConfig):
    """The flags of ``python -m benchmarks.train_speed``."""

    image_size: tuple[int, int] = option((120, 160), "input (H, W)", metavar=("H", "W"), ge=1)
    batch_size: int = option(32, "images per batch", ge=1)
    steps: int = option(6, "timed steps per row", ge=1)
    compile: bool = option(False, "also time torch.compile", switch=True)
    n_images: int = option(512, "images for the loader rows", ge=1)
    data: Path | None = data_option()


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments, from ``TrainSpeedConfig``."""
    return command_parser("python -m benchmarks.train_speed", __doc__, TrainSpeedConfig)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the two tables."""
    args = config_from_args(TrainSpeedConfig, build_parser().parse_args(argv))
    cfg = FinetuneConfig(backbone=args.backbone, image_size=tuple(args.image_size))
    flags = sorted({"avx512_bf16", "amx_bf16", "avx512_vnni"} & cpu_flags())
    rows = [("NCHW fp32", dict(channels_last=False)), ("channels_last fp32", {}),
            ("channels_last bf16 autocast", dict(bf16=True)),
            ("channels_last fp32, stem + 2 stages frozen", dict(frozen_stages=2)),
            ("channels_last fp32, stem + 4 stages frozen", dict(frozen_stages=4))]
    if args.compile:
        rows.append(("channels_last fp32 + torch.compile", dict(compile_model=True)))
    print(f"\n{cpu_model()} (flags: {', '.join(flags) or 'no bf16/vnni'}); "
          f"{torch.get_num_threads()} threads; {args.backbone} at "
          f"{args.image_size[1]}x{args.image_size[0]}, batch {args.batch_size}\n")
    print("| training step | images/s | first step (s) |\n|---|---:|---:|")
    for name, kw in rows:
        rate, warm = step_rate(cfg, args.batch_size, args.steps, **kw)
        print(f"| {name} | {rate:.1f} | {warm:.1f} |", flush=True)
    paths = ensure_data(resolve_data(args)).frame["path"].tolist()[: args.n_images]
    print(f"\n| input pipeline ({len(paths)} images) | images/s |\n|---|---:|")
    for name, in_ram, workers in (("JPEG decode + augment, 2 workers", False, 2),
                                  ("uint8 in RAM + augment, 2 workers", True, 2),
                                  ("JPEG decode + augment, in process", False, 0)):
        print(f"| {name} | {loader_rate(paths, cfg, in_ram, workers):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
