"""Guide: the drop-in snippet of the quick start, runnable on its own.

Random logits stand in for a student and a teacher network; the loss call is exactly the one
you paste into a trainer:

    python examples/guides/drop_in.py --steps 3
"""

from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    num_classes, shape = 4, (64, 64)  # any number of spatial dims works: (D, H, W) too
    student_labeled_logits = torch.randn(2, num_classes, *shape, requires_grad=True)
    labels = torch.randint(0, num_classes, (2, *shape))
    student_unlabeled_logits = torch.randn(2, num_classes, *shape, requires_grad=True)
    teacher_unlabeled_logits = torch.randn(2, num_classes, *shape)

    for iteration in range(args.steps):
        # --8<-- [start:snippet]
        from bual_losses import bidirectional_loss

        loss = bidirectional_loss(
            student_labeled_logits,  # (B_l, C, *S) student, labeled images
            labels,  # (B_l, *S) integer labels
            student_unlabeled_logits,  # (B_u, C, *S) student, unlabeled images
            teacher_unlabeled_logits,  # (B_u, C, *S) teacher (e.g. EMA), same images
            step=iteration,  # drives the threshold and weight schedules
            total_steps=30000,  # length of the ramps (SSL4MIS: max_iterations)
        )
        loss.backward()
        # --8<-- [end:snippet]
        print(f"step {iteration}: loss {loss.item():.4f}")

    # --8<-- [start:module]
    from bual_losses import BidirectionalLoss

    criterion = BidirectionalLoss(total_steps=30000, alpha=1.0, beta=0.0)  # checked here
    loss, parts = criterion(
        student_labeled_logits,
        labels,
        student_unlabeled_logits,
        teacher_unlabeled_logits,
        step=iteration,
        return_parts=True,
    )
    print(f"labeled {parts.labeled_loss.item():.4f}, unlabeled {parts.unlabeled_loss.item():.4f}")
    print(f"emphasised {parts.labeled_high_fraction.item():.1%} of the labeled voxels")
    print(f"trusted {parts.unlabeled_low_fraction.item():.1%} of the unlabeled voxels")
    # --8<-- [end:module]
    return loss.item()


if __name__ == "__main__":
    main()
