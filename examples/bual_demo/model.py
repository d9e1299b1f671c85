"""A compact 2D U-Net with dropout (for MC dropout) and the EMA teacher."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

#: SSL4MIS's U-Net encoder dropout rates, one per level (16, 32, 64, 128, 256 channels):
#: ``params["dropout"]`` of ``UNet`` in HiLab-git/SSL4MIS ``code/networks/unet.py``. Use with
#: ``UNet2D(levels=5, dropout=SSL4MIS_DROPOUT)`` (SSL4MIS's decoder has no dropout; UNet2D's
#: decoder blocks keep the rate of their level).
SSL4MIS_DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


class ConvBlock(nn.Sequential):
    """(conv 3x3 -> BatchNorm -> LeakyReLU) x 2, with Dropout2d between the convolutions."""

    def __init__(self, cin: int, cout: int, dropout: float) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.LeakyReLU(0.01, inplace=True),
        )


class UNet2D(nn.Module):
    """U-Net with ``levels`` resolutions (``base * 2**i`` channels) and dropout in every block.

    Dropout rates grow with depth so that Monte Carlo dropout has something to sample: by
    default ``min(0.05 * 2**i, 0.3)`` at level ``i`` (``0.05 .. 0.3``, close to SSL4MIS's U-Net
    encoder); ``dropout`` sets the rate of every level (:data:`SSL4MIS_DROPOUT` for SSL4MIS's
    exact rates). A decoder block has the rate of its level. Input sides must be divisible by
    ``2 ** (levels - 1)``.

    Args:
        dropout: the Dropout2d rate of each level, ``levels`` numbers in ``[0, 1)``; ``None``
            keeps the default rates above.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        base: int = 16,
        levels: int = 3,
        *,
        dropout: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(levels)]
        if dropout is None:
            rates = [min(0.05 * 2**i, 0.3) for i in range(levels)]
        else:
            rates = [float(r) for r in dropout]
            if len(rates) != levels or not all(0.0 <= r < 1.0 for r in rates):
                raise ValueError(
                    f"`dropout` must be {levels} rates in [0, 1) (one per level, "
                    f"levels={levels}), got {tuple(dropout)}."
                )
        self.down = nn.ModuleList()
        cin = in_channels
        for width, rate in zip(widths, rates):
            self.down.append(ConvBlock(cin, width, rate))
            cin = width
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for width, rate in zip(reversed(widths[:-1]), reversed(rates[:-1])):
            self.up.append(nn.ConvTranspose2d(cin, width, 2, stride=2))
            self.merge.append(ConvBlock(2 * width, width, rate))
            cin = width
        self.head = nn.Conv2d(cin, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of the student (its parameters are only ever set by :func:`ema_update`)."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, step: int, decay: float = 0.99) -> None:
    """Mean-teacher EMA (SSL4MIS): ``alpha = min(1 - 1 / (step + 1), decay)``.

    Parameters are averaged; BatchNorm running statistics are copied from the student (the
    teacher runs in eval mode and needs statistics that match its weights).
    """
    alpha = min(1.0 - 1.0 / (step + 1), decay)
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)
