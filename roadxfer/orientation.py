"""Orientation bins of undirected road directions, and how they move under flips and rotations.

Bins cover 0-180 degrees (roads have no direction): value 0 is "no road", 1..n the bin,
255 ignore. Angles are measured counter-clockwise from the +x (column) axis as the image
is seen on screen (rows grow downwards).
"""

from __future__ import annotations

import numpy as np

from . import IGNORE_VALUE


def n_bins(bin_size: int) -> int:
    if 180 % bin_size:
        raise ValueError(f"orientation bin size {bin_size} does not divide 180")
    return 180 // bin_size


def angle_bin(angle_deg: np.ndarray | float, bin_size: int) -> np.ndarray:
    """Orientation bin value (1..n) of an undirected angle in degrees."""
    folded = np.mod(angle_deg, 180.0)
    return (np.floor(folded / bin_size).astype(np.int64) % n_bins(bin_size) + 1).astype(np.uint8)


def _map_bins(orient: np.ndarray, fn) -> np.ndarray:
    out = orient.copy()
    road = (orient > 0) & (orient != IGNORE_VALUE)
    out[road] = fn(orient[road].astype(np.int64) - 1).astype(orient.dtype) + 1
    return out


def rotate_bins(orient: np.ndarray, k: int, bin_size: int) -> np.ndarray:
    """Bins after rotating the chip by ``k`` x 90 degrees counter-clockwise (``np.rot90``).

    Exact only when ``bin_size`` divides 90.
    """
    nb = n_bins(bin_size)
    shift = (k * 90 // bin_size) % nb
    return _map_bins(orient, lambda b: (b + shift) % nb)


def flip_bins(orient: np.ndarray, bin_size: int) -> np.ndarray:
    """Bins after mirroring the chip left-right or up-down (both map theta to 180 - theta)."""
    nb = n_bins(bin_size)
    return _map_bins(orient, lambda b: nb - 1 - b)
