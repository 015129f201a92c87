"""The recipe levers of ``benchmarks.ablation`` and the study's one adoption rule: data and
arithmetic only, so the report can render the ablation without importing the training code.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# lever -> (what changes, FinetuneConfig overrides); "recipe" is the baseline.
LEVERS: dict[str, tuple[str, dict]] = {
    "recipe": ("the recipe before colour constancy: 200x150, ISIC augmentation, balanced "
               "sampler + CE, stem + 2 blocks frozen, 12 epochs, schedule finished, epoch "
               "chosen on val", {}),
    "weighted_ce": ("inverse-frequency weighted CE instead of the balanced sampler",
                    dict(sampler="none", loss="weighted_ce")),
    "focal": ("focal loss (gamma 2, class weights) instead of the balanced sampler",
              dict(sampler="none", loss="focal")),
    "previous_recipe": ("the previous report's recipe: 160x120, basic augmentation, all layers "
                        "trained, 10 epochs, early stopping with patience 3",
                        dict(image_size=(120, 160), augment="basic", freeze_stages=0, epochs=10,
                             patience=3)),
    "basic_augment": ("basic augmentation (right-angle turns, mild affine) instead of ISIC",
                      dict(augment="basic")),
    "early_stopping": ("early stopping with patience 3 instead of finishing the schedule",
                       dict(patience=3)),
    "train_all_layers": ("nothing frozen", dict(freeze_stages=0)),
    "shades_of_gray": ("Shades of Gray colour constancy (p=6) before training and prediction "
                       "(chosen on val: the study's recipe)",
                       dict(color_constancy="shades_of_gray")),
    "histo_weight_2": ("histopathology-confirmed images weigh 2 in the loss",
                       dict(histo_weight=2.0)),
    "lr_1e-3": ("peak learning rate 1e-3 (recipe: 5e-4)", dict(lr=1e-3)),
    "lr_2.5e-4": ("peak learning rate 2.5e-4 (recipe: 5e-4)", dict(lr=2.5e-4)),
    "size_160x120": ("trained and evaluated at 160x120", dict(image_size=(120, 160))),
    "size_300x225": ("trained and evaluated at 300x225, upsampled from the 200x150 copy (the "
                     "FixRes effect: Touvron et al. 2019)", dict(image_size=(225, 300))),
    "freeze_4": ("stem + 4 blocks frozen", dict(freeze_stages=4)),
    "epochs_20": ("20 epochs (more compute)", dict(epochs=20)),
    "mixup_cutmix": ("MixUp (alpha 0.2) or CutMix (alpha 1.0) on each batch, one of the two "
                     "at random", dict(mixup=0.2, cutmix=1.0)),
    "ema": ("weight EMA (decay 0.999, timm's warm-up): val, the chosen epoch and the network "
            "use the averaged weights", dict(ema_decay=0.999)),
    "no_color_constancy": ("no colour constancy (against --base study, where Shades of Gray "
                           "is on)", dict(color_constancy="none")),
}

# --base: the recipe the levers change, as FinetuneConfig overrides of its defaults
BASES: dict[str, dict] = {"before_color_constancy": dict(color_constancy="none"), "study": {}}
# what the "recipe" row is, per --base
BASE_DESCRIPTIONS = {
    "before_color_constancy": LEVERS["recipe"][0],
    "study": ("the study's recipe (FinetuneConfig()'s defaults): 200x150, ISIC augmentation, "
              "Shades of Gray colour constancy, balanced sampler + CE, stem + 2 blocks frozen, "
              "12 epochs, schedule finished, epoch chosen on val")}

# The adoption rule (REPORT.md section 5, "Recipe ablation"): a lever changes the recipe only
# when its mean val balanced accuracy over >= MIN_SEEDS model seeds differs from the recipe's by
# more than ADOPT_SE standard errors of the difference of the two means (Welch:
# sqrt(sd_a^2 / n_a + sd_b^2 / n_b), sample standard deviations); test and external never enter.
MIN_SEEDS = 3
ADOPT_SE = 2.0



def adoption(lever_val: Sequence[float], recipe_val: Sequence[float]) -> dict:
    """The adoption rule (:data:`ADOPT_SE`) for one lever, from val balanced accuracies.

    Args:
        lever_val: the lever's val balanced accuracy at each model seed, shape ``(n_seeds,)``.
        recipe_val: the recipe's at each model seed, shape ``(n_seeds,)``.

    Returns:
        ``delta`` (mean lever - mean recipe), ``se`` (Welch standard error of that
        difference), ``n`` (the smaller seed count) and ``verdict``: ``"adopt"`` (delta >
        ADOPT_SE x se), ``"reject"`` (delta < -ADOPT_SE x se), ``"no difference"`` (in
        between: the recipe stays) or ``"too few seeds"`` (fewer than :data:`MIN_SEEDS` on
        either side; delta and se are still given where defined).
    """
    a, b = np.asarray(lever_val, float), np.asarray(recipe_val, float)
    n = int(min(a.size, b.size))
    delta = float(a.mean() - b.mean()) if n else float("nan")
    se = (float(np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)) if n >= 2
          else float("nan"))
    if n < MIN_SEEDS:
        verdict = "too few seeds"
    elif delta > ADOPT_SE * se:
        verdict = "adopt"
    elif delta < -ADOPT_SE * se:
        verdict = "reject"
    else:
        verdict = "no difference"
    return {"delta": delta, "se": se, "n": n, "verdict": verdict}
