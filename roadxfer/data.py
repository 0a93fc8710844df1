"""Training data from Classified Tiles folders: loading, checks, split and augmentation."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch

from . import IGNORE_VALUE
from .errors import InputError
from .orientation import flip_bins, orientation_from_mask, rotate_bins
from .tiles import read_dataset

log = logging.getLogger(__name__)


@dataclass
class TileData:
    """All chips of one or more datasets, in memory (uint8), labels mapped to class indexes."""

    images: np.ndarray  # (N, bands, T, T) uint8
    seg: np.ndarray  # (N, T, T) uint8: 0 background, i = classes[i-1], 255 ignore
    orient: np.ndarray  # (N, T, T) uint8: 0 no road, 1..bins, 255 ignore
    scene: np.ndarray  # (N,) scene index
    scenes: list[str]
    classes: list[dict[str, Any]]
    tile_size: int
    bands: int
    cell_size: float | None
    sources: list[str]
    radiometry: list[dict[str, Any] | None] = field(default_factory=list)  # per source: {"settings", "stretch"} or None
    source_bands: list[tuple[int, ...] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def band_stats(self) -> tuple[list[float], list[float]]:
        """Per-band mean/std (0-1 scale) over valid pixels, for normalisation."""
        valid = self.seg != IGNORE_VALUE
        px = self.images.transpose(1, 0, 2, 3)[:, valid].astype(np.float64) / 255.0
        if px.shape[1] == 0:
            return [0.5] * self.bands, [0.25] * self.bands
        return px.mean(1).tolist(), np.maximum(px.std(1), 1e-3).tolist()


def load_tiles(folders: Sequence[str | Path], classes: Sequence[dict[str, Any]], *, orientation_bin_size: int | None = None) -> TileData:
    """Load chips; refuse empty data, unknown class values, mixed tile sizes or band counts.

    Tiles without orientation chips (as the reference tool exports them) get orientation
    targets derived from their road mask when ``orientation_bin_size`` is given; without
    it their orientation is ignored, and a warning says the orientation head learns
    nothing from them.
    """
    if not folders:
        raise InputError(None, "no training datasets given", "list Classified Tiles folders or roles under the model's `datasets`")
    lut = np.full(256, IGNORE_VALUE, np.uint8)
    lut[0] = 0
    for i, c in enumerate(classes, start=1):
        lut[int(c["value"])] = i
    known = {0, IGNORE_VALUE} | {int(c["value"]) for c in classes}
    images, segs, oris, scene_idx, scenes, sources = [], [], [], [], [], []
    radiometry: list[dict[str, Any] | None] = []
    source_bands: list[tuple[int, ...] | None] = []
    tile = bands = None
    cell = None
    for folder in folders:
        ds = read_dataset(folder)
        if tile is None:
            tile, bands, cell = ds.tile_size, ds.bands, ds.cell_size
        elif ds.tile_size != tile:
            raise InputError(ds.root, f"has {ds.tile_size}px tiles but {sources[0]} has {tile}px", "export every dataset of a model with the same tile_size")
        elif ds.bands != bands:
            raise InputError(ds.root, f"has {ds.bands}-band chips but {sources[0]} has {bands}", "use imagery with the same bands")
        scenes.append(ds.scene_id)
        sources.append(str(ds.root))
        radiometry.append(ds.radiometry)
        source_bands.append(ds.source_bands)
        if None in ds.orientation:
            n_missing = sum(o is None for o in ds.orientation)
            if orientation_bin_size:
                log.warning("%s: %d of %d tile(s) have no orientation chip (a reference-tool export?): orientation targets derived from the road mask", ds.root, n_missing, len(ds.images))
            else:
                log.warning("%s: %d of %d tile(s) have no orientation chip: the orientation head is NOT trained on them", ds.root, n_missing, len(ds.images))
        for img_p, lbl_p, ori_p in zip(ds.images, ds.labels, ds.orientation):
            with rasterio.open(img_p) as src:
                img = src.read()
            if img.shape != (bands, tile, tile):
                raise InputError(img_p, f"chip has shape {img.shape}, the dataset's tiles are {bands}x{tile}x{tile}", "export the tiles again with one tile_size")
            if img.dtype != np.uint8:
                raise InputError(img_p, f"chip is {img.dtype}, 8-bit chips are expected", "export 8-bit imagery")
            with rasterio.open(lbl_p) as src:
                lbl = src.read(1)
            if lbl.shape != (tile, tile):
                raise InputError(lbl_p, f"label chip is {lbl.shape[1]}x{lbl.shape[0]}, its image is {tile}x{tile}", "export the tiles again")
            unknown = set(np.unique(lbl).tolist()) - known
            if unknown:
                raise InputError(lbl_p, f"label chip has class value(s) {sorted(unknown)} not listed under `classes` in the config", "add the classes to the config or fix the labels")
            if ori_p is not None:
                with rasterio.open(ori_p) as src:
                    ori = src.read(1)
            elif orientation_bin_size:  # reference-tool tiles carry only the road mask
                ori = orientation_from_mask((lbl > 0) & (lbl != IGNORE_VALUE), orientation_bin_size)
                ori[lbl == IGNORE_VALUE] = IGNORE_VALUE
            else:
                ori = np.full((tile, tile), IGNORE_VALUE, np.uint8)
            images.append(img)
            segs.append(lut[lbl])
            oris.append(ori)
            scene_idx.append(len(scenes) - 1)
    if not images:
        raise InputError(folders[0], "training datasets hold no tiles", "export tiles with features")
    log.info("loaded %d tile(s) of %d px from %d dataset(s)", len(images), tile, len(sources))
    return TileData(np.stack(images), np.stack(segs), np.stack(oris), np.asarray(scene_idx), scenes, list(classes), int(tile), int(bands), cell, sources,
                    radiometry, source_bands)


# With fewer scenes than this, `val_split: auto` holds out tiles of every scene rather than
# whole scenes: one of two transfer scenes held out would halve a few samples.
STRATIFY_BELOW = 5


def split(data: TileData, *, val_fraction: float, mode: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split.

    ``scene``: whole scenes held out; ``stratified``: ``val_fraction`` of each scene's tiles;
    ``tile``: tiles at random; ``auto``: by scene from :data:`STRATIFY_BELOW` scenes up,
    stratified by scene below that, by tile for one scene.
    """
    rng = np.random.default_rng(seed)
    n_scenes = len(data.scenes)
    if mode == "auto":
        mode = "scene" if n_scenes >= STRATIFY_BELOW else "stratified" if n_scenes >= 2 else "tile"
    is_val = np.zeros(len(data), bool)
    if mode == "scene":
        if n_scenes < 2:
            raise InputError(data.sources[0], "a split by scene needs at least two scenes", "set training.val_split: tile")
        n_val = min(max(1, round(val_fraction * n_scenes)), n_scenes - 1)
        val_scenes = rng.choice(n_scenes, n_val, replace=False)
        is_val = np.isin(data.scene, val_scenes)
    elif mode == "stratified":
        for s in range(n_scenes):
            idx = np.flatnonzero(data.scene == s)
            n_val = min(max(1, round(val_fraction * len(idx))), len(idx) - 1) if len(idx) > 1 else 0
            is_val[rng.choice(idx, n_val, replace=False)] = True
    else:
        n_val = max(1, round(val_fraction * len(data))) if len(data) > 1 else 0
        is_val[rng.choice(len(data), n_val, replace=False)] = True
    train, val = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if len(train) == 0:
        raise InputError(data.sources[0], "no tiles left for training after the validation split", "add data or lower training.val_fraction")
    return train, val


@dataclass(frozen=True)
class Augment:
    flips: bool = True
    rot90: bool = True
    color_jitter: float = 0.1


def augment(img: np.ndarray, seg: np.ndarray, ori: np.ndarray, rng: np.random.Generator, aug: Augment, bin_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random flips, 90-degree rotations (orientation bins moved with them) and mild colour jitter.

    Returns float32 image in 0-1 and the label arrays.
    """
    if aug.rot90 and 90 % bin_size == 0:
        k = int(rng.integers(4))
        if k:
            img, seg, ori = np.rot90(img, k, (1, 2)), np.rot90(seg, k), rotate_bins(np.rot90(ori, k), k, bin_size)
    if aug.flips and rng.random() < 0.5:
        img, seg, ori = img[:, :, ::-1], seg[:, ::-1], flip_bins(ori[:, ::-1], bin_size)
    out = img.astype(np.float32) / 255.0
    if aug.color_jitter > 0:
        j = aug.color_jitter
        gain = 1 + rng.uniform(-j, j, (out.shape[0], 1, 1)).astype(np.float32)
        bias = rng.uniform(-j / 2, j / 2, (1, 1, 1)).astype(np.float32)
        out = np.clip(out * gain + bias, 0, 1)
    return np.ascontiguousarray(out), np.ascontiguousarray(seg), np.ascontiguousarray(ori)


class TrainSet(torch.utils.data.Dataset):
    """Indexes into :class:`TileData`; augmentation seeded by (seed, epoch, index) for exact resumes."""

    def __init__(self, data: TileData, indexes: np.ndarray, aug: Augment | None, bin_size: int, seed: int) -> None:
        self.data, self.indexes, self.aug, self.bin_size, self.seed = data, indexes, aug, bin_size, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indexes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        j = int(self.indexes[i])
        img, seg, ori = self.data.images[j], self.data.seg[j], self.data.orient[j]
        if self.aug is not None:
            rng = np.random.default_rng([self.seed, self.epoch, j])
            img, seg, ori = augment(img, seg, ori, rng, self.aug, self.bin_size)
        else:
            img = img.astype(np.float32) / 255.0
        return torch.from_numpy(img), torch.from_numpy(seg.astype(np.int64)), torch.from_numpy(ori.astype(np.int64))


@contextlib.contextmanager
def stage(datasets: Sequence[str | Path], enabled: bool) -> Iterator[list[Path]]:
    """Copy tile folders to node-local scratch ($TMPDIR, as SLURM sets it) for the read, if asked."""
    scratch = os.environ.get("TMPDIR")
    if not enabled or not scratch:
        yield [Path(d) for d in datasets]
        return
    with tempfile.TemporaryDirectory(prefix="roadxfer-stage-", dir=scratch) as tmp:
        local = []
        for i, d in enumerate(datasets):
            dst = Path(tmp) / f"{i:03d}-{Path(d).name}"
            shutil.copytree(d, dst)
            local.append(dst)
        log.info("staged %d tile folder(s) to %s", len(local), tmp)
        yield local
