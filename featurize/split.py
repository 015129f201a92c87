"""``python -m featurize.split``: make (or show) the lesion-grouped train/val/test split."""

from __future__ import annotations

import argparse
from typing import Sequence

from lesionlab.cli import add_data_args, make_parser, ranged, resolve_data, run_main
from lesionlab.download import ensure_data
from lesionlab.splits import class_counts, load_or_make_split, split_path


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the split entry point."""
    p = make_parser("python -m featurize.split", __doc__)
    add_data_args(p)
    p.add_argument("--split-seed", type=ranged(int, ge=0, le=2**32 - 1), default=0,
                   help="seed of the split")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Create or load the split and print per-split class counts."""
    args = build_parser().parse_args(argv)
    dataset = ensure_data(resolve_data(args))
    split = load_or_make_split(dataset, args.workdir, args.split_seed)
    print(f"split: {split_path(args.workdir, args.split_seed)}  ({len(dataset)} images, "
          f"{dataset.frame['lesion_id'].nunique()} lesions)")
    print(class_counts(split).to_string())
    return 0


if __name__ == "__main__":
    run_main(main)
