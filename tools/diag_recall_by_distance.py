"""Recall of each model's road mask by distance from the drawn centreline, per road type.

  python tools/diag_recall_by_distance.py [RUN_DIR] [--scenes demo_final_01 demo_final_02]

RUN_DIR: a checkout where ``make demo`` ran (default: this one). Tells missed stretches
(low recall right on the line) from thin masks (recall falling off towards the label's
buffer radius). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import geopandas as gpd
import rasterio
from rasterio import features
from scipy import ndimage

EDGES = (0.0, 0.5, 1.0, 1.5, 2.0, 4.0)  # metres from the centreline; the demo's labels reach 2 m


def profile(classes: Path, lines: gpd.GeoDataFrame, road_type: str) -> list[float]:
    """Share of pixels called road (class 1) in each band of distance from ``road_type``'s lines."""
    with rasterio.open(classes) as src:
        road = src.read(1) == 1
        transform, shape = src.transform, src.shape
        own = lines.to_crs(src.crs)
    own = own[own["road_type"] == road_type]
    centre = features.rasterize(((g, 1) for g in own.geometry), out_shape=shape, transform=transform, all_touched=True).astype(bool)
    dist = ndimage.distance_transform_edt(~centre) * abs(transform.a)
    return [float(road[(dist >= lo) & (dist < hi)].mean()) for lo, hi in zip(EDGES[:-1], EDGES[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", type=Path, default=Path("."))
    ap.add_argument("--scenes", nargs="+", default=["demo_final_01", "demo_final_02"])
    ap.add_argument("--models", nargs="+", default=["base", "transfer", "scratch"])
    args = ap.parse_args()
    bands = " / ".join(f"{lo:g}-{hi:g}" for lo, hi in zip(EDGES[:-1], EDGES[1:]))
    print(f"share called road at {bands} m from the line (the last band is outside the label)")
    for scene in args.scenes:
        lines = gpd.read_file(args.run / "resources" / "demo" / f"{scene}.gpkg")
        for model in args.models:
            classes = args.run / "results" / "classified" / model / scene / "classes.tif"
            if not classes.exists():
                print(f"{scene} {model}: no {classes}")
                continue
            parts = [f"{t} " + " ".join(f"{v:.2f}" for v in profile(classes, lines, t)) for t in sorted(lines["road_type"].unique())]
            print(f"{scene} {model:8s} " + "; ".join(parts))


if __name__ == "__main__":
    main()
