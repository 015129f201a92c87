"""``python -m featurize.download --data DIR``: fetch, unzip and verify the HAM10000 files."""

from __future__ import annotations

import argparse
from typing import Sequence

from lesionlab.cli import add_data_args, make_parser, ranged, resolve_data, run_main
from lesionlab.download import BASE_URL, download_ham10000


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the download entry point."""
    p = make_parser("python -m featurize.download", __doc__)
    add_data_args(p, workdir=False)
    p.add_argument("--base-url", default=BASE_URL, help=argparse.SUPPRESS)
    p.add_argument("--http-timeout", type=ranged(float, gt=0), default=60.0,
                   help="seconds to wait for the server before a download counts as failed")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Download, unzip and verify HAM10000 into --data."""
    args = build_parser().parse_args(argv)
    dest = resolve_data(args)
    ds = download_ham10000(dest, base_url=args.base_url, http_timeout=args.http_timeout)
    print(f"{dest}: {len(ds)} images, {ds.frame['lesion_id'].nunique()} lesions")
    return 0


if __name__ == "__main__":
    run_main(main)
