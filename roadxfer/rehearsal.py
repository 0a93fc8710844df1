"""Against forgetting: rehearsal tiles of the pretrained domain in each epoch, and the pretrained model's confident roads kept as labels."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import IGNORE_VALUE
from .data import TileData
from .errors import InputError


def rehearsal_count(n_new: int, n_old: int, fraction: float) -> int:
    """Rehearsal tiles per epoch so that they make ``fraction`` of it (at most all of them)."""
    if not n_old or fraction <= 0:
        return 0
    return min(n_old, round(n_new * fraction / (1 - fraction)))


def epoch_indexes(train_idx: np.ndarray, rehearsal_idx: np.ndarray, fraction: float, *, seed: int, epoch: int) -> np.ndarray:
    """The epoch's tiles: every training tile plus a fresh, seeded draw of rehearsal tiles."""
    k = rehearsal_count(len(train_idx), len(rehearsal_idx), fraction)
    if not k:
        return train_idx
    rng = np.random.default_rng([seed, epoch, 7])
    return np.concatenate([train_idx, np.sort(rng.choice(rehearsal_idx, k, replace=False))])


def append_tiles(data: TileData, more: TileData) -> np.ndarray:
    """Append ``more``'s tiles to ``data`` in place (scenes renumbered); returns their indexes."""
    if (more.tile_size, more.bands) != (data.tile_size, data.bands):
        raise InputError(more.sources[0], f"rehearsal tiles are {more.bands}-band {more.tile_size} px, the training tiles {data.bands}-band {data.tile_size} px",
                         "export the rehearsal scenes with the same tile_size and bands")
    start = len(data)
    data.images = np.concatenate([data.images, more.images])
    data.seg = np.concatenate([data.seg, more.seg])
    data.orient = np.concatenate([data.orient, more.orient])
    data.scene = np.concatenate([data.scene, more.scene + len(data.scenes)])
    data.scenes = [*data.scenes, *more.scenes]
    return np.arange(start, len(data))


@torch.no_grad()
def keep_pretrained_roads(pkg: Any, data: TileData, dev: torch.device, threshold: float, batch_size: int) -> int:
    """Label as road the background pixels the pretrained model finds road with P >= ``threshold``.

    New samples usually label only the roads the old model misses; everything else is
    background, which would teach the new model to drop the roads the old one found
    (catastrophic forgetting). Keeping the old model's confident detections as labels
    (pseudo-labels, as in "learning without forgetting") avoids that without its data.
    Orientation is left unknown (ignore) for those pixels.
    """
    model = pkg.model.to(dev).eval()
    mean = torch.tensor(pkg.mean, device=dev).view(1, -1, 1, 1)
    std = torch.tensor(pkg.std, device=dev).view(1, -1, 1, 1)
    added = 0
    for i in range(0, len(data), batch_size):
        x = torch.from_numpy(data.images[i : i + batch_size]).to(dev).float() / 255.0
        probs = torch.softmax(model.segment((x - mean) / std).float(), 1)
        road = (1 - probs[:, 0] >= threshold).cpu().numpy()
        cls = probs[:, 1:].argmax(1).cpu().numpy().astype(np.uint8) + 1
        seg = data.seg[i : i + batch_size]
        new = road & (seg == 0)
        seg[new] = cls[new] if len(data.classes) == pkg.spec.n_classes else 1
        data.orient[i : i + batch_size][new] = IGNORE_VALUE
        added += int(new.sum())
    return added

