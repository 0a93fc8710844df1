"""Does pretraining that calls unpaved roads and trails background blind the frozen encoder to them?

  python tools/diag_pretrain_blindness.py --corpus DIR --ignore-labels DIR --transfer T1 T2 T3 \\
      --training training.json --tune S1.tif S2.tif S3.tif [--pre-epochs 10] [--device cuda]

A diagnostic, not a recipe: two base models are pretrained alike on the same corpus tiles
(``--corpus``: one Classified Tiles folder per scene, paved roads labelled), one with
the corpus as it is (unpaved roads and trails background, as in ``make pretrain``), one
with their pixels ignored (``--ignore-labels``: the same folders' ``labels/`` and
``orientation/`` with 255 there; made by :func:`ignore_other_roads`). Each is then the
frozen start of a transfer model trained on ``--transfer`` with ``--training`` (the demo's
transfer settings), and the transfer models classify the tuning scenes (``--tune``: each
beside a ``<name>.types.tif``, 1 paved, 2 unpaved, 3 trail within the label buffer).
Prints recall per road type and overall precision; asserts nothing.

Ignoring the other roads uses labels a real paved-road corpus would not have: it bounds
what a pretraining that keeps those lines visible could give the frozen transfer.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from roadxfer.classify import ClassifySettings, classify_scene  # noqa: E402
from roadxfer.device import pick_device  # noqa: E402
from roadxfer.train import train, TrainConfig  # noqa: E402

ROAD = [{"value": 1, "name": "road", "color": [255, 0, 0]}]
TYPES = {1: "paved", 2: "unpaved", 3: "trail"}


def ignore_other_roads(tiles: Path, types_raster: Path, out: Path) -> None:
    """Copy ``tiles``' label and orientation chips to ``out`` with 255 where ``types_raster`` has unpaved or trail and the label is background."""
    with rasterio.open(types_raster) as t:
        types, t_transform = t.read(1), t.transform
    for sub in ("labels", "orientation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for chip in sorted((tiles / "labels").glob("*.tif")):
        with rasterio.open(chip) as src:
            lab, profile = src.read(1), src.profile
            col0 = round((src.transform.c - t_transform.c) / t_transform.a)
            row0 = round((src.transform.f - t_transform.f) / t_transform.e)
        h, w = lab.shape
        win = np.zeros((h, w), np.uint8)
        r0, c0 = max(row0, 0), max(col0, 0)
        r1, c1 = min(row0 + h, types.shape[0]), min(col0 + w, types.shape[1])
        if r1 > r0 and c1 > c0:
            win[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = types[r0:r1, c0:c1]
        other = (win >= 2) & (lab == 0)
        lab[other] = 255
        with rasterio.open(out / "labels" / chip.name, "w", **profile) as dst:
            dst.write(lab, 1)
        ori_path = tiles / "orientation" / chip.name
        if ori_path.exists():
            with rasterio.open(ori_path) as src:
                ori, oprof = src.read(1), src.profile
            ori[other] = 255
            with rasterio.open(out / "orientation" / chip.name, "w", **oprof) as dst:
                dst.write(ori, 1)


def variant_folders(corpus: Path, ignore: Path | None, work: Path) -> list[Path]:
    """Tile folders of the corpus; with ``ignore``, copies whose labels and orientation come from there."""
    folders = sorted(p for p in corpus.iterdir() if (p / "labels").is_dir())
    if ignore is None:
        return folders
    out = []
    for f in folders:
        dst = work / f.name
        shutil.copytree(f, dst, ignore=shutil.ignore_patterns("labels", "orientation"), dirs_exist_ok=True)
        for sub in ("labels", "orientation"):
            if (ignore / f.name / sub).is_dir():
                shutil.copytree(ignore / f.name / sub, dst / sub, dirs_exist_ok=True)
        out.append(dst)
    return out


def scores(classes: Path, types: Path) -> dict[str, float]:
    with rasterio.open(classes) as c, rasterio.open(types) as t:
        road, kind = c.read(1) == 1, t.read(1)
    out = {name: float(road[kind == v].mean()) for v, name in TYPES.items() if (kind == v).any()}
    out["precision"] = float((road & (kind > 0)).sum() / max(road.sum(), 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--ignore-labels", type=Path, required=True)
    ap.add_argument("--transfer", nargs="+", type=Path, required=True)
    ap.add_argument("--training", type=Path, required=True)
    ap.add_argument("--tune", nargs="+", type=Path, required=True)
    ap.add_argument("--pre-epochs", type=int, default=10)
    ap.add_argument("--transfer-epochs", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("/tmp/blindness"))
    ap.add_argument("--variants", nargs="+", default=["background", "ignored"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    dev = pick_device(args.device)
    tr = json.loads(args.training.read_text())
    if args.transfer_epochs:
        tr["epochs"] = args.transfer_epochs
    pre = TrainConfig(arch="unet", backbone="resnet18", epochs=args.pre_epochs, batch_size=16, patience=0, val_split="scene",
                      augment={"flips": True, "rot90": True, "color_jitter": 0.25}, orientation_bin_size=tr["orientation_bin_size"])
    for variant in args.variants:
        work = args.out / variant
        folders = variant_folders(args.corpus, args.ignore_labels if variant == "ignored" else None, work / "tiles")
        t0 = time.perf_counter()
        best = train(folders, work / "base", pre, classes=ROAD, workdir=work / "ckpt-base", threads=args.threads, device=str(dev))
        print(f"[{variant}] base: {args.pre_epochs} epochs in {time.perf_counter() - t0:.0f} s, val road IoU {best['val_road_iou']:.4f}", flush=True)
        t0 = time.perf_counter()
        best = train(args.transfer, work / "transfer", TrainConfig.from_dict(tr), classes=ROAD, pretrained=work / "base", workdir=work / "ckpt-tr",
                     threads=args.threads, device=str(dev))
        print(f"[{variant}] transfer (frozen): {tr['epochs']} epochs in {time.perf_counter() - t0:.0f} s, val road IoU {best['val_road_iou']:.4f}", flush=True)
        for scene in args.tune:
            d = work / "classified" / scene.stem
            d.mkdir(parents=True, exist_ok=True)
            classify_scene(scene, work / "transfer", d / "classes.tif", settings=ClassifySettings(device=str(dev), batch_size=32), threads=args.threads)
            s = scores(d / "classes.tif", scene.with_suffix(".types.tif"))
            print(f"[{variant}] {scene.stem}: recall " + ", ".join(f"{k} {v:.3f}" for k, v in s.items() if k != "precision") + f"; precision {s['precision']:.3f}", flush=True)


if __name__ == "__main__":
    main()
