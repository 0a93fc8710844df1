"""Road centrelines from a classified raster: a road graph, one line per edge.

The road mask is made from the probability raster with hysteresis (strong seeds grow
into weaker neighbours), small holes closed and specks removed (:mod:`roadxfer.roadmask`),
then skeletonised block by block (with an overlap so the skeleton is the same as on the
whole mask): memory does not grow with the scene. Each block contributes the skeleton
edges that start in its core; shapely's ``line_merge`` joins pixel edges into one line
per edge of the road graph (between junctions and ends, degree-2 chains merged), across
blocks, so a road crossing block borders is one line. The graph is then cleaned: short
side branches pruned without cutting a road, junctions that nearly meet snapped into one,
networks dropped by length and by mean road probability, dead ends bridged across gaps
(along the road direction the model predicts, where it is given).
The layer carries a node id at each end (a routable network) and a ``nodes`` layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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

from . import IGNORE_VALUE
from .atomic import atomic_path
from .config import default
from .raster import cell_size_metres, padded_blocks
from .vectors import local_utm
from .roadmask import MaskSettings, MaskStats, clean_mask
from .styles import add_gpkg_style, centreline_qml, complete_classes

log = logging.getLogger(__name__)

BLOCK = 2048
HALO = 64  # skeletons of roads narrower than this are identical with and without the block cut
MESH_LOOP_LENGTH = 30.0  # metres of centreline per loop below which a network is a mesh of noise


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


def trace_lines(mask_reader: Callable[..., np.ndarray], height: int, width: int, *, block: int = BLOCK) -> list[shapely.LineString]:
    """Centrelines (pixel-centre coordinates, x = col + 0.5, y = row + 0.5) of a boolean mask read by blocks.

    ``mask_reader(window, core)`` returns the mask of a padded window; ``core`` (a pair of
    slices into it) is the part this block owns, for readers that count what they see.
    """
    pieces = []
    for _, pad, core in padded_blocks(width, height, block, HALO):
        mask = mask_reader(pad, core)
        if not mask.any():
            continue
        skel = skeletonize(mask)
        e = skeleton_edges(skel, (core[0].start, core[0].stop), (core[1].start, core[1].stop))
        if len(e):
            e = e.astype(np.float64) + np.array([pad.row_off, pad.col_off]) + 0.5
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
            # A closed line shorter than a spur is no road loop: a junction's pixel cluster, or two junctions snapped into one.
            keep.append(not ((dangling or line.is_closed) and line.length < spur))
        if all(keep):
            break
        lines = _merge([line for line, k in zip(lines, keep) if k])
    out = []
    for comp in components(lines):
        members = [lines[i] for i in comp]
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


DirectionAt = Callable[[np.ndarray], np.ndarray]
"""(N, 2) pixel points (col, row) -> (N, 2) unit vectors (col, row) along the predicted road
axis (their sign means nothing), NaN where the direction is not known."""

MIN_AGREEMENT = 0.6  # resultant length of the doubled angles: below it the predicted directions disagree
COS_STUB = math.cos(math.radians(45.0))  # a predicted axis further off the skeleton's end is another road's (a stub at a junction)


def axial_mean(vectors: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean axis of undirected unit vectors (doubled angles) and its resultant length (0-1); NaN rows are skipped."""
    v = vectors[np.isfinite(vectors).all(1)]
    if not len(v):
        return np.array([np.nan, np.nan]), 0.0
    phi = np.arctan2(v[:, 1], v[:, 0])
    c, s = np.cos(2 * phi).mean(), np.sin(2 * phi).mean()
    a = 0.5 * math.atan2(s, c)
    return np.array([math.cos(a), math.sin(a)]), float(math.hypot(c, s))


def raster_direction(ds: rasterio.DatasetReader) -> DirectionAt:
    """A :data:`DirectionAt` over a direction raster (degrees clockwise from grid north, 0-179; nodata 255)."""

    def at(points: np.ndarray) -> np.ndarray:
        out = np.full((len(points), 2), np.nan)
        if not len(points):
            return out
        ij = np.floor(points[:, ::-1]).astype(np.int64)  # (row, col)
        inside = (ij[:, 0] >= 0) & (ij[:, 0] < ds.height) & (ij[:, 1] >= 0) & (ij[:, 1] < ds.width)
        if not inside.any():
            return out
        r0, c0 = ij[inside].min(0)
        r1, c1 = ij[inside].max(0) + 1
        block = ds.read(1, window=Window(int(c0), int(r0), int(c1 - c0), int(r1 - r0)))
        deg = block[ij[inside, 0] - r0, ij[inside, 1] - c0].astype(np.float64)
        deg[deg == IGNORE_VALUE] = np.nan
        rad = np.radians(deg)
        out[inside] = np.stack([np.sin(rad), -np.cos(rad)], 1)  # clockwise from north -> (col, row); rows grow southwards
        return out

    return at


def _sample_line(line: shapely.LineString, start: float, stop: float) -> np.ndarray:
    """Points every pixel along ``line`` between the distances ``start`` and ``stop``."""
    d = np.arange(start, stop + 1e-9, 1.0) if stop > start else np.array([start])
    return shapely.get_coordinates(shapely.line_interpolate_point(line, d))


def _predicted_out(line: shapely.LineString, at_start: bool, reach: float, geometric: np.ndarray, direction: DirectionAt) -> np.ndarray | None:
    """The road axis the model predicts over the last ``reach`` of a line, pointing out of its end (None: not agreed)."""
    d = min(reach, line.length)
    pts = _sample_line(line, 0.0, d) if at_start else _sample_line(line, line.length - d, line.length)
    axis, agreement = axial_mean(direction(pts))
    if agreement < MIN_AGREEMENT:
        return None
    return axis if float(axis @ geometric) >= 0 else -axis


def bridge_gaps(lines: Sequence[shapely.LineString], max_gap: float, max_angle: float = 40.0, *,
                direction: DirectionAt | None = None, reach: float = 1.0, reach_angle: float = 25.0) -> list[shapely.LineString]:
    """Join dead ends to the nearest line ahead of them, across gaps up to ``max_gap``.

    A road hidden for a few metres (a tree, a shadow, a faint stretch) leaves a gap in the
    mask and cuts the network; routing and topology measures then fail on every path across
    it. Each free end looks for the nearest point of another line (or of a far part of its
    own) within ``max_gap`` and within ``max_angle`` degrees of the direction it points
    in, and is joined to it by a straight segment, as road-extraction post-processing
    usually does. Run ``clean_network`` afterwards to node the joins.

    With ``direction`` (the road direction the model predicts, :func:`raster_direction`)
    an end points along the predicted axis of its last stretch instead of the skeleton's
    (whose tips bend), where the predictions there agree with each other and lie within
    45 degrees of the skeleton's (further off, the stretch is a stub at a junction); such
    an end also reaches ``reach`` times further for a line within ``reach_angle`` degrees
    of where it points.
    """
    lines = list(lines)
    if not lines or max_gap <= 0:
        return lines
    degree = _end_degrees(lines)
    tree = shapely.STRtree(lines)
    cos_max, cos_reach = math.cos(math.radians(max_angle)), math.cos(math.radians(reach_angle))
    joins = []
    used: set[tuple[float, float]] = set()  # dead ends already joined (by their own join or as a target)
    for i, line in enumerate(lines):
        for at_start, key in zip((True, False), _end_keys(line)):
            if degree[key] != 1 or key in used:
                continue
            end = shapely.Point(key)
            out = _end_direction(line, at_start, reach=max_gap)
            guided = False
            if direction is not None:
                predicted = _predicted_out(line, at_start, max_gap, out, direction)
                if predicted is not None and float(predicted @ out) >= COS_STUB:
                    out, guided = predicted, True
            limit = max_gap * (reach if guided else 1.0)
            best = None
            for j in tree.query(end, predicate="dwithin", distance=limit).tolist():
                target = lines[j]
                if j == i:  # its own line only where it comes back, not the stretch it ends on
                    far = line.length - 2 * limit
                    if far <= 0:
                        continue
                    target = shapely.ops.substring(line, 2 * limit, line.length) if at_start else shapely.ops.substring(line, 0, far)
                p = shapely.ops.nearest_points(end, target)[1]
                v = np.asarray(p.coords[0]) - np.asarray(key)
                dist = float(np.linalg.norm(v))
                if dist == 0 or dist > limit:
                    continue
                cos = float(v @ out) / dist
                if cos < cos_max or (dist > max_gap and cos < cos_reach):
                    continue
                if best is None or dist < best[0]:
                    best = (dist, v, target)
            if best is not None:
                dist, v, target = best
                tip = np.asarray(key) + v
                ends = np.asarray([target.coords[0], target.coords[-1]], float)
                k = int(np.argmin(np.linalg.norm(ends - tip, axis=1)))
                end_key = _end_keys(target)[k]
                near = np.linalg.norm(ends[k] - tip)
                if near < 1e-6 or (degree.get(end_key) == 1 and near <= max(2.0, 0.5 * dist)):
                    # Two dead ends facing each other: one join, end to end, on the very same vertices
                    # (a second join from the other end would close a little loop).
                    tip = ends[k]
                    used.add(end_key)
                else:
                    tip = tip + v * 0.5 / dist  # overshoot half a pixel so the crossing gets noded
                used.add(key)
                joins.append(shapely.LineString([key, tuple(tip)]))
    return lines + joins


def snap_junctions(lines: Sequence[shapely.LineString], snap: float) -> list[shapely.LineString]:
    """Contract edges shorter than ``snap`` between two junctions into one junction at their middle.

    A skeleton junction is often a small cluster of pixels, which ``line_merge`` turns into
    several junctions joined by pixel-long lines. Dangling short pieces are spurs and are
    left to :func:`clean_network`.
    """
    lines = _merge(lines)
    if snap <= 0 or not lines:
        return lines
    degree = _end_degrees(lines)
    g = nx.Graph()
    for line in lines:
        a, b = _end_keys(line)
        if line.length < snap and a != b and degree[a] >= 3 and degree[b] >= 3:
            g.add_edge(a, b)
    if not g.number_of_edges():
        return lines
    moved: dict[tuple[float, float], tuple[float, float]] = {}
    for comp in nx.connected_components(g):
        centre = tuple(np.mean(np.asarray(list(comp)), axis=0))
        for key in comp:
            moved[key] = centre
    out = []
    for line in lines:
        a, b = _end_keys(line)
        if a in moved and b in moved and moved[a] == moved[b] and line.length < snap:
            continue  # the contracted edge itself
        coords = np.asarray(line.coords)
        if a in moved:
            coords[0] = moved[a]
        if b in moved:
            coords[-1] = moved[b]
        if len(coords) >= 2 and np.any(coords[0] != coords[-1]) or len(coords) > 3:
            out.append(shapely.LineString(coords))
    return _merge(out)


def components(lines: Sequence[shapely.LineString]) -> list[list[int]]:
    """Indexes of the lines of each connected network (lines meeting at an end)."""
    g = nx.Graph()
    for i, line in enumerate(lines):
        a, b = _end_keys(line)
        g.add_edge(("end", a), ("line", i))
        g.add_edge(("end", b), ("line", i))
    return [sorted(n[1] for n in comp if n[0] == "line") for comp in nx.connected_components(g)]


def drop_meshes(lines: Sequence[shapely.LineString], min_loop_length: float, min_loops: int = 10) -> tuple[list[shapely.LineString], float, int]:
    """Drop networks that are meshes of small loops, the skeleton of noise rather than of roads.

    A road network closes a loop around each block, a hundred metres of road or more per
    loop; the skeleton of a speckled mask closes one every few metres. Networks with at
    least ``min_loops`` independent loops (edges - nodes + 1) and less than
    ``min_loop_length`` of line per loop go. Returns the lines kept, the length dropped
    and the number of loops dropped.
    """
    kept: list[shapely.LineString] = []
    dropped, loops_dropped = 0.0, 0
    for comp in components(lines):
        members = [lines[i] for i in comp]
        nodes = {k for m in members for k in _end_keys(m)}
        loops = len(members) - len(nodes) + 1
        length = sum(m.length for m in members)
        if loops >= min_loops and length / loops < min_loop_length:
            dropped += length
            loops_dropped += loops
        else:
            kept.extend(members)
    return kept, dropped, loops_dropped


def axial_direction(line: shapely.LineString) -> float:
    """Length-weighted mean direction of an undirected line, degrees clockwise from north (grid up), 0-180."""
    xy = shapely.get_coordinates(line)
    d = np.diff(xy, axis=0)
    length = np.hypot(d[:, 0], d[:, 1])
    if not length.sum():
        return float("nan")
    theta = np.arctan2(d[:, 0], d[:, 1])  # clockwise from +y (north)
    c, s_ = (length * np.cos(2 * theta)).sum(), (length * np.sin(2 * theta)).sum()
    return float(np.degrees(0.5 * np.arctan2(s_, c)) % 180.0)


def noise_warning(stats: MaskStats, length_m: float, cell_m: float, mesh_m: float = 0.0, mesh_loops: int = 0) -> str | None:
    """Why a prediction looks like noise rather than roads, or None.

    Specks outnumbering kept road pixels, a mask far wider than roads are (area per
    metre of centreline), or centrelines that form a mesh of small loops all point at a
    model that does not suit the imagery.
    """
    reasons = []
    if mesh_loops:
        reasons.append(f"{mesh_m:.0f} m of centreline formed a mesh of {mesh_loops} small loops (dropped)")
    seen = stats.kept + stats.specks
    if seen and stats.specks > 0.5 * seen and stats.specks * cell_m**2 > 200:
        reasons.append(f"{100 * stats.specks / seen:.0f}% of the predicted road pixels are isolated specks")
    area = (stats.kept + stats.filled) * cell_m**2
    if area > 500:
        width = area / max(length_m, cell_m)
        if width > 25:
            reasons.append(f"the road mask is {width:.0f} m wide on average (roads are a few metres)")
    return "; ".join(reasons) or None


@dataclass(frozen=True)
class VectorSettings:
    min_length: float = default("vectorise.min_line_length")  # metres: shorter side branches and networks are dropped
    bridge: float = default("vectorise.bridge_gaps")  # metres: dead ends are joined across gaps up to this long (0: never)
    bridge_direction: bool = default("vectorise.bridge_direction")  # with the model's direction raster: ends point along it
    bridge_reach: float = default("vectorise.bridge_reach")  # such an end joins lines up to this many times `bridge` away ...
    bridge_reach_angle: float = default("vectorise.bridge_reach_angle")  # ... within this many degrees of where it points (both chosen on the tuning scenes)
    snap: float = default("vectorise.snap")  # metres: junctions joined by a shorter edge become one
    min_probability: float = default("vectorise.min_probability")  # networks whose mean road probability is lower are dropped (with a probability raster)
    simplify: float | None = None  # CRS units; default one cell
    mask: MaskSettings = field(default_factory=MaskSettings)


def centrelines_from_raster(
    classified: str | Path,
    out_path: str | Path,
    *,
    classes: Sequence[dict[str, Any]],
    min_length: float | None = None,
    bridge: float | None = None,
    simplify: float | None = None,
    probability: str | Path | None = None,
    probability_scale: float = 250.0,
    direction: str | Path | None = None,
    settings: VectorSettings | None = None,
    scene: str | None = None,
) -> int:
    """Write the road graph of every class as a GeoPackage: ``centrelines`` (lines) and ``nodes`` (points).

    Line attributes: ``class_value``, ``class_name``, ``length_m``, ``direction_deg``
    (mean direction, clockwise from grid north, 0-180), ``from_node``/``to_node`` and,
    with a ``probability`` raster (road probability times ``probability_scale``),
    ``mean_probability`` and ``min_probability`` (0-1) sampled every cell along the line.
    With a ``direction`` raster (the model's predicted road direction) and
    ``settings.bridge_direction``, gaps are bridged along it (:func:`bridge_gaps`).
    Nodes: ``node_id`` and ``degree``. The layer's QGIS style is stored in the GeoPackage
    as its default. ``min_length`` and ``bridge`` (metres), when given, override ``settings``. A
    prediction that looks like noise gives a warning naming ``scene``.
    """
    vs = settings or VectorSettings()
    vs = dataclasses.replace(vs, min_length=vs.min_length if min_length is None else min_length, bridge=vs.bridge if bridge is None else bridge,
                             simplify=simplify if simplify is not None else vs.simplify)
    classes = complete_classes(classes)
    scene = scene or str(classified)
    records = []
    stats = MaskStats()
    mesh_m, mesh_loops = 0.0, 0
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(rasterio.open(classified))
        prob_src = stack.enter_context(rasterio.open(probability)) if probability is not None else None
        guide = raster_direction(stack.enter_context(rasterio.open(direction))) if direction is not None and vs.bridge_direction else None
        transform, crs = src.transform, src.crs
        cell = abs(transform.a)
        cell_m = cell_size_metres(crs, cell)
        min_px, bridge_px, snap_px = vs.min_length / cell_m, vs.bridge / cell_m, vs.snap / cell_m
        single = len(classes) == 1
        for c in classes:
            value, name = c["value"], c["name"]

            def reader(window: Window, core: tuple[slice, slice], value: int = value) -> np.ndarray:
                cls = src.read(1, window=window)
                in_class = cls == value
                if prob_src is None:
                    weak = strong = in_class
                else:
                    p = prob_src.read(1, window=window).astype(np.float32)
                    nodata = prob_src.nodata
                    bad = (cls == IGNORE_VALUE) | ~np.isfinite(p) | ((p == nodata) if nodata is not None and np.isfinite(nodata) else False)
                    p = np.where(bad, 0.0, p / probability_scale)
                    weak = (p >= vs.mask.low) if single else in_class
                    strong = weak & (p >= vs.mask.high) if single else in_class & (p >= vs.mask.high)
                cut = (window.row_off > 0, window.row_off + window.height < src.height, window.col_off > 0, window.col_off + window.width < src.width)
                mask, st = clean_mask(weak, strong, vs.mask, cell_m, core, cut)
                stats.add(st)
                return mask

            seen_before = stats.kept + stats.filled
            lines = clean_network(trace_lines(reader, src.height, src.width, block=BLOCK), spur=min_px, min_length=0)
            # Mean road width (mask area per pixel of centreline): a junction of wide roads is a cluster
            # about that big, and a skeleton stops about half a width short of the mask's end on
            # each side of a gap, so the gap between skeleton ends is the mask's gap plus a width.
            width_px = (stats.kept + stats.filled - seen_before) / max(sum(ln.length for ln in lines), 1.0)
            snap_class = max(snap_px, min(width_px, 3 * snap_px))
            lines = snap_junctions(lines, snap_class)
            joins: list[shapely.LineString] = []
            if bridge_px > 0 and lines:  # spurs first, or their tips would be bridged; the last pass nodes the joins
                unbridged = clean_network(lines, spur=min_px, min_length=0)
                lines = bridge_gaps(unbridged, bridge_px + min(width_px, bridge_px), direction=guide, reach=vs.bridge_reach, reach_angle=vs.bridge_reach_angle)
                joins = lines[len(unbridged):]
                lines = snap_junctions(clean_network(lines, spur=min_px, min_length=0), snap_class)  # joins landing beside a junction
            lines = clean_network(lines, spur=min_px, min_length=min_px)
            lines, mesh_px, loops = drop_meshes(lines, MESH_LOOP_LENGTH / cell_m)
            mesh_m += mesh_px * cell_m
            mesh_loops += loops
            if probability is not None and vs.min_probability > 0 and lines:
                # Whole networks of faint, doubtful road go. The joins across gaps are left out of the
                # mean: they cross low probability by design, and long ones would drag a real network down.
                lines, faint = drop_faint_networks(lines, joins, probability, probability_scale, transform, vs.min_probability)
                if faint:
                    log.info("%s: %d line(s) in networks with mean road probability below %.2f dropped", scene, faint, vs.min_probability)
            for line in lines:
                geo = shapely.transform(line, lambda xy: np.stack(transform * (xy[:, 0], xy[:, 1]), 1))
                records.append({"class_value": value, "class_name": name, "geometry": geo.simplify(vs.simplify if vs.simplify is not None else cell)})
    gdf = gpd.GeoDataFrame(records, geometry="geometry", crs=crs) if records else gpd.GeoDataFrame({"class_value": [], "class_name": []}, geometry=[], crs=crs)
    metric = gdf.to_crs(local_utm(gdf)) if (crs is not None and crs.is_geographic and len(gdf)) else gdf
    gdf["length_m"] = metric.length.to_numpy() * (1.0 if crs is None or crs.is_geographic else float(crs.linear_units_factor[1]))
    if probability is not None:
        gdf["mean_probability"], gdf["min_probability"] = line_probabilities(gdf.geometry, probability, probability_scale, step=cell)
    gdf["direction_deg"] = [axial_direction(g) for g in gdf.geometry] if len(gdf) else []
    nodes = node_table(gdf)
    warning = noise_warning(stats, float(gdf["length_m"].sum()) + mesh_m, cell_m, mesh_m, mesh_loops)
    if warning:
        log.warning("%s: the prediction looks like noise, not roads: %s (%d line(s) kept). The model is likely not suited to this imagery "
                    "(cell size, sensor, season, region): check the probability raster, or classify with a model trained on such imagery", scene, warning, len(gdf))
    with atomic_path(out_path) as tmp:
        pyogrio.write_dataframe(gdf, tmp, layer="centrelines", driver="GPKG", geometry_type="LineString")
        pyogrio.write_dataframe(nodes, tmp, layer="nodes", driver="GPKG", geometry_type="Point", append=True)
        if pyogrio.read_info(tmp, layer="centrelines")["features"] != len(gdf):
            raise OSError(f"{tmp}: the GeoPackage does not hold the {len(gdf)} line(s) written")
        add_gpkg_style(tmp, "centrelines", centreline_qml(classes))
    log.info("%s: %d centreline(s), %.0f m in all, %d node(s)", out_path, len(gdf), float(gdf["length_m"].sum()), len(nodes))
    return len(gdf)


def node_table(gdf: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Give each line ``from_node``/``to_node`` ids (shared where lines meet); return the nodes with their degree."""
    ids: dict[tuple[float, float], int] = {}
    degree: dict[int, int] = {}
    ends = []
    for line in gdf.geometry:
        pair = []
        for key in _end_keys(line):
            node = ids.setdefault(key, len(ids) + 1)
            degree[node] = degree.get(node, 0) + 1
            pair.append(node)
        ends.append(pair)
    gdf["from_node"] = [a for a, _ in ends] if ends else np.zeros(0, np.int64)
    gdf["to_node"] = [b for _, b in ends] if ends else np.zeros(0, np.int64)
    return gpd.GeoDataFrame({"node_id": list(ids.values()), "degree": [degree[i] for i in ids.values()]},
                            geometry=[shapely.Point(k) for k in ids], crs=gdf.crs)


def drop_faint_networks(lines: Sequence[shapely.LineString], joins: Sequence[shapely.LineString], probability: str | Path, scale: float,
                        transform: rasterio.Affine, min_probability: float) -> tuple[list[shapely.LineString], int]:
    """Drop the networks (lines in pixel coordinates) whose mean road probability, sampled every pixel along
    their lines but not on the ``joins`` made across gaps, is below ``min_probability``."""
    lines = list(lines)
    join_tree = shapely.STRtree(list(joins)) if joins else None
    sums, counts = np.zeros(len(lines)), np.zeros(len(lines))
    with rasterio.open(probability) as src:
        for i, line in enumerate(lines):
            pts = _sample_line(line, 0.0, line.length)
            if join_tree is not None:
                near = join_tree.query(shapely.points(pts), predicate="dwithin", distance=0.75)[0]
                pts = np.delete(pts, np.unique(near), axis=0)
            if not len(pts):
                continue
            vals = _values_at(src, np.stack(transform * (pts[:, 0], pts[:, 1]), 1))
            sums[i], counts[i] = vals.sum() / scale, len(vals)
    keep = np.ones(len(lines), bool)
    for comp in components(lines):
        if counts[comp].sum() and sums[comp].sum() / counts[comp].sum() < min_probability:
            keep[comp] = False
    return [ln for ln, k in zip(lines, keep) if k], int((~keep).sum())


def _values_at(src: rasterio.DatasetReader, xy: np.ndarray) -> np.ndarray:
    """Band 1 at (N, 2) points in the raster's CRS, without nodata and non-finite values."""
    vals = np.fromiter((v[0] for v in src.sample(xy)), float, len(xy))
    ok = np.isfinite(vals)
    if src.nodata is not None and np.isfinite(src.nodata):
        ok &= vals != src.nodata
    return vals[ok]


def line_probabilities(lines: gpd.GeoSeries, probability: str | Path, scale: float, *, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and minimum road probability (0-1) along each line, sampled every ``step`` CRS units."""
    means, mins = np.full(len(lines), np.nan), np.full(len(lines), np.nan)
    with rasterio.open(probability) as src:
        for i, line in enumerate(lines):
            vals = _values_at(src, shapely.get_coordinates(shapely.line_interpolate_point(line, np.arange(0.0, line.length + step / 2, step))))
            if len(vals):
                means[i], mins[i] = vals.mean() / scale, vals.min() / scale
    return means, mins
