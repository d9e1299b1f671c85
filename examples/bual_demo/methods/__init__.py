"""The training methods, one module each, behind a small registry: ``LOSSES[method]`` is the
loss of one training step,

    loss(run, xl, yl, log) -> torch.Tensor

called by ``Run.train_step`` under the step's autocast with the labeled batch already on the
run's device. It draws whatever else it needs from ``run.generator`` (on the CPU, so every
device sees the same numbers) and writes its scalars into ``log``. A new method is a module
here and one entry below (plus its name in ``examples.bual_demo``'s method lists).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from .. import ALL_METHODS
from . import bual, full, mean_teacher, supervised, uamt
from .bual import BUAL, bual_options

if TYPE_CHECKING:
    from ..train import Run

__all__ = ["BUAL", "LOSSES", "SEMI", "StepLoss", "bual_options"]

StepLoss = Callable[["Run", torch.Tensor, torch.Tensor, dict[str, float]], torch.Tensor]

LOSSES: dict[str, StepLoss] = {
    "supervised": supervised.loss,
    "full": full.loss,
    "mean_teacher": mean_teacher.loss,
    "uamt": uamt.loss,
    **{method: bual.loss for method in BUAL},
}
#: The methods with an EMA teacher.
SEMI = ("mean_teacher", "uamt", *BUAL)

assert set(LOSSES) == set(ALL_METHODS), "every method of examples.bual_demo needs a loss"
