"""Thin ``nn.Module`` wrappers: options checked at construction, ``forward`` is one call.

Tensors given as options (class weights) are registered as buffers so they follow
``module.to(device)``; ``forward`` never mutates the module.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from . import _validation as V
from ._core import ClassWeight, check_options
from .bidirectional import BidirectionalParts, bidirectional_loss, check_bidirectional_options
from .losses import region_ce_dice_loss

__all__ = ["BidirectionalLoss", "RegionCEDiceLoss"]


class RegionCEDiceLoss(nn.Module):
    """Module form of [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].

    Same options, same defaults; they are checked here, at construction.

    Examples:
        >>> import torch
        >>> from bual_losses import RegionCEDiceLoss
        >>> loss_fn = RegionCEDiceLoss(include_background=False, class_weight=[1.0, 2.0, 2.0])
        >>> logits = torch.randn(2, 3, 16, 16, requires_grad=True)
        >>> loss_fn(logits, torch.randint(0, 3, (2, 16, 16)), torch.rand(2, 16, 16)).backward()
    """

    class_weight: Optional[torch.Tensor]

    def __init__(self, *, class_weight: ClassWeight = None, **options: Any) -> None:
        super().__init__()
        known = region_ce_dice_loss.__kwdefaults__ or {}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(
                f"RegionCEDiceLoss got unknown options {unknown}; see region_ce_dice_loss."
            )
        check_options(**options)
        self.options = options
        self.register_buffer("class_weight", V.class_weight_buffer(class_weight))

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        region_weight: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return region_ce_dice_loss(
            logits, target, region_weight, class_weight=self.class_weight, **self.options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class BidirectionalLoss(nn.Module):
    """Module form of [`bidirectional_loss`][bual_losses.bidirectional.bidirectional_loss].

    Same options, same defaults; they are checked here, at construction.

    Examples:
        >>> import torch
        >>> from bual_losses import BidirectionalLoss
        >>> loss_fn = BidirectionalLoss(total_steps=1000, alpha=1.0)
        >>> zl = torch.randn(2, 4, 32, 32, requires_grad=True)
        >>> zu = torch.randn(2, 4, 32, 32, requires_grad=True)
        >>> y, zt = torch.randint(0, 4, (2, 32, 32)), torch.randn(2, 4, 32, 32)
        >>> loss = loss_fn(zl, y, zu, zt, step=10)
        >>> loss.backward()
    """

    class_weight: Optional[torch.Tensor]

    def __init__(self, *, class_weight: ClassWeight = None, **options: Any) -> None:
        super().__init__()
        check_bidirectional_options(**options)
        self.options = options
        self.register_buffer("class_weight", V.class_weight_buffer(class_weight))

    def forward(
        self,
        student_labeled_logits: torch.Tensor,
        labels: torch.Tensor,
        student_unlabeled_logits: Optional[torch.Tensor],
        teacher_unlabeled_logits: Optional[torch.Tensor],
        *,
        step: Any,
        teacher_labeled_logits: Optional[torch.Tensor] = None,
        labeled_uncertainty: Optional[torch.Tensor] = None,
        unlabeled_uncertainty: Optional[torch.Tensor] = None,
        return_parts: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, BidirectionalParts]:
        return bidirectional_loss(
            student_labeled_logits,
            labels,
            student_unlabeled_logits,
            teacher_unlabeled_logits,
            step=step,
            teacher_labeled_logits=teacher_labeled_logits,
            labeled_uncertainty=labeled_uncertainty,
            unlabeled_uncertainty=unlabeled_uncertainty,
            return_parts=return_parts,
            class_weight=self.class_weight,
            **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
