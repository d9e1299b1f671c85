r"""Region-weighted cross-entropy + soft Dice: the public loss functions.

Each function checks its arguments once (``bual_losses._core``), then
[`bual_losses.engines`][] runs the engine that ``impl`` picks for the logits' device: the
reference (plain eager ops), the CPU chunked engine ([`bual_losses.fused`][]) or the
accelerator engine. Every engine computes the same
[`RegionStats`][bual_losses.losses.RegionStats] (per-sample, per-class sums over the voxels,
defined there) and finishes them with the same code, so every option means the same thing on
every engine.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ._core import ClassWeight, Finish, RegionStats, check_options, parse_options
from .distributed import SyncDist, resolve_group
from .engines import region_loss

__all__ = [
    "SSL4MIS_DICE",
    "RegionStats",
    "region_ce_dice_loss",
    "region_ce_loss",
    "region_dice_loss",
]

SSL4MIS_DICE: dict[str, Any] = {
    "batch": True,
    "squared_pred": True,
    "include_background": True,
    "smooth_nr": 1e-5,
    "smooth_dr": 1e-5,
}
"""Options that reproduce SSL4MIS's ``DiceLoss`` (``utils/losses.py``).

Batch Dice, squared denominator, background included, smoothing 1e-5, mean over classes. Use
as ``region_dice_loss(logits, labels, **SSL4MIS_DICE)``; every function and module that takes
the Dice options accepts them.

Examples:
    >>> import torch
    >>> from bual_losses import SSL4MIS_DICE, region_dice_loss
    >>> SSL4MIS_DICE["batch"], SSL4MIS_DICE["squared_pred"], SSL4MIS_DICE["smooth_dr"]
    (True, True, 1e-05)
    >>> logits, labels = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8))
    >>> region_dice_loss(logits, labels, **SSL4MIS_DICE).shape  # one Dice per class, batch
    torch.Size([])
"""

# --------------------------------------------------------------------------------------------
# public functions


def region_ce_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    region_weight: Optional[torch.Tensor] = None,
    *,
    include_background: bool = True,
    softmax: Optional[bool] = None,
    sigmoid: Optional[bool] = None,
    squared_pred: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    lambda_ce: float = 1.0,
    lambda_dice: float = 1.0,
    reduction: str = "mean",
    class_weight: ClassWeight = None,
    ignore_index: Optional[int] = None,
    eps: float = 1e-8,
    impl: str = "auto",
    validate: bool = True,
    sync_dist: SyncDist = False,
) -> torch.Tensor:
    r"""Region-weighted cross-entropy plus soft Dice, from logits.

    $$
    L = \lambda_{ce}\,\frac{\sum_v w_v\,\omega_{y_v}\,(-\log p_{y_v,v})}
                          {\sum_v w_v\,\omega_{y_v} + \epsilon}
      + \lambda_{dice}\,\operatorname{mean}_{b,c}\ \omega_c\Big(1 -
        \frac{2\sum_v w_v p_{c,v} g_{c,v} + s_{nr}}
             {\sum_v w_v p_{c,v}^k + \sum_v w_v g_{c,v}^k + s_{dr}}\Big)
    $$

    The activation (softmax, or sigmoid for binary ``C == 1`` logits) is applied before weighting;
    logits are never masked. With ``region_weight`` all ones the value equals MONAI's
    ``DiceCELoss(to_onehot_y=True, softmax=True, ...)`` with the same options.

    Args:
        logits: ``(B, C, *S)`` raw scores, any number of spatial dims. ``C == 1`` is a binary
            model (sigmoid), treated as two classes ``[1 - p, p]`` for cross-entropy and Dice on
            the foreground channel (as MONAI does).
        target: labels ``(B, *S)`` or ``(B, 1, *S)`` (integer, or float with integral values),
            or per-class probabilities ``(B, C, *S)`` (one-hot or soft); for binary logits a
            floating ``(B, 1, *S)`` target is the foreground probability.
        region_weight: ``(B, *S)`` or ``(B, 1, *S)`` non-negative weights (float or bool);
            ``B`` may be 1 to broadcast over the batch. ``None`` means all ones.
        include_background: keep class 0 in the Dice term (cross-entropy always uses all
            classes, as in MONAI).
        softmax: force softmax (``C >= 2``); by default inferred from ``C``.
        sigmoid: force sigmoid (``C == 1``); by default inferred from ``C``.
        squared_pred: use squares in the Dice denominator (``k = 2``; V-Net / SSL4MIS style).
        smooth_nr: added to the Dice numerator.
        smooth_dr: added to the Dice denominator.
        batch: sum the Dice statistics over the batch before the ratio (one Dice per class)
            instead of one Dice per sample and class.
        lambda_ce: weight of the cross-entropy term.
        lambda_dice: weight of the Dice term.
        reduction: ``"mean"`` (a scalar as above), ``"sum"`` (the CE numerator summed over
            voxels plus the Dice terms summed over samples and classes, as MONAI's ``"sum"``) or
            ``"none"`` (shape ``(B,)``: per-sample CE normalised by that sample's weight plus the
            class-mean Dice of that sample; needs ``batch=False``).
        class_weight: ``C`` non-negative class weights (MONAI's ``weight``), 2 for binary
            logits. They scale the CE per voxel by the weight of its class (and normalise by the
            same, as PyTorch's ``CrossEntropyLoss``) and multiply each class's Dice term (as
            MONAI; with ``include_background=False`` the first entry is dropped for Dice).
        ignore_index: a label value whose voxels are excluded from both terms (labels only).
        eps: keeps the CE normaliser away from 0; an empty region gives exactly 0.
        impl: ``"fused"`` (one autograd node: the chunked CPU engine [`bual_losses.fused`][]
            on CPU, the launch-lean accelerator engine elsewhere; see
            [`bual_losses.engines`][]), ``"reference"`` (plain eager ops) or ``"auto"`` (the
            default, ``"fused"``).
        validate: run the value checks (label range, finite logits, non-negative weights).
        sync_dist: ``False`` (default: this process's batch only, no collective), ``True`` (the
            default ``torch.distributed`` process group) or a ``ProcessGroup``: the CE
            normaliser, the batch-Dice class sums and the mean over per-sample Dice terms are
            summed over the ranks (differentiably), so every rank gets the loss of the
            concatenated batch; see [`bual_losses.distributed`][]. ``reduction="none"``
            stays per rank.

    Returns:
        A scalar tensor (``(B,)`` for ``reduction="none"``), float32 for half-precision logits.

    Examples:
        >>> import torch
        >>> from bual_losses import region_ce_dice_loss
        >>> logits = torch.randn(2, 3, 8, 8, requires_grad=True)
        >>> labels = torch.randint(0, 3, (2, 8, 8))
        >>> weight = torch.rand(2, 8, 8)
        >>> loss = region_ce_dice_loss(logits, labels, weight)
        >>> loss.backward()
        >>> loss.shape
        torch.Size([])
    """
    check_options(
        lambda_ce=lambda_ce,
        lambda_dice=lambda_dice,
        reduction=reduction,
        batch=batch,
        sync_dist=sync_dist,
    )
    group = resolve_group(sync_dist)
    opts = parse_options(
        logits,
        target,
        region_weight,
        include_background=include_background,
        softmax=softmax,
        sigmoid=sigmoid,
        squared_pred=squared_pred,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
        batch=batch,
        class_weight=class_weight,
        ignore_index=ignore_index,
        eps=eps,
        impl=impl,
        validate=validate,
    )
    spec = Finish(float(lambda_ce), float(lambda_dice), reduction, group)
    return region_loss(logits, target, region_weight, opts, spec, impl=impl, validate=validate)[0]


def region_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    region_weight: Optional[torch.Tensor] = None,
    *,
    softmax: Optional[bool] = None,
    sigmoid: Optional[bool] = None,
    reduction: str = "mean",
    class_weight: ClassWeight = None,
    ignore_index: Optional[int] = None,
    eps: float = 1e-8,
    impl: str = "auto",
    validate: bool = True,
    sync_dist: SyncDist = False,
) -> torch.Tensor:
    r"""Region-weighted cross-entropy: $\sum_v w_v\,ce_v / (\sum_v w_v + \epsilon)$.

    Exactly 0, with zero (finite) gradients, when the region is empty. With class weights the
    per-voxel CE and the normaliser are scaled by the weight of the voxel's class, as PyTorch's
    ``CrossEntropyLoss(weight=...)``.

    Args:
        logits: ``(B, C, *S)``; see
            [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        target: labels or per-class probabilities; see
            [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        region_weight: ``(B, *S)`` / ``(B, 1, *S)`` non-negative weights, or ``None``.
        softmax: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        sigmoid: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        reduction: ``"mean"`` (normalised as above), ``"sum"`` ($\sum_v w_v ce_v$) or
            ``"none"`` (per-sample normalised CE, shape ``(B,)``).
        class_weight: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        ignore_index: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        eps: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        impl: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        validate: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        sync_dist: normalise by the weight of all ranks' batches (see
            [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss]).

    Returns:
        A scalar tensor, or ``(B,)`` for ``reduction="none"``.

    Examples:
        >>> import torch
        >>> from bual_losses import region_ce_loss
        >>> logits = torch.zeros(1, 2, 2, 2)
        >>> labels = torch.zeros(1, 2, 2, dtype=torch.long)
        >>> round(region_ce_loss(logits, labels).item(), 4)  # ln 2
        0.6931
    """
    return region_ce_dice_loss(
        logits,
        target,
        region_weight,
        softmax=softmax,
        sigmoid=sigmoid,
        lambda_ce=1.0,
        lambda_dice=0.0,
        reduction=reduction,
        class_weight=class_weight,
        ignore_index=ignore_index,
        eps=eps,
        impl=impl,
        validate=validate,
        sync_dist=sync_dist,
    )


def region_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    region_weight: Optional[torch.Tensor] = None,
    *,
    include_background: bool = True,
    softmax: Optional[bool] = None,
    sigmoid: Optional[bool] = None,
    squared_pred: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    reduction: str = "mean",
    class_weight: ClassWeight = None,
    ignore_index: Optional[int] = None,
    impl: str = "auto",
    validate: bool = True,
    sync_dist: SyncDist = False,
) -> torch.Tensor:
    r"""Region-weighted soft Dice loss per class.

    $$
    D_c = 1 - \frac{2\sum_v w_v p_{c,v} g_{c,v} + s_{nr}}
                   {\sum_v w_v p_{c,v}^k + \sum_v w_v g_{c,v}^k + s_{dr}}
    $$

    summed over the spatial dims (and the batch with ``batch=True``). A term whose denominator
    is exactly 0 (empty region or absent class with ``smooth_dr = 0``) is 0; otherwise the
    smoothing terms decide (with the defaults an empty region gives 0 and an absent class with
    predictions gives about 1, as in MONAI). Never NaN.

    Args:
        logits: ``(B, C, *S)``; see
            [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        target: labels or per-class probabilities; see
            [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        region_weight: ``(B, *S)`` / ``(B, 1, *S)`` non-negative weights, or ``None``.
        include_background: keep class 0.
        softmax: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        sigmoid: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        squared_pred: squares in the denominator (``k = 2``).
        smooth_nr: numerator smoothing.
        smooth_dr: denominator smoothing.
        batch: one Dice per class over the whole batch.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the terms, ``(B, K)`` or ``(K,)`` with
            ``batch=True``; ``K`` counts the classes kept).
        class_weight: multiplies each class's term (MONAI's ``weight``).
        ignore_index: label value excluded from the sums.
        impl: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        validate: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        sync_dist: batch-Dice class sums / the mean over samples over all ranks (see
            [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss]);
            ``reduction="none"`` stays per rank.

    Returns:
        A scalar tensor, or the per-class terms for ``reduction="none"``.

    Examples:
        >>> import torch
        >>> from bual_losses import region_dice_loss, SSL4MIS_DICE
        >>> logits = torch.randn(2, 4, 16, 16)
        >>> labels = torch.randint(0, 4, (2, 16, 16))
        >>> region_dice_loss(logits, labels, reduction="none").shape
        torch.Size([2, 4])
        >>> region_dice_loss(logits, labels, **SSL4MIS_DICE).shape
        torch.Size([])
    """
    check_options(reduction=reduction, sync_dist=sync_dist)
    group = resolve_group(sync_dist)
    opts = parse_options(
        logits,
        target,
        region_weight,
        include_background=include_background,
        softmax=softmax,
        sigmoid=sigmoid,
        squared_pred=squared_pred,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
        batch=batch,
        class_weight=class_weight,
        ignore_index=ignore_index,
        eps=1e-8,
        impl=impl,
        validate=validate,
    )
    spec = Finish(0.0, 1.0, reduction, group, dice_terms=True)
    return region_loss(logits, target, region_weight, opts, spec, impl=impl, validate=validate)[0]
