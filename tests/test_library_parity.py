"""Library code in place of hand-written code gives the very same numbers.

Each test keeps the hand-written version it replaced (``old_*``, verbatim) and compares it
with the code now used, on the fixture's images and labels: the ECE on the reliability
curve's bins, scikit-learn's ``OneHotEncoder`` for the metadata one-hot, ``timm.utils.freeze``
for frozen stages, and timm's ``create_transform`` for the eval transform.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from featurize.color import apply_color_constancy
from featurize.extract import ImagePathDataset, eval_tensor
from lesionlab.data import load_dataset, load_rgb
from lesionlab.metrics import expected_calibration_error, reliability_curve
from models.design import LOCALIZATIONS, SEXES, metadata_matrix
from tests.conftest import FIXTURE


def old_expected_calibration_error(y_true, proba, n_bins=15):
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def old_metadata_matrix(frame):
    age = pd.to_numeric(frame.get("age", pd.Series(np.nan, index=frame.index)),
                        errors="coerce").to_numpy(dtype=float)
    cols = [age[:, None]]
    names = ["age"]
    sex = frame.get("sex", pd.Series(index=frame.index, dtype=object)).astype(str).str.lower()
    loc = frame.get("localization", pd.Series(index=frame.index, dtype=object)).astype(
        str).str.lower()
    for value in SEXES:
        cols.append((sex == value).to_numpy(dtype=float)[:, None])
        names.append(f"sex={value}")
    for value in LOCALIZATIONS:
        cols.append((loc == value).to_numpy(dtype=float)[:, None])
        names.append(f"loc={value}")
    return np.hstack(cols), names


def old_freeze_stages(model, n):
    if n <= 0:
        return
    blocks = list(getattr(model, "blocks", []))
    for module in [getattr(model, m) for m in ("conv_stem", "bn1") if hasattr(model, m)]:
        module.requires_grad_(False)
    for block in blocks[:n]:
        block.requires_grad_(False)


def old_eval_tensor(img, size, mean, std, interpolation="bicubic"):
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR,
                "nearest": Image.NEAREST}.get(interpolation, Image.BICUBIC)
    img = img.resize((size[1], size[0]), resample)
    arr = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    return (arr - mean) / std


@pytest.fixture(scope="module")
def fixture_frame() -> pd.DataFrame:
    return load_dataset(FIXTURE).frame


def test_one_ece_same_as_before(fixture_frame: pd.DataFrame) -> None:
    y = fixture_frame["label"].to_numpy()
    rng = np.random.default_rng(0)
    cases = [rng.dirichlet(np.full(7, a), len(y)) for a in (0.1, 0.5, 1.0, 5.0)]
    onehot = np.eye(7)[y]
    cases += [onehot, np.roll(onehot, 1, axis=1),  # confidence exactly 1: the last bin
              np.full((len(y), 7), 1 / 7),
              np.eye(7)[y] * 0.6 + 0.4 / 7,  # every row on one confidence
              rng.dirichlet(np.ones(7), len(y)).astype(np.float32)]
    for proba in cases:
        for n_bins in (15, 10, 1):
            new = expected_calibration_error(y, proba, n_bins)
            assert new == old_expected_calibration_error(y, proba, n_bins)
            curve = reliability_curve(y, proba, n_bins)
            assert sum(curve["count"]) == len(y)
    assert expected_calibration_error(y, onehot) == 0.0
    assert expected_calibration_error(y, np.roll(onehot, 1, axis=1)) == 1.0
    assert expected_calibration_error(y[:0], onehot[:0]) == 0.0


def test_metadata_one_hot_same_as_before(fixture_frame: pd.DataFrame) -> None:
    odd = pd.DataFrame({"age": [45, None, "x", 130.5, 0],
                        "sex": ["Male", "unknown", None, "", "FEMALE"],
                        "localization": ["Lower Extremity", "nowhere", np.nan, "acral",
                                         "upper extremity"]}, index=[9, 3, 7, 1, 0])
    frames = [fixture_frame, fixture_frame.drop(columns=["sex"]),
              fixture_frame.drop(columns=["age", "sex", "localization"]), odd, odd.iloc[:1],
              odd.iloc[:0]]
    for frame in frames:
        new, names = metadata_matrix(frame)
        old, old_names = old_metadata_matrix(frame)
        assert names == old_names and len(names) == 17
        assert new.dtype == old.dtype == np.float64 and new.shape == old.shape
        np.testing.assert_array_equal(new, old)  # NaN ages equal NaN
    new, _ = metadata_matrix(odd)
    assert new[:, 1:3].tolist() == [[1, 0], [0, 0], [0, 0], [0, 0], [0, 1]]
    assert new[0, 3 + LOCALIZATIONS.index("lower extremity")] == 1 and new[1, 3:].sum() == 0


def _bn_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _bn_in_eval(model: nn.Module) -> list[str]:
    return [n for n in _bn_names(model) if not model.get_submodule(n).training]


@pytest.mark.parametrize("n", [0, 1, 2, 4, 7])
def test_freeze_stages_same_as_before(n: int) -> None:
    import timm

    from models.finetune import freeze_stages, train_mode

    old = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=7)
    new = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=7)
    new.load_state_dict(old.state_dict())
    old_freeze_stages(old, n)
    freeze_stages(new, n)
    trainable = [k for k, p in new.named_parameters() if p.requires_grad]
    assert trainable == [k for k, p in old.named_parameters() if p.requires_grad]
    assert any(k.startswith("classifier") for k in trainable)
    assert not any(k.startswith(f"blocks.{i}.") for k in trainable for i in range(n))
    assert (n > 0) != any(k.startswith(("conv_stem", "bn1")) for k in trainable)
    train_mode(new), train_mode(old)
    frozen_bn = _bn_in_eval(new)
    expected = [k for k in _bn_names(new) if n and (
        k == "bn1" or (k.startswith("blocks.") and int(k.split(".")[1]) < n))]
    assert frozen_bn == _bn_in_eval(old) == expected and (len(expected) > 0) == (n > 0)
    # still BatchNorm layers: the state_dict keys (num_batches_tracked too) are unchanged, so
    # weights saved before and after load into either
    assert list(new.state_dict()) == list(old.state_dict())
    new.load_state_dict(old.state_dict())
    stats = {k: v.clone() for k, v in new.state_dict().items() if "running_mean" in k}
    new(torch.randn(2, 3, 64, 64))
    moved = {k for k, v in new.state_dict().items() if k in stats and not torch.equal(v, stats[k])}
    assert not moved & {f"{b}.running_mean" for b in frozen_bn}
    assert moved  # the unfrozen BatchNorm layers did update


def test_freeze_stages_refuses_too_many() -> None:
    import timm

    from lesionlab.errors import LesionLabError
    from models.finetune import freeze_stages

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=7)
    with pytest.raises(LesionLabError, match=r"--freeze-stages 8: the model has 7 blocks"):
        freeze_stages(model, 8)


@pytest.mark.parametrize("size, interpolation", [
    ((224, 224), "bicubic"), ((168, 224), "bicubic"), ((48, 64), "bilinear"),
    ((150, 200), "bicubic"), ((301, 257), "nearest"), ((96, 128), "lanczos")])
def test_eval_transform_same_as_before(fixture_frame: pd.DataFrame, size: tuple[int, int],
                                       interpolation: str) -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    mean_t, std_t = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    paths = fixture_frame["path"].tolist()
    ds = ImagePathDataset(paths, size, mean, std, interpolation=interpolation)
    for i, path in enumerate(paths):
        img = load_rgb(path)
        old = old_eval_tensor(img, size, mean_t, std_t, interpolation)
        new = ds[i][0]
        assert new.dtype == torch.float32 and new.shape == (3, *size)
        assert torch.equal(new, old), path
        assert torch.equal(eval_tensor(img, size, mean_t, std_t, interpolation), old)
    img = apply_color_constancy(load_rgb(paths[0]), "shades_of_gray")
    assert torch.equal(eval_tensor(img, size, mean, std, interpolation),
                       old_eval_tensor(img, size, mean_t, std_t, interpolation))
