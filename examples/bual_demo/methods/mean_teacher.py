"""Mean teacher: supervised loss + lambda * the mean squared distance between the student's
and the EMA teacher's softmax on the unlabeled batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bual_losses import region_ce_dice_loss

from ._base import SemiBatch, log_pseudo_label_error, semi_batch

if TYPE_CHECKING:
    from ..train import Run


def sup_and_distance(run: Run, b: SemiBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The supervised loss and the per-voxel squared softmax distance ``(B, H, W)``."""
    w = run.cfg.ce_dice_weight
    sup = region_ce_dice_loss(b.zl, b.yl, ignore_index=run.data.ignore_index, lambda_ce=w,
                              lambda_dice=w)  # fmt: skip
    dist_sq = (b.zu.softmax(1) - b.zt.softmax(1)).pow(2).mean(1)  # (B, H, W)
    return sup, dist_sq


def loss(run: Run, xl: torch.Tensor, yl: torch.Tensor, log: dict[str, float]) -> torch.Tensor:
    b = semi_batch(run, xl, yl, log)
    sup, dist_sq = sup_and_distance(run, b)
    cons = dist_sq.mean()
    value = sup + b.lam * cons
    log.update(sup=sup.item(), cons=cons.item())
    log_pseudo_label_error(run, b, torch.ones_like(b.yu, dtype=torch.bool), log)
    return value
