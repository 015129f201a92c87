"""``python -m models.explain --model DIR IMAGE... --out DIR``: Grad-CAM overlays (PNG).

Grad-CAM (Selvaraju et al., 2017) on the last feature map of a fine-tuned timm CNN: channel
weights are the spatially averaged gradients of the class score; the map is their weighted
sum, ReLU'd, upsampled to the input size and scaled to [0, 1].
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from featurize.color import apply_color_constancy
from featurize.extract import eval_tensor
from lesionlab.cli import (command_parser, config_from_args, device_option, model_option,
                           option, run_main, save_config)
from lesionlab.data import KNOWN_CLASSES
from lesionlab.images import crop_box, crop_to_aspect, model_aspect, read_image
from lesionlab.errors import LesionLabError
from models.bundle import ModelCard
from models.folder import NetworkFolder, load_model_folder
from models.shipped import default_model_folder


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
    """Blend a jet-coloured map over the image (resized to the map's size).

    Args:
        img: the RGB image.
        cam: (H, W) class activation map in [0, 1].
        alpha: the map's weight in the blend, in [0, 1].

    Returns:
        An (H, W) RGB image (the map's size).
    """
    from matplotlib import colormaps

    base = np.asarray(img.resize((cam.shape[1], cam.shape[0]), Image.BICUBIC), np.float32) / 255
    heat = colormaps["jet"](cam)[..., :3]
    return Image.fromarray(np.uint8(255 * ((1 - alpha) * base + alpha * heat)))


def overlay_names(paths: Sequence[str]) -> list[str]:
    """``<stem>_gradcam.png`` per image; repeated stems get ``-2``, ``-3``... (never overwrite)."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        stem = Path(path).stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}_gradcam.png" if seen[stem] == 1 else
                     f"{stem}-{seen[stem]}_gradcam.png")
    return names


def explain_one(model: nn.Module, card: ModelCard, spec, path: str, dest: Path | BinaryIO,
                target: int | None) -> dict:
    """Grad-CAM overlay of one image written to ``dest``; returns what was explained.

    The overlay is the whole upright image (EXIF orientation applied), of its size; the
    model sees its centre crop to the model's input aspect (``lesionlab.images``), so the
    map covers that box and is zero outside it.

    Raises:
        LesionLabError: the image does not read (see :func:`lesionlab.images.read_image`).
    """
    img = read_image(path)  # upright, uncropped: the overlay is drawn on the image as given
    aspect = model_aspect(card.details.input_aspect, f"model {card.name}")
    box, crop = crop_box(img.size, aspect), crop_to_aspect(img, aspect, path)
    seen = apply_color_constancy(crop, card.config.color_constancy)  # what the model sees
    size = tuple(card.config.image_size)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    x = eval_tensor(seen, size, mean, std, spec.interpolation)[None]
    cam, cls, proba = grad_cam(model, x.to(next(model.parameters()).device), target)
    big = np.zeros((img.height, img.width), np.float32)  # (H, W), in [0, 1]
    big[box[1]:box[3], box[0]:box[2]] = np.asarray(
        Image.fromarray(np.uint8(cam * 255)).resize(crop.size, Image.BILINEAR), np.float32) / 255
    overlay(img, big).save(dest, format="PNG")
    return {"path": str(path), "overlay": str(dest), "class": card.classes[cls],
            "probability": float(proba[cls])}


def gradcam_folder(model_dir: Path | str, device: str = "cpu") -> NetworkFolder:
    """The fine-tuned network Grad-CAM explains for a model folder (not loaded yet): the
    folder itself, an ensemble's network member with the largest weight (the map explains
    that member, not the average), or a stack's K-fold ensemble's.

    Raises:
        LesionLabError: the folder holds no fine-tuned network (a head on embeddings).
    """
    model = load_model_folder(model_dir, device)
    net = model.gradcam_network()
    if net is None:
        raise LesionLabError(
            f"Grad-CAM needs a fine-tuned network; {model_dir} holds a {model.card.kind!r} "
            f"model without one ({model.no_gradcam})")
    return net


def network_folder(model_dir: Path | str) -> Path:
    """The folder of the fine-tuned network Grad-CAM explains (see :func:`gradcam_folder`)."""
    return gradcam_folder(model_dir).path


def explain_images(model_dir: Path | str, paths: Sequence[str], out: Path | str,
                   target: str | None = None, device: str = "cpu") -> list[dict]:
    """Write one overlay PNG per image; an unreadable image gets ``{"path", "error"}``.

    Each result's ``class`` is ``target`` or, without one, the model's prediction, and its
    ``probability`` is the model's for that class: both exactly what ``models.predict`` prints
    for the image (calibrated, the model's test-time views; an export's ONNX network, an
    ensemble's average), not the single uncalibrated view the map's own forward pass takes.

    Raises:
        LesionLabError: the folder holds no fine-tuned network, ``target`` is not a class,
            or the network does not load.
    """
    from models.predict import Predictor

    classes = list(gradcam_folder(model_dir, device).card.classes)  # card only: no weights yet
    if target is not None and target not in classes:
        raise LesionLabError(f"unknown class {target!r}; expected one of {classes}")
    predictor = Predictor(model_dir, device)
    try:
        said = predictor.predict_images(list(paths))
        # the loaded network itself for a network folder or an ensemble's member; an export's
        # torch copy is loaded here
        net = predictor.cam.load()
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        return [_explain_line(net, path, out / name, line, target)
                for path, name, line in zip(paths, overlay_names(paths), said)]
    finally:
        predictor.close()


def _explain_line(net: NetworkFolder, path: str, dest: Path, line: dict,
                  target: str | None) -> dict:
    """One image's overlay and record, from predict's ``line`` for it (an error line passes
    through)."""
    if "error" in line:
        return line
    label = target or line["prediction"]
    try:
        res = explain_one(net.network, net.card, net.spec, path, dest,
                          list(net.card.classes).index(label))
    except LesionLabError as exc:
        return {"path": str(path), "error": str(exc)}
    res["probability"] = line["probabilities"][label]
    return res


@dataclass
class ExplainConfig:
    """What ``python -m models.explain`` explains and where; its flags come from these fields."""

    images: tuple[str, ...] = option(help="image files (JPEG or PNG, any size)",
                                     positional=True)
    out: Path = option(help="folder for the overlay PNGs (and the resolved config.yaml)",
                       parse=Path)
    model: Path | None = model_option("a fine-tuned model folder", shipped=True)
    target: str | None = option(None, "class to explain (one of the model's classes); None: "
                                      "the predicted one", choices=KNOWN_CLASSES)
    device: str = device_option()


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments, from ``ExplainConfig``."""
    return command_parser("python -m models.explain", __doc__, ExplainConfig)


def main(argv: Sequence[str] | None = None) -> int:
    """Write one overlay per image and print a JSON line for each; exit 1 if any failed."""
    args = config_from_args(ExplainConfig, build_parser().parse_args(argv))
    args.model = default_model_folder(args.model)
    from models.predict import print_results

    results = explain_images(args.model, list(args.images), args.out, args.target, args.device)
    code = print_results(results)
    save_config(args.out, args, "python -m models.explain")
    return code


if __name__ == "__main__":
    run_main(main)
