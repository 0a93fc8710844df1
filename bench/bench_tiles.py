"""Benchmark of the classified-tile export (step 2). Prints figures; asserts nothing.

  python bench/bench_tiles.py [--size 3072] [--tile 256] [--stride 128]

* export tiles/s versus a plain windowed rasterio read/write of the same windows and
  bands (image, label, orientation) into GeoTIFF chips; their ratio (goal >= 0.5);
* peak RSS of the export for a scene and for one with 4x the area (goal: flat), each
  measured in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from shapely.geometry import LineString

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import tiled_demo_image  # noqa: E402
from roadxfer.labels import LabelSettings, rasterize_scene  # noqa: E402
from roadxfer.tiles import TileSettings, export_tiles, tile_windows  # noqa: E402


def make_scene(folder: Path, size: int) -> tuple[Path, Path, Path]:
    """A large scene made by tiling a demo scene, with a grid of road lines as labels."""
    import geopandas as gpd

    image = tiled_demo_image(folder / f"scene{size}.tif", size)
    extent = size * 0.3
    lines = [LineString([(600_000, 4_000_000 - y), (600_000 + extent, 4_000_000 - y - 7)]) for y in np.arange(30, extent, 60)]
    lines += [LineString([(600_000 + x, 4_000_000), (600_000 + x + 5, 4_000_000 - extent)]) for x in np.arange(30, extent, 60)]
    vec = folder / f"lines{size}.gpkg"
    gpd.GeoDataFrame({"Classvalue": [1] * len(lines)}, geometry=lines, crs="EPSG:32611").to_file(vec)
    rasterize_scene(image, vec, folder / f"label{size}.tif", folder / f"orient{size}.tif", folder / f"sum{size}.json", LabelSettings(buffer_radius=2.0))
    return image, folder / f"label{size}.tif", folder / f"orient{size}.tif"


def baseline(image: Path, label: Path, orient: Path, out: Path, tile: int, stride: int) -> int:
    out.mkdir()
    n = 0
    with rasterio.open(image) as src, rasterio.open(label) as lab, rasterio.open(orient) as ori:
        for window in tile_windows(src.width, src.height, tile, stride):
            wt = rasterio.windows.transform(window, src.transform)
            for name, ds in (("i", src), ("l", lab), ("o", ori)):
                data = ds.read(window=window)
                prof = {"driver": "GTiff", "width": tile, "height": tile, "count": data.shape[0], "dtype": "uint8", "crs": src.crs, "transform": wt, "compress": "deflate", "tiled": True}
                with rasterio.open(out / f"{n:09d}{name}.tif", "w", **prof) as dst:
                    dst.write(data)
            n += 1
    return n


def child(args: argparse.Namespace) -> None:
    """Run one export in this process and print its peak RSS (MiB)."""
    export_tiles(args.image, args.label, args.orient, args.out, TileSettings(tile_size=args.tile, stride=args.stride, keep="all"))
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=3072)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--stride", type=int, default=128)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--image", type=Path)
    ap.add_argument("--label", type=Path)
    ap.add_argument("--orient", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        image, label, orient = make_scene(tmp, args.size)
        t0 = time.perf_counter()
        stats = export_tiles(image, label, orient, tmp / "tiles", TileSettings(tile_size=args.tile, stride=args.stride, keep="all"))
        t_export = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = baseline(image, label, orient, tmp / "base", args.tile, args.stride)
        t_base = time.perf_counter() - t0
        assert n == stats["NumTiles"]
        print(f"scene {args.size}x{args.size} px, tile {args.tile}, stride {args.stride}: {n} tiles")
        print(f"export:   {n / t_export:8.1f} tiles/s ({t_export:.2f} s)")
        print(f"baseline: {n / t_base:8.1f} tiles/s ({t_base:.2f} s) plain windowed read/write of the same windows")
        print(f"ratio export/baseline: {t_base / t_export:.2f} (goal >= 0.5)")
        rss = {}
        for size in (args.size, args.size * 2):
            img, lab, ori = (image, label, orient) if size == args.size else make_scene(tmp, size)
            res = subprocess.run([sys.executable, __file__, "--child", "--tile", str(args.tile), "--stride", str(args.stride), "--image", str(img), "--label", str(lab), "--orient", str(ori), "--out", str(tmp / f"rss{size}")],
                                 check=True, capture_output=True, text=True)
            rss[size] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mib"]
            print(f"peak RSS, {size}x{size} px scene: {rss[size]:.0f} MiB")
        print(f"peak RSS ratio 4x area / 1x area: {rss[args.size * 2] / rss[args.size]:.2f} (goal: flat, ~1.0)")


if __name__ == "__main__":
    main()
