"""Learning-rate schedules (constant, fastai's one-cycle, cosine) and the LR range test (``lr: auto``)."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .device import amp_dtype
from .distributed import is_distributed
from .model import MultiTaskRoadModel
from .step import make_optimizer, make_scaler, train_step

if TYPE_CHECKING:
    from .train import TrainConfig

log = logging.getLogger(__name__)


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
            if is_distributed():
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

