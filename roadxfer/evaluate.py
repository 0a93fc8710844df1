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

import json
import logging
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
from scipy import ndimage

from . import IGNORE_VALUE
from .apls import apls
from .atomic import atomic_path
from .labels import buffer_in_crs
from .raster import ImageInfo, image_info, read_window
from .vectors import LINE_TYPES, read_vectors

log = logging.getLogger(__name__)

COUNT_KEYS = ("tp", "fp", "fn", "relaxed_tp_pred", "n_pred", "relaxed_tp_ref", "n_ref")


@dataclass(frozen=True)
class EvalSettings:
    road_type_field: str = "road_type"
    road_types: Sequence[str] = ()  # empty: every value found
    buffer_radius: float = 2.0
    relaxed_pixels: float = 3.0
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


def mask_metrics(pred: np.ndarray, refs: Mapping[str, np.ndarray], valid: np.ndarray, rho: float) -> dict[str, dict[str, int]]:
    """Counts for every road type (in its Voronoi region) and for ``all`` roads (whole valid area)."""
    names = list(refs)
    any_ref = np.zeros(pred.shape, bool)
    for m in refs.values():
        any_ref |= m
    d_pred = ndimage.distance_transform_edt(~pred) if pred.any() else np.full(pred.shape, np.inf)
    out = {"all": counts(pred, any_ref, valid, rho, ndimage.distance_transform_edt(~any_ref) if any_ref.any() else np.full(pred.shape, np.inf), d_pred)}
    if not any_ref.any():
        return out
    label = np.zeros(pred.shape, np.int32)
    for i, name in enumerate(names, start=1):
        label[refs[name] & (label == 0)] = i
    _, (ri, ci) = ndimage.distance_transform_edt(label == 0, return_indices=True)
    nearest = label[ri, ci]
    for i, name in enumerate(names, start=1):
        ref = refs[name]
        if not ref.any():
            continue
        d_ref = ndimage.distance_transform_edt(~ref)
        out[name] = counts(pred, ref, valid & (nearest == i), rho, d_ref, d_pred)
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


def reference_masks(info: ImageInfo, labels: str | Path, settings: EvalSettings, *, layer: str | None = None, where: str | None = None) -> tuple[dict[str, np.ndarray], gpd.GeoDataFrame]:
    """Buffered reference roads of each type, burned on the image grid; and the lines in the image CRS."""
    gdf = read_vectors(labels, layer=layer, where=where)
    field_ = settings.road_type_field
    if field_ and field_ not in gdf.columns:
        log.warning("%s has no %r attribute: all roads are evaluated as one type", labels, field_)
        types = pd.Series("road", index=gdf.index)
    else:
        types = gdf[field_].astype(str) if field_ else pd.Series("road", index=gdf.index)
    wanted = list(settings.road_types) or sorted(types.unique())
    shapes = buffer_in_crs(gdf, settings.buffer_radius, info.crs)
    refs = {}
    for t in wanted:
        sel = (types == t).to_numpy()
        geoms = [g for g in shapes[sel] if g is not None and not g.is_empty]
        refs[t] = features.rasterize(((g, 1) for g in geoms), out_shape=(info.height, info.width), transform=info.transform, fill=0, dtype="uint8").astype(bool) if geoms else np.zeros((info.height, info.width), bool)
    lines = gdf.loc[gdf.geometry.geom_type.isin(LINE_TYPES).to_numpy()].to_crs(info.crs).assign(road_type=types)
    return refs, lines


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
) -> dict[str, Any]:
    """Evaluate one classified scene; writes and returns ``{"rows": [...], ...}`` with counts and ratios per road type."""
    info = image_info(image)
    with rasterio.open(classified) as src:
        if (src.width, src.height, src.transform) != (info.width, info.height, info.transform):
            raise ValueError(f"{classified} is not on the grid of {image}")
        cls = src.read(1)
    with rasterio.open(image) as src:
        _, valid = read_window(src, info, rasterio.windows.Window(0, 0, info.width, info.height))
    valid &= cls != IGNORE_VALUE
    for r0, c0, h, w in settings.ignore_windows:
        valid[r0 : r0 + h, c0 : c0 + w] = False
    pred = (cls > 0) & valid
    refs, ref_lines = reference_masks(info, labels, settings, layer=layer, where=where)
    per_type = mask_metrics(pred, refs, valid, settings.relaxed_pixels)
    rows = [{"scene": scene_id, "model": model, "road_type": t, **c, **ratios(c)} for t, c in per_type.items()]
    result: dict[str, Any] = {"scene": scene_id, "model": model, "rows": rows}
    if centrelines is not None:
        # APLS compares the networks on the scene's valid area only (nodata, alpha and ignore
        # windows removed): lines of the label file elsewhere are not roads this scene could show.
        area = valid_area(valid, info.transform)
        prop = gpd.read_file(centrelines, layer="centrelines")
        ref_lines, prop = clip_lines(ref_lines, area), clip_lines(prop.to_crs(ref_lines.crs) if len(prop) else prop, area)
        crs = ref_lines.crs
        if crs is not None and crs.is_geographic:
            utm = ref_lines.estimate_utm_crs()
            ref_lines, prop = ref_lines.to_crs(utm), prop.to_crs(utm)
        result["apls"] = apls(list(ref_lines.geometry), list(prop.to_crs(ref_lines.crs).geometry) if len(prop) else [], spacing=settings.apls_spacing,
                              snap=settings.apls_snap, max_pairs=settings.apls_max_pairs)
    with atomic_path(out_json) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    log.info("%s / %s: %s", model, scene_id, ", ".join(f"{r['road_type']} F1 {r['f1']:.3f} recall {r['recall']:.3f}" for r in rows))
    return result


def aggregate(results: Sequence[str | Path], out_scenes: str | Path, out_summary: str | Path) -> pd.DataFrame:
    """Per-scene table and a summary per model and road type (counts summed over scenes, APLS averaged)."""
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
    summed = per_scene.groupby(["model", "road_type"], sort=False)[list(COUNT_KEYS)].sum().reset_index()
    summary = pd.concat([summed, pd.DataFrame([ratios(r) for r in summed.to_dict("records")])], axis=1)
    if apls_rows:
        mean_apls = pd.DataFrame(apls_rows).groupby("model")["apls"].mean()
        summary["apls"] = [mean_apls.get(m) if t == "all" else np.nan for m, t in zip(summary["model"], summary["road_type"])]
    with atomic_path(out_scenes) as tmp:
        per_scene.to_csv(tmp, index=False, float_format="%.4f")
    with atomic_path(out_summary) as tmp:
        summary.to_csv(tmp, index=False, float_format="%.4f")
    return summary
