"""Benchmark of centreline vectorisation: pieces, lengths, APLS, time and memory. Prints figures; asserts nothing.

  python bench/bench_centrelines.py [--code DIR] [--data /tmp/roadxfer-bench-centrelines]

Cases (rasters made once and cached in --data; each vectorisation runs in a fresh process):

* demo_test_01 / demo_test_02 (seeds 101, 102, 1,024 px at 0.3 m): classified by the
  reference tool's own pretrained road model (tests/data/arcgis-mtre-linknet34), which
  has never seen such scenes: a real, noisy prediction;
* the SpaceNet Vegas scene (tests/data/spacenet-vegas), classified by the same model;
* the same three scenes' truth (lines buffered by 2 m) degraded: 30 % of road pixels
  dropped, 1 % speckle, a 6 m gap every 40 m of road, probabilities 0.4-1 on roads and
  0-0.6 on speckle;
* noise: a 400 x 400 px scene (0.45 m) of pure probability noise (a model not suited to
  the imagery), truth an empty network.

Figures per case: lines, lines per km of truth (and the truth's own, as drawn and noded at
its crossings: one line per edge of its graph, as roadxfer writes them), median line length,
APLS against the truth (10 m spacing, 4 m snap), seconds and peak RSS of vectorisation
plus APLS. ``--code DIR`` runs another checkout's roadxfer (before/after tables);
``--model`` classifies the scenes with another package (e.g. the demo's
transfer model, ``results/models/transfer``); ``--no-direction`` vectorises the model's predictions without the direction raster the
model predicts (the degraded truth and noise cases have none).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "data" / "arcgis-mtre-linknet34"
VEGAS = ROOT / "tests" / "data" / "spacenet-vegas"


def _write(path: Path, data: np.ndarray, like: dict, nodata: int | None = 255) -> None:
    import rasterio

    from roadxfer.raster import GTIFF_PROFILE

    prof = {**GTIFF_PROFILE, "width": like["width"], "height": like["height"], "crs": like["crs"], "transform": like["transform"], "count": 1, "dtype": "uint8", "nodata": nodata}
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data.astype(np.uint8), 1)


def degraded_truth(image: Path, truth: Path, folder: Path, seed: int) -> None:
    """Truth buffered by 2 m, with dropped pixels, speckle and regular gaps; class and probability rasters."""
    import geopandas as gpd
    import rasterio
    import shapely
    from rasterio import features

    from roadxfer.labels import buffer_in_crs

    rng = np.random.default_rng(seed)
    with rasterio.open(image) as src:
        like = {"width": src.width, "height": src.height, "crs": src.crs, "transform": src.transform}
    lines = gpd.read_file(truth)
    metric = lines.to_crs(lines.estimate_utm_crs()) if lines.crs.is_geographic else lines
    gaps = []
    for line in metric.geometry:  # a 6 m gap every 40 m
        for d in np.arange(20.0, line.length - 3, 40.0):
            gaps.append(line.interpolate(d).buffer(3.0))
    gap_geoms = gpd.GeoSeries(gaps, crs=metric.crs).to_crs(like["crs"]) if gaps else []
    road = features.rasterize(((g, 1) for g in buffer_in_crs(lines, 2.0, like["crs"])), out_shape=(like["height"], like["width"]), transform=like["transform"], dtype="uint8").astype(bool)
    if len(gap_geoms):
        road &= ~features.rasterize(((g, 1) for g in gap_geoms), out_shape=road.shape, transform=like["transform"], dtype="uint8").astype(bool)
    road &= rng.random(road.shape) >= 0.3
    speck = ~road & (rng.random(road.shape) < 0.01)
    prob = np.where(road, rng.uniform(0.4, 1.0, road.shape), np.where(speck, rng.uniform(0.0, 0.6, road.shape), 0.0))
    _write(folder / "probability.tif", np.round(prob * 250), like)
    _write(folder / "classes.tif", (prob >= 0.5).astype(np.uint8), like)
    shapely  # noqa: B018


def noise_case(folder: Path) -> None:
    from rasterio.transform import from_origin

    rng = np.random.default_rng(7)
    like = {"width": 400, "height": 400, "crs": "EPSG:32611", "transform": from_origin(600_000, 4_000_000, 0.45, 0.45)}
    prob = rng.random((400, 400)) ** 1.5  # a third of the pixels above 0.5
    _write(folder / "probability.tif", np.round(prob * 250), like)
    _write(folder / "classes.tif", (prob >= 0.5).astype(np.uint8), like)
    import geopandas as gpd

    gpd.GeoDataFrame({"road_type": []}, geometry=[], crs="EPSG:32611").to_file(folder / "truth.gpkg", layer="roads")


def prepare(data: Path, model: Path = MODEL) -> dict[str, dict[str, str]]:
    sys.path.insert(0, str(ROOT))
    from roadxfer.classify import ClassifySettings, classify_scene
    from roadxfer.demo import write_scene

    cases = {}
    scenes = {"demo_test_01": 101, "demo_test_02": 102, "vegas": None}
    for name, seed in scenes.items():
        folder = data / name
        folder.mkdir(parents=True, exist_ok=True)
        if seed is not None:
            image, truth = folder / "image.tif", folder / "truth.gpkg"
            if not image.exists():
                write_scene(seed, image, truth, size=1024)
        else:
            image, truth = VEGAS / "RGB-PanSharpen_AOI_2_Vegas_img0.tif", VEGAS / "AOI_2_Vegas_img0.geojson"
        pred = folder / ("prediction" if model == MODEL else f"prediction-{model.name}")
        if not (pred / "direction.tif").exists():  # the model's road direction too (direction-guided bridging)
            classify_scene(image, model, pred / "classes.tif", out_probability=pred / "probability.tif", out_direction=pred / "direction.tif",
                           settings=ClassifySettings(threshold=0.5))
        cases[f"{name} (model)"] = {"folder": str(pred), "truth": str(truth)}
        deg = folder / "degraded"
        if not (deg / "classes.tif").exists():
            deg.mkdir(exist_ok=True)
            degraded_truth(image, truth, deg, seed or 5)
        cases[f"{name} (degraded truth)"] = {"folder": str(deg), "truth": str(truth)}
    noise = data / "noise"
    if not (noise / "classes.tif").exists():
        noise.mkdir(parents=True, exist_ok=True)
        noise_case(noise)
    cases["noise 400 px"] = {"folder": str(noise), "truth": str(noise / "truth.gpkg")}
    return cases


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(args.code))
    sys.path.insert(1, str(ROOT / "bench"))
    from peak import peak_rss_mib
    import geopandas as gpd

    from roadxfer.apls import apls
    from roadxfer.centrelines import centrelines_from_raster

    case = json.loads(args.case)
    folder = Path(case["folder"])
    out = folder / f"centrelines-{hashlib.sha256(str(args.code).encode()).hexdigest()[:8]}.gpkg"  # one per checkout, rewritten each run
    t0 = time.perf_counter()
    guide = {"direction": folder / "direction.tif"} if args.direction and (folder / "direction.tif").exists() else {}
    centrelines_from_raster(folder / "classes.tif", out, classes=[{"value": 1, "name": "road"}], min_length=5.0, bridge=10.0,
                            probability=folder / "probability.tif", probability_scale=250.0, **guide)
    t_vec = time.perf_counter() - t0
    lines = gpd.read_file(out, layer="centrelines")
    truth = gpd.read_file(case["truth"])
    utm = truth.estimate_utm_crs() if len(truth) and truth.crs.is_geographic else (truth.crs if len(truth) else lines.crs)
    truth_m, lines_m = truth.to_crs(utm), (lines.to_crs(utm) if len(lines) else lines)
    score = apls(list(truth_m.geometry), list(lines_m.geometry), spacing=10.0, snap=4.0, max_pairs=1000)["apls"] if len(truth_m) else float("nan")
    lengths = lines_m.length.to_numpy() if len(lines_m) else np.zeros(0)
    truth_km = float(truth_m.length.sum()) / 1000
    import shapely

    truth_edges = len(shapely.get_parts(shapely.line_merge(shapely.union_all(list(truth_m.geometry))))) if len(truth_m) else 0
    print(json.dumps({"lines": len(lines), "truth_lines": len(truth_m), "truth_edges": truth_edges, "truth_km": truth_km, "km": float(lengths.sum()) / 1000,
                      "median_m": float(np.median(lengths)) if len(lengths) else 0.0, "truth_median_m": float(truth_m.length.median()) if len(truth_m) else 0.0,
                      "apls": score, "seconds_vectorise": t_vec, "seconds": time.perf_counter() - t0,
                      "peak_rss_mib": peak_rss_mib()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/tmp/roadxfer-bench-centrelines"))
    ap.add_argument("--code", type=Path, default=ROOT)
    ap.add_argument("--model", type=Path, default=MODEL, help="package that classifies the scenes (default: the reference tool's model)")
    ap.add_argument("--no-direction", dest="direction", action="store_false",
                    help="vectorise the model's predictions without their direction raster (as before direction-guided bridging)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    cases = prepare(args.data, args.model)
    print(f"code: {args.code}; model {args.model}; model predictions bridged {'along their direction raster' if args.direction else 'by the skeleton only'}")
    print("| case | lines | lines/km (truth as drawn; truth noded at crossings) | median m (truth) | km found (truth) | APLS | s vectorise | s + APLS | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, case in cases.items():
        cmd = [sys.executable, __file__, "--child", "--case", json.dumps(case), "--code", str(args.code)] + ([] if args.direction else ["--no-direction"])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"| {name} | failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:120]} |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        per_km = r["lines"] / r["truth_km"] if r["truth_km"] else float("nan")
        truth_per_km = r["truth_lines"] / r["truth_km"] if r["truth_km"] else float("nan")
        edges_per_km = r.get("truth_edges", 0) / r["truth_km"] if r["truth_km"] else float("nan")
        print(f"| {name} | {r['lines']} | {per_km:.1f} ({truth_per_km:.1f}; {edges_per_km:.1f}) | {r['median_m']:.1f} ({r['truth_median_m']:.1f}) | {r['km']:.2f} ({r['truth_km']:.2f}) | "
              f"{r['apls']:.3f} | {r['seconds_vectorise']:.1f} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
