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
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
import rasterio.shutil
import torch
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from . import IGNORE_VALUE
from .atomic import atomic_path, check_room, scratch_dir
from .background_io import WriteBehind, read_ahead
from .config import default
from .errors import InputError
from .package import Package, load_package
from .radiometry import Radiometry
from .raster import ImageInfo, cell_size_metres, check_written, image_info, read_window, resampled_grid, scratch_profile, warped
from .styles import classes_qml, colour_table, complete_classes, probability_qml, raster_tags, rat_aux_xml
from .raster import tile_starts as starts
from .device import amp_dtype, channels_last, pick_device, set_threads

if TYPE_CHECKING:
    from .centrelines import VectorSettings

log = logging.getLogger(__name__)

RESAMPLE_TOLERANCE = 0.1  # resample: auto classifies on the model's grid when cell sizes differ by more than this

PredictFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps a batch of tiles (B, bands, T, T), float 0-1, to class probabilities (B, K, T, T),
followed, when the model's road direction is asked for, by its two direction channels
(:func:`direction_channels`)."""

DIRECTION_CHANNELS = 2


@dataclass(frozen=True)
class ClassifySettings:
    batch_size: int = default("classify.batch_size")
    tile_size: int | None = default("classify.tile_size")  # default: the model's
    overlap: int | None = default("classify.overlap")  # pixels shared by neighbouring tiles; default tile/4
    margin: int | None = default("classify.margin")  # border pixels given no weight next to a neighbour; default overlap/4
    tta: bool = default("classify.tta")  # average over flips and 90-degree rotations
    threshold: float | None = default("classify.threshold")  # road where P(road) >= threshold; default: most probable class
    probability_dtype: str = default("classify.probability_dtype")  # uint8 (0-250 = 0-1, 255 nodata) | float32
    cell_size_tolerance: float = default("classify.cell_size_tolerance")  # resample off: warn when scene and model cell sizes differ by more than this factor
    resample: str = default("classify.resample")  # auto: on the model's grid when cell sizes differ by > 10% | always | off
    direction: bool = default("classify.direction")  # predict the road direction (runs the orientation decoder); off: the direction raster is all nodata
    background_io: bool = default("classify.background_io")  # read the next strips and write the last ones in background threads while the model runs
    device: str | None = None
    precision: str = default("classify.precision")  # auto | fp32 | bf16 | fp16 (roadxfer.train.amp_dtype)
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


def tiles_touching(height: int, width: int, tile: int, stride: int, core: Window | None = None) -> tuple[list[int], list[int], int]:
    """Row and column starts of the scene's tile grid whose tiles touch ``core`` (default: the whole scene),
    and the index of the first of those rows in the whole grid."""
    r0, r1, c0, c1 = (0, height, 0, width) if core is None else (int(core.row_off), int(core.row_off + core.height), int(core.col_off), int(core.col_off + core.width))
    all_rows = starts(height, tile, stride)
    first = next(i for i, y in enumerate(all_rows) if y + tile > r0)
    rows = [y for y in all_rows[first:] if y < r1]
    cols = [c for c in starts(width, tile, stride) if c < c1 and c + tile > c0]
    return rows, cols, first


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
    core: Window | None = None,
    read_depth: int = 2,
) -> Iterator[tuple[int, torch.Tensor, np.ndarray]]:
    """Yield ``(row offset, blended probabilities (K, h, w) on device, valid mask (h, w))`` strip by strip.

    With ``core`` (a window of the scene) only the tiles of the scene's tile grid that
    touch it are run and only its pixels are yielded (row offsets in the scene, columns
    from the core's left edge): every pixel gets the same tiles, with the same weights,
    added in the same order as without ``core``, so a scene classified in shards equals
    the scene classified at once (up to the model's batch-size rounding, ~1e-7).
    Strips are read ``read_depth`` ahead in a background thread (0: when needed).
    """
    check_geometry(tile, overlap, margin)
    H, W = info.height, info.width
    stride = tile - overlap
    all_rows = starts(H, tile, stride)
    r0, r1, c0, c1 = (0, H, 0, W) if core is None else (int(core.row_off), int(core.row_off + core.height), int(core.col_off), int(core.col_off + core.width))
    rows, cols, first = tiles_touching(H, W, tile, stride, core)
    x0 = cols[0]
    Wp = max(cols[-1] + tile - x0, tile)
    num = torch.zeros((n_out, tile, Wp), dtype=torch.float32, device=device)
    den = torch.zeros((tile, Wp), dtype=torch.float32, device=device)
    valid = np.zeros((tile, Wp), bool)
    weight_cache: dict[tuple[bool, bool, bool, bool], torch.Tensor] = {}
    total, done = len(rows) * len(cols), 0
    pinned = device.type == "cuda"  # page-locked batches: the copy to the GPU runs asynchronously
    reads = contextlib.closing(read_ahead(lambda y: read_window(src, info, Window(x0, y, Wp, tile)), rows, read_depth))
    with reads as strips:
        for ri, (y, (strip, strip_valid)) in enumerate(zip(rows, strips)):
            valid |= strip_valid
            top, bottom = y > 0, y + tile < H
            for b0 in range(0, len(cols), batch_size):
                batch_cols = cols[b0 : b0 + batch_size]
                batch = np.stack([strip[:, :, c - x0 : c - x0 + tile] for c in batch_cols])
                xb = torch.from_numpy(batch)
                x = (xb.pin_memory() if pinned else xb).to(device, non_blocking=True).float().div_(255.0)
                probs = predict(x)
                for k, c in enumerate(batch_cols):
                    key = (top, bottom, c > 0, c + tile < W)
                    if key not in weight_cache:
                        wy = edge_weights(tile, overlap, margin, top, bottom)
                        wx = edge_weights(tile, overlap, margin, key[2], key[3])
                        weight_cache[key] = torch.from_numpy(np.outer(wy, wx)).float().to(device)
                    wt = weight_cache[key]
                    num[:, :, c - x0 : c - x0 + tile] += probs[k].float() * wt
                    den[:, c - x0 : c - x0 + tile] += wt
                done += len(batch_cols)
                if progress:
                    progress(done, total)
            gi = first + ri  # rows up to the next tile row of the whole grid are finished
            final_end = all_rows[gi + 1] if gi + 1 < len(all_rows) else H
            lo, hi = max(y, r0) - y, min(final_end, r1, H) - y
            cols_out = slice(c0 - x0, c1 - x0)
            out = num[:, lo:hi, cols_out] / den[lo:hi, cols_out].clamp_min(1e-12)
            yield y + lo, out, valid[lo:hi, cols_out] & (den[lo:hi, cols_out] > 0).cpu().numpy()
            if ri + 1 < len(rows):
                shift = final_end - y  # rows of the buffer that are finished
                keep = tile - shift
                num[:, :keep] = num[:, shift:].clone()
                den[:keep] = den[shift:].clone()
                valid[:keep] = valid[shift:]
                num[:, keep:] = 0
                den[keep:] = 0
                valid[keep:] = False


def argmax0(probs: torch.Tensor) -> torch.Tensor:
    """``probs.argmax(0)`` as uint8 (first maximum wins), by K elementwise passes.

    A reduction over the first axis of a (K, h, W) strip walks memory with stride h*W and
    took about a tenth of a CPU classification's time; comparing whole planes does not.
    """
    best, idx = probs[0], torch.zeros(probs.shape[1:], dtype=torch.uint8, device=probs.device)
    for k in range(1, probs.shape[0]):
        better = probs[k] > best
        idx[better] = k
        best = torch.maximum(best, probs[k])
    return idx


def shard_windows(width: int, height: int, shard_size: int) -> dict[str, Window]:
    """Disjoint windows of at most ``shard_size`` px covering the scene, named ``r<row>c<col>``."""
    return {f"r{i}c{j}": Window(c, r, min(shard_size, width - c), min(shard_size, height - r))
            for i, r in enumerate(range(0, height, shard_size)) for j, c in enumerate(range(0, width, shard_size))}


def resampled_strips(
    src: rasterio.DatasetReader,
    info: ImageInfo,
    grid: tuple[rasterio.Affine, int, int],
    predict: PredictFn,
    n_out: int,
    scratch: Path,
    *,
    rows: int = 256,
    threads: int = 1,
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
    profile = {**scratch_profile(threads), "width": width, "height": height, "count": n_out, "dtype": "uint8", "nodata": IGNORE_VALUE, "crs": info.crs, "transform": transform}
    with vrt, rasterio.open(scratch, "w", **profile) as dst, WriteBehind(4 * geometry.get("read_depth", 2)) as write:
        for y, probs, valid in stitch(vrt, minfo, predict, n_out, **geometry):
            p = torch.round(probs * 250).to(torch.uint8).cpu().numpy()
            p[:, ~valid] = IGNORE_VALUE
            write(dst.write, p, window=Window(0, y, width, p.shape[1]))
    device = geometry["device"]
    with rasterio.open(scratch) as model_grid, WarpedVRT(model_grid, crs=info.crs, transform=info.transform, width=info.width, height=info.height,
                                                         resampling=Resampling.bilinear, nodata=IGNORE_VALUE) as back:
        for y in range(0, info.height, rows):
            win = Window(0, y, info.width, min(rows, info.height - y))
            p = back.read(window=win)
            _, valid = read_window(src, info, win)
            valid &= p[0] != IGNORE_VALUE
            yield y, torch.from_numpy(p.astype(np.float32) / 250.0).to(device), valid


def direction_channels(orient_logits: torch.Tensor, *, reference_layout: bool) -> torch.Tensor:
    """The road direction a model predicts, as two channels in 0-1 that blend linearly.

    From the orientation head's bins, P(direction | road) gives the mean of (cos 2θ, sin 2θ)
    (θ counter-clockwise from +x as seen on screen; doubled because roads have no sense):
    its angle is the direction and its length (0-1) the head's certainty. Stored as
    ``(1 + mean) / 2`` so that tiles blend, and rasters keep it, like probabilities.
    """
    from .model import undirected_log_probs

    p = torch.softmax(undirected_log_probs(orient_logits, reference_layout=reference_layout)[:, 1:], 1)
    k = p.shape[1]
    centre = (torch.arange(k, device=p.device, dtype=torch.float32) + 0.5) * (math.pi / k)
    theta = -centre if reference_layout else centre  # the reference's bins run clockwise
    c = (p * torch.cos(2 * theta).view(1, k, 1, 1)).sum(1)
    s = (p * torch.sin(2 * theta).view(1, k, 1, 1)).sum(1)
    return torch.stack([(1 + c) / 2, (1 + s) / 2], 1)


def direction_degrees(channels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Direction (degrees clockwise from grid north, 0-180) and certainty (0-1) from :func:`direction_channels`, on their device."""
    c, s = channels[0] * 2 - 1, channels[1] * 2 - 1
    ccw = 0.5 * torch.rad2deg(torch.atan2(s, c))  # from +x, counter-clockwise on screen
    return torch.remainder(90.0 - ccw, 180.0), torch.hypot(c, s)


def direction_uint8(channels: torch.Tensor) -> torch.Tensor:
    """:func:`direction_degrees` rounded to whole degrees (0-179) as uint8."""
    return torch.remainder(torch.round(direction_degrees(channels)[0]), 180.0).to(torch.uint8)


def model_predict_fn(pkg: Package, device: torch.device, *, tta: bool = False, direction: bool = False, precision: str = "auto") -> PredictFn:
    """Softmax class probabilities of the package's model; optional TTA.

    ``precision``: as for training (:func:`roadxfer.train.amp_dtype`; ``auto``: bfloat16 on
    CUDA and on CPUs with AMX or AVX512-BF16, float32 elsewhere).

    With ``direction`` the two channels of :func:`direction_channels` follow the classes
    (the orientation decoder runs too: about 30 % more time for a LinkNet-34 on the CPU).
    """
    model = pkg.model.to(device).eval()
    nhwc = channels_last(device)
    if nhwc:
        model.to(memory_format=torch.channels_last)
    mean = torch.tensor(pkg.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(pkg.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    dtype = amp_dtype(device, precision)
    reference_layout = pkg.spec.reference_layout

    @torch.inference_mode()
    def run(x: torch.Tensor) -> torch.Tensor:
        x = (x - mean) / std
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if not direction:
                return torch.softmax(model.segment(x).float(), 1)
            seg, orient = model(x)
        return torch.cat([torch.softmax(seg.float(), 1), direction_channels(orient, reference_layout=reference_layout)], 1)

    if not tta:
        return run

    @torch.inference_mode()
    def run_tta(x: torch.Tensor) -> torch.Tensor:
        acc = None
        for flip in (False, True):
            xf = x.flip(-1) if flip else x
            for k in range(4):
                p = run(torch.rot90(xf, k, (-2, -1)))
                p = torch.rot90(p, -k, (-2, -1))
                if direction and k % 2:  # turned by 90 degrees: 2θ by 180, both channels change sign
                    p[:, -2:] = 1 - p[:, -2:]
                p = p.flip(-1) if flip else p
                if direction and flip:  # mirrored: θ becomes 180 - θ, sin 2θ changes sign
                    p[:, -1] = 1 - p[:, -1]
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
    out_direction: str | Path | None = None,
    settings: ClassifySettings = ClassifySettings(),
    threads: int = 1,
    window: Window | None = None,
    vector: VectorSettings | None = None,
) -> dict[str, Any]:
    """Classify one scene; returns a summary (tiles, seconds, megapixels/s).

    ``out_direction``: the road direction the model's orientation head predicts (uint8,
    degrees clockwise from grid north 0-179, 255 nodata); the centrelines use it to bridge
    gaps (``vectorise.bridge_direction``). ``out_centrelines``: the road graph as well, traced
    with ``vector`` (the workflow traces it in a step of its own: :mod:`roadxfer.vectorise`).

    With ``window`` only that part of the scene (a shard) is classified, exactly as it is
    when the whole scene is (:func:`stitch`); its rasters cover the window and are joined
    by :func:`merge_shards`.
    """
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
    if window is not None and grid is not None:
        raise InputError(image, f"is classified in shards but its cell size differs from the model's ({pkg.emd.get('CellSize')} m): sharding on a resampled grid is not supported",
                         "resample the scene to the model's cell size first (gdalwarp -tr), set classify.resample: off, or classify.shard_size: null")
    win = window or Window(0, 0, info.width, info.height)
    r_off, width, height = int(win.row_off), int(win.width), int(win.height)
    classes = complete_classes(pkg.classes)
    values = np.array([0] + [c["value"] for c in classes], np.uint8)
    tags = raster_tags(model=pkg.path.name, weights_sha256=pkg.weights_sha256, image=image, threshold=settings.threshold, tta=settings.tta, classes=classes)
    tags.update(ROADXFER_BANDS=",".join(map(str, info.bands)), ROADXFER_RESCALE=json.dumps(info.stretch.to_dict()))
    with_direction = bool(out_direction) and settings.direction
    n_out = len(values) + (DIRECTION_CHANNELS if with_direction else 0)
    predict = model_predict_fn(pkg, device, tta=settings.tta, direction=with_direction, precision=settings.precision)
    profile = {**scratch_profile(threads), "width": width, "height": height, "count": 1, "crs": info.crs, "transform": rasterio.windows.transform(win, info.transform)}
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
        cls_tmp, prob_tmp, dir_tmp = scratch / "class.tif", scratch / "prob.tif", scratch / "direction.tif"
        prob_dtype = settings.probability_dtype
        with (rasterio.open(image) as src,
              open_outputs(cls_tmp, prob_tmp if out_probability else None, profile, classes, tags, prob_dtype, dir_tmp if out_direction else None)
              as (cls_dst, prob_dst, dir_dst)):
            depth = 2 if settings.background_io else 0
            geometry = {"tile": tile, "overlap": overlap, "margin": margin, "batch_size": settings.batch_size, "device": device, "progress": progress, "read_depth": depth}
            strips = (stitch(src, info, predict, n_out, **geometry, core=window) if grid is None
                      else resampled_strips(src, info, grid, predict, n_out, scratch / "model_grid.tif", threads=threads, **geometry))
            # A strip's three writes queue behind the model; closing the strips stops the reader thread first.
            with WriteBehind(4 * depth) as write, contextlib.closing(strips):
                for y, probs, valid in strips:
                    if dir_dst is not None:
                        if with_direction:
                            d = direction_uint8(probs[len(values):]).cpu().numpy()
                            d[~valid] = IGNORE_VALUE
                            probs = probs[: len(values)]
                        else:
                            d = np.full(probs.shape[1:], IGNORE_VALUE, np.uint8)
                        write(dir_dst.write, d, 1, window=Window(0, y - r_off, width, d.shape[0]))
                    road = 1 - probs[0]
                    if settings.threshold is not None:  # road where P(any road) >= threshold; which road class: the most probable
                        idx = torch.where(road >= settings.threshold, 1 + argmax0(probs[1:len(values)]), 0).to(torch.uint8)
                    else:
                        idx = argmax0(probs)
                    cls = values[idx.cpu().numpy()]
                    cls[~valid] = IGNORE_VALUE
                    out_win = Window(0, y - r_off, width, cls.shape[0])
                    write(cls_dst.write, cls, 1, window=out_win)
                    if prob_dst is not None:
                        p = road.cpu().numpy()
                        if prob_dtype == "uint8":
                            p = np.round(p * 250).astype(np.uint8)
                            p[~valid] = IGNORE_VALUE
                        else:
                            p = p.astype(np.float32)
                            p[~valid] = np.nan
                        write(prob_dst.write, p, 1, window=out_win)
        check_room(scratch)
        seconds = time.perf_counter() - t0
        lines = commit_outputs(cls_tmp, prob_tmp if out_probability else None, out_class, out_probability, out_centrelines,
                               classes=classes, settings=settings, scene=Path(image).name, size=(width, height), sidecars=window is None,
                               dir_tmp=dir_tmp if out_direction else None, out_direction=out_direction, threads=threads, vector=vector)
        write_seconds = time.perf_counter() - t0 - seconds
    if grid:
        n_tiles = count_tiles(grid[2], grid[1], tile, overlap)
    else:
        rows, cols, _ = tiles_touching(info.height, info.width, tile, tile - overlap, window)
        n_tiles = len(rows) * len(cols)
    summary = {"image": str(image), "model": str(pkg.path), "tiles": n_tiles, "seconds": seconds, "megapixels_per_s": width * height / seconds / 1e6, "device": str(device), "centrelines": lines,
               "resampled_to_m": float(model_cell) if grid else None, "write_seconds": write_seconds}
    log.info("%s classified in %.1f s (%.2f Mpx/s) on %s; outputs (COGs%s) written in %.1f s", image, seconds, summary["megapixels_per_s"], device,
             ", centrelines" if out_centrelines else "", write_seconds)
    return summary


@contextlib.contextmanager
def open_outputs(cls_path: Path, prob_path: Path | None, profile: dict[str, Any], classes: list[dict[str, Any]], tags: dict[str, str],
                 prob_dtype: str, dir_path: Path | None = None) -> Iterator[tuple[Any, Any, Any]]:
    """The scratch class, probability and direction rasters, with the colour table, band descriptions and tags the COGs carry."""
    with contextlib.ExitStack() as stack:
        cls_dst = stack.enter_context(rasterio.open(cls_path, "w", **profile, dtype="uint8", nodata=IGNORE_VALUE))
        cls_dst.write_colormap(1, colour_table(classes))
        cls_dst.set_band_description(1, "road class (" + ", ".join(f"{c['value']} {c['name']}" for c in classes) + f"; 0 background, {IGNORE_VALUE} nodata)")
        cls_dst.update_tags(**tags)
        prob_dst = None
        if prob_path is not None:
            prob_nodata = IGNORE_VALUE if prob_dtype == "uint8" else np.nan
            prob_dst = stack.enter_context(rasterio.open(prob_path, "w", **{**profile, "predictor": 2 if prob_dtype == "uint8" else 3}, dtype=prob_dtype, nodata=prob_nodata))
            prob_dst.set_band_description(1, "road probability (0-250 = 0-1, 255 nodata)" if prob_dtype == "uint8" else "road probability (0-1, NaN nodata)")
            prob_dst.update_tags(**tags)
        dir_dst = None
        if dir_path is not None:
            dir_dst = stack.enter_context(rasterio.open(dir_path, "w", **profile, dtype="uint8", nodata=IGNORE_VALUE))
            dir_dst.set_band_description(1, f"road direction predicted by the model, degrees clockwise from grid north (0-179; {IGNORE_VALUE} nodata)")
            dir_dst.update_tags(**tags)
        yield cls_dst, prob_dst, dir_dst


def commit_outputs(cls_tmp: Path, prob_tmp: Path | None, out_class: str | Path, out_probability: str | Path | None, out_centrelines: str | Path | None, *,
                   classes: list[dict[str, Any]], settings: ClassifySettings, scene: str, size: tuple[int, int], sidecars: bool = True,
                   dir_tmp: Path | None = None, out_direction: str | Path | None = None, threads: int = 1, vector: VectorSettings | None = None) -> int | None:
    """Write the COGs, their sidecars and the centrelines from the scratch rasters; all checked first, then committed together."""
    lines = None
    with contextlib.ExitStack() as outputs:
        cls_out = outputs.enter_context(atomic_path(out_class))
        write_cog(cls_tmp, cls_out, categorical=True, threads=threads)
        check_written(cls_out, *size)
        styles = {Path(f"{out_class}.aux.xml"): rat_aux_xml(classes), Path(out_class).with_suffix(".qml"): classes_qml(classes)}
        if out_probability and prob_tmp is not None:
            prob_out = outputs.enter_context(atomic_path(out_probability))
            write_cog(prob_tmp, prob_out, categorical=False, threads=threads)
            check_written(prob_out, *size)
            styles[Path(out_probability).with_suffix(".qml")] = probability_qml(settings.probability_dtype)
        if out_direction and dir_tmp is not None:
            dir_out = outputs.enter_context(atomic_path(out_direction))
            write_cog(dir_tmp, dir_out, categorical=True, threads=threads)  # angles: no averaging across 0/180 in the overviews
            check_written(dir_out, *size)
        for path, text in (styles.items() if sidecars else ()):  # the attribute table and the QGIS styles, committed with the rasters
            outputs.enter_context(atomic_path(path)).write_text(text)
        if out_centrelines:
            from .centrelines import centrelines_from_raster

            lines = centrelines_from_raster(cls_out, outputs.enter_context(atomic_path(out_centrelines)), classes=classes,
                                            probability=prob_tmp, probability_scale=250.0 if settings.probability_dtype == "uint8" else 1.0,
                                            direction=dir_tmp, scene=scene, settings=vector)
        check_room(Path(out_class).parent)
    return lines


def merge_shards(
    image: str | Path,
    shards: Sequence[tuple[str | Path, ...]],
    package: str | Path | Package,
    out_class: str | Path,
    *,
    out_probability: str | Path | None = None,
    out_centrelines: str | Path | None = None,
    out_direction: str | Path | None = None,
    settings: ClassifySettings = ClassifySettings(),
    rows: int = 1024,
    threads: int = 1,
    vector: VectorSettings | None = None,
) -> dict[str, Any]:
    """Join the (class, probability[, direction]) rasters of a scene's shards into the scene's outputs.

    Each shard is copied into its place in strips of ``rows`` (memory does not grow with
    the scene); the shards must tile the scene exactly, without gap or overlap, or nothing
    is written. Centrelines are traced on the joined rasters, so they cross shard borders
    without a break or a duplicate.
    """
    t0 = time.perf_counter()
    with rasterio.open(image) as src:
        width, height, transform, crs = src.width, src.height, src.transform, src.crs
    covered = np.zeros((height, width), bool) if width * height <= 50_000_000 else None
    placed = []
    area = 0
    if out_direction and any(len(parts) < 3 for parts in shards):
        raise InputError(image, "the shards hold no direction raster to join", "classify the shards again with their direction output")
    for cls_path, prob_path, *rest in shards:
        with rasterio.open(cls_path) as c:
            if c.crs != crs:
                raise InputError(cls_path, f"shard CRS {c.crs} is not the scene's {crs}", "classify the shards again")
            col, row = (~transform) * (c.transform.c, c.transform.f)
            col, row = int(round(col)), int(round(row))
            if (c.transform.a, c.transform.e) != (transform.a, transform.e) or not (0 <= col and 0 <= row and col + c.width <= width and row + c.height <= height):
                raise InputError(cls_path, "shard is not on the scene's grid", "classify the shards again")
            placed.append((cls_path, prob_path, rest[0] if rest else None, Window(col, row, c.width, c.height)))
            area += c.width * c.height
            if covered is not None:
                if covered[row : row + c.height, col : col + c.width].any():
                    raise InputError(cls_path, "shard overlaps another shard", "classify the shards again")
                covered[row : row + c.height, col : col + c.width] = True
    if area != width * height or (covered is not None and not covered.all()):
        raise InputError(image, f"the {len(placed)} shard(s) cover {area} of its {width * height} pixels", "classify the missing shards (a merge never runs on a partial set)")
    pkg = package if isinstance(package, Package) else load_package(package, device=torch.device("cpu"))
    classes = complete_classes(pkg.classes)
    with rasterio.open(placed[0][0]) as first:
        tags = first.tags()
    profile = {**scratch_profile(threads), "width": width, "height": height, "count": 1, "crs": crs, "transform": transform}
    with scratch_dir(Path(out_class).parent, "merge") as scratch:
        cls_tmp, prob_tmp, dir_tmp = scratch / "class.tif", scratch / "prob.tif", scratch / "direction.tif"
        with open_outputs(cls_tmp, prob_tmp if out_probability else None, profile, classes, tags, settings.probability_dtype,
                          dir_tmp if out_direction else None) as (cls_dst, prob_dst, dir_dst):
            for cls_path, prob_path, dir_path, win in placed:
                sources = [(cls_dst, cls_path), (prob_dst, prob_path), (dir_dst, dir_path)]
                with contextlib.ExitStack() as inputs:
                    pairs = [(dst, inputs.enter_context(rasterio.open(path))) for dst, path in sources if dst is not None]
                    for r in range(0, int(win.height), rows):
                        part = Window(0, r, int(win.width), min(rows, int(win.height) - r))
                        dst_win = Window(win.col_off, win.row_off + r, part.width, part.height)
                        for dst, src_ds in pairs:
                            dst.write(src_ds.read(1, window=part), 1, window=dst_win)
        check_room(scratch)
        lines = commit_outputs(cls_tmp, prob_tmp if out_probability else None, out_class, out_probability, out_centrelines,
                               classes=classes, settings=settings, scene=Path(image).name, size=(width, height),
                               dir_tmp=dir_tmp if out_direction else None, out_direction=out_direction, threads=threads, vector=vector)
    log.info("%s: %d shard(s) merged in %.1f s", image, len(placed), time.perf_counter() - t0)
    return {"image": str(image), "shards": len(placed), "seconds": time.perf_counter() - t0, "centrelines": lines}


def write_cog(src_path: Path, dst_path: Path, *, categorical: bool, threads: int = 1) -> None:
    """Copy a tiled GeoTIFF to a Cloud-Optimised GeoTIFF with overviews (compressed on ``threads`` threads)."""
    rasterio.shutil.copy(src_path, dst_path, driver="COG", compress="DEFLATE", predictor="YES" if not categorical else "NO",
                         overview_resampling="MODE" if categorical else "AVERAGE", blocksize=512, num_threads=max(1, int(threads)))


def count_tiles(height: int, width: int, tile: int, overlap: int) -> int:
    return len(starts(height, tile, tile - overlap)) * len(starts(width, tile, tile - overlap))

