"""``python -m models.export --model DIR --out DIR [--precision fp32|fp16|int8]``: a
fine-tuned network exported for inference.

The exported folder holds ``model.onnx`` (run by ONNX Runtime, as featurize's onnx engine
runs its backbones), its card (the network's, with an ``export`` record: precision, the
check on val, data, licence, scores with their CIs, the melanoma rule, intended use; the
sha256 of every file) and, unless ``--torch-copy none``, ``model.pt``: the torch network
Grad-CAM needs. It loads as a model folder of kind ``onnx`` (``models.folder``).

fp16 and int8 (``onnxruntime.quantization``) are kept only where they change nothing that
matters: on the val split of ``--data`` (the network's own), balanced accuracy must move by
less than 0.005 and the decisions (most likely class, melanoma flag) agree on >= 99% of the
images; otherwise, or without ``--data``, the export is refused in one line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from featurize.extract import export_onnx
from lesionlab.artifacts import atomic_path
from lesionlab.card import ModelCard, save_card
from lesionlab.cli import (command_parser, config_from_args, data_folder, model_option, option,
                           run_main, workdir_option)
from lesionlab.data import Dataset, load_dataset
from lesionlab.errors import LesionLabError
from lesionlab.fingerprint import TRAIN_DIGESTS
from lesionlab.metrics import balanced_accuracy, mel_index
from models.finetune import network_proba
from models.folder import NetworkFolder, load_model_folder
from models.shipped import ONNX_FILE, TORCH_FILE, is_exported

PRECISIONS = ("fp32", "fp16", "int8")
TORCH_COPIES = ("fp16", "fp32", "none")
MAX_BA_CHANGE = 0.005  # fp16/int8: val balanced accuracy must move by less than this
MIN_AGREEMENT = 0.99  # ... and the decisions agree on at least this share of val images
LICENCE = "CC BY-NC 4.0 (HAM10000, Tschandl et al. 2018)"
DATA = ("HAM10000 (Tschandl, Rosendahl and Kittler 2018, Sci. Data 5:180161; the ISIC "
        "archive): dermoscopic images of 7 diagnoses, split by lesion")
INTENDED_USE = ("Research tool, not a medical device: it must not be used to diagnose, treat "
                "or rule out any disease.")


@dataclass
class ExportConfig:
    """What ``python -m models.export`` exports and how; its flags come from these fields."""

    model: Path = model_option("a fine-tuned network's model folder (models.finetune)")
    out: Path = option(help="the exported folder to write (must not exist)", parse=Path)
    precision: str = option("fp32", "weights of model.onnx; fp16/int8 need --data and pass "
                                    "the check on val", choices=PRECISIONS)
    torch_copy: str = option("fp16", "the torch network kept as model.pt for Grad-CAM "
                                     "(fp16: half the size); none: explain needs the "
                                     "unexported folder", choices=TORCH_COPIES)
    data: Path | None = option(None, "the network's HAM10000 folder: its val split checks the "
                                     "export (needed for fp16/int8)", parse=data_folder)
    workdir: Path = workdir_option()
    max_mb: float = option(20.0, "refuse a folder larger than this (MB)", gt=0)


def precision_check(reference: np.ndarray, exported: np.ndarray, labels: np.ndarray,
                    classes: Sequence[str], mel_threshold: float | None) -> dict:
    """How far an export moves the network's val results.

    Args:
        reference: (n_val, n_classes) the unexported network's calibrated probabilities.
        exported: (n_val, n_classes) the exported network's.
        labels: (n_val,) class indices into ``classes``.
        classes: the card's class set.
        mel_threshold: the card's melanoma threshold (P(mel), in [0, 1]); None or NaN: no
            melanoma rule.

    Returns:
        ``n_val``; the balanced accuracy (in [0, 1]) of both and its change; the share of
        images whose decisions (most likely class, and the melanoma flag when there is a
        rule) agree, in [0, 1]; the largest probability difference; and ``passed``: change
        < :data:`MAX_BA_CHANGE` and agreement >= :data:`MIN_AGREEMENT`.
    """
    ref_ba = balanced_accuracy(labels, reference.argmax(1))
    new_ba = balanced_accuracy(labels, exported.argmax(1))
    agree = reference.argmax(1) == exported.argmax(1)
    mel = mel_index(classes)
    if mel is not None and mel_threshold is not None and not np.isnan(mel_threshold):
        agree &= (reference[:, mel] >= mel_threshold) == (exported[:, mel] >= mel_threshold)
    change = float(new_ba - ref_ba)
    agreement = float(agree.mean()) if len(agree) else 0.0
    return {"n_val": int(len(labels)), "balanced_accuracy_reference": float(ref_ba),
            "balanced_accuracy_exported": float(new_ba), "balanced_accuracy_change": change,
            "decision_agreement": agreement,
            "max_abs_probability_difference": float(np.abs(reference - exported).max(initial=0)),
            "passed": bool(abs(change) < MAX_BA_CHANGE and agreement >= MIN_AGREEMENT)}


def require_passed(check: dict, precision: str) -> None:
    """Refuse an export whose check failed.

    Raises:
        LesionLabError: (one line with the numbers) when ``check`` did not pass.
    """
    if not check["passed"]:
        raise LesionLabError(
            f"--precision {precision} refused: on {check['n_val']} val images balanced "
            f"accuracy moved by {check['balanced_accuracy_change']:+.4f} (must be < "
            f"{MAX_BA_CHANGE}) and decisions agree on {check['decision_agreement']:.2%} "
            f"(must be >= {MIN_AGREEMENT:.0%}); export at fp32")


def require_training_data(card: ModelCard, dataset: Dataset) -> None:
    """Refuse ``dataset`` unless it is the data ``card``'s model was trained on.

    Raises:
        LesionLabError: the fingerprints differ.
    """
    if dataset.fingerprint() != card.data_fingerprint:
        raise LesionLabError(f"--data is not the data model {card.name} was trained on "
                             f"(fingerprint {dataset.fingerprint()[:12]}, the card's "
                             f"{card.data_fingerprint[:12]})")


def val_rows(card: ModelCard, dataset: Dataset, workdir: Path | str) -> Dataset:
    """The val split the network was trained with, as a Dataset of (n_val, ...) rows.

    Raises:
        LesionLabError: ``dataset`` is not the data the network was trained on.
    """
    from lesionlab.splits import load_or_make_split, split_indices

    require_training_data(card, dataset)
    split = load_or_make_split(dataset, workdir, card.config.data_seed)
    _, va, _ = split_indices(dataset, split)
    return Dataset(root=dataset.root, frame=dataset.frame.iloc[va].reset_index(drop=True),
                   classes=dataset.classes)


def reference_proba(source: NetworkFolder, paths: Sequence[str]) -> np.ndarray:
    """The unexported network's calibrated probabilities, (n_paths, n_classes), computed in
    fp32 (its card's ``auto`` precision may pick bf16 autocast on this CPU: the network's
    exact outputs are the reference)."""
    card = replace(source.card, config=replace(source.card.config, precision="fp32"))
    return network_proba(source.network, card, source.spec, paths, source.tta)


def val_probas(source: NetworkFolder, exported: Path, val: Dataset
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reference, exported, labels): (n_val, n_classes) calibrated probabilities of the
    unexported network (fp32: :func:`reference_proba`) and the exported one on ``val``,
    and its (n_val,) class indices."""
    with load_model_folder(exported, "cpu") as folder:
        new = folder.predict_proba(val)
    return reference_proba(source, val.frame["path"].tolist()), new, val.labels


def write_onnx(network: torch.nn.Module, card: ModelCard, dest: Path, precision: str) -> None:
    """``network`` as ``dest`` (``model.onnx``), its weights at ``precision``; input and
    output stay float32."""
    h, w = card.config.image_size
    with tempfile.TemporaryDirectory(prefix="lesionlab-export-") as tmp:
        plain = Path(tmp) / "fp32.onnx"
        export_onnx(network.cpu().eval(), torch.zeros(2, 3, h, w), plain)
        with atomic_path(dest) as out:
            if precision == "fp32":
                shutil.copyfile(plain, out)
            elif precision == "fp16":
                import onnx
                from onnxruntime.transformers.float16 import convert_float_to_float16

                onnx.save(convert_float_to_float16(onnx.load(plain), keep_io_types=True), out)
            else:
                from onnxruntime.quantization import QuantType, quantize_dynamic

                quantize_dynamic(plain, out, weight_type=QuantType.QInt8)


def write_torch_copy(network: torch.nn.Module, dest: Path, torch_copy: str) -> None:
    """``network``'s state dict as ``dest`` (``model.pt``), floats at fp16 or fp32."""
    state = network.state_dict()
    if torch_copy == "fp16":
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    with atomic_path(dest) as out, open(out, "wb") as fh:
        torch.save(state, fh)  # a file object: the zip's folder is "archive", not the temp name


def _numbers(test: dict) -> dict:
    """A card's test metrics without its tables: numbers, CIs, n, melanoma operating point."""
    return {k: v for k, v in test.items()
            if k in ("ci95", "mel_operating_point", "n") or isinstance(v, float)}


def scores(card: ModelCard, exported_test: dict | None = None) -> dict:
    """The scores the export record states: ``internal_test``, the exported network's own
    test metrics (numbers) with their bootstrap 95% CIs and melanoma operating point
    (:func:`exported_test_scores`; without data, the unexported network's, said by
    ``internal_test_of``), the unexported network's as ``internal_test_before_export``, and
    the external set's when recorded."""
    before = _numbers(card.test)
    if exported_test is None:
        return {"internal_test": before, "internal_test_of": "the unexported network (no "
                "--data: the export was not scored)", "external": card.external}
    return {"internal_test": _numbers(exported_test), "internal_test_of": "the exported network",
            "internal_test_before_export": before, "external": card.external}


def card_test_rows(card: ModelCard, dataset: Dataset) -> Dataset:
    """The network's test images (its card's ``test_image_ids``, in that order) as a Dataset.

    Raises:
        LesionLabError: ``dataset`` lacks one of them.
    """
    ids = [str(i) for i in card.test_image_ids]
    frame = dataset.frame.set_index(dataset.frame["image_id"].astype(str))
    missing = [i for i in ids if i not in frame.index]
    if missing:
        raise LesionLabError(f"--data lacks {len(missing)} test images of model {card.name} "
                             f"(e.g. {missing[0]})")
    return Dataset(root=dataset.root, frame=frame.loc[ids].reset_index(drop=True),
                   classes=dataset.classes)


def exported_test_scores(folder: Path | str, card: ModelCard, dataset: Dataset) -> dict:
    """The test metrics of the exported network in ``folder`` on its card's test images,
    computed as training computed the unexported network's
    (``models.finish.score_test_split``: lesion-level bootstrap with the card's resample count and seed, the melanoma rule at the
    card's threshold); ``ece_uncalibrated`` stays the unexported network's (the export holds
    only calibrated outputs). Reporting only: the export's precision was chosen on val.

    Raises:
        LesionLabError: ``dataset`` lacks a test image (see :func:`card_test_rows`).
    """
    from models.finish import score_test_split

    test = card_test_rows(card, dataset)
    with load_model_folder(folder, "cpu") as model:
        proba = np.asarray(model.predict_proba(test), float)
    groups = test.frame["lesion_id"].astype(str).to_numpy()
    out = score_test_split(test.labels, proba, groups, card.classes, card.mel_threshold,
                           card.config.n_boot, card.config.seed)
    out["ece_uncalibrated"] = card.test.get("ece_uncalibrated")
    return out


def melanoma_rule(card: ModelCard) -> str:
    """The card's melanoma rule in words."""
    t = card.mel_threshold
    if "mel" not in card.classes or t is None or np.isnan(t):
        return "none: no melanoma threshold (most likely class only)"
    return (f"flag melanoma when the calibrated P(mel) >= {t:.4f} (the highest threshold "
            f"that flags >= 80% of the val melanomas), whatever the most likely class")


def export_record(card: ModelCard, cfg: ExportConfig, check: dict | None,
                  exported_test: dict | None = None) -> dict:
    """The ``export`` record of the exported card (``card``: the unexported network's)."""
    import onnxruntime

    return {"precision": cfg.precision, "runtime": f"onnxruntime {onnxruntime.__version__}",
            "torch_copy": cfg.torch_copy, "source": card.name,
            "source_files": dict(card.files), "check": check,
            "data": f"{DATA}; {card.n_train} training images (data fingerprint "
                    f"{card.data_fingerprint[:12]})",
            "licence": LICENCE, "scores": scores(card, exported_test),
            "melanoma_rule": melanoma_rule(card),
            "intended_use": INTENDED_USE}


def source_network(model: Path | str) -> NetworkFolder:
    """The unexported fine-tuned network at ``model``, loaded (on the CPU).

    Raises:
        LesionLabError: ``model`` is not a fine-tuned network's folder, or is an export.
    """
    source = load_model_folder(model, "cpu")
    if type(source) is not NetworkFolder:
        what = "an exported network" if is_exported(source.card) else \
            f"a {source.card.kind!r} model ({type(source).description})"
        raise LesionLabError(f"{model} holds {what}; only a fine-tuned network exports")
    return source.load()


def folder_mb(folder: Path) -> float:
    """The size of the files in ``folder``, in MB (10^6 bytes)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6


def _write(source: NetworkFolder, cfg: ExportConfig, tmp: Path,
           dataset: Dataset | None) -> ModelCard:
    """Write the exported folder's files into ``tmp``; returns its card."""
    write_onnx(source.network, source.card, tmp / ONNX_FILE, cfg.precision)
    if cfg.torch_copy != "none":
        write_torch_copy(source.network, tmp / TORCH_FILE, cfg.torch_copy)
    if (source.path / TRAIN_DIGESTS).is_file():  # evaluate's check for training images
        shutil.copyfile(source.path / TRAIN_DIGESTS, tmp / TRAIN_DIGESTS)
    card = replace(source.card, name=cfg.out.name, export=export_record(source.card, cfg, None))
    save_card(tmp, card)
    if dataset is not None:
        check = precision_check(*val_probas(source, tmp, val_rows(card, dataset, cfg.workdir)),
                                card.classes, card.mel_threshold)
        if cfg.precision != "fp32":
            require_passed(check, cfg.precision)
        # the card describes the folder: its test scores are the exported network's own
        card.test = exported_test_scores(tmp, card, dataset)
        card.export = export_record(source.card, cfg, check, card.test)
        save_card(tmp, card)
    size = folder_mb(tmp)
    if size > cfg.max_mb:
        raise LesionLabError(f"the exported folder is {size:.1f} MB, over --max-mb "
                             f"{cfg.max_mb:g}; try --torch-copy none or --precision fp16")
    return card


def export_model(cfg: ExportConfig, dataset: Dataset | None = None) -> ModelCard:
    """Export the fine-tuned network ``cfg.model`` to the folder ``cfg.out`` (written in a
    temporary folder beside it, then renamed: never half-written).

    Args:
        cfg: what to export and how.
        dataset: the network's labelled data, whose val split checks the export; None: no
            check (then only fp32 exports).

    Returns:
        The exported folder's card.

    Raises:
        LesionLabError: ``cfg.out`` exists; the model is not an unexported fine-tuned
            network; fp16/int8 without ``dataset``, or failing the check on val; ``dataset``
            is not the network's data; the folder would be over ``cfg.max_mb``.
    """
    out = Path(cfg.out)
    if out.exists():
        raise LesionLabError(f"--out {out} exists; remove it or choose another folder")
    if cfg.precision != "fp32" and dataset is None:
        raise LesionLabError(f"--precision {cfg.precision} needs --data: it is kept only "
                             f"when val balanced accuracy moves < {MAX_BA_CHANGE} and "
                             f"decisions agree on >= {MIN_AGREEMENT:.0%} of val images")
    source = source_network(cfg.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        card = _write(source, cfg, tmp, dataset)
        os.replace(tmp, out)
    finally:
        source.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return card


def build_parser() -> argparse.ArgumentParser:
    """CLI arguments, from ``ExportConfig``."""
    return command_parser("python -m models.export", __doc__, ExportConfig)


def main(argv: Sequence[str] | None = None) -> int:
    """Export, then print the folder, its precision, size and check."""
    cfg = config_from_args(ExportConfig, build_parser().parse_args(argv))
    dataset = load_dataset(cfg.data) if cfg.data is not None else None
    card = export_model(cfg, dataset)
    check = card.export["check"]
    said = "no check (no --data)" if check is None else (
        f"val balanced accuracy {check['balanced_accuracy_exported']:.4f} "
        f"({check['balanced_accuracy_change']:+.4f}), decisions agree on "
        f"{check['decision_agreement']:.2%}")
    print(f"exported {cfg.model} -> {cfg.out} ({cfg.precision}, {folder_mb(cfg.out):.1f} MB); "
          f"{said}")
    return 0


if __name__ == "__main__":
    run_main(main)
