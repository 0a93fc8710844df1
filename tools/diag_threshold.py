"""Pixel F1 per road type of a model's probability raster at several decision thresholds.

  python tools/diag_threshold.py [RUN_DIR] --model transfer --scenes demo_tune_01 ... [--retention demo_retain_01 ...]

RUN_DIR: a checkout where the scenes were classified (default: this one; e.g. after
``--configfile config/demo.yaml experiments/tune.yaml``). Scored as the evaluation does (buffered
reference, each pixel given to the nearest road type, counts summed over the scenes),
on ``probability.tif`` thresholded at each value instead of the class raster. Tells
whether false roads are doubtful (a higher ``classify.threshold`` would drop them) or
confident. Prints figures; asserts nothing, chooses nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from roadxfer.evaluate import EvalSettings, mask_metrics, ratios, reference_masks  # noqa: E402
from roadxfer.raster import image_info  # noqa: E402

PROB_SCALE = 250  # uint8 probability rasters (classify.probability_dtype): 0-250 = P 0-1, 255 nodata; float32: 0-1, NaN nodata


def sweep(run: Path, model: str, scenes: list[str], thresholds: list[float], buffer_radius: float) -> tuple[dict, dict]:
    """Summed counts per threshold and road type, and each scene's per-type F1 per threshold."""
    settings = EvalSettings(buffer_radius=buffer_radius)
    total: dict[float, dict[str, dict[str, int]]] = {t: {} for t in thresholds}
    per_scene: dict[str, dict[float, dict[str, float]]] = {}
    for scene in scenes:
        image = run / "resources" / "demo" / f"{scene}.tif"
        refs, _ = reference_masks(image_info(image), image.with_suffix(".gpkg"), settings, layer="roads")
        with rasterio.open(run / "results" / "classified" / model / scene / "probability.tif") as src:
            prob = src.read(1)
        scaled = prob.dtype == np.uint8
        valid = prob != 255 if scaled else ~np.isnan(prob)
        for t in thresholds:
            found = mask_metrics((prob >= (round(t * PROB_SCALE) if scaled else t)) & valid, refs, valid, 3.0)
            for road_type, c in found.items():
                acc = total[t].setdefault(road_type, dict.fromkeys(c, 0))
                for k, v in c.items():
                    acc[k] += v
                per_scene.setdefault(scene, {}).setdefault(t, {})[road_type] = ratios(c)["f1"]
    return total, per_scene


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", default=".", type=Path)
    ap.add_argument("--model", default="transfer")
    ap.add_argument("--scenes", nargs="+", required=True)
    ap.add_argument("--retention", nargs="*", default=[], help="base-domain scenes, summed apart (paved F1 per scene too)")
    ap.add_argument("--thresholds", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.9])
    ap.add_argument("--buffer-radius", type=float, default=2.0, help="metres, as evaluation.buffer_radius")
    args = ap.parse_args()
    for group, scenes in (("test", args.scenes), ("retention", args.retention)):
        if not scenes:
            continue
        total, per_scene = sweep(args.run, args.model, scenes, args.thresholds, args.buffer_radius)
        print(f"{args.model}, {group} scenes {', '.join(scenes)}: pixel F1 per road type")
        for t, types in total.items():
            print(f"  P >= {t:.2f}  " + "  ".join(f"{k} {ratios(c)['f1']:.3f}" for k, c in sorted(types.items())))
        if group == "retention":
            for scene, by_t in per_scene.items():
                print(f"  {scene} paved F1: " + "  ".join(f"{t:.2f}: {v.get('paved', np.nan):.3f}" for t, v in by_t.items()))


if __name__ == "__main__":
    main()
