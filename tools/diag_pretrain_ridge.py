"""Does a label-free auxiliary target in pretraining give the frozen encoder features the transfer can use?

  python tools/diag_pretrain_ridge.py --tiles DIR [DIR ...] --training training.json --out DIR \\
      [--aux-weight 1.0] [--epochs 36] [--device cuda] [--threads 8]

A diagnostic, not a recipe. The base model is trained as ``make pretrain`` trains it
(:func:`roadxfer.train.train`, ``--training``: the merged ``training`` settings of
config/config.yaml + experiments/pretrain.yaml) with one addition while it trains: a small head
on the encoder's two deepest stages predicts, for each 16 x 16 pixel cell of a tile, how
much of it is a thin ridge of the image itself (light and dark lines a few pixels across:
multi-scale Hessian eigenvalues of the grey image less its slope, the top 5 % of each batch's responses).
No labels go into that target: it asks the deep features to keep every line in view, not
only the paved roads, which is what a frozen encoder would need to read unpaved roads and
trails out of later. The head is dropped before the package is written, so ``--out`` holds
an ordinary base model and its float16 copy (``--out``/shared) for the demo's transfer.
Prints the best epoch; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import roadxfer.model as M  # noqa: E402
import roadxfer.step as S  # noqa: E402
import roadxfer.train as T  # noqa: E402
from roadxfer.atomic import atomic_path  # noqa: E402
from roadxfer.package import sha256_file, share_package  # noqa: E402

ROAD = [{"value": 1, "name": "road", "color": [255, 0, 0]}]
AUX = "aux_head."
_pending: list[torch.Tensor] = []


def _gauss_kernels(s: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r = int(3 * s + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float32, device=device)
    g = torch.exp(-(x**2) / (2 * s * s))
    g = g / g.sum()
    return g, -x / s**2 * g, (x**2 / s**4 - 1 / s**2) * g


def _sep(img: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor) -> torch.Tensor:
    r = kx.numel() // 2
    out = F.conv2d(F.pad(img, (r, r, 0, 0), mode="reflect"), kx.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, r, r), mode="reflect"), ky.view(1, 1, -1, 1))


def ridges(grey: torch.Tensor, sigmas: tuple[float, ...] = (2.0, 3.0, 4.0)) -> torch.Tensor:
    """Light and dark ridge strength ``[B, 2, H, W]`` of a grey batch ``[B, 1, H, W]`` (scale-normalised Hessian)."""
    light = torch.zeros_like(grey)
    dark = torch.zeros_like(grey)
    for s in sigmas:
        g, g1, g2 = _gauss_kernels(s, grey.device)
        ixx, iyy, ixy = _sep(grey, g, g2) * s * s, _sep(grey, g2, g) * s * s, _sep(grey, g1, g1) * s * s
        half, root = (ixx + iyy) / 2, torch.sqrt(((ixx - iyy) / 2) ** 2 + ixy**2)
        l1, l2 = half - root, half + root  # l1 <= l2
        # At a line's centre the slope is zero; beside a step edge it is not: subtract it so edges do not count.
        slope = torch.sqrt(_sep(grey, g, g1) ** 2 + _sep(grey, g1, g) ** 2) * s
        light = torch.maximum(light, F.relu(-l1 - l2.abs() - slope))  # bright line: strongly curved across, flat along
        dark = torch.maximum(dark, F.relu(l2 - l1.abs() - slope))
    return torch.cat([light, dark], 1)


def ridge_density(img: torch.Tensor, size: tuple[int, int], quantile: float = 0.95) -> torch.Tensor:
    """Share of each cell's pixels among the batch's strongest ridges, per kind: the auxiliary target."""
    with torch.autocast(img.device.type, enabled=False):
        r = ridges(img.float().mean(1, keepdim=True))
        flat = r.transpose(0, 1).reshape(2, -1)
        idx = torch.randperm(flat.shape[1], device=flat.device)[:200_000]
        thr = torch.quantile(flat[:, idx], quantile, dim=1).clamp(min=1e-3).view(1, 2, 1, 1)  # a kind nearly absent stays empty
        return F.adaptive_avg_pool2d((r > thr).float(), size)


def patch(aux_weight: float):
    """Give MultiTaskRoadModel the auxiliary head and its loss while this process trains; returns the undo."""
    init, fwd, loss = M.MultiTaskRoadModel.__init__, M.MultiTaskRoadModel.forward, S.seg_orient_loss

    def __init__(self, spec):  # noqa: N807
        init(self, spec)
        ch = self.encoder.out_channels
        self.aux_head = nn.Sequential(nn.Conv2d(ch[-2] + ch[-1], 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(inplace=True), nn.Conv2d(128, 2, 1))

    def forward(self, x):
        feats = self.encoder(x)
        seg, ori = self.seg_head(self.seg_decoder(feats)), self.orient_head(self.orient_decoder(feats))
        if self.training:
            deep = torch.cat([feats[-2], F.interpolate(feats[-1], size=feats[-2].shape[-2:], mode="nearest")], 1)
            pred = self.aux_head(deep)
            target = ridge_density(x, tuple(pred.shape[-2:]))
            _pending.append(F.binary_cross_entropy_with_logits(pred.float(), target))
        return seg, ori

    def seg_orient_loss(*args, **kwargs):
        out = loss(*args, **kwargs)
        if _pending:
            out = out + aux_weight * _pending.pop()
            _pending.clear()
        return out

    def undo() -> None:
        M.MultiTaskRoadModel.__init__, M.MultiTaskRoadModel.forward, S.seg_orient_loss = init, fwd, loss

    M.MultiTaskRoadModel.__init__, M.MultiTaskRoadModel.forward, S.seg_orient_loss = __init__, forward, seg_orient_loss
    return undo


def drop_head(package: Path) -> int:
    """Remove the auxiliary head's tensors from a written package and record the new weights' sha256."""
    emd_path = next(package.glob("*.emd"))
    emd = json.loads(emd_path.read_text())
    weights = package / emd["ModelFile"]
    state = torch.load(weights, map_location="cpu", weights_only=True)
    kept = {k: v for k, v in state.items() if not k.startswith(AUX)}
    with atomic_path(weights) as tmp:
        torch.save(kept, tmp)
        emd["roadxfer"]["weights_sha256"] = sha256_file(tmp)
    with atomic_path(emd_path) as tmp:
        tmp.write_text(json.dumps(emd, indent=2))
    return len(state) - len(kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", nargs="+", type=Path, required=True)
    ap.add_argument("--training", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--aux-weight", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=8)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = json.loads(args.training.read_text())
    if args.epochs:
        cfg["epochs"] = args.epochs
    undo = patch(args.aux_weight)
    t0 = time.perf_counter()
    best = T.train(args.tiles, args.out / "base", T.TrainConfig.from_dict(cfg), classes=ROAD, workdir=args.out / "ckpt",
                   threads=args.threads, device=str(T.pick_device(args.device)))
    print(f"aux {args.aux_weight}: {cfg['epochs']} epochs in {time.perf_counter() - t0:.0f} s, best {json.dumps(best)}", flush=True)
    undo()
    print(f"dropped {drop_head(args.out / 'base')} auxiliary tensors", flush=True)
    share_package(args.out / "base", args.out / "shared")


if __name__ == "__main__":
    main()
