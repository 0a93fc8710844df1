"""Step 3: train a multi-task road model, from scratch or from a pretrained package with its encoder frozen.

Resumable: a checkpoint is written atomically to ``workdir`` at the end of an epoch, at most
every ``checkpoint_seconds``; a job that is killed and started again (SLURM preemption or
requeue) continues from the epoch it holds and ends with the same weights as an
uninterrupted run (same seed, CPU).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import ctypes
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import IGNORE_VALUE, PRECISIONS, UNLABELLED_VALUE, __version__
from .atomic import atomic_path
from .data import Augment, TileData, TrainSet, load_tiles, split
from .errors import InputError
from .imagenet import imagenet_input_scaling, load_imagenet_encoder
from .model import REFERENCE_ARCH, ModelSpec, MultiTaskRoadModel, build_model, load_encoder_checkpoint, raw_pixel_scaling, undirected_log_probs
from .orientation import n_bins, target_lut
from .package import build_emd, check_compatible, load_package, write_package
from .radiometry import training_record

log = logging.getLogger(__name__)


# Settings that do not change what training computes: a checkpoint written under others still resumes.
RESUME_NEUTRAL = ("checkpoint_seconds", "stage_tiles", "zip_dlpk")


class Stopped(RuntimeError):
    """Training stopped on SIGTERM (SLURM preemption or the time limit) after writing a checkpoint."""


@contextlib.contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """While open, SIGTERM only sets a flag (read at the end of each epoch) instead of killing the process.

    SLURM sends SIGTERM, then SIGKILL ``KillWait`` seconds later (30 by default): time to
    finish the epoch and checkpoint it. Off the main thread (where signals cannot be
    handled) the flag is never set.
    """
    asked: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: asked.append(signum))
    try:
        yield lambda: bool(asked)
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "linknet"
    backbone: str = "resnet34"
    epochs: int = 30
    batch_size: int = 8
    lr: float | str = 1e-3  # or "auto": the LR range test picks it (find_lr)
    lr_schedule: str = "constant"  # constant | one_cycle | cosine (lr_factor)
    weight_decay: float = 1e-4
    patience: int = 5
    val_fraction: float = 0.2
    val_split: str = "auto"  # auto | tile | scene
    seed: int = 42
    orientation_weight: float = 1.0
    direction_weight: float = 1.0  # extra cross-entropy of the direction bins on road pixels only
    dice_weight: float = 1.0
    freeze: bool = False
    unfreeze_after: int | None = None
    unfreeze_lr_factor: float = 0.1
    train_bn: bool = False  # frozen encoder: its BatchNorm layers still learn (fastai's freeze)
    trainable_stages: tuple[str, ...] = ()  # frozen encoder: these stages (e.g. conv1, bn1, layer1) still learn
    side_channels: int = 0  # a trainable side network beside the encoder (model.SideNetwork); 0: none
    encoder_checkpoint: str | None = None
    encoder_weights: str | None = None  # "imagenet": the backbone's packaged ImageNet-1k weights (roadxfer.imagenet)
    orientation_bin_size: int = 10
    augment: dict[str, Any] = field(default_factory=lambda: {"flips": True, "rot90": True, "color_jitter": 0.1})
    zip_dlpk: bool = False
    stage_tiles: bool = False  # copy the tile folders to node-local $TMPDIR before reading them
    checkpoint_seconds: float = 60.0  # write the resume checkpoint at most this often (0: after every epoch)
    keep_pretrained: bool = False  # keep what the pretrained model finds: its confident roads become labels
    keep_threshold: float = 0.5
    rehearsal_fraction: float = 0.25  # with rehearsal datasets: their share of the tiles of each epoch
    rehearsal_open: float | None = None  # rehearsal tiles: background the model calls road with P >= this is left out of the loss
    reference_orientation_bin_size: int = 20  # linknet34_mtl from scratch: degrees per bin over 360 (the reference's default)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16: mixed precision (see amp_dtype)

    def __post_init__(self) -> None:  # refused before any data is read
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r}: one of {', '.join(LR_SCHEDULES)}")
        if self.lr != "auto" and (isinstance(self.lr, (str, bool)) or not self.lr > 0):
            raise ValueError(f"lr {self.lr!r}: a positive number or 'auto'")
        if self.encoder_weights not in (None, "imagenet"):
            raise ValueError(f"encoder_weights {self.encoder_weights!r}: null or 'imagenet'")
        if self.encoder_weights and self.encoder_checkpoint:
            raise ValueError("encoder_weights and encoder_checkpoint both set: choose one source of encoder weights")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training option(s) {sorted(unknown)}")
        return cls(**d)


def eta_text(epoch_seconds: Sequence[float], epochs_left: int) -> str:
    """``"about 3 min 10 s left"``: the epochs left at the mean of the last (up to 3) epochs, so a slow machine shows it is slow, not stuck."""
    if not epoch_seconds:
        return ""
    if epochs_left <= 0:
        return "last epoch"
    recent = list(epoch_seconds)[-3:]
    left = round(epochs_left * sum(recent) / len(recent))
    return f"about {left // 60} min {left % 60} s left" if left >= 60 else f"about {left} s left"


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present (honouring CUDA_VISIBLE_DEVICES as SLURM sets it), else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the system.

    A CPU training step allocates and frees tensors of tens of MB; by default glibc maps
    each one afresh and unmaps it when freed, so every step page-faults all of it in again
    (measured: a fifth of a demo training step on a 2-core VM). The process keeps its peak
    instead, which a job's memory limit must allow for anyway. The ``MALLOC_*`` variables,
    when set, win (the user's choice), and ``ROADXFER_MALLOC=default`` leaves glibc as it is.
    Returns whether the setting was applied (False off glibc, e.g. macOS or musl).
    """
    if os.environ.get("ROADXFER_MALLOC") == "default" or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_")):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # 32 MiB, glibc's largest mmap threshold on 64 bits; freed heap memory is never trimmed.
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def set_threads(threads: int) -> int:
    """Torch threads from the rule's ``threads`` (and malloc kept from page-faulting: :func:`keep_freed_memory`);
    returns the DataLoader worker count to use."""
    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    keep_freed_memory()
    # Tiles are in memory, so workers only augment: one per 4 threads, none on small machines.
    return min(8, threads // 4)


def direction_loss(ori_logp: torch.Tensor, ori_t: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the direction bins on road pixels only (targets 1..k; 0 and ignore left out).

    The full orientation cross-entropy is dominated by the "no road" class (most pixels),
    which the road mask already learns; on few tiles it leaves the directions at chance.
    This term renormalises over the bins and counts road pixels alone.
    """
    road = (ori_t > 0) & (ori_t != IGNORE_VALUE)
    if not road.any():
        return ori_logp.sum() * 0.0
    bins = ori_logp[:, 1:]
    logp = bins - torch.logsumexp(bins, 1, keepdim=True)
    return F.nll_loss(logp.permute(0, 2, 3, 1)[road], ori_t[road] - 1)


def seg_orient_loss(seg_logits: torch.Tensor, ori_logp: torch.Tensor, seg_t: torch.Tensor, ori_t: torch.Tensor, *, orientation_weight: float, dice_weight: float, direction_weight: float = 0.0) -> torch.Tensor:
    """Cross-entropy + soft Dice (road vs background) + weighted orientation cross-entropy
    (+ the direction term on road pixels); ignore pixels count in none.

    ``ori_logp``: undirected orientation log-probabilities and ``ori_t`` the targets in the
    same classes (:func:`orientation_io`).
    """
    valid = seg_t != IGNORE_VALUE
    if not valid.any():
        return seg_logits.sum() * 0.0
    loss = F.cross_entropy(seg_logits.float(), seg_t, ignore_index=IGNORE_VALUE)
    if dice_weight:
        p_road = 1 - torch.softmax(seg_logits.float(), 1)[:, 0]
        v = valid.float()
        t = ((seg_t > 0) & valid).float()
        inter = (p_road * t * v).sum()
        dice = 1 - (2 * inter + 1) / ((p_road * v).sum() + t.sum() + 1)
        loss = loss + dice_weight * dice
    if orientation_weight and (ori_t != IGNORE_VALUE).any():
        loss = loss + orientation_weight * F.nll_loss(ori_logp, ori_t, ignore_index=IGNORE_VALUE)
    if direction_weight:
        loss = loss + direction_weight * direction_loss(ori_logp, ori_t)
    return loss


def open_background(seg_logits: torch.Tensor, seg_t: torch.Tensor, ori_t: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets for rehearsal tiles whose background is marked ``UNLABELLED_VALUE``.

    Rehearsal tiles label only the base model's road types: a road of a new type in them
    shows as background, which would teach the model to drop exactly what the new tiles
    teach it to find. Their background stays background except where the model being
    trained already calls it road with P >= ``threshold``: there it counts in no loss
    (positive-unlabelled learning; "modelling the background" in incremental segmentation).
    """
    unl = seg_t == UNLABELLED_VALUE
    if not unl.any():
        return seg_t, ori_t
    with torch.no_grad():
        p_road = 1 - torch.softmax(seg_logits.float(), 1)[:, 0]
    left_out = unl & (p_road >= threshold)
    seg_t = torch.where(unl, torch.where(left_out, IGNORE_VALUE, 0), seg_t)
    return seg_t, torch.where(left_out, IGNORE_VALUE, ori_t)


def direction_hits(ori_logp: torch.Tensor, ori_t: torch.Tensor) -> tuple[int, int, int]:
    """(exact, within one bin, road pixels): the most probable direction bin against the target's.

    Bins wrap around (the last bin's neighbour is the first: 180 degrees is 0).
    """
    road = (ori_t > 0) & (ori_t != IGNORE_VALUE)
    k = ori_logp.shape[1] - 1
    diff = ((ori_logp[:, 1:].argmax(1) + 1) - ori_t).abs() % k
    diff = torch.minimum(diff, k - diff)[road]
    return int((diff == 0).sum()), int((diff <= 1).sum()), int(road.sum())


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def data_digest(data: TileData) -> str:
    h = hashlib.sha256()
    for arr in (data.images, data.seg, data.orient):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def orientation_io(model: torch.nn.Module, ori_logits: torch.Tensor, ori_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's orientation as undirected log-probabilities, and the label targets in those classes.

    Label orientation comes in our 180-degree bins; ``model.orient_lut`` (set by
    :func:`_attach_io`) maps it to the model's classes (the reference's 360-degree
    layout is folded by :func:`roadxfer.model.undirected_log_probs`).
    """
    return undirected_log_probs(ori_logits, reference_layout=model.spec.reference_layout), model.orient_lut[ori_t]


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


LR_SCHEDULES = ("constant", "one_cycle", "cosine")


def lr_factor(schedule: str, step: int, total: int, *, pct_start: float = 0.3, div: float = 25.0, final_div: float = 1e4) -> float:
    """The learning rate at optimiser step ``step`` of ``total``, as a factor of ``training.lr``.

    ``one_cycle`` is fastai's ``fit_one_cycle``, the reference tool's default: a cosine
    warm-up from lr/``div`` over the first ``pct_start`` of the steps, then a cosine down to
    lr/(``div`` x ``final_div``). ``cosine`` anneals from lr towards 0. A function of the step
    alone, so a resumed run, or one whose optimiser is rebuilt when the encoder is
    unfrozen, needs no scheduler state.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule {schedule!r}: one of {', '.join(LR_SCHEDULES)}")
    if schedule == "constant" or total <= 0:
        return 1.0

    def anneal(start: float, end: float, x: float) -> float:
        return end + (start - end) * (1 + math.cos(math.pi * min(max(x, 0.0), 1.0))) / 2

    if schedule == "cosine":
        return anneal(1.0, 0.0, step / total)
    peak = pct_start * total - 1  # as torch.optim.lr_scheduler.OneCycleLR counts (tested against it)
    if step <= peak:
        return anneal(1 / div, 1.0, step / peak) if peak > 0 else 1.0
    return anneal(1.0, 1 / (div * final_div), (step - peak) / max(total - 1 - peak, 1e-9))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every parameter group at ``factor`` times its own base rate (the encoder's may be lower)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def find_lr(model: MultiTaskRoadModel, batches: Iterator[Sequence[torch.Tensor]], dev: torch.device, cfg: TrainConfig, *, encoder_trainable: bool,
            forward: torch.nn.Module | None = None, start: float = 1e-7, end: float = 10.0, steps: int = 100, beta: float = 0.98) -> tuple[float, list[tuple[float, float]]]:
    """The LR range test (Smith, "Cyclical learning rates", 2017; fastai's ``lr_find``, which the
    reference tool runs when ``fit`` is given no learning rate): ``steps`` optimiser steps at
    rates rising exponentially from ``start`` to ``end``, stopped once the loss diverges.

    Returns the suggestion by fastai's ``valley`` rule (its ``lr_find`` default: within the
    longest run of falling loss, a point half-way through its middle third; the first tenth
    and the last 5 steps left out, as fastai does) and the curve as (rate, smoothed loss)
    pairs. The model's weights, BatchNorm statistics and the global
    random state are restored afterwards, so the training that follows starts where it
    would have without the test. With DDP every rank sees the mean loss, so all stop together.
    """
    saved, rng = copy.deepcopy(model.state_dict()), torch.get_rng_state()
    optimizer = make_optimizer(model, replace(cfg, lr=start), encoder_trainable=encoder_trainable)
    scaler = make_scaler(dev, amp_dtype(dev, cfg.precision))
    model.train()
    curve: list[tuple[float, float]] = []
    avg, lowest = 0.0, math.inf
    log.info("lr auto: range test of up to %d steps, rate %g to %g", steps, start, end)
    try:
        for step, batch in zip(range(steps), batches):
            lr = start * (end / start) ** (step / max(steps - 1, 1))
            set_lr(optimizer, lr / start)
            loss = train_step(model, optimizer, scaler, batch, dev, cfg, forward=forward)
            if _distributed():
                mean = torch.tensor([loss], dtype=torch.float64)
                dist.all_reduce(mean)
                loss = float(mean) / dist.get_world_size()
            if not math.isfinite(loss):
                break
            avg = beta * avg + (1 - beta) * loss
            smooth = avg / (1 - beta ** (step + 1))  # bias-corrected, as fastai
            curve.append((lr, smooth))
            if (step + 1) % 20 == 0:
                log.info("lr auto: step %d/%d  rate %.2g  loss %.4f", step + 1, steps, lr, smooth)
            if smooth > 4 * lowest:
                break
            lowest = min(lowest, smooth)
    finally:
        model.load_state_dict(saved)
        torch.set_rng_state(rng)
    kept = curve[steps // 10 : -5]
    if len(kept) < 5:
        raise RuntimeError(f"the learning-rate range test diverged after {len(curve)} step(s) from {start:g}: set training.lr to a number")
    return valley([c[0] for c in kept], [c[1] for c in kept]), curve


def valley(rates: Sequence[float], losses: Sequence[float]) -> float:
    """fastai's ``valley`` suggestion: the longest run of falling loss (a longest decreasing
    subsequence), and the rate half-way through its middle third."""
    run = [1] * len(losses)
    first = last = 0
    for i in range(1, len(losses)):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
            if run[last] < run[i]:
                last = i
                first = last - run[last]
    third = (last - first) / 3
    return float(rates[first + int(third) + int(third / 2)])


@torch.no_grad()
def evaluate(model: MultiTaskRoadModel, loader: torch.utils.data.DataLoader, device: torch.device, cfg: TrainConfig) -> dict[str, float]:
    model.eval()
    dtype = amp_dtype(device, cfg.precision)
    inter = union = ori_ok = ori_near = ori_n = 0
    total, batches = 0.0, 0
    for img, seg_t, ori_t in loader:
        img, seg_t, ori_t = img.to(device), seg_t.to(device), ori_t.to(device)
        seg, ori = _forward(model, img, device, dtype)
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


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (Intel AMX, or AVX512-BF16 as on AMD
    Zen 4), where CPU mixed precision pays.

    Measured on 2 cores of an AMD EPYC with AVX512-BF16 and no AMX: a training step of the
    demo's U-Net/ResNet-18 1.6-1.8 times as fast as in float32, classification 1.75 times.
    Elsewhere bfloat16 is emulated on the CPU and slower than float32.
    A CPU held below its own kernels (``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``,
    as to measure what an AVX2-only machine does) counts as what it is held to: its bfloat16
    would be emulated there too.
    """
    if not torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512"):  # honours ATEN_CPU_CAPABILITY
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if isa and isa not in ("ALL", "DEFAULT") and not isa.startswith(("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10")):
        return False
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(bool(probe()) for probe in probes if probe is not None)


def amp_dtype(dev: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``dev`` (None: float32 throughout).

    ``auto``: bfloat16 on CUDA where supported (else float16), bfloat16 on a CPU with AMX or AVX512-BF16
    (three times faster training of the demo's U-Net on this project's CPU), float32 on
    other CPUs and devices. Weights, optimiser state and losses stay float32.
    """
    if precision not in PRECISIONS:
        raise InputError(None, f"precision {precision!r} is not one of {list(PRECISIONS)}", "choose one of them")
    if precision == "fp32" or (precision == "auto" and dev.type not in ("cuda", "cpu")):
        return None
    if precision == "fp16":
        if dev.type != "cuda":
            raise InputError(None, f"precision fp16 needs a CUDA GPU (the device is {dev})", "use bf16 or fp32 here")
        return torch.float16
    if dev.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if precision == "bf16":
            raise InputError(None, f"this GPU ({torch.cuda.get_device_name(dev)}) has no bfloat16", "use fp16 or auto")
        return torch.float16
    if precision == "auto" and not cpu_has_bf16():
        return None
    return torch.bfloat16


def channels_last(dev: torch.device) -> bool:
    """NHWC tensors: faster convolutions on CUDA and with oneDNN on the CPU (25 % on this project's CPU in float32)."""
    return dev.type in ("cuda", "cpu")


def precision_name(dtype: torch.dtype | None) -> str:
    """A precision as logged and recorded: the autocast dtype, float32 without autocast."""
    return str(dtype or torch.float32).removeprefix("torch.")


def _forward(model: MultiTaskRoadModel, img: torch.Tensor, dev: torch.device, dtype: torch.dtype | None,
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
    seg, ori = _forward(model, img, dev, amp_dtype(dev, cfg.precision), forward)
    if cfg.rehearsal_open is not None:
        seg_t, ori_t = open_background(seg, seg_t, ori_t, cfg.rehearsal_open)
    ori, ori_t = orientation_io(model, ori, ori_t)
    loss = seg_orient_loss(seg, ori, seg_t, ori_t, orientation_weight=cfg.orientation_weight, dice_weight=cfg.dice_weight, direction_weight=cfg.direction_weight)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


def global_batches(n: int, batch_size: int, generator: torch.Generator, *, drop_last: bool, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Batches of a shuffled epoch, each split across ``world`` processes (this rank's share).

    The order is the one a DataLoader with ``shuffle=True`` and this generator gives, so one
    process sees the same global batches as ``world`` processes together.
    """
    order = torch.randperm(n, generator=generator).tolist()
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if world == 1:
        return batches
    per = batch_size // world
    return [b[rank * per : (rank + 1) * per] for b in batches]


def training_processes(gpus: Any) -> int:
    """Processes for a job that asked for ``gpus``: one per GPU it sees (N > 1 trains with DDP), else one."""
    wanted = int(gpus or 0)
    if wanted <= 1 or not torch.cuda.is_available():
        return 1
    return max(1, min(wanted, torch.cuda.device_count()))


def process_group_backend(cuda: bool) -> str:
    """NCCL for the GPUs' tensors and gloo for the CPU's: the per-epoch loss sums, the SIGTERM
    flag and the range test's loss are small CPU tensors, which NCCL alone refuses ("No
    backend type associated with device type cpu")."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, kwargs: dict[str, Any], log_files: list[str]) -> None:
    """One training process of ``world`` (spawned): joins the group, trains its share, rank 0 writes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fmt = f"%(asctime)s %(levelname)s %(name)s [rank {rank}/{world}]: %(message)s"
    handlers: list[logging.Handler] = [logging.FileHandler(f, mode="a") for f in log_files] or [logging.StreamHandler()]
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=fmt, handlers=handlers, force=True)
    cuda = kwargs.get("device") != "cpu" and torch.cuda.is_available()
    dist.init_process_group(process_group_backend(cuda), rank=rank, world_size=world)
    try:
        if cuda:
            torch.cuda.set_device(rank)
        kwargs = {**kwargs, "device": f"cuda:{rank}" if cuda else "cpu", "threads": max(1, kwargs.get("threads", 1) // world)}
        train(**kwargs)
    finally:
        dist.destroy_process_group()


def _spawn(processes: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Train with ``processes`` DistributedDataParallel processes (one per GPU) inside this job."""
    cfg: TrainConfig = kwargs["cfg"]
    if cfg.batch_size % processes:
        raise InputError(None, f"training.batch_size {cfg.batch_size} does not split over {processes} processes", f"use a batch_size divisible by {processes} (it is the global batch)")
    log_files = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    log.info("training on %d processes (DistributedDataParallel, global batch %d = %d per process)", processes, cfg.batch_size, cfg.batch_size // processes)
    with stop_requests():  # SIGTERM reaches every process of the job: the workers checkpoint, this one waits for them
        torch.multiprocessing.spawn(_worker, args=(processes, _free_port(), kwargs, log_files), nprocs=processes, join=True)
    emd = json.loads((Path(kwargs["out_package"]) / f"{Path(kwargs['out_package']).name}.emd").read_text())
    return emd["roadxfer"]["best"]


def rehearsal_count(n_new: int, n_old: int, fraction: float) -> int:
    """Rehearsal tiles per epoch so that they make ``fraction`` of it (at most all of them)."""
    if not n_old or fraction <= 0:
        return 0
    return min(n_old, round(n_new * fraction / (1 - fraction)))


def epoch_indexes(train_idx: np.ndarray, rehearsal_idx: np.ndarray, fraction: float, *, seed: int, epoch: int) -> np.ndarray:
    """The epoch's tiles: every training tile plus a fresh, seeded draw of rehearsal tiles."""
    k = rehearsal_count(len(train_idx), len(rehearsal_idx), fraction)
    if not k:
        return train_idx
    rng = np.random.default_rng([seed, epoch, 7])
    return np.concatenate([train_idx, np.sort(rng.choice(rehearsal_idx, k, replace=False))])


def append_tiles(data: TileData, more: TileData) -> np.ndarray:
    """Append ``more``'s tiles to ``data`` in place (scenes renumbered); returns their indexes."""
    if (more.tile_size, more.bands) != (data.tile_size, data.bands):
        raise InputError(more.sources[0], f"rehearsal tiles are {more.bands}-band {more.tile_size} px, the training tiles {data.bands}-band {data.tile_size} px",
                         "export the rehearsal scenes with the same tile_size and bands")
    start = len(data)
    data.images = np.concatenate([data.images, more.images])
    data.seg = np.concatenate([data.seg, more.seg])
    data.orient = np.concatenate([data.orient, more.orient])
    data.scene = np.concatenate([data.scene, more.scene + len(data.scenes)])
    data.scenes = [*data.scenes, *more.scenes]
    return np.arange(start, len(data))


@torch.no_grad()
def keep_pretrained_roads(pkg: Any, data: TileData, dev: torch.device, threshold: float, batch_size: int) -> int:
    """Label as road the background pixels the pretrained model finds road with P >= ``threshold``.

    New samples usually label only the roads the old model misses; everything else is
    background, which would teach the new model to drop the roads the old one found
    (catastrophic forgetting). Keeping the old model's confident detections as labels
    (pseudo-labels, as in "learning without forgetting") avoids that without its data.
    Orientation is left unknown (ignore) for those pixels.
    """
    model = pkg.model.to(dev).eval()
    mean = torch.tensor(pkg.mean, device=dev).view(1, -1, 1, 1)
    std = torch.tensor(pkg.std, device=dev).view(1, -1, 1, 1)
    added = 0
    for i in range(0, len(data), batch_size):
        x = torch.from_numpy(data.images[i : i + batch_size]).to(dev).float() / 255.0
        probs = torch.softmax(model.segment((x - mean) / std).float(), 1)
        road = (1 - probs[:, 0] >= threshold).cpu().numpy()
        cls = probs[:, 1:].argmax(1).cpu().numpy().astype(np.uint8) + 1
        seg = data.seg[i : i + batch_size]
        new = road & (seg == 0)
        seg[new] = cls[new] if len(data.classes) == pkg.spec.n_classes else 1
        data.orient[i : i + batch_size][new] = IGNORE_VALUE
        added += int(new.sum())
    return added


def _normalise(img: torch.Tensor, model: MultiTaskRoadModel) -> torch.Tensor:
    return (img - model.norm_mean) / model.norm_std


def _attach_io(model: torch.nn.Module, mean: Sequence[float], std: Sequence[float], label_bin_size: int, device: torch.device) -> None:
    """Input normalisation and the label-orientation -> model-class table, on the model's device."""
    model.norm_mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    model.norm_std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    lut = target_lut(label_bin_size, reference_layout=model.spec.reference_layout, model_bins=model.spec.orientation_bins)
    model.orient_lut = torch.from_numpy(lut).to(device)


def model_spec(cfg: TrainConfig, *, bands: int, n_classes: int, pretrained_spec: ModelSpec | None) -> ModelSpec:
    """The spec to train: the reference architecture takes its bins from the pretrained model (or the config)."""
    if cfg.arch == REFERENCE_ARCH:
        if cfg.backbone != "resnet34":
            log.info("training.arch %s is LinkNet with a ResNet-34 encoder: training.backbone %r is not used", REFERENCE_ARCH, cfg.backbone)
        if pretrained_spec is not None and pretrained_spec.arch == REFERENCE_ARCH:
            bins = pretrained_spec.orientation_bins
        else:
            if 180 % cfg.reference_orientation_bin_size:
                raise InputError(None, f"training.reference_orientation_bin_size {cfg.reference_orientation_bin_size} does not divide 180", "use 10, 20 (the reference's default) or 30")
            bins = 360 // cfg.reference_orientation_bin_size
        return ModelSpec(arch=REFERENCE_ARCH, backbone="resnet34", in_channels=bands, n_classes=n_classes, orientation_bins=bins, side_channels=cfg.side_channels)
    return ModelSpec(arch=cfg.arch, backbone=cfg.backbone, in_channels=bands, n_classes=n_classes, orientation_bins=n_bins(cfg.orientation_bin_size),
                     side_channels=cfg.side_channels)


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The last epoch's checkpoint, or None; a corrupt or foreign file is set aside, never trusted or run.

    ``weights_only=True``: a checkpoint holding pickled objects is refused without running them.
    """
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or not {"digest", "epoch", "model", "optimizer", "history", "best_state", "rng"} <= set(ckpt):
            raise ValueError("it is not a roadxfer training checkpoint")
        return ckpt
    except Exception as exc:  # truncated, corrupt, foreign or malicious: all start over
        aside = path.with_name(f"{path.name}.rejected-{time.strftime('%Y%m%dT%H%M%S')}")
        path.rename(aside)
        log.warning("%s cannot be used (%s): set aside as %s, training starts over", path, str(exc).splitlines()[0][:200], aside.name)
        return None


def train(
    datasets: Sequence[str | Path],
    out_package: str | Path,
    cfg: TrainConfig,
    *,
    classes: Sequence[dict[str, Any]],
    pretrained: str | Path | None = None,
    workdir: str | Path | None = None,
    threads: int = 1,
    device: str | None = None,
    rehearsal: Sequence[str | Path] = (),
    processes: int = 1,
) -> dict[str, Any]:
    """Train one model and write its package; returns the best validation metrics.

    ``rehearsal``: tile folders of the pretrained model's own domain (e.g. its training
    tiles); ``cfg.rehearsal_fraction`` of each epoch's tiles are drawn from them, so the
    new model keeps seeing the old roads (against forgetting). They are never validated on.

    ``processes`` > 1: DistributedDataParallel, one process per GPU (gloo on the CPU), started
    here; ``cfg.batch_size`` is the global batch. Rank 0 writes checkpoints and the package.
    """
    if processes > 1 and not _distributed():
        return _spawn(processes, {"datasets": list(datasets), "out_package": out_package, "cfg": cfg, "classes": list(classes), "pretrained": pretrained,
                                  "workdir": workdir, "threads": threads, "device": device, "rehearsal": list(rehearsal)})
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    lead = rank == 0
    workers = set_threads(threads)
    dev = pick_device(device)
    data = _read_tiles(datasets, classes, cfg)
    radiometry = training_record(data.radiometry, data.sources, data.source_bands)  # datasets rescaled alike, checked before training
    pkg = load_package(pretrained) if pretrained else None
    spec = model_spec(cfg, bands=data.bands, n_classes=len(classes), pretrained_spec=pkg.spec if pkg else None)

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(spec)
    parent, encoder_init = None, None
    if pkg is not None:
        reset = check_compatible(pkg, spec=spec, classes=list(classes), bands=data.bands, tile_size=data.tile_size, source=data.sources[0])
        state = pkg.model.state_dict()
        # Parts that start fresh: heads for other classes or bins keep this model's (seeded)
        # initialisation; a new side network starts at zero, so the model computes what the pretrained one did.
        parts = {"segmentation head": model.SEG_HEAD, "orientation head": model.ORIENT_HEAD, "side network": ("side.",)}
        fresh = tuple(prefix for name in reset for prefix in parts[name])
        dropped = sorted(k for k in state if k.startswith(fresh))
        state = {k: v for k, v in state.items() if not k.startswith(fresh)}
        if heads := [name for name in reset if name != "side network"]:
            log.warning("the new data's classes/bins differ from the pretrained model's: re-initialised the %s (%d tensors)", " and ".join(heads), len(dropped))
        if "side network" in reset:
            log.info("side network of %d channels added beside the pretrained encoder (%d parameters, starts at zero)",
                     spec.side_channels, sum(p.numel() for p in model.side.parameters()))
        missing, unexpected = model.load_state_dict(state, strict=False)
        misfit = sorted(unexpected) + sorted(k for k in missing if not k.startswith(fresh))
        if misfit:  # check_compatible lets no other difference through; this is the last word
            raise InputError(pkg.path, f"weights do not fit the model to train ({len(misfit)} tensor(s), e.g. {misfit[0]})", "check training.arch, backbone and side_channels against the pretrained model")
        log.info("pretrained weights: %d tensor(s) loaded, %d re-initialised", len(state), len(dropped))
        mean, std = pkg.mean, pkg.std  # the encoder was trained on inputs normalised this way
        if cfg.keep_pretrained:
            added = keep_pretrained_roads(pkg, data, dev, cfg.keep_threshold, cfg.batch_size)
            log.info("keep_pretrained: %d background pixel(s) the pretrained model calls road become road labels", added)
        parent = {"path": str(pkg.path), "weights_sha256": pkg.weights_sha256, "name": pkg.path.name,
                  "tensors": {"loaded": len(state), "reinitialised": dropped}}
        if pkg.reference_emd is not None:
            parent["reference_emd"] = pkg.reference_emd
        log.info("starting from pretrained package %s (sha256 %s…)", pkg.path, pkg.weights_sha256[:12])
        encoder_init = (pkg.emd.get("roadxfer") or {}).get("encoder_init")  # the lineage: where the parent's encoder started
        if cfg.encoder_weights or cfg.encoder_checkpoint:
            log.info("training.encoder_weights / encoder_checkpoint not used: the encoder starts from the pretrained model")
    else:
        mean, std = raw_pixel_scaling(data.bands) if spec.raw_input else data.band_stats()
        if cfg.encoder_checkpoint:
            load_encoder_checkpoint(model, cfg.encoder_checkpoint)
            encoder_init = {"source": "checkpoint", "file": str(cfg.encoder_checkpoint)}
        elif cfg.encoder_weights == "imagenet":  # refused with the backbones that have them for any other (linknet34_mtl's ResNet-34 too)
            encoder_init = load_imagenet_encoder(model, spec.backbone)
            mean, std = imagenet_input_scaling(data.bands)  # the scaling the weights were trained with
    if cfg.freeze and not pretrained and not cfg.encoder_checkpoint and not cfg.encoder_weights:
        log.warning("freeze is set but there is no pretrained model or encoder checkpoint: the encoder stays random")
    model.to(dev)
    if channels_last(dev):
        model.to(memory_format=torch.channels_last)
    precision = amp_dtype(dev, cfg.precision)
    log.info("precision: %s%s", precision_name(precision), " autocast" if precision else "")
    _attach_io(model, mean, std, cfg.orientation_bin_size, dev)

    train_idx, val_idx = split(data, val_fraction=cfg.val_fraction, mode=cfg.val_split, seed=cfg.seed)
    rehearsal_idx, rehearsal_record = np.zeros(0, np.int64), None
    if rehearsal:
        old = _read_tiles(rehearsal, classes, cfg)
        rehearsal_idx = append_tiles(data, old)
        if cfg.rehearsal_open is not None:
            seg_old = data.seg[rehearsal_idx[0]:]  # a view: the rehearsal tiles are appended last
            seg_old[seg_old == 0] = UNLABELLED_VALUE
        rehearsal_record = {"sources": old.sources, "scenes": old.scenes, "tiles": len(old), "fraction": cfg.rehearsal_fraction}
        drawn = rehearsal_count(len(train_idx), len(rehearsal_idx), cfg.rehearsal_fraction)
        log.info("rehearsal: %d tile(s) of the pretrained domain from %d folder(s); %d of each epoch's %d tiles drawn from them",
                 len(old), len(rehearsal), drawn, len(train_idx) + drawn)
    aug = Augment(**cfg.augment)
    train_set = TrainSet(data, train_idx, aug, cfg.orientation_bin_size, cfg.seed)
    val_set = TrainSet(data, val_idx, None, cfg.orientation_bin_size, cfg.seed)
    drop_last = len(train_set) > cfg.batch_size or world > 1  # every process needs its share of every batch
    if world > 1 and len(train_set) < cfg.batch_size:
        raise InputError(data.sources[0], f"{len(train_set)} training tiles do not fill one global batch of {cfg.batch_size} for {world} processes", "train on one process or add data")
    loader_kw = {"num_workers": workers, "pin_memory": dev.type == "cuda", "persistent_workers": workers > 0}
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False, **loader_kw)

    data_sha256 = data_digest(data)  # hashes every tile: once
    digest = _digest({"cfg": {k: v for k, v in asdict(cfg).items() if k not in RESUME_NEUTRAL}, "classes": list(classes), "data": data_sha256, "parent": parent})
    workdir = Path(workdir) if workdir else Path(out_package).with_name(f".{Path(out_package).name}.work")
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = workdir / "checkpoint.pt"

    start_epoch, history, best, best_state, bad = 0, [], -1.0, None, 0
    frozen_now = cfg.freeze
    ckpt = _load_checkpoint(ckpt_path)
    if ckpt is not None:
        if ckpt.get("digest") == digest:
            start_epoch, history, best, bad = ckpt["epoch"] + 1, ckpt["history"], ckpt["best"], ckpt["bad"]
            best_state = ckpt["best_state"]
            frozen_now = ckpt["frozen"]
            model.load_state_dict(ckpt["model"])
            log.info("resuming from %s after epoch %d", ckpt_path, start_epoch)
        else:
            log.warning("%s belongs to other settings or data: starting over", ckpt_path)
    model.freeze_encoder(frozen_now, train_bn=cfg.train_bn, trainable=cfg.trainable_stages)
    net = _parallel(model, world, dev)

    def epoch_loader(epoch: int) -> tuple[list[list[int]], torch.utils.data.DataLoader]:
        """The epoch's batches (this rank's share) and their loader: tiles, rehearsal draw, order and augmentation seeded by the epoch."""
        train_set.epoch = epoch
        train_set.indexes = epoch_indexes(train_idx, rehearsal_idx, cfg.rehearsal_fraction, seed=cfg.seed, epoch=epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        batches = global_batches(len(train_set), cfg.batch_size, gen, drop_last=drop_last, rank=rank, world=world)
        return batches, torch.utils.data.DataLoader(train_set, batch_sampler=batches, **loader_kw)

    lr_found, lr_curve = None, []
    if cfg.lr == "auto":
        if start_epoch:  # found before the checkpoint: not searched again
            lr_found, lr_curve = ckpt["lr_found"], ckpt["lr_curve"]
        else:
            def probe() -> Iterator[Sequence[torch.Tensor]]:  # epochs of their own: the training's draws stay as they were
                for k in itertools.count(1_000_000):
                    yield from epoch_loader(k)[1]

            batches = probe()
            try:
                lr_found, lr_curve = find_lr(model, batches, dev, cfg, encoder_trainable=not frozen_now, forward=net)
            finally:
                batches.close()  # its loader's workers go now, not at garbage collection
            log.info("lr auto: %.3g (fastai's valley rule on a range test of %d steps)", lr_found, len(lr_curve))
    run_cfg = replace(cfg, lr=lr_found) if lr_found is not None else cfg  # the settings training runs with
    optimizer = make_optimizer(model, run_cfg, encoder_trainable=not frozen_now)
    if start_epoch:
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])

    scaler = make_scaler(dev, precision)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("training %s/%s on %s: %d train / %d val tiles, %d trainable parameters, encoder %s", cfg.arch, cfg.backbone, dev, len(train_idx), len(val_idx), n_params, "frozen" if frozen_now else "trainable")

    stopped_early = False
    saved_at = time.monotonic()
    with stop_requests() as stop_requested:
        for epoch in range(start_epoch, cfg.epochs):
            if cfg.freeze and cfg.unfreeze_after is not None and frozen_now and epoch >= cfg.unfreeze_after:
                frozen_now = False
                model.freeze_encoder(False)
                optimizer = make_optimizer(model, run_cfg, encoder_trainable=True)
                net = _parallel(model, world, dev)  # DDP registers the parameters that need gradients when it is built
                log.info("epoch %d: encoder unfrozen, lr x%g for it", epoch + 1, cfg.unfreeze_lr_factor)
            t0 = time.perf_counter()
            batches, loader = epoch_loader(epoch)
            model.train()
            total, n = 0.0, 0
            for i, batch in enumerate(loader):
                set_lr(optimizer, lr_factor(cfg.lr_schedule, epoch * len(batches) + i, cfg.epochs * len(batches)))
                total += train_step(model, optimizer, scaler, batch, dev, cfg, forward=net) * len(batch[0])
                n += len(batch[0])
            if world > 1:
                sums = torch.tensor([total, n], dtype=torch.float64)
                dist.all_reduce(sums)
                total, n = float(sums[0]), int(sums[1])
                for b in model.buffers():  # BatchNorm statistics as rank 0 has them: every rank validates the same model
                    dist.broadcast(b, 0)
            metrics = {"epoch": epoch + 1, "train_loss": total / max(n, 1), **(evaluate(model, val_loader, dev, cfg) if len(val_idx) else {"val_loss": float("nan"), "val_road_iou": float("nan"), "val_orient_acc": float("nan"), "val_orient_acc1": float("nan")})}
            if not math.isfinite(metrics["train_loss"]):  # every rank has the same sum: all stop here
                raise InputError(out_package, f"training diverged in epoch {epoch + 1}: the loss is {metrics['train_loss']} (no package is written; the checkpoint of the last good epoch is kept)",
                                 "lower training.lr (e.g. by 10x), or use training.precision: fp32; then run again")
            metrics["seconds"] = time.perf_counter() - t0
            metrics["lr"] = optimizer.param_groups[0]["lr"]  # at the epoch's last step
            metrics["encoder_frozen"] = frozen_now
            history.append(metrics)
            score = metrics["val_road_iou"] if len(val_idx) else -metrics["train_loss"]
            improved = score > best
            if improved:
                best, bad = score, 0
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            else:
                bad += 1
            log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_road_iou %.4f  val_orient_acc %.3f (within one bin %.3f)  %.1fs (%.1f tiles/s)  %s%s",
                     epoch + 1, cfg.epochs, metrics["train_loss"], metrics["val_loss"], metrics["val_road_iou"], metrics["val_orient_acc"], metrics["val_orient_acc1"], metrics["seconds"], n / metrics["seconds"],
                     eta_text([m["seconds"] for m in history[start_epoch:]], cfg.epochs - epoch - 1), "  *best*" if improved else "")
            stop = stop_requested()
            if world > 1:  # every rank stops at the same epoch
                flag = torch.tensor([int(stop)])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag)
            early = bool(cfg.patience and bad >= cfg.patience)
            last = epoch + 1 >= cfg.epochs or early
            # Every epoch's checkpoint cost a demo epoch 7% (about 200 MB written); the last epoch's is never read.
            if lead and not last and (stop or time.monotonic() - saved_at >= cfg.checkpoint_seconds):
                saved_at = time.monotonic()
                with atomic_path(ckpt_path) as tmp:
                    torch.save({"digest": digest, "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": history, "best": best,
                                "best_state": best_state, "bad": bad, "frozen": frozen_now, "rng": {"torch": torch.get_rng_state()},
                                "lr_found": lr_found, "lr_curve": lr_curve}, tmp)
                log.debug("checkpoint written after epoch %d", epoch + 1)
            if world > 1:
                dist.barrier()
            if stop and not last:
                log.warning("SIGTERM: stopped after epoch %d of %d; %s holds it, and the same command resumes from there", epoch + 1, cfg.epochs, ckpt_path)
                raise Stopped(f"stopped on SIGTERM after epoch {epoch + 1} of {cfg.epochs}; rerun to resume from {ckpt_path}")
            if early:
                log.info("early stop: validation road IoU did not improve for %d epochs", cfg.patience)
                stopped_early = True
                break

    model.load_state_dict(best_state)
    best_metrics = max(history, key=lambda m: m["val_road_iou"] if len(val_idx) else -m["train_loss"])
    if not lead:  # rank 0 writes the package
        return best_metrics
    bin_size = 360 // spec.orientation_bins if spec.reference_layout else cfg.orientation_bin_size
    emd = build_emd(Path(out_package).name, spec, tile_size=data.tile_size, classes=list(classes), bin_size=bin_size, mean=mean, std=std,
                    cell_size=data.cell_size, provenance={
                        "parent": parent, "encoder_init": encoder_init, "training_data": {"sources": data.sources, "scenes": data.scenes[: len(data.sources)], "tiles": len(data) - len(rehearsal_idx), "sha256": data_sha256},
                        "rehearsal": rehearsal_record,
                        "radiometry": radiometry,
                        "training_config": asdict(cfg), "lr_found": lr_found, "code_version": code_version(), "roadxfer_version": __version__,
                        "epochs_run": len(history), "stopped_early": stopped_early, "best": best_metrics, "history": history, "device": str(dev), "processes": world,
                        "precision": precision_name(precision)})
    extras = _write_curves(workdir, history)
    if lr_curve:
        extras.update(_write_lr_curve(workdir, lr_curve, lr_found))
    write_package(out_package, model, emd, extras=extras, zip_dlpk=cfg.zip_dlpk)
    shutil.rmtree(workdir, ignore_errors=True)
    log.info("wrote %s (best epoch %d, val road IoU %.4f)", out_package, best_metrics["epoch"], best_metrics["val_road_iou"])
    return best_metrics


def _read_tiles(folders: Sequence[str | Path], classes: Sequence[dict[str, Any]], cfg: TrainConfig) -> TileData:
    """Tile folders in memory (staged to node-local scratch first if asked), sources named as configured."""
    with stage(folders, cfg.stage_tiles) as local:
        data = load_tiles(local, classes, orientation_bin_size=cfg.orientation_bin_size)
    data.sources = [str(d) for d in folders]
    return data


def _parallel(model: torch.nn.Module, world: int, dev: torch.device) -> torch.nn.Module:
    """The module to call in training: ``model`` itself, or its DDP wrapper on several processes."""
    if world == 1:
        return model
    if dev.type == "cuda":  # batch statistics over the global batch (SyncBatchNorm needs CUDA; same parameters, same state-dict keys)
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


@contextlib.contextmanager
def stage(datasets: Sequence[str | Path], enabled: bool) -> Iterator[list[Path]]:
    """Copy tile folders to node-local scratch ($TMPDIR, as SLURM sets it) for the read, if asked."""
    scratch = os.environ.get("TMPDIR")
    if not enabled or not scratch:
        yield [Path(d) for d in datasets]
        return
    with tempfile.TemporaryDirectory(prefix="roadxfer-stage-", dir=scratch) as tmp:
        local = []
        for i, d in enumerate(datasets):
            dst = Path(tmp) / f"{i:03d}-{Path(d).name}"
            shutil.copytree(d, dst)
            local.append(dst)
        log.info("staged %d tile folder(s) to %s", len(local), tmp)
        yield local


def code_version() -> str:
    """Git commit of the workflow when available (``git describe``), else the package version."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def _write_lr_curve(workdir: Path, curve: list[tuple[float, float]], chosen: float) -> dict[str, Path]:
    """The range test's curve as the reference tool shows ``lr_find``: loss against a log rate."""
    csv_path = workdir / "lr_find.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lr", "smoothed_loss"])
        w.writerows(curve)
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([c[0] for c in curve], [c[1] for c in curve])
    ax.axvline(chosen, color="tab:red", linestyle="--", label=f"chosen {chosen:.2g}")
    ax.set_xscale("log"), ax.set_xlabel("learning rate"), ax.set_ylabel("loss (smoothed)"), ax.legend()
    fig.tight_layout()
    png = workdir / "lr_find.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return {"lr_find.csv": csv_path, "ModelCharacteristics/lr_find.png": png}


def _write_curves(workdir: Path, history: list[dict[str, Any]]) -> dict[str, Path]:
    csv_path = workdir / "metrics.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    ep = [m["epoch"] for m in history]
    a.plot(ep, [m["train_loss"] for m in history], label="train")
    a.plot(ep, [m["val_loss"] for m in history], label="validation")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend()
    b.plot(ep, [m["val_road_iou"] for m in history], label="road IoU")
    b.plot(ep, [m["val_orient_acc"] for m in history], label="orientation acc.")
    b.plot(ep, [m.get("val_orient_acc1", float("nan")) for m in history], label="orientation acc. (within one bin)")
    b.set_xlabel("epoch"), b.set_ylim(0, 1), b.legend()
    fig.tight_layout()
    png = workdir / "loss_graph.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return {"metrics.csv": csv_path, "ModelCharacteristics/loss_graph.png": png}
