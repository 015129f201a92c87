"""``python -m featurize --backbone NAME``: compute (or reuse) cached embeddings."""

from __future__ import annotations

import argparse
from typing import Sequence

from lesionlab.cli import add_data_args, resolve_data, run_main
from lesionlab.download import ensure_data
from lesionlab.splits import load_or_make_split


def list_backbones() -> None:
    """Print the known offline backbones, their default input size and weight availability."""
    from featurize.backbones import (CLASSICAL, OFFLINE_WEIGHTS, default_image_size,
                                     weights_available)

    print(f"{'backbone':28s} {'H x W':>10s}  weights here")
    for name in [*OFFLINE_WEIGHTS, "convnext_small", "resnet50", "efficientnet_b0", CLASSICAL]:
        h, w = default_image_size(name)
        here = "yes" if weights_available(name) else "no (needs hub)"
        print(f"{name:28s} {h:>4d} x {w:<4d}  {here}")
    print("Any timm model name is accepted; hub weights need a network or a --weights file.")


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for the featurize entry point."""
    p = argparse.ArgumentParser(prog="python -m featurize", description=__doc__)
    p.add_argument("--backbone", help="timm model name, or 'classical'")
    p.add_argument("--list", action="store_true", help="list backbones and exit")
    p.add_argument("--weights", default=None,
                   help="local checkpoint instead of packaged/hub weights")
    p.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"), default=None)
    p.add_argument("--tta", default="none", help="none | flip | d4")
    p.add_argument("--pool", default="avg", help="avg | multistage")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--engine", default="auto", help="auto | eager | onnx (CPU)")
    p.add_argument("--num-workers", type=int, default=1, help="image decoding workers")
    p.add_argument("--chunk-size", type=int, default=1024, help="images per resumable chunk")
    add_data_args(p, seed=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run the cached extraction."""
    args = build_parser().parse_args(argv)
    if args.list:
        list_backbones()
        return 0
    if not args.backbone:
        build_parser().error("--backbone is required (or --list)")
    from featurize.extract import FeaturizeConfig, featurize

    dataset = ensure_data(resolve_data(args))
    load_or_make_split(dataset, args.workdir, args.seed)
    cfg = FeaturizeConfig(backbone=args.backbone, image_size=args.image_size, tta=args.tta,
                          pool=args.pool, weights=args.weights, batch_size=args.batch_size,
                          device=args.device, engine=args.engine, num_workers=args.num_workers,
                          chunk_size=args.chunk_size)
    fs = featurize(dataset, args.workdir, cfg)
    man = fs.manifest
    print(f"{fs.path}  {fs.features.shape[0]} x {fs.features.shape[1]}  "
          f"engine={man['runtime']['engine']}  wall={man['wall_time_s']}s  "
          f"img/s={man['images_per_s']}")
    return 0


if __name__ == "__main__":
    run_main(main)
