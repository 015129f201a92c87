"""``python -m models.predict --model DIR IMAGE...``: one JSON line per image.

Features are computed with the same code path and settings that made the model's training
features (any image size); an unreadable image gets an error line, the others are predicted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from lesionlab.cli import run_main
from lesionlab.data import CLASS_NAMES, CLASSES, load_rgb
from lesionlab.errors import LesionLabError
from models.bundle import load_card, load_pipeline
from models.design import block_config, metadata_matrix


def head_features(card: dict, paths: Sequence[str], meta: pd.DataFrame | None,
                  device: str = "auto") -> np.ndarray:
    """Recompute a head model's input features for new images."""
    from featurize.extract import Extractor

    blocks = []
    for block in card["features"]:
        ext = Extractor(block_config(block, device=device, num_workers=0))
        try:
            if ext.spec.weights_sha256 != block["weights_sha256"]:
                raise LesionLabError(
                    f"backbone {block['backbone']} weights here ({ext.spec.weights_sha256[:12]}) "
                    f"differ from the ones the model was trained on "
                    f"({block['weights_sha256'][:12]})")
            blocks.append(ext.embed_paths(paths))
        finally:
            ext.close()
    if card["metadata"]:
        frame = meta if meta is not None else pd.DataFrame(index=range(len(paths)))
        blocks.append(metadata_matrix(frame.reset_index(drop=True))[0])
    return np.hstack(blocks).astype(np.float64)


def predict_proba(model_dir: Path | str, paths: Sequence[str],
                  meta: pd.DataFrame | None = None, device: str = "auto") -> np.ndarray:
    """Calibrated class probabilities (N x 7) of readable images ``paths``."""
    card = load_card(model_dir)
    if card["kind"] == "finetune":
        from models.finetune import predict_finetuned

        return predict_finetuned(model_dir, paths, device=device)
    model = load_pipeline(model_dir)
    return model.predict_proba(head_features(card, paths, meta, device))


def predict_images(model_dir: Path | str, paths: Sequence[str],
                   meta: pd.DataFrame | None = None, device: str = "auto") -> list[dict]:
    """One result dict per path, in order; unreadable images get an ``error`` entry."""
    results: list[dict] = [{"path": str(p)} for p in paths]
    ok = []
    for i, p in enumerate(paths):
        try:
            load_rgb(p)
            ok.append(i)
        except LesionLabError as exc:
            results[i]["error"] = str(exc)
    if ok:
        sub_meta = meta.iloc[ok] if meta is not None else None
        proba = predict_proba(model_dir, [str(paths[i]) for i in ok], sub_meta, device)
        for i, row in zip(ok, proba):
            code = CLASSES[int(row.argmax())]
            results[i].update({"prediction": code, "name": CLASS_NAMES[code],
                               "probabilities": {c: round(float(v), 6)
                                                 for c, v in zip(CLASSES, row)}})
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Print one JSON line per image; exit 1 if any image could not be read."""
    p = argparse.ArgumentParser(prog="python -m models.predict", description=__doc__)
    p.add_argument("--model", required=True, type=Path, help="a model folder (with card.json)")
    p.add_argument("images", nargs="+")
    p.add_argument("--age", type=float, default=None, help="for models trained with --metadata")
    p.add_argument("--sex", default=None)
    p.add_argument("--localization", default=None)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    meta = pd.DataFrame({"age": [args.age] * len(args.images),
                         "sex": [args.sex] * len(args.images),
                         "localization": [args.localization] * len(args.images)})
    results = predict_images(args.model, args.images, meta, args.device)
    for res in results:
        print(json.dumps(res))
        if "error" in res:
            print(f"error: {res['error']}", file=sys.stderr)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    run_main(main)
