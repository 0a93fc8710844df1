"""Checks on the scene sheet beyond its JSON schema: unique ids, files that exist."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import pandas as pd

from .errors import InputError

TRAINING_ROLES = ("base", "transfer")
LABELLED_ROLES = ("base", "transfer", "test")


def read_sheet(path: str | Path) -> pd.DataFrame:
    """Read the TSV scene sheet as strings (empty cells stay empty strings)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "scene sheet does not exist", "create it (see config/scenes.tsv) or fix `scenes:` in the config")
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    if df.empty:
        raise InputError(path, "scene sheet has no rows", "add one row per scene")
    return df


def check_sheet(df: pd.DataFrame, sheet: str | Path, *, producible: Collection[str] = ()) -> pd.DataFrame:
    """Check ids are unique and every referenced file exists (or a rule can make it).

    Returns the sheet indexed by ``scene_id``. Errors name the row (1-based data row,
    as a spreadsheet shows it below the header) and the scene.
    """
    producible = {str(Path(p)) for p in producible}
    dup = df["scene_id"][df["scene_id"].duplicated()]
    if len(dup):
        raise InputError(sheet, f"scene_id {dup.iloc[0]!r} appears more than once", "give every row a unique scene_id")
    for i, row in enumerate(df.itertuples(index=False), start=1):
        where = f"row {i} (scene {row.scene_id!r})"
        columns = ["image"] + (["labels"] if row.role in LABELLED_ROLES else [])
        for col in columns:
            value = getattr(row, col, "")
            if not value:
                raise InputError(sheet, f"{where} has role {row.role!r} but no {col}", f"fill in the {col} column")
            if str(Path(value)) not in producible and not Path(value).exists():
                raise InputError(sheet, f"{where}: {col} file {value!r} does not exist", "fix the path (relative paths are relative to the working directory)")
    return df.set_index("scene_id", drop=False)
