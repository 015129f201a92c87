"""``python -m featurize.download --dest DIR``: fetch the official HAM10000 files."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from lesionlab.cli import run_main
from lesionlab.data import default_data_dir
from lesionlab.download import BASE_URL, download_ham10000


def main(argv: Sequence[str] | None = None) -> int:
    """Download, unzip and validate HAM10000 into --dest."""
    p = argparse.ArgumentParser(prog="python -m featurize.download", description=__doc__)
    p.add_argument("--dest", type=Path, default=default_data_dir())
    p.add_argument("--base-url", default=BASE_URL, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    ds = download_ham10000(args.dest, base_url=args.base_url, timeout=args.timeout)
    print(f"{args.dest}: {len(ds)} images, {ds.frame['lesion_id'].nunique()} lesions")
    return 0


if __name__ == "__main__":
    run_main(main)
