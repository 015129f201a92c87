"""``python -m serve --model DIR``: the local web page and HTTP API over a model folder.

Binds 127.0.0.1 unless --host says otherwise. Model folders are trained models: serve only
folders you made or trust.
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from lesionlab.cli import command_parser, config_from_args, run_main
from lesionlab.errors import LesionLabError


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments: one flag per field of ``ServeConfig`` (ranges checked by argparse)."""
    from serve.app import ServeConfig

    return command_parser("python -m serve", __doc__, ServeConfig)


def main(argv: Sequence[str] | None = None) -> int:
    """Load the model folder, then serve until interrupted.

    Raises:
        LesionLabError: the model folder is missing or not a lesionlab model.
    """
    import uvicorn

    from models.shipped import default_model_folder
    from serve.app import ServeConfig, create_app

    cfg = config_from_args(ServeConfig, build_parser().parse_args(argv))
    cfg.model = default_model_folder(cfg.model)
    cfg.validate()
    if not (cfg.model / "card.json").is_file():
        raise LesionLabError(f"model folder not found or not a lesionlab model: {cfg.model}")
    app = create_app(cfg.model, cfg.device, cfg.max_mb, cfg.threads)
    logging.getLogger(__name__).info("serving %s on http://%s:%d", cfg.model, cfg.host,
                                     cfg.port)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    return 0


if __name__ == "__main__":
    run_main(main)
