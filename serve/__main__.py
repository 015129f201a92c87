"""``python -m serve --model DIR``: the local web page and HTTP API over a model folder.

Binds 127.0.0.1 unless --host says otherwise. Model folders are trained models: serve only
folders you made or trust.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from lesionlab.cli import make_parser, run_main
from lesionlab.errors import LesionLabError


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments."""
    from serve.app import DEFAULT_MAX_MB

    p = make_parser("python -m serve", __doc__)
    p.add_argument("--model", required=True, type=Path, help="a model folder (with card.json)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 0.0.0.0 serves every network interface")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--max-mb", type=float, default=DEFAULT_MAX_MB, help="upload size limit")
    p.add_argument("--threads", type=int, default=2, help="inference threads (bounded pool)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Load the model folder, then serve until interrupted."""
    import uvicorn

    from serve.app import create_app

    args = build_parser().parse_args(argv)
    if not (args.model / "card.json").is_file():
        raise LesionLabError(f"model folder not found or not a lesionlab model: {args.model}")
    app = create_app(args.model, args.device, args.max_mb, args.threads)
    logging.getLogger(__name__).info("serving %s on http://%s:%d", args.model, args.host,
                                     args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    run_main(main)
