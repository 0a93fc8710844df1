"""Checks on the scene sheet beyond its JSON schema: unique ids, files that exist."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import pandas as pd

from .errors import InputError

TRAINING_ROLES = ("base", "transfer")
# retention: scenes of the pretrained model's domain (its road type labelled), classified and
# evaluated apart from the test scenes to show what a transfer model keeps.
LABELLED_ROLES = ("base", "transfer", "test", "retention")


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


def check_scene_sizes(df: pd.DataFrame, sheet: str | Path, *, tile_size: int, max_nodata_fraction: float) -> None:
    """At DAG time, from the headers: a training scene too small to give one tile fails now, not in training.

    A scene smaller than a tile gives one window padded with nodata; it is skipped when
    the padding is more than ``max_nodata_fraction`` of it. Images that do not exist yet
    (made by a rule) are checked by the export step itself.
    """
    import rasterio

    for row in df.itertuples(index=False):
        if row.role not in TRAINING_ROLES or not Path(row.image).is_file():
            continue
        try:
            with rasterio.open(row.image) as src:
                w, h = src.width, src.height
        except rasterio.errors.RasterioIOError as exc:
            raise InputError(row.image, f"cannot be opened as a raster ({exc})", f"fix or replace the image of scene {row.scene_id!r} in {sheet}") from exc
        covered = min(w, tile_size) * min(h, tile_size) / tile_size**2
        if 1 - covered > max_nodata_fraction:
            raise InputError(row.image, f"scene {row.scene_id!r} is {w}x{h} px, too small for one {tile_size} px tile ({100 * (1 - covered):.0f}% of it would be padding, more than tiles.max_nodata_fraction {max_nodata_fraction})",
                             "use a smaller tiles.tile_size, a larger scene, or a higher tiles.max_nodata_fraction")
