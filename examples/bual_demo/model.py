"""A compact 2D U-Net with dropout (for MC dropout) and the EMA teacher."""

from __future__ import annotations

import copy

import torch
from torch import nn


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

    Dropout rates grow with depth (``0.05 .. 0.3``, as in SSL4MIS's U-Net encoder) so that
    Monte Carlo dropout has something to sample. Input sides must be divisible by
    ``2 ** (levels - 1)``.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 3, base: int = 16, levels: int = 3
    ) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(levels)]
        rates = [min(0.05 * 2**i, 0.3) for i in range(levels)]
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
