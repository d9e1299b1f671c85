"""A compact 2D U-Net and UA-MT's 3D V-Net, both with dropout (for MC dropout), and the EMA
teacher."""

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


def _conv_stage(convs: int, cin: int, cout: int) -> nn.Sequential:
    """``convs`` x (conv 3x3x3 -> BatchNorm3d -> ReLU), the first from ``cin`` channels."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1),
                   nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]  # fmt: skip
    return nn.Sequential(*layers)


def _resample(
    conv: type[nn.Conv3d] | type[nn.ConvTranspose3d], cin: int, cout: int
) -> nn.Sequential:
    """Halve (``nn.Conv3d``) or double (``nn.ConvTranspose3d``) the sides: kernel 2, stride 2,
    then BatchNorm3d -> ReLU."""
    return nn.Sequential(conv(cin, cout, 2, stride=2), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class VNet(nn.Module):
    """UA-MT's V-Net (yulequan/UA-MT ``code/networks/vnet.py``, ``normalization="batchnorm"``,
    ``has_dropout=True``), the network of its LA 3D protocol.

    Five encoder stages of 1, 2, 3, 3, 3 (conv 3x3x3 -> BatchNorm3d -> ReLU) with ``base``,
    ``2 base``, ``4 base``, ``8 base``, ``16 base`` channels, each but the last followed by a
    stride-2 kernel-2 convolution (-> BatchNorm3d -> ReLU) that halves the sides and doubles
    the channels. The decoder doubles the sides by a stride-2 kernel-2 transposed convolution
    (-> BatchNorm3d -> ReLU) whose output is *added* to the encoder feature of that
    resolution (not concatenated, as UA-MT), then runs 3, 3, 2, 1 convolutions; a 1x1x1
    convolution gives the logits. ``nn.Dropout3d(dropout)`` acts on the bottleneck features
    and on the last decoder features (before the output convolution), so that MC dropout
    (:func:`bual_losses.mc_dropout_uncertainty`) has something to sample; ``dropout=0`` builds
    no dropout module.

    Input: ``(B, in_channels, D, H, W)`` with ``D``, ``H``, ``W`` divisible by 16 (four
    halvings); output: ``(B, num_classes, D, H, W)`` logits.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 2, base: int = 16, dropout: float = 0.5
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be a rate in [0, 1), got {dropout!r}.")
        widths = [base * 2**i for i in range(5)]
        self.encoder = nn.ModuleList(
            _conv_stage(convs, in_channels if i == 0 else width, width)
            for i, (convs, width) in enumerate(zip((1, 2, 3, 3, 3), widths))
        )
        self.down = nn.ModuleList(_resample(nn.Conv3d, a, b) for a, b in zip(widths, widths[1:]))
        self.up = nn.ModuleList(
            _resample(nn.ConvTranspose3d, a, b) for a, b in zip(widths[:0:-1], widths[-2::-1])
        )
        self.decoder = nn.ModuleList(
            _conv_stage(convs, width, width) for convs, width in zip((3, 3, 2, 1), widths[-2::-1])
        )
        self.dropout: nn.Module = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Conv3d(base, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or any(side % 16 for side in x.shape[2:]):
            raise ValueError(
                f"`x` must be (B, C, D, H, W) with D, H, W divisible by 16, got {tuple(x.shape)}."
            )
        skips = []
        for i, stage in enumerate(self.encoder):
            x = stage(x if i == 0 else self.down[i - 1](x))
            skips.append(x)
        x = self.dropout(x)
        for up, stage, skip in zip(self.up, self.decoder, reversed(skips[:-1])):
            x = stage(up(x) + skip)
        return self.head(self.dropout(x))


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
