"""Checks and helpers for the input imagery: open, validate, nodata masks, windows."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import rasterio
import rasterio.errors
from rasterio.enums import ColorInterp, Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from .errors import InputError
from .sources import check_local_input
from .radiometry import Radiometry, Stretch, scene_stretch

# Creation options for every GeoTIFF we write: tiled and compressed, so windowed reads
# of our outputs are cheap and files stay small.
GTIFF_PROFILE = {
    "driver": "GTiff",
    "tiled": True,
    "blockxsize": 256,
    "blockysize": 256,
    "compress": "deflate",
    "predictor": 2,
    "interleave": "band",
}


@functools.cache
def _gdal_writes_zstd() -> bool:
    """Whether this GDAL build compresses GeoTIFFs with ZSTD (optional in GDAL; an unknown
    ``compress`` is only warned about, so the file written is read back to tell)."""
    try:
        with warnings.catch_warnings(), rasterio.MemoryFile() as mem:
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with mem.open(driver="GTiff", width=16, height=16, count=1, dtype="uint8", compress="zstd") as dst:
                dst.write(np.zeros((1, 16, 16), np.uint8))
            with mem.open() as src:
                return src.compression is not None and src.compression.name == "zstd"
    except rasterio.errors.RasterioError:
        return False


def scratch_profile(threads: int = 1) -> dict[str, object]:
    """Creation options for scratch rasters that are copied to COGs and deleted.

    Written by one background thread while the model runs, they limited whole-scene
    classification on a GPU (deflate of three rasters on one core): fast ZSTD where GDAL
    has it, and GDAL's multi-threaded compression with the job's ``threads``.
    """
    fast = {"compress": "zstd", "zstd_level": 1} if _gdal_writes_zstd() else {"compress": "deflate", "zlevel": 1}
    return {**GTIFF_PROFILE, **fast, "num_threads": max(1, int(threads))}


@dataclass(frozen=True)
class ImageInfo:
    """What the workflow needs to know about an input scene."""

    path: str
    width: int
    height: int
    crs: rasterio.crs.CRS
    transform: rasterio.Affine
    count: int
    dtype: str
    nodata: float | None
    bands: tuple[int, ...]  # 1-based indexes of the image bands used (alpha excluded)
    alpha: int | None  # 1-based index of the alpha band, if any
    stretch: Stretch | None = None  # set: read_window returns 8-bit values through it

    def with_stretch(self, radiometry: Radiometry) -> ImageInfo:
        """This scene with its radiometric stretch computed (once; a decimated read)."""
        with rasterio.open(self.path) as src:
            return replace(self, stretch=scene_stretch(self.path, src, self.bands, self.alpha, self.nodata, self.dtype, radiometry))

    @property
    def cell_size(self) -> float:
        return float(abs(self.transform.a))


def cell_size_metres(crs: rasterio.crs.CRS | None, cell: float) -> float:
    """Cell size in metres (geographic CRS: along a meridian, 1 degree = 111.32 km)."""
    if crs is None:
        return cell
    if crs.is_geographic:
        return cell * 111_320.0
    return cell * float(crs.linear_units_factor[1])


def image_info(
    path: str | Path,
    *,
    allowed_band_counts: tuple[int, ...] | None = (3,),
    allowed_dtypes: tuple[str, ...] | None = ("uint8",),
    bands: Sequence[int] | None = None,
    radiometry: Radiometry | None = None,
    bands_fix: str = "choose the bands with `image.bands` (e.g. [1, 2, 3]) or change `image.band_count` in the config",
) -> ImageInfo:
    """Open ``path`` and check it is imagery the workflow can use.

    An alpha band (colour interpretation ``alpha``, or a 4th band of a 3-band setup) is
    not counted as an image band: it marks nodata. ``bands`` (1-based) selects the image
    bands, in that order; by default every band but the alpha. ``None`` for an allowed
    list accepts anything. With ``radiometry`` the scene's stretch to 8 bits is computed.
    """
    path = str(path)
    if not Path(path).exists():
        raise InputError(path, "image file does not exist", "check the `image` column of the scene sheet")
    if Path(path).stat().st_size == 0:
        raise InputError(path, "image file is empty", "re-export or re-copy the image")
    check_local_input(path)  # a VRT naming URLs or raw files is refused before GDAL opens it
    try:
        with rasterio.open(path) as src:
            crs, transform = src.crs, src.transform
            count, dtypes, nodata = src.count, src.dtypes, src.nodata
            width, height = src.width, src.height
            colorinterp = list(src.colorinterp)
            mask_like_last = _looks_like_mask(src, count) if count > 1 else False
    except rasterio.errors.RasterioError as exc:
        raise InputError(path, f"cannot be read as a raster ({exc})", "check the file is a valid GeoTIFF or other GDAL raster") from exc
    if crs is None:
        raise InputError(path, "raster has no coordinate reference system", "assign one, e.g. `gdal_edit.py -a_srs EPSG:32611 FILE`")
    if transform.b != 0 or transform.d != 0:
        raise InputError(path, "raster is rotated (non north-up)", "warp it north-up first with `gdalwarp`")
    alpha = None
    for i, ci in enumerate(colorinterp, start=1):
        if ci == ColorInterp.alpha:
            alpha = i
    if alpha is None and bands is None and mask_like_last and allowed_band_counts and count - 1 in allowed_band_counts and count not in allowed_band_counts:
        alpha = count  # e.g. RGB + a 0/255 mask band exported without the alpha tag
    if bands is not None:
        bad = [b for b in bands if not 1 <= int(b) <= count or int(b) == alpha]
        if bad or not bands:
            raise InputError(path, f"has bands 1-{count}{f' (band {alpha} is alpha)' if alpha else ''}; image.bands asks for {list(bands)}",
                             "list existing, non-alpha band numbers (1-based) under image.bands")
        bands = tuple(int(b) for b in bands)
    else:
        bands = tuple(i for i in range(1, count + 1) if i != alpha)
    if allowed_band_counts is not None and len(bands) not in allowed_band_counts:
        raise InputError(
            path,
            f"has {len(bands)} image band(s), the workflow is configured for {list(allowed_band_counts)}",
            bands_fix,
        )
    dtype = dtypes[bands[0] - 1]
    if allowed_dtypes is not None and dtype not in allowed_dtypes:
        raise InputError(
            path,
            f"has pixel type {dtype}, the workflow accepts {list(allowed_dtypes)}",
            f"add {dtype} to `image.dtypes` (it is rescaled to 8 bits by `image.rescale`)",
        )
    info = ImageInfo(path, width, height, crs, transform, count, dtype, nodata, bands, alpha)
    return info.with_stretch(radiometry) if radiometry is not None else info


def _looks_like_mask(src: rasterio.DatasetReader, band: int) -> bool:
    """True when ``band`` holds only 0 and 255 (checked on a decimated read: cheap on big scenes)."""
    h, w = min(src.height, 256), min(src.width, 256)
    values = np.unique(src.read(band, out_shape=(h, w)))
    return set(values.tolist()) <= {0, 255}


def read_window(src: rasterio.DatasetReader, info: ImageInfo, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """Read the image bands of ``window`` and a boolean *valid* mask (False = nodata).

    Reads outside the raster come back as nodata (``boundless``), so callers can ask
    for windows that overhang the edge. With ``info.stretch`` the bands come back as
    8-bit values (0 where invalid).
    """
    data = read_boundless(src, list(info.bands), window, 0)
    valid = _inside_mask(window, info.width, info.height)
    if info.alpha is not None:
        valid &= read_boundless(src, info.alpha, window, 0) != 0
    if info.nodata is not None:
        valid &= ~np.all(data == np.asarray(info.nodata, dtype=data.dtype), axis=0)
    if np.issubdtype(data.dtype, np.floating):
        valid &= np.all(np.isfinite(data), axis=0)
    if info.stretch is not None:
        data = info.stretch.apply(data)
        if not info.stretch.identity:
            data[:, ~valid] = 0
    return data, valid


def read_boundless(src: rasterio.DatasetReader | WarpedVRT, indexes: int | list[int], window: Window, fill: int) -> np.ndarray:
    """Read ``window``, padding with ``fill`` where it overhangs the raster.

    The part inside the raster is read and padded here: rasterio's ``boundless=True``
    goes through a warped VRT (several times slower) and a WarpedVRT refuses it.
    """
    r0, c0, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
    if c0 >= 0 and r0 >= 0 and c0 + w <= src.width and r0 + h <= src.height:
        return src.read(indexes, window=window)
    shape = (h, w) if isinstance(indexes, int) else (len(indexes), h, w)
    out = np.full(shape, fill, dtype=src.dtypes[(indexes if isinstance(indexes, int) else indexes[0]) - 1])
    ir0, ic0 = max(r0, 0), max(c0, 0)
    ir1, ic1 = min(r0 + h, src.height), min(c0 + w, src.width)
    if ir1 > ir0 and ic1 > ic0:
        out[..., ir0 - r0 : ir1 - r0, ic0 - c0 : ic1 - c0] = src.read(indexes, window=Window(ic0, ir0, ic1 - ic0, ir1 - ir0))
    return out


def resampled_grid(info: ImageInfo, cell_metres: float) -> tuple[rasterio.Affine, int, int]:
    """A grid over the scene's extent with square cells of ``cell_metres`` (in the scene's CRS)."""
    cell = cell_metres / cell_size_metres(info.crs, 1.0)
    x_extent, y_extent = info.width * abs(info.transform.a), info.height * abs(info.transform.e)
    width, height = max(1, int(np.ceil(x_extent / cell - 1e-6))), max(1, int(np.ceil(y_extent / cell - 1e-6)))
    t = info.transform  # north-up or south-up (e > 0), east-right or not: the grid starts at the extent's north-west corner
    left, top = min(t.c, t.c + info.width * t.a), max(t.f, t.f + info.height * t.e)
    return rasterio.Affine(cell, 0, left, 0, -cell, top), width, height


def warped(src: rasterio.DatasetReader, info: ImageInfo, transform: rasterio.Affine, width: int, height: int,
           resampling: Resampling) -> tuple[WarpedVRT, ImageInfo]:
    """``src`` seen on another grid of the same CRS (read on the fly, window by window), and its info there."""
    vrt = WarpedVRT(src, crs=info.crs, transform=transform, width=width, height=height, resampling=resampling)
    return vrt, replace(info, width=width, height=height, transform=transform)


def _inside_mask(window: Window, width: int, height: int) -> np.ndarray:
    rows = np.arange(window.row_off, window.row_off + window.height)
    cols = np.arange(window.col_off, window.col_off + window.width)
    return ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None, :]


def block_windows(width: int, height: int, block: int) -> Iterator[Window]:
    """Square windows of ``block`` pixels covering the raster, clipped at its edges."""
    for row in range(0, height, block):
        for col in range(0, width, block):
            yield Window(col, row, min(block, width - col), min(block, height - row))


def padded_blocks(width: int, height: int, block: int, halo: int) -> Iterator[tuple[Window, Window, tuple[slice, slice]]]:
    """Blocks covering the raster, each with a window padded by ``halo`` (clipped at the edges).

    Yields ``(block, padded window, block's rows and columns as slices into the padded
    window)``: work done on the padded window is exact in the block for anything that
    reaches less than ``halo`` pixels.
    """
    for core in block_windows(width, height, block):
        r0, c0 = max(0, int(core.row_off) - halo), max(0, int(core.col_off) - halo)
        r1 = min(height, int(core.row_off + core.height) + halo)
        c1 = min(width, int(core.col_off + core.width) + halo)
        cr, cc = int(core.row_off) - r0, int(core.col_off) - c0
        yield core, Window(c0, r0, c1 - c0, r1 - r0), (slice(cr, cr + int(core.height)), slice(cc, cc + int(core.width)))


def tile_starts(n: int, tile: int, stride: int) -> list[int]:
    """Tile offsets along one axis; the last tile is aligned to the edge (one tile if n <= tile)."""
    if n <= tile:
        return [0]
    s = list(range(0, n - tile + 1, stride))
    if s[-1] != n - tile:
        s.append(n - tile)
    return s


def check_written(path: str | Path, width: int, height: int) -> None:
    """A cheap re-open of a raster just written: the right size, and its last block reads."""
    with rasterio.open(path) as src:
        if (src.width, src.height) != (width, height):
            raise OSError(f"{path}: written raster is {src.width}x{src.height}, expected {width}x{height}")
        src.read(1, window=Window(width - 1, height - 1, 1, 1))
