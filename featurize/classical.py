"""Hand-crafted dermoscopy features (scikit-image): colour, texture and lesion shape.

Colour: mean/std/skewness in RGB, HSV and Lab, plus 8-bin HSV histograms.
Texture: uniform LBP histogram and GLCM statistics.
Shape from an Otsu mask (lesion darker than skin): area ratio, compactness, asymmetry about
the principal axes, border irregularity (solidity and perimeter ratio to the convex hull).
Images are resized to a fixed size first, so 600x450 originals and 200x150 copies agree.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage, stats
from skimage import color, feature, filters, measure, morphology

FEATURE_NAMES: list[str] = (
    [f"{space}_{ch}_{m}" for space in ("rgb", "hsv", "lab") for ch in range(3)
     for m in ("mean", "std", "skew")]
    + [f"hsv_hist_{ch}_{b}" for ch in range(3) for b in range(8)]
    + [f"lbp_{b}" for b in range(10)]
    + [f"glcm_{p}" for p in ("contrast", "dissimilarity", "homogeneity", "energy",
                             "correlation", "ASM")]
    + ["area_ratio", "compactness", "asym_major", "asym_minor", "solidity",
       "perimeter_ratio", "eccentricity", "lesion_contrast"]
)


def _moments(pixels: np.ndarray) -> list[float]:
    out: list[float] = []
    for ch in range(pixels.shape[-1]):
        v = pixels[..., ch].ravel()
        sd = float(v.std())
        out += [float(v.mean()), sd, float(stats.skew(v)) if sd > 1e-8 else 0.0]
    return out


def _lesion_mask(gray: np.ndarray) -> np.ndarray:
    """Largest dark connected region from an Otsu threshold, holes filled."""
    smooth = filters.gaussian(gray, sigma=2)
    try:
        thr = filters.threshold_otsu(smooth)
    except ValueError:  # constant image
        return np.zeros_like(gray, dtype=bool)
    mask = smooth < thr
    mask = morphology.opening(mask, morphology.disk(2))
    labels = measure.label(mask)
    if labels.max() == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == sizes.argmax())


def _shape(mask: np.ndarray, gray: np.ndarray) -> list[float]:
    area = float(mask.sum())
    if area < 10:
        return [area / mask.size, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    props = measure.regionprops(mask.astype(np.uint8))[0]
    perim = max(props.perimeter, 1e-6)
    compact = float(4 * np.pi * area / perim**2)
    # Asymmetry: rotate the mask so the major axis is horizontal, flip about each axis.
    cy, cx = props.centroid
    shifted = ndimage.shift(mask.astype(float), (mask.shape[0] / 2 - cy, mask.shape[1] / 2 - cx),
                            order=0)
    rot = ndimage.rotate(shifted, -np.degrees(props.orientation) + 90, reshape=False,
                         order=0) > 0.5
    rot_area = max(rot.sum(), 1)
    asym_major = float((rot ^ rot[::-1, :]).sum() / (2 * rot_area))
    asym_minor = float((rot ^ rot[:, ::-1]).sum() / (2 * rot_area))
    hull = measure.regionprops(props.image_convex.astype(np.uint8))[0]
    perim_ratio = float(perim / max(hull.perimeter, 1e-6))
    inside, outside = gray[mask].mean(), gray[~mask].mean() if (~mask).any() else 0.0
    return [area / mask.size, compact, asym_major, asym_minor, float(props.solidity),
            perim_ratio, float(props.eccentricity), float(outside - inside)]


def classical_features(img: Image.Image, size: tuple[int, int] = (150, 200)) -> np.ndarray:
    """Feature vector (float32, len(FEATURE_NAMES)) for one RGB image resized to (H, W)."""
    img = img.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
    rgb = np.asarray(img, dtype=np.float64) / 255.0
    hsv = color.rgb2hsv(rgb)
    lab = color.rgb2lab(rgb)
    feats = _moments(rgb) + _moments(hsv) + _moments(lab)
    for ch in range(3):
        hist, _ = np.histogram(hsv[..., ch], bins=8, range=(0.0, 1.0))
        feats += (hist / hist.sum()).tolist()
    gray = color.rgb2gray(rgb)
    gray_u8 = (gray * 255).astype(np.uint8)
    lbp = feature.local_binary_pattern(gray_u8, P=8, R=1, method="uniform")
    hist, _ = np.histogram(lbp, bins=10, range=(0, 10))
    feats += (hist / hist.sum()).tolist()
    glcm = feature.graycomatrix(gray_u8 // 8, distances=[1, 3], levels=32, symmetric=True,
                                normed=True, angles=[0, np.pi / 4, np.pi / 2, 3 * np.pi / 4])
    for prop in ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM"):
        feats.append(float(np.nan_to_num(feature.graycoprops(glcm, prop)).mean()))
    feats += _shape(_lesion_mask(gray), gray)
    return np.asarray(feats, dtype=np.float32)
