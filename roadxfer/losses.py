"""The multi-task loss (road mask, orientation, direction bins) and its direction accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import IGNORE_VALUE, UNLABELLED_VALUE
from .model import undirected_log_probs


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


def orientation_io(model: torch.nn.Module, ori_logits: torch.Tensor, ori_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's orientation as undirected log-probabilities, and the label targets in those classes.

    Label orientation comes in our 180-degree bins; ``model.orient_lut`` (set by
    :func:`attach_io`) maps it to the model's classes (the reference's 360-degree
    layout is folded by :func:`roadxfer.model.undirected_log_probs`).
    """
    return undirected_log_probs(ori_logits, reference_layout=model.spec.reference_layout), model.orient_lut[ori_t]

