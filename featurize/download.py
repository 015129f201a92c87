"""``python -m featurize.download --data DIR``: fetch, unzip and verify the HAM10000 files.

``--check-only`` verifies a folder already there (e.g. a downscaled copy, with
``--image-size 200x150``) without downloading anything.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Sequence

from lesionlab.cli import (
    add_config_args, add_data_args, config_from_args, make_parser, option, resolve_data, run_main)
from lesionlab.download import (
    ACCEPTED_IMAGE_SIZES, BASE_URL, Release, download_ham10000, format_size, parse_size,
    verify_release)


@dataclass(frozen=True)
class DownloadConfig:
    """Options of the download entry point (its flags)."""

    http_timeout: float = option(
        60.0, "seconds to wait for the server before a download counts as failed", gt=0)
    image_size: str = option(
        format_size(ACCEPTED_IMAGE_SIZES[0]), "WIDTHxHEIGHT every image must decode at: "
        "600x450 for the official zips; 200x150 for a copy downscaled by 3",
        choices=[format_size(s) for s in ACCEPTED_IMAGE_SIZES])
    check_only: bool = option(
        False, "only verify the files already in --data (metadata sha256, counts, every image "
        "decoded at --image-size); download nothing")


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the download entry point."""
    p = make_parser("python -m featurize.download", __doc__)
    add_config_args(p, DownloadConfig)
    add_data_args(p, workdir=False)
    p.add_argument("--base-url", default=BASE_URL, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Download (unless --check-only), unzip and verify HAM10000 into --data."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(DownloadConfig, args)
    dest = resolve_data(args)
    release = Release(image_size=parse_size(cfg.image_size))
    if cfg.check_only:
        ds = verify_release(dest, release)
    else:
        ds = download_ham10000(dest, base_url=args.base_url, http_timeout=cfg.http_timeout,
                               release=release)
    print(f"{dest}: {len(ds)} images, {ds.frame['lesion_id'].nunique()} lesions, all "
          f"{cfg.image_size}, metadata sha256 {release.metadata_sha256[:12]}... as published")
    return 0


if __name__ == "__main__":
    run_main(main)
