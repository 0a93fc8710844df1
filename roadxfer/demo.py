"""Deterministic synthetic aerial scenes with road centrelines: the bundled demo data.

No imagery can be downloaded, so the demo makes its own: 3-band 8-bit GeoTIFFs in UTM
at 0.3 m, desert ground, shrubs and buildings with shadows, and three kinds of road
that look different from above, as in arid regions such as the Las Vegas valley:

* ``paved``: dark asphalt, 6-10 m wide, smooth curves, dashed lane markings;
* ``unpaved``: light compacted dirt, 3-5 m, ragged edges, darker tyre tracks;
* ``trail``: faint 1-2 m foot/bike paths that wander.

A model trained on paved roads learns "dark, smooth, wide strip" and misses the other
two, which is the situation transfer learning fixes. Scene ``kind`` ``mixed`` has all
three; ``rural`` has no paved road (transfer scenes: only unpaved roads and trails).
The same seed gives identical bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import rasterio
import shapely
from rasterio import features
from rasterio.transform import from_origin
from scipy import ndimage
from shapely import ops

from .atomic import atomic_path
from .raster import GTIFF_PROFILE

CRS = "EPSG:32611"  # UTM 11N (Nevada)
CELL = 0.3
SUN = np.array([0.6, 0.8])  # shadow direction in (col, row): shadows fall to the south-east
ROAD_TYPES = ("paved", "unpaved", "trail")
LANE_MAX = 5.0  # metres: paved roads narrower than this are drawn as lanes (no markings, soft contrast)


@dataclass(frozen=True)
class Landscape:
    """Colours (RGB) and clutter of one kind of land; ``None`` keeps the desert's rule."""

    ground: tuple[float, float, float]
    asphalt: tuple[tuple[float, float, float], ...]  # paved surfaces to choose from (dark asphalt, light concrete)
    dirt: tuple[float, float, float] | None
    path: tuple[float, float, float] | None
    shrub: tuple[float, float, float]
    shrubs: float = 1.0  # density relative to the desert's
    shrub_size: tuple[float, float] = (0.6, 2.7)  # crown radius, metres
    canopy: float = 0.0  # share of trees allowed over roads (their shadows fall on them too)
    hedges: int = 0  # dark linear clutter (hedgerows, ditches) that is not road
    tracks: int = 0  # light linear clutter (field edges, dry streams) that is not road
    buildings: float = 1.0


# The demo's scenes are all "desert" (their bytes are fixed by the seed). The others give
# the pretraining corpus roads that are not always the only dark bands, unpaved roads that
# are not always the only light lines, and clutter shaped like roads.
LANDSCAPES = {
    "desert": Landscape((196, 174, 142), ((72, 72, 76),), None, None, (88, 92, 62)),
    "grassland": Landscape((104, 128, 70), ((80, 80, 84), (168, 166, 158)), (150, 124, 90), (140, 146, 96), (48, 72, 40),
                           shrubs=2.0, shrub_size=(1.5, 5.0), canopy=0.3, hedges=3, tracks=2),
    "forest": Landscape((60, 82, 48), ((118, 118, 116), (84, 84, 88)), (118, 98, 74), (92, 98, 68), (34, 56, 30),
                        shrubs=8.0, shrub_size=(2.0, 6.0), canopy=0.5, hedges=1, tracks=1, buildings=0.3),
    "urban": Landscape((150, 148, 140), ((58, 58, 64), (186, 184, 178)), (172, 150, 118), (166, 160, 148), (70, 96, 55),
                       shrubs=1.0, shrub_size=(1.5, 4.0), canopy=0.2, tracks=2, buildings=4.0),
    "savanna": Landscape((172, 112, 80), ((70, 70, 72), (150, 146, 140)), (204, 146, 104), (188, 128, 92), (92, 96, 56),
                         shrubs=1.5, shrub_size=(1.0, 4.0), canopy=0.1, hedges=2, tracks=2),
}


@dataclass(frozen=True)
class Road:
    kind: str
    line: shapely.LineString  # pixel coordinates (col, row)
    width_m: float


def _noise(rng: np.random.Generator, shape: tuple[int, int], scales: tuple[float, ...], weights: tuple[float, ...]) -> np.ndarray:
    """Sum of smoothed white noise at several scales, normalised to unit std."""
    out = np.zeros(shape, np.float32)
    for s, w in zip(scales, weights):
        field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), s, mode="wrap")
        out += w * field / (field.std() + 1e-6)
    return out / (out.std() + 1e-6)


def _smooth_path(rng: np.random.Generator, size: int, n_ctrl: int, wiggle: float) -> shapely.LineString:
    """A curve entering and leaving through the scene border, through jittered control points."""
    side_a, side_b = rng.choice(4, 2, replace=False)

    def border_point(side: int) -> np.ndarray:
        t = rng.uniform(0.1, 0.9) * size
        return np.array([[t, -20.0], [size + 20.0, t], [t, size + 20.0], [-20.0, t]][side])

    a, b = border_point(side_a), border_point(side_b)
    ts = np.linspace(0, 1, n_ctrl + 2)
    ctrl = a[None] + ts[:, None] * (b - a)[None]
    normal = np.array([-(b - a)[1], (b - a)[0]]) / (np.linalg.norm(b - a) + 1e-9)
    ctrl[1:-1] += normal[None] * rng.normal(0, wiggle, (n_ctrl, 1))
    # Catmull-Rom through the control points: smooth, passes through each one.
    pts = [ctrl[0]] + list(ctrl) + [ctrl[-1]]
    curve = []
    for i in range(1, len(pts) - 2):
        p0, p1, p2, p3 = (np.asarray(p) for p in pts[i - 1 : i + 3])
        for t in np.linspace(0, 1, 24, endpoint=False):
            t2, t3 = t * t, t * t * t
            curve.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t3))
    curve.append(ctrl[-1])
    return shapely.LineString(np.asarray(curve))


def _meander(rng: np.random.Generator, line: shapely.LineString, amplitude: float, scale: float) -> shapely.LineString:
    """Add low-frequency lateral wobble (unpaved tracks and trails are not engineered)."""
    n = max(int(line.length / 4), 8)
    pts = np.asarray([line.interpolate(d).coords[0] for d in np.linspace(0, line.length, n)])
    tangent = np.gradient(pts, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True) + 1e-9
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], 1)
    offset = ndimage.gaussian_filter1d(rng.standard_normal(n), scale / 4) * amplitude * np.sqrt(scale / 4)
    return shapely.LineString(pts + normal * offset[:, None])


def _distance(line: shapely.geometry.base.BaseGeometry, shape: tuple[int, int]) -> np.ndarray:
    """Distance in pixels from every pixel centre to ``line`` (pixel coordinates)."""
    mask = features.rasterize([(line, 1)], out_shape=shape, all_touched=True, dtype="uint8")
    if not mask.any():
        return np.full(shape, np.inf, np.float32)
    return ndimage.distance_transform_edt(mask == 0).astype(np.float32)


def _blend(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    img[:] = img * (1 - alpha[None]) + colour.reshape(3, *([1] * (img.ndim - 1))) * alpha[None] if colour.ndim == 1 else img * (1 - alpha[None]) + colour * alpha[None]


def _roads(rng: np.random.Generator, size: int, kind: str) -> list[Road]:
    roads: list[Road] = []
    span = size / 1024
    if kind == "mixed":
        for _ in range(rng.integers(1, 3)):
            roads.append(Road("paved", _smooth_path(rng, size, 3, 120 * span), float(rng.uniform(6, 10))))
    n_unpaved = rng.integers(1, 3) if kind == "mixed" else rng.integers(2, 4)
    for _ in range(n_unpaved):
        base = _smooth_path(rng, size, 4, 150 * span)
        roads.append(Road("unpaved", _meander(rng, base, 4.0, 60), float(rng.uniform(3, 5))))
    n_trails = rng.integers(1, 3) if kind == "mixed" else rng.integers(2, 4)
    for _ in range(n_trails):
        base = _smooth_path(rng, size, 5, 200 * span)
        roads.append(Road("trail", _meander(rng, base, 6.0, 30), float(rng.uniform(1, 2))))
    return roads


def render_scene(seed: int, size: int = 1024, kind: str = "mixed", *, landscape: str = "desert", cell: float = CELL,
                 lanes: int = 0) -> tuple[np.ndarray, list[Road]]:
    """Render one scene: (3, size, size) uint8 image and its roads in pixel coordinates.

    ``landscape`` (one of :data:`LANDSCAPES`) and ``cell`` (metres) vary the look and the
    scale for a pretraining corpus; the defaults give the demo's desert scenes at 0.3 m.
    ``lanes`` adds that many narrow paved lanes (2-4.5 m, no markings, often faint) to a
    mixed scene: paved roads as thin as unpaved ones (a pretraining change tried and dropped:
    docs/experiments.md, "The shipped pretrained model: why U-Net, and pretraining changes tried").
    """
    if kind not in ("mixed", "rural"):
        raise ValueError(f"unknown demo scene kind {kind!r}: use 'mixed' or 'rural'")
    if landscape not in LANDSCAPES:
        raise ValueError(f"unknown demo landscape {landscape!r}: use one of {sorted(LANDSCAPES)}")
    if not 0.05 <= cell <= 5.0:
        raise ValueError(f"demo cell size {cell} m is outside 0.05-5 m")
    if not 0 <= lanes <= 20:
        raise ValueError(f"demo lanes {lanes} is outside 0-20")
    land = LANDSCAPES[landscape]
    desert = landscape == "desert"
    rng = np.random.default_rng(seed)
    # Landscape extras draw from their own stream, so desert scenes keep their bytes.
    lrng = np.random.default_rng([seed, list(LANDSCAPES).index(landscape), int(round(cell * 1000))])
    shape = (size, size)
    # Ground: base colour that varies per scene, textured at several scales.
    base = np.array(land.ground, np.float32) + rng.normal(0, 10, 3).astype(np.float32)
    tex = _noise(rng, shape, (1, 4, 24, 96), (0.35, 0.35, 0.6, 0.8))
    patches = _noise(rng, shape, (40,), (1.0,))
    img = base[:, None, None] + tex[None] * 9.0
    img += np.array([-14, -12, -8], np.float32)[:, None, None] * np.clip(patches, 0, None)[None]  # darker gravel patches
    img += rng.normal(0, 3.0, (3, *shape)).astype(np.float32)  # pebbles / sensor noise

    roads = _roads(rng, size, kind)
    if kind == "mixed":  # from the landscape's own stream: without lanes a scene keeps its bytes
        roads += [Road("paved", _smooth_path(lrng, size, 3, 90 * size / 1024), float(lrng.uniform(2.0, 4.5))) for _ in range(lanes)]
    rows, cols = np.mgrid[0:size, 0:size]
    if not desert:  # linear clutter that is not road: hedgerows and ditches (dark), field edges (light)
        for n, colour, width in ((land.hedges, np.array(land.shrub, np.float32), (1.5, 4.0)), (land.tracks, np.minimum(base * 1.15 + 10, 250), (0.8, 2.0))):
            for _ in range(n):
                line = _meander(lrng, _smooth_path(lrng, size, 4, 150 * size / 1024), 3.0, 40)
                a = np.clip((lrng.uniform(*width) / cell / 2 - _distance(line, shape)) / 1.5 + 0.5, 0, 1) * lrng.uniform(0.4, 0.8)
                img = img * (1 - a[None]) + colour[:, None, None] * a[None]
    for road in sorted(roads, key=lambda r: ROAD_TYPES.index(r.kind), reverse=True):  # paved drawn last, on top
        dist = _distance(road.line, shape)
        half = road.width_m / cell / 2
        if road.kind == "paved" and road.width_m < LANE_MAX:  # lane: smooth edges, no markings, asphalt or concrete, often faint
            edge = np.clip(half + 0.5 - dist, 0, 1) * lrng.uniform(0.5, 0.95)
            surface = np.array(land.asphalt[lrng.integers(len(land.asphalt))], np.float32) + lrng.normal(0, 8, 3).astype(np.float32)
            img = img * (1 - edge[None]) + (surface[:, None, None] + tex[None] * 3.0) * edge[None]
        elif road.kind == "paved":
            edge = np.clip(half + 0.5 - dist, 0, 1)
            surface = np.array(land.asphalt[0] if desert else land.asphalt[lrng.integers(len(land.asphalt))], np.float32)
            asphalt = surface + rng.normal(0, 6)
            colour = asphalt[:, None, None] + tex[None] * 3.0
            img = img * (1 - edge[None]) + colour * edge[None]
            shoulder = np.clip(1 - np.abs(dist - half - 2) / 2, 0, 1) * 0.25  # dust on the verge
            img = img * (1 - shoulder[None]) + np.array([210, 195, 170], np.float32)[:, None, None] * shoulder[None]
            if rng.random() < 0.8:  # dashed centre line: 3 m on, 9 m off
                dashes = [ops.substring(road.line, d, d + 3 / cell) for d in np.arange(0, road.line.length, 12 / cell)]
                dash_d = _distance(shapely.MultiLineString([d for d in dashes if d.length > 0]), shape)
                paint = np.clip(0.9 - dash_d, 0, 1) * edge
                colour = np.array([235, 210, 90] if rng.random() < 0.5 else [235, 235, 230], np.float32)
                img = img * (1 - paint[None]) + colour[:, None, None] * paint[None]
        elif road.kind == "unpaved":
            ragged = half + 1.5 * _noise(rng, shape, (6,), (1.0,))
            alpha = np.clip((ragged - dist) / 2.5 + 0.5, 0, 1) * 0.85
            dirt = base * 1.09 + np.array([8, 8, 10], np.float32) if desert else np.array(land.dirt, np.float32) + lrng.normal(0, 8, 3).astype(np.float32)
            img = img * (1 - alpha[None]) + np.minimum(dirt, 250)[:, None, None] * alpha[None]
            for side in (-1, 1):  # tyre tracks, about 1.7 m apart
                track = road.line.offset_curve(side * 0.85 / cell)
                if track.is_empty:
                    continue
                td = _distance(track, shape)
                a = np.clip(1.2 - td / 1.2, 0, 1) * 0.35 * alpha / 0.85
                img = img * (1 - a[None]) + ((base if desert else dirt) * 0.82)[:, None, None] * a[None]
        else:
            ragged = half + 0.6 * _noise(rng, shape, (3,), (1.0,))
            alpha = np.clip((ragged - dist) / 1.5 + 0.5, 0, 1) * 0.55
            path = np.minimum(base * 1.12 + 6, 252) if desert else np.array(land.path, np.float32) + lrng.normal(0, 6, 3).astype(np.float32)
            img = img * (1 - alpha[None]) + path[:, None, None] * alpha[None]

    road_mask = np.zeros(shape, bool)
    for road in roads:
        road_mask |= _distance(road.line, shape) < road.width_m / cell / 2 + 4

    # Shrubs or trees: dark blobs with shadows, mostly avoiding the roads.
    n_shrubs = int(rng.integers(120, 260) * (size / 1024) ** 2 * land.shrubs * (CELL / cell) ** 2)
    # float64 once a crown is drawn (the demo scenes' bytes depend on it), float32 before.
    shrub = np.zeros(shape, np.float32)
    shadow = np.zeros(shape, np.float32)
    r_lo, r_hi = land.shrub_size[0] / cell, land.shrub_size[1] / cell
    for _ in range(n_shrubs):
        r0, c0 = rng.uniform(0, size, 2)
        rad = rng.uniform(2, 9) if desert else lrng.uniform(r_lo, r_hi)
        if road_mask[int(r0), int(c0)] and (desert or lrng.random() >= land.canopy):
            continue
        # The desert draws on the whole grid (its bytes stay as they were); the others, with
        # many more trees, only around the crown.
        y0, y1 = (0, size) if desert else (max(int(r0 - 2 * rad - 2), 0), min(int(r0 + 2 * rad + 3), size))
        x0, x1 = (0, size) if desert else (max(int(c0 - 2 * rad - 2), 0), min(int(c0 + 2 * rad + 3), size))
        if shrub.dtype != np.float64:
            shrub, shadow = shrub.astype(np.float64), shadow.astype(np.float64)
        rr, cc = rows[y0:y1, x0:x1], cols[y0:y1, x0:x1]
        d = np.hypot(rr - r0, cc - c0)
        shrub[y0:y1, x0:x1] = np.maximum(shrub[y0:y1, x0:x1], np.clip(rad - d, 0, 1))
        ds = np.hypot(rr - r0 - SUN[1] * rad, cc - c0 - SUN[0] * rad)
        shadow[y0:y1, x0:x1] = np.maximum(shadow[y0:y1, x0:x1], np.clip(rad * 0.9 - ds, 0, 1))
    img = img * (1 - 0.45 * shadow[None])
    shrub_col = np.array(land.shrub, np.float32)[:, None, None] + tex[None] * 10
    img = img * (1 - shrub[None]) + shrub_col * shrub[None]

    # Buildings (mixed scenes only): rectangles with bright or tiled roofs and cast shadows.
    if kind == "mixed":
        for _ in range(int(rng.integers(3, 9) * (size / 1024) ** 2 * land.buildings * (CELL / cell) ** 2) + 1):
            h, w = rng.uniform(30, 70, 2) * (CELL / cell)
            r0, c0 = rng.uniform(h, size - h), rng.uniform(w, size - w)
            box = (np.abs(rows - r0) < h / 2) & (np.abs(cols - c0) < w / 2)
            if (box & road_mask).any():
                continue
            off = rng.uniform(6, 14) * (CELL / cell)
            sbox = (np.abs(rows - r0 - SUN[1] * off) < h / 2) & (np.abs(cols - c0 - SUN[0] * off) < w / 2) & ~box
            img[:, sbox] *= 0.55
            roof = np.array([[225, 222, 215], [170, 95, 70], [140, 140, 145]][rng.integers(0, 3)], np.float32)
            img[:, box] = roof[:, None] + tex[box][None] * 5

    img = ndimage.gaussian_filter(img, (0, 0.6, 0.6))  # sensor blur
    gain = rng.uniform(0.92, 1.08)  # illumination differs between acquisitions
    img = img * gain
    if not desert:  # haze lifts the dark tones and flattens the contrast
        haze = lrng.uniform(0.0, 0.35)
        img = img * (1 - haze) + np.float32(205) * haze
    img = np.clip(img, 0, 255).round().astype(np.uint8)
    visible = [r for r in roads if not shapely.box(0, 0, size, size).intersection(r.line).is_empty]
    return img, visible


def write_scene(seed: int, image_path: str | Path, labels_path: str | Path, *, size: int = 1024, kind: str = "mixed",
                origin: tuple[float, float] | None = None, landscape: str = "desert", cell: float = CELL, lanes: int = 0) -> list[Road]:
    """Render a scene and write it as a GeoTIFF plus a GeoPackage of road centrelines."""
    img, roads = render_scene(seed, size, kind, landscape=landscape, cell=cell, lanes=lanes)
    x0, y0 = origin if origin is not None else (640_000.0 + (seed % 97) * 500.0, 4_000_000.0 + (seed // 97) * 500.0)
    transform = from_origin(x0, y0, cell, cell)
    profile = {**GTIFF_PROFILE, "width": size, "height": size, "count": 3, "dtype": "uint8", "crs": CRS, "transform": transform, "photometric": "RGB"}
    with atomic_path(image_path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(img)
    clip = shapely.box(0, 0, size, size)
    records = []
    for road in roads:
        line = shapely.affinity.affine_transform(road.line.intersection(clip), [transform.a, transform.b, transform.d, transform.e, transform.c, transform.f])
        for part in shapely.get_parts(line):
            if part.geom_type == "LineString" and part.length > 0:
                records.append({"Classvalue": 1, "road_type": road.kind, "width_m": round(road.width_m, 2), "geometry": part})
    gdf = gpd.GeoDataFrame(records, geometry="geometry", crs=CRS)
    with atomic_path(labels_path) as tmp:
        # A fixed timestamp makes the GeoPackage byte-identical for the same seed.
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": "2000-01-01T00:00:00.000Z"})
        try:
            pyogrio.write_dataframe(gdf, tmp, layer="roads", driver="GPKG")
        finally:
            pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": None})
    return roads
