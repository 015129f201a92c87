"""Every CLI: --help works, and an invalid choice fails in argparse (exit 2) before any data.

The entry points' ``main(argv)`` run in-process (what ``python -m`` calls), which keeps this
file fast; one subprocess run checks the real command line end to end.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from tests.conftest import ROOT


class Result:
    """What a ``python -m module args`` run gave: exit code and captured output."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_main(module: str, *args: str, capsys) -> Result:
    """Call ``module.main(args)`` as ``python -m module`` would; argparse exits are caught."""
    mod = importlib.import_module(module if module != "featurize" and module != "serve"
                                  else module + ".__main__")
    try:
        code = mod.main(list(args)) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return Result(code, out.out, out.err)

CLIS = ("featurize", "lesionlab.splits", "lesionlab.download", "models.train_head",
        "models.finetune", "models.predict", "models.explain", "benchmarks.run_all",
        "benchmarks.featurize_speed", "benchmarks.serve_load", "benchmarks.scale", "serve",
        "models.evaluate", "benchmarks.train_speed", "lesionlab.audit")


@pytest.mark.parametrize("module", CLIS)
def test_help(module: str, capsys) -> None:
    proc = run_main(module, "--help", capsys=capsys)
    assert proc.returncode == 0, proc.stderr[-300:]
    assert proc.stdout.startswith("usage: python -m " + module)


def test_help_from_the_command_line() -> None:
    """A real interpreter prints the help; a head's command imports no torchvision (1.5-3 s
    of start-up: it loads torch._dynamo), which only the commands that train a network need."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "models.train_head",
                           "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "--tune-timeout" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "models.design" in imported and "torch" in imported
    assert not {m for m in imported if m.split(".")[0] == "torchvision"}


# Each line: a command with one bad value; --data points nowhere, so reaching the data would
# print "data folder not found" instead of argparse's message.
BAD = [
    ("featurize", ["--backbone", "classical", "--tta", "rot"], "invalid choice: 'rot'"),
    ("featurize", ["--backbone", "tf_efficientnet_lite0", "--pool", "max"], "invalid choice"),
    ("featurize", ["--backbone", "resnet_nonexistent"], "unknown backbone"),
    ("featurize", ["--backbone", "classical", "--device", "tpu"], "invalid choice"),
    ("models.train_head", ["--features", "classical", "--head", "svm"], "invalid choice: 'svm'"),
    ("models.train_head", ["--features", "classical", "--imbalance", "adasyn"], "invalid choice"),
    ("models.train_head", ["--features", "classical", "--name", "../../../x"], "invalid name"),
    ("models.finetune", ["--tta", "rot"], "invalid choice: 'rot'"),
    ("models.finetune", ["--loss", "hinge"], "invalid choice"),
    ("models.finetune", ["--sampler", "smote"], "invalid choice"),
    ("models.finetune", ["--name", "a/b"], "invalid name"),
    ("benchmarks.run_all", ["--preset", "medium"], "invalid choice: 'medium'"),
]


def test_serve_rejects_bad_values_before_loading(tmp_path: Path, capsys) -> None:
    proc = run_main("serve", "--model", str(tmp_path / "no_model"), "--device", "tpu",
                    capsys=capsys)
    assert proc.returncode == 2 and "invalid choice: 'tpu'" in proc.stderr


@pytest.mark.parametrize("module, args", [
    ("benchmarks.run_all", ["--preset", "quick"]),
    ("lesionlab.download", []),
    ("featurize", ["--backbone", "classical"]),
    ("lesionlab.splits", []),
    ("models.evaluate", ["--model", "tests"]),
])
def test_data_that_is_a_file_stops_in_argument_parsing(module: str, args: list[str],
                                                       tmp_path: Path, capsys) -> None:
    """--data naming a file (not a folder) is one line before anything is read or made."""
    a_file = tmp_path / "labels.csv"
    a_file.write_text("image_id,dx\n")
    proc = run_main(module, *args, "--data", str(a_file), "--workdir", str(tmp_path / "w"),
                    capsys=capsys)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{a_file} is a file; --data takes a folder" in proc.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("module, args, message", BAD)
def test_invalid_choice_fails_in_argparse(module: str, args: list[str], message: str,
                                          tmp_path: Path, capsys) -> None:
    proc = run_main(module, *args, "--data", str(tmp_path / "nowhere"), "--workdir",
                    str(tmp_path / "w"), capsys=capsys)
    assert proc.returncode == 2
    assert message in proc.stderr and "data folder not found" not in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("module, args, message", [
    ("models.predict", ["--sex", "other"], "invalid choice: 'other'"),
    ("models.predict", ["--localization", "elbow"], "invalid choice"),
    ("models.predict", ["--age", "300"], "age must be between"),
    ("models.explain", ["--out", "o", "--target", "melanoma"], "invalid choice"),
])
def test_predict_explain_reject_bad_values_before_loading(module: str, args: list[str],
                                                         message: str, tmp_path: Path,
                                                         capsys) -> None:
    proc = run_main(module, "--model", str(tmp_path / "no_model"), "x.jpg", *args,
                    capsys=capsys)
    assert proc.returncode == 2 and message in proc.stderr
    assert "not a lesionlab model folder" not in proc.stderr
