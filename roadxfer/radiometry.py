"""Radiometric rescale of any imagery (8/11/16-bit, float, 1 to N bands) to the 8 bits models see.

Models and chips are 8-bit, as the reference tool's are. Other imagery is stretched per
band from ``low`` to ``high`` onto 0-255. The stretch of a scene is computed once, from a
decimated read of its valid pixels (percentiles or min/max), recorded in the tiles'
statistics and in the model package, and the same method is applied to every scene a
model classifies, so training and classification see the same radiometry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio

from .errors import InputError

log = logging.getLogger(__name__)

METHODS = ("auto", "none", "percentile", "minmax", "fixed")
SAMPLE_SIDE = 2048  # statistics from a read decimated to at most this many pixels per side


@dataclass(frozen=True)
class Radiometry:
    """How raw pixel values become 0-255: the settings (``image.rescale`` in the config)."""

    method: str = "auto"  # auto: none for 8-bit imagery, percentile otherwise
    percentiles: tuple[float, float] = (2.0, 98.0)
    low: tuple[float, ...] | None = None  # with method "fixed": per band (or one for all)
    high: tuple[float, ...] | None = None
    max_clipped: float = 0.5  # refuse a stretch that clips more than this share of valid pixels

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(None, f"image.rescale.method {self.method!r} is not one of {list(METHODS)}", "choose one of them")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise InputError(None, f"image.rescale.percentiles {list(self.percentiles)} must be two values 0 <= low < high <= 100", "e.g. [2, 98]")
        if self.method == "fixed" and (self.low is None or self.high is None):
            raise InputError(None, "image.rescale.method fixed needs `low` and `high`", "give e.g. low: [0], high: [2047] (per band or one for all)")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> Radiometry:
        cfg = dict(cfg or {})
        low, high = cfg.get("low"), cfg.get("high")
        return cls(method=cfg.get("method", "auto"), percentiles=tuple(float(v) for v in cfg.get("percentiles", (2.0, 98.0))),  # type: ignore[arg-type]
                   low=None if low is None else tuple(float(v) for v in np.atleast_1d(low)),
                   high=None if high is None else tuple(float(v) for v in np.atleast_1d(high)),
                   max_clipped=float(cfg.get("max_clipped", 0.5)))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "percentiles": list(self.percentiles), "low": None if self.low is None else list(self.low),
                "high": None if self.high is None else list(self.high), "max_clipped": self.max_clipped}


@dataclass(frozen=True)
class Stretch:
    """The rescale of one scene: per band ``low`` -> 0 and ``high`` -> 255 (identity for 8-bit as is)."""

    method: str
    low: tuple[float, ...]
    high: tuple[float, ...]
    source_dtype: str
    clipped: float = 0.0  # share of valid sampled pixels clipped at either end

    @property
    def identity(self) -> bool:
        return self.method == "none"

    def apply(self, data: np.ndarray) -> np.ndarray:
        """(bands, h, w) raw values -> uint8."""
        if self.identity:
            if data.dtype != np.uint8:
                return np.clip(data, 0, 255).astype(np.uint8)
            return data
        lo = np.asarray(self.low, np.float32)[:, None, None]
        scale = 255.0 / np.maximum(np.asarray(self.high, np.float32) - np.asarray(self.low, np.float32), 1e-12)[:, None, None]
        out = (data.astype(np.float32) - lo) * scale
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "low": list(self.low), "high": list(self.high), "source_dtype": self.source_dtype, "clipped": round(self.clipped, 5)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Stretch:
        return cls(d["method"], tuple(d["low"]), tuple(d["high"]), d.get("source_dtype", "uint8"), float(d.get("clipped", 0.0)))


def resolve_method(radiometry: Radiometry, dtype: str) -> str:
    if radiometry.method == "auto":
        return "none" if dtype == "uint8" else "percentile"
    return radiometry.method


def scene_stretch(path: str, src: rasterio.DatasetReader, bands: Sequence[int], alpha: int | None, nodata: float | None,
                  dtype: str, radiometry: Radiometry) -> Stretch:
    """Compute the stretch of one scene from a decimated read of its valid pixels.

    Raises when the image cannot be shown in 8 bits as asked: 8-bit-only ``none`` on
    other data, a fixed range that clips most pixels, or bands with no valid pixel.
    """
    method = resolve_method(radiometry, dtype)
    n = len(bands)
    if method == "none":
        if dtype != "uint8":
            raise InputError(path, f"has pixel type {dtype} and image.rescale.method is none: models take 8-bit values",
                             "set image.rescale.method to percentile (or auto, minmax, fixed)")
        return Stretch("none", (0.0,) * n, (255.0,) * n, dtype)
    f = max(1, -(-max(src.width, src.height) // SAMPLE_SIDE))
    shape = (max(1, src.height // f), max(1, src.width // f))
    data = src.read(list(bands), out_shape=(n, *shape), resampling=rasterio.enums.Resampling.nearest)
    valid = np.ones(shape, bool)
    if alpha is not None:
        valid &= src.read(alpha, out_shape=shape, resampling=rasterio.enums.Resampling.nearest) != 0
    if nodata is not None:
        valid &= ~np.all(data == np.asarray(nodata, dtype=data.dtype), axis=0)
    if np.issubdtype(data.dtype, np.floating):
        valid &= np.all(np.isfinite(data), axis=0)
    px = data[:, valid].astype(np.float64)
    if px.shape[1] == 0:
        raise InputError(path, "has no valid pixel to compute its radiometric statistics from (all nodata?)", "check the image's nodata value and alpha band")
    if method == "percentile":
        low, high = np.percentile(px, radiometry.percentiles, axis=1)
    elif method == "minmax":
        low, high = px.min(1), px.max(1)
    else:  # fixed
        low = np.broadcast_to(np.asarray(radiometry.low, np.float64), (n,)) if len(radiometry.low or ()) in (1, n) else None
        high = np.broadcast_to(np.asarray(radiometry.high, np.float64), (n,)) if len(radiometry.high or ()) in (1, n) else None
        if low is None or high is None:
            raise InputError(path, f"image.rescale low/high give {len(radiometry.low or ())}/{len(radiometry.high or ())} values for {n} band(s)",
                             "give one value for all bands or one per band")
    flat = high <= low
    if flat.any():
        log.warning("%s: band(s) %s have a single value (%s) in the stretch: they become 0", path, [bands[i] for i in np.flatnonzero(flat)], low[flat].tolist())
        high = np.where(flat, low + 1, high)
    clipped = float(np.mean(np.any((px < low[:, None]) | (px > high[:, None]), axis=0)))
    if clipped > radiometry.max_clipped:
        raise InputError(path, f"the {method} rescale from {np.round(low, 3).tolist()} to {np.round(high, 3).tolist()} clips {clipped:.0%} of the valid pixels "
                               f"(pixel values range {px.min(1).tolist()} to {px.max(1).tolist()})",
                         "widen image.rescale.low/high or use method percentile; image.rescale.max_clipped sets the limit")
    if clipped > 0.1:
        log.warning("%s: the %s rescale clips %.0f%% of the valid pixels", path, method, 100 * clipped)
    return Stretch(method, tuple(float(v) for v in low), tuple(float(v) for v in high), dtype, clipped)


def training_record(records: Sequence[Mapping[str, Any] | None], sources: Sequence[str], bands: Sequence[tuple[int, ...] | None]) -> dict[str, Any]:
    """What a package records of its training imagery: the rescale settings, each scene's stretch, the bands.

    All datasets of a model must have been rescaled the same way; folders exported by
    other tools (no record) count as 8-bit imagery used as is.
    """
    settings: dict[str, Any] | None = None
    first = ""
    stretches = {}
    for rec, src in zip(records, sources):
        rec = rec or {"settings": Radiometry("none").to_dict(), "stretch": None}
        s = {k: v for k, v in rec["settings"].items() if k != "max_clipped"}
        if settings is None:
            settings, first = s, src
        elif s != settings:
            raise InputError(src, f"was exported with image.rescale {s}, but {first} with {settings}", "export every dataset of a model with the same image.rescale")
        stretches[src] = rec.get("stretch")
    known = {b for b in bands if b is not None}
    if len(known) > 1:
        raise InputError(sources[0], f"the datasets hold different source bands {sorted(known)}", "export every dataset of a model with the same image.bands")
    return {"settings": settings or Radiometry().to_dict(), "stretches": stretches, "source_bands": list(next(iter(known))) if known else None}
