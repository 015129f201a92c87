"""Colour constancy: remove the light source's colour cast before a model sees the image.

Shades of Gray (Finlayson & Trezzi 2004) with Minkowski norm p=6, the preprocessing the top
ISIC 2019 teams used: the illuminant estimate of each channel is the p-norm mean of its
pixels; each channel is scaled so that the estimate becomes neutral grey.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

COLOR_CONSTANCY = ("none", "shades_of_gray")


def shades_of_gray(img: Image.Image, p: float = 6.0) -> Image.Image:
    """The image with its illuminant (p-norm mean colour) mapped to grey, as 8-bit RGB."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64)
    illuminant = np.power(np.mean(np.power(rgb, p), axis=(0, 1)), 1.0 / p)
    norm = np.sqrt(np.sum(illuminant ** 2))
    if norm <= 0:  # an all-black image has no cast to remove
        return img.convert("RGB")
    gain = 1.0 / (np.maximum(illuminant / norm, 1e-6) * np.sqrt(3.0))
    return Image.fromarray(np.clip(np.round(rgb * gain), 0, 255).astype(np.uint8))


def apply_color_constancy(img: Image.Image, method: str) -> Image.Image:
    """``img`` under ``method`` (one of ``COLOR_CONSTANCY``).

    Raises:
        ValueError: ``method`` is not one of ``COLOR_CONSTANCY``.
    """
    if method == "none":
        return img
    if method == "shades_of_gray":
        return shades_of_gray(img)
    raise ValueError(f"unknown colour constancy {method!r}; expected one of {COLOR_CONSTANCY}")
