"""UA-MT: mean teacher whose consistency counts only the voxels where the teacher's
MC-dropout entropy is below UA-MT's ramped threshold."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bual_losses import low_uncertainty_mask, region_fraction

from ._base import log_pseudo_label_error, mc_entropy, semi_batch
from .mean_teacher import sup_and_distance

if TYPE_CHECKING:
    from ..train import Run


def loss(run: Run, xl: torch.Tensor, yl: torch.Tensor, log: dict[str, float]) -> torch.Tensor:
    b, t = semi_batch(run, xl, yl, log), run.step
    sup, dist_sq = sup_and_distance(run, b)
    mask = low_uncertainty_mask(mc_entropy(run, b.xu), run.threshold, step=t).float()
    cons = (mask * dist_sq).sum() / (mask.sum() + 1e-8)
    log["low_fraction"] = region_fraction(mask).item()
    log["threshold"] = float(run.threshold(t))
    value = sup + b.lam * cons
    log.update(sup=sup.item(), cons=cons.item())
    log_pseudo_label_error(run, b, mask.bool(), log)
    return value
