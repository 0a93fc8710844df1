"""Shared test data makers: real GeoTIFFs and vector files, written per test."""

from __future__ import annotations

import os
import subprocess
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
ROAD = [{"value": 1, "name": "road", "color": [255, 0, 0]}]  # the one class most tests train and classify


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


# Shared by several test modules (never imported from one test module into another).

@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """An untrained but complete package (weights + .emd), one per test module: enough to test the plumbing."""
    import torch

    from roadxfer.model import ModelSpec, MultiTaskRoadModel
    from roadxfer.package import build_emd, write_package

    torch.manual_seed(0)
    spec = ModelSpec(backbone="resnet18", orientation_bins=18)
    model = MultiTaskRoadModel(spec)
    emd = build_emd("m", spec, tile_size=64, classes=[{"value": 1, "name": "road"}], bin_size=10, mean=[0.5] * 3, std=[0.25] * 3, cell_size=0.5, provenance={})
    return write_package(tmp_path_factory.mktemp("pkg") / "m", model, emd)



def satellite_scene(folder: Path, kind: str) -> tuple[Path, Path]:
    """A demo scene re-encoded as an 11-bit, 4-band (RGB + NIR) or 1-band panchromatic uint16 product."""
    rgb_path, labels = folder / "rgb.tif", folder / "roads.gpkg"
    from roadxfer.demo import write_scene

    write_scene(7, rgb_path, labels, size=256)
    with rasterio.open(rgb_path) as src:
        rgb, profile = src.read().astype(np.uint16), src.profile
    if kind == "4band":
        nir = 2000 - 3 * rgb[1]
        data = np.concatenate([rgb * 6 + 150, nir[None]])
    else:
        data = (rgb.sum(0, keepdims=True) * 2 + 300).astype(np.uint16)
    path = folder / f"{kind}.tif"
    profile.update(count=data.shape[0], dtype="uint16", photometric="MINISBLACK", nodata=None)
    profile.pop("nodata")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data.astype(np.uint16))
    return path, labels



SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def smk(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, "-s", str(ROOT / "Snakefile"), *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def tiny_workflow(tmp: Path, rows: list[str] | None = None, extra: str = "", retention: bool = False) -> Path:
    """A tiny demo workflow in ``tmp``; ``retention`` adds an urban base-domain scene of role retention."""
    r1 = ", r1: {seed: 2, landscape: urban}" if retention else ""
    (tmp / "cfg.yaml").write_text(
        "scenes: scenes.tsv\n"
        f"demo: {{size: 256, scenes: {{b1: {{seed: 1}}, t1: {{seed: 11, kind: rural}}, x1: {{seed: 101}}{r1}}}}}\n"
        "tiles: {tile_size: 64, stride: 64}\n"
        "training: {backbone: resnet18, epochs: 1, batch_size: 4, patience: 0}\n"
        "resources: {train: {threads: 1, gpu: 0}, classify: {threads: 1, gpu: 0}}\n" + extra
    )
    rows = rows or [
        "b1\tresources/demo/b1.tif\tresources/demo/b1.gpkg\troads\troad_type = 'paved'\tbase",
        "t1\tresources/demo/t1.tif\tresources/demo/t1.gpkg\troads\troad_type IN ('unpaved', 'trail')\ttransfer",
        "x1\tresources/demo/x1.tif\tresources/demo/x1.gpkg\t\t\ttest",
    ] + (["r1\tresources/demo/r1.tif\tresources/demo/r1.gpkg\t\t\tretention"] if retention else [])
    (tmp / "scenes.tsv").write_text("scene_id\timage\tlabels\tlayer\tfilter\trole\n" + "\n".join(rows) + "\n")
    return tmp


def job_counts(dry_run_stdout: str) -> dict[str, int]:
    """The "Job stats" table of a dry run: rule -> jobs."""
    table = dry_run_stdout.split("Job stats:", 1)[1].split("\n\n", 1)[0].splitlines()[3:]
    return {rule: int(n) for rule, n in (line.split() for line in table) if rule not in ("total", "all")}
