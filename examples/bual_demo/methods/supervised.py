"""Supervised-only training: the region CE + Dice loss on the labeled batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bual_losses import region_ce_dice_loss

if TYPE_CHECKING:
    from ..train import Run


def loss(run: Run, xl: torch.Tensor, yl: torch.Tensor, log: dict[str, float]) -> torch.Tensor:
    w = run.cfg.ce_dice_weight
    value = region_ce_dice_loss(run.model(xl), yl, ignore_index=run.data.ignore_index,
                                lambda_ce=w, lambda_dice=w)  # fmt: skip
    log["sup"] = value.item()
    return value
