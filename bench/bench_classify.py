"""Benchmark of whole-scene classification (step 4). Prints figures; asserts nothing.

  python bench/bench_classify.py [--size 1024] [--backbone resnet34] [--tile 256] [--batch 8] [--device cuda] [--no-direction] [--no-background-io] [--precision auto]

* tiles/s through the whole classification (read, normalise, model, blend, write)
  versus bare model forward on tensors in memory, same model, batch and device
  (goal >= 0.9);
* time and peak RSS for scenes of 1x, 4x and 16x the area (goal: time linear, peak RSS
  <= 1.25x from 1x to 16x), each in a fresh process; megapixels per second.

By default the road direction is predicted and written too, as the workflow does
(``direction.tif``: the orientation decoder runs); ``--no-direction`` leaves it out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import make_package, tiled_demo_image  # noqa: E402
from peak import peak_rss_mib  # noqa: E402
from roadxfer.classify import ClassifySettings, classify_scene, model_predict_fn  # noqa: E402
from roadxfer.package import load_package  # noqa: E402
from roadxfer import PRECISIONS  # noqa: E402
from roadxfer.device import amp_dtype, pick_device, precision_name, set_threads  # noqa: E402


def child(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    s = classify_scene(args.image, args.package, args.out, out_probability=args.out.with_name("p.tif"),
                       out_direction=args.out.with_name("d.tif") if args.direction else None,
                       settings=ClassifySettings(batch_size=args.batch, device=args.device, background_io=args.background_io, precision=args.precision), threads=args.threads)
    print(json.dumps({"seconds": s["seconds"], "write_seconds": s["write_seconds"], "tiles": s["tiles"], "peak_rss_mib": peak_rss_mib()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="side of the 1x scene in pixels")
    ap.add_argument("--arch", default="linknet")
    ap.add_argument("--backbone", default="resnet34")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-direction", dest="direction", action="store_false", help="classes and probability only (no orientation decoder)")
    ap.add_argument("--no-background-io", dest="background_io", action="store_false", help="read and write in the model's thread (classify.background_io: false)")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS, help="classify.precision (auto: bfloat16 on CPUs with AMX or AVX512-BF16 and on CUDA)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--image", type=Path)
    ap.add_argument("--package", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    set_threads(args.threads)
    dev = pick_device(args.device)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pkg_path = make_package(tmp, args.backbone, args.tile, arch=args.arch)
        pkg = load_package(pkg_path, device=dev)
        predict = model_predict_fn(pkg, dev, direction=args.direction, precision=args.precision)
        x = torch.rand(args.batch, 3, args.tile, args.tile, device=dev)
        predict(x)
        n = 6
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            out = predict(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        bare = n * args.batch / (time.perf_counter() - t0)
        del out
        print(f"device {dev}, {args.arch}/{args.backbone}, tile {args.tile} (overlap {args.tile // 4}), batch {args.batch}, threads {args.threads}, "
              f"direction {'on' if args.direction else 'off'}, background I/O {'on' if args.background_io else 'off'}, "
              f"precision {args.precision} ({precision_name(amp_dtype(dev, args.precision))})")
        print(f"bare model forward: {bare:8.2f} tiles/s ({bare * args.tile**2 / 1e6:.2f} Mpx/s of tiles)")
        rows = []
        for factor in (1, 2, 4):
            size = args.size * factor
            image = tiled_demo_image(tmp / f"s{size}.tif", size)
            cmd = [sys.executable, __file__, "--child", "--image", str(image), "--package", str(pkg_path), "--out", str(tmp / f"c{size}.tif"), "--batch", str(args.batch), "--threads", str(args.threads), "--precision", args.precision]
            if args.device:
                cmd += ["--device", args.device]
            if not args.direction:
                cmd += ["--no-direction"]
            if not args.background_io:
                cmd += ["--no-background-io"]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            rows.append((factor * factor, size, res))
            tps = res["tiles"] / res["seconds"]
            print(f"{factor * factor:2d}x area {size}x{size}: {res['tiles']:5d} tiles in {res['seconds']:7.1f} s  {tps:7.2f} tiles/s  {size * size / res['seconds'] / 1e6:6.2f} Mpx/s  peak RSS {res['peak_rss_mib']:.0f} MiB  whole/bare {tps / bare:.2f}  "
                  f"then COGs written in {res['write_seconds']:.1f} s")
        t1, t16 = rows[0][2]["seconds"] / rows[0][2]["tiles"], rows[-1][2]["seconds"] / rows[-1][2]["tiles"]
        print(f"seconds per tile 16x / 1x: {t16 / t1:.2f} (1.0 = linear time)")
        print(f"peak RSS 16x / 1x: {rows[-1][2]['peak_rss_mib'] / rows[0][2]['peak_rss_mib']:.2f} (goal <= 1.25)")
        print(f"whole classification / bare forward at 16x: {rows[-1][2]['tiles'] / rows[-1][2]['seconds'] / bare:.2f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
