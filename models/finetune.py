"""``python -m models.finetune``: full fine-tuning of a timm backbone, the comparison point.

Same lesion-grouped split as the heads: train on train, pick the epoch by val balanced
accuracy (early stopping), calibrate the temperature on val, score test once. Checkpoints are
written atomically every epoch and ``--resume`` continues a killed run exactly. The loop has
the shape of torchvision's classification reference: ``train_one_epoch`` and ``evaluate``.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset as TorchDataset, WeightedRandomSampler
from tqdm import tqdm

from featurize.backbones import BackboneSpec, check_backbone, create_backbone
from featurize.color import COLOR_CONSTANCY, apply_color_constancy
from featurize.extract import TTA_MODES, ImagePathDataset, tta_views, view_mean_proba
from lesionlab import metrics
from lesionlab.artifacts import atomic_path, library_versions, save_npy, sha256_file
from lesionlab.cli import (add_config_args, check_choices, config_from_args, config_parser,
                           device_option, label_options, option, resolve_data, run_main,
                           safe_name, save_config)
from lesionlab.cli import TrackingOptions  # the MLflow flags
from lesionlab.card import require_kind
from lesionlab.card_blocks import FinetuneRecord, FinetuneSettings
from lesionlab.data import CLASSES, Dataset
from lesionlab.images import median_aspect, model_aspect, read_image
from lesionlab.device import DEVICES, PRECISIONS, resolve_device, use_bf16
from lesionlab.download import ensure_data
from lesionlab.errors import LesionLabError
from lesionlab.fingerprint import save_train_digests
from lesionlab.splits import load_or_make_split, split_indices
from models.bundle import (ModelCard, TrainingRun, claim_folder, load_card, model_name,
                           model_path, release_claims, save_card, summary_line,
                           verify_weights)
from models.distributed import (ShardedEpochSampler, World, broadcast, close_world,
                                gather_rng, init_world)
from models.batched_input import (PIPELINES, BatchedLoader, IndexSet, batch_augment,
                                  cached_proba, decoded_cache)
from models.finish import FinishInput, calibrated, finish
from models.heads import apply_temperature

if TYPE_CHECKING:  # torchvision costs 1.5-3 s to import (it loads torch._dynamo): only
    from torchvision.transforms import v2  # the commands that train import it

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.pt"
SAMPLERS = ("balanced", "none")
LOSSES = ("ce", "weighted_ce", "focal")
AUGMENTS = ("basic", "isic")


@dataclass
class FinetuneConfig(TrainingRun):
    """Settings of one fine-tuning run; the defaults are the study's CPU recipe (about 25 min
    for lite0 on a 2-core CPU with avx512_bf16)."""

    backbone: str = option("tf_efficientnet_lite0", "timm model name",
                           parse=lambda v: check_backbone(v))
    image_size: tuple[int, int] = option((150, 200), "training and evaluation (H, W), 4:3; "
                                                     "200x150 is the shared copy's own size",
                                         metavar=("H", "W"), ge=1)
    epochs: int = option(12, "most epochs to train", ge=1)
    batch_size: int = option(32, "images per step", ge=1)
    lr: float = option(5e-4, "peak learning rate of the backbone", gt=0)
    head_lr_mult: float = option(10.0, "the new classifier's learning rate is this x --lr", gt=0)
    weight_decay: float = option(1e-4, "AdamW decay (none on norms and biases)", ge=0)
    warmup_epochs: float = option(1.0, "linear warm-up before the cosine decay", ge=0)
    drop_rate: float = option(0.2, "dropout before the classifier", ge=0, lt=1)
    augment: str = option("isic", "training augmentation", choices=AUGMENTS)
    sampler: str = option("balanced", "class-balanced sampling of training images",
                          choices=SAMPLERS)
    loss: str = option("ce", "training loss", choices=LOSSES)
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy", ge=0, lt=1)
    train_fraction: float = option(1.0, "lesion-grouped fraction of train to use", gt=0, le=1)
    patience: int | None = option(None, "stop after this many epochs without a better val "
                                        "score; None: the schedule always finishes (its "
                                        "low-LR tail is where fine-tuning gains most)",
                                  parse=lambda v: None if v in ("None", "none") else int(v), ge=1)
    freeze_stages: int = option(2, "keep the stem and the first N blocks frozen (BatchNorm "
                                   "statistics too); 0: train everything", ge=0)
    histo_weight: float = option(1.0, "loss weight of histopathology-confirmed images "
                                      "(dx_type 'histo'); dx_type is never an input", gt=0)
    mixup: float = option(0.0, "MixUp alpha (Zhang et al., ICLR 2018): each batch blended "
                               "with itself rolled by one image, the weight drawn from "
                               "Beta(alpha, alpha); 0: off", ge=0)
    cutmix: float = option(0.0, "CutMix alpha (Yun et al., ICCV 2019); with --mixup too, each "
                                "batch gets one of the two at random; 0: off", ge=0)
    ema_decay: float = option(0.0, "weight EMA decay (timm's ModelEmaV3 with its warm-up); "
                                   "val, the chosen epoch and the saved network use the "
                                   "averaged weights; 0: off", ge=0, lt=1)
    distill_targets: str | None = option(None, "soft-target CSV to distil from (image_id and "
                                               "one probability column per class; python -m "
                                               "models.distill writes it from a teacher model "
                                               "folder); None: no distillation")
    distill_temperature: float = option(2.0, "distillation temperature T (Hinton et al. 2015)",
                                        gt=0)
    distill_weight: float = option(0.5, "weight of the teacher term; 1 - this weighs the hard "
                                        "labels' cross-entropy", ge=0, le=1)
    tta: str = option("flip", "test-time views at evaluation", choices=TTA_MODES)
    color_constancy: str = option("shades_of_gray", "colour constancy before training and "
                                                    "prediction (chosen on val: see the "
                                                    "ablation)", choices=COLOR_CONSTANCY)
    cv_folds: int = option(0, "K > 1: train on all lesion-grouped folds of train but one "
                              "(--cv-fold) and predict that fold out of fold; 0: all train", ge=0)
    cv_fold: int = option(0, "which of the --cv-folds folds is held out (0-based)", ge=0)
    seed: int = option(0, "model seed", ge=0, le=2**32 - 1)
    split_seed: int | None = option(None, "seed of the train/val/test split; None: --seed",
                                     ge=0, le=2**32 - 1)
    device: str = device_option()
    num_workers: int = option(2, "image decoding worker processes", ge=0)
    precision: str = option("auto", "CPU arithmetic; auto: bf16 autocast where the CPU has "
                                    "avx512_bf16 or AMX, else fp32 (CUDA: fp16 AMP)",
                            choices=PRECISIONS)
    weights: str | None = option(None, "local checkpoint instead of packaged/hub weights")
    name: str | None = option(None, "model folder name; None: made from the settings",
                              parse=safe_name)
    n_boot: int = option(1000, "bootstrap resamples for the test CIs", ge=0)
    input_pipeline: str = option("workers", "training input: decode + augment in worker "
                                            "processes, or batched (decoded once into a "
                                            "cache, augmented on the device per batch: the "
                                            "GPU path; isic augmentation only)",
                                 choices=PIPELINES)

    def validate(self) -> None:
        """Reject unknown option values.

        Raises:
            LesionLabError: an option outside its choices, ``--epochs`` under 1, a negative
                ``--freeze-stages``, a ``--histo-weight`` <= 0, ``--mixup`` / ``--cutmix``
                with the focal loss or a ``--histo-weight`` other than 1 (a mixed image has
                two targets and two weights), ``--distill-targets`` with another loss than
                ce or with mixing, or a ``--cv-folds`` / ``--cv-fold`` pair that names no
                fold.
        """
        check_choices(self)
        if (self.mixup or self.cutmix) and (self.loss == "focal" or self.histo_weight != 1.0):
            raise LesionLabError("--mixup and --cutmix mix two images' targets: they work with "
                                 "--loss ce or weighted_ce and --histo-weight 1 only")
        if self.distill_targets and (self.loss != "ce" or self.mixup or self.cutmix):
            raise LesionLabError("distillation (--teacher, --distill-targets) brings its own "
                                 "loss, the teacher term + cross-entropy: use --loss ce (any "
                                 "--sampler) and no --mixup/--cutmix")
        if self.input_pipeline == "batched" and self.augment != "isic":
            raise LesionLabError(f"--input-pipeline batched implements the isic augmentation "
                                 f"only, not {self.augment!r}; use --input-pipeline workers")
        if self.epochs < 1:
            raise LesionLabError("--epochs must be at least 1")
        if self.freeze_stages < 0 or self.histo_weight <= 0:
            raise LesionLabError("--freeze-stages must be >= 0 and --histo-weight > 0")
        if self.cv_folds == 1 or self.cv_folds < 0 or (
                self.cv_folds and not 0 <= self.cv_fold < self.cv_folds):
            raise LesionLabError(f"--cv-folds must be 0 or >= 2 and --cv-fold in "
                                 f"[0, {max(self.cv_folds, 1) - 1}]")

    def model_name(self) -> str:
        """Default folder name from the defining settings."""
        h, w = self.image_size
        cc = "" if self.color_constancy == "shades_of_gray" else f"cc-{self.color_constancy}"
        aug = "" if self.augment == "isic" else f"aug-{self.augment}"
        frz = f"frz{self.freeze_stages}"
        histo = f"histo{self.histo_weight:g}" if self.histo_weight != 1.0 else ""
        cv = f"cv{self.cv_fold + 1}of{self.cv_folds}" if self.cv_folds else ""
        pipe = "" if self.input_pipeline == "workers" else self.input_pipeline
        mix = "-".join(f"{tag}{v:g}" for tag, v in (("mix", self.mixup), ("cut", self.cutmix),
                                                   ("ema", self.ema_decay)) if v)
        if self.distill_targets:
            stem = re.sub(r"[^A-Za-z0-9.-]+", "-", Path(self.distill_targets).stem)[:40]
            mix = "-".join(p for p in (mix, f"kd-{stem}-T{self.distill_temperature:g}-"
                                            f"a{self.distill_weight:g}") if p)
        return self.name or model_name("finetune", self.backbone, f"{h}x{w}", cc, aug,
                                       self.sampler, self.loss, frz, histo, mix,
                                       f"ep{self.epochs}", cv, pipe, *self.name_tail())


def train_transform(size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                    augment: str = "basic") -> v2.Compose:
    """Training augmentation: ``basic`` (right-angle turns, mild affine and jitter) or
    ``isic`` (what the ISIC 2018-2019 winners used: any rotation, scale and shear, stronger
    colour jitter, random erasing)."""
    from torchvision.transforms import v2

    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std))]
    crop = v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(1.15, 1.5), antialias=True)
    flips = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if augment == "isic":
        return v2.Compose([
            v2.RandomAffine(degrees=180, scale=(0.8, 1.2), shear=10), crop, *flips,
            v2.ColorJitter(0.3, 0.3, 0.3, 0.05), *tail,
            v2.RandomErasing(p=0.5, scale=(0.02, 0.15), value=0)])
    return v2.Compose([
        v2.RandomChoice([v2.Identity(), v2.RandomRotation((90, 90), expand=True),
                         v2.RandomRotation((180, 180)),
                         v2.RandomRotation((270, 270), expand=True)]),
        crop, *flips,
        v2.RandomAffine(degrees=15, translate=(0.05, 0.05), scale=(0.95, 1.05)),
        v2.ColorJitter(0.2, 0.2, 0.15, 0.02), *tail])


class TrainSet(TorchDataset):
    """Training images (read by :func:`lesionlab.images.read_image`: EXIF-oriented,
    centre-cropped to ``aspect``, width/height, None: 4:3; then colour constancy, then
    augmentation), with their labels."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, size: tuple[int, int],
                 mean: Sequence[float], std: Sequence[float],
                 color_constancy: str = "none", augment: str = "basic",
                 weights: np.ndarray | None = None, aspect: float | None = None) -> None:
        self.paths = list(paths)
        self.aspect = model_aspect(aspect)
        self.labels = labels
        self.weights = np.ones(len(self.paths), np.float32) if weights is None else weights
        self.color_constancy = color_constancy
        self.transform = train_transform(size, mean, std, augment)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, float]:
        img = apply_color_constancy(read_image(self.paths[i], self.aspect),
                                    self.color_constancy)
        return self.transform(img), int(self.labels[i]), float(self.weights[i])


class FocalLoss(nn.Module):
    """Multiclass focal loss (Lin et al. 2017), optional class weights."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image focal loss, (1 - p_t)^gamma * CE (Lin et al., ICCV 2017).

        Args:
            logits: (batch, n_classes) raw network outputs.
            target: (batch,) int64 class indices.

        Returns:
            (batch,) float32 losses (``reduction="none"``), class-weighted when ``weight`` is set.
        """
        logp = torch.log_softmax(logits.float(), dim=1)
        ce = nn.functional.nll_loss(logp, target, weight=self.weight, reduction="none")
        pt = logp.gather(1, target[:, None]).squeeze(1).exp()
        return (1 - pt) ** self.gamma * ce


class DistillLoss(nn.Module):
    """Knowledge distillation (Hinton, Vinyals and Dean 2015, "Distilling the knowledge in a
    neural network"), per image: ``(1 - weight) * CE(label, smoothed) + weight * T^2 *
    KL(teacher_T || student_T)``, where ``x_T`` is a softmax at temperature T (the teacher's
    probabilities re-tempered as ``softmax(log p / T)``); the T^2 keeps the teacher term's
    gradients on the scale of the hard term's.

    The target of a training item is its row in the training set (``epoch_loader`` gives
    row indices when distilling), which looks up its label and its teacher probabilities.

    Args:
        labels: (n_train,) int64 class indices of the training rows.
        teacher: (n_train, n_classes) the teacher's probabilities for them, rows summing to 1.
        temperature: T > 0.
        weight: the teacher term's weight in [0, 1].
        label_smoothing: of the hard labels' cross-entropy.
    """

    def __init__(self, labels: torch.Tensor, teacher: torch.Tensor, temperature: float,
                 weight: float, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("labels", labels.long())
        self.register_buffer("teacher_t", torch.softmax(
            torch.log(teacher.float().clamp_min(1e-8)) / temperature, dim=1))
        self.temperature, self.weight, self.label_smoothing = temperature, weight, label_smoothing

    def forward(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(batch, n_classes) logits and (batch,) training-row indices -> (batch,) losses."""
        z, t = logits.float(), self.temperature
        hard = nn.functional.cross_entropy(z, self.labels[rows], reduction="none",
                                           label_smoothing=self.label_smoothing)
        p = self.teacher_t[rows]
        soft = (p * (p.clamp_min(1e-12).log() - torch.log_softmax(z / t, dim=1))).sum(1)
        return (1 - self.weight) * hard + self.weight * t * t * soft


def read_soft_targets(path: str | Path, image_ids: Sequence[str],
                      classes: Sequence[str]) -> np.ndarray:
    """A teacher's probabilities for ``image_ids`` from a soft-target CSV: an ``image_id``
    column and one column per class, each row a probability vector (``models.distill``
    writes one).

    Returns:
        (n_images, n_classes) float32 in the order of ``image_ids`` and ``classes``.

    Raises:
        LesionLabError: the file cannot be read, lacks a class column or one of the images,
            repeats an image, or has a row that is not a probability vector (non-finite,
            negative, or not summing to 1 within 1e-3).
    """
    try:
        frame = pd.read_csv(path, dtype={"image_id": str}).set_index("image_id")
    except (OSError, ValueError, KeyError) as exc:
        raise LesionLabError(f"--distill-targets {path}: cannot read it as a soft-target CSV "
                             f"({str(exc).splitlines()[0][:120]})") from None
    lacking = [c for c in classes if c not in frame.columns]
    missing = pd.Index(image_ids).difference(frame.index)
    if lacking or len(missing) or frame.index.duplicated().any():
        raise LesionLabError(f"--distill-targets {path}: needs one row per training image and "
                             f"a column per class; missing classes {lacking}, "
                             f"{len(missing)} of {len(image_ids)} images missing, "
                             f"{int(frame.index.duplicated().sum())} repeated")
    p = frame.loc[list(image_ids), list(classes)].to_numpy(np.float64)
    bad = ~np.isfinite(p).all(1) | (p < 0).any(1) | (np.abs(p.sum(1) - 1) > 1e-3)
    if bad.any():
        raise LesionLabError(f"--distill-targets {path}: {int(bad.sum())} rows are not "
                             f"probability vectors (first: {image_ids[int(np.argmax(bad))]})")
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def make_loss(cfg: FinetuneConfig, counts: np.ndarray,
              teacher: tuple[np.ndarray, np.ndarray] | None = None) -> nn.Module:
    """The per-image training loss (``reduction="none"``: images carry their own weights);
    class weights are inverse frequency, normalised to mean 1.

    Args:
        cfg: the fine-tuning config (``loss``, ``sampler``, ``label_smoothing``, the
            ``distill_*`` settings).
        counts: (n_classes,) training images per class.
        teacher: with ``--distill-targets``, the training rows' (n_train,) labels and
            (n_train, n_classes) teacher probabilities: a :class:`DistillLoss`.

    Returns:
        A module mapping (batch, n_classes) logits and (batch,) targets (class indices, or
        training-row indices for :class:`DistillLoss`) to (batch,) losses.
    """
    if teacher is not None:
        return DistillLoss(torch.as_tensor(teacher[0]), torch.as_tensor(teacher[1]),
                           cfg.distill_temperature, cfg.distill_weight, cfg.label_smoothing)
    weight = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)),
                          dtype=torch.float32)
    if cfg.loss == "focal":
        return FocalLoss(2.0, weight if cfg.sampler == "none" else None)
    return nn.CrossEntropyLoss(weight=weight if cfg.loss == "weighted_ce" else None,
                               label_smoothing=cfg.label_smoothing, reduction="none")


def batch_mixer(cfg: FinetuneConfig, n_classes: int) -> Callable | None:
    """MixUp and/or CutMix on whole training batches (``torchvision.transforms.v2``), or
    None when both are off (the recipe).

    The draws come from torch's global generator, which the run seeds and its checkpoints
    store (as for dropout), so a run is reproducible and a resumed run draws the same. Label
    smoothing is applied by the loss on top of the mixed targets.

    Args:
        cfg: the fine-tuning config (``mixup`` and ``cutmix`` alphas; 0 is off).
        n_classes: the number of classes of the targets.

    Returns:
        A function mapping (batch, 3, H, W) float images and (batch,) int64 labels to the
        mixed images and (batch, n_classes) float target probabilities (rows sum to 1).
    """
    if not (cfg.mixup or cfg.cutmix):
        return None
    from torchvision.transforms import v2

    ops = ([v2.MixUp(alpha=cfg.mixup, num_classes=n_classes)] if cfg.mixup else [])
    ops += [v2.CutMix(alpha=cfg.cutmix, num_classes=n_classes)] if cfg.cutmix else []
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


def weight_ema(cfg: FinetuneConfig, model: nn.Module) -> nn.Module | None:
    """The exponential moving average of ``model``'s weights (timm's ``ModelEmaV3``, with its
    warm-up: decay ``1 - (1 + step)^(-2/3)`` capped at ``cfg.ema_decay``, so a short run
    averages over a short window), or None when ``cfg.ema_decay`` is 0."""
    if not cfg.ema_decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)


def sample_weights(frame, rows: np.ndarray, histo_weight: float) -> np.ndarray:
    """Per-image loss weights: ``histo_weight`` for histopathology-confirmed images, else 1.

    Gessert et al. (2020) weigh biopsy-confirmed labels up; ``dx_type`` only ever weighs the
    loss, it is never a model input (it is not known for a new image).

    Args:
        frame: (n_images, n_columns) the dataset's frame (``dx_type`` where known).
        rows: (n_rows,) row indices into ``frame``.
        histo_weight: the weight of a ``histo`` image, > 0.

    Returns:
        (n_rows,) float32 loss weights.
    """
    w = np.ones(len(rows), np.float32)
    if histo_weight != 1.0 and "dx_type" in frame.columns:
        w[frame["dx_type"].astype(str).to_numpy()[rows] == "histo"] = histo_weight
    return w


def freeze_stages(model: nn.Module, n: int) -> None:
    """Freeze the stem and the first ``n`` blocks: their weights here (``timm.utils.freeze``),
    their BatchNorm statistics in :func:`train_mode`.

    The BatchNorm layers stay ``BatchNorm2d`` (timm's ``FrozenBatchNorm2d`` would drop their
    ``num_batches_tracked`` entries from the saved weights and round differently).

    Raises:
        LesionLabError: ``n`` > 0 and the model has no ``blocks`` or fewer than ``n``.
    """
    from timm.utils import freeze

    if n <= 0:
        return
    blocks = list(getattr(model, "blocks", []))
    if not blocks or n > len(blocks):
        raise LesionLabError(f"--freeze-stages {n}: the model has {len(blocks)} blocks")
    stem = [name for name in ("conv_stem", "bn1") if hasattr(model, name)]
    freeze(model, stem + [f"blocks.{i}" for i in range(n)], include_bn_running_stats=False)


def train_mode(model: nn.Module) -> None:
    """``model.train()``, but frozen BatchNorm layers keep their ImageNet statistics."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in m.parameters()):
            m.eval()


def build_model(cfg: FinetuneConfig,
                n_classes: int = len(CLASSES)) -> tuple[nn.Module, BackboneSpec]:
    """Pretrained backbone with a fresh ``n_classes``-class head (the size of the data's class
    set; HAM10000's 7 by default) and dropout before it.

    The head is initialised from ``cfg.seed`` after the backbone is built, so its start does
    not depend on how many random draws building the backbone took.
    """
    model, spec = create_backbone(cfg.backbone, cfg.weights, num_classes=n_classes,
                                  drop_rate=cfg.drop_rate)
    torch.manual_seed(cfg.seed)
    model.reset_classifier(n_classes)
    freeze_stages(model, cfg.freeze_stages)
    return model, spec


def param_groups(model: nn.Module, cfg: FinetuneConfig) -> list[dict]:
    """timm's groups (no weight decay on norms and biases), split again: the head gets its LR."""
    from timm.optim import param_groups_weight_decay

    head = {id(p) for p in model.get_classifier().parameters()}
    groups = []
    for group in param_groups_weight_decay(model, cfg.weight_decay):
        for is_head, lr in ((False, cfg.lr), (True, cfg.lr * cfg.head_lr_mult)):
            params = [p for p in group["params"]
                      if (id(p) in head) == is_head and p.requires_grad]
            if params:
                groups.append({**group, "params": params, "lr": lr})
    return groups


def build_scheduler(opt: torch.optim.Optimizer, steps_per_epoch: int,
                    cfg: FinetuneConfig) -> torch.optim.lr_scheduler.SequentialLR:
    """Per-step linear warm-up, then cosine decay to zero at the last epoch."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    warm = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    total = max(warm + 1, cfg.epochs * steps_per_epoch)
    return SequentialLR(opt, [LinearLR(opt, 1.0 / warm, 1.0, total_iters=max(1, warm - 1)),
                              CosineAnnealingLR(opt, T_max=total - warm)], milestones=[warm])


def _autocast(device: torch.device, bf16: bool):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def train_loader(data: TorchDataset, labels: np.ndarray, cfg: FinetuneConfig, epoch: int,
                 world: World = World()) -> DataLoader:
    """This epoch's loader: seeded per epoch, so a resumed run draws the same batches.

    Under torchrun every rank draws the same epoch sample and trains on its own share.

    Args:
        data: the training images' dataset.
        labels: (n_train,) class indices, for the class-balanced sampler.
        cfg: the fine-tuning config.
        epoch: the epoch number, part of the seed.
        world: this process's rank and the number of processes.

    Returns:
        A loader of ((batch, 3, H, W) float images, (batch,) labels, (batch,) per-image loss
        weights).
    """
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    weights = None
    if cfg.sampler == "balanced":
        counts = np.bincount(labels, minlength=len(CLASSES))
        weights = torch.tensor(1.0 / counts[labels], dtype=torch.double)
    n = len(labels) // world.size
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                  drop_last=n > cfg.batch_size)
    if world.size > 1:
        sampler = ShardedEpochSampler(weights, len(labels), cfg.seed * 1000 + epoch, world)
        rank_gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + 7919 * world.rank)
        return DataLoader(data, sampler=sampler, generator=rank_gen, **common)
    if weights is not None:
        sampler = WeightedRandomSampler(weights, len(labels), replacement=True, generator=gen)
        return DataLoader(data, sampler=sampler, generator=gen, **common)
    return DataLoader(data, shuffle=True, generator=gen, **common)


def train_one_epoch(model: nn.Module, criterion: nn.Module, opt: torch.optim.Optimizer,
                    sched, loader: DataLoader, device: torch.device, bf16: bool,
                    desc: str, scaler: torch.amp.GradScaler | None = None,
                    mixer: Callable | None = None, ema: nn.Module | None = None) -> dict:
    """One pass over ``loader``; the scheduler steps per batch. Returns loss and speed.

    The loss is the weighted mean of per-image losses; on CUDA (fp16 autocast) a GradScaler
    keeps small gradients from underflowing. ``mixer`` (:func:`batch_mixer`) turns a batch
    and its labels into mixed images and target probabilities; ``ema`` (:func:`weight_ema`)
    is updated after every optimiser step, at the schedule's step count.
    """
    train_mode(model)
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    t0 = time.perf_counter()
    seen, loss_sum = 0, 0.0
    for x, target, weight in tqdm(loader, desc=desc, unit="batch", leave=False):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        target, weight = target.to(device), weight.to(device, torch.float32)
        if mixer is not None:
            x, target = mixer(x, target)
        with _autocast(device, bf16):
            per_image = criterion(model(x).float(), target)
        loss = (per_image * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        if ema is not None:  # the unwrapped network (DistributedDataParallel's .module)
            ema.update(getattr(model, "module", model), step=sched.last_epoch)
        seen += len(x)
        loss_sum += float(loss.detach()) * len(x)
    took = time.perf_counter() - t0
    return {"train_loss": loss_sum / max(seen, 1), "train_s": round(took, 1),
            "train_img_per_s": round(seen / took, 1)}


@torch.inference_mode()
def predict_proba(model: nn.Module, paths: Sequence[str], spec: BackboneSpec,
                  size: tuple[int, int], device: torch.device, tta: str = "none",
                  batch_size: int = 64, num_workers: int = 0, bf16: bool = False,
                  progress: bool = False, color_constancy: str = "none",
                  aspect: float | None = None) -> np.ndarray:
    """Softmax probabilities averaged over TTA views, with the deterministic eval transform
    (images centre-cropped to ``aspect``, width/height; None: 4:3).

    Args:
        model: the network (its outputs: (batch, n_classes) logits).
        paths: image files.
        spec: the backbone's normalisation and interpolation.
        size: (height, width) input size in pixels.
        device: where to run.
        tta: ``none``, ``flip`` or ``d4``.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        bf16: run under bfloat16 autocast.
        progress: show a progress bar.
        color_constancy: ``none`` or ``shades_of_gray``.
        aspect: width / height the images are centre-cropped to.

    Returns:
        (n_paths, n_classes) softmax probabilities, rows summing to 1 (uncalibrated).
    """
    model.eval()
    data = ImagePathDataset(paths, size, spec.mean, spec.std, interpolation=spec.interpolation,
                            color_constancy=color_constancy, aspect=aspect)
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers)
    out = []
    for x, _ in tqdm(loader, disable=not progress, desc="eval", unit="batch", leave=False):
        out.append(view_mean_proba(model, tta_views(x.to(device), tta),
                                   lambda: _autocast(device, bf16)))
    return np.concatenate(out) if out else np.zeros((0, len(CLASSES)))


def evaluate(model: nn.Module, paths: Sequence[str], labels: np.ndarray, spec: BackboneSpec,
             device: torch.device, cfg: FinetuneConfig, tta: str = "none",
             progress: bool = False, aspect: float | None = None) -> tuple[float, np.ndarray]:
    """Balanced accuracy and probabilities of ``model`` on labelled images (cropped to
    ``aspect``, the training images' median width/height; None: 4:3).

    Args:
        model: the network.
        paths: image files.
        labels: (n_paths,) class indices.
        spec: the backbone's normalisation.
        device: where to run.
        cfg: the fine-tuning config (image size, precision, colour constancy).
        tta: ``none``, ``flip`` or ``d4``.
        progress: show a progress bar.
        aspect: width / height the images are centre-cropped to.

    Returns:
        (balanced accuracy in [0, 1], (n_paths, n_classes) probabilities).
    """
    proba = predict_proba(model, paths, spec, cfg.image_size, device, tta=tta,
                          num_workers=cfg.num_workers, progress=progress,
                          bf16=use_bf16(cfg.precision, device),
                          color_constancy=cfg.color_constancy, aspect=aspect)
    return metrics.balanced_accuracy(labels, proba.argmax(1)), proba


def save_checkpoint(path: Path, cfg: FinetuneConfig, model: nn.Module,
                    opt: torch.optim.Optimizer, sched, state: dict,
                    rng: list[torch.Tensor], ema: nn.Module | None = None) -> None:
    """Everything a resume needs, written atomically: weights, optimiser, schedule, the RNG
    state of every process, the weight EMA's averaged weights (``--ema-decay``).

    Args:
        path: the checkpoint file.
        cfg: the config, checked on resume.
        model: the network.
        opt: the optimiser.
        sched: the learning-rate schedule.
        state: the loop state (epoch, best score, history).
        rng: one (n_bytes,) uint8 torch RNG state per process.
        ema: the weight EMA (:func:`weight_ema`), or None.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save({"config": asdict(cfg), "model": model.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "state": state, "torch_rng": rng,
                    "ema": None if ema is None else ema.module.state_dict()}, fh)


def load_checkpoint(path: Path, cfg: FinetuneConfig, model: nn.Module,
                    opt: torch.optim.Optimizer, sched, device: torch.device,
                    world: World = World(), ema: nn.Module | None = None) -> dict:
    """Restore a checkpoint into ``model``, ``opt``, ``sched`` (and the weight EMA ``ema``);
    returns the loop state.

    Loaded with ``weights_only=True``: a crafted file cannot run code.

    Raises:
        LesionLabError: the file cannot be loaded safely, was made with another config, or by
            another number of processes.
    """
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # a damaged or crafted file fails in many ways
        raise LesionLabError(f"cannot load checkpoint {path} safely: "
                             f"{str(exc).splitlines()[0][:200]}") from None
    if saved.get("config") != asdict(cfg):
        raise LesionLabError(f"checkpoint {path} was made with other settings; "
                             f"drop --resume or use another --name")
    if len(saved["torch_rng"]) != world.size:
        raise LesionLabError(f"checkpoint {path} was made by {len(saved['torch_rng'])} "
                             f"process(es); resume it with as many (now {world.size})")
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    if ema is not None:
        ema.module.load_state_dict(saved["ema"])
    torch.set_rng_state(saved["torch_rng"][world.rank].cpu())
    log.info("resumed %s at epoch %d", path.parent.name, saved["state"]["epoch"])
    return saved["state"]


@dataclass
class Run:
    """What the training loop works on: data, model and the optimisation objects.

    ``paths`` and ``labels`` are (n_images,), every image of the dataset; ``tr``, ``va``,
    ``te`` (n_train,), (n_val,), (n_test,) row indices into them; ``weights`` (n_train,)
    per-image loss weights; ``held`` (n_held,) the train rows a fold model never trains on.
    """

    cfg: FinetuneConfig
    model: nn.Module
    spec: BackboneSpec
    device: torch.device
    paths: np.ndarray
    labels: np.ndarray
    tr: np.ndarray
    va: np.ndarray
    te: np.ndarray
    criterion: nn.Module
    opt: torch.optim.Optimizer
    sched: object
    world: World = World()
    net: nn.Module | None = None  # what trains: the model, or its DistributedDataParallel
    weights: np.ndarray | None = None  # per-training-image loss weights (dx_type)
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling on CUDA, kept across epochs
    held: np.ndarray | None = None  # --cv-folds: the train rows this model never trains on
    aspect: float | None = None  # median width/height of the training images (its record's)
    cache: np.ndarray | None = None  # --input-pipeline batched: (n_images, H, W, 3) uint8
    mixer: Callable | None = None  # --mixup / --cutmix: batch_mixer
    ema: nn.Module | None = None  # --ema-decay: weight_ema; what val scores and fit keeps


def new_state() -> dict:
    """The loop state a checkpoint stores (plain types and tensors only)."""
    return {"epoch": 0, "best_score": -1.0, "best_epoch": 0, "best_state": None,
            "history": [], "bad_epochs": 0}


def fit(run: Run, state: dict, ckpt: Path,
        on_epoch_end: Callable[[int], None] | None = None) -> dict:
    """Train until the last epoch or early stop; keep the best val epoch's weights.

    Under torchrun the main process scores val and its score is shared, so every process
    stops at the same epoch; it alone writes the checkpoint. With ``--ema-decay`` the
    averaged weights are scored and kept.
    """
    cfg, world = run.cfg, run.world
    patience = cfg.patience if cfg.patience is not None else cfg.epochs
    while state["epoch"] < cfg.epochs and state["bad_epochs"] < patience:
        epoch = state["epoch"]
        record = train_one_epoch(run.net or run.model, run.criterion, run.opt, run.sched,
                                 epoch_loader(run, epoch), run.device,
                                 use_bf16(cfg.precision, run.device),
                                 f"epoch {epoch + 1}/{cfg.epochs}", run.scaler, run.mixer,
                                 run.ema)
        score = broadcast(val_score(run) if world.main else None, world)
        record["train_img_per_s"] = round(record["train_img_per_s"] * world.size, 1)
        update_state(state, scored_model(run), epoch, score, record)
        rng = gather_rng(world)
        if world.main:
            save_checkpoint(ckpt, cfg, run.model, run.opt, run.sched, state, rng, run.ema)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
    run.model.load_state_dict(state["best_state"])
    return state


def epoch_loader(run: Run, epoch: int):
    """This epoch's training batches: the worker pipeline's loader, or (``--input-pipeline
    batched``) the same sampler's batches gathered from the decoded cache and augmented on
    the device, the augmentation seeded by the model seed and the epoch (so a resumed run
    draws the same)."""
    cfg = run.cfg
    labels = run.labels[run.tr]
    # distilling, an item's target is its training row (DistillLoss looks up label + teacher)
    targets = np.arange(len(run.tr)) if cfg.distill_targets else labels
    weights = (np.ones(len(run.tr), np.float32) if run.weights is None else run.weights)
    if cfg.input_pipeline == "batched":
        torch.manual_seed(cfg.seed * 1000 + epoch + 1)
        index = train_loader(IndexSet(targets, weights), labels, replace(cfg, num_workers=0),
                             epoch, run.world)
        return BatchedLoader(index, run.cache, run.tr, batch_augment(
            cfg.image_size, run.spec.mean, run.spec.std, cfg.augment), run.device)
    data = TrainSet(run.paths[run.tr], targets, cfg.image_size, run.spec.mean, run.spec.std,
                    cfg.color_constancy, cfg.augment, weights, run.aspect)
    return train_loader(data, labels, cfg, epoch, run.world)


def scored_model(run: Run) -> nn.Module:
    """The weights val scores and the run keeps: the weight EMA's (``--ema-decay``), else the
    network's own."""
    return run.model if run.ema is None else run.ema.module


def val_score(run: Run) -> float:
    """Val balanced accuracy of the network now (one view), from the decoded cache when the
    run has one (the same probabilities as the eval transform's)."""
    cfg = run.cfg
    if run.cache is None:
        return evaluate(scored_model(run), run.paths[run.va].tolist(), run.labels[run.va],
                        run.spec, run.device, cfg, aspect=run.aspect)[0]
    bf16 = use_bf16(cfg.precision, run.device)
    proba = cached_proba(scored_model(run), run.cache, run.va, run.spec.mean, run.spec.std,
                         run.device, lambda x: tta_views(x, "none"),
                         lambda: _autocast(run.device, bf16))
    return metrics.balanced_accuracy(run.labels[run.va], proba.argmax(1))


def update_state(state: dict, model: nn.Module, epoch: int, score: float,
                 record: dict) -> None:
    """Record one epoch; keep the weights of the best val score so far."""
    state["history"].append({"epoch": epoch + 1, "train_loss": record["train_loss"],
                             "val_balanced_accuracy": score, "train_s": record["train_s"],
                             "train_img_per_s": record["train_img_per_s"]})
    if score > state["best_score"]:
        state.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0,
                     best_state={k: v.detach().cpu().clone()
                                 for k, v in model.state_dict().items()})
    else:
        state["bad_epochs"] += 1
    state["epoch"] = epoch + 1
    log.info("epoch %d: loss %.4f  val bal.acc %.4f  %.0f s (%.1f img/s)", epoch + 1,
             record["train_loss"], score, record["train_s"], record["train_img_per_s"])


def prepare(dataset: Dataset, workdir: Path | str, cfg: FinetuneConfig) -> tuple[Run, Path]:
    """Split, model, loss, optimiser and schedule for one run; returns it and its folder."""
    world = init_world(cfg.device)
    device = resolve_device(cfg.device)
    if world.backend == "nccl":
        device = torch.device("cuda", world.local_rank)
    tr, va, te, held = run_rows(dataset, workdir, cfg)
    folder = claim_folder(model_path(workdir, cfg.model_name()), "finetune",
                          inputs=[cfg.backbone], exclusive=world.main)  # the main one writes
    model, spec = build_model(cfg, len(dataset.classes))
    model = model.to(device).to(memory_format=torch.channels_last)
    net = None
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model, device_ids=[world.local_rank] if device.type == "cuda" else None)
    labels = dataset.labels
    criterion = make_loss(cfg, np.bincount(labels[tr], minlength=len(dataset.classes)),
                          teacher_targets(dataset, tr, cfg)).to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.weight_decay)
    steps = math.ceil(len(tr) // world.size / cfg.batch_size)
    sched = build_scheduler(opt, steps, cfg)
    run = Run(cfg, model, spec, device, dataset.frame["path"].to_numpy(), labels, tr, va, te,
              criterion, opt, sched, world, net,
              sample_weights(dataset.frame, tr, cfg.histo_weight),
              torch.amp.GradScaler(device.type, enabled=device.type == "cuda"), held,
              aspect=median_aspect(dataset.frame["path"].to_numpy()[tr].tolist()),
              mixer=batch_mixer(cfg, len(dataset.classes)), ema=weight_ema(cfg, model))
    if cfg.input_pipeline == "batched":
        run.cache = decoded_cache(run.paths.tolist(), cfg.image_size, workdir, run.aspect,
                                  cfg.color_constancy, spec.interpolation, cfg.num_workers)
    return run, folder


def run_rows(dataset: Dataset, workdir: Path | str, cfg: FinetuneConfig
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """A run's rows of ``dataset``: (n_train,) train (after ``--train-fraction`` and
    ``--cv-folds``), (n_val,) val, (n_test,) test, and the (n_held,) train rows a fold model
    holds out (None without ``--cv-folds``).

    Raises:
        LesionLabError: the errors of the split and of :func:`cv_rows`.
    """
    split = load_or_make_split(dataset, workdir, cfg.data_seed)
    tr, va, te = split_indices(dataset, split, cfg.train_fraction, cfg.data_seed)
    tr, held = cv_rows(dataset, tr, cfg)
    return tr, va, te, held


def teacher_targets(dataset: Dataset, tr: np.ndarray,
                    cfg: FinetuneConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """With ``--distill-targets``: the training rows' (n_train,) labels and (n_train,
    n_classes) teacher probabilities (:func:`read_soft_targets`); else None."""
    if not cfg.distill_targets:
        return None
    ids = dataset.frame["image_id"].astype(str).to_numpy()[tr]
    return dataset.labels[tr], read_soft_targets(cfg.distill_targets, ids, dataset.classes)


def cv_rows(dataset: Dataset, tr: np.ndarray,
            cfg: FinetuneConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows to train on, held-out rows or None): with ``--cv-folds K`` train is cut into K
    lesion-grouped, class-stratified folds (seeded by the split seed, so every fold model of
    a K-fold run sees the same folds) and fold ``--cv-fold`` is held out.

    Args:
        dataset: the labelled images.
        tr: (n_train,) train row indices into ``dataset``.
        cfg: the fine-tuning config (``cv_folds``, ``cv_fold``, ``data_seed``).

    Returns:
        ((n_fit,) rows to train on, (n_held,) held-out rows or None), indices into ``dataset``.

    Raises:
        LesionLabError: a class has fewer lesions than folds (see
            :func:`lesionlab.splits.grouped_folds`).
    """
    if not cfg.cv_folds:
        return tr, None
    from lesionlab.splits import grouped_folds

    groups = dataset.frame["lesion_id"].astype(str).to_numpy()
    fit, held = grouped_folds(dataset.labels[tr], groups[tr], cfg.cv_folds, cfg.data_seed,
                              f"{cfg.cv_folds}-fold fine-tuning", allow_fewer=False,
                              classes=dataset.classes)[cfg.cv_fold]
    return tr[fit], tr[held]


@release_claims
def finetune(dataset: Dataset, workdir: Path | str, cfg: FinetuneConfig, resume: bool = False,
             on_epoch_end: Callable[[int], None] | None = None) -> ModelCard | None:
    """Train, select by val, evaluate once on test; write the model folder; return its card.

    Under ``torchrun --nproc_per_node N -m models.finetune`` every process trains its share
    (DistributedDataParallel); only the main one returns a card, the others None.

    Raises:
        LesionLabError: bad options (:meth:`FinetuneConfig.validate`), a checkpoint that does
            not fit (``--resume``), or the errors of the split and data loading; any exception
            closes the process group first and is re-raised.
    """
    cfg.validate()
    t_start = time.perf_counter()
    run, folder = prepare(dataset, workdir, cfg)
    try:
        ckpt = folder / CHECKPOINT
        state = new_state()
        if resume and ckpt.exists():
            state = load_checkpoint(ckpt, cfg, run.model, run.opt, run.sched, run.device,
                                    run.world, run.ema)
        state = fit(run, state, ckpt, on_epoch_end)
        card = None
        if run.world.main:
            card = calibrate_and_test(run, state, dataset, folder, t_start)
            save_train_digests(folder, dataset, card.train_image_ids)
            save_card(folder, card)
    except BaseException:
        close_world(run.world, wait=False)
        raise
    close_world(run.world)
    return card


def calibrate_and_test(run: Run, state: dict, dataset: Dataset, folder: Path,
                       t_start: float) -> ModelCard:
    """The finishing step (temperature and melanoma threshold on val, the one look at test:
    ``models.finish``), weights and probabilities saved; returns the model's card."""
    cfg, paths, y = run.cfg, run.paths, run.labels
    _, proba_va = evaluate(run.model, paths[run.va].tolist(), y[run.va], run.spec, run.device,
                           cfg, tta=cfg.tta, aspect=run.aspect)
    t_eval = time.perf_counter()
    _, raw_te = evaluate(run.model, paths[run.te].tolist(), y[run.te], run.spec, run.device,
                         cfg, tta=cfg.tta, progress=True, aspect=run.aspect)
    eval_s = time.perf_counter() - t_eval
    groups = dataset.frame["lesion_id"].astype(str).to_numpy()
    done = finish(FinishInput(tuple(dataset.classes), y[run.va], y[run.te], groups[run.te],
                              proba_va, raw_te, n_boot=cfg.n_boot, seed=cfg.seed))
    with atomic_path(folder / WEIGHTS) as tmp, open(tmp, "wb") as fh:
        torch.save(run.model.state_dict(), fh)  # zip folder "archive", not the temp name
    save_npy(folder / "test_proba.npy", done.test_proba)
    save_npy(folder / "val_proba.npy", done.val_proba)  # what ensembles choose their weights on
    if run.held is not None:  # out-of-fold: rows this network never trained on
        _, raw_oof = evaluate(run.model, paths[run.held].tolist(), y[run.held], run.spec,
                              run.device, cfg, tta=cfg.tta, aspect=run.aspect)
        save_npy(folder / "oof_proba.npy", calibrated(raw_oof, done.temperature))
    card = build_card(run, state, dataset, folder, done.val, done.test, done.temperature,
                      {"eval_img_per_s": round(len(run.te) / eval_s, 1),
                       "total_time_s": round(time.perf_counter() - t_start, 1)})
    card.mel_threshold = done.mel_threshold
    return card


def build_card(run: Run, state: dict, dataset: Dataset, folder: Path, val: dict, test: dict,
               temperature: float, timing: dict) -> ModelCard:
    """The fine-tuned model's card: settings, preprocessing, training record, scores."""
    hist, spec = state["history"], run.spec
    ids = dataset.frame["image_id"].to_numpy()
    details = FinetuneRecord(
        mean=list(spec.mean), std=list(spec.std), interpolation=spec.interpolation,
        weights_source=spec.weights_source, weights_sha256=spec.weights_sha256,
        best_epoch=state["best_epoch"], epochs_run=state["epoch"],
        history=hist, val_balanced_accuracy=state["best_score"],
        epoch_time_s=round(float(np.mean([h["train_s"] for h in hist])), 1),
        train_img_per_s=round(float(np.mean([h["train_img_per_s"] for h in hist])), 1),
        eval_img_per_s=timing["eval_img_per_s"], device=str(run.device),
        processes=run.world.size,
        oof_image_ids=None if run.held is None else ids[run.held].tolist(),
        bf16_autocast=use_bf16(run.cfg.precision, run.device), input_aspect=run.aspect,
        distill_targets_sha256=(sha256_file(run.cfg.distill_targets)
                                if run.cfg.distill_targets else None))
    return ModelCard(
        kind="finetune", name=folder.name, config=FinetuneSettings(**asdict(run.cfg)),
        classes=list(dataset.classes),
        val=val, test=test, temperature=temperature, decision_rule="argmax",
        train_image_ids=ids[run.tr].tolist(), test_image_ids=ids[run.te].tolist(),
        n_train=len(run.tr), n_val=len(run.va), n_test=len(run.te), tune_time_s=0.0,
        fit_time_s=round(sum(h["train_s"] for h in hist), 1),
        total_time_s=timing["total_time_s"], data_fingerprint=dataset.fingerprint(),
        versions=library_versions(), details=details)


def finetune_config(card: ModelCard) -> FinetuneConfig:
    """The config a fine-tuned model's card was made with."""
    raw = asdict(card.config)  # its block refused settings this version does not know
    raw["image_size"] = tuple(raw["image_size"])
    return FinetuneConfig(**raw)


def load_finetuned(model_dir: Path | str,
                   device: str = "cpu") -> tuple[nn.Module, ModelCard, BackboneSpec]:
    """A fine-tuned model folder -> (model in eval mode, card, backbone spec).

    Raises:
        LesionLabError: the folder is not a fine-tuned network, its weights do not match the
            card's sha256, or they cannot be loaded safely.
    """
    card = load_card(model_dir)
    require_kind(card, "finetune", f"{model_dir} holds a {{have}} model, not a fine-tuned network")
    model, spec = build_model(finetune_config(card), len(card.classes))
    path = verify_weights(model_dir, WEIGHTS, card)  # the sha256 its card recorded
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing, damaged or crafted file
        raise LesionLabError(f"cannot load {Path(model_dir) / WEIGHTS}: "
                             f"{str(exc).splitlines()[0][:200]}") from None
    model.load_state_dict(state)
    return model.to(resolve_device(device)).eval(), card, spec


# a folder predicting at least this many images shows a progress bar (stderr); a page upload
# or a few files do not
PROGRESS_MIN_IMAGES = 256


def network_proba(model: nn.Module, card: ModelCard, spec: BackboneSpec,
                  paths: Sequence[str], tta: str | None = None) -> np.ndarray:
    """Calibrated probabilities of a loaded fine-tuned network for image ``paths``; ``tta``
    overrides the card's test-time views (the temperature stays the card's).

    Args:
        model: the loaded network (:func:`load_finetuned`).
        card: its card (image size, TTA, temperature).
        spec: its backbone spec.
        paths: image files.
        tta: ``none``, ``flip`` or ``d4``; None: the card's.

    Returns:
        (n_paths, n_classes) calibrated probabilities, rows summing to 1.
    """
    dev = next(model.parameters()).device
    raw = predict_proba(model.to(memory_format=torch.channels_last), list(paths), spec,
                        tuple(card.config.image_size), dev,
                        tta=tta or card.config.tta,
                        bf16=use_bf16(card.config.precision, dev),
                        progress=len(paths) >= PROGRESS_MIN_IMAGES,
                        color_constancy=card.config.color_constancy,
                        aspect=model_aspect(card.details.input_aspect, f"model {card.name}"))
    return apply_temperature(raw, card.temperature)


def predict_finetuned(model_dir: Path | str, paths: Sequence[str],
                      device: str = "auto", tta: str | None = None) -> np.ndarray:
    """Calibrated probabilities of a fine-tuned model folder for image ``paths``.

    Args:
        model_dir: the fine-tuned model folder.
        paths: image files.
        device: ``auto``, ``cpu`` or ``cuda``.
        tta: ``none``, ``flip`` or ``d4``; None: the card's.

    Returns:
        (n_paths, n_classes) calibrated probabilities, rows summing to 1.

    Raises:
        LesionLabError: see :func:`load_finetuned`.
    """
    model, card, spec = load_finetuned(model_dir, device)
    return network_proba(model, card, spec, paths, tta)


@dataclass
class FinetuneRunOptions:
    """The flags of ``python -m models.finetune`` beyond :class:`FinetuneConfig` and the data."""

    resume: bool = option(False, "continue from the last checkpoint", switch=True)


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments, from ``FinetuneConfig`` and ``FinetuneRunOptions``."""
    p = config_parser("python -m models.finetune", __doc__, FinetuneConfig)
    add_config_args(p, FinetuneRunOptions)
    add_config_args(p, TrackingOptions)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, fine-tune, and write the resolved config.yaml in the model folder."""
    from models.tracking import track_model  # imports the model-folder kinds
    args = build_parser().parse_args(argv)
    cfg = config_from_args(FinetuneConfig, args)
    dataset = ensure_data(resolve_data(args), **label_options(args))
    card = finetune(dataset, args.workdir, cfg, resume=args.resume)
    if card is None:  # a torchrun worker other than the main one
        return 0
    save_config(model_path(args.workdir, card.name), args, "python -m models.finetune")
    track_model(args, args.workdir, card, model_path(args.workdir, card.name),
                "python -m models.finetune")
    print(summary_line(card) + f"  epoch {card.details.epoch_time_s} s, "
          f"{card.details.train_img_per_s} img/s train")
    return 0


if __name__ == "__main__":
    run_main(main)
