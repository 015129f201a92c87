"""Write the version-2 card fixtures: a tiny head, fine-tuned network and ensemble folder made
on the committed fixture, and their probabilities on a few of its images.

The folders were written by lesionlab while cards were at schema version 2; tests load them
through the card migrations and check that they still predict the same. Rebuilding them with a
newer lesionlab writes newer cards, so this is kept for the record only.

Usage (from the repository root): python tests/make_cards_v2.py tests/fixtures/cards_v2
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import timm
import torch

from featurize.extract import FeaturizeConfig, featurize
from lesionlab.data import load_dataset
from models.ensemble import EnsembleConfig, build_ensemble
from models.finetune import FinetuneConfig, finetune
from models.folder import load_model_folder
from models.train_head import HeadConfig, train_head
from tests.conftest import FIXTURE

BACKBONE = "test_efficientnet"  # timm's tiny test network: a small weights file
IMAGES = 3  # fixture images whose probabilities are recorded
# what a folder needs to predict (no tuning study, resume checkpoint or lock)
SKIP = shutil.ignore_patterns("study*", "*.db", "checkpoint.pt", ".lock*", "*.lock")


def main(dest: str) -> None:
    dest_p = Path(dest)
    dest_p.mkdir(parents=True, exist_ok=True)
    init = dest_p / f"{BACKBONE}_init.pt"  # the network's starting weights (read on load)
    torch.manual_seed(0)
    torch.save(timm.create_model(BACKBONE, pretrained=False).state_dict(), init)
    ds = load_dataset(FIXTURE)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        featurize(ds, work, FeaturizeConfig(backbone="classical", num_workers=0))
        head = train_head(ds, work, HeadConfig(features="classical", metadata=True, trials=1,
                                               folds=2, n_boot=0, name="head"))
        net = finetune(ds, work, FinetuneConfig(backbone=BACKBONE, weights=str(init),
                                                epochs=1, image_size=(48, 64), batch_size=16,
                                                num_workers=0, n_boot=0, tta="none",
                                                name="finetune"))
        dirs = [work / "models" / c.name for c in (head, net)]
        build_ensemble(dirs, ds, work, EnsembleConfig(members=[], name="ensemble", n_boot=0))
        expected = {"image_ids": ds.frame["image_id"].tolist()[:IMAGES]}
        paths = ds.frame["path"].tolist()[:IMAGES]
        meta = ds.frame[["age", "sex", "localization"]].iloc[:IMAGES]
        for name in ("head", "finetune", "ensemble"):
            shutil.rmtree(dest_p / name, ignore_errors=True)
            shutil.copytree(work / "models" / name, dest_p / name, ignore=SKIP)
            with load_model_folder(dest_p / name, "cpu") as model:
                expected[name] = model.predict_proba(paths, meta).tolist()
    (dest_p / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
