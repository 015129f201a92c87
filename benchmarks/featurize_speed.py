"""``python -m benchmarks.featurize_speed``: images/s of eager PyTorch vs featurize's path.

Model-only throughput on one preprocessed batch (so decoding does not blur the comparison),
then the end-to-end cached-extraction path (decode + resize in DataLoader workers) on real
images when a HAM10000 folder is given. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from featurize.backbones import Embedder, create_backbone
from featurize.extract import Extractor, FeaturizeConfig, Runner
from lesionlab.cli import run_main
from lesionlab.data import default_data_dir, load_dataset


def _rate(fn: Callable[[torch.Tensor], object], x: torch.Tensor, repeats: int) -> float:
    fn(x)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return repeats * len(x) / (time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print the table."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.featurize_speed", description=__doc__)
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", nargs=2, type=int, default=(168, 224), metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--n-images", type=int, default=1024, help="for the end-to-end row")
    args = p.parse_args(argv)
    size = tuple(args.image_size)
    model, _ = create_backbone(args.backbone)
    embedder = Embedder(model).eval()
    x = torch.randn(args.batch_size, 3, *size)
    rows = []
    with torch.inference_mode():
        ref = embedder(x).numpy()
        rows.append(("eager NCHW fp32", _rate(embedder, x, args.repeats), 0.0))
        cl = Embedder(create_backbone(args.backbone)[0]).eval().to(
            memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        rows.append(("eager channels_last fp32", _rate(cl, xc, args.repeats),
                     float(np.abs(cl(xc).numpy() - ref).max())))

        def bf16(t: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return cl(t).float()

        rows.append(("eager channels_last bf16 autocast", _rate(bf16, xc, args.repeats),
                     float(np.abs(bf16(xc).numpy() - ref).max())))
    runner = Runner(Embedder(create_backbone(args.backbone)[0]), torch.device("cpu"), "onnx", x)
    try:
        rows.append(("featurize path: ONNX Runtime fp32 (used)",
                     _rate(runner, x, args.repeats), float(np.abs(runner(x) - ref).max())))
    finally:
        runner.close()
    if torch.cuda.is_available():
        gpu = Runner(Embedder(create_backbone(args.backbone)[0]), torch.device("cuda"), "auto", x)
        rows.append(("CUDA fp16 autocast", _rate(gpu, x, args.repeats),
                     float(np.abs(gpu(x) - ref).max())))
    data = args.data or default_data_dir()
    if (Path(data) / "HAM10000_metadata.csv").exists():
        paths = load_dataset(data).frame["path"].tolist()[: args.n_images]
        ext = Extractor(FeaturizeConfig(backbone=args.backbone, image_size=size,
                                        batch_size=args.batch_size, num_workers=1))
        try:
            t0 = time.perf_counter()
            ext.embed_paths(paths)
            rows.append((f"end-to-end featurize ({len(paths)} JPEGs, decode in worker)",
                         len(paths) / (time.perf_counter() - t0), float("nan")))
        finally:
            ext.close()
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
