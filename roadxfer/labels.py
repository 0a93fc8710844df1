"""Step 1: burn buffered road polylines into a label raster and an orientation raster.

Both rasters lie exactly on the image grid. The label raster holds class values
(0 background, 255 ignore where the image is nodata). The orientation raster holds,
for every pixel labelled from a line, the direction of the nearest polyline segment,
binned over 0-180 degrees (roads are undirected): 0 no road, 1..n the bin, 255 ignore
(nodata, or pixels labelled from polygons, which have no direction).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyproj
import rasterio
import shapely
from rasterio import features
from rasterio.windows import Window
from rasterio.windows import transform as window_transform
from scipy import ndimage

from . import IGNORE_VALUE
from .atomic import atomic_path
from .config import default
from .errors import InputError
from .orientation import angle_bin
from .raster import GTIFF_PROFILE, block_windows, check_written, image_info, read_window
from .vectors import LINE_TYPES, class_values, local_utm, read_vectors

log = logging.getLogger(__name__)

BLOCK = 1024  # rows/cols processed at once: bounds memory whatever the scene size


@dataclass(frozen=True)
class LabelSettings:
    buffer_radius: float = default("labels.buffer_radius")
    orientation_bin_size: int = default("labels.orientation_bin_size")
    class_field: str | None = default("labels.class_field")
    class_value: int | None = default("labels.class_value")
    class_map: Mapping[str, Any] | None = default("labels.class_map")
    known_values: frozenset[int] | None = None

    @property
    def orientation_bins(self) -> int:
        return 180 // self.orientation_bin_size


def buffer_in_crs(gdf: gpd.GeoDataFrame, radius: float, target_crs: Any) -> gpd.GeoSeries:
    """Buffer lines by ``radius`` and return all shapes in ``target_crs``.

    As in the reference tool the radius is in the labels' linear units; for geographic
    labels (degrees) it is in metres, buffered in the local UTM zone.
    """
    geoms = gdf.geometry
    is_line = geoms.geom_type.isin(LINE_TYPES).to_numpy()
    if radius <= 0:
        return geoms.to_crs(target_crs)
    work_crs = geoms.crs
    if work_crs.is_geographic:
        work_crs = local_utm(geoms)
        geoms = geoms.to_crs(work_crs)
    buffered = geoms.copy()
    buffered[is_line] = geoms[is_line].buffer(radius, cap_style="round", join_style="round")
    return buffered.to_crs(target_crs)


def _segments_pixel_space(lines: gpd.GeoSeries, transform: rasterio.Affine) -> tuple[np.ndarray, np.ndarray]:
    """All two-point segments of ``lines`` in pixel (col, row) coordinates, and their angles."""
    inv = ~transform
    parts = shapely.get_parts(lines.to_numpy())
    starts, ends = [], []
    for part in parts:
        xy = shapely.get_coordinates(part)
        if len(xy) < 2:
            continue
        starts.append(xy[:-1])
        ends.append(xy[1:])
    if not starts:
        return np.zeros((0, 2, 2)), np.zeros(0)
    a, b = np.concatenate(starts), np.concatenate(ends)
    ca, ra = inv * (a[:, 0], a[:, 1])
    cb, rb = inv * (b[:, 0], b[:, 1])
    seg = np.stack([np.stack([ca, ra], 1), np.stack([cb, rb], 1)], 1)
    # y grows downwards in pixel space; measure angles counter-clockwise from +x as seen on screen.
    angles = np.degrees(np.arctan2(-(rb - ra), cb - ca))
    return seg, angles


def _orientation_block(
    segs: np.ndarray, bins: np.ndarray, window: Window, margin: int
) -> np.ndarray:
    """Orientation bin of the nearest segment for every pixel of ``window`` (0 where no segment near)."""
    h, w = int(window.height) + 2 * margin, int(window.width) + 2 * margin
    col0, row0 = window.col_off - margin, window.row_off - margin
    shapes = (
        (shapely.LineString(s - (col0, row0)), int(v))
        for s, v in zip(segs, bins)
    )
    # Pixel-space transform: the segments are already in pixel units of this block.
    centre = features.rasterize(shapes, out_shape=(h, w), fill=0, all_touched=True, dtype="uint8")
    if not centre.any():
        return np.zeros((int(window.height), int(window.width)), np.uint8)
    _, (ri, ci) = ndimage.distance_transform_edt(centre == 0, return_indices=True)
    nearest = centre[ri, ci]
    return nearest[margin : margin + int(window.height), margin : margin + int(window.width)]


def rasterize_scene(
    image: str | Path,
    labels: str | Path,
    out_label: str | Path,
    out_orientation: str | Path,
    out_summary: str | Path,
    settings: LabelSettings,
    *,
    layer: str | None = None,
    where: str | None = None,
    training: bool = True,
    image_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Burn the scene's labels; returns (and writes) a summary with feature and pixel counts."""
    info = image_info(image, **dict(image_kwargs or {}))
    gdf = read_vectors(labels, layer=layer, where=where)
    values = class_values(
        gdf,
        labels,
        class_field=settings.class_field,
        class_value=settings.class_value,
        class_map=settings.class_map,
        known_values=set(settings.known_values) if settings.known_values else None,
    )
    gdf = gdf.assign(_class=values)
    shapes = buffer_in_crs(gdf, settings.buffer_radius, info.crs)
    is_line = gdf.geometry.geom_type.isin(LINE_TYPES).to_numpy()
    centrelines = gdf.geometry[is_line].to_crs(info.crs)

    bounds = shapely.box(*rasterio.transform.array_bounds(info.height, info.width, info.transform))
    touching = shapes.intersects(bounds).to_numpy()
    off = int((~touching).sum())
    if off:
        log.warning("%s: %d of %d feature(s) fall entirely outside the raster %s", labels, off, len(gdf), image)
    if not touching.any() and training:
        raise InputError(
            labels,
            f"none of its {len(gdf)} feature(s) overlap the raster {image} (labels CRS {gdf.crs.to_string()}, raster CRS {info.crs.to_string()})",
            "check that the labels belong to this scene and carry the right CRS",
        )

    cell = info.cell_size
    radius_px = 0.0
    if settings.buffer_radius > 0:
        unit = 1.0 if gdf.crs.is_geographic else float(gdf.crs.axis_info[0].unit_conversion_factor)
        radius_m = settings.buffer_radius * unit
        raster_crs = pyproj.CRS.from_user_input(info.crs.to_wkt())
        raster_unit = float(raster_crs.axis_info[0].unit_conversion_factor) if raster_crs.is_projected else 111_320.0
        radius_px = radius_m / raster_unit / cell
    margin = int(math.ceil(radius_px)) + 2

    order = np.argsort(values, kind="stable")  # higher class values win where features overlap
    shapes, values_sorted, line_sorted = shapes.iloc[order], values[order], is_line[order]
    sindex = shapes.sindex
    segs, angles = _segments_pixel_space(centrelines, info.transform)
    seg_bins = angle_bin(angles, settings.orientation_bin_size)
    seg_bbox = np.stack([segs[..., 0].min(1), segs[..., 1].min(1), segs[..., 0].max(1), segs[..., 1].max(1)], 1) if len(segs) else np.zeros((0, 4))

    profile = {
        **GTIFF_PROFILE,
        "width": info.width,
        "height": info.height,
        "count": 1,
        "dtype": "uint8",
        "crs": info.crs,
        "transform": info.transform,
        "nodata": IGNORE_VALUE,
    }
    counts = np.zeros(256, np.int64)
    # The two rasters and the summary are committed together, and only once every check passed.
    with atomic_path(out_label) as tmp_label, atomic_path(out_orientation) as tmp_orient, atomic_path(out_summary) as tmp_summary:
        with rasterio.open(image) as src, rasterio.open(tmp_label, "w", **profile) as dst_l, rasterio.open(tmp_orient, "w", **profile) as dst_o:
            for window in block_windows(info.width, info.height, BLOCK):
                wt = window_transform(window, info.transform)
                wbox = shapely.box(*rasterio.windows.bounds(window, info.transform))
                idx = sindex.query(wbox, predicate="intersects")
                label = np.zeros((int(window.height), int(window.width)), np.uint8)
                from_line = np.zeros_like(label, dtype=bool)
                if len(idx):
                    idx = np.sort(idx)
                    label = features.rasterize(
                        zip(shapes.iloc[idx], values_sorted[idx].tolist()),
                        out_shape=label.shape, transform=wt, fill=0, all_touched=settings.buffer_radius <= 0, dtype="uint8",
                    )
                    li = idx[line_sorted[idx]]
                    if len(li):
                        from_line = features.rasterize(
                            ((g, 1) for g in shapes.iloc[li]), out_shape=label.shape, transform=wt, fill=0,
                            all_touched=settings.buffer_radius <= 0, dtype="uint8",
                        ).astype(bool)
                orient = np.zeros_like(label)
                if from_line.any():
                    c0, r0 = window.col_off - margin, window.row_off - margin
                    c1, r1 = window.col_off + window.width + margin, window.row_off + window.height + margin
                    near = (seg_bbox[:, 2] >= c0) & (seg_bbox[:, 0] <= c1) & (seg_bbox[:, 3] >= r0) & (seg_bbox[:, 1] <= r1)
                    orient = _orientation_block(segs[near], seg_bins[near], window, margin)
                orient = np.where(from_line & (label > 0), orient, 0).astype(np.uint8)
                orient[(label > 0) & ~from_line] = IGNORE_VALUE
                _, valid = read_window(src, info, window)
                label[~valid] = IGNORE_VALUE
                orient[~valid] = IGNORE_VALUE
                counts += np.bincount(label.ravel(), minlength=256)
                dst_l.write(label, 1, window=window)
                dst_o.write(orient, 1, window=window)
        labelled = int(counts[1:IGNORE_VALUE].sum())
        if labelled == 0 and training:
            raise InputError(labels, f"burning its features into {image} labelled no pixel", "check the buffer radius and that the features overlap the image")
        summary = {
            "image": str(image),
            "labels": str(labels),
            "features": int(len(gdf)),
            "features_off_raster": off,
            "buffer_radius": settings.buffer_radius,
            "buffer_radius_px": radius_px,
            "orientation_bin_size": settings.orientation_bin_size,
            "pixels_per_class": {str(v): int(c) for v, c in enumerate(counts) if c and v not in (0,)},
            "background_pixels": int(counts[0]),
        }
        tmp_summary.write_text(json.dumps(summary, indent=2))
        for raster in (tmp_label, tmp_orient):
            check_written(raster, info.width, info.height)
    log.info("%s: %d feature(s), %d labelled pixel(s), radius %.2f px", image, len(gdf), labelled, radius_px)
    return summary
