r"""Region-weighted cross-entropy + soft Dice: the reference implementation (the oracle).

Every loss here is computed in two stages:

1. **statistics** ([`RegionStats`][bual_losses.losses.RegionStats]): per-sample, per-class
    sums over the voxels,

    $$
    \text{ce\_num}_b = \sum_v w_v \sum_c \omega_c\, g_{c,v}\,(-\log p_{c,v}),\qquad
    \text{ce\_den}_b = \sum_v w_v \sum_c \omega_c\, g_{c,v},
    $$

    $$
    I_{b,c} = \sum_v w_v\, p_{c,v}\, g_{c,v},\qquad
    P_{b,c} = \sum_v w_v\, p_{c,v}^k,\qquad
    G_{b,c} = \sum_v w_v\, g_{c,v}^k,
    $$

    with region weight $w$, class weight $\omega$, probabilities $p$ (softmax, or
    ``[1-sigmoid, sigmoid]`` for binary logits), target probabilities $g$ and $k = 2$ when
    ``squared_pred`` else 1;

2. **finishing** (``_finish``): the loss from these few numbers (CE normalisation, Dice per
    sample or over the batch, background exclusion, class weights, reduction).

The reference computes the statistics with plain eager ops; [`bual_losses.fused`][] computes
the same statistics in one memory-light autograd node. Both share stage 2, so every option
means the same thing on both paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from . import _validation as V
from .distributed import SyncDist, all_reduce_sum, check_sync_dist, resolve_group

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "SSL4MIS_DICE",
    "RegionStats",
    "region_ce_dice_loss",
    "region_ce_loss",
    "region_dice_loss",
]

ClassWeight = Union[Sequence[float], torch.Tensor, None]

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

_IMPLS = ("auto", "fused", "reference")


class RegionStats(NamedTuple):
    r"""Per-sample sums from which every region loss is finished (shapes ``(B,)`` / ``(B, K)``).

    ``K`` is ``C`` for softmax logits and 2 (background, foreground) for binary logits. The sums
    run over the voxels $v$ of each sample with the voxel weight $w_v$ (the region weight, 0 at
    ``ignore_index`` voxels), the class weights $\omega_c$, the probabilities $p_{c,v}$, the
    target probabilities $g_{c,v}$ and $k = 2$ with ``squared_pred`` (else 1); see the module
    docs. ``ce_den`` and ``ground`` do not depend on the logits and carry no gradient.

    Attributes:
        ce_num: ``(B,)`` numerator of the cross-entropy,
            $\sum_v w_v \sum_c \omega_c\, g_{c,v}\,(-\log p_{c,v})$.
        ce_den: ``(B,)`` its normaliser, the class-weighted size of the region,
            $\sum_v w_v \sum_c \omega_c\, g_{c,v}$.
        inter: ``(B, K)`` Dice intersection per class, $\sum_v w_v\, p_{c,v}\, g_{c,v}$.
        pred: ``(B, K)`` predicted mass per class, $\sum_v w_v\, p_{c,v}^k$.
        ground: ``(B, K)`` target mass per class, $\sum_v w_v\, g_{c,v}^k$.

    Examples:
        The sums written out for a batch without region weight (every voxel counts 1):

        >>> import torch
        >>> from bual_losses import RegionStats, region_ce_loss, region_dice_loss
        >>> logits = torch.randn(2, 3, 8, 8, dtype=torch.float64)
        >>> labels = torch.randint(0, 3, (2, 8, 8))
        >>> p = logits.softmax(1)
        >>> g = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).double()
        >>> stats = RegionStats(
        ...     ce_num=-(g * p.log()).sum((1, 2, 3)), ce_den=g.sum((1, 2, 3)),
        ...     inter=(p * g).sum((2, 3)), pred=p.sum((2, 3)), ground=g.sum((2, 3)),
        ... )
        >>> dice = 1 - (2 * stats.inter + 1e-5) / (stats.pred + stats.ground + 1e-5)
        >>> bool(torch.allclose(dice.mean(), region_dice_loss(logits, labels)))
        True
        >>> ce = stats.ce_num.sum() / (stats.ce_den.sum() + 1e-8)
        >>> bool(torch.allclose(ce, region_ce_loss(logits, labels)))
        True
    """

    ce_num: torch.Tensor
    ce_den: torch.Tensor
    inter: torch.Tensor
    pred: torch.Tensor
    ground: torch.Tensor


class _Options(NamedTuple):
    activation: str  # "softmax" | "sigmoid"
    kind: V.TargetKind
    class_weight: Optional[torch.Tensor]
    ignore_index: Optional[int]
    include_background: bool
    squared_pred: bool
    smooth_nr: float
    smooth_dr: float
    batch: bool
    eps: float


# --------------------------------------------------------------------------------------------
# validation of one call (metadata always, values when validate=True)


def check_options(
    *,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    eps: float = 1e-8,
    impl: str = "auto",
    lambda_ce: float = 1.0,
    lambda_dice: float = 1.0,
    reduction: str = "mean",
    batch: bool = False,
    sync_dist: Any = False,
    **_tensor_options: Any,
) -> None:
    """The checks of the scalar options, shared by the functions (per call) and the modules
    (at construction, so a bad configuration fails before the first batch)."""
    check_sync_dist(sync_dist)
    V.require_nonnegative_number(smooth_nr, "smooth_nr")
    V.require_nonnegative_number(smooth_dr, "smooth_dr")
    V.require_nonnegative_number(eps, "eps", positive=True)
    V.require_nonnegative_number(lambda_ce, "lambda_ce")
    V.require_nonnegative_number(lambda_dice, "lambda_dice")
    V.require_choice(impl, "impl", _IMPLS)
    V.require_reduction(reduction)
    if reduction == "none" and batch and lambda_dice != 0:
        raise ValueError(
            "`reduction='none'` gives one loss per sample and needs `batch=False`; "
            "batch Dice has no per-sample value."
        )


def _parse(
    logits: Any,
    target: Any,
    region_weight: Any,
    *,
    include_background: bool,
    softmax: Optional[bool],
    sigmoid: Optional[bool],
    squared_pred: bool,
    smooth_nr: float,
    smooth_dr: float,
    batch: bool,
    class_weight: ClassWeight,
    ignore_index: Optional[int],
    eps: float,
    impl: str,
    validate: bool,
) -> _Options:
    logits = V.require_logits(logits)
    kind = V.classify_target(target, logits)
    if region_weight is not None:
        V.require_region_weight(region_weight, logits)
    check_options(smooth_nr=smooth_nr, smooth_dr=smooth_dr, eps=eps, impl=impl)
    num_classes = logits.shape[1]
    activation = V.resolve_activation(num_classes, softmax, sigmoid)
    cw = None if class_weight is None else V.require_class_weight(class_weight, num_classes, logits)
    ignore = V.require_ignore_index(ignore_index, kind)
    if validate:
        # finiteness of the logits is checked on the statistics (see _stats): NaN or +Inf
        # logits always make them non-finite, and that costs O(B*C) instead of a pass over
        # the logits.
        if kind == "labels":
            V.check_labels(V.labels_view(target, logits), num_classes, ignore)
        else:
            V.check_probabilities(target)
        if region_weight is not None:
            V.check_nonnegative(region_weight, "region_weight")
    return _Options(
        activation=activation,
        kind=kind,
        class_weight=cw,
        ignore_index=ignore,
        include_background=bool(include_background),
        squared_pred=bool(squared_pred),
        smooth_nr=float(smooth_nr),
        smooth_dr=float(smooth_dr),
        batch=bool(batch),
        eps=float(eps),
    )


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions run in float32 for half-precision inputs, else in the input's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# --------------------------------------------------------------------------------------------
# stage 1, reference: plain eager ops


def target_probs(
    target: torch.Tensor, logits: torch.Tensor, opts: _Options, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target as class probabilities ``g`` (B, K, *S) and a validity mask (B, *S).

    Ignored voxels get ``g = 0`` and validity 0.
    """
    if opts.kind == "labels":
        labels = V.labels_view(target, logits)
        valid = torch.ones_like(labels, dtype=torch.bool)
        if opts.ignore_index is not None:
            valid = labels != opts.ignore_index
        num = max(logits.shape[1], 2)
        safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
        g = F.one_hot(safe, num).movedim(-1, 1).to(dtype) * valid.unsqueeze(1).to(dtype)
        return g, valid
    g = target.to(dtype)
    if opts.activation == "sigmoid":
        g = torch.cat([1 - g, g], dim=1)
    return g, torch.ones_like(g[:, 0], dtype=torch.bool)


def class_log_probs(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """``log p`` over K classes: log-softmax, or ``[log(1-sigmoid), log(sigmoid)]`` for binary."""
    if activation == "sigmoid":
        return torch.cat([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=1)
    return F.log_softmax(logits, dim=1)


def voxel_weight(
    region_weight: Optional[torch.Tensor],
    valid: torch.Tensor,
    logits: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Region weight times validity, ``(B, *S)`` in the accumulation dtype."""
    w = valid.to(dtype)
    if region_weight is not None:
        w = w * V.weight_view(region_weight, logits).to(dtype)
    return w


def reference_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    region_weight: Optional[torch.Tensor],
    opts: _Options,
) -> RegionStats:
    """Stage 1 with plain eager ops; the oracle for the fused path.

    [`fused_stats`][bual_losses.fused.fused_stats] must return the same statistics.
    """
    dtype = accumulation_dtype(logits.dtype)
    logp = class_log_probs(logits.to(dtype), opts.activation)
    p = logp.exp()
    g, valid = target_probs(target, logits, opts, dtype)
    w = voxel_weight(region_weight, valid, logits, dtype).unsqueeze(1)
    wg = w * g
    if opts.class_weight is not None:
        shape = (1, -1) + (1,) * (logits.ndim - 2)
        wg_ce = wg * opts.class_weight.to(dtype).view(shape)
    else:
        wg_ce = wg
    spatial = tuple(range(2, logits.ndim))
    power = 2 if opts.squared_pred else 1
    return RegionStats(
        # where(): a -inf logit at a class the target does not hold must give 0, not 0 * -inf
        ce_num=-torch.where(wg_ce != 0, wg_ce * logp, 0.0).sum(dim=(1, *spatial)),
        ce_den=wg_ce.sum(dim=(1, *spatial)),
        inter=(wg * p).sum(dim=spatial),
        pred=(w * p.pow(power)).sum(dim=spatial),
        ground=(w * g.pow(power)).sum(dim=spatial),
    )


# --------------------------------------------------------------------------------------------
# stage 2, shared by every path


def _ce_from_stats(stats: RegionStats, reduction: str, eps: float) -> torch.Tensor:
    if reduction == "sum":
        return stats.ce_num.sum()
    if reduction == "none":  # per sample
        return stats.ce_num / (stats.ce_den + eps)
    return stats.ce_num.sum() / (stats.ce_den.sum() + eps)


def _dice_terms(stats: RegionStats, opts: _Options) -> torch.Tensor:
    """Weighted Dice loss terms, ``(B, K')`` or ``(K',)`` with ``batch=True``."""
    inter, pred, ground = stats.inter, stats.pred, stats.ground
    if opts.batch:
        inter, pred, ground = inter.sum(0), pred.sum(0), ground.sum(0)
    cw = opts.class_weight
    if opts.activation == "sigmoid":
        # binary logits: Dice on the foreground channel only (as MONAI with C == 1)
        inter, pred, ground, cw = inter[..., 1:], pred[..., 1:], ground[..., 1:], None
    elif not opts.include_background:
        inter, pred, ground = inter[..., 1:], pred[..., 1:], ground[..., 1:]
        cw = None if cw is None else cw[1:]
    numerator = 2 * inter + opts.smooth_nr
    denominator = pred + ground + opts.smooth_dr
    # Empty-denominator policy: a term with nothing predicted, nothing to find and no smoothing
    # (only possible with smooth_dr = 0) counts as perfectly segmented: loss 0, zero gradient.
    empty = denominator <= 0
    score = torch.where(
        empty,
        torch.ones_like(numerator),
        numerator / torch.where(empty, torch.ones_like(denominator), denominator),
    )
    terms = 1 - score
    if cw is not None:
        terms = terms * cw.to(terms.dtype)
    return terms


def _dice_from_stats(stats: RegionStats, opts: _Options, reduction: str) -> torch.Tensor:
    terms = _dice_terms(stats, opts)
    if reduction == "sum":
        return terms.sum()
    if reduction == "none":
        return terms
    return terms.mean()


def _finish(
    stats: RegionStats,
    opts: _Options,
    *,
    lambda_ce: float,
    lambda_dice: float,
    reduction: str,
    group: Optional[ProcessGroup] = None,
) -> torch.Tensor:
    if reduction == "none":  # per sample, hence per rank: nothing to synchronise
        ce = _ce_from_stats(stats, "none", opts.eps)
        dice = _dice_terms(stats, opts).mean(-1) if lambda_dice != 0 else torch.zeros_like(ce)
        return lambda_ce * ce + lambda_dice * dice
    if group is not None:
        return _finish_global(stats, opts, lambda_ce, lambda_dice, reduction, group)
    out = stats.ce_num.new_zeros(())
    if lambda_ce != 0:
        out = out + lambda_ce * _ce_from_stats(stats, reduction, opts.eps)
    if lambda_dice != 0:
        out = out + lambda_dice * _dice_from_stats(stats, opts, reduction)
    return out


def _finish_global(
    stats: RegionStats,
    opts: _Options,
    lambda_ce: float,
    lambda_dice: float,
    reduction: str,
    group: ProcessGroup,
) -> torch.Tensor:
    """``_finish`` ("mean" / "sum") over the batches of all ranks of ``group``.

    The sums the loss needs (CE numerator and normaliser; the class sums of batch Dice, or the
    sum and the number of the per-sample Dice terms) are packed into one vector and summed over
    the ranks by one differentiable all-reduce, so the value is the single-process loss on the
    concatenated batch and each rank's gradient is ``R`` times its single-process slice.
    """
    dice_batch = opts.batch and lambda_dice != 0
    sums = [stats.ce_num.sum().reshape(1), stats.ce_den.sum().reshape(1)]
    if dice_batch:
        sums += [stats.inter.sum(0), stats.pred.sum(0), stats.ground.sum(0)]
    elif lambda_dice != 0:
        terms = _dice_terms(stats, opts)
        sums += [terms.sum().reshape(1), terms.new_full((1,), float(terms.numel()))]
    flat = all_reduce_sum(torch.cat(sums), group)
    out = stats.ce_num.new_zeros(())
    if lambda_ce != 0:
        ce = flat[0] if reduction == "sum" else flat[0] / (flat[1] + opts.eps)
        out = out + lambda_ce * ce
    if dice_batch:
        # the global class sums as a batch of one: finished by the single-process code
        inter, pred, ground = flat[2:].view(3, 1, -1).unbind(0)
        glob = stats._replace(inter=inter, pred=pred, ground=ground)
        out = out + lambda_dice * _dice_from_stats(glob, opts, reduction)
    elif lambda_dice != 0:
        out = out + lambda_dice * (flat[2] if reduction == "sum" else flat[2] / flat[3])
    return out


def _stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    region_weight: Optional[torch.Tensor],
    opts: _Options,
    impl: str,
    validate: bool,
) -> RegionStats:
    if impl == "reference":
        stats = reference_stats(logits, target, region_weight, opts)
    else:
        from .fused import fused_stats

        stats, _ = fused_stats(logits, target, region_weight, opts)
    if validate:
        check_finite_stats(stats)
    return stats


def check_finite_stats(stats: RegionStats, name: str = "logits") -> None:
    """Finiteness of the logits, checked on the O(B*C) statistics: NaN or +Inf logits always make
    them non-finite, and so does -Inf at a class the target holds."""
    V.check_values(
        torch.isfinite(stats.ce_num).all() & torch.isfinite(stats.pred).all(),
        f"`{name}` must be finite: the loss statistics are NaN/Inf, so `{name}` contain NaN "
        "or +Inf (or -Inf at a target class).",
    )


_DEFAULT_IMPL = "fused"


def _resolve_impl(impl: str) -> str:
    return _DEFAULT_IMPL if impl == "auto" else impl


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
        impl: ``"fused"`` (one memory-light autograd node, [`bual_losses.fused`][]),
            ``"reference"`` (plain eager ops) or ``"auto"`` (the default implementation).
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
    opts = _parse(
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
    stats = _stats(logits, target, region_weight, opts, _resolve_impl(impl), validate)
    return _finish(
        stats,
        opts,
        lambda_ce=lambda_ce,
        lambda_dice=lambda_dice,
        reduction=reduction,
        group=group,
    )


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
    opts = _parse(
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
    stats = _stats(logits, target, region_weight, opts, _resolve_impl(impl), validate)
    if group is not None and reduction != "none":
        return _finish(
            stats, opts, lambda_ce=0.0, lambda_dice=1.0, reduction=reduction, group=group
        )
    return _dice_from_stats(stats, opts, reduction)
