"""``python -m benchmarks.featurize_speed``: images/s of eager PyTorch vs featurize's path.

Model-only throughput on one preprocessed batch (so decoding does not blur the comparison),
then the end-to-end cached-extraction path (decode + resize in DataLoader workers) on real
images when a HAM10000 folder is given. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from featurize.backbones import Embedder, create_backbone
from featurize.extract import Extractor, FeaturizeConfig, Runner
from lesionlab.cli import command_parser, config_from_args, option, run_main
from lesionlab.data import default_data_dir, load_dataset


def _rate(fn: Callable[[torch.Tensor], object], x: torch.Tensor, repeats: int) -> float:
    fn(x)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return repeats * len(x) / (time.perf_counter() - t0)


@dataclass
class ModelBenchConfig:
    """The options every model-speed benchmark has: backbone, input size, batch size."""

    backbone: str = option("tf_efficientnet_lite0", "timm model name")
    image_size: tuple[int, int] = option((168, 224), "input (H, W)", metavar=("H", "W"), ge=1)
    batch_size: int = option(64, "images per batch", ge=1)


@dataclass
class FeaturizeSpeedConfig(ModelBenchConfig):
    """The flags of ``python -m benchmarks.featurize_speed``."""

    repeats: int = option(5, "timed passes per row", ge=1)
    data: Path | None = option(None, "HAM10000 folder for the end-to-end row; None: the default "
                                     "folder")
    n_images: int = option(1024, "for the end-to-end row", ge=1)


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments, from ``FeaturizeSpeedConfig``."""
    return command_parser("python -m benchmarks.featurize_speed", __doc__,
                          FeaturizeSpeedConfig)


def _eager_rows(backbone: str, x: torch.Tensor, repeats: int) -> tuple[list, np.ndarray]:
    """Rows for eager PyTorch (NCHW, channels_last, bf16) and the reference output."""
    embedder = Embedder(create_backbone(backbone)[0]).eval()
    rows = []
    with torch.inference_mode():
        ref = embedder(x).numpy()
        rows.append(("eager NCHW fp32", _rate(embedder, x, repeats), 0.0))
        cl = Embedder(create_backbone(backbone)[0]).eval().to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        rows.append(("eager channels_last fp32", _rate(cl, xc, repeats),
                     float(np.abs(cl(xc).numpy() - ref).max())))

        def bf16(t: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return cl(t).float()

        rows.append(("eager channels_last bf16 autocast", _rate(bf16, xc, repeats),
                     float(np.abs(bf16(xc).numpy() - ref).max())))
    return rows, ref


def _runner_rows(backbone: str, x: torch.Tensor, repeats: int, ref: np.ndarray) -> list:
    """Rows for the engines featurize uses: ONNX Runtime on CPU, fp16 on CUDA when present."""
    rows = []
    runner = Runner(Embedder(create_backbone(backbone)[0]), torch.device("cpu"), "onnx", x)
    try:
        rows.append(("featurize path: ONNX Runtime fp32 (used)",
                     _rate(runner, x, repeats), float(np.abs(runner(x) - ref).max())))
    finally:
        runner.close()
    if torch.cuda.is_available():
        gpu = Runner(Embedder(create_backbone(backbone)[0]), torch.device("cuda"), "auto", x)
        rows.append(("CUDA fp16 autocast", _rate(gpu, x, repeats),
                     float(np.abs(gpu(x) - ref).max())))
    return rows


def _end_to_end_row(args: FeaturizeSpeedConfig, size: tuple[int, int]) -> list:
    """Images/s of the whole featurize path (JPEG decode in a worker) on real images."""
    data = args.data or default_data_dir()
    if not (Path(data) / "HAM10000_metadata.csv").exists():
        return []
    paths = load_dataset(data).frame["path"].tolist()[: args.n_images]
    ext = Extractor(FeaturizeConfig(backbone=args.backbone, image_size=size,
                                    batch_size=args.batch_size, num_workers=1))
    try:
        t0 = time.perf_counter()
        ext.embed_paths(paths)
        return [(f"end-to-end featurize ({len(paths)} JPEGs, decode in worker)",
                 len(paths) / (time.perf_counter() - t0), float("nan"))]
    finally:
        ext.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print the table."""
    args = config_from_args(FeaturizeSpeedConfig, build_parser().parse_args(argv))
    size = tuple(args.image_size)
    x = torch.randn(args.batch_size, 3, *size)
    rows, ref = _eager_rows(args.backbone, x, args.repeats)
    rows += _runner_rows(args.backbone, x, args.repeats, ref)
    rows += _end_to_end_row(args, size)
    eager = rows[0][1]
    print(f"\n{args.backbone} at {size[1]}x{size[0]} (WxH), batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads\n")
    print("| path | images/s | x eager | max abs diff vs eager fp32 |")
    print("|---|---:|---:|---:|")
    for name, rate, diff in rows:
        print(f"| {name} | {rate:.1f} | {rate / eager:.2f} | {diff:.2e} |")
    return 0


if __name__ == "__main__":
    run_main(main)
