"""One optimiser step, the optimiser, and validation: the parts of an epoch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from . import IGNORE_VALUE
from .device import amp_dtype, channels_last
from .losses import direction_hits, open_background, orientation_io, seg_orient_loss
from .model import MultiTaskRoadModel
from .orientation import target_lut

if TYPE_CHECKING:
    from .train import TrainConfig


def make_optimizer(model: MultiTaskRoadModel, cfg: TrainConfig, *, encoder_trainable: bool) -> torch.optim.Optimizer:
    """Frozen encoder parameters are not in the optimiser at all; unfrozen ones get a lower LR."""
    rest = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    if not encoder_trainable:  # the parts of a frozen encoder that train_bn or trainable_stages keep learning
        rest += [p for p in model.encoder.parameters() if p.requires_grad]
    groups = [{"params": rest, "lr": cfg.lr, "base_lr": cfg.lr}]
    if encoder_trainable:
        factor = cfg.unfreeze_lr_factor if cfg.freeze else 1.0
        groups.append({"params": list(model.encoder.parameters()), "lr": cfg.lr * factor, "base_lr": cfg.lr * factor})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def _normalise(img: torch.Tensor, model: MultiTaskRoadModel) -> torch.Tensor:
    return (img - model.norm_mean) / model.norm_std


def attach_io(model: torch.nn.Module, mean: Sequence[float], std: Sequence[float], label_bin_size: int, device: torch.device) -> None:
    """Input normalisation and the label-orientation -> model-class table, on the model's device."""
    model.norm_mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    model.norm_std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    lut = target_lut(label_bin_size, reference_layout=model.spec.reference_layout, model_bins=model.spec.orientation_bins)
    model.orient_lut = torch.from_numpy(lut).to(device)


def forward_logits(model: MultiTaskRoadModel, img: torch.Tensor, dev: torch.device, dtype: torch.dtype | None,
             forward: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(segmentation, orientation) logits of a 0-1 image batch, channels-last under autocast, returned in float32.

    The losses are computed in float32: soft Dice and the log-softmax sums lose too much in bfloat16.
    """
    if channels_last(dev):
        img = img.contiguous(memory_format=torch.channels_last)
    with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        seg, ori = (forward or model)(_normalise(img, model))
    return seg.float(), ori.float()


def make_scaler(dev: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling: needed for float16 only."""
    return torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def train_step(model: MultiTaskRoadModel, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, batch: Sequence[torch.Tensor], dev: torch.device, cfg: TrainConfig,
               forward: torch.nn.Module | None = None) -> float:
    """One optimiser step on a batch ``(image 0-1, segmentation target, orientation target)``; returns the loss.

    ``forward``: the module to call (the DistributedDataParallel wrapper of ``model`` when
    training on several processes).
    """
    img, seg_t, ori_t = (t.to(dev, non_blocking=True) for t in batch)
    seg, ori = forward_logits(model, img, dev, amp_dtype(dev, cfg.precision), forward)
    if cfg.rehearsal_open is not None:
        seg_t, ori_t = open_background(seg, seg_t, ori_t, cfg.rehearsal_open)
    ori, ori_t = orientation_io(model, ori, ori_t)
    loss = seg_orient_loss(seg, ori, seg_t, ori_t, orientation_weight=cfg.orientation_weight, dice_weight=cfg.dice_weight, direction_weight=cfg.direction_weight)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model: MultiTaskRoadModel, loader: torch.utils.data.DataLoader, device: torch.device, cfg: TrainConfig) -> dict[str, float]:
    model.eval()
    dtype = amp_dtype(device, cfg.precision)
    inter = union = ori_ok = ori_near = ori_n = 0
    total, batches = 0.0, 0
    for img, seg_t, ori_t in loader:
        img, seg_t, ori_t = img.to(device), seg_t.to(device), ori_t.to(device)
        seg, ori = forward_logits(model, img, device, dtype)
        ori, ori_t = orientation_io(model, ori, ori_t)
        total += float(seg_orient_loss(seg, ori, seg_t, ori_t, orientation_weight=cfg.orientation_weight, dice_weight=cfg.dice_weight, direction_weight=cfg.direction_weight))
        batches += 1
        valid = seg_t != IGNORE_VALUE
        pred, true = (seg.argmax(1) > 0) & valid, (seg_t > 0) & valid
        inter += int((pred & true).sum())
        union += int((pred | true).sum())
        # Direction accuracy on road pixels: the most probable bin, not the "no road" channel.
        ok, near, n = direction_hits(ori, ori_t)
        ori_ok, ori_near, ori_n = ori_ok + ok, ori_near + near, ori_n + n
    nan = float("nan")
    return {"val_loss": total / max(batches, 1), "val_road_iou": inter / union if union else 0.0,
            "val_orient_acc": ori_ok / ori_n if ori_n else nan, "val_orient_acc1": ori_near / ori_n if ori_n else nan}

