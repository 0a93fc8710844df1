"""Step 4: classify whole scenes with a model package, seamlessly and in bounded memory.

The scene is read one strip of tile rows at a time. Tiles overlap; their predictions are
blended with a weight window that is zero in a ``margin`` along edges shared with a
neighbouring tile (where the model sees padding) and rises with a raised cosine across
the rest of the overlap, so there are no seams. The last row/column of tiles is aligned
to the scene edge instead of padding. Accumulators cover one band of rows only; finished
rows are written out at once, so memory does not depend on the scene's size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
import torch
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from . import IGNORE_VALUE
from .atomic import atomic_path, check_room, scratch_dir
from .errors import InputError
from .package import Package, load_package
from .radiometry import Radiometry
from .raster import GTIFF_PROFILE, ImageInfo, cell_size_metres, check_written, image_info, read_window, resampled_grid, warped
from .styles import classes_qml, colour_table, complete_classes, probability_qml, raster_tags, rat_aux_xml
from .raster import tile_starts as starts
from .train import amp_dtype, pick_device, set_threads

log = logging.getLogger(__name__)

RESAMPLE_TOLERANCE = 0.1  # resample: auto classifies on the model's grid when cell sizes differ by more than this

PredictFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps a batch of tiles (B, bands, T, T), float 0-1, to class probabilities (B, K, T, T)."""


@dataclass(frozen=True)
class ClassifySettings:
    batch_size: int = 8
    tile_size: int | None = None  # default: the model's
    overlap: int | None = None  # pixels shared by neighbouring tiles; default tile/4
    margin: int | None = None  # border pixels given no weight next to a neighbour; default overlap/4
    tta: bool = False  # average over flips and 90-degree rotations
    threshold: float | None = None  # road where P(road) >= threshold; default: most probable class
    probability_dtype: str = "uint8"  # uint8 (0-250 = 0-1, 255 nodata) | float32
    min_line_length: float = 5.0  # metres: shorter side branches and networks are dropped
    bridge_gaps: float = 10.0  # metres: dead ends are joined across gaps up to this long
    cell_size_tolerance: float = 2.0  # resample off: warn when scene and model cell sizes differ by more than this factor
    resample: str = "auto"  # auto: on the model's grid when cell sizes differ by > 10% | always | off
    centrelines: dict[str, Any] | None = None  # road graph settings (classify.centrelines in the config)
    device: str | None = None
    bands: tuple[int, ...] | None = None  # 1-based image bands; default: the model's training bands, else all but alpha
    rescale: dict[str, Any] | None = None  # image.rescale settings; default: the model's own (recorded in its package)


def edge_weights(tile: int, overlap: int, margin: int, before: bool, after: bool) -> np.ndarray:
    """1-D blend weights: zero over ``margin`` and a raised cosine over the rest of ``overlap`` on shared edges."""
    w = np.ones(tile, np.float64)
    ramp_len = overlap - 2 * margin
    ramp = np.sin(0.5 * np.pi * (np.arange(ramp_len) + 0.5) / ramp_len) ** 2 if ramp_len > 0 else np.zeros(0)
    if before:
        w[:margin] = 0
        w[margin : margin + ramp_len] = ramp
    if after:
        w[tile - margin :] = 0
        w[tile - margin - ramp_len : tile - margin] = np.minimum(w[tile - margin - ramp_len : tile - margin], ramp[::-1])
    return w


def check_geometry(tile: int, overlap: int, margin: int) -> None:
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be >= 0 and smaller than the tile size {tile}")
    if overlap and not 0 <= 2 * margin < overlap:
        raise ValueError(f"margin {margin} must be less than half the overlap {overlap}, or no pixel between two tiles gets a weight")


def stitch(
    src: rasterio.DatasetReader,
    info: ImageInfo,
    predict: PredictFn,
    n_out: int,
    *,
    tile: int,
    overlap: int,
    margin: int,
    batch_size: int,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[int, torch.Tensor, np.ndarray]]:
    """Yield ``(row offset, blended probabilities (K, h, W) on device, valid mask (h, W))`` strip by strip."""
    check_geometry(tile, overlap, margin)
    H, W = info.height, info.width
    stride = tile - overlap
    rows, cols = starts(H, tile, stride), starts(W, tile, stride)
    Wp = max(W, tile)
    num = torch.zeros((n_out, tile, Wp), dtype=torch.float32, device=device)
    den = torch.zeros((tile, Wp), dtype=torch.float32, device=device)
    valid = np.zeros((tile, Wp), bool)
    weight_cache: dict[tuple[bool, bool, bool, bool], torch.Tensor] = {}
    total, done = len(rows) * len(cols), 0
    for ri, y in enumerate(rows):
        strip, strip_valid = read_window(src, info, Window(0, y, Wp, tile))
        valid |= strip_valid
        top, bottom = y > 0, y + tile < H
        for b0 in range(0, len(cols), batch_size):
            batch_cols = cols[b0 : b0 + batch_size]
            batch = np.stack([strip[:, :, c : c + tile] for c in batch_cols])
            x = torch.from_numpy(batch).to(device, non_blocking=True).float().div_(255.0)
            probs = predict(x)
            for k, c in enumerate(batch_cols):
                key = (top, bottom, c > 0, c + tile < W)
                if key not in weight_cache:
                    wy = edge_weights(tile, overlap, margin, top, bottom)
                    wx = edge_weights(tile, overlap, margin, key[2], key[3])
                    weight_cache[key] = torch.from_numpy(np.outer(wy, wx)).float().to(device)
                wt = weight_cache[key]
                num[:, :, c : c + tile] += probs[k].float() * wt
                den[:, c : c + tile] += wt
            done += len(batch_cols)
            if progress:
                progress(done, total)
        final_end = rows[ri + 1] if ri + 1 < len(rows) else H
        h = min(final_end - y, H - y)
        out = num[:, :h, :W] / den[:h, :W].clamp_min(1e-12)
        yield y, out, valid[:h, :W] & (den[:h, :W] > 0).cpu().numpy()
        if ri + 1 < len(rows):
            shift = final_end - y  # rows of the buffer that are finished
            keep = tile - shift
            num[:, :keep] = num[:, shift:].clone()
            den[:keep] = den[shift:].clone()
            valid[:keep] = valid[shift:]
            num[:, keep:] = 0
            den[keep:] = 0
            valid[keep:] = False


def resampled_strips(
    src: rasterio.DatasetReader,
    info: ImageInfo,
    grid: tuple[rasterio.Affine, int, int],
    predict: PredictFn,
    n_out: int,
    scratch: Path,
    *,
    rows: int = 256,
    **geometry: Any,
) -> Iterator[tuple[int, torch.Tensor, np.ndarray]]:
    """As :func:`stitch`, but the model sees the scene on ``grid`` (its own cell size).

    The scene is read through a WarpedVRT (average when coarsening, bilinear when
    refining), the blended class probabilities go to a scratch raster on the model's grid
    (uint8, 0-250), and that is read back warped onto the scene's grid (bilinear) in
    strips of ``rows``: no full-scene array at either cell size.
    """
    transform, width, height = grid
    coarsen = abs(transform.a) > info.cell_size
    vrt, minfo = warped(src, info, transform, width, height, Resampling.average if coarsen else Resampling.bilinear)
    profile = {**GTIFF_PROFILE, "width": width, "height": height, "count": n_out, "dtype": "uint8", "nodata": IGNORE_VALUE, "crs": info.crs, "transform": transform}
    with vrt, rasterio.open(scratch, "w", **profile) as dst:
        for y, probs, valid in stitch(vrt, minfo, predict, n_out, **geometry):
            p = torch.round(probs * 250).to(torch.uint8).cpu().numpy()
            p[:, ~valid] = IGNORE_VALUE
            dst.write(p, window=Window(0, y, width, p.shape[1]))
    device = geometry["device"]
    with rasterio.open(scratch) as model_grid, WarpedVRT(model_grid, crs=info.crs, transform=info.transform, width=info.width, height=info.height,
                                                         resampling=Resampling.bilinear, nodata=IGNORE_VALUE) as back:
        for y in range(0, info.height, rows):
            win = Window(0, y, info.width, min(rows, info.height - y))
            p = back.read(window=win)
            _, valid = read_window(src, info, win)
            valid &= p[0] != IGNORE_VALUE
            yield y, torch.from_numpy(p.astype(np.float32) / 250.0).to(device), valid


def model_predict_fn(pkg: Package, device: torch.device, *, tta: bool = False) -> PredictFn:
    """Softmax class probabilities of the package's model; mixed precision on CUDA; optional TTA."""
    model = pkg.model.to(device).eval()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    mean = torch.tensor(pkg.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(pkg.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    dtype = amp_dtype(device)

    @torch.inference_mode()
    def run(x: torch.Tensor) -> torch.Tensor:
        x = (x - mean) / std
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return torch.softmax(model.segment(x).float(), 1)

    if not tta:
        return run

    def run_tta(x: torch.Tensor) -> torch.Tensor:
        acc = None
        for flip in (False, True):
            xf = x.flip(-1) if flip else x
            for k in range(4):
                p = run(torch.rot90(xf, k, (-2, -1)))
                p = torch.rot90(p, -k, (-2, -1))
                p = p.flip(-1) if flip else p
                acc = p if acc is None else acc + p
        return acc / 8

    return run_tta


def classify_scene(
    image: str | Path,
    package: str | Path | Package,
    out_class: str | Path,
    *,
    out_probability: str | Path | None = None,
    out_centrelines: str | Path | None = None,
    settings: ClassifySettings = ClassifySettings(),
    threads: int = 1,
) -> dict[str, Any]:
    """Classify one scene; returns a summary (tiles, seconds, megapixels/s)."""
    set_threads(threads)
    device = pick_device(settings.device)
    pkg = package if isinstance(package, Package) else load_package(package, device=device)
    k = pkg.spec.in_channels
    bands = settings.bands or pkg.source_bands
    info = image_info(image, allowed_band_counts=(k,), allowed_dtypes=None, bands=bands,
                      radiometry=Radiometry.from_config(settings.rescale) if settings.rescale else pkg.radiometry,
                      bands_fix=f"the model {pkg.path.name} takes {k} band(s): choose {k} with image.bands (python -m roadxfer classify --bands)")
    assert info.stretch is not None
    if not info.stretch.identity:
        log.info("%s: %s rescale of bands %s from %s to %s onto 0-255", image, info.stretch.method, list(info.bands),
                 [round(v, 3) for v in info.stretch.low], [round(v, 3) for v in info.stretch.high])
    tile = settings.tile_size or pkg.tile_size
    if tile % 32:
        raise InputError(None, f"tile_size {tile} is not a multiple of 32", "the model downsamples by 32: use 256, 512, ...")
    overlap = settings.overlap if settings.overlap is not None else tile // 4
    margin = settings.margin if settings.margin is not None else overlap // 4
    model_cell = pkg.emd.get("CellSize")
    grid = None  # the model's grid over the scene, when the scene is resampled on the fly
    if settings.resample not in ("auto", "always", "off"):
        raise InputError(None, f"classify.resample {settings.resample!r} is not auto, always or off", "choose one of them")
    if model_cell:
        scene_cell = cell_size_metres(info.crs, info.cell_size)
        ratio = scene_cell / float(model_cell)
        if settings.resample == "always" or (settings.resample == "auto" and abs(ratio - 1) > RESAMPLE_TOLERANCE):
            grid = resampled_grid(info, float(model_cell))
            log.info("%s: %.3g m cells classified on the model's %.3g m grid (%dx%d px, resampled on the fly); outputs on the scene's grid",
                     image, scene_cell, model_cell, grid[1], grid[2])
        elif not 1 / settings.cell_size_tolerance <= ratio <= settings.cell_size_tolerance:
            log.warning("%s has %.3g m cells but the model was trained at %.3g m (x%.2f): results may be poor; set classify.resample: auto, or resample the scene (gdalwarp -tr)",
                        image, scene_cell, model_cell, ratio)
    elif settings.resample == "always":
        log.warning("%s: the model %s records no cell size, so the scene is classified as it is", image, pkg.path.name)
    classes = complete_classes(pkg.classes)
    values = np.array([0] + [c["value"] for c in classes], np.uint8)
    tags = raster_tags(model=pkg.path.name, weights_sha256=pkg.weights_sha256, image=image, threshold=settings.threshold, tta=settings.tta, classes=classes)
    tags.update(ROADXFER_BANDS=",".join(map(str, info.bands)), ROADXFER_RESCALE=json.dumps(info.stretch.to_dict()))
    n_out = len(values)
    predict = model_predict_fn(pkg, device, tta=settings.tta)
    profile = {**GTIFF_PROFILE, "width": info.width, "height": info.height, "count": 1, "crs": info.crs, "transform": info.transform}
    t0 = time.perf_counter()
    last = [t0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] >= 10 or done == total:
            last[0] = now
            el = now - t0
            log.info("%s: tiles %d/%d (%.0f%%), %.1f tiles/s, %.2f Mpx/s", Path(image).name, done, total, 100 * done / total, done / el, done * tile * tile / el / 1e6)

    # Scratch beside the outputs (same disk as the final COGs); a killed job's is removed next time.
    with scratch_dir(Path(out_class).parent, "classify") as scratch:
        cls_tmp, prob_tmp = scratch / "class.tif", scratch / "prob.tif"
        prob_dtype = settings.probability_dtype
        with rasterio.open(image) as src, rasterio.open(cls_tmp, "w", **profile, dtype="uint8", nodata=IGNORE_VALUE) as cls_dst:
            # Colour table, band description and tags go with the data into the COGs.
            cls_dst.write_colormap(1, colour_table(classes))
            cls_dst.set_band_description(1, "road class (" + ", ".join(f"{c['value']} {c['name']}" for c in classes) + f"; 0 background, {IGNORE_VALUE} nodata)")
            cls_dst.update_tags(**tags)
            prob_dst = None
            if out_probability:
                prob_nodata = IGNORE_VALUE if prob_dtype == "uint8" else np.nan
                prob_dst = rasterio.open(prob_tmp, "w", **{**profile, "predictor": 2 if prob_dtype == "uint8" else 3}, dtype=prob_dtype, nodata=prob_nodata)
                prob_dst.set_band_description(1, "road probability (0-250 = 0-1, 255 nodata)" if prob_dtype == "uint8" else "road probability (0-1, NaN nodata)")
                prob_dst.update_tags(**tags)
            geometry = {"tile": tile, "overlap": overlap, "margin": margin, "batch_size": settings.batch_size, "device": device, "progress": progress}
            strips = (stitch(src, info, predict, n_out, **geometry) if grid is None
                      else resampled_strips(src, info, grid, predict, n_out, scratch / "model_grid.tif", **geometry))
            try:
                for y, probs, valid in strips:
                    road = 1 - probs[0]
                    if settings.threshold is not None and n_out == 2:
                        idx = (road >= settings.threshold).to(torch.uint8)
                    else:
                        idx = probs.argmax(0).to(torch.uint8)
                    cls = values[idx.cpu().numpy()]
                    cls[~valid] = IGNORE_VALUE
                    win = Window(0, y, info.width, cls.shape[0])
                    cls_dst.write(cls, 1, window=win)
                    if prob_dst is not None:
                        p = road.cpu().numpy()
                        if prob_dtype == "uint8":
                            p = np.round(p * 250).astype(np.uint8)
                            p[~valid] = IGNORE_VALUE
                        else:
                            p = p.astype(np.float32)
                            p[~valid] = np.nan
                        prob_dst.write(p, 1, window=win)
            finally:
                if prob_dst is not None:
                    prob_dst.close()
        check_room(scratch)
        seconds = time.perf_counter() - t0
        lines = None
        # All outputs are written and checked first, then committed together.
        with contextlib.ExitStack() as outputs:
            cls_out = outputs.enter_context(atomic_path(out_class))
            write_cog(cls_tmp, cls_out, categorical=True)
            check_written(cls_out, info.width, info.height)
            sidecars = {Path(f"{out_class}.aux.xml"): rat_aux_xml(classes), Path(out_class).with_suffix(".qml"): classes_qml(classes)}
            if out_probability:
                prob_out = outputs.enter_context(atomic_path(out_probability))
                write_cog(prob_tmp, prob_out, categorical=False)
                check_written(prob_out, info.width, info.height)
                sidecars[Path(out_probability).with_suffix(".qml")] = probability_qml(prob_dtype)
            for path, text in sidecars.items():  # the attribute table and the QGIS styles, committed with the rasters
                outputs.enter_context(atomic_path(path)).write_text(text)
            if out_centrelines:
                from .centrelines import centrelines_from_raster, vector_settings

                lines = centrelines_from_raster(cls_out, outputs.enter_context(atomic_path(out_centrelines)), classes=classes,
                                                min_length=settings.min_line_length, bridge=settings.bridge_gaps,
                                                probability=prob_tmp if out_probability else None, probability_scale=250.0 if prob_dtype == "uint8" else 1.0,
                                                scene=Path(image).name, settings=vector_settings(settings.centrelines))
            check_room(Path(out_class).parent)
    n_tiles = count_tiles(grid[2], grid[1], tile, overlap) if grid else count_tiles(info.height, info.width, tile, overlap)
    summary = {"image": str(image), "model": str(pkg.path), "tiles": n_tiles, "seconds": seconds, "megapixels_per_s": info.width * info.height / seconds / 1e6, "device": str(device), "centrelines": lines,
               "resampled_to_m": float(model_cell) if grid else None}
    log.info("%s classified in %.1f s (%.2f Mpx/s) on %s", image, seconds, summary["megapixels_per_s"], device)
    return summary


def write_cog(src_path: Path, dst_path: Path, *, categorical: bool) -> None:
    """Copy a tiled GeoTIFF to a Cloud-Optimised GeoTIFF with overviews."""
    rasterio.shutil.copy(src_path, dst_path, driver="COG", compress="DEFLATE", predictor="YES" if not categorical else "NO",
                         overview_resampling="MODE" if categorical else "AVERAGE", blocksize=512)


def count_tiles(height: int, width: int, tile: int, overlap: int) -> int:
    return len(starts(height, tile, tile - overlap)) * len(starts(width, tile, tile - overlap))

