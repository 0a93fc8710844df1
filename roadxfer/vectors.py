"""Reading road polylines and giving each feature its class value."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio

from .errors import InputError
from .sources import check_local_input

log = logging.getLogger(__name__)

LINE_TYPES = {"LineString", "MultiLineString"}
POLYGON_TYPES = {"Polygon", "MultiPolygon"}


def read_vectors(path: str | Path, *, layer: str | None = None, where: str | None = None) -> gpd.GeoDataFrame:
    """Read features from any OGR vector format, with an optional layer and attribute filter.

    ``where`` is an OGR SQL ``WHERE`` clause, e.g. ``road_type IN ('unpaved', 'trail')``.
    Points are rejected; null or empty geometries are dropped with a log line.
    """
    path = str(path)
    if not Path(path).exists():
        raise InputError(path, "vector labels file does not exist", "check the `labels` column of the scene sheet")
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise InputError(path, "vector labels file is empty (0 bytes)", "re-export the polylines")
    check_local_input(path, vector=True)  # an OGR VRT naming URLs or other files is refused before OGR opens it
    try:
        layers = [name for name, _ in pyogrio.list_layers(path)]
        if layer is not None and layer not in layers:
            raise InputError(path, f"has no layer {layer!r}", f"use one of {layers}")
        if layer is None and len(layers) > 1:
            raise InputError(path, f"has {len(layers)} layers ({', '.join(map(str, layers[:5]))}{'...' if len(layers) > 5 else ''}) and none was chosen",
                             "name the layer: the `layer` column of the scene sheet, or --layer on the command line")
        gdf = pyogrio.read_dataframe(path, layer=layer, where=where or None)
    except InputError:
        raise
    except Exception as exc:  # pyogrio raises several error types for unreadable data
        raise InputError(path, f"cannot be read as vector data ({exc})", "check the file opens in QGIS/ogrinfo and that the `filter` is valid OGR SQL") from exc
    if gdf.crs is None:
        raise InputError(path, "vector labels have no coordinate reference system", "define it, e.g. `ogr2ogr -a_srs EPSG:4326 out.gpkg in.gpkg`")
    if gdf.crs.is_geographic and len(gdf):
        x0, y0, x1, y1 = gdf.total_bounds
        if not (-360 <= x0 and x1 <= 360 and -90 <= y0 and y1 <= 90):  # GeoJSON without a CRS is read as longitude/latitude
            raise InputError(path, f"has coordinates up to ({x1:.0f}, {y1:.0f}) but its CRS {gdf.crs.to_string()} is in degrees: the file does not say its real CRS",
                             "assign the right one, e.g. `ogr2ogr -a_srs EPSG:32611 out.gpkg in.geojson` (GeoJSON without a crs is taken as longitude/latitude)")
    missing = gdf.geometry.isna() | gdf.geometry.is_empty
    if missing.any():
        log.warning("%s: dropping %d feature(s) with empty geometry", path, int(missing.sum()))
        gdf = gdf.loc[~missing].copy()
    if gdf.empty:
        detail = f" matching filter {where!r}" if where else ""
        raise InputError(path, f"contains no features{detail}", "draw training polylines or relax the scene's `filter`")
    kinds = set(gdf.geometry.geom_type)
    points = kinds - LINE_TYPES - POLYGON_TYPES
    if points:
        raise InputError(
            path,
            f"contains {sorted(points)} geometries; only lines (buffered) and polygons (burned as they are) can label roads",
            "digitise roads as polylines, or buffer the points into polygons first",
        )
    return gdf


def class_values(
    gdf: gpd.GeoDataFrame,
    path: str | Path,
    *,
    class_field: str | None = "Classvalue",
    class_value: int | None = None,
    class_map: Mapping[str, Any] | None = None,
    known_values: set[int] | None = None,
) -> np.ndarray:
    """The class value of every feature, as uint8, checked to lie in 1..254.

    Precedence: a constant ``class_value``; else ``class_map`` (``{"field": name,
    "values": {attribute value: class value}}``); else the ``class_field`` column.
    """
    path = str(path)
    if class_value is not None:
        values = pd.Series(class_value, index=gdf.index)
        source = "the config's `labels.class_value`"
    elif class_map:
        field = class_map["field"]
        if field not in gdf.columns:
            raise InputError(path, f"has no attribute {field!r} named by `labels.class_map.field`", f"use one of {list(gdf.columns.drop('geometry'))}")
        mapping = {str(k): v for k, v in class_map["values"].items()}
        keys = gdf[field].astype(str)
        unmapped = sorted(set(keys) - set(mapping))
        if unmapped:
            raise InputError(path, f"attribute {field!r} has values {unmapped} missing from `labels.class_map.values`", "map them, or drop those features with the scene's `filter`")
        values = keys.map(mapping)
        source = f"`labels.class_map` on {field!r}"
    else:
        if class_field is None or class_field not in gdf.columns:
            raise InputError(
                path,
                f"has no class value field {class_field!r}",
                "add the field (integer 1-254), name another with `labels.class_field`, or set `labels.class_value` / `labels.class_map` in the config",
            )
        values = gdf[class_field]
        source = f"field {class_field!r}"
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna() | (numeric != np.round(numeric))
    if bad.any():
        raise InputError(path, f"{int(bad.sum())} feature(s) have a non-integer class value in {source} (e.g. {values[bad].iloc[0]!r})", "use whole numbers 1-254")
    out_of_range = (numeric < 1) | (numeric > 254)
    if out_of_range.any():
        example = int(numeric[out_of_range].iloc[0])
        raise InputError(
            path,
            f"{int(out_of_range.sum())} feature(s) have class value {example} in {source}; class values must be 1-254 (0 is background, 255 is reserved for nodata)",
            "renumber the classes from 1",
        )
    result = numeric.to_numpy(dtype=np.uint8)
    if known_values is not None:
        unknown = sorted(set(result.tolist()) - set(known_values))
        if unknown:
            raise InputError(path, f"has class value(s) {unknown} not listed under `classes` in the config", "add them to `classes` or fix the labels")
    return result


def local_utm(geoms: gpd.GeoSeries | gpd.GeoDataFrame) -> Any:
    """The UTM zone at the centre of geographic ``geoms`` (for lengths and buffers in metres).

    geopandas' ``estimate_utm_crs`` fails for data on the antimeridian (bounds running past
    180 degrees) and names no file; the zone of the centre, wrapped into -180..180, does not.
    """
    from pyproj import CRS

    try:
        return geoms.estimate_utm_crs()
    except Exception:  # pyproj finds no zone: take the centre's
        pass
    x0, y0, x1, y1 = geoms.total_bounds
    lon, lat = ((x0 + x1) / 2 + 180) % 360 - 180, min(max((y0 + y1) / 2, -80.0), 84.0)
    zone = int((lon + 180) // 6) % 60 + 1
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)
