"""Road centrelines from a classified raster: skeletonise, trace into lines, simplify.

Works block by block (with an overlap so the skeleton is the same as on the whole
mask), so memory does not grow with the scene. Each block contributes the skeleton
edges that start in its core; shapely's ``line_merge`` then joins pixel edges into
lines between junctions and ends, across blocks. ``clean_network`` then removes the
skeleton's short side branches and specks without cutting a road anywhere.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import networkx as nx
import numpy as np
import pyogrio
import rasterio
import shapely
import shapely.ops
from rasterio.windows import Window
from skimage.morphology import skeletonize

from .atomic import atomic_path
from .raster import cell_size_metres
from .styles import add_gpkg_style, centreline_qml, complete_classes

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
    return _merge(shapely.linestrings(np.concatenate(pieces)))


def _merge(lines: Sequence[shapely.LineString]) -> list[shapely.LineString]:
    """Node the lines where they meet and join them into lines between junctions and ends."""
    if not len(lines):
        return []
    merged = shapely.line_merge(shapely.union_all(list(lines)))
    return [g for g in shapely.get_parts(merged) if g.length > 0]


def _end_keys(line: shapely.LineString) -> tuple[tuple[float, float], tuple[float, float]]:
    (x0, y0), (x1, y1) = line.coords[0], line.coords[-1]
    return (round(x0, 6), round(y0, 6)), (round(x1, 6), round(y1, 6))


def _end_degrees(lines: Sequence[shapely.LineString]) -> dict[tuple[float, float], int]:
    """How many line ends meet at each end point (1: a dead end)."""
    degree: dict[tuple[float, float], int] = {}
    for line in lines:
        for k in _end_keys(line):
            degree[k] = degree.get(k, 0) + 1
    return degree


def clean_network(lines: Sequence[shapely.LineString], spur: float, min_length: float) -> list[shapely.LineString]:
    """Remove skeleton spurs and specks from a line network without cutting roads.

    Skeletons of ragged masks sprout short side branches, and a junction can be a small
    cluster of pixels. ``line_merge`` splits a road at each of them, so dropping every short
    piece would cut the road into fragments (and wreck any topology measure). Instead
    dangling pieces (one free end, the other at a junction) shorter than ``spur`` are
    removed until none is left, and then whole connected networks shorter than
    ``min_length``. Pieces between two junctions are always kept.
    """
    lines = _merge(lines)
    for _ in range(20):  # each round exposes at most the next spur segment of a branch
        degree = _end_degrees(lines)
        keep = []
        for line in lines:
            a, b = (degree[k] for k in _end_keys(line))
            dangling = (a == 1) != (b == 1)
            keep.append(not (dangling and line.length < spur))
        if all(keep):
            break
        lines = _merge([line for line, k in zip(lines, keep) if k])
    g = nx.Graph()
    for i, line in enumerate(lines):
        a, b = _end_keys(line)
        g.add_edge(("end", a), ("line", i))
        g.add_edge(("end", b), ("line", i))
    out = []
    for comp in nx.connected_components(g):
        members = [lines[n[1]] for n in comp if n[0] == "line"]
        if sum(m.length for m in members) >= min_length:
            out.extend(members)
    return sorted(out, key=lambda ln: ln.coords[0])


def _end_direction(line: shapely.LineString, at_start: bool, reach: float) -> np.ndarray:
    """Unit vector pointing out of the line at one end, averaged over ``reach`` along it."""
    d = min(reach, line.length)
    end = np.asarray(line.coords[0] if at_start else line.coords[-1], float)
    inner = np.asarray(line.interpolate(d if at_start else line.length - d).coords[0], float)
    v = end - inner
    n = np.linalg.norm(v)
    return v / n if n else v


def bridge_gaps(lines: Sequence[shapely.LineString], max_gap: float, max_angle: float = 40.0) -> list[shapely.LineString]:
    """Join dead ends to the nearest line ahead of them, across gaps up to ``max_gap``.

    A road hidden for a few metres (a tree, a shadow, a faint stretch) leaves a gap in the
    mask and cuts the network; routing and topology measures then fail on every path across
    it. Each free end looks for the nearest point of another line (or of a far part of its
    own) within ``max_gap`` and within ``max_angle`` degrees of the direction it points
    in, and is joined to it by a straight segment, as road-extraction post-processing
    usually does. Run ``clean_network`` afterwards to node the joins.
    """
    lines = list(lines)
    if not lines or max_gap <= 0:
        return lines
    degree = _end_degrees(lines)
    tree = shapely.STRtree(lines)
    cos_max = math.cos(math.radians(max_angle))
    joins = []
    for i, line in enumerate(lines):
        for at_start, key in zip((True, False), _end_keys(line)):
            if degree[key] != 1:
                continue
            end = shapely.Point(key)
            out = _end_direction(line, at_start, reach=max_gap)
            best = None
            for j in tree.query(end, predicate="dwithin", distance=max_gap).tolist():
                target = lines[j]
                if j == i:  # its own line only where it comes back, not the stretch it ends on
                    far = line.length - 2 * max_gap
                    if far <= 0:
                        continue
                    target = shapely.ops.substring(line, 2 * max_gap, line.length) if at_start else shapely.ops.substring(line, 0, far)
                p = shapely.ops.nearest_points(end, target)[1]
                v = np.asarray(p.coords[0]) - np.asarray(key)
                dist = float(np.linalg.norm(v))
                if dist == 0 or dist > max_gap or float(v @ out) / dist < cos_max:
                    continue
                if best is None or dist < best[0]:
                    best = (dist, v, target)
            if best is not None:
                dist, v, target = best
                tip = np.asarray(key) + v
                ends = np.asarray([target.coords[0], target.coords[-1]], float)
                k = int(np.argmin(np.linalg.norm(ends - tip, axis=1)))
                if np.linalg.norm(ends[k] - tip) < 1e-6:
                    tip = ends[k]  # end to end: the very same vertex
                else:
                    tip = tip + v * 0.5 / dist  # overshoot half a pixel so the crossing gets noded
                joins.append(shapely.LineString([key, tuple(tip)]))
    return lines + joins


def centrelines_from_raster(
    classified: str | Path,
    out_path: str | Path,
    *,
    classes: Sequence[dict[str, Any]],
    min_length: float = 5.0,
    bridge: float = 0.0,
    simplify: float | None = None,
    probability: str | Path | None = None,
    probability_scale: float = 250.0,
) -> int:
    """Write road centrelines of every class as a GeoPackage of LineStrings.

    Attributes: ``class_value``, ``class_name``, ``length_m`` and, with a ``probability``
    raster (road probability times ``probability_scale``), ``mean_probability`` and
    ``min_probability`` (0-1) sampled every cell along the line. The layer's QGIS style
    is stored in the GeoPackage as its default. Side branches shorter than
    ``min_length`` (metres) and networks shorter than it are dropped; dead ends are
    joined across gaps up to ``bridge`` metres (0: never).
    """
    classes = complete_classes(classes)
    records = []
    with rasterio.open(classified) as src:
        transform, crs = src.transform, src.crs
        cell = abs(transform.a)
        cell_m = cell_size_metres(crs, cell)
        min_px, bridge_px = min_length / cell_m, bridge / cell_m
        for c in classes:
            value, name = c["value"], c["name"]

            def reader(window: Window, value: int = value) -> np.ndarray:
                return src.read(1, window=window) == value

            lines = trace_lines(reader, src.height, src.width)
            if bridge_px > 0:  # spurs first, or their tips would be bridged; the last pass nodes the joins
                lines = bridge_gaps(clean_network(lines, spur=min_px, min_length=0), bridge_px)
            for line in clean_network(lines, spur=min_px, min_length=min_px):
                geo = shapely.transform(line, lambda xy: np.stack(transform * (xy[:, 0], xy[:, 1]), 1))
                records.append({"class_value": value, "class_name": name, "geometry": geo.simplify(simplify if simplify is not None else cell)})
    gdf = gpd.GeoDataFrame(records, geometry="geometry", crs=crs) if records else gpd.GeoDataFrame({"class_value": [], "class_name": []}, geometry=[], crs=crs)
    metric = gdf.to_crs(gdf.estimate_utm_crs()) if (crs is not None and crs.is_geographic and len(gdf)) else gdf
    gdf["length_m"] = metric.length.to_numpy() * (1.0 if crs is None or crs.is_geographic else float(crs.linear_units_factor[1]))
    if probability is not None:
        gdf["mean_probability"], gdf["min_probability"] = line_probabilities(gdf.geometry, probability, probability_scale, step=cell)
    with atomic_path(out_path) as tmp:
        pyogrio.write_dataframe(gdf, tmp, layer="centrelines", driver="GPKG", geometry_type="LineString")
        if pyogrio.read_info(tmp, layer="centrelines")["features"] != len(gdf):
            raise OSError(f"{tmp}: the GeoPackage does not hold the {len(gdf)} line(s) written")
        add_gpkg_style(tmp, "centrelines", centreline_qml(classes))
    log.info("%s: %d centreline(s), %.0f m in all", out_path, len(gdf), float(gdf["length_m"].sum()))
    return len(gdf)




def line_probabilities(lines: gpd.GeoSeries, probability: str | Path, scale: float, *, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and minimum road probability (0-1) along each line, sampled every ``step`` CRS units."""
    means, mins = np.full(len(lines), np.nan), np.full(len(lines), np.nan)
    with rasterio.open(probability) as src:
        nodata = src.nodata
        for i, line in enumerate(lines):
            pts = shapely.get_coordinates(shapely.line_interpolate_point(line, np.arange(0.0, line.length + step / 2, step)))
            vals = np.fromiter((v[0] for v in src.sample(pts)), float, len(pts))
            vals = vals[np.isfinite(vals) & (vals != nodata)] if nodata is not None and np.isfinite(nodata) else vals[np.isfinite(vals)]
            if len(vals):
                means[i], mins[i] = vals.mean() / scale, vals.min() / scale
    return means, mins
