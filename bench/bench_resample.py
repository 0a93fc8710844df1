"""Benchmark of classification with on-the-fly resampling to the model's cell size. Prints figures; asserts nothing.

  python bench/bench_resample.py [--size 1024] [--backbone resnet18] [--tile 256] [--threads 2]

One 0.3 m scene, classified (each run in a fresh process) by packages that differ only in
their recorded cell size:

* model at 0.3 m, ``resample: off``: the direct path (no warping);
* model at 0.3 m, ``resample: always``: the model-grid path on the scene's own grid, i.e. the
  cost of the two warps and the scratch raster alone;
* models at 0.45 m and 0.2 m, ``resample: auto``: the scene coarsened (fewer pixels for the
  model) and refined (more), outputs written back on the 0.3 m grid.

Seconds of the first run in the process and of a second (warm) run, megapixels per second
(warm) of the scene and of the model's grid, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import make_package, tiled_demo_image  # noqa: E402
from peak import peak_rss_mib  # noqa: E402
from roadxfer.classify import ClassifySettings, classify_scene  # noqa: E402



def child(args: argparse.Namespace) -> None:
    runs = [classify_scene(args.image, args.package, args.out.with_name(f"c{i}.tif"), out_probability=args.out.with_name(f"p{i}.tif"),
                           settings=ClassifySettings(resample=args.resample), threads=args.threads) for i in range(2)]
    print(json.dumps({"first": runs[0]["seconds"], "seconds": runs[1]["seconds"], "tiles": runs[1]["tiles"],
                      "peak_rss_mib": peak_rss_mib()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--image", type=Path)
    ap.add_argument("--package", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--resample", default="auto")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        image = tiled_demo_image(tmp / "scene.tif", args.size, cell=0.3)
        print(f"scene {args.size}x{args.size} px at 0.3 m; linknet/{args.backbone}, tile {args.tile}, {args.threads} threads, CPU")
        print("| model cell | resample | model grid px | tiles | s (first run) | s (warm) | scene Mpx/s | model-grid Mpx/s | peak RSS MiB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for cell, mode in ((0.3, "off"), (0.3, "always"), (0.45, "auto"), (0.2, "auto")):
            pkg = make_package(tmp, args.backbone, args.tile, cell=cell, name=f"bench_{cell}")
            out = tmp / f"c_{cell}_{mode}" / "c.tif"
            cmd = [sys.executable, __file__, "--child", "--image", str(image), "--package", str(pkg), "--out", str(out), "--resample", mode, "--threads", str(args.threads)]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            side = -(-args.size * 0.3 // cell) if mode != "off" else args.size
            print(f"| {cell} | {mode} | {int(side)} | {r['tiles']} | {r['first']:.2f} | {r['seconds']:.2f} | {args.size**2 / r['seconds'] / 1e6:.3f} | {side**2 / r['seconds'] / 1e6:.3f} | {r['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
