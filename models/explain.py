"""``python -m models.explain --model DIR IMAGE... --out DIR``: Grad-CAM overlays (PNG).

Grad-CAM (Selvaraju et al., 2017) on the last feature map of a fine-tuned timm CNN: channel
weights are the spatially averaged gradients of the class score; the map is their weighted
sum, ReLU'd, upsampled to the input size and scaled to [0, 1].
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from featurize.extract import eval_tensor
from lesionlab.cli import run_main
from lesionlab.data import CLASSES, load_rgb
from lesionlab.errors import LesionLabError


def grad_cam(model: nn.Module, x: torch.Tensor, target: int | None = None
             ) -> tuple[np.ndarray, int, np.ndarray]:
    """Grad-CAM map (H x W, in [0, 1]) of one input ``x`` (1 x 3 x H x W) for class ``target``.

    Returns (map, explained class, softmax probabilities).
    """
    model.eval()
    x = x.detach().float()
    with torch.enable_grad():
        feats = model.forward_features(x)
        feats.retain_grad()
        logits = model.forward_head(feats)
        cls = int(logits.argmax(1)) if target is None else int(target)
        model.zero_grad(set_to_none=True)
        logits[0, cls].backward()
    weights = feats.grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * feats).sum(dim=1, keepdim=True)).detach()
    cam = nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    cam = cam[0, 0].numpy()
    span = cam.max() - cam.min()
    cam = (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)
    return cam, cls, torch.softmax(logits.detach(), 1)[0].numpy()


def overlay(img: Image.Image, cam: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Blend a jet-coloured map over the image (resized to the map's size)."""
    from matplotlib import colormaps

    base = np.asarray(img.resize((cam.shape[1], cam.shape[0]), Image.BICUBIC), np.float32) / 255
    heat = colormaps["jet"](cam)[..., :3]
    return Image.fromarray(np.uint8(255 * ((1 - alpha) * base + alpha * heat)))


def explain_images(model_dir: Path | str, paths: Sequence[str], out: Path | str,
                   target: str | None = None) -> list[dict]:
    """Write ``<out>/<stem>_gradcam.png`` for each image; return what was explained."""
    from models.finetune import load_finetuned

    model, card, spec = load_finetuned(model_dir, "cpu")
    if card["kind"] != "finetune":
        raise LesionLabError("Grad-CAM needs a fine-tuned model folder (kind 'finetune')")
    if target is not None and target not in CLASSES:
        raise LesionLabError(f"unknown class {target!r}; expected one of {list(CLASSES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = tuple(card["image_size"])
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    results = []
    for path in paths:
        img = load_rgb(path)
        cam, cls, proba = grad_cam(model, eval_tensor(img, size, mean, std)[None],
                                   None if target is None else CLASSES.index(target))
        dest = out / f"{Path(path).stem}_gradcam.png"
        big = np.asarray(Image.fromarray(np.uint8(cam * 255)).resize(img.size, Image.BILINEAR),
                         np.float32) / 255
        overlay(img, big).save(dest)
        results.append({"path": str(path), "overlay": str(dest), "class": CLASSES[cls],
                        "probability": float(proba[cls])})
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Write one overlay per image and print a JSON line for each."""
    p = argparse.ArgumentParser(prog="python -m models.explain", description=__doc__)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--target", default=None, help="class to explain (default: predicted)")
    args = p.parse_args(argv)
    for res in explain_images(args.model, args.images, args.out, args.target):
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    run_main(main)
