"""Rebuild the test fixture: whole lesions, about 12 images per class, from a HAM10000 copy.

Usage: python tests/make_fixture.py ../shared/data/ham10000 tests/fixtures/ham_small
"""

import shutil
import sys
from pathlib import Path

import pandas as pd

PER_CLASS = 12


def main(src: str, dest: str) -> None:
    src_p, dest_p = Path(src), Path(dest)
    meta = pd.read_csv(src_p / "HAM10000_metadata.csv")
    rows = []
    for dx, group in meta.groupby("dx"):
        lesions = group.drop_duplicates("lesion_id").sample(frac=1.0, random_state=0)["lesion_id"]
        taken = 0
        for lesion in lesions:  # whole lesions, so grouping is exercised
            imgs = group[group["lesion_id"] == lesion]
            rows.append(imgs)
            taken += len(imgs)
            if taken >= PER_CLASS:
                break
    sub = pd.concat(rows)
    (dest_p / "images").mkdir(parents=True, exist_ok=True)
    for image_id in sub["image_id"]:
        shutil.copy(src_p / "images" / f"{image_id}.jpg", dest_p / "images" / f"{image_id}.jpg")
    sub.to_csv(dest_p / "HAM10000_metadata.csv", index=False)
    print(sub["dx"].value_counts().to_string(), sub["lesion_id"].nunique(), "lesions")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
