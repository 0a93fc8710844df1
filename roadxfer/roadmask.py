"""The road mask centrelines are traced from: hysteresis, small holes closed, specks removed.

A model's road probability is ragged at its edges and speckled where it is unsure. Traced
as it is, every speck becomes a line and every hole a loop in the skeleton, so a noisy
prediction gives tens of thousands of pixel-long pieces. Here strong pixels (P >= high)
seed roads that grow into their weaker neighbours (P >= low), holes smaller than a few
square metres are filled and blobs smaller than a short road are dropped, before any
skeleton is taken.

Everything works on one padded window at a time. A component or hole that touches the
window's border may continue outside it, so it is kept (or left open) rather than judged
on a part: decisions inside the window then agree with those on the whole scene for
everything smaller than the padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .config import default

EIGHT = np.ones((3, 3), bool)


@dataclass(frozen=True)
class MaskSettings:
    high: float = default("vectorise.high")  # P(road) of the seeds
    low: float = default("vectorise.low")  # P(road) a seed grows into
    hole_area: float = default("vectorise.hole_area")  # m²: holes smaller than this are filled
    min_area: float = default("vectorise.min_area")  # m²: blobs smaller than this are dropped (specks; road stubs between gaps stay, to be bridged)


@dataclass
class MaskStats:
    """What cleaning removed, for the noise diagnosis."""

    kept: int = 0  # road pixels kept
    specks: int = 0  # road pixels in dropped blobs or unseeded weak regions
    filled: int = 0  # hole pixels filled

    def add(self, other: MaskStats) -> None:
        self.kept += other.kept
        self.specks += other.specks
        self.filled += other.filled


Cut = tuple[bool, bool, bool, bool]
"""Which sides of a window (top, bottom, left, right) are cuts through the scene rather than its edge."""
ALL_CUT: Cut = (True, True, True, True)


def _touching_cut(labels: np.ndarray, n: int, cut: Cut) -> np.ndarray:
    """Boolean per label (index 0..n) whether it touches a side of the window that cuts the scene."""
    touch = np.zeros(n + 1, bool)
    for is_cut, edge in zip(cut, (labels[0], labels[-1], labels[:, 0], labels[:, -1])):
        if is_cut:
            touch[np.unique(edge)] = True
    return touch


def hysteresis(weak: np.ndarray, strong: np.ndarray, cut: Cut = ALL_CUT) -> np.ndarray:
    """Weak pixels 8-connected to a strong one (components running out of the window are kept whole)."""
    labels, n = ndimage.label(weak, EIGHT)
    if n == 0:
        return weak
    keep = np.zeros(n + 1, bool)
    keep[np.unique(labels[strong & weak])] = True
    keep |= _touching_cut(labels, n, cut)
    keep[0] = False
    return keep[labels]


def drop_small(mask: np.ndarray, min_px: float, cut: Cut = ALL_CUT) -> np.ndarray:
    """Remove 8-connected blobs smaller than ``min_px`` pixels (blobs running out of the window stay)."""
    if min_px <= 1:
        return mask
    labels, n = ndimage.label(mask, EIGHT)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = (sizes >= min_px) | _touching_cut(labels, n, cut)
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask: np.ndarray, max_px: float, cut: Cut = ALL_CUT) -> np.ndarray:
    """Fill 4-connected background holes smaller than ``max_px`` pixels (holes running out of the window stay open)."""
    if max_px <= 0:
        return mask
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    fill = (sizes < max_px) & ~_touching_cut(labels, n, cut)
    fill[0] = False
    return mask | fill[labels]


def clean_mask(weak: np.ndarray, strong: np.ndarray, settings: MaskSettings, cell_m: float,
               core: tuple[slice, slice] | None = None, cut: Cut = ALL_CUT) -> tuple[np.ndarray, MaskStats]:
    """The road mask of one padded window, and what was removed from it (counted in ``core`` only)."""
    seeded = hysteresis(weak, strong, cut)
    mask = drop_small(seeded, settings.min_area / cell_m**2, cut)
    filled = fill_small_holes(mask, settings.hole_area / cell_m**2, cut)
    c = core or (slice(None), slice(None))
    kept, n_weak, n_filled = int(mask[c].sum()), int(weak[c].sum()), int(filled[c].sum())
    return filled, MaskStats(kept=kept, specks=n_weak - kept, filled=n_filled - kept)
