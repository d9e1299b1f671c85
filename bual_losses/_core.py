r"""The private core that every loss engine and every public loss shares.

A region loss is computed in two stages:

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

2. **finishing** ([`finish`][bual_losses._core.finish]): the loss from these few numbers (CE
    normalisation, Dice per sample or over the batch, background exclusion, class weights,
    reduction, the sums over ranks with ``sync_dist``).

Stage 1 has three engines (the reference, the CPU chunked engine, the accelerator engine);
``bual_losses._engine`` picks one. They all import this module and nothing else of the
package's loss code, and they all finish with the same function here, so every option means
the same thing on every engine. The options of one call are parsed once, here, into an
[`Options`][bual_losses._core.Options].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union, cast

import torch

from . import _validation as V
from .distributed import all_reduce_sum, check_sync_dist
from .uncertainty import entropy_map

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

ClassWeight = Union[Sequence[float], torch.Tensor, None]

IMPLS = ("auto", "fused", "reference")


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


class Options(NamedTuple):
    """The parsed options of one loss call (one branch of ``bidirectional_loss``)."""

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
    # whether the label range was checked up front; if not (validate=False, or integer labels
    # on an accelerator) an engine that would read an out-of-range label as "no class" checks
    # it where it reads the labels
    labels_checked: bool = False


class Finish(NamedTuple):
    """How the statistics become the loss: the term weights, the reduction, the ranks whose
    batches are summed (``None``: this process only) and whether the Dice terms are returned
    as they are (``region_dice_loss`` with ``reduction="none"``)."""

    lambda_ce: float = 1.0
    lambda_dice: float = 1.0
    reduction: str = "mean"
    group: Optional[ProcessGroup] = None
    dice_terms: bool = False


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
    V.require_choice(impl, "impl", IMPLS)
    V.require_reduction(reduction)
    if reduction == "none" and batch and lambda_dice != 0:
        raise ValueError(
            "`reduction='none'` gives one loss per sample and needs `batch=False`; "
            "batch Dice has no per-sample value."
        )


def parse_options(
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
) -> Options:
    """Check one call's tensors and options and parse them into an ``Options``.

    ``target=None`` stands for pseudo-labels that an engine derives from teacher logits: label
    targets that need no check.
    """
    logits = V.require_logits(logits)
    kind: V.TargetKind = "labels" if target is None else V.classify_target(target, logits)
    if region_weight is not None:
        V.require_region_weight(region_weight, logits)
    check_options(smooth_nr=smooth_nr, smooth_dr=smooth_dr, eps=eps, impl=impl)
    num_classes = logits.shape[1]
    activation = V.resolve_activation(num_classes, softmax, sigmoid)
    cw = None if class_weight is None else V.require_class_weight(class_weight, num_classes, logits)
    ignore = V.require_ignore_index(ignore_index, kind)
    labels_checked = False
    if validate:
        # Finiteness of the logits is checked on the result (see check_result): NaN or +Inf
        # logits always make it non-finite, at O(B*C) instead of a pass over the logits. On
        # accelerators each check is a kernel launch: integer labels out of range fail the
        # one-hot scatter of every engine (a device-side error), and the region weight is
        # checked with the result, in one assertion.
        cpu = logits.device.type == "cpu"
        if target is None:
            pass
        elif kind == "labels":
            labels = V.labels_view(target, logits)
            if cpu or labels.is_floating_point():
                V.check_labels(labels, num_classes, ignore)
                labels_checked = True
        else:
            V.check_probabilities(target)
        if region_weight is not None and cpu:
            V.check_nonnegative(region_weight, "region_weight")
    return Options(
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
        labels_checked=labels_checked,
    )


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions run in float32 for half-precision inputs, else in the input's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The normalised entropy ``(B, *S)`` of detached logits, in the accumulation dtype: a
    half-precision map would round the threshold's neighbours (a bfloat16 step is 1/256 for
    ``u`` in [0.5, 1)) to either side, unlike the fused engines."""
    z = logits.detach().to(accumulation_dtype(logits.dtype))
    with torch.no_grad():
        return cast(torch.Tensor, entropy_map(z, from_logits=True, normalize=True))


# --------------------------------------------------------------------------------------------
# stage 2, shared by every engine


def _scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    # a weight of 1 costs no kernel (on accelerators every small op is a launch)
    return x if factor == 1 else x * factor


def _ce(stats: RegionStats, reduction: str, eps: float) -> torch.Tensor:
    if reduction == "sum":
        return stats.ce_num.sum()
    if reduction == "none":  # per sample
        return stats.ce_num / (stats.ce_den + eps)
    return stats.ce_num.sum() / (stats.ce_den.sum() + eps)


class _DiceParts(NamedTuple):
    """The Dice terms' pieces over the classes kept: numerator ``2 I + s_nr``, denominator
    ``P + G`` (without ``s_dr``), the class weights kept and how many leading classes were
    dropped (background, or class 0 of binary logits)."""

    numerator: torch.Tensor
    denominator: torch.Tensor
    class_weight: Optional[torch.Tensor]
    dropped: int


def _dice_parts(stats: RegionStats, opts: Options) -> _DiceParts:
    inter, pred, ground = stats.inter, stats.pred, stats.ground
    if opts.batch:
        inter, pred, ground = inter.sum(0), pred.sum(0), ground.sum(0)
    cw, dropped = opts.class_weight, 0
    if opts.activation == "sigmoid":
        # binary logits: Dice on the foreground channel only (as MONAI with C == 1)
        inter, pred, ground, cw, dropped = inter[..., 1:], pred[..., 1:], ground[..., 1:], None, 1
    elif not opts.include_background:
        inter, pred, ground, dropped = inter[..., 1:], pred[..., 1:], ground[..., 1:], 1
        cw = None if cw is None else cw[1:]
    if opts.smooth_nr == 0:
        numerator = inter * 2.0
    elif V.compiling():  # dynamo reads a symbolic first operand of add as the second one
        numerator = inter * 2.0 + opts.smooth_nr
    else:  # s_nr + 2 I in one kernel: the same value as 2 I + s_nr (2 I is exact)
        numerator = torch.add(opts.smooth_nr, inter, alpha=2.0)
    cw = None if cw is None else cw.to(numerator.dtype)
    return _DiceParts(numerator, pred + ground, cw, dropped)


def _dice_score(
    parts: _DiceParts, opts: Options, with_inverse: bool = False
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(score, inv)``: the Dice score ``numerator / (P + G + s_dr)`` and, if asked for, the
    inverse denominator ``inv`` (``d score / dI = 2 inv``, ``d score / dP = -score inv``).

    Empty-denominator policy: a term with nothing predicted, nothing to find and no smoothing
    (only possible with ``s_dr = 0``) counts as perfectly segmented: score 1 and ``inv = 0``, so
    its loss and its gradient are 0. (A division, not a product with ``inv``: an empty region
    with equal smoothing then scores exactly 1.)
    """
    if opts.smooth_dr > 0:
        # P, G >= 0: the denominator is >= smooth_dr > 0
        den = parts.denominator + opts.smooth_dr
        return parts.numerator / den, den.reciprocal() if with_inverse else None
    empty = parts.denominator <= 0
    safe = torch.where(empty, torch.ones_like(parts.denominator), parts.denominator)
    score = torch.where(empty, torch.ones_like(safe), parts.numerator / safe)
    if not with_inverse:
        return score, None
    return score, torch.where(empty, torch.zeros_like(safe), safe.reciprocal())


def dice_terms(stats: RegionStats, opts: Options) -> torch.Tensor:
    """Weighted Dice loss terms, ``(B, K')`` or ``(K',)`` with ``batch=True``."""
    parts = _dice_parts(stats, opts)
    terms = 1 - _dice_score(parts, opts)[0]
    return terms if parts.class_weight is None else terms * parts.class_weight


def _dice(stats: RegionStats, opts: Options, reduction: str) -> torch.Tensor:
    terms = dice_terms(stats, opts)
    if reduction == "sum":
        return terms.sum()
    if reduction == "none":
        return terms
    return terms.mean()


def finish(stats: RegionStats, opts: Options, spec: Finish) -> torch.Tensor:
    """The loss from the statistics: stage 2, the same for every engine."""
    if spec.dice_terms and spec.reduction == "none":  # region_dice_loss: the terms, per rank
        return _dice(stats, opts, "none")
    if spec.reduction == "none":  # per sample, hence per rank: nothing to synchronise
        ce = _ce(stats, "none", opts.eps)
        if spec.lambda_dice == 0:
            return _scaled(ce, spec.lambda_ce)
        dice = dice_terms(stats, opts).mean(-1)
        return _scaled(ce, spec.lambda_ce) + _scaled(dice, spec.lambda_dice)
    if spec.group is not None:
        return _finish_global(stats, opts, spec, spec.group)
    out: Optional[torch.Tensor] = None
    if spec.lambda_ce != 0:
        out = _scaled(_ce(stats, spec.reduction, opts.eps), spec.lambda_ce)
    if spec.lambda_dice != 0:
        dice = _scaled(_dice(stats, opts, spec.reduction), spec.lambda_dice)
        out = dice if out is None else out + dice
    return stats.ce_num.new_zeros(()) if out is None else out


class FinishGrad(NamedTuple):
    """The loss and its gradients with respect to the statistics that carry one: ``ce_num``
    (a number, a 0-d or a ``(B,)`` tensor; None without a CE term), ``inter`` and ``pred``
    (``(B, K)``; None without a Dice term)."""

    loss: torch.Tensor
    ce_num: Union[float, torch.Tensor, None]
    inter: Optional[torch.Tensor]
    pred: Optional[torch.Tensor]


def finish_grad(stats: RegionStats, opts: Options, spec: Finish) -> FinishGrad:
    """``finish`` and its gradient in closed form, for one process (``spec.group`` None) and a
    loss that is a number or one number per sample (not ``region_dice_loss``'s per-class
    terms): the accelerator engine's few small kernels instead of an autograd pass.

    With ``reduction="none"`` the gradients are those of each sample's own loss (a sample's
    loss depends on its statistics only). Tested against autograd through ``finish``.
    """
    reduction = spec.reduction
    loss: Optional[torch.Tensor] = None
    g_ce: Union[float, torch.Tensor, None] = None
    g_inter = g_pred = None
    if spec.lambda_ce != 0:
        if reduction == "sum":
            ce, g_ce = stats.ce_num.sum(), spec.lambda_ce
        else:
            # the value as finish computes it (a division), bit for bit
            den = (stats.ce_den if reduction == "none" else stats.ce_den.sum()) + opts.eps
            ce = (stats.ce_num if reduction == "none" else stats.ce_num.sum()) / den
            g_ce = _scaled(den.reciprocal(), spec.lambda_ce)
        loss = _scaled(ce, spec.lambda_ce)
    if spec.lambda_dice != 0:
        parts = _dice_parts(stats, opts)
        score, inv_den = _dice_score(parts, opts, with_inverse=True)
        assert inv_den is not None
        terms = 1 - score
        cw = parts.class_weight
        if cw is not None:
            terms = terms * cw
        if reduction == "sum":
            dice, factor = terms.sum(), spec.lambda_dice
        elif reduction == "none":
            dice, factor = terms.mean(-1), spec.lambda_dice / terms.shape[-1]
        else:
            dice, factor = terms.mean(), spec.lambda_dice / terms.numel()
        # d terms / dI = -2 w inv, d terms / dP = w score inv (w: the class weights)
        scale = inv_den * factor if cw is None else inv_den * (cw * factor)
        g_inter, g_pred = scale * -2.0, score * scale
        shape = stats.inter.shape
        if opts.batch:
            g_inter, g_pred = g_inter.expand(shape[0], -1), g_pred.expand(shape[0], -1)
        if parts.dropped:
            g_inter = torch.nn.functional.pad(g_inter, (parts.dropped, 0))
            g_pred = torch.nn.functional.pad(g_pred, (parts.dropped, 0))
        dice = _scaled(dice, spec.lambda_dice)
        loss = dice if loss is None else loss + dice
    if loss is None:
        loss = stats.ce_num.new_zeros(stats.ce_num.shape if reduction == "none" else ())
    return FinishGrad(loss, g_ce, g_inter, g_pred)


def _finish_global(
    stats: RegionStats, opts: Options, spec: Finish, group: ProcessGroup
) -> torch.Tensor:
    """``finish`` ("mean" / "sum") over the batches of all ranks of ``group``.

    The sums the loss needs (CE numerator and normaliser; the class sums of batch Dice, or the
    sum and the number of the per-sample Dice terms) are packed into one vector and summed over
    the ranks by one differentiable all-reduce, so the value is the single-process loss on the
    concatenated batch and each rank's gradient is ``R`` times its single-process slice.
    """
    lambda_ce, lambda_dice, reduction = spec.lambda_ce, spec.lambda_dice, spec.reduction
    dice_batch = opts.batch and lambda_dice != 0
    sums = [stats.ce_num.sum().reshape(1), stats.ce_den.sum().reshape(1)]
    if dice_batch:
        sums += [stats.inter.sum(0), stats.pred.sum(0), stats.ground.sum(0)]
    elif lambda_dice != 0:
        terms = dice_terms(stats, opts)
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
        out = out + lambda_dice * _dice(glob, opts, reduction)
    elif lambda_dice != 0:
        out = out + lambda_dice * (flat[2] if reduction == "sum" else flat[2] / flat[3])
    return out


def write_into(view: torch.Tensor, op: Any, *args: Any) -> torch.Tensor:
    """``op(*args, out=view)``; under ``torch.compile``, which refuses a non-contiguous
    ``out=``, a strided ``view`` is written through a temporary instead."""
    if view.is_contiguous() or not V.compiling():
        return op(*args, out=view)
    return view.copy_(op(*args))


def refuse_higher_order() -> None:
    """Called first in the fused engines' backward: their closed-form gradients are not
    differentiable themselves, so ``create_graph=True`` (a second derivative) gets a clear
    error instead of a wrong or cryptic one. (``torch.func`` transforms never reach here:
    ``bual_losses.engines`` runs the reference engine inside them.)"""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "The fused engines (impl='fused' / 'auto') compute first derivatives only; "
            "backward(create_graph=True) and double backward need impl='reference' "
            "(torch.func transforms select it by themselves)."
        )


def check_result(
    loss: torch.Tensor,
    stats: RegionStats,
    spec: Finish,
    region_weight: Optional[torch.Tensor] = None,
    teacher: Optional[torch.Tensor] = None,
) -> None:
    """The value checks that read the result: finite logits (and teacher logits, and a finite,
    non-negative region weight on accelerators).

    Finiteness of the logits is checked on the O(B*C) result: NaN or +Inf logits always make
    the statistics non-finite, and so does -Inf at a target class. When both terms are in the
    loss, every statistic that can turn non-finite reaches it, so the loss is checked;
    otherwise the statistics themselves are.

    On CPU the region weight and the teacher logits were checked before, each with its own
    message. On accelerators every check is a kernel launch and fails asynchronously anyway,
    so they are folded into **one** assertion: ``min(region_weight) + 0 * x >= 0`` (or
    ``x - x == 0`` without a weight), where ``x`` is the checked result plus ``0 *`` the
    teacher's extreme values: any NaN or Inf turns it to NaN, which fails the comparison.
    """
    both = spec.lambda_ce != 0 and spec.lambda_dice != 0 and not spec.dice_terms
    x = loss if both else stats.ce_num.sum() + stats.pred.sum()
    if loss.device.type == "cpu":
        message = (
            "`logits` must be finite: the loss statistics are NaN/Inf, so `logits` contain NaN "
            "or +Inf (or -Inf at a target class)."
        )
        V.check_values(((x - x) == 0).all(), message)
        return
    if teacher is not None:
        lo, hi = torch.aminmax(teacher.detach())
        x = torch.add(x, lo + hi, alpha=0)
    if region_weight is not None and region_weight.dtype != torch.bool:
        ok = torch.add(region_weight.amin(), x, alpha=0) >= 0
    else:
        ok = (x - x) == 0
    V.check_values(
        ok.all() if ok.ndim else ok,
        "a value check failed: `logits` must be finite (-Inf only at a class the target does "
        "not hold), the teacher's logits finite and `region_weight` finite and >= 0.",
    )
