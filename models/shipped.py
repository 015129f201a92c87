"""An exported network (``model.onnx``, made by ``models.export``) and the shipped model.

An exported folder is a fine-tuned network's folder made for inference: its card (the
network's, with an ``export`` record) and ``model.onnx``, run by ONNX Runtime on the CPU;
optionally ``model.pt``, the torch copy Grad-CAM back-propagates through. ``models.folder``
registers it as the ``onnx`` kind, so predict, evaluate, explain and the server load it like
any model folder. :func:`default_model_folder` is the model those commands use when no
``--model`` is given: the one shipped with lesionlab under ``pretrained/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from featurize.backbones import BackboneSpec
from featurize.extract import onnx_session
from lesionlab.card import ModelCard
from lesionlab.errors import LesionLabError
from models.bundle import verify_weights

ONNX_FILE = "model.onnx"
TORCH_FILE = "model.pt"
# the shipped model: an exported folder in the source tree (see README, Shipped model)
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "pretrained" / "lesionlab-lite0"


def default_model_folder(model: Path | str | None = None) -> Path:
    """``model`` when given, else the shipped model folder (:data:`SHIPPED_MODEL`).

    Raises:
        LesionLabError: no ``model`` is given and no shipped model is installed.
    """
    if model is not None:
        return Path(model)
    if not (SHIPPED_MODEL / "card.json").is_file():
        raise LesionLabError(f"no shipped model is installed ({SHIPPED_MODEL} has no "
                             f"card.json); pass --model FOLDER (a model folder you trained)")
    return SHIPPED_MODEL


def is_exported(card: ModelCard) -> bool:
    """Whether ``card`` is an exported network's (a fine-tuned network with an export
    record)."""
    return card.kind == "finetune" and isinstance(card.export, dict)


class OnnxNetwork(nn.Module):
    """An exported network's ONNX Runtime session as a torch module (CPU only): a
    (batch, 3, H, W) float32 batch in, (batch, n_classes) logits out, so the fine-tuned
    network's own prediction code (``models.finetune.network_proba``: preprocessing,
    test-time views, temperature) runs it unchanged.

    Args:
        session: an ``onnxruntime.InferenceSession`` on the exported graph (input ``x``).
    """

    def __init__(self, session) -> None:
        super().__init__()
        self.session = session
        # no weights of its own; torch code asks a module's parameters for its device
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, (batch, n_classes) float32, of a (batch, 3, H, W) batch."""
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {"x": batch})[0].astype(np.float32))


def load_onnx_network(folder: Path | str, card: ModelCard) -> OnnxNetwork:
    """The exported network of ``folder``, its ``model.onnx`` checked against the sha256
    its card recorded first.

    Raises:
        LesionLabError: ``model.onnx`` is missing, is not the file the card recorded, or
            ONNX Runtime cannot read it.
    """
    path = verify_weights(folder, ONNX_FILE, card)
    if ONNX_FILE not in card.files:
        raise LesionLabError(f"{Path(folder) / 'card.json'} records no sha256 of {ONNX_FILE}; "
                             f"export the model again (python -m models.export)")
    try:
        return OnnxNetwork(onnx_session(path))
    except Exception as exc:  # ONNX Runtime raises its own types for a bad graph
        raise LesionLabError(f"cannot load {path}: {str(exc).splitlines()[0][:200]}") from None


def card_spec(card: ModelCard) -> BackboneSpec:
    """The preprocessing a fine-tuned network's card records (size, mean, std,
    interpolation), without building the network."""
    d = card.details
    return BackboneSpec(name=card.name, image_size=tuple(card.config.image_size),
                        mean=tuple(d.mean), std=tuple(d.std),
                        weights_source=d.weights_source,
                        weights_sha256=card.files.get(ONNX_FILE, ""),
                        interpolation=d.interpolation or "bicubic")
