"""Step 3: train a multi-task road model, from scratch or from a pretrained package with its encoder frozen.

Resumable: a checkpoint is written atomically to ``workdir`` at the end of an epoch, at most
every ``checkpoint_seconds``; a job that is killed and started again (SLURM preemption or
requeue) continues from the epoch it holds and ends with the same weights as an
uninterrupted run (same seed, CPU).

:func:`train` runs named phases: start the model (:func:`start_model`), add rehearsal tiles,
resume from a checkpoint, find the learning rate, the epoch loop (:func:`run_epoch` and
validation), write the package (:func:`write_result`). The parts live in modules of their
own: ``device``, ``losses``, ``step``, ``lr_schedule``, ``rehearsal``, ``checkpoint``,
``distributed``, ``provenance``, ``plots``.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import UNLABELLED_VALUE, __version__
from .checkpoint import RESUME_NEUTRAL, Stopped, load_checkpoint, save_checkpoint, stop_requests
from .config import default
from .data import Augment, TileData, TrainSet, load_tiles, split, stage
from .device import amp_dtype, channels_last, pick_device, precision_name, set_threads
from .distributed import free_port, global_batches, is_distributed, parallel, process_group_backend
from .errors import InputError
from .imagenet import imagenet_input_scaling, load_imagenet_encoder
from .lr_schedule import LR_SCHEDULES, find_lr, lr_factor, set_lr
from .model import REFERENCE_ARCH, ModelSpec, MultiTaskRoadModel, build_model, load_encoder_checkpoint, raw_pixel_scaling
from .orientation import n_bins
from .package import Package, build_emd, check_compatible, load_package, write_package
from .plots import write_curves, write_lr_curve
from .provenance import code_version, data_digest, settings_digest
from .radiometry import training_record
from .rehearsal import append_tiles, epoch_indexes, keep_pretrained_roads, rehearsal_count
from .step import attach_io, evaluate, make_optimizer, make_scaler, train_step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    arch: str = default("training.arch")
    backbone: str = default("training.backbone")
    epochs: int = default("training.epochs")
    batch_size: int = default("training.batch_size")
    lr: float | str = default("training.lr")  # or "auto": the LR range test picks it (find_lr)
    lr_schedule: str = default("training.lr_schedule")  # constant | one_cycle | cosine (lr_factor)
    weight_decay: float = default("training.weight_decay")
    patience: int = default("training.patience")
    val_fraction: float = default("training.val_fraction")
    val_split: str = default("training.val_split")  # auto | tile | scene
    seed: int = default("training.seed")
    orientation_weight: float = default("training.orientation_weight")
    direction_weight: float = default("training.direction_weight")  # extra cross-entropy of the direction bins on road pixels only
    dice_weight: float = default("training.dice_weight")
    freeze: bool = False
    unfreeze_after: int | None = default("training.unfreeze_after")
    unfreeze_lr_factor: float = default("training.unfreeze_lr_factor")
    train_bn: bool = default("training.train_bn")  # frozen encoder: its BatchNorm layers still learn (fastai's freeze)
    trainable_stages: tuple[str, ...] = field(default_factory=lambda: tuple(default("training.trainable_stages")))  # frozen encoder: these stages (e.g. conv1, bn1, layer1) still learn
    side_channels: int = default("training.side_channels")  # a trainable side network beside the encoder (blocks.SideNetwork); 0: none
    encoder_checkpoint: str | None = default("training.encoder_checkpoint")
    encoder_weights: str | None = default("training.encoder_weights")  # "imagenet": the backbone's packaged ImageNet-1k weights (roadxfer.imagenet)
    orientation_bin_size: int = default("labels.orientation_bin_size")
    augment: dict[str, Any] = field(default_factory=lambda: {"flips": True, "rot90": True, "color_jitter": 0.1})
    zip_dlpk: bool = default("training.zip_dlpk")
    stage_tiles: bool = default("training.stage_tiles")  # copy the tile folders to node-local $TMPDIR before reading them
    checkpoint_seconds: float = default("training.checkpoint_seconds")  # write the resume checkpoint at most this often (0: after every epoch)
    keep_pretrained: bool = default("training.keep_pretrained")  # keep what the pretrained model finds: its confident roads become labels
    keep_threshold: float = default("training.keep_threshold")
    rehearsal_fraction: float = default("training.rehearsal_fraction")  # with rehearsal datasets: their share of the tiles of each epoch
    rehearsal_open: float | None = default("training.rehearsal_open")  # rehearsal tiles: background the model calls road with P >= this is left out of the loss
    reference_orientation_bin_size: int = default("training.reference_orientation_bin_size")  # linknet34_mtl from scratch: degrees per bin over 360 (the reference's default)
    precision: str = default("training.precision")  # auto | fp32 | bf16 | fp16: mixed precision (see amp_dtype)

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
        torch.multiprocessing.spawn(_worker, args=(processes, free_port(), kwargs, log_files), nprocs=processes, join=True)
    emd = json.loads((Path(kwargs["out_package"]) / f"{Path(kwargs['out_package']).name}.emd").read_text())
    return emd["roadxfer"]["best"]


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


@dataclass
class Start:
    """The model to train, the input scaling it takes, and where its weights came from."""

    model: MultiTaskRoadModel
    spec: ModelSpec
    mean: Sequence[float]
    std: Sequence[float]
    parent: dict[str, Any] | None = None
    encoder_init: dict[str, Any] | None = None


@dataclass
class Progress:
    """What the epoch loop carries from epoch to epoch (and a checkpoint holds)."""

    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float = -1.0
    best_state: dict[str, torch.Tensor] | None = None
    bad: int = 0
    frozen: bool = False


def start_model(cfg: TrainConfig, data: TileData, classes: Sequence[dict[str, Any]], pkg: Package | None, dev: torch.device) -> Start:
    """Build the model (seeded) and load its starting weights: a pretrained package, an encoder checkpoint,
    ImageNet weights, or none; on ``dev``. ``keep_pretrained`` relabels ``data`` here."""
    spec = model_spec(cfg, bands=data.bands, n_classes=len(classes), pretrained_spec=pkg.spec if pkg else None)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(spec)
    if pkg is not None:
        start = _from_package(cfg, data, classes, pkg, model, spec, dev)
    else:
        mean, std = raw_pixel_scaling(data.bands) if spec.raw_input else data.band_stats()
        start = Start(model, spec, mean, std)
        if cfg.encoder_checkpoint:
            load_encoder_checkpoint(model, cfg.encoder_checkpoint)
            start.encoder_init = {"source": "checkpoint", "file": str(cfg.encoder_checkpoint)}
        elif cfg.encoder_weights == "imagenet":  # refused with the backbones that have them for any other (linknet34_mtl's ResNet-34 too)
            start.encoder_init = load_imagenet_encoder(model, spec.backbone)
            start.mean, start.std = imagenet_input_scaling(data.bands)  # the scaling the weights were trained with
        if cfg.freeze and not cfg.encoder_checkpoint and not cfg.encoder_weights:
            log.warning("freeze is set but there is no pretrained model or encoder checkpoint: the encoder stays random")
    model.to(dev)
    if channels_last(dev):
        model.to(memory_format=torch.channels_last)
    return start


def _from_package(cfg: TrainConfig, data: TileData, classes: Sequence[dict[str, Any]], pkg: Package, model: MultiTaskRoadModel, spec: ModelSpec, dev: torch.device) -> Start:
    """Load a pretrained package's weights into ``model``: what does not fit the new data starts fresh, nothing else may differ."""
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
    if cfg.keep_pretrained:
        added = keep_pretrained_roads(pkg, data, dev, cfg.keep_threshold, cfg.batch_size)
        log.info("keep_pretrained: %d background pixel(s) the pretrained model calls road become road labels", added)
    parent = {"path": str(pkg.path), "weights_sha256": pkg.weights_sha256, "name": pkg.path.name,
              "tensors": {"loaded": len(state), "reinitialised": dropped}}
    if pkg.reference_emd is not None:
        parent["reference_emd"] = pkg.reference_emd
    log.info("starting from pretrained package %s (sha256 %s…)", pkg.path, pkg.weights_sha256[:12])
    if cfg.encoder_weights or cfg.encoder_checkpoint:
        log.info("training.encoder_weights / encoder_checkpoint not used: the encoder starts from the pretrained model")
    # The encoder was trained on inputs normalised as the package says; its lineage says where it started.
    return Start(model, spec, pkg.mean, pkg.std, parent, (pkg.emd.get("roadxfer") or {}).get("encoder_init"))


def add_rehearsal(data: TileData, folders: Sequence[str | Path], classes: Sequence[dict[str, Any]], cfg: TrainConfig, n_train: int) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Append the rehearsal tiles to ``data``; returns their indexes and what the package records of them."""
    if not folders:
        return np.zeros(0, np.int64), None
    old = _read_tiles(folders, classes, cfg)
    idx = append_tiles(data, old)
    if cfg.rehearsal_open is not None:
        seg_old = data.seg[idx[0]:]  # a view: the rehearsal tiles are appended last
        seg_old[seg_old == 0] = UNLABELLED_VALUE
    drawn = rehearsal_count(n_train, len(idx), cfg.rehearsal_fraction)
    log.info("rehearsal: %d tile(s) of the pretrained domain from %d folder(s); %d of each epoch's %d tiles drawn from them",
             len(old), len(folders), drawn, n_train + drawn)
    return idx, {"sources": old.sources, "scenes": old.scenes, "tiles": len(old), "fraction": cfg.rehearsal_fraction}


def resume(ckpt: dict[str, Any] | None, digest: str, model: MultiTaskRoadModel, cfg: TrainConfig, where: Path) -> Progress:
    """Where the epoch loop starts: a checkpoint of the same settings and data, or epoch 0."""
    progress = Progress(frozen=cfg.freeze)
    if ckpt is None:
        return progress
    if ckpt.get("digest") != digest:
        log.warning("%s belongs to other settings or data: starting over", where)
        return progress
    progress = Progress(ckpt["epoch"] + 1, ckpt["history"], ckpt["best"], ckpt["best_state"], ckpt["bad"], ckpt["frozen"])
    model.load_state_dict(ckpt["model"])
    log.info("resuming from %s after epoch %d", where, progress.start_epoch)
    return progress


def run_epoch(model: MultiTaskRoadModel, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, batches: list[list[int]], loader: torch.utils.data.DataLoader,
              epoch: int, dev: torch.device, cfg: TrainConfig, net: torch.nn.Module, world: int) -> tuple[float, int]:
    """One epoch of optimiser steps; returns the summed loss and the tile count over every process."""
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
    return total, n


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
    if processes > 1 and not is_distributed():
        return _spawn(processes, {"datasets": list(datasets), "out_package": out_package, "cfg": cfg, "classes": list(classes), "pretrained": pretrained,
                                  "workdir": workdir, "threads": threads, "device": device, "rehearsal": list(rehearsal)})
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    workers = set_threads(threads)
    dev = pick_device(device)

    # Phase 1: data and model.
    data = _read_tiles(datasets, classes, cfg)
    radiometry = training_record(data.radiometry, data.sources, data.source_bands)  # datasets rescaled alike, checked before training
    start = start_model(cfg, data, classes, load_package(pretrained) if pretrained else None, dev)
    model = start.model
    precision = amp_dtype(dev, cfg.precision)
    log.info("precision: %s%s", precision_name(precision), " autocast" if precision else "")
    attach_io(model, start.mean, start.std, cfg.orientation_bin_size, dev)

    # Phase 2: tiles of each epoch (training, rehearsal) and of validation.
    train_idx, val_idx = split(data, val_fraction=cfg.val_fraction, mode=cfg.val_split, seed=cfg.seed)
    rehearsal_idx, rehearsal_record = add_rehearsal(data, rehearsal, classes, cfg, len(train_idx))
    train_set = TrainSet(data, train_idx, Augment(**cfg.augment), cfg.orientation_bin_size, cfg.seed)
    val_set = TrainSet(data, val_idx, None, cfg.orientation_bin_size, cfg.seed)
    drop_last = len(train_set) > cfg.batch_size or world > 1  # every process needs its share of every batch
    if world > 1 and len(train_set) < cfg.batch_size:
        raise InputError(data.sources[0], f"{len(train_set)} training tiles do not fill one global batch of {cfg.batch_size} for {world} processes", "train on one process or add data")
    loader_kw = {"num_workers": workers, "pin_memory": dev.type == "cuda", "persistent_workers": workers > 0}
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False, **loader_kw)

    def epoch_loader(epoch: int) -> tuple[list[list[int]], torch.utils.data.DataLoader]:
        """The epoch's batches (this rank's share) and their loader: tiles, rehearsal draw, order and augmentation seeded by the epoch."""
        train_set.epoch = epoch
        train_set.indexes = epoch_indexes(train_idx, rehearsal_idx, cfg.rehearsal_fraction, seed=cfg.seed, epoch=epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        batches = global_batches(len(train_set), cfg.batch_size, gen, drop_last=drop_last, rank=rank, world=world)
        return batches, torch.utils.data.DataLoader(train_set, batch_sampler=batches, **loader_kw)

    # Phase 3: resume from a checkpoint of the same settings and data.
    data_sha256 = data_digest(data)  # hashes every tile: once
    digest = settings_digest({"cfg": {k: v for k, v in asdict(cfg).items() if k not in RESUME_NEUTRAL}, "classes": list(classes), "data": data_sha256, "parent": start.parent})
    workdir = Path(workdir) if workdir else Path(out_package).with_name(f".{Path(out_package).name}.work")
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = workdir / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path)
    progress = resume(ckpt, digest, model, cfg, ckpt_path)
    model.freeze_encoder(progress.frozen, train_bn=cfg.train_bn, trainable=cfg.trainable_stages)
    net = parallel(model, world, dev)

    # Phase 4: the learning rate (found by the range test once, before the first epoch) and the optimiser.
    lr_found, lr_curve = None, []
    if cfg.lr == "auto":
        if progress.start_epoch:  # found before the checkpoint: not searched again
            lr_found, lr_curve = ckpt["lr_found"], ckpt["lr_curve"]
        else:
            def probe() -> Iterator[Sequence[torch.Tensor]]:  # epochs of their own: the training's draws stay as they were
                for k in itertools.count(1_000_000):
                    yield from epoch_loader(k)[1]

            batches = probe()
            try:
                lr_found, lr_curve = find_lr(model, batches, dev, cfg, encoder_trainable=not progress.frozen, forward=net)
            finally:
                batches.close()  # its loader's workers go now, not at garbage collection
            log.info("lr auto: %.3g (fastai's valley rule on a range test of %d steps)", lr_found, len(lr_curve))
    run_cfg = replace(cfg, lr=lr_found) if lr_found is not None else cfg  # the settings training runs with
    optimizer = make_optimizer(model, run_cfg, encoder_trainable=not progress.frozen)
    if progress.start_epoch:
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
    scaler = make_scaler(dev, precision)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("training %s/%s on %s: %d train / %d val tiles, %d trainable parameters, encoder %s", cfg.arch, cfg.backbone, dev, len(train_idx), len(val_idx), n_params, "frozen" if progress.frozen else "trainable")

    # Phase 5: the epoch loop.
    stopped_early = False
    saved_at = time.monotonic()
    history = progress.history
    with stop_requests() as stop_requested:
        for epoch in range(progress.start_epoch, cfg.epochs):
            if cfg.freeze and cfg.unfreeze_after is not None and progress.frozen and epoch >= cfg.unfreeze_after:
                progress.frozen = False
                model.freeze_encoder(False)
                optimizer = make_optimizer(model, run_cfg, encoder_trainable=True)
                net = parallel(model, world, dev)  # DDP registers the parameters that need gradients when it is built
                log.info("epoch %d: encoder unfrozen, lr x%g for it", epoch + 1, cfg.unfreeze_lr_factor)
            t0 = time.perf_counter()
            batches, loader = epoch_loader(epoch)
            total, n = run_epoch(model, optimizer, scaler, batches, loader, epoch, dev, cfg, net, world)
            metrics = {"epoch": epoch + 1, "train_loss": total / max(n, 1), **(evaluate(model, val_loader, dev, cfg) if len(val_idx) else {"val_loss": float("nan"), "val_road_iou": float("nan"), "val_orient_acc": float("nan"), "val_orient_acc1": float("nan")})}
            if not math.isfinite(metrics["train_loss"]):  # every rank has the same sum: all stop here
                raise InputError(out_package, f"training diverged in epoch {epoch + 1}: the loss is {metrics['train_loss']} (no package is written; the checkpoint of the last good epoch is kept)",
                                 "lower training.lr (e.g. by 10x), or use training.precision: fp32; then run again")
            metrics["seconds"] = time.perf_counter() - t0
            metrics["lr"] = optimizer.param_groups[0]["lr"]  # at the epoch's last step
            metrics["encoder_frozen"] = progress.frozen
            history.append(metrics)
            score = metrics["val_road_iou"] if len(val_idx) else -metrics["train_loss"]
            improved = score > progress.best
            if improved:
                progress.best, progress.bad = score, 0
                progress.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            else:
                progress.bad += 1
            log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_road_iou %.4f  val_orient_acc %.3f (within one bin %.3f)  %.1fs (%.1f tiles/s)  %s%s",
                     epoch + 1, cfg.epochs, metrics["train_loss"], metrics["val_loss"], metrics["val_road_iou"], metrics["val_orient_acc"], metrics["val_orient_acc1"], metrics["seconds"], n / metrics["seconds"],
                     eta_text([m["seconds"] for m in history[progress.start_epoch:]], cfg.epochs - epoch - 1), "  *best*" if improved else "")
            stop = stop_requested()
            if world > 1:  # every rank stops at the same epoch
                flag = torch.tensor([int(stop)])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag)
            early = bool(cfg.patience and progress.bad >= cfg.patience)
            last = epoch + 1 >= cfg.epochs or early
            # Every epoch's checkpoint cost a demo epoch 7% (about 200 MB written); the last epoch's is never read.
            if rank == 0 and not last and (stop or time.monotonic() - saved_at >= cfg.checkpoint_seconds):
                saved_at = time.monotonic()
                save_checkpoint(ckpt_path, {"digest": digest, "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": history, "best": progress.best,
                                            "best_state": progress.best_state, "bad": progress.bad, "frozen": progress.frozen, "rng": {"torch": torch.get_rng_state()},
                                            "lr_found": lr_found, "lr_curve": lr_curve})
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

    # Phase 6: the best epoch's weights, written as a package by rank 0.
    model.load_state_dict(progress.best_state)
    best_metrics = max(history, key=lambda m: m["val_road_iou"] if len(val_idx) else -m["train_loss"])
    if rank != 0:
        return best_metrics
    provenance = {"parent": start.parent, "encoder_init": start.encoder_init,
                  "training_data": {"sources": data.sources, "scenes": data.scenes[: len(data.sources)], "tiles": len(data) - len(rehearsal_idx), "sha256": data_sha256},
                  "rehearsal": rehearsal_record, "radiometry": radiometry,
                  "training_config": asdict(cfg), "lr_found": lr_found, "code_version": code_version(), "roadxfer_version": __version__,
                  "epochs_run": len(history), "stopped_early": stopped_early, "best": best_metrics, "history": history, "device": str(dev), "processes": world,
                  "precision": precision_name(precision)}
    write_result(out_package, start, data, classes, cfg, provenance, workdir, lr_curve, lr_found)
    log.info("wrote %s (best epoch %d, val road IoU %.4f)", out_package, best_metrics["epoch"], best_metrics["val_road_iou"])
    return best_metrics


def write_result(out_package: str | Path, start: Start, data: TileData, classes: Sequence[dict[str, Any]], cfg: TrainConfig, provenance: dict[str, Any],
                 workdir: Path, lr_curve: list[tuple[float, float]], lr_found: float | None) -> None:
    """The package (weights, .emd with its provenance, training curves), committed atomically; then the work folder goes."""
    spec = start.spec
    bin_size = 360 // spec.orientation_bins if spec.reference_layout else cfg.orientation_bin_size
    emd = build_emd(Path(out_package).name, spec, tile_size=data.tile_size, classes=list(classes), bin_size=bin_size, mean=start.mean, std=start.std,
                    cell_size=data.cell_size, provenance=provenance)
    extras = write_curves(workdir, provenance["history"])
    if lr_curve:
        extras.update(write_lr_curve(workdir, lr_curve, lr_found))
    write_package(out_package, start.model, emd, extras=extras, zip_dlpk=cfg.zip_dlpk)
    shutil.rmtree(workdir, ignore_errors=True)


def _read_tiles(folders: Sequence[str | Path], classes: Sequence[dict[str, Any]], cfg: TrainConfig) -> TileData:
    """Tile folders in memory (staged to node-local scratch first if asked), sources named as configured."""
    with stage(folders, cfg.stage_tiles) as local:
        data = load_tiles(local, classes, orientation_bin_size=cfg.orientation_bin_size)
    data.sources = [str(d) for d in folders]
    return data
