"""Shared test data makers: real GeoTIFFs and vector files, written per test."""

from __future__ import annotations

import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import yaml
from rasterio.transform import from_origin

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHIPPED_MODEL = ROOT / yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())["models"]["base"]["package"]  # the shipped pretrained model the demo brings

UTM = "EPSG:32611"
X0, Y0 = 500_000.0, 4_000_000.0


def make_raster(
    path: Path,
    *,
    size: tuple[int, int] = (200, 200),
    cell: float = 0.5,
    count: int = 3,
    dtype: str = "uint8",
    crs: str | None = UTM,
    origin: tuple[float, float] = (X0, Y0),
    data: np.ndarray | None = None,
    nodata: float | None = None,
    alpha_zero: tuple[slice, slice] | None = None,
) -> Path:
    """Write a georeferenced test image; with ``alpha_zero`` a 4th alpha band is 0 in that region."""
    h, w = size
    if data is None:
        rng = np.random.default_rng(0)
        data = rng.integers(20, 230, (count, h, w)).astype(dtype)
    bands = data.shape[0]
    profile = {"driver": "GTiff", "width": w, "height": h, "count": bands + (alpha_zero is not None), "dtype": dtype, "transform": from_origin(*origin, cell, cell)}
    if crs:
        profile["crs"] = crs
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, list(range(1, bands + 1)))
        if alpha_zero is not None:
            alpha = np.full((h, w), 255, dtype)
            alpha[alpha_zero] = 0
            dst.write(alpha, bands + 1)
            dst.colorinterp = [rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.green, rasterio.enums.ColorInterp.blue, rasterio.enums.ColorInterp.alpha][: bands + 1]
    return path


def make_vectors(path: Path, geoms: list, *, crs: str | None = UTM, layer: str = "roads", **columns) -> Path:
    data = {k: v for k, v in columns.items()}
    gdf = gpd.GeoDataFrame(data, geometry=geoms, crs=crs)
    gdf.to_file(path, layer=layer, driver="GPKG" if path.suffix == ".gpkg" else None)
    return path


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def random_package(folder: Path, *, tile_size: int = 128) -> Path:
    """A roadxfer package of a seeded, untrained LinkNet/ResNet-18 (one road class, 18 direction bins, 0.3 m)."""
    import torch

    from roadxfer.model import ModelSpec, MultiTaskRoadModel
    from roadxfer.package import build_emd, write_package

    torch.manual_seed(0)
    spec = ModelSpec(backbone="resnet18", orientation_bins=18)
    emd = build_emd(folder.name, spec, tile_size=tile_size, classes=[{"value": 1, "name": "road", "color": [255, 0, 0]}], bin_size=10,
                    mean=[0.5] * 3, std=[0.25] * 3, cell_size=0.3, provenance={})
    return write_package(folder, MultiTaskRoadModel(spec), emd)
