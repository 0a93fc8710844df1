"""Step 2: export classified tiles (image/label chips) in the reference tool's layout.

Layout of one dataset folder, as Esri's ``Classified_Tiles`` loader reads it::

    images/000000000.tif  labels/000000000.tif  orientation/000000000.tif
    map.txt  stats.txt  esri_accumulated_stats.json  esri_model_definition.emd

Chips are georeferenced GeoTIFFs (PNG optional). ``orientation/`` is ours: Esri's
tools ignore it. The scene is read one window at a time, so memory does not depend
on the scene size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.io import MemoryFile
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from . import IGNORE_VALUE
from .atomic import atomic_path
from .config import default
from .errors import InputError
from .orientation import rotate_bins
from .radiometry import Radiometry
from .raster import cell_size_metres, image_info, read_boundless, read_window, resampled_grid, tile_starts, warped

log = logging.getLogger(__name__)

LAYOUT_FILES = ("map.txt", "esri_accumulated_stats.json", "esri_model_definition.emd")


@dataclass(frozen=True)
class TileSettings:
    tile_size: int = default("tiles.tile_size")
    stride: int = default("tiles.stride")
    keep: str = default("tiles.keep")  # "features" | "all" | "fraction"
    empty_fraction: float = default("tiles.empty_fraction")  # with keep == "fraction": share of feature-less tiles kept
    max_nodata_fraction: float = default("tiles.max_nodata_fraction")
    min_feature_pixels: int = 1
    rotations: tuple[int, ...] = field(default_factory=lambda: tuple(default("tiles.rotations")))  # extra copies rotated by these multiples of 90 degrees
    chip_format: str = default("tiles.chip_format")  # "tif" | "png"
    seed: int = default("tiles.seed")
    classes: Sequence[Mapping[str, Any]] = field(default_factory=lambda: ({"value": 1, "name": "road", "color": [255, 0, 0]},))
    orientation_bin_size: int = default("labels.orientation_bin_size")
    # Value written in label chips where the image is nodata. 255 (ours) is ignored in
    # training; the reference tool's trainer takes every non-zero label for road, so an
    # export meant for it writes 0 (background) there instead.
    label_nodata: int = IGNORE_VALUE
    # Cell size of the chips in metres (the reference export tool's cell size); None: the scene's.
    # The scene is resampled on the fly (average when coarsening, bilinear when refining; labels nearest).
    cell_size: float | None = default("tiles.cell_size")


def tile_windows(width: int, height: int, tile: int, stride: int) -> Iterator[Window]:
    """Windows of ``tile`` px every ``stride`` px; the last row/column is aligned to the edge.

    Scenes smaller than a tile give one window that overhangs (padded as nodata).
    """
    for row in tile_starts(height, tile, stride):
        for col in tile_starts(width, tile, stride):
            yield Window(col, row, tile, tile)


def _chip_profile(fmt: str, count: int, crs: Any, transform: Any, tile: int) -> dict[str, Any]:
    if fmt == "png":
        return {"driver": "PNG", "width": tile, "height": tile, "count": count, "dtype": "uint8", "crs": crs, "transform": transform}
    blk = 256 if tile % 256 == 0 else None
    prof = {"driver": "GTiff", "width": tile, "height": tile, "count": count, "dtype": "uint8", "crs": crs, "transform": transform, "compress": "deflate"}
    if blk:
        prof.update(tiled=True, blockxsize=blk, blockysize=blk)
    return prof


def _write_chip(path: Path, data: np.ndarray, profile: Mapping[str, Any], nodata: int | None = None) -> int:
    """Encode the chip in memory, then write its bytes with Python's checked I/O.

    libtiff reports a failed flush (a full disk) only on stderr and GDAL does not raise
    on close, so a chip written in place can come out empty without an error. Returns
    the bytes written.
    """
    with MemoryFile() as mem:
        with mem.open(**profile, **({"nodata": nodata} if nodata is not None else {})) as dst:
            dst.write(data if data.ndim == 3 else data[None])
        blob = mem.read()
    with open(path, "wb") as f:
        if f.write(blob) != len(blob):
            raise OSError(f"short write of {path}")
    return len(blob)


def verify_chips(folder: Path, sizes: Mapping[str, int]) -> None:
    """Before the commit: every chip written is on disk with its size, and a sample re-opens."""
    for rel, size in sizes.items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != size:
            raise OSError(f"{path}: chip on disk is not what was written (failed write?)")
    names = sorted(sizes)
    for rel in names[:: max(1, len(names) // 64)]:
        with rasterio.open(folder / rel) as src:
            src.read(1, window=Window(0, 0, 1, 1))


def export_tiles(
    image: str | Path,
    label: str | Path,
    orientation: str | Path,
    out_dir: str | Path,
    settings: TileSettings,
    *,
    scene_id: str = "",
    image_kwargs: Mapping[str, Any] | None = None,
    radiometry: Radiometry | None = None,
) -> dict[str, Any]:
    """Cut one scene into chips; write the dataset folder atomically; return its stats.

    Chips are 8-bit: other imagery is stretched by ``radiometry`` (default: percentiles
    for non-8-bit scenes), and the scene's stretch is recorded in the statistics.
    """
    radiometry = radiometry or Radiometry()
    info = image_info(image, **dict(image_kwargs or {}), radiometry=radiometry)
    assert info.stretch is not None
    with rasterio.open(label) as lab:
        if (lab.width, lab.height, lab.transform, lab.crs) != (info.width, info.height, info.transform, info.crs):
            raise InputError(label, f"label raster is not on the grid of {image}", "re-run the rasterization step for this scene")
    if settings.tile_size % 32:
        raise InputError(None, f"tile_size {settings.tile_size} is not a multiple of 32", "the encoder downsamples by 32: use e.g. 128, 256 or 512")
    rng = np.random.default_rng(settings.seed)
    class_values = [int(c["value"]) for c in settings.classes]
    tile = settings.tile_size
    ext = settings.chip_format
    pixels = {v: 0 for v in class_values}
    tiles_with = {v: 0 for v in class_values}
    band_sum = np.zeros(len(info.bands))
    band_sq = np.zeros(len(info.bands))
    band_min = np.full(len(info.bands), np.inf)
    band_max = np.full(len(info.bands), -np.inf)
    valid_px = 0
    lines: list[str] = []
    sizes: dict[str, int] = {}
    n = 0
    skipped_nodata = skipped_empty = 0
    with atomic_path(out_dir, directory=True, kind="classified-tiles") as tmp:
        for sub in ("images", "labels", "orientation"):
            (tmp / sub).mkdir()
        with contextlib.ExitStack() as stack:
            src, lab, ori = (stack.enter_context(rasterio.open(p)) for p in (image, label, orientation))
            if settings.cell_size:
                scene_cell = cell_size_metres(info.crs, info.cell_size)
                transform, width, height = resampled_grid(info, settings.cell_size)
                src, info = warped(src, info, transform, width, height, Resampling.average if settings.cell_size > scene_cell else Resampling.bilinear)
                lab, _ = warped(lab, info, transform, width, height, Resampling.nearest)
                ori, _ = warped(ori, info, transform, width, height, Resampling.nearest)
                for ds in (src, lab, ori):
                    stack.enter_context(ds)
                log.info("%s: %.3g m cells resampled to %.3g m for the tiles (%dx%d px)", image, scene_cell, settings.cell_size, width, height)
            for window in tile_windows(info.width, info.height, tile, settings.stride):
                img, valid = read_window(src, info, window)
                if 1 - valid.mean() > settings.max_nodata_fraction:
                    skipped_nodata += 1
                    continue
                lbl = read_boundless(lab, 1, window, IGNORE_VALUE)
                ori_chip = read_boundless(ori, 1, window, IGNORE_VALUE)
                lbl[~valid] = IGNORE_VALUE
                ori_chip[~valid] = IGNORE_VALUE
                has_features = int(((lbl > 0) & (lbl != IGNORE_VALUE)).sum()) >= settings.min_feature_pixels
                if not has_features:
                    if settings.keep == "features" or (settings.keep == "fraction" and rng.random() >= settings.empty_fraction):
                        skipped_empty += 1
                        continue
                wt = window_transform(window, info.transform)
                for k in (0, *settings.rotations):
                    stem = f"{n:09d}"
                    i, l, o = (np.rot90(a, k, axes=(-2, -1)) for a in (img, lbl, ori_chip))
                    o = rotate_bins(o, k, settings.orientation_bin_size) if k else o
                    prof3 = _chip_profile(ext, i.shape[0], info.crs, wt, tile)
                    prof1 = _chip_profile(ext, 1, info.crs, wt, tile)
                    if settings.label_nodata != IGNORE_VALUE:
                        l = np.where(l == IGNORE_VALUE, np.uint8(settings.label_nodata), l)  # noqa: E741
                    for rel, arr, prof, nodata in ((f"images/{stem}.{ext}", i, prof3, None),
                                                   (f"labels/{stem}.{ext}", l, prof1, IGNORE_VALUE if settings.label_nodata == IGNORE_VALUE else None),
                                                   (f"orientation/{stem}.{ext}", o, prof1, IGNORE_VALUE)):
                        sizes[rel] = _write_chip(tmp / rel, np.ascontiguousarray(arr), prof, nodata)
                    lines.append(f"images/{stem}.{ext} labels/{stem}.{ext}")
                    n += 1
                    counts = np.bincount(l.ravel(), minlength=256)
                    for v in pixels:
                        if counts[v]:
                            pixels[v] += int(counts[v])
                            tiles_with[v] += 1
                if k := int(valid.sum()):  # band statistics over valid pixels, once per window
                    px = img.reshape(img.shape[0], -1).astype(np.float64) if k == valid.size else img[:, valid].astype(np.float64)
                    band_sum += px.sum(1)
                    band_sq += (px * px).sum(1)
                    band_min = np.minimum(band_min, px.min(1))
                    band_max = np.maximum(band_max, px.max(1))
                    valid_px += k
        if n == 0:  # checked before anything is committed
            raise InputError(image, f"gave no tile: {skipped_nodata} window(s) of {tile} px were mostly nodata and {skipped_empty} had no labelled pixel",
                             "use a smaller tiles.tile_size (the scene is {0}x{1} px), a higher tiles.max_nodata_fraction, or tiles.keep: all".format(info.width, info.height))
        verify_chips(tmp, sizes)
        mean = band_sum / max(valid_px, 1)
        std = np.sqrt(np.maximum(band_sq / max(valid_px, 1) - mean**2, 0))
        stats = write_layout(
            tmp,
            lines=lines,
            tile=tile,
            bands=len(info.bands),
            classes=settings.classes,
            pixels=pixels,
            tiles_with=tiles_with,
            cell_size=info.cell_size,
            band_stats={"min": band_min.tolist() if valid_px else [], "max": band_max.tolist() if valid_px else [], "mean": mean.tolist(), "std": std.tolist()},
            extra={"SceneId": scene_id, "SourceImage": str(image), "CellSizeMetres": cell_size_metres(info.crs, info.cell_size),
                   "SourceBands": list(info.bands), "Radiometry": {"settings": radiometry.to_dict(), "stretch": info.stretch.to_dict()},
                   "OrientationBinSize": settings.orientation_bin_size, "Stride": settings.stride,
                   "SkippedNodataTiles": skipped_nodata, "SkippedEmptyTiles": skipped_empty},
        )
    log.info("%s: %d tile(s) written to %s (%d empty, %d mostly-nodata skipped)", image, n, out_dir, skipped_empty, skipped_nodata)
    return stats


def write_layout(
    folder: Path,
    *,
    lines: list[str],
    tile: int,
    bands: int,
    classes: Sequence[Mapping[str, Any]],
    pixels: Mapping[int, int],
    tiles_with: Mapping[int, int],
    cell_size: float,
    band_stats: Mapping[str, list[float]],
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """Write ``map.txt``, ``stats.txt``, ``esri_accumulated_stats.json`` and ``esri_model_definition.emd``."""
    spaced = [line for line in lines if len(line.split()) != 2]
    if spaced:  # map.txt is whitespace-separated: a chip path with a space would be misread
        raise ValueError(f"chip paths with whitespace cannot go into map.txt: {spaced[0]!r}")
    (folder / "map.txt").write_text("".join(f"{line}\n" for line in lines))
    stats = {
        "Version": "1.0",
        "MetaDataMode": "Classified_Tiles",
        "ImageSpaceUsed": "MAP_SPACE",
        "NumBands": bands,
        "TileSizeX": tile,
        "TileSizeY": tile,
        "NumTiles": len(lines),
        "NumClasses": len(classes),
        "OutputFeatures": True,
        "MinCellSize": cell_size,
        "Classes": [{"ClassValue": int(c["value"]), "ClassName": c["name"]} for c in classes],
        "ClassPixelStats": {
            "NumImagesPerClass": [int(tiles_with.get(int(c["value"]), 0)) for c in classes],
            "NumPixelsPerClass": [int(pixels.get(int(c["value"]), 0)) for c in classes],
        },
        "AllTilesStats": [
            {"Min": band_stats["min"][b] if band_stats["min"] else 0, "Max": band_stats["max"][b] if band_stats["max"] else 0,
             "Mean": band_stats["mean"][b], "StdDev": band_stats["std"][b]}
            for b in range(bands)
        ],
        "roadxfer": dict(extra),
    }
    (folder / "esri_accumulated_stats.json").write_text(json.dumps(stats, indent=2))
    emd = {
        "Framework": "roadxfer",
        "ModelConfiguration": "ClassifiedTiles",
        "ImageHeight": tile,
        "ImageWidth": tile,
        "ExtractBands": list(range(bands)),
        "Classes": [{"Value": int(c["value"]), "Name": c["name"], "Color": list(c.get("color", [255, 0, 0]))} for c in classes],
    }
    (folder / "esri_model_definition.emd").write_text(json.dumps(emd, indent=2))
    stats_txt = [f"NumTiles={len(lines)}", f"TileSize={tile}", f"NumBands={bands}", f"CellSize={cell_size}"]
    stats_txt += [f"Class {c['value']} ({c['name']}): {pixels.get(int(c['value']), 0)} pixels in {tiles_with.get(int(c['value']), 0)} tiles" for c in classes]
    (folder / "stats.txt").write_text("\n".join(stats_txt) + "\n")
    return stats


# --- reading datasets (ours, or exported by ArcGIS Pro) ------------------------------------


@dataclass(frozen=True)
class Dataset:
    """One Classified Tiles folder, as read back for training."""

    root: Path
    images: tuple[Path, ...]
    labels: tuple[Path, ...]
    orientation: tuple[Path | None, ...]
    classes: tuple[dict[str, Any], ...]
    tile_size: int
    bands: int
    cell_size: float | None
    scene_id: str
    radiometry: dict[str, Any] | None = None  # {"settings", "stretch"} of our exports; None for others'
    source_bands: tuple[int, ...] | None = None  # 1-based bands of the source image the chips hold


def read_dataset(root: str | Path) -> Dataset:
    """Read a Classified Tiles folder; checks the files Esri's loader requires."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "classified tiles folder does not exist", "run the export step or check the path in the config")
    for name in LAYOUT_FILES:
        if not (root / name).is_file():
            raise InputError(root, f"is not a Classified Tiles folder: {name} is missing", "export it again with the classified-tiles step or ArcGIS Pro's Export Training Data (Classified Tiles)")
    try:
        emd = json.loads((root / "esri_model_definition.emd").read_text())
        stats = json.loads((root / "esri_accumulated_stats.json").read_text())
    except json.JSONDecodeError as exc:
        raise InputError(root, f"has a corrupt JSON layout file ({exc})", "export the tiles again") from exc
    if stats.get("MetaDataMode", "Classified_Tiles") != "Classified_Tiles":
        raise InputError(root / "esri_accumulated_stats.json", f"MetaDataMode is {stats.get('MetaDataMode')!r}, not 'Classified_Tiles'", "export with the Classified Tiles metadata format")
    classes = tuple(
        {"value": int(c.get("Value", c.get("ClassValue"))), "name": c.get("Name", c.get("ClassName", "")), "color": list(c.get("Color", [255, 0, 0]))}
        for c in emd.get("Classes", [])
    )
    if not classes:
        raise InputError(root / "esri_model_definition.emd", "lists no Classes", "the .emd needs a Classes list of {Value, Name, Color}")
    ours = "roadxfer" in stats  # exported by roadxfer (ArcGIS Pro's folders carry no such key)
    images, labels, orient = [], [], []
    for n, raw in enumerate((root / "map.txt").read_text().splitlines(), start=1):
        try:
            parts = map_line_paths(raw)
        except ValueError as exc:
            raise InputError(root / "map.txt", f"line {n} {exc}", "each line must read `images/<stem>.<ext> labels/<stem>.<ext>`") from exc
        if parts is None:
            continue
        img, lbl = _chip_path(root, parts[0]), _chip_path(root, parts[1])
        if not img.is_file() or not lbl.is_file():
            if ours:  # our export verified every chip before its commit: the folder was damaged since
                raise InputError(img if not img.is_file() else lbl, f"is listed in line {n} of {root / 'map.txt'} but missing: the tile folder is damaged",
                                 f"delete {root} and run the export step again")
            log.warning("%s: line %d names a missing chip, skipped (as Esri's loader does)", root / "map.txt", n)
            continue
        if ours and (img.stat().st_size == 0 or lbl.stat().st_size == 0):
            raise InputError(img if img.stat().st_size == 0 else lbl, "chip is empty (0 bytes): the tile folder is damaged", f"delete {root} and run the export step again")
        images.append(img)
        labels.append(lbl)
        o = root / "orientation" / lbl.name
        orient.append(o if o.is_file() else None)
    if not images:
        raise InputError(root, "holds no image/label chips", "export tiles that contain features, or point the config at another folder")
    if ours and int(stats.get("NumTiles", len(images))) != len(images):
        raise InputError(root / "map.txt", f"lists {len(images)} chip(s) but the export wrote {stats['NumTiles']}: the tile folder is damaged", f"delete {root} and run the export step again")
    tile_x, tile_y = int(stats.get("TileSizeX", 0)), int(stats.get("TileSizeY", 0))
    with rasterio.open(images[0]) as first:
        size, bands = (first.height, first.width), first.count
        # Cell size in metres, from the chip's own georeferencing (MinCellSize is in the CRS's units: degrees for geographic scenes).
        cell = cell_size_metres(first.crs, abs(first.transform.a)) if first.crs is not None else stats.get("MinCellSize")
    if tile_x and (tile_y, tile_x) != size:
        raise InputError(images[0], f"chip is {size[1]}x{size[0]} px but the stats say {tile_x}x{tile_y}", "export the tiles again")
    if size[0] != size[1]:
        raise InputError(images[0], f"chip is not square ({size[1]}x{size[0]})", "export square tiles")
    extra = stats.get("roadxfer", {})
    return Dataset(root, tuple(images), tuple(labels), tuple(orient), classes, size[0], bands,
                   cell, str(extra.get("SceneId", root.name)), extra.get("Radiometry"),
                   tuple(extra["SourceBands"]) if extra.get("SourceBands") else None)


_CHIP_EXT = r"\.(?:tif|tiff|png|jpg|jpeg|mrf)"
_MAP_LINE = re.compile(rf"^\s*(?P<img>.+?{_CHIP_EXT})\s+(?P<lbl>.+?{_CHIP_EXT})\s*$", re.IGNORECASE)


def map_line_paths(line: str) -> tuple[str, str] | None:
    """The image and label path of one ``map.txt`` line (None for a blank line).

    ``map.txt`` separates its two paths by whitespace, so a path with a space in it
    (a folder such as ``My Tiles``) is split at the whitespace after the first chip
    extension instead of at every space.
    """
    line = line.replace("\\", "/")
    if not line.strip():
        return None
    parts = line.split()
    if len(parts) == 2:
        return parts[0], parts[1]
    m = _MAP_LINE.match(line)
    if not m:
        raise ValueError(f"does not hold two chip paths: {line!r}")
    return m.group("img").strip(), m.group("lbl").strip()


def _chip_path(root: Path, rel: str) -> Path:
    """A chip of ``map.txt``: relative to the folder; an absolute path from another machine resolves by its last two parts."""
    p = Path(rel)
    if p.is_absolute() or (len(rel) > 1 and rel[1] == ":"):
        parts = rel.split("/")
        local = root / parts[-2] / parts[-1]
        return local if local.is_file() or not p.is_file() else p
    return root / rel
