"""Every CLI is built from its config dataclass(es); ``--config FILE`` (TOML or YAML) gives the
same config as the flags, flags override it, unknown keys stop in one line, the resolved
config saved beside a model folder re-runs to the same config, and ``--device`` has one
default everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from pathlib import Path

import pytest

from lesionlab.cli import (DEVICES, SAVED_CONFIG, DataOptions, config_from_args, config_values,
                           read_config_file, save_config)
from lesionlab.errors import LesionLabError
from tests.conftest import FIXTURE


def _module(name: str):
    return importlib.import_module(name + ".__main__" if name in ("featurize", "serve")
                                   else name)


def _classes(name: str) -> list[type]:
    """The config dataclasses whose fields are the flags of CLI ``name``."""
    from benchmarks.ablation import AblationConfig
    from benchmarks.errors import FolderErrorsConfig
    from benchmarks.featurize_speed import FeaturizeSpeedConfig
    from benchmarks.run_all import RunAllConfig
    from benchmarks.scale import ScaleConfig
    from benchmarks.serve_load import ServeLoadConfig
    from benchmarks.train_speed import TrainSpeedConfig
    from benchmarks.tta_cost import TtaCostConfig
    from featurize.__main__ import FeaturizeRunOptions
    from featurize.extract import FeaturizeConfig
    from models.calibrate import CalibrateConfig
    from models.distill import DistillOptions
    from models.ensemble import EnsembleCommand
    from models.evaluate import EvaluateConfig
    from models.explain import ExplainConfig
    from models.finetune import FinetuneConfig, FinetuneRunOptions
    from models.predict import PredictConfig
    from models.train_head import HeadConfig, HeadRunOptions
    from serve.app import ServeConfig
    from lesionlab.cli import TrackingOptions  # the MLflow flags of the training commands

    return {
        "featurize": [FeaturizeRunOptions, FeaturizeConfig, DataOptions],
        "models.train_head": [HeadConfig, DataOptions, HeadRunOptions, TrackingOptions],
        "models.finetune": [FinetuneConfig, DataOptions, FinetuneRunOptions, TrackingOptions],
        "models.kfold": [FinetuneConfig, DataOptions, FinetuneRunOptions, TrackingOptions],
        "models.distill": [FinetuneConfig, DataOptions, FinetuneRunOptions, DistillOptions,
                           TrackingOptions],
        "models.ensemble": [EnsembleCommand, TrackingOptions],
        "models.evaluate": [EvaluateConfig], "models.calibrate": [CalibrateConfig],
        "models.predict": [PredictConfig], "models.explain": [ExplainConfig],
        "serve": [ServeConfig], "benchmarks.run_all": [RunAllConfig, TrackingOptions],
        "benchmarks.ablation": [AblationConfig], "benchmarks.errors": [FolderErrorsConfig],
        "benchmarks.featurize_speed": [FeaturizeSpeedConfig],
        "benchmarks.scale": [ScaleConfig], "benchmarks.serve_load": [ServeLoadConfig],
        "benchmarks.train_speed": [TrainSpeedConfig], "benchmarks.tta_cost": [TtaCostConfig],
    }[name]


CLIS = ("featurize", "models.train_head", "models.finetune", "models.kfold", "models.distill",
        "models.ensemble", "models.calibrate",
        "models.evaluate", "models.predict", "models.explain", "serve", "benchmarks.run_all",
        "benchmarks.ablation", "benchmarks.errors", "benchmarks.featurize_speed",
        "benchmarks.scale", "benchmarks.serve_load", "benchmarks.train_speed",
        "benchmarks.tta_cost")


def _fields(name: str) -> list[dataclasses.Field]:
    return [f for cls in _classes(name) for f in dataclasses.fields(cls)
            if f.metadata.get("cli", True)]


def _run(name: str, argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = _module(name).main(argv) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", CLIS)
def test_every_flag_comes_from_the_config_dataclass(name: str, capsys) -> None:
    code, out, err = _run(name, ["--help"], capsys)
    assert code == 0, err[-300:]
    fields = _fields(name)
    for f in fields:
        flag = f.name if f.metadata.get("positional") else "--" + f.name.replace("_", "-")
        assert flag in out, f"{name} --help lacks {flag}"
    assert "--config FILE" in out
    # and no flag is built by hand: the parser's options are exactly the fields (+ --config)
    dests = {a.dest for a in _module(name).build_parser()._actions} - {"help", "config"}
    assert dests == {f.name for f in fields}


@pytest.mark.parametrize("name", CLIS)
def test_one_device_default_everywhere(name: str) -> None:
    devices = [a for a in _module(name).build_parser()._actions if a.dest == "device"]
    for action in devices:
        assert action.default == "auto" and tuple(action.choices) == DEVICES == (
            "auto", "cpu", "cuda")
    has = {"featurize", "models.finetune", "models.kfold", "models.distill", "models.evaluate",
           "models.calibrate",
           "models.predict",
           "models.explain", "serve", "benchmarks.ablation", "benchmarks.errors",
           "benchmarks.train_speed"}
    assert bool(devices) == (name in has)


def _write(tmp_path: Path, suffix: str, values: dict) -> Path:
    """``values`` as a TOML or YAML file."""
    import yaml

    path = tmp_path / f"cfg{suffix}"
    if suffix == ".toml":
        def toml(v):
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, list):
                return "[" + ", ".join(toml(x) for x in v) + "]"
            return repr(v) if isinstance(v, (int, float)) else f'"{v}"'
        path.write_text("".join(f"{k} = {toml(v)}\n" for k, v in values.items()))
    else:
        path.write_text(yaml.safe_dump(values))
    return path


CASES = [  # (CLI, its main config class, flags, the same values as config keys)
    ("models.evaluate", "models.evaluate:EvaluateConfig",
     ["--model", "m", "--data", "d", "--n-boot", "20", "--seed", "3", "--tta", "flip",
      "--device", "cpu", "--by", "dataset"],
     {"model": "m", "data": "d", "n_boot": 20, "seed": 3, "tta": "flip", "device": "cpu",
      "by": "dataset"}),
    ("models.finetune", "models.finetune:FinetuneConfig",
     ["--image-size", "48", "64", "--epochs", "2", "--lr", "0.0005", "--resume",
      "--name", "net", "--data", "d", "--workdir", "w"],
     {"image_size": [48, 64], "epochs": 2, "lr": 0.0005, "resume": True, "name": "net",
      "data": "d", "workdir": "w"}),
    ("models.train_head", "models.train_head:HeadConfig",
     ["--features", "classical", "--metadata", "--trials", "2", "--train-fraction", "0.5",
      "--refit-only"],
     {"features": "classical", "metadata": True, "trials": 2, "train_fraction": 0.5,
      "refit_only": True}),
    ("models.ensemble", "models.ensemble:EnsembleCommand",
     ["--members", "a", "b", "--name", "ens", "--weights", "equal"],
     {"members": ["a", "b"], "name": "ens", "weights": "equal"}),
    ("benchmarks.tta_cost", "benchmarks.tta_cost:TtaCostConfig",
     ["--model", "m", "--tta", "none", "d4"], {"model": "m", "tta": ["none", "d4"]}),
]


def _config(name: str, cls_path: str, argv: list[str]):
    mod, cls = cls_path.split(":")
    args = _module(name).build_parser().parse_args(argv)
    return args, config_from_args(getattr(importlib.import_module(mod), cls), args)


@pytest.mark.parametrize("name, cls_path, flags, values", CASES)
def test_toml_and_yaml_config_give_the_flags_config(name: str, cls_path: str, flags: list,
                                                    values: dict, tmp_path: Path) -> None:
    from_flags, cfg = _config(name, cls_path, flags)
    for suffix in (".toml", ".yaml"):
        path = _write(tmp_path, suffix, values)
        assert read_config_file(path) == values
        from_file, cfg_file = _config(name, cls_path, ["--config", str(path)])
        assert cfg_file == cfg
        assert config_values(from_file) == config_values(from_flags)


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, ".yaml", {"features": "classical", "metadata": True, "trials": 4,
                                      "split_seed": None, "name": "from_file"})
    _, cfg = _config("models.train_head", "models.train_head:HeadConfig",
                     ["--trials", "2", "--config", str(path), "--no-metadata", "--name", "x"])
    assert (cfg.features, cfg.metadata, cfg.trials, cfg.name) == ("classical", False, 2, "x")
    assert cfg.split_seed is None
    # a required option may come from the file alone
    _, cfg = _config("models.train_head", "models.train_head:HeadConfig",
                     ["--config", str(path)])
    assert (cfg.metadata, cfg.trials, cfg.name) == (True, 4, "from_file")


def test_unknown_keys_are_refused_in_one_line(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, ".toml", {"model": "m", "data": "d", "n_boots": 3, "colour": "x"})
    code, out, err = _run("models.evaluate", ["--config", str(path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unknown keys in" in err and "colour, n_boots" in err and "Traceback" not in err


@pytest.mark.parametrize("name, values, message", [
    ("models.evaluate", {"model": "m", "data": "d", "n_boot": -1}, "must be >= 0, got -1"),
    ("models.evaluate", {"model": "m", "data": "d", "tta": "rot"}, "invalid choice: 'rot'"),
    ("models.predict", {"model": "m", "images": ["x.jpg"]}, "unknown key in"),
    ("models.train_head", {"features": "classical", "metadata": "yes"},
     "metadata must be true or false"),
    ("models.train_head", {"features": "classical", "fit": {"a": 1}}, "fit is a table"),
])
def test_bad_file_values_fail_like_bad_flags(name: str, values: dict, message: str,
                                             tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, ".yaml", values)
    code, _, err = _run(name, ["--config", str(path), "x.jpg"] if name == "models.predict"
                        else ["--config", str(path)], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_config_file_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("n_boot = = 3\n")
    with pytest.raises(LesionLabError, match="is not valid TOML"):
        read_config_file(bad)
    with pytest.raises(LesionLabError, match="expected a .toml, .yaml or .yml file"):
        read_config_file(tmp_path / "c.json")
    with pytest.raises(LesionLabError, match="cannot read --config"):
        read_config_file(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(LesionLabError, match="must map option names to values"):
        read_config_file(tmp_path / "list.yaml")
    (tmp_path / "empty.yml").write_text("")
    assert read_config_file(tmp_path / "empty.yml") == {}


def test_save_config_beside_a_file_and_in_a_folder(tmp_path: Path) -> None:
    from models.evaluate import EvaluateConfig

    cfg = EvaluateConfig(model=Path("m"), data=Path("d"), out=tmp_path / "scores.json")
    written = save_config(tmp_path / "scores.json", cfg, "python -m models.evaluate")
    assert written == tmp_path / "scores.json.config.yaml"
    assert read_config_file(written) == {
        "model": "m", "data": "d", "labels": "auto", "label_map": None, "by": None,
        "out": str(tmp_path / "scores.json"), "workdir": None, "n_boot": 1000, "seed": 0,
        "device": "auto", "tta": None, "keep_train_overlap": False}
    assert save_config(tmp_path, argparse.Namespace(config=None, a=(1, 2))) == \
        tmp_path / SAVED_CONFIG
    assert read_config_file(tmp_path / SAVED_CONFIG) == {"a": [1, 2]}


def test_saved_config_of_a_train_head_run_reruns_to_the_same_config(tmp_path: Path,
                                                                    capsys) -> None:
    from featurize.extract import FeaturizeConfig, featurize
    from lesionlab.data import load_dataset
    from models.train_head import HeadConfig

    work = tmp_path / "w"
    featurize(load_dataset(FIXTURE), work, FeaturizeConfig(backbone="classical",
                                                           num_workers=0))
    argv = ["--features", "classical", "--trials", "1", "--folds", "2", "--n-boot", "20",
            "--data", str(FIXTURE), "--workdir", str(work), "--name", "cfg_head"]
    code, out, err = _run("models.train_head", argv, capsys)
    assert code == 0, err[-500:]
    saved = work / "models" / "cfg_head" / SAVED_CONFIG
    text = saved.read_text()
    assert text.startswith("# resolved config of `python -m models.train_head`")
    values = read_config_file(saved)
    assert values["features"] == "classical" and values["trials"] == 1
    assert values["workdir"] == str(work) and values["refit_only"] is False
    first, cfg = _config("models.train_head", "models.train_head:HeadConfig", argv)
    again, cfg_again = _config("models.train_head", "models.train_head:HeadConfig",
                               ["--config", str(saved)])
    assert cfg_again == cfg and config_values(again) == config_values(first)
    assert cfg == HeadConfig(features="classical", trials=1, folds=2, n_boot=20,
                             name="cfg_head")
    # re-running from the saved file writes the same resolved config
    code, _, err = _run("models.train_head", ["--config", str(saved)], capsys)
    assert code == 0, err[-500:]
    assert saved.read_text() == text


def test_an_abbreviated_config_flag_is_refused(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, ".yaml", {"model": "m", "data": "d"})
    code, _, err = _run("models.evaluate", ["--conf", str(path), "--model", "m", "--data", "d"],
                        capsys)
    assert code == 2 and "write --config in full" in err and len(err.strip().splitlines()) == 1
    # the full flag, as --config=FILE too, is read
    args = _module("models.evaluate").build_parser().parse_args([f"--config={path}"])
    assert (args.model, args.data) == (Path("m"), Path("d"))
