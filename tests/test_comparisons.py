"""The claims table and the report's comparisons block, on fake rows and probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.comparisons import (Scored, compare_claims, comparisons_md, load_claims,
                                    verdict)
from lesionlab.data import CLASS_INDEX
from lesionlab.errors import LesionLabError

MEL, NV, BCC = CLASS_INDEX["mel"], CLASS_INDEX["nv"], CLASS_INDEX["bcc"]
CLAIMS = """
[[claim]]
id = "good-vs-bad"
claim = "good beats bad"
supports = "s1"
a = { name = "good__seed{seed}" }
b = { name = "bad__seed{seed}" }

[[claim]]
id = "bad-vs-good"
claim = "bad beats good"
supports = "s1"
a = { name = "bad__seed{seed}" }
b = { name = "good__seed{seed}" }

[[claim]]
id = "curve"
claim = "the val-picked curve head beats bad"
supports = "s2"
a = { where = { kind = "head", group = "curve", train_fraction = 0.1 } }
b = { name = "bad__seed{seed}" }

[[claim]]
id = "absent"
claim = "a cell this run lacks"
supports = "s3"
a = { name = "good__seed{seed}" }
b = { name = "never_run" }

[[claim]]
id = "external"
claim = "good beats bad externally"
supports = "s4"
data = "external"
a = { name = "good__seed{seed}" }
b = { name = "bad__seed{seed}" }
"""


def _onehot(pred: np.ndarray) -> np.ndarray:
    p = np.full((len(pred), 7), 0.1 / 6)
    p[np.arange(len(pred)), pred] = 0.9
    return p


def _scored() -> dict[str, Scored]:
    """30 lesions x 2 images of mel, nv, bcc; ``bad`` calls every melanoma a naevus."""
    y = np.repeat([MEL, NV, BCC], 20)
    ids = np.array([f"img{i}" for i in range(60)])
    lesions = np.repeat([f"L{i}" for i in range(30)], 2)
    bad = _onehot(np.where(y == MEL, NV, y))
    return {"good__seed0": Scored(ids, _onehot(y), y, lesions, 0.5),
            # the same images in another order: the comparison aligns them by id
            "bad__seed0": Scored(ids[::-1], bad[::-1], y[::-1], lesions[::-1], 0.5),
            "curve_hi_val": Scored(ids, _onehot(y), y, lesions, 0.5),
            "curve_lo_val": Scored(ids, bad, y, lesions, 0.5)}


ROWS = [{"name": "good__seed0", "kind": "finetune", "val_balanced_accuracy": 0.7},
        {"name": "bad__seed0", "kind": "head", "val_balanced_accuracy": 0.6},
        {"name": "curve_lo_val", "kind": "head", "group": "curve", "train_fraction": 0.1,
         "val_balanced_accuracy": 0.4},
        {"name": "curve_hi_val", "kind": "head", "group": "curve", "train_fraction": 0.1,
         "val_balanced_accuracy": 0.5},
        {"name": "curve_other", "kind": "head", "group": "curve", "train_fraction": 0.25,
         "val_balanced_accuracy": 0.9}]


def test_claims_are_scored_paired_and_rendered(tmp_path: Path) -> None:
    path = tmp_path / "claims.toml"
    path.write_text(CLAIMS, encoding="utf-8")
    scored = _scored()
    res = compare_claims(load_claims(path), ROWS,
                         lambda row, data: scored[row["name"]] if data == "test" else None,
                         seed=0, n_boot=60)
    by = {r["claim"].id: r for r in res}
    good = by["good-vs-bad"]["diffs"]
    assert good["balanced_accuracy"]["difference"] == pytest.approx(1 / 3)
    assert good["balanced_accuracy"]["ci95"] == pytest.approx([1 / 3, 1 / 3])
    assert good["mel_sensitivity"]["difference"] == 1.0
    assert verdict(good["balanced_accuracy"]) == "yes"
    assert verdict(by["bad-vs-good"]["diffs"]["balanced_accuracy"]) == "reversed"
    assert by["curve"]["a"] == "curve_hi_val"  # chosen on val among the 10% curve heads
    assert by["absent"]["diffs"] is None and by["external"]["diffs"] is None
    md = comparisons_md(res, n_boot=60)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines()}
    assert "+0.333 [+0.333, +0.333] *" in lines["good beats bad"]
    assert lines["good beats bad"].endswith("| yes |")
    assert lines["bad beats good"].endswith("| reversed |")
    assert lines["a cell this run lacks"].endswith("| not run |")
    assert "`never_run`" in lines["a cell this run lacks"]
    assert "test (60)" in lines["good beats bad"]


def test_rows_scored_on_other_images_are_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "claims.toml"
    path.write_text(CLAIMS, encoding="utf-8")
    scored = _scored()
    other = scored["bad__seed0"]
    scored["bad__seed0"] = Scored(np.char.add(other.image_ids, "x"), other.proba, other.labels,
                                  other.lesion_ids)
    with pytest.raises(LesionLabError, match="other images") as err:
        compare_claims(load_claims(path)[:1], ROWS, lambda row, data: scored[row["name"]])
    assert "\n" not in str(err.value)


def test_bad_claims_files_are_one_line_errors(tmp_path: Path) -> None:
    path = tmp_path / "claims.toml"
    path.write_text(CLAIMS.replace('supports = "s1"\n', "", 1), encoding="utf-8")
    with pytest.raises(LesionLabError, match="good-vs-bad"):
        load_claims(path)
    path.write_text(CLAIMS.replace('data = "external"', 'data = "val"'), encoding="utf-8")
    with pytest.raises(LesionLabError, match="'val'"):
        load_claims(path)


def test_the_studys_claims_name_cells_of_the_full_plan() -> None:
    from benchmarks.run_all import plan_for

    plan = plan_for("full", 3)
    cells = {c.cell_id for c in plan.cells + plan.late_cells}
    claims = load_claims()
    names = {s.name.format(seed=3) for c in claims for s in (c.a, c.b) if s.name}
    # the one claim the CPU study cannot test (the colour-constancy lever ran on a GPU)
    assert names - cells == {"finetune__tf_efficientnet_lite2__150x200__cc-none__balanced__ce"
                             "__frz2__ep6__seed3"}
    assert len(claims) >= 15 and {c.data for c in claims} == {"test", "external"}
