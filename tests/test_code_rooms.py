"""Code lives in its room: device and CPU-flag helpers in the core (``lesionlab.device``), the
split and download commands in the core's modules (old ``featurize.*`` names still run), and
the card's summary line beside the card (``models.bundle``)."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lesionlab.device as device
from lesionlab.errors import LesionLabError
from tests.conftest import FIXTURE, run_cli, run_module

CPUINFO = """processor\t: 0
model name\t: Test CPU 9000 @ 2.00GHz
flags\t\t: fpu sse2 avx512f avx512_bf16
"""


def test_device_helpers_live_in_the_core() -> None:
    assert device.resolve_device("cpu") == torch.device("cpu")
    assert device.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(LesionLabError, match=r"unknown --device 'tpu'; expected one of"):
        device.resolve_device("tpu")
    assert device.DEVICES == ("auto", "cpu", "cuda")
    assert device.PRECISIONS == ("auto", "fp32", "bf16")
    for module, names in (("featurize.extract", ("resolve_device", "DEVICES")),
                          ("models.finetune", ("resolve_device", "use_bf16", "DEVICES"))):
        mod = importlib.import_module(module)
        assert all(getattr(mod, n) is getattr(device, n) for n in names), module


def test_cpu_model_and_flags_read_cpuinfo(tmp_path: Path, monkeypatch) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    monkeypatch.setattr(device, "CPUINFO", info)
    assert device.cpu_model() == "Test CPU 9000 @ 2.00GHz"
    assert device.cpu_flags() == {"fpu", "sse2", "avx512f", "avx512_bf16"}
    assert device.use_bf16("auto", torch.device("cpu"))
    monkeypatch.setattr(device, "CPUINFO", tmp_path / "absent")
    assert device.cpu_flags() == set()
    assert not device.use_bf16("auto", torch.device("cpu"))
    assert device.cpu_model()  # platform's answer, or "unknown CPU"


def test_cpu_model_names_family_and_model_where_the_name_is_bare(tmp_path: Path,
                                                                  monkeypatch) -> None:
    info = tmp_path / "cpuinfo"
    bare = "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
    info.write_text(bare + bare.replace("processor\t: 0", "processor\t: 1"))
    monkeypatch.setattr(device, "CPUINFO", info)
    assert device.cpu_model() == "AMD EPYC (family 25 model 17)"
    info.write_text(CPUINFO.replace("processor\t: 0", "processor\t: 0\ncpu family\t: 6\n"
                                    "model\t\t: 85"))
    assert device.cpu_model() == "Test CPU 9000 @ 2.00GHz"  # a named model stays as it is


def test_benchmarks_take_cpu_model_from_the_core() -> None:
    for module in ("benchmarks.serve_load", "benchmarks.train_speed", "benchmarks.scale",
                   "benchmarks.tta_cost"):
        assert importlib.import_module(module).cpu_model is device.cpu_model, module


def test_summary_line_sits_beside_the_card() -> None:
    from lesionlab.card_blocks import HeadRecord
    from models.bundle import summary_line

    card = SimpleNamespace(
        name="m", total_time_s=12.5, details=HeadRecord(cv_balanced_accuracy=0.61234),
        test={"balanced_accuracy": 0.5, "ci95": {"balanced_accuracy": [0.25, 0.75]},
              "macro_f1": 0.4, "macro_auc": 0.8, "mel_sensitivity": 0.9, "ece": 0.05})
    assert summary_line(card) == ("m: test balanced acc 0.500 [0.250, 0.750]  macro F1 0.400  "
                                  "AUC 0.800  mel sens 0.900  ECE 0.050  (cv 0.612, 12.5 s)")
    card.details, card.test = HeadRecord(), {k: v for k, v in card.test.items() if k != "ci95"}
    assert summary_line(card).endswith("[n/a, n/a]  macro F1 0.400  AUC 0.800  mel sens 0.900  "
                                       "ECE 0.050  (12.5 s)")


def test_split_and_download_commands_are_the_cores(tmp_path: Path, capsys) -> None:
    import featurize.download
    import featurize.split
    import lesionlab.download
    import lesionlab.splits

    assert featurize.split.main is lesionlab.splits.main
    assert featurize.download.main is lesionlab.download.main
    assert lesionlab.splits.main(["--data", str(FIXTURE), "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"split: {tmp_path / 'splits' / 'split_seed0.csv'}  (87 images, ")
    assert (tmp_path / "splits" / "split_seed0.csv").is_file()


@pytest.mark.parametrize("old, new", [("featurize.split", "lesionlab.splits"),
                                      ("featurize.download", "lesionlab.download")])
def test_old_command_names_still_run(old: str, new: str) -> None:
    proc = run_cli(old, "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert proc.stdout.startswith(f"usage: python -m {new} ")


def test_new_download_command_checks_a_folder(tmp_path: Path, capsys) -> None:
    proc = run_module(capsys, "lesionlab.download", "--data", str(tmp_path / "none"),
                      "--check-only")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
