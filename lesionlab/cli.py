"""Common CLI options and the entry-point wrapper that turns user errors into one line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from lesionlab.artifacts import DEFAULT_WORKDIR
from lesionlab.data import default_data_dir
from lesionlab.errors import LesionLabError


def add_data_args(parser: argparse.ArgumentParser, *, seed: bool = True) -> None:
    """Add ``--data``, ``--workdir`` and (optionally) ``--seed``, shared by every entry point."""
    parser.add_argument("--data", type=Path, default=None,
                        help="HAM10000 folder (default: $LESIONLAB_DATA, else ./data/ham10000)")
    parser.add_argument("--workdir", type=Path, default=Path(DEFAULT_WORKDIR),
                        help="folder for all artifacts (default: ./runs)")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="split / model seed (default 0)")


def resolve_data(args: argparse.Namespace) -> Path:
    """The data folder the user asked for, or the default."""
    return Path(args.data) if args.data is not None else default_data_dir()


def one_line(exc: LesionLabError) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it."""
    msg = str(exc).strip()
    if "Original Traceback" in msg:  # torch re-raises worker errors with the traceback text
        msg = msg.splitlines()[-1].split("LesionLabError: ", 1)[-1]
    return msg


def run_main(main: Callable[[Sequence[str] | None], int | None],
             argv: Sequence[str] | None = None) -> None:
    """Run ``main``; a ``LesionLabError`` prints ``error: ...`` on one line and exits 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        code = main(argv)
    except LesionLabError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
