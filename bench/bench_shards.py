"""Benchmark of sharded classification. Prints figures; asserts nothing.

  python bench/bench_shards.py [--size 4096] [--shard 2048] [--backbone resnet18] [--threads 2] [--precision auto]

One scene classified in one job, then in shards of ``--shard`` px (one process per shard,
as SLURM would run them, here one after another) and joined. Per step: seconds and peak
RSS (VmHWM of its process); the sum of the shard jobs against the single job is the
overhead of the overlap tiles each shard also runs; the joined class raster is compared
with the single job's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import make_package, tiled_demo_image  # noqa: E402
from peak import peak_rss_mib  # noqa: E402
from roadxfer.classify import ClassifySettings, classify_scene, merge_shards, shard_windows  # noqa: E402
from roadxfer import PRECISIONS  # noqa: E402
from roadxfer.device import amp_dtype, pick_device, precision_name  # noqa: E402



def child(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    job = json.loads(args.job)
    settings = ClassifySettings(precision=args.precision)
    if job["kind"] == "merge":
        merge_shards(job["image"], [tuple(p) for p in job["parts"]], job["package"], job["out"] + "/classes.tif",
                     out_probability=job["out"] + "/probability.tif", out_centrelines=job["out"] + "/centrelines.gpkg", settings=settings)
    else:
        window = rasterio.windows.Window(*job["window"]) if job.get("window") else None
        classify_scene(job["image"], job["package"], job["out"] + "/classes.tif", out_probability=job["out"] + "/probability.tif",
                       out_centrelines=None if window else job["out"] + "/centrelines.gpkg", settings=settings, threads=args.threads, window=window)
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}))


def run(job: dict, threads: int, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--job", json.dumps(job), "--threads", str(threads), "--precision", precision]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--shard", type=int, default=2048)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=PRECISIONS, help="classify.precision (auto: bfloat16 on CPUs with AMX or AVX512-BF16 and on CUDA)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        image = str(tiled_demo_image(tmp / "scene.tif", args.size))
        package = str(make_package(tmp, args.backbone, 256))
        dev = pick_device(None)
        print(f"scene {args.size}x{args.size} px, shards of {args.shard} px, linknet/{args.backbone}, tile 256, {args.threads} threads, "
              f"{dev}, precision {args.precision} ({precision_name(amp_dtype(dev, args.precision))})")
        print("| step | seconds | peak RSS MiB |")
        print("|---|---|---|")
        single = run({"kind": "classify", "image": image, "package": package, "out": str(tmp / "single")}, args.threads, args.precision)
        print(f"| one job (classification + centrelines) | {single['seconds']:.1f} | {single['peak_rss_mib']:.0f} |", flush=True)
        parts, total, peak = [], 0.0, 0.0
        windows = shard_windows(args.size, args.size, args.shard)
        for name, w in windows.items():
            out = tmp / "shards" / name
            r = run({"kind": "classify", "image": image, "package": package, "out": str(out), "window": [int(w.col_off), int(w.row_off), int(w.width), int(w.height)]}, args.threads, args.precision)
            total += r["seconds"]
            peak = max(peak, r["peak_rss_mib"])
            parts.append((str(out / "classes.tif"), str(out / "probability.tif")))
        print(f"| {len(windows)} shard jobs (sum; each) | {total:.1f}; {total / len(windows):.1f} | {peak:.0f} (largest) |", flush=True)
        merged = run({"kind": "merge", "image": image, "package": package, "out": str(tmp / "merged"), "parts": parts}, args.threads, args.precision)
        print(f"| join (+ centrelines) | {merged['seconds']:.1f} | {merged['peak_rss_mib']:.0f} |")
        with rasterio.open(tmp / "single" / "classes.tif") as a, rasterio.open(tmp / "merged" / "classes.tif") as b:
            same = float(np.mean(a.read(1) == b.read(1)))
        print(f"class pixels equal to the single job's: {same:.6f}; shard work / single job: {(total + merged['seconds']) / single['seconds']:.2f}")


if __name__ == "__main__":
    main()
