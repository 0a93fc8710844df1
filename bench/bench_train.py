"""Benchmark of the training loop (step 3). Prints figures; asserts nothing.

  python bench/bench_train.py [--arch linknet|unet|linknet34_mtl] [--backbone resnet34] [--tile 256] [--batch 8] [--steps 8] [--side-channels 0] [--device cpu|cuda] [--precision auto|fp32|bf16|fp16 ...]

The demo's models: ``--arch unet --backbone resnet18 --tile 128 --batch 16 --side-channels 32 --threads 2``.
With ``ROADXFER_MALLOC=default`` in the environment glibc's malloc is left as it is
(``roadxfer.train.keep_freed_memory``), for a before/after of that setting.

* samples/s through the real training loop (DataLoader from Classified Tiles in memory,
  augmentation, loss, optimiser) versus bare training steps on tensors already in
  memory, same model and batch; their ratio (goal >= 0.9);
* per-step speed-up of the frozen encoder over full fine-tuning (goal >= 1.8x for LinkNet-34);
* with several ``--precision`` values: bare steps per precision and each one's speed-up
  over the first (``training.precision``; e.g. ``--precision fp32 auto``);
* with ``--both-cpus``: all of it as this CPU runs it, then held to AVX2 kernels in float32
  (the kernels a CPU without AVX-512 or bfloat16 runs; the clock and cores stay this machine's).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from roadxfer.data import Augment, TrainSet, load_tiles  # noqa: E402
from roadxfer.demo import write_scene  # noqa: E402
from roadxfer.labels import LabelSettings, rasterize_scene  # noqa: E402
from roadxfer.model import build_model  # noqa: E402
from roadxfer.tiles import TileSettings, export_tiles  # noqa: E402
from roadxfer import PRECISIONS  # noqa: E402
from roadxfer.device import amp_dtype, channels_last, keep_freed_memory, pick_device, precision_name, set_threads  # noqa: E402
from roadxfer.step import attach_io, make_optimizer, make_scaler, train_step  # noqa: E402
from roadxfer.train import model_spec, TrainConfig  # noqa: E402

ROAD = [{"value": 1, "name": "road", "color": [255, 0, 0]}]


def timed_steps(model, optimizer, scaler, batches, dev, cfg) -> float:
    """Seconds per step over ``batches`` (an iterable), after one warm-up step."""
    it = iter(batches)
    train_step(model, optimizer, scaler, next(it), dev, cfg)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    for batch in it:
        train_step(model, optimizer, scaler, batch, dev, cfg)
        n += 1
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def both_cpus(argv: list[str]) -> None:
    """This benchmark as this CPU runs it, then held to AVX2 in float32, one after the other (never at once)."""
    import os
    import subprocess

    argv = [a for a in argv if a != "--both-cpus"]
    plain = [a for i, a in enumerate(argv) if a != "--precision" and (i == 0 or argv[i - 1] != "--precision")]
    for label, env, extra in (("this CPU, as it is", {}, []), ("held to AVX2, float32", AVX2_ENV, ["--precision", "fp32"])):
        print(f"== {label} {' '.join(f'{k}={v}' for k, v in env.items())}", flush=True)
        subprocess.run([sys.executable, __file__, *(plain + extra if extra else argv)], env={**os.environ, **env}, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet34")
    ap.add_argument("--arch", default="linknet")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--side-channels", type=int, default=0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default=None)
    ap.add_argument("--precision", nargs="+", default=["auto"], choices=PRECISIONS)
    ap.add_argument("--both-cpus", action="store_true",
                    help="run twice, side by side: as this CPU runs it, and held to AVX2 kernels in float32 (ATEN_CPU_CAPABILITY=avx2, "
                         "ONEDNN_MAX_CPU_ISA=AVX2, --precision fp32), as a CPU without AVX-512 or bfloat16 runs it")
    args = ap.parse_args()
    if args.both_cpus:
        both_cpus(sys.argv[1:])
        return
    workers = set_threads(args.threads)
    dev = pick_device(args.device)
    cfg = TrainConfig(arch=args.arch, backbone=args.backbone, batch_size=args.batch, precision=args.precision[0], side_channels=args.side_channels)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        write_scene(21, tmp / "s.tif", tmp / "s.gpkg", size=1024)
        rasterize_scene(tmp / "s.tif", tmp / "s.gpkg", tmp / "l.tif", tmp / "o.tif", tmp / "s.json", LabelSettings())
        export_tiles(tmp / "s.tif", tmp / "l.tif", tmp / "o.tif", tmp / "t", TileSettings(tile_size=args.tile, stride=args.tile // 4, keep="all"))
        data = load_tiles([tmp / "t"], ROAD)
    n_needed = args.batch * (args.steps + 1)
    idx = torch.arange(n_needed) % len(data)
    dataset = TrainSet(data, idx.numpy(), Augment(), 10, 0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=workers, pin_memory=dev.type == "cuda")
    in_memory = [tuple(t.to(dev) for t in b) for b in torch.utils.data.DataLoader(dataset, batch_size=args.batch, drop_last=True)]

    def fresh(frozen: bool, cfg: TrainConfig = cfg):
        torch.manual_seed(0)
        model = build_model(model_spec(cfg, bands=3, n_classes=1, pretrained_spec=None)).to(dev)
        if channels_last(dev):
            model.to(memory_format=torch.channels_last)
        attach_io(model, [0.5] * 3, [0.25] * 3, 10, dev)
        model.freeze_encoder(frozen)
        model.train()
        return model, make_optimizer(model, cfg, encoder_trainable=not frozen), make_scaler(dev, amp_dtype(dev, cfg.precision))

    def dtype_name(precision: str) -> str:
        return precision_name(amp_dtype(dev, precision))

    print(f"device {dev}, {args.arch}/{args.backbone}, tile {args.tile}, batch {args.batch}, {args.steps} timed steps, torch threads {torch.get_num_threads()}, loader workers {workers}, "
          f"precision {args.precision[0]} ({dtype_name(args.precision[0])}), side network {args.side_channels or 'none'}, "
          f"malloc {'keeps freed memory' if keep_freed_memory() else 'as glibc sets it'}")
    res = {}
    for frozen in (False, True):
        m, o, s = fresh(frozen)
        bare = timed_steps(m, o, s, in_memory, dev, cfg)
        m, o, s = fresh(frozen)
        loop = timed_steps(m, o, s, loader, dev, cfg)
        res[frozen] = bare
        label = "frozen encoder" if frozen else "full fine-tune"
        print(f"{label:15s} real loop {args.batch / loop:7.2f} samples/s   bare step {args.batch / bare:7.2f} samples/s   ratio {bare / loop:.2f} (goal >= 0.9)")
    print(f"frozen-encoder speed-up per step: {res[False] / res[True]:.2f}x (goal >= 1.8x for LinkNet-34)")
    for precision in args.precision[1:]:
        other = TrainConfig(arch=args.arch, backbone=args.backbone, batch_size=args.batch, precision=precision, side_channels=args.side_channels)
        for frozen in (False, True):
            m, o, s = fresh(frozen, other)
            t = timed_steps(m, o, s, in_memory, dev, other)
            label = "frozen encoder" if frozen else "full fine-tune"
            print(f"precision {precision} ({dtype_name(precision)}), {label:15s} bare step {args.batch / t:7.2f} samples/s, "
                  f"{res[frozen] / t:.2f}x the {args.precision[0]} ({dtype_name(args.precision[0])}) step")


if __name__ == "__main__":
    main()
