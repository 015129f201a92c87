"""``python -m models.finetune``: full fine-tuning of a timm backbone, the comparison point.

Same lesion-grouped split as the heads: train on train, pick the epoch by val balanced
accuracy (early stopping), calibrate the temperature on val, score test once. Checkpoints are
written atomically every epoch and ``--resume`` continues a killed run exactly.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset as TorchDataset, WeightedRandomSampler
from torchvision.transforms import v2
from tqdm import tqdm

from featurize.backbones import create_backbone
from featurize.extract import ImageFolderSet, resolve_device, tta_views
from lesionlab.artifacts import atomic_path, library_versions
from lesionlab.cli import add_data_args, resolve_data, run_main
from lesionlab.data import CLASSES, Dataset, load_rgb
from lesionlab.download import ensure_data
from lesionlab.errors import LesionLabError
from lesionlab.metrics import balanced_accuracy, evaluate, expected_calibration_error
from lesionlab.splits import load_or_make_split, train_fraction
from models.bundle import load_card, model_name, model_path, save_card
from models.heads import apply_temperature, fit_temperature

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.pt"


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (defaults finish in < 40 min on a 2-core CPU)."""

    backbone: str = "tf_efficientnet_lite0"
    image_size: tuple[int, int] = (120, 160)  # (H, W), 4:3 like the images
    epochs: int = 12
    batch_size: int = 32
    lr: float = 5e-4           # backbone; the new head gets head_lr_mult x this
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    sampler: str = "balanced"  # balanced | none
    loss: str = "ce"           # ce | weighted_ce | focal
    label_smoothing: float = 0.1
    train_fraction: float = 1.0
    patience: int = 4
    tta: str = "flip"          # eval views: none | flip | d4
    seed: int = 0
    device: str = "auto"
    num_workers: int = 2
    bf16: bool = True          # CPU autocast (AMX/AVX512-BF16); CUDA always uses fp16 AMP
    weights: str | None = None
    name: str | None = None
    n_boot: int = 1000

    def validate(self) -> None:
        """Reject unknown option values."""
        if self.sampler not in ("balanced", "none"):
            raise LesionLabError(f"unknown --sampler {self.sampler!r}; expected balanced or none")
        if self.loss not in ("ce", "weighted_ce", "focal"):
            raise LesionLabError(f"unknown --loss {self.loss!r}; expected ce, weighted_ce, focal")
        if self.epochs < 1:
            raise LesionLabError("--epochs must be at least 1")

    def model_name(self) -> str:
        """Default folder name from the defining settings."""
        frac = f"frac{self.train_fraction:g}" if self.train_fraction < 1 else ""
        h, w = self.image_size
        return self.name or model_name("finetune", self.backbone, f"{h}x{w}", self.sampler,
                                       self.loss, f"ep{self.epochs}", frac, f"seed{self.seed}")


class TrainSet(TorchDataset):
    """Training images with dermoscopy augmentation (flips, 90-degree turns, crops, jitter)."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, size: tuple[int, int],
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.paths = list(paths)
        self.labels = labels
        self.transform = v2.Compose([
            v2.RandomChoice([v2.Identity(), v2.RandomRotation((90, 90), expand=True),
                             v2.RandomRotation((180, 180)), v2.RandomRotation((270, 270),
                                                                             expand=True)]),
            v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(1.15, 1.5), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomAffine(degrees=15, translate=(0.05, 0.05), scale=(0.95, 1.05)),
            v2.ColorJitter(0.2, 0.2, 0.15, 0.02),
            v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_rgb(self.paths[i])), int(self.labels[i])


class FocalLoss(nn.Module):
    """Multiclass focal loss (Lin et al. 2017), optional class weights."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=1)
        ce = nn.functional.nll_loss(logp, target, weight=self.weight, reduction="none")
        pt = logp.gather(1, target[:, None]).squeeze(1).exp()
        return ((1 - pt) ** self.gamma * ce).mean()


def make_loss(cfg: FinetuneConfig, counts: np.ndarray) -> nn.Module:
    """The training loss; class weights are inverse frequency, normalised to mean 1."""
    weight = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)),
                          dtype=torch.float32)
    if cfg.loss == "focal":
        return FocalLoss(2.0, weight if cfg.sampler == "none" else None)
    return nn.CrossEntropyLoss(weight=weight if cfg.loss == "weighted_ce" else None,
                               label_smoothing=cfg.label_smoothing)


def build_model(cfg: FinetuneConfig) -> tuple[nn.Module, object]:
    """Pretrained backbone with a fresh 7-class head (seeded)."""
    model, spec = create_backbone(cfg.backbone, cfg.weights)
    torch.manual_seed(cfg.seed)
    model.reset_classifier(len(CLASSES))
    model.drop_rate = 0.2
    return model, spec


def _optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    head = set(id(p) for p in model.get_classifier().parameters())
    backbone = [p for p in model.parameters() if id(p) not in head]
    return torch.optim.AdamW(
        [{"params": backbone, "lr": cfg.lr},
         {"params": list(model.get_classifier().parameters()), "lr": cfg.lr * cfg.head_lr_mult}],
        weight_decay=cfg.weight_decay)


def _schedule(opt: torch.optim.Optimizer, steps_per_epoch: int,
              cfg: FinetuneConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    total = max(warm + 1, cfg.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.inference_mode()
def predict_logits(model: nn.Module, paths: Sequence[str], size: tuple[int, int], spec,
                   device: torch.device, tta: str = "none", batch_size: int = 64,
                   num_workers: int = 0, progress: bool = False) -> np.ndarray:
    """Softmax probabilities averaged over TTA views, with the deterministic eval transform."""
    model.eval()
    ds = ImageFolderSet(paths, size, spec.mean, spec.std)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    out = []
    for x, _ in tqdm(loader, disable=not progress, desc="eval", unit="batch", leave=False):
        x = x.to(device)
        probs = []
        for view in tta_views(x, tta):
            with _autocast(device, True):
                probs.append(torch.softmax(model(view.contiguous(
                    memory_format=torch.channels_last)).float(), dim=1))
        out.append(torch.stack(probs).mean(0).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CLASSES)))


def _autocast(device: torch.device, bf16: bool):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def finetune(dataset: Dataset, workdir: Path | str, cfg: FinetuneConfig, resume: bool = False,
             on_epoch_end: Callable[[int], None] | None = None) -> dict:
    """Train, select by val, evaluate once on test; write the model folder; return its card."""
    cfg.validate()
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    split = load_or_make_split(dataset, workdir, cfg.seed)
    where = dataset.frame["image_id"].map(split.set_index("image_id")["split"]).to_numpy()
    y = dataset.labels
    groups = dataset.frame["lesion_id"].astype(str).to_numpy()
    paths = dataset.frame["path"].to_numpy()
    tr, va, te = (np.flatnonzero(where == s) for s in ("train", "val", "test"))
    if cfg.train_fraction < 1.0:
        tr = tr[train_fraction(y[tr], groups[tr], cfg.train_fraction, cfg.seed)]
    folder = model_path(workdir, cfg.model_name())
    folder.mkdir(parents=True, exist_ok=True)

    model, spec = build_model(cfg)
    model = model.to(device).to(memory_format=torch.channels_last)
    counts = np.bincount(y[tr], minlength=len(CLASSES))
    criterion = make_loss(cfg, counts).to(device)
    train_ds = TrainSet(paths[tr], y[tr], cfg.image_size, spec.mean, spec.std)
    steps = math.ceil(len(tr) / cfg.batch_size)
    opt = _optimizer(model, cfg)
    sched = _schedule(opt, steps, cfg)
    state = {"epoch": 0, "best_score": -1.0, "best_epoch": 0, "best_state": None,
             "history": [], "bad_epochs": 0}
    ckpt = folder / CHECKPOINT
    if resume and ckpt.exists():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        if saved["config"] != asdict(cfg):
            raise LesionLabError(f"checkpoint {ckpt} was made with other settings; "
                                 f"drop --resume or use another --name")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        state = saved["state"]
        torch.set_rng_state(saved["torch_rng"])
        log.info("resumed %s at epoch %d", folder.name, state["epoch"])

    while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
        epoch = state["epoch"]
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        if cfg.sampler == "balanced":
            w = 1.0 / counts[y[tr]]
            sampler = WeightedRandomSampler(torch.tensor(w, dtype=torch.double), len(tr),
                                            replacement=True, generator=gen)
            loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler,
                                num_workers=cfg.num_workers, drop_last=len(tr) > cfg.batch_size,
                                generator=gen)
        else:
            loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True,
                                num_workers=cfg.num_workers,
                                drop_last=len(tr) > cfg.batch_size, generator=gen)
        model.train()
        t0 = time.perf_counter()
        seen, loss_sum = 0, 0.0
        for x, target in tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                              leave=False):
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            target = target.to(device)
            with _autocast(device, cfg.bf16):
                loss = criterion(model(x).float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(x)
            loss_sum += float(loss.detach()) * len(x)
        train_s = time.perf_counter() - t0
        proba_va = predict_logits(model, paths[va].tolist(), cfg.image_size, spec, device,
                                  tta="none", num_workers=cfg.num_workers)
        score = balanced_accuracy(y[va], proba_va.argmax(1))
        state["history"].append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                                 "val_balanced_accuracy": score, "train_s": round(train_s, 1),
                                 "train_img_per_s": round(seen / train_s, 1)})
        if score > state["best_score"]:
            state.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0,
                         best_state={k: v.detach().cpu().clone()
                                     for k, v in model.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        log.info("epoch %d: loss %.4f  val bal.acc %.4f  %.0f s (%.1f img/s)", epoch + 1,
                 state["history"][-1]["train_loss"], score, train_s, seen / train_s)
        with atomic_path(ckpt) as tmp:
            torch.save({"config": asdict(cfg), "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "state": state, "torch_rng": torch.get_rng_state()}, tmp)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)

    model.load_state_dict(state["best_state"])
    proba_va = predict_logits(model, paths[va].tolist(), cfg.image_size, spec, device,
                              tta=cfg.tta, num_workers=cfg.num_workers)
    temperature = fit_temperature(proba_va, y[va])
    t_eval = time.perf_counter()
    raw_te = predict_logits(model, paths[te].tolist(), cfg.image_size, spec, device,
                            tta=cfg.tta, num_workers=cfg.num_workers, progress=True)
    eval_s = time.perf_counter() - t_eval
    proba_te = apply_temperature(raw_te, temperature)
    test = evaluate(y[te], proba_te, groups[te], n_boot=cfg.n_boot, seed=cfg.seed)
    test["ece_uncalibrated"] = expected_calibration_error(y[te], raw_te)
    with atomic_path(folder / WEIGHTS) as tmp:
        torch.save(model.state_dict(), tmp)
    np.save(folder / "test_proba.npy", proba_te)
    hist = state["history"]
    card = {
        "kind": "finetune",
        "name": folder.name,
        "config": asdict(cfg),
        "classes": list(CLASSES),
        "backbone": cfg.backbone,
        "image_size": list(cfg.image_size),
        "mean": list(spec.mean), "std": list(spec.std),
        "weights_source": spec.weights_source, "weights_sha256": spec.weights_sha256,
        "tta": cfg.tta,
        "temperature": temperature,
        "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"],
        "history": hist,
        "val_balanced_accuracy": state["best_score"],
        "val": evaluate(y[va], apply_temperature(proba_va, temperature), n_boot=0),
        "test": test,
        "test_image_ids": dataset.frame["image_id"].to_numpy()[te].tolist(),
        "n_train": int(len(tr)), "n_val": int(len(va)), "n_test": int(len(te)),
        "epoch_time_s": round(float(np.mean([h["train_s"] for h in hist])), 1) if hist else None,
        "train_img_per_s": round(float(np.mean([h["train_img_per_s"] for h in hist])), 1)
        if hist else None,
        "eval_img_per_s": round(len(te) / eval_s, 1),
        "device": str(device),
        "fit_time_s": round(time.perf_counter() - t_start, 1),
        "total_time_s": round(time.perf_counter() - t_start, 1),
        "data_fingerprint": dataset.fingerprint(),
        "versions": library_versions(),
    }
    save_card(folder, card)
    return card


def load_finetuned(model_dir: Path | str, device: str = "cpu") -> tuple[nn.Module, dict, object]:
    """A fine-tuned model folder -> (model in eval mode, card, backbone spec)."""
    card = load_card(model_dir)
    cfg = FinetuneConfig(**{**card["config"], "image_size": tuple(card["config"]["image_size"])})
    model, spec = build_model(cfg)
    model.load_state_dict(torch.load(Path(model_dir) / WEIGHTS, map_location="cpu",
                                     weights_only=True))
    return model.to(resolve_device(device)).eval(), card, spec


def predict_finetuned(model_dir: Path | str, paths: Sequence[str],
                      device: str = "auto") -> np.ndarray:
    """Calibrated probabilities of a fine-tuned model for image ``paths``."""
    model, card, spec = load_finetuned(model_dir, device)
    dev = next(model.parameters()).device
    raw = predict_logits(model.to(memory_format=torch.channels_last), list(paths),
                         tuple(card["image_size"]), spec, dev, tta=card["tta"])
    return apply_temperature(raw, card["temperature"])


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments."""
    d = FinetuneConfig()
    p = argparse.ArgumentParser(prog="python -m models.finetune", description=__doc__)
    p.add_argument("--backbone", default=d.backbone)
    p.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"), default=d.image_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--head-lr-mult", type=float, default=d.head_lr_mult)
    p.add_argument("--sampler", default=d.sampler, help="balanced | none")
    p.add_argument("--loss", default=d.loss, help="ce | weighted_ce | focal")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--train-fraction", type=float, default=d.train_fraction)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--tta", default=d.tta, help="none | flip | d4 at evaluation")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--no-bf16", action="store_true", help="fp32 on CPU")
    p.add_argument("--weights", default=None)
    p.add_argument("--name", default=None)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    add_data_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and fine-tune."""
    from models.train_head import summary_line

    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dataset = ensure_data(resolve_data(args))
    cfg = FinetuneConfig(backbone=args.backbone, image_size=tuple(args.image_size),
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         head_lr_mult=args.head_lr_mult, sampler=args.sampler, loss=args.loss,
                         label_smoothing=args.label_smoothing,
                         train_fraction=args.train_fraction, patience=args.patience,
                         tta=args.tta, seed=args.seed, device=args.device,
                         num_workers=args.num_workers, bf16=not args.no_bf16,
                         weights=args.weights, name=args.name)
    card = finetune(dataset, args.workdir, cfg, resume=args.resume)
    print(summary_line(card) + f"  epoch {card['epoch_time_s']} s, "
          f"{card['train_img_per_s']} img/s train")
    return 0


if __name__ == "__main__":
    run_main(main)
