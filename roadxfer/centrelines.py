"""Road centrelines from a classified raster: skeletonise, trace into lines, simplify.

Works block by block (with an overlap so the skeleton is the same as on the whole
mask), so memory does not grow with the scene. Each block contributes the skeleton
edges that start in its core; shapely's ``line_merge`` then joins pixel edges into
lines between junctions and ends, across blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyogrio
import rasterio
import shapely
from rasterio.windows import Window
from skimage.morphology import skeletonize

from .atomic import atomic_path

log = logging.getLogger(__name__)

BLOCK = 2048
HALO = 64  # skeletons of roads narrower than this are identical with and without the block cut


def skeleton_edges(skel: np.ndarray, row_range: tuple[int, int], col_range: tuple[int, int]) -> np.ndarray:
    """8-connected edges between skeleton pixels whose first pixel lies in the given core ranges.

    Diagonal steps are dropped where an orthogonal two-step path exists, so junctions do
    not turn into little triangles. Returns (n, 2, 2) (row, col) pairs.
    """
    r, c = np.nonzero(skel)
    core = (r >= row_range[0]) & (r < row_range[1]) & (c >= col_range[0]) & (c < col_range[1])
    r, c = r[core], c[core]
    h, w = skel.shape

    def on(rr: np.ndarray, cc: np.ndarray) -> np.ndarray:
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        out = np.zeros(rr.shape, bool)
        out[ok] = skel[rr[ok], cc[ok]]
        return out

    edges = []
    for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
        has = on(r + dr, c + dc)
        if dr and dc:
            has &= ~on(r + dr, c) & ~on(r, c + dc)
        edges.append(np.stack([np.stack([r[has], c[has]], 1), np.stack([r[has] + dr, c[has] + dc], 1)], 1))
    return np.concatenate(edges) if edges else np.zeros((0, 2, 2))


def trace_lines(mask_reader, height: int, width: int) -> list[shapely.LineString]:
    """Centrelines (pixel-centre coordinates, x = col + 0.5, y = row + 0.5) of a boolean mask read by blocks."""
    pieces = []
    for r0 in range(0, height, BLOCK):
        for c0 in range(0, width, BLOCK):
            rr0, cc0 = max(r0 - HALO, 0), max(c0 - HALO, 0)
            rr1, cc1 = min(r0 + BLOCK + HALO, height), min(c0 + BLOCK + HALO, width)
            mask = mask_reader(Window(cc0, rr0, cc1 - cc0, rr1 - rr0))
            if not mask.any():
                continue
            skel = skeletonize(mask)
            e = skeleton_edges(skel, (r0 - rr0, min(r0 + BLOCK, height) - rr0), (c0 - cc0, min(c0 + BLOCK, width) - cc0))
            if len(e):
                e = e.astype(np.float64) + np.array([rr0, cc0]) + 0.5
                pieces.append(e[..., ::-1])  # (x=col, y=row)
    if not pieces:
        return []
    segs = shapely.linestrings(np.concatenate(pieces))
    merged = shapely.line_merge(shapely.union_all(segs))
    return [g for g in shapely.get_parts(merged) if g.length > 0]


def centrelines_from_raster(
    classified: str | Path,
    out_path: str | Path,
    *,
    classes: Sequence[dict[str, Any]],
    min_length: float = 5.0,
    simplify: float | None = None,
) -> int:
    """Write road centrelines of every class as a GeoPackage of LineStrings (``class_value``, ``class_name``, ``length_m``)."""
    records = []
    with rasterio.open(classified) as src:
        transform, crs = src.transform, src.crs
        cell = abs(transform.a)
        for c in classes:
            value = int(c.get("Value", c.get("value")))
            name = c.get("Name", c.get("name", str(value)))

            def reader(window: Window, value: int = value) -> np.ndarray:
                return src.read(1, window=window) == value

            for line in trace_lines(reader, src.height, src.width):
                geo = shapely.transform(line, lambda xy: np.stack(transform * (xy[:, 0], xy[:, 1]), 1))
                records.append({"class_value": value, "class_name": name, "geometry": geo.simplify(simplify if simplify is not None else cell)})
    gdf = gpd.GeoDataFrame(records, geometry="geometry", crs=crs) if records else gpd.GeoDataFrame({"class_value": [], "class_name": []}, geometry=[], crs=crs)
    metric = gdf.to_crs(gdf.estimate_utm_crs()) if (crs is not None and crs.is_geographic and len(gdf)) else gdf
    gdf["length_m"] = metric.length.to_numpy() * (1.0 if crs is None or crs.is_geographic else float(crs.linear_units_factor[1]))
    gdf = gdf[gdf["length_m"] >= min_length].reset_index(drop=True)
    with atomic_path(out_path) as tmp:
        pyogrio.write_dataframe(gdf, tmp, layer="centrelines", driver="GPKG", geometry_type="LineString")
    log.info("%s: %d centreline(s), %.0f m in all", out_path, len(gdf), float(gdf["length_m"].sum()))
    return len(gdf)


