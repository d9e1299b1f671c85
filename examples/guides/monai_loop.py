"""Guide: bual_losses in a MONAI training loop (3D, mean teacher, MONAI network and metric).

A MONAI ``UNet`` segments synthetic 3D volumes. The supervised part first shows that
``RegionCEDiceLoss`` with no region weight *is* MONAI's ``DiceCELoss`` (same options, same
value), then the semi-supervised loop trains with ``BidirectionalLoss``. MONAI conventions are
kept: channel-first labels ``(B, 1, D, H, W)``, ``DiceMetric`` on one-hot predictions.

    python examples/guides/monai_loop.py --steps 100
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from monai.losses import DiceCELoss, MaskedDiceLoss
from monai.metrics import DiceMetric
from monai.networks import one_hot
from monai.networks.nets import UNet

from bual_losses import BidirectionalLoss, RegionCEDiceLoss, region_dice_loss
from bual_losses.pseudo import pseudo_labels


def synthetic_volumes(
    batch_size: int, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ball (class 1) with a smaller ball inside (class 2): images (B, 1, S, S, S), labels
    (B, 1, S, S, S) as MONAI's transforms produce them."""
    axis = torch.arange(float(size))
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    centre = size / 2 + (torch.rand(batch_size, 3, generator=generator) - 0.5) * size / 4
    c = centre[:, :, None, None, None]
    radius = ((zz - c[:, 0]) ** 2 + (yy - c[:, 1]) ** 2 + (xx - c[:, 2]) ** 2).sqrt()
    labels = (radius < 0.35 * size).long() + (radius < 0.18 * size).long()
    images = labels.float() / 2 + 0.2 * torch.randn(labels.shape, generator=generator)
    return images[:, None], labels[:, None]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--size", type=int, default=16, help="volume side (divisible by 4)")
    parser.add_argument("--labeled", type=int, default=2, help="labeled volumes per batch")
    parser.add_argument("--unlabeled", type=int, default=2, help="unlabeled volumes per batch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    # --8<-- [start:setup]
    student = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=3,
        channels=(8, 16, 32),
        strides=(2, 2),
        num_res_units=1,
        dropout=0.1,
    )
    teacher = copy.deepcopy(student).requires_grad_(False)  # EMA teacher

    # MONAI's DiceCELoss(to_onehot_y=True, softmax=True) == RegionCEDiceLoss() without weight
    monai_loss = DiceCELoss(to_onehot_y=True, softmax=True)
    region_loss = RegionCEDiceLoss()
    # the semi-supervised loss; total_steps sets the ramps of the thresholds and of lambda(t)
    loss_fn = BidirectionalLoss(total_steps=args.steps)
    # --8<-- [end:setup]

    images, labels = synthetic_volumes(args.labeled, args.size, gen)
    logits = student(images)
    a, b = monai_loss(logits, labels).item(), region_loss(logits, labels).item()
    print(f"MONAI DiceCELoss {a:.6f}  RegionCEDiceLoss {b:.6f}")
    assert abs(a - b) < 1e-5, (a, b)

    # --8<-- [start:masked]
    # MONAI's MaskedDiceLoss with a binary mask and one-hot targets == region_dice_loss with the
    # mask as region weight (with integer labels MONAI counts masked-out voxels as background)
    mask = (torch.rand(labels.shape, generator=gen) > 0.5).float()  # (B, 1, D, H, W)
    one_hot_labels = one_hot(labels, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = MaskedDiceLoss(softmax=True)(logits, one_hot_labels, mask).item()
    b = region_dice_loss(logits, labels, mask).item()
    # --8<-- [end:masked]
    print(f"MONAI MaskedDiceLoss {a:.6f}  region_dice_loss {b:.6f}")
    assert abs(a - b) < 1e-5, (a, b)

    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    for step in range(args.steps):
        x_l, y_l = synthetic_volumes(args.labeled, args.size, gen)
        x_u, _ = synthetic_volumes(args.unlabeled, args.size, gen)  # labels unused
        student.train()
        # --8<-- [start:step]
        logits_l, logits_u = student(torch.cat([x_l, x_u])).split([len(x_l), len(x_u)])
        with torch.no_grad():
            teacher_u = teacher(x_u + 0.05 * torch.randn_like(x_u))
        loss, parts = loss_fn(logits_l, y_l, logits_u, teacher_u, step=step, return_parts=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # EMA update of the teacher
            decay = min(1 - 1 / (step + 1), 0.99)
            for t, s in zip(teacher.parameters(), student.parameters()):
                t.mul_(decay).add_(s, alpha=1 - decay)
        # --8<-- [end:step]
        if step % 20 == 0 or step == args.steps - 1:
            print(
                f"step {step:4d}  loss {loss.item():.4f}  "
                f"trusted {parts.unlabeled_low_fraction.item():.1%}"
            )

    # evaluation with MONAI's metric on held-out volumes
    student.eval()
    x_test, y_test = synthetic_volumes(4, args.size, gen)
    with torch.no_grad():
        pred = pseudo_labels(student(x_test), dim=1).unsqueeze(1)
    metric = DiceMetric(include_background=False, reduction="mean")
    dice = metric(one_hot(pred, 3), one_hot(y_test, 3)).nanmean().item()
    print(f"test Dice (foreground classes) {dice:.3f}")
    return {"loss": loss.item(), "dice": dice}


if __name__ == "__main__":
    main()
