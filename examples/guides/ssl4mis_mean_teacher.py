"""Guide: bual_losses in an SSL4MIS-style mean-teacher loop.

The loop below is the skeleton of SSL4MIS's ``train_mean_teacher_2D.py`` /
``train_uncertainty_aware_mean_teacher_2D.py`` (labeled and unlabeled halves of one batch, an
EMA teacher fed a noisy copy of the unlabeled images, SGD with poly learning-rate decay). The
only change is the loss: SSL4MIS's ``0.5 * (CE + Dice) + lambda(t) * consistency`` becomes one
call to ``bidirectional_loss``. Synthetic 2D data and a tiny network keep it runnable anywhere:

    python examples/guides/ssl4mis_mean_teacher.py --steps 200
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from bual_losses import SSL4MIS_DICE, bidirectional_loss


class TinyUNet(nn.Module):
    """Two-level U-Net with dropout (stand-in for SSL4MIS's ``UNet``)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.enc = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.down = nn.Sequential(
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Dropout2d(0.1),
        )
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc(x)
        return self.head(self.dec(torch.cat([self.up(self.down(skip)), skip], dim=1)))


def synthetic_batch(
    batch_size: int, size: int, num_classes: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of nested discs (labels 0..C-1 from the outside in) plus noise."""
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    centre = size / 2 + (torch.rand(batch_size, 2, generator=generator) - 0.5) * size / 4
    radius = torch.sqrt((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2)
    labels = torch.zeros(batch_size, size, size, dtype=torch.long)
    for c in range(1, num_classes):
        labels += (radius < size * (0.45 - 0.1 * c)).long()
    images = labels.float()[:, None] / num_classes
    images += 0.15 * torch.randn(images.shape, generator=generator)
    return images, labels


@torch.no_grad()
def update_ema_variables(model: nn.Module, ema_model: nn.Module, alpha: float, step: int) -> None:
    """SSL4MIS's EMA update of the parameters: true average first, then exponential."""
    alpha = min(1 - 1 / (step + 1), alpha)
    for ema_param, param in zip(ema_model.parameters(), model.parameters()):
        ema_param.mul_(alpha).add_(param, alpha=1 - alpha)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="iterations to run")
    parser.add_argument(
        "--max-iterations", type=int, default=30000, help="SSL4MIS max_iterations: ramp length"
    )
    parser.add_argument("--labeled-bs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="labeled + unlabeled")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = TinyUNet(num_classes=args.num_classes)
    ema_model = TinyUNet(num_classes=args.num_classes)
    ema_model.load_state_dict(model.state_dict())
    for param in ema_model.parameters():
        param.detach_()  # SSL4MIS: the teacher is never trained by gradients
    base_lr = 0.01
    optimizer = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=0.9, weight_decay=1e-4)

    model.train()
    ema_model.train()  # SSL4MIS keeps the teacher in train mode (dropout on, as UA-MT)
    lb = args.labeled_bs
    for iter_num in range(args.steps):
        volume_batch, label_batch = synthetic_batch(
            args.batch_size, args.size, args.num_classes, gen
        )
        unlabeled_volume_batch = volume_batch[lb:]  # their labels are never used
        noise = torch.clamp(torch.randn_like(unlabeled_volume_batch) * 0.1, -0.2, 0.2)

        outputs = model(volume_batch)
        with torch.no_grad():
            ema_output = ema_model(unlabeled_volume_batch + noise)

        # --8<-- [start:loss]
        # SSL4MIS computes
        #   supervised_loss = 0.5 * (ce_loss(outputs[:lb], label_batch[:lb])
        #                            + dice_loss(outputs_soft[:lb], label_batch[:lb].unsqueeze(1)))
        #   loss = supervised_loss + consistency_weight * consistency_loss
        # The bidirectional loss replaces both lines (same CE + Dice weighting and Dice preset,
        # same sigmoid ramp of lambda(t) = 0.1 * sigmoid_rampup(t, max_iterations)):
        loss, parts = bidirectional_loss(
            outputs[:lb],  # student logits, labeled half
            label_batch[:lb],  # (B_l, H, W) integer labels
            outputs[lb:],  # student logits, unlabeled half
            ema_output,  # teacher logits of the same (noisy) images
            step=iter_num,
            total_steps=args.max_iterations,
            lambda_ce=0.5,
            lambda_dice=0.5,
            **SSL4MIS_DICE,
            return_parts=True,
        )
        # --8<-- [end:loss]

        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        update_ema_variables(model, ema_model, 0.99, iter_num)

        lr = base_lr * (1.0 - iter_num / args.max_iterations) ** 0.9  # SSL4MIS poly decay
        for group in optimizer.param_groups:
            group["lr"] = lr
        if iter_num % 50 == 0 or iter_num == args.steps - 1:
            print(
                f"iter {iter_num:5d}  loss {loss.item():.4f}  "
                f"labeled {parts.labeled_loss.item():.4f}  "
                f"unlabeled {parts.unlabeled_loss.item():.4f}  "
                f"lambda {parts.consistency_weight.item():.5f}  "
                f"tau {parts.low_threshold.mean().item():.3f}  "  # one per unlabeled image
                f"trusted {parts.unlabeled_low_fraction.item():.1%}  "
                f"emphasised {parts.labeled_high_fraction.item():.1%}"
            )
    return {"loss": loss.item()}


if __name__ == "__main__":
    main()
