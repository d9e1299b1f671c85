"""The fully supervised upper bound: every training slice labeled; the step sees as many
labeled images as a semi-supervised step sees images (labeled + unlabeled batch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import supervised

if TYPE_CHECKING:
    from ..train import Run


def loss(run: Run, xl: torch.Tensor, yl: torch.Tensor, log: dict[str, float]) -> torch.Tensor:
    x2, y2 = run.data.draw("all", run.cfg.unlabeled_batch, run.generator)
    xl, yl = torch.cat([xl, x2.to(run.device)]), torch.cat([yl, y2.to(run.device)])
    return supervised.loss(run, xl, yl, log)
