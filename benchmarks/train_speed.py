"""``python -m benchmarks.train_speed``: fine-tuning images/s per engineering choice, on this CPU.

Times optimiser steps (forward, backward, AdamW) of the fine-tuning model on fixed batches:
NCHW vs channels_last, fp32 vs bf16 autocast (fast only where the CPU has avx512_bf16 or
AMX), torch.compile, and freezing the first stages; then the input side: JPEG decode +
augmentation in DataLoader workers vs the same augmentation on decoded uint8 images held in
RAM, and the batched input pipeline (``models.batched_input``: a decoded uint8 cache, kornia
augmentation on whole batches) on the CPU and, where CUDA is available, on the GPU, beside a
GPU training step (fp16 AMP). Prints the CPU model and its bf16 flags (and the GPU's name)
beside the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from benchmarks.featurize_speed import ModelBenchConfig
from lesionlab.cli import (command_parser, config_from_args, data_option, device_option, option,
                           resolve_data, run_main)
from lesionlab.data import load_rgb
from lesionlab.device import cpu_flags, cpu_model
from lesionlab.download import ensure_data
from models.finetune import FinetuneConfig, TrainSet, build_model, freeze_stages, param_groups


def step_rate(cfg: FinetuneConfig, batch: int, steps: int, channels_last: bool = True,
              bf16: bool = False, compile_model: bool = False,
              frozen_stages: int = 0, device: str = "cpu") -> tuple[float, float]:
    """(training images/s, seconds before the first timed step) of one configuration; on
    ``cuda`` under fp16 AMP (``bf16`` is for the CPU), timed to the device's completion."""
    torch.manual_seed(0)
    dev = torch.device(device)
    model, _ = build_model(cfg)
    freeze_stages(model, frozen_stages)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.train().to(dev, memory_format=fmt)
    opt = torch.optim.AdamW([g for g in param_groups(model, cfg)
                             if any(p.requires_grad for p in g["params"])])
    net: Callable = torch.compile(model) if compile_model else model
    x = torch.randn(batch, 3, *cfg.image_size, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 7, (batch,), device=dev)
    loss_fn = torch.nn.CrossEntropyLoss()
    cuda = dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)

    def one() -> None:
        with torch.autocast(dev.type, dtype=torch.float16 if cuda else torch.bfloat16,
                            enabled=cuda or bf16):
            loss = loss_fn(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            one()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    warm = timed(1)  # warm-up (and compilation)
    return batch * steps / timed(steps), warm


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


def batched_rate(paths: Sequence[str], cfg: FinetuneConfig, device: str,
                 batch: int) -> tuple[float, float]:
    """(images/s of one pass of the batched input pipeline, seconds to decode the cache once)
    on ``device``: batches gathered from the decoded uint8 cache and augmented there by
    kornia (``models.batched_input``), timed to the device's completion."""
    import tempfile

    from models.batched_input import BatchedLoader, IndexSet, batch_augment, decoded_cache
    from models.finetune import train_loader

    dev = torch.device(device)
    labels = np.zeros(len(paths), dtype=int)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        cache = decoded_cache(paths, cfg.image_size, work, num_workers=cfg.num_workers)
        decode_s = time.perf_counter() - t0
        run = dataclasses.replace(cfg, batch_size=batch, num_workers=0, sampler="none")
        loader = BatchedLoader(train_loader(IndexSet(labels, np.ones(len(paths), np.float32)),
                                            labels, run, 0),
                               cache, np.arange(len(paths)),
                               batch_augment(cfg.image_size, (0.5,) * 3, (0.5,) * 3), dev)
        next(iter(loader))  # warm-up
        t0, seen = time.perf_counter(), 0
        for x, _, _ in loader:
            seen += len(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return seen / (time.perf_counter() - t0), decode_s


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
    gpu_batch_size: int = option(256, "images per batch of the GPU rows", ge=1)
    device: str = device_option()
    data: Path | None = data_option()


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments, from ``TrainSpeedConfig``."""
    return command_parser("python -m benchmarks.train_speed", __doc__, TrainSpeedConfig)


def step_rows(args: TrainSpeedConfig, cfg: FinetuneConfig, cuda: bool) -> None:
    """The training-step table: the CPU rows, then (with CUDA) the GPU's."""
    rows = [("NCHW fp32", dict(channels_last=False)), ("channels_last fp32", {}),
            ("channels_last bf16 autocast", dict(bf16=True)),
            ("channels_last fp32, stem + 2 stages frozen", dict(frozen_stages=2)),
            ("channels_last fp32, stem + 4 stages frozen", dict(frozen_stages=4))]
    if args.compile:
        rows.append(("channels_last fp32 + torch.compile", dict(compile_model=True)))
    print("| training step | device | batch | images/s | first step (s) |\n"
          "|---|---|---:|---:|---:|")
    runs = [(n, kw, "cpu", args.batch_size) for n, kw in rows]
    if cuda:
        runs += [("channels_last fp16 AMP", {}, "cuda", args.gpu_batch_size),
                 ("channels_last fp16 AMP, stem + 2 stages frozen", dict(frozen_stages=2),
                  "cuda", args.gpu_batch_size)]
    for name, kw, device, batch in runs:
        rate, warm = step_rate(cfg, batch, args.steps, device=device, **kw)
        print(f"| {name} | {device} | {batch} | {rate:.1f} | {warm:.1f} |", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the two tables."""
    args = config_from_args(TrainSpeedConfig, build_parser().parse_args(argv))
    cfg = FinetuneConfig(backbone=args.backbone, image_size=tuple(args.image_size))
    flags = sorted({"avx512_bf16", "amx_bf16", "avx512_vnni"} & cpu_flags())
    cuda = args.device != "cpu" and torch.cuda.is_available()
    gpu = f"; GPU: {torch.cuda.get_device_name(0)}" if cuda else "; no GPU"
    print(f"\n{cpu_model()} (flags: {', '.join(flags) or 'no bf16/vnni'}); "
          f"{torch.get_num_threads()} threads{gpu}; {args.backbone} at "
          f"{args.image_size[1]}x{args.image_size[0]}\n")
    step_rows(args, cfg, cuda)
    paths = ensure_data(resolve_data(args)).frame["path"].tolist()[: args.n_images]
    print(f"\n| input pipeline ({len(paths)} images) | images/s |\n|---|---:|")
    for name, in_ram, workers in (("JPEG decode + augment, 2 workers", False, 2),
                                  ("uint8 in RAM + augment, 2 workers", True, 2),
                                  ("JPEG decode + augment, in process", False, 0)):
        print(f"| {name} | {loader_rate(paths, cfg, in_ram, workers):.1f} |", flush=True)
    for device, batch in [("cpu", args.batch_size)] + ([("cuda", args.gpu_batch_size)]
                                                        if cuda else []):
        rate, decode_s = batched_rate(paths, cfg, device, batch)
        print(f"| batched: decoded cache + kornia augment on {device}, batch {batch} "
              f"(decoding once: {decode_s:.1f} s) | {rate:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
