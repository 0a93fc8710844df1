"""APLS of the centrelines with and without direction-guided gap bridging. Prints figures; asserts nothing.

  python bench/bench_direction.py [--seeds 201 202 203] [--models results/models/transfer ...]
                                  [--data /tmp/roadxfer-bench-direction]

Each scene (a demo scene of that seed, 1,024 px at 0.3 m, every road labelled) is
classified once per model with its road direction (cached in --data); its centrelines are
then vectorised twice from the same rasters, bridging gaps by the skeleton's direction
only (`bridge_direction: false`) and along the direction the model predicts (true), and
both are scored with APLS against the scene's roads (the workflow's evaluation settings).

The default seeds are the tuning scenes (docs/demo.md, "Seeds"): settings are chosen there.
Run it on the final test seeds (301 302) only once the settings are fixed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from roadxfer.centrelines import centrelines_from_raster  # noqa: E402
from roadxfer.settings import vectorise_settings  # noqa: E402
from roadxfer.classify import ClassifySettings, classify_scene  # noqa: E402
from roadxfer.demo import write_scene  # noqa: E402
from roadxfer.evaluate import EvalSettings, evaluate_scene  # noqa: E402
from roadxfer.package import load_package  # noqa: E402
from roadxfer.styles import complete_classes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[201, 202, 203])
    ap.add_argument("--models", nargs="+", default=[str(ROOT / "results/models/transfer")])
    ap.add_argument("--data", type=Path, default=Path("/tmp/roadxfer-bench-direction"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    settings = ClassifySettings()
    rows = []
    for model in a.models:
        pkg = load_package(model, device=torch.device("cpu"))
        classes = complete_classes(pkg.classes)
        for seed in a.seeds:
            scene = a.data / f"seed{seed}"
            scene.mkdir(parents=True, exist_ok=True)
            image, labels = scene / "image.tif", scene / "roads.gpkg"
            if not image.exists():
                write_scene(seed, image, labels)
            out = scene / Path(model).name
            out.mkdir(exist_ok=True)
            if not (out / "direction.tif").exists():
                classify_scene(image, pkg, out / "classes.tif", out_probability=out / "probability.tif", out_direction=out / "direction.tif",
                               settings=settings, threads=a.threads)
            for guided in (False, True):
                lines = out / f"centrelines_{'guided' if guided else 'plain'}.gpkg"
                t0 = time.perf_counter()
                n = centrelines_from_raster(out / "classes.tif", lines, classes=classes,
                                            probability=out / "probability.tif", direction=out / "direction.tif",
                                            settings=vectorise_settings({"bridge_direction": guided}))
                seconds = time.perf_counter() - t0
                ev = evaluate_scene(image, out / "classes.tif", lines, labels, out / f"eval_{guided}.json", EvalSettings(), scene_id=f"seed{seed}", model=Path(model).name)
                rows.append((Path(model).name, seed, guided, n, ev["apls"]["apls"], ev["apls"]["apls_truth_to_proposal"], ev["apls"]["apls_proposal_to_truth"], seconds))
                print(f"{rows[-1][0]:>12} seed {seed} {'guided' if guided else 'plain ':>6}: {n:4d} lines, APLS {rows[-1][4]:.3f} "
                      f"(truth->proposal {rows[-1][5]:.3f}, proposal->truth {rows[-1][6]:.3f}), vectorised in {seconds:.1f} s", flush=True)
    print("\n| model | seed | bridging | lines | APLS | truth→proposal | proposal→truth |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {'direction' if r[2] else 'skeleton'} | {r[3]} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.3f} |")
    for model in dict.fromkeys(r[0] for r in rows):
        for guided in (False, True):
            vals = [r[4] for r in rows if r[0] == model and r[2] == guided]
            print(f"{model}: mean APLS {'direction' if guided else 'skeleton'} {sum(vals) / len(vals):.3f} over seeds {a.seeds}")


if __name__ == "__main__":
    main()
