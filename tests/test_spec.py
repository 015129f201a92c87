"""``--features`` specs parsed once (featurize.spec); study rows carry typed fields, and the
report's tables read those, never a display label (benchmarks.rows)."""

from __future__ import annotations

import pytest

from featurize.extract import feature_spec
from featurize.spec import FeatureBlock, format_features, parse_features
from lesionlab.card import ModelCard
from lesionlab.card_blocks import HeadRecord, HeadSettings
from lesionlab.errors import LesionLabError

KFOLD = "kfold__k3__finetune__tf_efficientnet_lite0__200x150__isic__balanced__ce__seed0"
FOLD = "runs/models/finetune__tf_efficientnet_lite0__200x150__cv1of3__seed0"

# every form of spec the code writes (presets, feature_spec, the CLI's documented examples)
FORMS = {
    "tf_efficientnet_lite0": [("backbone", "tf_efficientnet_lite0", ())],
    "tf_efficientnet_lite0:none": [("backbone", "tf_efficientnet_lite0", ("none",))],
    "tf_efficientnet_lite0:none,avg,168x224": [
        ("backbone", "tf_efficientnet_lite0", ("none", "avg", "168x224"))],
    "classical": [("classical", "classical", ())],
    "classical:w0123abcd,48x64": [("classical", "classical", ("w0123abcd", "48x64"))],
    "tf_efficientnet_lite0:multistage+tf_efficientnet_lite1:multistage+classical": [
        ("backbone", "tf_efficientnet_lite0", ("multistage",)),
        ("backbone", "tf_efficientnet_lite1", ("multistage",)), ("classical", "classical", ())],
    f"oof:{KFOLD}": [("oof", KFOLD, ())],
    f"oof:{KFOLD}+classical": [("oof", KFOLD, ()), ("classical", "classical", ())],
    f"{FOLD}:flip": [("finetuned", FOLD, ("flip",))],
    "ft_finetune__a-48x64-none-avg-w0123abcd-d0123abcd": [
        ("finetuned", "ft_finetune__a-48x64-none-avg-w0123abcd-d0123abcd", ())],
    "tf_efficientnet_lite0:d4,avg,shades_of_gray,200x150": [
        ("backbone", "tf_efficientnet_lite0", ("d4", "avg", "shades_of_gray", "200x150"))],
}


@pytest.mark.parametrize("spec", list(FORMS))
def test_every_spec_form_parses_to_typed_blocks_and_formats_back(spec: str) -> None:
    blocks = parse_features(spec)
    assert [(b.kind, b.source, b.options) for b in blocks] == FORMS[spec]
    assert format_features(blocks) == spec
    assert tuple(FeatureBlock.from_dict(b.to_dict()) for b in blocks) == blocks


def test_options_are_typed_and_preset_specs_round_trip() -> None:
    from benchmarks.run_all import plan_for

    [block] = parse_features("classical:none,shades_of_gray,48x64,w0123abcd")
    assert block.words == {"none", "shades_of_gray"}
    assert block.image_size == (48, 64) and block.weights == "0123abcd"
    assert parse_features(" a:flip + classical ") == (FeatureBlock("backbone", "a", ("flip",)),
                                                     FeatureBlock("classical", "classical"))
    settings = {"backbone": "b", "tta": "flip", "pool": "avg", "image_size": [168, 224],
                "color_constancy": "shades_of_gray"}
    assert format_features(parse_features(feature_spec(settings))) == \
        "b:flip,avg,shades_of_gray,168x224"
    specs = {c.config.features for p in ("quick", "full") for c in
             plan_for(p, 0).cells + plan_for(p, 0).late_cells if c.kind == "head"}
    assert len(specs) >= 10
    for spec in specs:
        assert format_features(parse_features(spec)) == spec
    from models.train_head import HeadConfig

    with pytest.raises(LesionLabError, match="unknown option 'flipp'"):
        HeadConfig(features="classical:flipp").validate()  # refused before any work


@pytest.mark.parametrize("spec, part, why", [
    ("", "", "empty --features"),
    ("a++b", "", "empty block"),
    ("a:", "a:", "empty option"),
    ("a:flip,", "a:flip,", "empty option"),
    ("classical:bogus", "classical:bogus", "unknown option 'bogus'"),
    ("a:10x10,20x20", "a:10x10,20x20", "two image sizes"),
    ("a:w0123abcd,wdeadbeef", "a:w0123abcd,wdeadbeef", "two weights prefixes"),
    ("oof:", "oof:", "oof: takes one"),
    ("classical+oof:k:flip", "oof:k:flip", "oof: takes one"),
    (":flip", ":flip", "empty source"),
    ("a:168X224", "a:168X224", "unknown option '168X224'"),
])
def test_malformed_specs_raise_one_line_naming_the_part_and_grammar(spec: str, part: str,
                                                                    why: str) -> None:
    with pytest.raises(LesionLabError) as err:
        parse_features(spec)
    text = str(err.value)
    assert "\n" not in text and why in text and "grammar: features := block{+block}" in text
    assert f"in {part!r}" in text or not part
    with pytest.raises(LesionLabError, match="is not valid"):
        FeatureBlock.from_dict({"kind": "oof", "source": "k", "options": ["flip"]})


def test_table_labels_are_made_block_by_block() -> None:
    from models.folder import _head_features_label

    assert _head_features_label(f"oof:{KFOLD}+{FOLD}:flip+classical:48x64") == \
        "oof:lite0 3-fold+ft:lite0 fold 1/3:flip+classical:48x64"
    assert _head_features_label("tf_efficientnet_lite0:none") == "tf_efficientnet_lite0:none"


def _card(features: str, head: str = "lightgbm") -> ModelCard:
    blocks = [{"backbone": b.text() if b.kind == "oof" else b.source}
              for b in parse_features(features)]
    return ModelCard(kind="head", name="m",
                     config=HeadSettings(features=features, head=head, metadata=True),
                     classes=[], val={}, test={}, temperature=1.0, decision_rule="argmax",
                     train_image_ids=[], test_image_ids=[], n_train=0, n_val=0, n_test=0,
                     tune_time_s=0.0, fit_time_s=0.0, total_time_s=0.0, data_fingerprint="",
                     versions={}, details=HeadRecord(features=blocks), provenance={})


def _row(kind: str, val: float, test: float, **fields) -> dict:
    return {"name": f"{kind}{val}", "kind": kind, "train_fraction": 1.0, "metadata": False,
            "val_balanced_accuracy": val, "balanced_accuracy": test, **fields}


def test_report_tables_read_typed_fields_not_labels(monkeypatch) -> None:
    """A stack's row says its blocks and classifier; the table files it under out-of-fold
    probabilities / LightGBM whatever its display label says. A saved row without typed
    fields gets them from its card, in run_all's one upgrade."""
    from benchmarks import run_all as ra
    from benchmarks.report import head_input_md

    card = _card(f"oof:{KFOLD}+classical")
    fields = ra.card_fields(card)
    assert fields["spec"] == {
        "inputs": [{"kind": "oof", "source": KFOLD, "options": []},
                   {"kind": "classical", "source": "classical", "options": []}],
        "head": "lightgbm", "imbalance": "class_weight", "network": None, "members": []}
    assert fields["input"] == "OOF probabilities" and fields["head"] == "stack (lightgbm)"
    typed = _row("head", 0.8, 0.78, **{**fields, "features": "anything", "head": "a label"})
    frozen = _row("head", 0.6, 0.59, **ra.card_fields(_card("classical", "logreg")))
    md = head_input_md([typed, frozen])
    assert "| OOF probabilities | not run | 0.780 (val 0.800) |  |" in md
    assert "| hand-made features | 0.590 (val 0.600) | not run |  |" in md
    # a row saved by the current code before rows carried ``spec``: upgraded from its card
    old = {"name": "m", "kind": "head", "features": "oof:lite0 3-fold+classical",
           "head": "stack (lightgbm)", "imbalance": "class_weight", "input": "OOF probabilities",
           "model_dir": "runs/models/m", "balanced_accuracy": 0.7}
    monkeypatch.setattr(ra, "load_card", lambda path: card)
    upgraded = ra.with_current_labels(old)
    assert upgraded["spec"] == fields["spec"] and upgraded["balanced_accuracy"] == 0.7


def test_old_rows_without_typed_fields_still_render() -> None:
    """Rows (and summaries) saved before rows carried ``spec`` render as before: the typed
    fields are derived from them once, in ``benchmarks.rows``."""
    from benchmarks.report import head_input_md, leaderboard_md, melanoma_md
    from benchmarks.rows import row_spec

    old = [_row("head", 0.8, 0.78, features="oof:lite0 3-fold+classical",
                head="stack (logreg)", imbalance="class_weight", input="OOF probabilities"),
           _row("head", 0.7, 0.65, features="ft:lite0 fold 1/3:flip", head="lightgbm",
                imbalance="smote"),
           _row("finetune", 0.75, 0.7, features="tf_efficientnet_lite0 (fine-tuned 128x96, 1 ep)",
                head="fine-tune", imbalance="balanced sampler, ce")]
    assert row_spec(old[0])["head"] == "logreg" and row_spec(old[1])["imbalance"] == "smote"
    assert row_spec(old[2])["network"] == "tf_efficientnet_lite0"
    assert "| OOF probabilities | 0.780 (val 0.800) | not run |  |" in head_input_md(old)
    board = leaderboard_md([{**r, "ci95": None, "macro_f1": 0.5, "macro_auc": 0.8,
                             "mel_sensitivity": 0.5, "ece": 0.1, "total_time_s": 1.0}
                            for r in old])
    assert "| 1 | oof:lite0 3-fold+classical | stack (logreg) | class_weight |" in board
    mel = melanoma_md([{**r, "mel_operating_point": None} for r in old], None)
    assert "| ft:lite0 fold 1/3:flip | lightgbm (smote) |" in mel
