"""Helpers shared by the benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from roadxfer.demo import render_scene  # noqa: E402
from roadxfer.raster import GTIFF_PROFILE  # noqa: E402

ORIGIN = (600_000.0, 4_000_000.0)


def tiled_demo_image(path: Path, size: int, cell: float = 0.3) -> Path:
    """A large realistic scene made by repeating a 1024 px demo scene (rendering big scenes is slow)."""
    base, _ = render_scene(5, 1024, "mixed")
    reps = -(-size // 1024)
    transform = from_origin(*ORIGIN, cell, cell)
    profile = {**GTIFF_PROFILE, "width": size, "height": size, "count": 3, "dtype": "uint8", "crs": "EPSG:32611", "transform": transform}
    with rasterio.open(path, "w", **profile) as dst:
        for r0 in range(0, size, 1024):  # written in strips: the benchmark itself stays small
            strip = np.tile(base, (1, 1, reps))[:, : min(1024, size - r0), :size]
            dst.write(strip, window=rasterio.windows.Window(0, r0, size, strip.shape[1]))
    return path


def make_package(folder: Path, backbone: str, tile: int, *, arch: str = "linknet", cell: float = 0.3, name: str = "bench") -> Path:
    """An untrained but complete package (seeded weights + .emd): what the timing benchmarks classify with."""
    import torch

    from roadxfer.model import ModelSpec, MultiTaskRoadModel
    from roadxfer.package import build_emd, write_package

    torch.manual_seed(0)
    spec = ModelSpec(arch=arch, backbone=backbone, orientation_bins=18)
    emd = build_emd(name, spec, tile_size=tile, classes=[{"value": 1, "name": "road"}], bin_size=10, mean=[0.5] * 3, std=[0.25] * 3, cell_size=cell, provenance={})
    return write_package(folder / name, MultiTaskRoadModel(spec), emd)
