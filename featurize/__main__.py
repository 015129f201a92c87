"""``python -m featurize --backbone NAME``: compute (or reuse) cached embeddings."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Sequence

from lesionlab.cli import (add_config_args, add_data_args, config_from_args, label_options,
                           make_parser, option, resolve_data, run_main)
from lesionlab.download import ensure_data


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


@dataclass
class FeaturizeRunOptions:
    """The flags of ``python -m featurize`` beyond ``FeaturizeConfig`` and the data."""

    list: bool = option(False, "list backbones and exit", switch=True)


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for the featurize entry point (flags from ``FeaturizeConfig``
    and ``FeaturizeRunOptions``)."""
    from featurize.extract import FeaturizeConfig

    p = make_parser("python -m featurize", __doc__)
    add_config_args(p, FeaturizeRunOptions)
    add_config_args(p, FeaturizeConfig, optional=("backbone",))
    add_data_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run the cached extraction."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        list_backbones()
        return 0
    if not args.backbone:
        parser.error("--backbone is required (or --list)")
    from featurize.extract import FeaturizeConfig, featurize

    cfg = config_from_args(FeaturizeConfig, args)
    dataset = ensure_data(resolve_data(args), **label_options(args))
    fs = featurize(dataset, args.workdir, cfg)
    man = fs.manifest
    print(f"{fs.path}  {fs.features.shape[0]} x {fs.features.shape[1]}  "
          f"engine={man['runtime']['engine']}  wall={man['wall_time_s']}s  "
          f"img/s={man['images_per_s']}")
    return 0


if __name__ == "__main__":
    run_main(main)
