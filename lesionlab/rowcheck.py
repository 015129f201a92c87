"""Row checks of a labels table: an image listed twice, blank lesion ids.

One rule for every labels file (training metadata and evaluation labels): an image listed
twice with identical rows is counted once, with a counted warning; listed with different
values (another class, another lesion) it is an error naming the image ids, since no row can
be chosen without guessing. A lesion id that is empty or only whitespace is blank.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lesionlab.errors import LesionLabError, warn_once

SHOWN_IDS = 5  # image ids named in a message


def blank_lesion_ids(lesion_ids: pd.Series) -> pd.Series:
    """(n,) bool: the lesion id is missing, empty or only whitespace."""
    return lesion_ids.isna() | (lesion_ids.astype(str).str.strip() == "")


def drop_repeated_images(meta: pd.DataFrame, source: Path | str) -> pd.DataFrame:
    """``meta`` with each image listed once (its first row).

    Args:
        meta: (n_rows, n_columns) a labels table with an ``image_id`` column.
        source: the file it was read from, named in messages.

    Returns:
        (n_images, n_columns) ``meta`` without repeated identical rows (same index labels as
        the rows kept).

    Raises:
        LesionLabError: an image is listed twice with different values (one line naming the
            image ids and the columns that differ).
    """
    ids = meta["image_id"].astype(str)
    repeated = ids.duplicated(keep=False)
    if not repeated.any():
        return meta
    rows = meta[repeated].astype(str).assign(_id=ids[repeated])
    per_image = rows.drop(columns="_id").groupby(rows["_id"]).nunique()
    differ = per_image.gt(1)
    conflicting = per_image.index[differ.any(axis=1)].tolist()
    if conflicting:
        columns = [c for c in differ.columns if differ[c].any()]
        raise LesionLabError(
            f"{source} lists {len(conflicting)} image(s) twice with different {columns}: "
            f"{conflicting[:SHOWN_IDS]}{' ...' if len(conflicting) > SHOWN_IDS else ''}; "
            f"keep one row per image")
    extra = int(ids.duplicated().sum())
    names = sorted(set(ids[repeated]))
    warn_once(f"{source} lists {len(names)} image(s) more than once with identical rows "
              f"(e.g. {names[:SHOWN_IDS]}); {extra} repeated row(s) dropped, each image "
              f"counted once", key=f"repeated-rows:{source}")
    return meta[~ids.duplicated()]
