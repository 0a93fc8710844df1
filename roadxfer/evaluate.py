"""Step 5: how well a classified scene matches the reference roads, per road type.

Pixel metrics compare the predicted road mask with the buffered reference lines.
Predictions carry no road type, so each pixel is given to the road type whose reference
is nearest (a Voronoi split of the scene); per type, precision, recall, F1 and IoU are
counted inside that type's region. Relaxed metrics count a prediction as correct within
``rho`` pixels of the reference and a reference pixel as found within ``rho`` pixels of
a prediction (the usual road-extraction measure). Counts are returned, so scenes can be
summed before ratios are taken (micro-averages). APLS compares the predicted centrelines
with the reference polylines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
import shapely.geometry
from rasterio import features
from rasterio.windows import Window
from scipy import ndimage

from . import IGNORE_VALUE
from .apls import apls
from .atomic import atomic_path
from .config import default
from .labels import buffer_in_crs
from .errors import InputError
from .raster import ImageInfo, image_info, padded_blocks, read_window
from .vectors import LINE_TYPES, local_utm, read_vectors

log = logging.getLogger(__name__)

BLOCK = 2048  # pixels per side of an evaluation window: memory is bounded by this, not by the scene
HALO = 128  # pixels read around each window: distances and the nearest-type split are exact within it

COUNT_KEYS = ("tp", "fp", "fn", "relaxed_tp_pred", "n_pred", "relaxed_tp_ref", "n_ref")
DIRECTION_KEYS = ("direction_n", "direction_within_15")  # points along the reference lines; those where the predicted direction is within 15 degrees
DIRECTION_TOLERANCE = 15.0


@dataclass(frozen=True)
class EvalSettings:
    road_type_field: str = default("evaluation.road_type_field")
    road_types: Sequence[str] = field(default_factory=lambda: tuple(default("evaluation.road_types")))  # empty: every value found
    buffer_radius: float = 2.0
    relaxed_pixels: float = default("evaluation.relaxed_pixels")
    apls_spacing: float = 10.0
    apls_snap: float = 4.0
    apls_max_pairs: int = 1000
    ignore_windows: Sequence[Sequence[int]] = field(default_factory=tuple)  # [row_off, col_off, height, width] in pixels


def counts(pred: np.ndarray, ref: np.ndarray, region: np.ndarray, rho: float, d_ref: np.ndarray, d_pred: np.ndarray) -> dict[str, int]:
    """Strict and relaxed confusion counts of ``pred`` against ``ref`` inside ``region``."""
    p, r = pred & region, ref & region
    return {
        "tp": int((p & r).sum()),
        "fp": int((p & ~r).sum()),
        "fn": int((r & ~p).sum()),
        "relaxed_tp_pred": int((p & (d_ref <= rho)).sum()),
        "n_pred": int(p.sum()),
        "relaxed_tp_ref": int((r & (d_pred <= rho)).sum()),
        "n_ref": int(r.sum()),
    }


def f1(precision: float, recall: float) -> float:
    """Harmonic mean; NaN only when both are undefined (no prediction and no reference).

    With one undefined the other is 0 (no prediction: recall 0; no reference: precision 0),
    and F1 is 0: a model that finds nothing must score 0, not drop out of the table.
    """
    if precision != precision and recall != recall:
        return float("nan")
    if precision != precision or recall != recall:
        return 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def ratios(c: Mapping[str, float]) -> dict[str, float]:
    """Precision, recall, F1, IoU and their relaxed forms from counts (NaN where undefined)."""

    def div(a: float, b: float) -> float:
        return a / b if b else float("nan")

    precision, recall = div(c["tp"], c["tp"] + c["fp"]), div(c["tp"], c["tp"] + c["fn"])
    rp, rr = div(c["relaxed_tp_pred"], c["n_pred"]), div(c["relaxed_tp_ref"], c["n_ref"])
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1(precision, recall),
        "iou": div(c["tp"], c["tp"] + c["fp"] + c["fn"]),
        "relaxed_precision": rp,
        "relaxed_recall": rr,
        "relaxed_f1": f1(rp, rr),
    }


def nearest_type(masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """For every pixel, the distance to and the 1-based index of the nearest mask's pixel
    (a Voronoi split; where masks overlap the first wins). At least one mask must have a pixel."""
    label = np.zeros(masks[0].shape, np.int32)
    for i, m in enumerate(masks, start=1):
        label[m & (label == 0)] = i
    dist, (ri, ci) = ndimage.distance_transform_edt(label == 0, return_indices=True)
    return dist, label[ri, ci]


def mask_metrics(
    pred: np.ndarray,
    refs: Mapping[str, np.ndarray],
    valid: np.ndarray,
    rho: float,
    *,
    region: np.ndarray | None = None,
    far_label: np.ndarray | None = None,
    far: float = np.inf,
) -> dict[str, dict[str, int]]:
    """Counts for every road type (in its Voronoi region) and for ``all`` roads (whole valid area).

    Counted over ``valid`` (and ``region`` when given: the core of a padded window). Pixels
    whose nearest reference pixel in the array is further than ``far`` take their road type
    from ``far_label`` (1-based index into ``refs``; 0 none): in a padded window, a reference
    outside the window could be nearer. Types are reported when they have reference pixels
    here, or own part of the counted area through ``far_label``.
    """
    names = list(refs)
    area = valid if region is None else valid & region
    any_ref = np.zeros(pred.shape, bool)
    for m in refs.values():
        any_ref |= m
    inf = np.full(pred.shape, np.inf)
    d_pred = ndimage.distance_transform_edt(~pred) if pred.any() else inf
    out = {"all": counts(pred, any_ref, area, rho, ndimage.distance_transform_edt(~any_ref) if any_ref.any() else inf, d_pred)}
    if any_ref.any():
        dist, nearest = nearest_type([refs[name] for name in names])
        if far_label is not None:
            nearest = np.where(dist > far, far_label, nearest)
    elif far_label is not None:
        nearest = far_label
    else:
        return out
    for i, name in enumerate(names, start=1):
        ref = refs[name]
        own = area & (nearest == i)
        if not ref.any() and not (far_label is not None and own.any()):
            continue
        out[name] = counts(pred, ref, own, rho, ndimage.distance_transform_edt(~ref) if ref.any() else inf, d_pred)
    return out


def valid_area(valid: np.ndarray, transform: rasterio.Affine) -> shapely.Geometry:
    """The scene's valid pixels as one (multi)polygon in the scene's CRS."""
    if valid.all():
        h, w = valid.shape
        return shapely.box(*rasterio.transform.array_bounds(h, w, transform))
    polys = [shapely.geometry.shape(g) for g, v in features.shapes(valid.astype(np.uint8), mask=valid, transform=transform) if v == 1]
    return shapely.union_all(polys) if polys else shapely.Polygon()


def clip_lines(lines: gpd.GeoDataFrame, area: shapely.Geometry) -> gpd.GeoDataFrame:
    """The parts of ``lines`` inside ``area`` (lines that leave and re-enter it become several)."""
    if not len(lines):
        return lines
    clipped = lines.assign(geometry=shapely.intersection(lines.geometry.to_numpy(), area))
    clipped = clipped.explode(index_parts=False)
    return clipped[clipped.geometry.geom_type.isin(LINE_TYPES).to_numpy() & ~clipped.geometry.is_empty.to_numpy()]


@dataclass
class ReferenceShapes:
    """Buffered reference roads per type, indexed for burning one window at a time."""

    types: list[str]
    shapes: dict[str, np.ndarray]  # type -> shapely geometries in the image CRS
    trees: dict[str, shapely.STRtree]
    lines: gpd.GeoDataFrame  # the reference lines in the image CRS, with ``road_type``

    def burn(self, name: str, window: Window, transform: rasterio.Affine, *, all_touched: bool = False) -> np.ndarray:
        shape = (int(window.height), int(window.width))
        wt = rasterio.windows.transform(window, transform)
        hits = self.trees[name].query(shapely.box(*rasterio.windows.bounds(window, transform)))
        if not len(hits):
            return np.zeros(shape, bool)
        geoms = self.shapes[name][np.sort(hits)]
        return features.rasterize(((g, 1) for g in geoms), out_shape=shape, transform=wt, fill=0, dtype="uint8", all_touched=all_touched).astype(bool)


def reference_shapes(info: ImageInfo, labels: str | Path, settings: EvalSettings, *, layer: str | None = None, where: str | None = None) -> ReferenceShapes:
    """The reference roads of each type, buffered, in the image CRS; and the lines themselves."""
    gdf = read_vectors(labels, layer=layer, where=where)
    field_ = settings.road_type_field
    if field_ and field_ not in gdf.columns:
        log.warning("%s has no %r attribute: all roads are evaluated as one type", labels, field_)
        types = pd.Series("road", index=gdf.index)
    else:
        types = gdf[field_].astype(str) if field_ else pd.Series("road", index=gdf.index)
    wanted = list(settings.road_types) or sorted(types.unique())
    buffered = buffer_in_crs(gdf, settings.buffer_radius, info.crs)
    shapes = {}
    for t in wanted:
        geoms = buffered[(types == t).to_numpy()].to_numpy()
        shapes[t] = np.asarray([g for g in geoms if g is not None and not g.is_empty], dtype=object)
    lines = gdf.loc[gdf.geometry.geom_type.isin(LINE_TYPES).to_numpy()].to_crs(info.crs).assign(road_type=types)
    return ReferenceShapes(wanted, shapes, {t: shapely.STRtree(g) for t, g in shapes.items()}, lines)


def direction_counts(direction: str | Path, lines: gpd.GeoDataFrame, area: shapely.Geometry, transform: rasterio.Affine) -> dict[str, dict[str, int]]:
    """Per road type, points every cell along the reference lines (on ``area``) and how many of them the
    predicted direction raster (degrees clockwise from grid north) gets within 15 degrees.

    Both directions are measured on the raster's grid, so the comparison holds in any CRS.
    """
    out: dict[str, dict[str, int]] = {}
    inv = ~transform
    with rasterio.open(direction) as ds:
        for road_type, line in zip(lines["road_type"], lines.geometry):
            acc = out.setdefault(str(road_type), dict.fromkeys(DIRECTION_KEYS, 0))
            parts = getattr(line, "geoms", [line])
            for part in parts:
                px = shapely.transform(part, lambda xy: np.stack(inv * (xy[:, 0], xy[:, 1]), 1))  # (col, row)
                if px.length < 2:
                    continue
                d = np.arange(0.5, px.length - 0.5, 1.0)
                p = shapely.get_coordinates(shapely.line_interpolate_point(px, d))
                q = shapely.get_coordinates(shapely.line_interpolate_point(px, np.minimum(d + 0.5, px.length)))
                geo = np.stack(transform * (p[:, 0], p[:, 1]), 1)
                col, row = np.floor(p[:, 0]).astype(int), np.floor(p[:, 1]).astype(int)
                keep = (shapely.contains_xy(area, geo[:, 0], geo[:, 1]) & (col >= 0) & (row >= 0) & (col < ds.width) & (row < ds.height)
                        & (np.hypot(*(q - p).T) > 0))
                if not keep.any():
                    continue
                p, q, col, row = p[keep], q[keep], col[keep], row[keep]
                r0, c0 = row.min(), col.min()
                block = ds.read(1, window=Window(int(c0), int(r0), int(col.max() - c0 + 1), int(row.max() - r0 + 1)))
                pred = block[row - r0, col - c0].astype(np.float64)
                truth = np.mod(np.degrees(np.arctan2(q[:, 0] - p[:, 0], -(q[:, 1] - p[:, 1]))), 180.0)  # rows grow southwards
                known = pred != IGNORE_VALUE
                error = np.abs(np.mod(pred[known] - truth[known] + 90.0, 180.0) - 90.0)
                acc["direction_n"] += int(len(p))
                acc["direction_within_15"] += int((error <= DIRECTION_TOLERANCE).sum())
    return out


def reference_masks(info: ImageInfo, labels: str | Path, settings: EvalSettings, *, layer: str | None = None, where: str | None = None) -> tuple[dict[str, np.ndarray], gpd.GeoDataFrame]:
    """Buffered reference roads of each type, burned on the whole image grid (small scenes); and the lines."""
    ref = reference_shapes(info, labels, settings, layer=layer, where=where)
    full = Window(0, 0, info.width, info.height)
    return {t: ref.burn(t, full, info.transform) for t in ref.types}, ref.lines


def coarse_nearest_type(ref: ReferenceShapes, info: ImageInfo, max_side: int = 1024) -> tuple[np.ndarray, int]:
    """Nearest road type (1-based; 0 none) on a grid decimated by a factor ``f``; returns it and ``f``.

    Used for pixels further than the halo from every reference, where only a coarse
    Voronoi split is needed and a full-resolution one would cost memory in the scene's area.
    """
    f = max(1, -(-max(info.width, info.height) // max_side))
    h, w = -(-info.height // f), -(-info.width // f)
    transform = info.transform * rasterio.Affine.scale(f)
    masks = [ref.burn(t, Window(0, 0, w, h), transform, all_touched=True) for t in ref.types]
    if not any(m.any() for m in masks):
        return np.zeros((h, w), np.int32), f
    return nearest_type(masks)[1], f


def evaluate_scene(
    image: str | Path,
    classified: str | Path,
    centrelines: str | Path | None,
    labels: str | Path,
    out_json: str | Path,
    settings: EvalSettings,
    *,
    scene_id: str,
    model: str,
    layer: str | None = None,
    where: str | None = None,
    block: int = BLOCK,
    image_kwargs: Mapping[str, Any] | None = None,
    direction: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate one classified scene; writes and returns ``{"rows": [...], ...}`` with counts and ratios per road type.

    With ``direction`` (the model's predicted road direction raster) the rows also count
    points along the reference lines and those whose predicted direction is within 15
    degrees (``direction_n``, ``direction_within_15``, ``direction_acc15``).

    The scene is evaluated in windows of ``block`` pixels, each read with a halo so that
    distances (relaxed metrics, the split by nearest road type) are exact near its
    edges; reference roads are burned per window from a spatial index. Memory depends
    on ``block``, not on the scene or the label file. ``image_kwargs`` are the workflow's
    checks of the image (:func:`roadxfer.glue.image_kwargs`); by default any bands and type.
    """
    info = image_info(image, **dict(image_kwargs or {"allowed_band_counts": None, "allowed_dtypes": None}))
    with rasterio.open(classified) as src:
        if (src.width, src.height, src.transform) != (info.width, info.height, info.transform):
            raise InputError(classified, f"is not on the grid of {image}", "classify this scene again")
    ref = reference_shapes(info, labels, settings, layer=layer, where=where)
    halo = max(HALO, int(np.ceil(settings.relaxed_pixels)) + 1)
    far_grid, f = coarse_nearest_type(ref, info)
    totals: dict[str, dict[str, int]] = {}
    seen: set[str] = set()
    pieces: list[shapely.Geometry] = []
    windows = list(padded_blocks(info.width, info.height, block, halo))
    t0 = last_log = time.perf_counter()
    with rasterio.open(image) as img, rasterio.open(classified) as src:
        for n, (core, pad, core_slices) in enumerate(windows, start=1):
            r0, c0 = int(pad.row_off), int(pad.col_off)
            cls = src.read(1, window=pad)
            _, valid = read_window(img, info, pad)
            valid &= cls != IGNORE_VALUE
            for wr, wc, wh, ww in settings.ignore_windows:  # [row_off, col_off, height, width] in scene pixels
                valid[max(0, wr - r0) : max(0, wr + wh - r0), max(0, wc - c0) : max(0, wc + ww - c0)] = False
            in_core = np.zeros(valid.shape, bool)
            in_core[core_slices] = True
            core_valid = valid[core_slices]
            if core_valid.any():
                pieces.append(valid_area(core_valid, rasterio.windows.transform(core, info.transform)))
            pred = (cls > 0) & valid
            refs = {t: ref.burn(t, pad, info.transform) for t in ref.types}
            seen.update(t for t, m in refs.items() if m[in_core].any())
            if not pred.any() and not any(m.any() for m in refs.values()):
                continue  # nothing to count here
            rows, cols = np.arange(r0, r0 + int(pad.height)) // f, np.arange(c0, c0 + int(pad.width)) // f
            far_label = far_grid[rows[:, None], cols[None, :]]
            for t, c in mask_metrics(pred, refs, valid, settings.relaxed_pixels, region=in_core, far_label=far_label, far=halo).items():
                acc = totals.setdefault(t, dict.fromkeys(COUNT_KEYS, 0))
                for k in COUNT_KEYS:
                    acc[k] += c[k]
            if len(windows) > 1 and (n == len(windows) or time.perf_counter() - last_log >= 10):
                last_log = time.perf_counter()
                log.info("%s / %s: window %d/%d evaluated (%.0f s)", model, scene_id, n, len(windows), last_log - t0)
    per_type = {"all": totals.get("all", dict.fromkeys(COUNT_KEYS, 0))}
    per_type.update({t: totals.get(t, dict.fromkeys(COUNT_KEYS, 0)) for t in ref.types if t in seen})
    rows_out = [{"scene": scene_id, "model": model, "road_type": t, **c, **ratios(c)} for t, c in per_type.items()]
    result: dict[str, Any] = {"scene": scene_id, "model": model, "rows": rows_out}
    # APLS and direction compare on the scene's valid area only (nodata, alpha and ignore
    # windows removed): lines of the label file elsewhere are not roads this scene could show.
    area = shapely.union_all(pieces) if pieces else shapely.Polygon()
    if direction is not None:
        with rasterio.open(direction) as ds:
            if (ds.width, ds.height, ds.transform) != (info.width, info.height, info.transform):
                raise InputError(direction, f"is not on the grid of {image}", "classify this scene again")
        per_dir = direction_counts(direction, ref.lines, area, info.transform)
        total = {k: sum(c[k] for c in per_dir.values()) for k in DIRECTION_KEYS}
        for row in rows_out:
            row.update(per_dir.get(row["road_type"], dict.fromkeys(DIRECTION_KEYS, 0)) if row["road_type"] != "all" else total)
            row["direction_acc15"] = row["direction_within_15"] / row["direction_n"] if row["direction_n"] else float("nan")
    if centrelines is not None:
        prop = gpd.read_file(centrelines, layer="centrelines")
        ref_lines, prop = clip_lines(ref.lines, area), clip_lines(prop.to_crs(ref.lines.crs) if len(prop) else prop, area)
        if not len(ref_lines) and len(ref.lines):
            log.warning("%s: none of the %d reference line(s) of %s lie on the valid area of %s: APLS has no reference; check the labels' layer and filter",
                        scene_id, len(ref.lines), labels, image)
        crs = ref_lines.crs
        if crs is not None and crs.is_geographic:
            utm = local_utm(ref_lines)
            ref_lines, prop = ref_lines.to_crs(utm), prop.to_crs(utm)
        result["apls"] = apls(list(ref_lines.geometry), list(prop.to_crs(ref_lines.crs).geometry) if len(prop) else [], spacing=settings.apls_spacing,
                              snap=settings.apls_snap, max_pairs=settings.apls_max_pairs)
    with atomic_path(out_json) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    log.info("%s / %s: %s", model, scene_id, ", ".join(f"{r['road_type']} F1 {r['f1']:.3f} recall {r['recall']:.3f}" for r in rows_out))
    return result


def aggregate(results: Sequence[str | Path], out_scenes: str | Path, out_summary: str | Path, *,
              out_retention: str | Path | None = None, retention_scenes: Sequence[str] = ()) -> pd.DataFrame:
    """Per-scene table and a summary per model and road type (counts summed over scenes, APLS averaged).

    ``retention_scenes`` (the pretrained model's domain) are summed apart into
    ``out_retention`` and left out of the summary, which is about the test scenes.
    """
    rows, apls_rows = [], []
    for path in results:
        r = json.loads(Path(path).read_text())
        rows += r["rows"]
        if "apls" in r:
            apls_rows.append({"scene": r["scene"], "model": r["model"], **r["apls"]})
    per_scene = pd.DataFrame(rows)
    if apls_rows:
        a = pd.DataFrame(apls_rows)
        per_scene = per_scene.merge(a.assign(road_type="all"), on=["scene", "model", "road_type"], how="left")
    retained = per_scene["scene"].isin(list(retention_scenes))
    summary = _summarise(per_scene[~retained], [r for r in apls_rows if r["scene"] not in retention_scenes])
    outputs = [(out_scenes, per_scene), (out_summary, summary)]
    if out_retention is not None:
        retention = _summarise(per_scene[retained], [r for r in apls_rows if r["scene"] in retention_scenes]) if retained.any() else pd.DataFrame(columns=summary.columns)
        outputs.append((out_retention, retention))
    with contextlib.ExitStack() as stack:  # the tables are committed together
        for path, df in outputs:
            df.to_csv(stack.enter_context(atomic_path(path)), index=False, float_format="%.4f")
    return summary


def _summarise(per_scene: pd.DataFrame, apls_rows: list[dict[str, Any]]) -> pd.DataFrame:
    keys = list(COUNT_KEYS) + [k for k in DIRECTION_KEYS if k in per_scene]
    summed = per_scene.groupby(["model", "road_type"], sort=False)[keys].sum().reset_index()
    summary = pd.concat([summed, pd.DataFrame([ratios(r) for r in summed.to_dict("records")], index=summed.index)], axis=1)
    if "direction_n" in summed:
        summary["direction_acc15"] = summed["direction_within_15"] / summed["direction_n"].where(summed["direction_n"] > 0)
    if apls_rows:
        mean_apls = pd.DataFrame(apls_rows).groupby("model")["apls"].mean()
        summary["apls"] = [mean_apls.get(m) if t == "all" else np.nan for m, t in zip(summary["model"], summary["road_type"])]
    return summary
