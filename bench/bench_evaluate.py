"""Benchmark of evaluation (step 5) on big scenes. Prints figures; asserts nothing.

  python bench/bench_evaluate.py [--side 4096] [--factors 1 4 16] [--lines 5000] [--code DIR]

For each area factor k a scene of side ``side * sqrt(k)`` px (0.3 m cells, EPSG:32611) is
made with ``lines * k / max(factors)`` reference lines of three road types (so the largest
scene has ``--lines`` lines), a prediction that is the truth shifted by one pixel with a
tenth of its lines missing and speckle added, and centrelines that are the reference
lines offset by 0.5 m with the same lines missing. Each evaluation runs in a fresh
process; the figures are its wall time and peak RSS (ru_maxrss of the child).

``--code DIR`` runs the evaluation of another checkout (e.g. a ``git worktree`` of an
older commit) on the same data, for before/after tables. ``--mem-limit-gb`` caps the
child's address space so that a quadratic "before" fails instead of swapping.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CELL = 0.3
ORIGIN = (600_000.0, 4_000_000.0)
BLOCK = 2048


def make_scene(folder: Path, side: int, n_lines: int, seed: int = 0) -> dict[str, str]:
    """Image, labels, classified raster and centrelines of one benchmark scene (written in windows)."""
    import geopandas as gpd
    import rasterio
    import shapely
    from rasterio import features
    from rasterio.transform import from_origin
    from rasterio.windows import Window
    from rasterio.windows import bounds as window_bounds
    from rasterio.windows import transform as window_transform

    sys.path.insert(0, str(ROOT))
    from roadxfer.raster import GTIFF_PROFILE

    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: str(folder / n) for k, n in (("image", "image.tif"), ("labels", "labels.gpkg"), ("classes", "classes.tif"), ("centrelines", "centrelines.gpkg"))}
    if all(Path(p).exists() for p in paths.values()):
        return paths
    rng = np.random.default_rng(seed)
    transform = from_origin(*ORIGIN, CELL, CELL)
    extent = side * CELL
    lines = []
    for _ in range(n_lines):  # random polylines of 3-6 segments, 60-250 m long in all
        x, y = rng.uniform(0, extent, 2)
        pts = [(x, y)]
        heading = rng.uniform(0, 2 * math.pi)
        for _ in range(int(rng.integers(3, 7))):
            heading += rng.normal(0, 0.3)
            step = rng.uniform(20, 45)
            x = float(np.clip(x + step * math.cos(heading), 0, extent))
            y = float(np.clip(y + step * math.sin(heading), 0, extent))
            pts.append((x, y))
        lines.append(shapely.LineString([(ORIGIN[0] + px, ORIGIN[1] - py) for px, py in pts]))
    types = rng.choice(["paved", "unpaved", "trail"], n_lines)
    gdf = gpd.GeoDataFrame({"road_type": types, "Classvalue": 1}, geometry=lines, crs="EPSG:32611")
    gdf.to_file(paths["labels"], layer="roads")
    keep = rng.random(n_lines) >= 0.1
    pred_lines = gdf[keep].geometry.translate(CELL, -CELL)  # one pixel right and down
    offset = shapely.offset_curve(gdf[keep].geometry.to_numpy(), 0.5)
    offset = offset[~shapely.is_empty(offset)]
    gpd.GeoDataFrame({"class_value": np.ones(len(offset), np.uint8)}, geometry=offset, crs=gdf.crs).to_file(paths["centrelines"], layer="centrelines")
    buffers = shapely.buffer(pred_lines.to_numpy(), 2.0)
    tree = shapely.STRtree(buffers)
    prof = {**GTIFF_PROFILE, "width": side, "height": side, "crs": "EPSG:32611", "transform": transform}
    with rasterio.open(paths["image"], "w", **prof, count=3, dtype="uint8") as img, rasterio.open(paths["classes"], "w", **prof, count=1, dtype="uint8", nodata=255) as cls:
        for r0 in range(0, side, BLOCK):
            for c0 in range(0, side, BLOCK):
                win = Window(c0, r0, min(BLOCK, side - c0), min(BLOCK, side - r0))
                shape = (int(win.height), int(win.width))
                img.write(np.full((3, *shape), 120, np.uint8), window=win)
                hits = tree.query(shapely.box(*window_bounds(win, transform)))
                burned = features.rasterize(((buffers[i], 1) for i in hits), out_shape=shape, transform=window_transform(win, transform), dtype="uint8") if len(hits) else np.zeros(shape, np.uint8)
                burned[rng.random(shape) < 0.002] = 1  # speckle
                cls.write(burned, 1, window=win)
    return paths


def child(args: argparse.Namespace) -> None:
    if args.mem_limit_gb:
        lim = int(args.mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    sys.path.insert(0, str(args.code))
    from roadxfer.evaluate import EvalSettings, evaluate_scene

    p = json.loads(args.paths)
    t0 = time.perf_counter()
    r = evaluate_scene(p["image"], p["classes"], p["centrelines"], p["labels"], Path(p["classes"]).with_name("eval.json"), EvalSettings(),
                       scene_id="bench", model="bench")
    sys.path.insert(1, str(ROOT / "bench"))
    from peak import peak_rss_mib

    out = {"seconds": time.perf_counter() - t0, "apls": r["apls"]["apls"], "f1_all": next(x["f1"] for x in r["rows"] if x["road_type"] == "all"),
           "peak_rss_mib": peak_rss_mib()}
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=4096, help="side of the 1x scene in pixels")
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--lines", type=int, default=5000, help="reference lines of the largest scene")
    ap.add_argument("--data", type=Path, default=Path("/tmp/roadxfer-bench-evaluate"))
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose roadxfer is evaluated")
    ap.add_argument("--mem-limit-gb", type=float, default=0.0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    print(f"code: {args.code}")
    print("| area | side px | lines | seconds | s per 1x area | peak RSS MiB | F1 all | APLS |")
    print("|---|---|---|---|---|---|---|---|")
    for k in args.factors:
        side = int(round(args.side * math.sqrt(k)))
        n = max(1, round(args.lines * k / max(args.factors)))
        paths = make_scene(args.data / f"x{k}", side, n)
        cmd = [sys.executable, __file__, "--child", "--paths", json.dumps(paths), "--code", str(args.code), "--mem-limit-gb", str(args.mem_limit_gb)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:  # killed or out of memory: the cap (or more) was reached
            rss_txt = f">= {args.mem_limit_gb * 1024:.0f} (cap)" if args.mem_limit_gb and "Memory" in proc.stderr else "?"
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:100]
            print(f"| {k}x | {side} | {n} | failed after {wall:.0f} s | | {rss_txt} | {tail} | |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {k}x | {side} | {n} | {r['seconds']:.1f} | {r['seconds'] / k:.1f} | {r['peak_rss_mib']:.0f} | {r['f1_all']:.3f} | {r['apls']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
