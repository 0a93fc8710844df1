"""Check and benchmark of the CUDA path on a GPU node. Prints figures; asserts nothing.

  python bench/bench_gpu.py --package resources/pretrained/paved-unet-r18 \\
      --tiles results/tiles/demo_transfer_0{1,2,3} --rehearsal results/tiles/demo_base_01 \\
      --training training.json --scene resources/demo/demo_final_01.tif \\
      --label results/labels/demo_final_01/label.tif [--device cuda] [--out DIR]

``training.json``: the transfer model's merged ``training`` settings (as the workflow's
``train_model`` rule passes them; ``python bench/bench_gpu.py --print-training`` writes
them from ``config/config.yaml`` + ``config/demo.yaml``).

1. transfer training from ``--package`` on ``--device``: seconds per epoch, best
   validation metrics, and whether the frozen encoder came out unchanged;
2. the new package classifies ``--scene`` on ``--device`` (precision ``auto``) and on the
   CPU in float32: largest probability difference, agreement of the two road masks (IoU),
   pixel F1 of each against ``--label`` (value 1 road, 255 ignored);
3. classification throughput on the scene tiled up to ``--big`` pixels a side (``--tile``, ``--batches``);
4. bare training steps per second (full fine-tune and frozen encoder, float32 and ``auto``).

Needs only rasterio, torch and segmentation-models-pytorch (no GDAL vector stack), so it
runs on a bare GPU node with a few wheels.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from roadxfer.classify import ClassifySettings, classify_scene  # noqa: E402
from roadxfer.data import Augment, TileData, TrainSet, load_tiles  # noqa: E402
from roadxfer.package import load_package  # noqa: E402
from roadxfer.device import amp_dtype, channels_last, pick_device, precision_name  # noqa: E402
from roadxfer.step import attach_io, make_optimizer, make_scaler, train_step  # noqa: E402
from roadxfer.train import TrainConfig, train  # noqa: E402

ROAD = [{"value": 1, "name": "road", "color": [255, 0, 0]}]


def merged_training(configs: list[Path], model: str) -> dict:
    """The ``training`` settings the workflow gives ``model`` (rules/common.smk, model_training)."""
    import yaml
    from snakemake.utils import update_config  # how Snakemake merges --configfile files (not needed on the GPU node)

    cfg: dict = {}
    for path in configs:
        update_config(cfg, yaml.safe_load(path.read_text()) or {})
    models = cfg["models"]
    merged = {**cfg["training"], **(models[model].get("training") or {})}
    merged["freeze"] = bool(models[model].get("freeze", False))
    merged["orientation_bin_size"] = cfg["labels"]["orientation_bin_size"]
    return merged


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def encoder_change(before: Path, after: Path) -> float:
    """Largest absolute change of any encoder tensor (weights and BatchNorm statistics)."""
    a = load_package(before).model.encoder.state_dict()
    b = load_package(after).model.encoder.state_dict()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def f1(pred: np.ndarray, label: np.ndarray) -> float:
    ok = label != 255
    p, t = pred[ok], label[ok] == 1
    tp = float(np.sum(p & t))
    return 2 * tp / max(float(p.sum() + t.sum()), 1.0)


def tiled_up(scene: Path, size: int, out: Path) -> Path:
    """The scene repeated to ``size`` pixels a side (same georeferencing origin and cell size)."""
    with rasterio.open(scene) as src:
        img, profile = src.read(), src.profile
    reps = (1, -(-size // img.shape[1]), -(-size // img.shape[2]))
    big = np.tile(img, reps)[:, :size, :size]
    profile.update(width=size, height=size, tiled=True, blockxsize=512, blockysize=512, compress="deflate", BIGTIFF="IF_SAFER")
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(big)
    return out


def step_rate(pkg_path: Path, data: TileData, cfg: TrainConfig, dev: torch.device, precision: str, frozen: bool, batch: int, steps: int) -> float:
    """Samples/s of bare training steps on batches already on the device (after two warm-up steps)."""
    cfg = TrainConfig(**{**cfg.__dict__, "precision": precision, "batch_size": batch})
    pkg = load_package(pkg_path, device=dev)
    model = pkg.model
    attach_io(model, pkg.mean, pkg.std, cfg.orientation_bin_size, dev)
    if channels_last(dev):
        model.to(memory_format=torch.channels_last)
    model.freeze_encoder(frozen)
    model.train()
    idx = np.arange(batch * (steps + 2)) % len(data)
    loader = torch.utils.data.DataLoader(TrainSet(data, idx, Augment(), cfg.orientation_bin_size, 0), batch_size=batch, drop_last=True)
    batches = [tuple(t.to(dev) for t in b) for b in loader]
    opt, scaler = make_optimizer(model, cfg, encoder_trainable=not frozen), make_scaler(dev, amp_dtype(dev, precision))
    for b in batches[:2]:
        train_step(model, opt, scaler, b, dev, cfg)
    sync(dev)
    t0 = time.perf_counter()
    for b in batches[2:]:
        train_step(model, opt, scaler, b, dev, cfg)
    sync(dev)
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--print-training", nargs="*", type=Path, metavar="CONFIG", help="write the transfer model's merged training settings as JSON and stop")
    ap.add_argument("--package", type=Path)
    ap.add_argument("--tiles", nargs="+", type=Path)
    ap.add_argument("--rehearsal", nargs="*", type=Path, default=[])
    ap.add_argument("--training", type=Path)
    ap.add_argument("--scene", type=Path)
    ap.add_argument("--label", type=Path)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--big", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tile", type=int, nargs="+", default=[None], help="throughput: classification tile sizes (default: the model's)")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 64], help="throughput: classification batch sizes")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=["train", "compare", "throughput", "steps"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.print_training is not None:
        configs = args.print_training or [Path("config/config.yaml"), Path("config/demo.yaml")]
        print(json.dumps(merged_training(configs, "transfer"), indent=1))
        return
    dev = pick_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), device {dev} ({name}), precision auto = {precision_name(amp_dtype(dev, 'auto'))}, "
          f"{args.threads} CPU threads", flush=True)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig.from_dict(json.loads(args.training.read_text()))
    pkg = out / "transfer"

    if "train" not in args.skip:
        t0 = time.perf_counter()
        best = train(args.tiles, pkg, cfg, classes=ROAD, pretrained=args.package, workdir=out / "checkpoints", threads=args.threads,
                     device=str(dev), rehearsal=args.rehearsal)
        wall = time.perf_counter() - t0
        print(f"[train] {cfg.epochs} epochs in {wall:.1f} s on {dev}; best epoch {best['epoch']}: val road IoU {best['val_road_iou']:.4f}, "
              f"direction {best['val_orient_acc']:.3f} (within one bin {best['val_orient_acc1']:.3f})", flush=True)
        print(f"[train] frozen encoder: largest change of an encoder tensor {encoder_change(args.package, pkg):.3g} (0: unchanged)", flush=True)
    if "compare" not in args.skip:
        label = read(args.label)
        res = {}
        for where, precision in ((str(dev), "auto"), ("cpu", "fp32")):
            d = out / f"classify-{where.replace(':', '')}-{precision}"
            d.mkdir(exist_ok=True)
            s = classify_scene(args.scene, pkg, d / "class.tif", out_probability=d / "p.tif", out_direction=d / "direction.tif",
                               settings=ClassifySettings(device=where, precision=precision, probability_dtype="float32"), threads=args.threads)
            res[where, precision] = (read(d / "class.tif"), read(d / "p.tif"), read(d / "direction.tif"))
            print(f"[compare] {where} {precision}: {s['seconds']:.2f} s, pixel F1 against the label {f1(res[where, precision][0] == 1, label):.4f}", flush=True)
        (ca, pa, da), (cb, pb, db) = res.values()
        both = np.isfinite(pa) & np.isfinite(pb)
        ma, mb = ca == 1, cb == 1
        iou = float(np.sum(ma & mb)) / max(float(np.sum(ma | mb)), 1.0)
        road = ma & mb
        print(f"[compare] {dev} auto vs cpu fp32: P(road) largest difference {np.abs(pa - pb)[both].max():.4f}, mean {np.abs(pa - pb)[both].mean():.5f}; "
              f"road masks IoU {iou:.4f}; direction bin equal on {float(np.mean(da[road] == db[road])) if road.any() else float('nan'):.3f} of shared road pixels", flush=True)
    if "throughput" not in args.skip:
        big = tiled_up(args.scene, args.big, out / "big.tif")
        for tile, batch in ((t, b) for t in args.tile for b in args.batches):
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            s = classify_scene(big, pkg if pkg.exists() else args.package, out / "big-class.tif", out_probability=out / "big-p.tif", out_direction=out / "big-d.tif",
                               settings=ClassifySettings(device=str(dev), batch_size=batch, tile_size=tile), threads=args.threads)
            mem = f", peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB" if dev.type == "cuda" else ""
            print(f"[throughput] {args.big}x{args.big} scene, tile {tile or 'of the model'}, batch {batch}: {s['tiles']} tiles in {s['seconds']:.1f} s, {s['megapixels_per_s']:.2f} Mpx/s{mem}; "
                  f"then COGs written in {s['write_seconds']:.1f} s", flush=True)
    if "steps" not in args.skip:
        data = load_tiles(args.tiles, ROAD)
        for precision in ("fp32", "auto"):
            for frozen in (False, True):
                for batch in (cfg.batch_size, 64):
                    rate = step_rate(args.package, data, cfg, dev, precision, frozen, batch, args.steps)
                    print(f"[steps] {precision} ({precision_name(amp_dtype(dev, precision))}), {'frozen encoder' if frozen else 'full fine-tune'}, batch {batch}: "
                          f"{rate:.1f} samples/s", flush=True)
    print("geopandas imported:", "geopandas" in sys.modules)


if __name__ == "__main__":
    main()
