"""lesionlab.images (issue 21 item 4): EXIF orientation, the aspect policy, the minimum size,
every Pillow format found by id, ids with their extension, symlinked folders."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesionlab import images
from lesionlab.data import load_external_labels, load_rgb
from lesionlab.errors import ImageError, LesionLabError, flush_warnings, warning_counts
from tests.conftest import FIXTURE, ROOT, needs_shared

CASES = ROOT.parent / "shared" / "cases"
EXIF = CASES / "exif"
FORMATS = CASES / "formats"
FIXTURE_IMAGES = sorted((FIXTURE / "images").glob("*.jpg"))


def _needs(folder: Path) -> None:
    needs_shared(folder, "the real-world cases folder")


def _bands(tmp_path: Path, w: int, h: int) -> Path:
    """A w x h RGB PNG whose column x holds value x % 256 in every channel (so a crop's columns
    tell where; RGB, not grey, so it raises no grey-image warning)."""
    arr = np.tile((np.arange(w) % 256).astype(np.uint8), (h, 1))
    path = tmp_path / f"bands_{w}x{h}.png"
    Image.fromarray(np.stack([arr] * 3, axis=-1)).save(path)
    return path


# --- orientation ------------------------------------------------------------------------------

def test_exif_orientation_6_reads_as_the_upright_photo() -> None:
    _needs(EXIF)
    turned = np.asarray(images.read_image(EXIF / "exif_orient6.jpg"), np.float64)
    upright = np.asarray(images.read_image(EXIF / "upright_portrait.jpg"), np.float64)
    assert turned.shape == upright.shape == (200, 150, 3)  # portrait: H > W
    assert np.abs(turned - upright).mean() < 2.0  # the same pixels, but for JPEG noise
    assert images.image_size(EXIF / "exif_orient6.jpg") == (150, 200)  # headers agree


def test_exif_photo_and_upright_photo_get_the_same_probabilities(trained_models,
                                                                  tmp_path: Path) -> None:
    """Lossless (PNG with Orientation=6 vs the upright PNG): identical probabilities. The
    shipped JPEG pair differs by JPEG noise (mean 1 grey level), which these barely trained
    models amplify: measured up to 0.012 (0.14 before orientation was applied, issue 21)."""
    _needs(EXIF)
    from models.predict import predict_proba

    upright = Image.open(EXIF / "upright_portrait.jpg").convert("RGB")
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape: display after a quarter turn clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned.png", exif=exif)
    lossless = [str(tmp_path / "turned.png"), str(tmp_path / "upright.png")]
    jpegs = [str(EXIF / "exif_orient6.jpg"), str(EXIF / "upright_portrait.jpg")]
    for kind in ("finetune", "head"):
        proba = predict_proba(trained_models[kind], lossless + jpegs, device="cpu")
        assert proba.shape == (4, 7)
        np.testing.assert_allclose(proba[0], proba[1], atol=1e-6)
        np.testing.assert_allclose(proba[2], proba[3], atol=0.03)


def test_gradcam_overlay_of_a_portrait_photo_is_portrait(trained_models, tmp_path: Path) -> None:
    _needs(EXIF)
    from models.explain import explain_images

    res = explain_images(trained_models["finetune"], [str(EXIF / "exif_orient6.jpg")],
                         tmp_path, device="cpu")
    assert "error" not in res[0], res
    with Image.open(res[0]["overlay"]) as overlay:
        assert overlay.size == (150, 200)  # the upright image's (W, H)


# --- aspect policy and minimum size -------------------------------------------------------------

def test_training_aspect_images_are_untouched() -> None:
    for path in FIXTURE_IMAGES[:3]:  # 200x150, HAM10000's 4:3
        with Image.open(path) as img:
            raw = np.asarray(img.convert("RGB"))
        for aspect in (4 / 3, images.median_aspect(FIXTURE_IMAGES)):
            assert np.array_equal(np.asarray(images.read_image(path, aspect)), raw)
    assert images.median_aspect(FIXTURE_IMAGES) == 1.3333


@pytest.mark.parametrize("w, h, box, warns", [
    (300, 400, (0, 87, 300, 312), True),   # portrait 3:4 -> 300x225, centre rows
    (400, 400, (0, 50, 400, 350), False),  # square: 1.33x apart, cropped without a warning
    (2000, 100, (933, 0, 1066, 100), True),  # a strip: 133x100 from the middle
    (200, 150, (0, 0, 200, 150), False),   # 4:3 already
])
def test_other_aspects_are_centre_cropped_never_stretched(tmp_path: Path, w: int, h: int,
                                                          box: tuple, warns: bool) -> None:
    flush_warnings()
    path = _bands(tmp_path, w, h)
    assert images.crop_box((w, h), 4 / 3) == box
    out = images.read_image(path, 4 / 3)
    assert out.size == (box[2] - box[0], box[3] - box[1])
    assert abs(out.width / out.height - 4 / 3) < 0.01
    cols = np.asarray(out)[0, :, 0]  # grey = original column: a crop, not a resize
    assert cols.tolist() == [x % 256 for x in range(box[0], box[2])]
    assert warning_counts().get("image aspect centre-cropped", 0) == int(warns)
    assert images.read_image(path).size == (w, h)  # no aspect given: the image as it is
    flush_warnings()


def test_the_crop_warning_is_counted_once_per_kind(tmp_path: Path) -> None:
    flush_warnings()
    for w, h in ((300, 400), (2000, 100), (100, 2000)):
        images.read_image(_bands(tmp_path, w, h), 4 / 3)
    assert warning_counts() == {"image aspect centre-cropped": 3}
    flush_warnings()


@pytest.mark.parametrize("w, h", [(1, 1), (15, 400), (600, 8)])
def test_too_small_images_are_refused_naming_the_file(tmp_path: Path, w: int, h: int) -> None:
    path = tmp_path / f"tiny_{w}x{h}.png"
    Image.new("RGB", (w, h), (120, 60, 40)).save(path)
    for read in (load_rgb, lambda p: images.read_image(p, 4 / 3)):
        with pytest.raises(ImageError, match=rf"image too small: .*tiny_{w}x{h}\.png is "
                                             rf"{w}x{h} pixels.* {images.MIN_SIDE} px"):
            read(path)


def test_a_folder_or_an_empty_file_is_named_so_not_a_corrupt_image(tmp_path: Path) -> None:
    folder = tmp_path / "ISIC_0000000.jpg"  # a folder with an image's name
    folder.mkdir()
    for read in (images.read_image, images.image_size):
        with pytest.raises(ImageError, match=r"not an image but a folder: .*ISIC_0000000"):
            read(folder)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for read in (images.read_image, images.image_size):
        with pytest.raises(ImageError, match=r"empty file: .*empty\.jpg \(0 bytes"):
            read(empty)


class _ReadsOne:
    """A one-item map-style dataset that reads ``path`` (module level: workers pickle it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(images.read_image(self.path))


def test_an_image_error_keeps_its_type_and_line_through_a_dataloader_worker(
        tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from lesionlab.cli import one_line

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(FIXTURE_IMAGES[0].read_bytes()[:200])  # a truncated JPEG
    with pytest.raises(ImageError,
                       match=r"^corrupt or unreadable image: .*broken\.jpg") as direct:
        images.read_image(bad)
    with pytest.raises(ImageError) as wrapped:
        next(iter(DataLoader(_ReadsOne(bad), num_workers=1)))
    assert str(wrapped.value).startswith("Caught ImageError in DataLoader worker process 0")
    assert one_line(wrapped.value) == str(direct.value)


def test_a_1x1_image_is_an_error_line_in_predict(trained_models, tmp_path: Path) -> None:
    from models.predict import predict_images

    tiny = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (200, 100, 50)).save(tiny)
    res = predict_images(trained_models["head"], [str(tiny), str(FIXTURE_IMAGES[0])],
                         device="cpu")
    assert res[0]["error"].startswith("image too small") and "one.png" in res[0]["error"]
    assert res[1]["prediction"]


def test_recorded_aspects(trained_models) -> None:
    for kind in ("head", "finetune"):
        card = json.loads((trained_models[kind] / "card.json").read_text())
        if kind == "head":  # in its feature blocks, and nowhere else
            assert [b["input_aspect"] for b in card["details"]["features"]] == [1.3333]
            assert "input_aspect" not in card and "input_aspect" not in card["details"]
        else:
            assert card["details"]["input_aspect"] == 1.3333
    assert images.model_aspect(None) == 4 / 3
    with pytest.raises(LesionLabError, match="input_aspect must be a positive number"):
        images.model_aspect(-1.0, "card.json")


def test_cache_key_is_unchanged_at_4_3_and_names_another_aspect() -> None:
    from featurize.extract import FeaturizeConfig, cache_key

    at = {a: cache_key(FeaturizeConfig(backbone="classical", input_aspect=a), "ab" * 32,
                       "cd" * 8) for a in (None, 1.3333, 1.0)}
    assert at[None] == at[1.3333] == "classical-150x200-none-avg-wabababab-dcdcdcdcd"
    assert at[1.0] == "classical-150x200-none-avg-a1.0000-wabababab-dcdcdcdcd"


# --- formats and ids ---------------------------------------------------------------------------

def test_every_case_format_decodes_to_rgb8_of_its_size() -> None:
    _needs(FORMATS)
    files = sorted(FORMATS.iterdir())
    assert {p.suffix for p in files} >= {".webp", ".tif", ".png", ".jpg"}
    for path in files:
        arr = np.asarray(images.read_image(path, 4 / 3))
        assert arr.dtype == np.uint8 and arr.shape == (150, 200, 3), path.name


def test_every_case_format_holds_the_reference_lesions_pixels() -> None:
    """Each case is ISIC_0029454 (in the fixture) saved another way; each must read as that
    image's pixels, exactly where the format is lossless (measured: TIFF and RGBA PNG equal
    the JPEG's decode; CMYK JPEG within 6 levels, mean 0.59; the WebPs mean 2.55)."""
    _needs(FORMATS)
    ref_img = Image.open(FIXTURE / "images" / "ISIC_0029454.jpg").convert("RGB")
    ref = np.asarray(images.read_image(FIXTURE / "images" / "ISIC_0029454.jpg", 4 / 3), int)

    def read(name: str) -> np.ndarray:
        return np.asarray(images.read_image(FORMATS / name, 4 / 3), int)

    for name in ("lesion.tif", "rgba.png"):  # lossless copies (RGBA: alpha dropped)
        np.testing.assert_array_equal(read(name), ref, err_msg=name)
    cmyk = np.abs(read("cmyk.jpg") - ref)
    assert cmyk.max() <= 8 and cmyk.mean() < 1.0  # CMYK JPEG round trip, not another colour
    webp = read("lesion.webp")
    np.testing.assert_array_equal(webp, read("ISIC_0029454.webp"))
    assert 1.0 < np.abs(webp - ref).mean() < 4.0  # lossy, but this image
    luma = np.asarray(ref_img.convert("L"), int)  # ITU-R 601-2 luma, Pillow's grey
    gray8 = read("gray8.png")
    np.testing.assert_array_equal(gray8, np.stack([luma] * 3, -1))
    np.testing.assert_array_equal(read("gray16.png"), gray8)  # 16-bit scaled to 8, exactly
    assert np.abs(read("gray.jpg") - gray8).max() <= 6  # the grey JPEG's own loss
    web = np.asarray(ref_img.convert("P").convert("RGB"), int)  # Pillow's dithered web palette
    np.testing.assert_array_equal(read("palette.png"), web)


def test_grey_transparent_and_palette_cases_get_a_counted_warning_each() -> None:
    """The reported formats decode, and the ones whose RGB conversion loses colour, hidden
    pixels or colours say so once per kind, counted; colour RGB and CMYK images say nothing."""
    _needs(FORMATS)
    expected = {"gray.jpg": "grey image read as RGB", "gray8.png": "grey image read as RGB",
                "gray16.png": "grey image read as RGB", "rgba.png": "alpha channel dropped",
                "palette.png": "palette image", "cmyk.jpg": None, "lesion.tif": None,
                "lesion.webp": None, "ISIC_0029454.webp": None}
    for name, key in expected.items():
        flush_warnings()
        images.read_image(FORMATS / name, 4 / 3)
        assert warning_counts() == ({key: 1} if key else {}), name
    flush_warnings()
    for name in ("gray.jpg", "gray8.png", "gray16.png"):
        images.read_image(FORMATS / name)
    assert warning_counts() == {"grey image read as RGB": 3}  # one line, counted
    for name in ("gray.jpg", "gray8.png"):  # read again (predict checks, then predicts)
        images.read_image(FORMATS / name)
    assert warning_counts() == {"grey image read as RGB": 3}  # counted per image, not per read
    flush_warnings()


def test_extensions_come_from_pillow_any_case() -> None:
    exts = images.image_extensions()
    assert {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp"} <= exts
    assert ".h5" not in exts and ".csv" not in exts  # a stub, and no image
    assert images.is_image_file("X.WEBP") and images.is_image_file("a.TiFf")


def _labelled(root: Path, ids: list[str]) -> None:
    meta = pd.read_csv(FIXTURE / "HAM10000_metadata.csv").iloc[:len(ids)].copy()
    meta["image_id"] = ids
    meta.to_csv(root / "labels.csv", index=False)


def test_evaluate_finds_a_webp_and_ids_with_their_extension(trained_models,
                                                            tmp_path: Path) -> None:
    _needs(FORMATS)
    from models.evaluate import evaluate_model

    (tmp_path / "imgs").mkdir()
    shutil.copy(FORMATS / "ISIC_0029454.webp", tmp_path / "imgs")
    shutil.copy(FORMATS / "lesion.tif", tmp_path / "imgs" / "LESION.TIFF")
    for p in FIXTURE_IMAGES[:4]:
        shutil.copy(p, tmp_path / "imgs" / p.name)
    ids = ["ISIC_0029454", "LESION.TIFF", FIXTURE_IMAGES[0].name] + \
        [p.stem for p in FIXTURE_IMAGES[1:4]]
    _labelled(tmp_path, ids)
    ds = load_external_labels(tmp_path)
    assert [Path(p).name for p in ds.frame["path"]] == \
        ["ISIC_0029454.webp", "LESION.TIFF"] + [p.name for p in FIXTURE_IMAGES[:4]]
    res = evaluate_model(trained_models["head"], ds, n_boot=0, device="cpu")
    assert res["overall"]["n"] == 6


def test_symlinked_sub_folders_are_followed_and_loops_end(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    os.symlink(FIXTURE / "images", tmp_path / "data" / "linked")
    os.symlink(tmp_path / "data", tmp_path / "data" / "loop")  # a link to its own parent
    _labelled(tmp_path / "data", [p.stem for p in FIXTURE_IMAGES])
    ds = load_external_labels(tmp_path / "data")
    assert len(ds) == len(FIXTURE_IMAGES)
    assert all("/linked/" in p and "/loop/" not in p for p in ds.frame["path"])


def test_one_id_in_two_files_is_refused_naming_both(tmp_path: Path) -> None:
    src = FIXTURE_IMAGES[0]
    shutil.copy(src, tmp_path / src.name)
    Image.open(src).save(tmp_path / f"{src.stem}.png")
    index = images.index_images(tmp_path)
    with pytest.raises(LesionLabError, match=rf"{src.stem}'? is ambiguous.*{src.stem}\.jpg"
                                             rf".*{src.stem}\.png"):
        index.find(src.stem)
    assert index.find(f"{src.stem}.png") == tmp_path / f"{src.stem}.png"  # the extension picks
    assert index.find("ISIC_none") is None and index.find("ISIC_none.jpg") is None
