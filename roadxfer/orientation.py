"""Orientation bins of undirected road directions, and how they move under flips and rotations.

Bins cover 0-180 degrees (roads have no direction): value 0 is "no road", 1..n the bin,
255 ignore. Angles are measured counter-clockwise from the +x (column) axis as the image
is seen on screen (rows grow downwards).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

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


# --- the reference layout and orientation targets for any model ------------------------------
#
# The reference network has 360 / orient_bin_size direction classes over the full circle,
# measured clockwise from +x on screen (atan2 of row and column steps along the road's
# keypoints, as in Batra et al.'s code), and a last class "no road". The direction of a
# road along its keypoints is arbitrary, so both theta and theta + 180 are right answers.
# For training and scoring we fold such a head into undirected classes laid out as ours:
# 0 = no road, 1..k = directions over 180 degrees (roadxfer.model.undirected_log_probs);
# the weights keep the reference layout. (No torch here: the geo rules import this module.)


def target_lut(label_bin_size: int, *, reference_layout: bool, model_bins: int) -> np.ndarray:
    """Map label orientation values (our 180-degree bins) to a model's undirected classes.

    Returns a (256,) int64 table: 0 -> 0 (no road), bin i -> 1..k by the bin's centre
    angle, 255 -> 255 (ignore). Identity for our own models with the label's bins.
    """
    n = n_bins(label_bin_size)
    k = model_bins // 2 if reference_layout else model_bins
    centre = (np.arange(1, n + 1) - 0.5) * label_bin_size  # counter-clockwise, 0-180
    angle = np.mod(-centre, 180.0) if reference_layout else centre
    lut = np.full(256, IGNORE_VALUE, np.int64)
    lut[0] = 0
    lut[1 : n + 1] = np.floor(angle / (180.0 / k)).astype(np.int64) % k + 1
    return lut


def orientation_from_mask(road: np.ndarray, bin_size: int, *, sigma: float = 4.0) -> np.ndarray:
    """Orientation values (0 no road, 1..n) for a road mask without drawn lines.

    For tiles that carry only a road mask (as the reference tool exports them): the
    direction along the road is perpendicular to the dominant gradient of the mask in a
    neighbourhood of ``sigma`` pixels (structure tensor). Pixels with no gradient in
    reach take the direction of the nearest pixel that has one.
    """
    road = np.asarray(road, bool)
    out = np.zeros(road.shape, np.uint8)
    if not road.any():
        return out
    m = ndimage.gaussian_filter(road.astype(np.float64), 1.0)
    gx = ndimage.sobel(m, axis=1)
    gy = -ndimage.sobel(m, axis=0)  # rows grow downwards; angles are counter-clockwise on screen
    jxx = ndimage.gaussian_filter(gx * gx, sigma)
    jyy = ndimage.gaussian_filter(gy * gy, sigma)
    jxy = ndimage.gaussian_filter(gx * gy, sigma)
    energy = jxx + jyy
    normal = 0.5 * np.degrees(np.arctan2(2 * jxy, jxx - jyy))
    known = energy > 1e-6 * energy.max()
    if not known.all():
        _, (ri, ci) = ndimage.distance_transform_edt(~known, return_indices=True)
        normal = normal[ri, ci]
    out[road] = angle_bin(normal[road] + 90.0, bin_size)
    return out
