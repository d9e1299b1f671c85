r"""The bidirectional uncertainty-aware loss: emphasis on labeled data, selection on unlabeled.

$$
L = L_{ce+dice}\big(z_l, y;\ w_l\big) + \lambda(t)\, L_{ce+dice}\big(z_u, \hat y;\ w_u\big),
\qquad \hat y = \operatorname{argmax}_c\, p^{teacher}_c
$$

$$
w_l = 1 + \alpha\,[u_l > \tau_h(t)], \qquad
w_u = \beta + (1 - \beta)\,[u_u \le \tau_l(t)]
$$

(or the soft versions with a sigmoid of temperature $T$). $u$ is the normalised entropy of the
teacher's prediction for unlabeled images and of the detached student prediction for labeled
images, unless the caller passes teacher logits or an uncertainty map of its own (MC dropout,
ensembles, any estimator of [`bual_losses.uncertainty`][]).

Default thresholds: each image's own mean uncertainty, $\tau = \bar u$ per sample
([`relative_threshold`][bual_losses.schedules.relative_threshold]): a region "more uncertain
than this image's average" follows the model as it learns, where UA-MT's fixed fraction of the
maximum entropy empties both regions once the model is confident
([`uamt_threshold_schedule`][bual_losses.schedules.uamt_threshold_schedule], one argument
away). Default consistency weight, from UA-MT / SSL4MIS (the source paper's exact
hyperparameters are not available): $\lambda(t) = 0.1\,\text{sigmoid\_rampup}(t, T)$ with
$T$ = ``total_steps``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, NamedTuple, Optional, Union, cast

import torch

from . import _validation as V
from ._core import (
    ClassWeight,
    Finish,
    Options,
    accumulation_dtype,
    normalized_entropy,
    parse_options,
)
from ._core import check_options as check_loss_options
from .distributed import SyncDist, global_mean, resolve_group
from .engines import region_loss, select_engine
from .regions import UncertaintyWeight, resolve_threshold
from .schedules import (
    MAP_THRESHOLDS,
    Numeric,
    RatioSchedule,
    RelativeThreshold,
    Schedule,
    as_schedule,
    rampup_schedule,
)

__all__ = ["BidirectionalParts", "bidirectional_loss", "check_bidirectional_options"]

Threshold = Union[float, torch.Tensor, Schedule, RatioSchedule, RelativeThreshold]

DEFAULT_TOTAL_STEPS = 30000
"""SSL4MIS's maximum iterations, the default ramp length when ``total_steps`` is not given."""
DEFAULT_CONSISTENCY = 0.1
"""UA-MT / SSL4MIS consistency weight."""
DEFAULT_THRESHOLD = RelativeThreshold(1.0, per_sample=True)
"""Both regions' default: each image's own mean uncertainty (see ``relative_threshold``)."""


class BidirectionalParts(NamedTuple):
    """What [`bidirectional_loss`][bual_losses.bidirectional.bidirectional_loss] computed.

    All fields are tensors, so returning them costs no host synchronisation (reading one with
    ``.item()`` does). Thresholds are 0-d, or ``(B,)`` for per-sample thresholds and ratios.
    Fractions are the mean region indicator (soft weights with a temperature) over all voxels
    of the branch. With ``sync_dist`` the losses, the fractions and batch ratio thresholds are
    those of the global batch (identical on every rank); per-sample thresholds stay per rank.
    Without unlabeled images the three fields of the unlabeled branch are 0.

    Attributes:
        labeled_loss: 0-d, the region-weighted CE + Dice of the labeled branch.
        unlabeled_loss: 0-d, the region-weighted CE + Dice of the unlabeled branch against the
            teacher's pseudo-labels; the loss is
            ``labeled_loss + consistency_weight * unlabeled_loss``.
        consistency_weight: 0-d, the weight ``lambda(t)`` of the unlabeled branch at this step.
        high_threshold: ``tau_h`` used on the labeled branch, 0-d or ``(B_l,)``.
        low_threshold: ``tau_l`` used on the unlabeled branch, 0-d or ``(B_u,)``.
        labeled_high_fraction: 0-d, the share of labeled voxels in the high-uncertainty
            (emphasised) region.
        unlabeled_low_fraction: 0-d, the share of unlabeled voxels in the low-uncertainty
            (trusted) region.

    Examples:
        >>> import torch
        >>> from bual_losses import bidirectional_loss
        >>> zl, y = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
        >>> zu, zt = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
        >>> loss, parts = bidirectional_loss(zl, y, zu, zt, step=1000, return_parts=True)
        >>> parts.high_threshold.shape, parts.unlabeled_low_fraction.shape  # one per image
        (torch.Size([2]), torch.Size([]))
        >>> lam = parts.consistency_weight
        >>> bool(torch.allclose(loss, parts.labeled_loss + lam * parts.unlabeled_loss))
        True
    """

    labeled_loss: torch.Tensor
    unlabeled_loss: torch.Tensor
    consistency_weight: torch.Tensor
    high_threshold: torch.Tensor
    low_threshold: torch.Tensor
    labeled_high_fraction: torch.Tensor
    unlabeled_low_fraction: torch.Tensor


def _require_threshold_option(value: Any, name: str) -> None:
    if value is None or isinstance(value, (torch.Tensor, *MAP_THRESHOLDS)) or callable(value):
        return
    if isinstance(value, Real) and not isinstance(value, bool):
        if value != value:
            raise ValueError(f"`{name}` must not be NaN (+-inf are allowed), got nan.")
        return
    raise TypeError(
        f"`{name}` must be a number, a tensor, a Schedule, a RatioSchedule, a RelativeThreshold "
        "or None, "
        f"got {type(value).__name__}."
    )


def check_bidirectional_options(
    *,
    total_steps: int = DEFAULT_TOTAL_STEPS,
    high_threshold: Optional[Threshold] = None,
    low_threshold: Optional[Threshold] = None,
    alpha: float = 1.0,
    beta: float = 0.0,
    temperature: Optional[float] = None,
    consistency_weight: Union[float, Schedule, None] = None,
    **loss_options: Any,
) -> None:
    """Checks of every scalar option of the bidirectional loss (shared with the module).

    Called by [`bidirectional_loss`][bual_losses.bidirectional.bidirectional_loss] on every call
    and by [`BidirectionalLoss`][bual_losses.modules.BidirectionalLoss] at construction, so a
    bad configuration fails before the first batch.
    """
    known = set(_LOSS_OPTIONS)
    unknown = sorted(set(loss_options) - known)
    if unknown:
        raise TypeError(f"bidirectional_loss got unknown options {unknown}.")
    V.require_nonnegative_number(total_steps, "total_steps")
    _require_threshold_option(high_threshold, "high_threshold")
    _require_threshold_option(low_threshold, "low_threshold")
    V.require_nonnegative_number(alpha, "alpha")
    beta = V.require_nonnegative_number(beta, "beta")
    if beta > 1:
        raise ValueError(f"`beta` must lie in [0, 1], got {beta!r}.")
    if temperature is not None:
        V.require_nonnegative_number(temperature, "temperature", positive=True)
    if consistency_weight is not None and not callable(consistency_weight):
        V.require_nonnegative_number(consistency_weight, "consistency_weight")
    check_loss_options(**loss_options)


_LOSS_OPTIONS = (
    "include_background",
    "squared_pred",
    "smooth_nr",
    "smooth_dr",
    "batch",
    "lambda_ce",
    "lambda_dice",
    "ignore_index",
    "eps",
    "impl",
    "validate",
    "sync_dist",
)


def _check_logits_pair(student: Any, teacher: Any, labeled: Optional[torch.Tensor]) -> None:
    """The unlabeled logits pair: same shape, and the device, class count and spatial rank of
    the labeled logits (when given; a labeled batch may have size 0)."""
    V.require_logits(student, "student_unlabeled_logits")
    V.require_logits(teacher, "teacher_unlabeled_logits")
    if teacher.shape != student.shape:
        raise ValueError(
            "`teacher_unlabeled_logits` must have the shape of `student_unlabeled_logits` "
            f"{V.shape_str(student.shape)}, got {V.shape_str(teacher.shape)}."
        )
    if labeled is None:
        return
    V.require_same_device(student, "student_unlabeled_logits", labeled, "student_labeled_logits")
    V.require_same_device(teacher, "teacher_unlabeled_logits", labeled, "student_labeled_logits")
    if student.shape[1] != labeled.shape[1] or student.ndim != labeled.ndim:
        raise ValueError(
            "`student_unlabeled_logits` must have (B_u, C, *S) with C and the spatial rank of "
            f"`student_labeled_logits` {V.shape_str(labeled.shape)}, "
            f"got {V.shape_str(student.shape)}."
        )


def _uncertainty_map(
    given: torch.Tensor, logits: torch.Tensor, name: str, validate: bool
) -> torch.Tensor:
    """The caller's map as ``(B, *S)`` (a ``(B, 1, *S)`` map is squeezed)."""
    u = V.require_floating(given, name).detach()
    V.require_same_device(u, name, logits, "logits")
    b, _, *spatial = logits.shape
    if tuple(u.shape) == (b, 1, *spatial):
        u = u[:, 0]
    if tuple(u.shape) != (b, *spatial):
        raise ValueError(
            f"`{name}` must have shape (B, *S) = {V.shape_str((b, *spatial))} or (B, 1, *S) to "
            f"match its logits {V.shape_str(logits.shape)}, got {V.shape_str(given.shape)}."
        )
    if validate:
        V.check_finite(u, name)
    return u


def _number_threshold(region: _Region, step: Numeric) -> Optional[float]:
    """The threshold as a Python number when it is one (or a Schedule gives one at ``step``):
    compared as a scalar, it costs no kernel."""
    value: Any = region.threshold
    if callable(value) and not isinstance(value, (torch.Tensor, *MAP_THRESHOLDS)):
        value = value(step)
        if isinstance(value, Real) and value != value:
            raise ValueError(
                f"`{region.name}` gave NaN at step {step!r}; a schedule must give "
                "a number (+-inf are allowed)."
            )
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    return float(value)


def _flat_threshold(thr: torch.Tensor) -> torch.Tensor:
    return thr.reshape(thr.shape[0]) if thr.ndim > 0 else thr


class _Region(NamedTuple):
    """One branch's region: ``u > tau`` (``side="high"``) or ``u <= tau`` (``"low"``) gets
    the weight ``base + scale``, the rest ``base`` (soft with a temperature)."""

    threshold: Threshold
    side: str
    base: float
    scale: float
    temperature: Optional[float]
    name: str  # the option that set the threshold, for messages

    def weight(self, threshold: Union[float, torch.Tensor]) -> UncertaintyWeight:
        """The region's weight once its threshold is resolved to a number or a tensor."""
        return UncertaintyWeight(threshold, self.side, self.base, self.scale, self.temperature)


def _branch(
    logits: torch.Tensor,
    target: Optional[torch.Tensor],
    opts: Options,
    spec: Finish,
    region: _Region,
    *,
    impl: str,
    validate: bool,
    step: Numeric,
    uncertainty: Optional[torch.Tensor],
    teacher: Optional[torch.Tensor],
    report: bool,
) -> tuple[torch.Tensor, Union[float, torch.Tensor], torch.Tensor]:
    """One branch through the engine entrance: its loss, threshold (exact when ``report``)
    and region fraction.

    The uncertainty is the caller's map, else the normalised entropy of ``teacher`` (if given)
    or of the detached ``logits``. Without a map the engine derives the region weight from the
    probabilities it computes anyway, so no ``(B, *S)`` weight is allocated, and resolves a
    per-sample relative threshold from the same entropy; a batch-wide relative threshold (its
    mean may span the ranks) and a ratio (an order statistic) take the whole map.
    """
    b, _, *spatial = logits.shape
    dtype = accumulation_dtype(logits.dtype)
    group = spec.group
    u = uncertainty
    # a per-sample relative threshold on the accelerator engine: it takes each sample's mean
    # from the entropy it computes anyway (a few kernels instead of a map's). Elsewhere the map
    # is computed first, and the weight made from it spares the engine its own entropy pass.
    relative = (
        isinstance(region.threshold, RelativeThreshold)
        and region.threshold.per_sample
        and select_engine(impl, logits.device) == "accelerator"
    )
    if u is None and not relative and isinstance(region.threshold, MAP_THRESHOLDS):
        # a mean (per sample, or over the ranks' batch) or a ratio: from the whole map
        u = normalized_entropy(logits if teacher is None else teacher)
    if u is None:
        if relative:
            # a factor: the engine takes each sample's mean from the entropy it computes
            factor = cast(RelativeThreshold, region.threshold)(step)
            derived = region.weight(factor)._replace(relative=True)
        else:
            derived = region.weight(_threshold_without_map(region, step, logits, dtype))
        loss, mass = region_loss(
            logits, target, None, opts, spec,
            impl=impl, validate=validate, derived=derived, teacher=teacher,
        )  # fmt: skip
        assert mass is not None  # a derived weight always has one
        thr = derived.threshold
        if relative:  # the value, computed again only when it is reported
            thr = 0.0
            if report:
                source = normalized_entropy(logits if teacher is None else teacher)
                thr = _flat_threshold(cast(torch.Tensor, derived.absolute(source).threshold))
        return loss, thr, global_mean(mass, math.prod(spatial) * b, group)
    thr_full = cast(
        torch.Tensor, resolve_threshold(u, region.threshold, step=step, sync_dist=group)
    )
    weight_of = region.weight(thr_full)
    # the fraction (in the accumulation dtype of the logits, as the engines' mass) first, then
    # the weight, and the map dropped before the engine runs: one (B, *S) tensor alive during
    # the pass instead of three. A hard region's two weights are stored in float16 when it
    # holds them exactly (1 and 1 + alpha = 2, 0 and 1 by default): half the memory, the same
    # values in every engine, which read the weight in their accumulation dtype.
    lo, hi = weight_of.base, weight_of.base + weight_of.scale
    if weight_of.temperature is None and all(_exact_in_half(v) for v in (lo, hi)):
        mask = u > thr_full  # as UncertaintyWeight.indicator: the low side is its complement
        if weight_of.side == "low":
            mask.logical_not_()
        s_sum, numel = mask.sum(dtype=dtype), mask.numel()
        # fill kernels, not host-to-device copies
        hi_t = torch.full((), hi, dtype=torch.float16, device=u.device)
        lo_t = torch.full((), lo, dtype=torch.float16, device=u.device)
        weight = torch.where(mask, hi_t, lo_t)
        del u, mask
    else:
        s = weight_of.indicator(u, thr_full)  # a fresh tensor
        s_sum, numel = s.to(dtype).sum(), s.numel()
        weight = s.mul_(weight_of.scale).add_(weight_of.base)
        del u, s
    loss, _ = region_loss(
        logits, target, weight, opts, spec, impl=impl, validate=validate, teacher=teacher
    )
    return loss, _flat_threshold(thr_full), global_mean(s_sum, numel, group)


def _threshold_without_map(
    region: _Region, step: Numeric, logits: torch.Tensor, dtype: torch.dtype
) -> Union[float, torch.Tensor]:
    """A threshold that needs no map: a number (compared as a scalar, no kernel), else the
    tensor ``resolve_threshold`` gives, which reads only the map's shape: a ``(B, *S)``
    broadcast of one element stands in for it (no memory, the true shapes in messages)."""
    thr = _number_threshold(region, step)
    if thr is not None:
        return thr
    b, _, *spatial = logits.shape
    probe = logits.new_empty((), dtype=dtype).expand(b, *spatial)
    return _flat_threshold(
        cast(torch.Tensor, resolve_threshold(probe, region.threshold, step=step))
    )


def _exact_in_half(value: float) -> bool:
    return float(torch.tensor(value, dtype=torch.float16)) == value


def _require_step(step: Any, validate: bool) -> None:
    """A number or a 0-d real tensor, not NaN (a NaN step would make every threshold NaN and
    both regions silently empty)."""
    if isinstance(step, torch.Tensor):
        if step.ndim != 0 or step.is_complex() or step.dtype == torch.bool:
            raise ValueError(
                "`step` must be a number or a 0-d real tensor (one step for the whole batch), "
                f"got a tensor of shape {V.shape_str(step.shape)} and dtype {step.dtype}."
            )
        if validate and step.is_floating_point():
            V.check_values(step == step, "`step` must not be NaN.")
        return
    if isinstance(step, bool) or not isinstance(step, (Real, torch.SymInt)):
        raise TypeError(f"`step` must be a number or a tensor, got {type(step).__name__}.")
    if not isinstance(step, (Integral, torch.SymInt)) and not V.compiling() and step != step:
        raise ValueError("`step` must not be NaN.")


def _branch_present(
    logits: Optional[torch.Tensor], other: Optional[torch.Tensor], name: str, other_name: str
) -> bool:
    """Whether a branch has images: ``False`` for ``None`` (with ``other`` None too) or a batch
    of size 0 (what ``logits[:n]`` gives for ``n = 0``), whose ``other`` must match."""
    if logits is None:
        if other is not None:
            raise ValueError(
                f"`{name}` and `{other_name}` must both be tensors or both be None, "
                f"got None and {type(other).__name__}."
            )
        return False
    V.require_floating(logits, name)
    if logits.ndim >= 3 and logits.shape[0] == 0 and math.prod(logits.shape[1:]) > 0:
        if other is None or V.require_tensor(other, other_name).shape[:1] != (0,):
            got = "None" if other is None else V.shape_str(other.shape)
            raise ValueError(
                f"`{other_name}` must hold a batch of size 0 like `{name}` "
                f"{V.shape_str(logits.shape)}, got {got}."
            )
        return False
    V.require_logits(logits, name)
    if other is None:
        raise ValueError(
            f"`{name}` and `{other_name}` must both be tensors or both be None, "
            f"got {type(logits).__name__} and None."
        )
    return True


def _require_absent(x: Optional[torch.Tensor], name: str) -> None:
    """An option of a branch without images must be None or an empty batch too."""
    if x is not None and V.require_tensor(x, name).shape[:1] != (0,):
        raise ValueError(
            f"`{name}` belongs to a branch without images and must be None or a batch of size "
            f"0, got shape {V.shape_str(x.shape)}."
        )


def _labeled_branch(
    zl: torch.Tensor,
    labels: Any,
    opts: Options,
    spec: Finish,
    region: _Region,
    *,
    impl: str,
    validate: bool,
    step: Numeric,
    teacher: Optional[torch.Tensor],
    uncertainty: Optional[torch.Tensor],
    report: bool,
) -> tuple[torch.Tensor, Union[float, torch.Tensor], torch.Tensor]:
    """The labeled branch: its uncertainty from the caller's map, the teacher's logits or the
    detached student."""
    if uncertainty is not None and teacher is not None:
        raise ValueError(
            "Pass at most one of `labeled_uncertainty` and `teacher_labeled_logits`: both set "
            "the labeled branch's uncertainty."
        )
    u_l: Optional[torch.Tensor] = None
    if teacher is not None:
        V.require_logits(teacher, "teacher_labeled_logits")
        if teacher.shape != zl.shape:
            raise ValueError(
                "`teacher_labeled_logits` must have the shape of `student_labeled_logits` "
                f"{V.shape_str(zl.shape)}, got {V.shape_str(teacher.shape)}."
            )
        V.require_same_device(teacher, "teacher_labeled_logits", zl, "student_labeled_logits")
        if validate and zl.device.type == "cpu":  # elsewhere: with the branch's result
            V.check_finite(teacher, "teacher_labeled_logits")
    elif uncertainty is not None:
        u_l = _uncertainty_map(uncertainty, zl, "labeled_uncertainty", validate)
    return _branch(
        zl, labels, opts, spec, region, impl=impl, validate=validate, step=step,
        uncertainty=u_l, teacher=teacher, report=report,
    )  # fmt: skip


def _result(
    loss_l: Optional[torch.Tensor],
    loss_u: Optional[torch.Tensor],
    lam: Union[float, torch.Tensor],
    thr_h: Union[float, torch.Tensor],
    thr_l: Union[float, torch.Tensor],
    frac_h: Union[float, torch.Tensor],
    frac_l: Union[float, torch.Tensor],
    return_parts: bool,
) -> Union[torch.Tensor, tuple[torch.Tensor, BidirectionalParts]]:
    """``loss_l + lam * loss_u`` over the branches present, and the parts when asked for (made
    only then: on a GPU each is a kernel). An absent branch's parts are 0."""
    ref = cast(torch.Tensor, loss_l if loss_l is not None else loss_u)
    if isinstance(lam, torch.Tensor):
        lam = lam.to(device=ref.device, dtype=ref.dtype)
    if loss_u is None:
        loss = ref
    elif loss_l is None:
        loss = lam * loss_u
    else:
        loss = loss_l + lam * loss_u
    if not return_parts:
        return loss
    as_tensors = (
        x if isinstance(x, torch.Tensor) else ref.new_full((), float(x))
        for x in (
            0.0 if loss_l is None else loss_l, 0.0 if loss_u is None else loss_u,
            lam, thr_h, thr_l, frac_h, frac_l,
        )
    )  # fmt: skip
    return loss, BidirectionalParts(*as_tensors)


def bidirectional_loss(
    student_labeled_logits: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    student_unlabeled_logits: Optional[torch.Tensor],
    teacher_unlabeled_logits: Optional[torch.Tensor],
    *,
    step: Numeric,
    total_steps: int = DEFAULT_TOTAL_STEPS,
    teacher_labeled_logits: Optional[torch.Tensor] = None,
    labeled_uncertainty: Optional[torch.Tensor] = None,
    unlabeled_uncertainty: Optional[torch.Tensor] = None,
    high_threshold: Optional[Threshold] = None,
    low_threshold: Optional[Threshold] = None,
    alpha: float = 1.0,
    beta: float = 0.0,
    temperature: Optional[float] = None,
    consistency_weight: Union[float, Schedule, None] = None,
    include_background: bool = True,
    squared_pred: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    lambda_ce: float = 1.0,
    lambda_dice: float = 1.0,
    class_weight: ClassWeight = None,
    ignore_index: Optional[int] = None,
    eps: float = 1e-8,
    impl: str = "auto",
    validate: bool = True,
    return_parts: bool = False,
    sync_dist: SyncDist = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, BidirectionalParts]]:
    r"""Bidirectional uncertainty-aware region loss for one semi-supervised batch.

    $$
    L = L\big(z_l, y;\ 1 + \alpha\,[u_l > \tau_h(t)]\big)
      + \lambda(t)\; L\big(z_u, \operatorname{argmax} p^{T}_u;\
                           \beta + (1-\beta)\,[u_u \le \tau_l(t)]\big)
    $$

    where $L$ is [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss]
    (region-weighted CE + soft Dice) and $u$ the entropy divided by $\ln C$ (in ``[0, 1]``).
    With a ``temperature`` ``T`` the indicators become ``sigmoid((u - tau) / T)`` and
    ``sigmoid((tau - u) / T)``. Teacher logits, pseudo-labels and uncertainty maps never
    receive gradients.

    Args:
        student_labeled_logits: ``(B_l, C, *S)`` student logits of the labeled images, or
            ``None`` / a batch of size 0 (with ``labels`` alike) for a batch without labeled
            images: the loss is then the unlabeled term alone.
        labels: ``(B_l, *S)`` or ``(B_l, 1, *S)`` labels (or ``(B_l, C, *S)`` probabilities).
        student_unlabeled_logits: ``(B_u, C, *S)`` student logits of the unlabeled images, or
            ``None`` / a batch of size 0 (with the teacher's) for a batch without unlabeled
            images.
        teacher_unlabeled_logits: ``(B_u, C, *S)`` teacher (e.g. EMA) logits of the same images.
        step: the training step driving every schedule: a Python or numpy number or a 0-d
            tensor (one step for the whole batch; NaN is refused).
        total_steps: length of the default consistency ramp (SSL4MIS: 30000).
        teacher_labeled_logits: teacher logits of the labeled images; when given, the labeled
            uncertainty comes from them instead of the detached student prediction.
        labeled_uncertainty: ``(B_l, *S)`` map to use instead (e.g. an MC-dropout estimate);
            its scale must match the thresholds (the default ones assume ``[0, 1]``).
        unlabeled_uncertainty: ``(B_u, *S)`` map to use instead of the teacher's entropy.
        high_threshold: ``tau_h``: number, tensor (0-d or ``(B_l,)``), Schedule,
            RatioSchedule (the top-``r`` fraction is high) or RelativeThreshold (``f`` times
            the mean uncertainty). Default: ``relative_threshold()``, each image's own mean
            uncertainty, so the region never vanishes as the model grows confident. UA-MT's
            threshold is ``uamt_threshold_schedule(total_steps)`` (the default up to 0.1).
        low_threshold: ``tau_l``, same forms and default; with a RatioSchedule the top-``r``
            fraction is discarded.
        alpha: extra weight of high-uncertainty labeled voxels (``w_l = 1 + alpha``).
        beta: weight kept by uncertain unlabeled voxels, in ``[0, 1]`` (0 discards them).
        temperature: ``None`` for hard regions, else the sigmoid temperature of soft regions.
        consistency_weight: ``lambda(t)``: a number or Schedule. Default
            ``0.1 * sigmoid_rampup(step, total_steps)`` (UA-MT / SSL4MIS).
        include_background: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        squared_pred: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        smooth_nr: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        smooth_dr: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        batch: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        lambda_ce: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        lambda_dice: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        class_weight: see
            [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss] (both branches).
        ignore_index: label value ignored in the labeled branch.
        eps: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        impl: see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss].
        validate: value checks (labels, finiteness of logits and uncertainty maps).
        return_parts: also return a
            [`BidirectionalParts`][bual_losses.bidirectional.BidirectionalParts] for logging.
        sync_dist: ``False`` (default), ``True`` (the default ``torch.distributed`` process
            group) or a ``ProcessGroup``: both branch losses are finished on the statistics of
            all ranks (see [`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss]),
            ratio thresholds with ``per_sample=False`` are computed over all ranks' maps and
            the region fractions are global, so every rank computes the loss of the
            concatenated batch. Every rank must pass images of each branch, or none must.

    Scalar options (``alpha``, ``total_steps``, ``consistency_weight``, ...) take Python or
    numpy numbers or 0-d CPU tensors; a 0-d tensor on an accelerator is refused (reading it
    would synchronise every call: pass a number or a Schedule).

    Returns:
        The scalar loss, or ``(loss, parts)`` with ``return_parts=True``.

    Examples:
        >>> import torch
        >>> from bual_losses import bidirectional_loss
        >>> zl = torch.randn(2, 4, 32, 32, requires_grad=True)
        >>> y = torch.randint(0, 4, (2, 32, 32))
        >>> zu = torch.randn(3, 4, 32, 32, requires_grad=True)
        >>> zt = torch.randn(3, 4, 32, 32)
        >>> loss, parts = bidirectional_loss(zl, y, zu, zt, step=100, return_parts=True)
        >>> loss.backward()
        >>> parts.unlabeled_low_fraction.shape
        torch.Size([])
    """
    loss_opts: dict[str, Any] = dict(
        include_background=include_background,
        squared_pred=squared_pred,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
        batch=batch,
        lambda_ce=lambda_ce,
        lambda_dice=lambda_dice,
        ignore_index=ignore_index,
        eps=eps,
        impl=impl,
        validate=validate,
        sync_dist=sync_dist,
    )
    check_bidirectional_options(
        total_steps=total_steps,
        high_threshold=high_threshold,
        low_threshold=low_threshold,
        alpha=alpha,
        beta=beta,
        temperature=temperature,
        consistency_weight=consistency_weight,
        **loss_opts,
    )
    _require_step(step, validate)
    if consistency_weight is not None and not callable(consistency_weight):
        # numpy scalars and 0-d CPU tensors become the Python number they hold
        consistency_weight = V.require_nonnegative_number(consistency_weight, "consistency_weight")
    group = resolve_group(sync_dist)
    has_labeled = _branch_present(
        student_labeled_logits, labels, "student_labeled_logits", "labels"
    )
    has_unlabeled = _branch_present(
        student_unlabeled_logits, teacher_unlabeled_logits,
        "student_unlabeled_logits", "teacher_unlabeled_logits",
    )  # fmt: skip
    if not (has_labeled or has_unlabeled):
        raise ValueError(
            "bidirectional_loss needs images in at least one branch, got no labeled and no "
            "unlabeled images (None or a batch of size 0)."
        )
    if has_unlabeled:
        _check_logits_pair(
            student_unlabeled_logits, teacher_unlabeled_logits, student_labeled_logits
        )
    if V.compiling() and not isinstance(step, torch.Tensor):
        # torch.compile makes a Python step that changes between calls a symbolic int; the
        # schedules' float arithmetic on it cannot be guarded, so they run on a tensor instead
        present = student_labeled_logits if has_labeled else student_unlabeled_logits
        device = cast(torch.Tensor, present).device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # as exact as a float
        step = torch.scalar_tensor(step, dtype=dtype, device=device)
    tau_h = DEFAULT_THRESHOLD if high_threshold is None else high_threshold
    tau_l = DEFAULT_THRESHOLD if low_threshold is None else low_threshold
    lam_schedule = (
        rampup_schedule(DEFAULT_CONSISTENCY, total_steps)
        if consistency_weight is None
        else as_schedule(consistency_weight, name="consistency_weight")
    )
    spec = Finish(float(lambda_ce), float(lambda_dice), "mean", group)
    # the options are parsed once, on the first branch present; the unlabeled branch differs
    # only in its target (the teacher's pseudo-labels)
    parse: dict[str, Any] = dict(
        include_background=include_background, softmax=None, sigmoid=None,
        squared_pred=squared_pred, smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch,
        class_weight=class_weight, eps=eps, impl=impl, validate=validate,
    )  # fmt: skip
    high = _Region(tau_h, "high", 1.0, float(alpha), temperature, "high_threshold")
    low = _Region(tau_l, "low", float(beta), 1.0 - float(beta), temperature, "low_threshold")

    # labeled branch: high-uncertainty emphasis
    opts: Optional[Options] = None
    if has_labeled:
        zl = cast(torch.Tensor, student_labeled_logits)
        opts = parse_options(zl, labels, None, ignore_index=ignore_index, **parse)
        loss_l, thr_h, frac_h = _labeled_branch(
            zl, labels, opts, spec, high, impl=impl, validate=validate, step=step,
            teacher=teacher_labeled_logits, uncertainty=labeled_uncertainty, report=return_parts,
        )  # fmt: skip
    else:
        _require_absent(teacher_labeled_logits, "teacher_labeled_logits")
        _require_absent(labeled_uncertainty, "labeled_uncertainty")
    # a constant weight stays a Python number: evaluated at a tensor step it would be rounded
    # to the step's float dtype
    lam = consistency_weight if isinstance(consistency_weight, Real) else lam_schedule(step)

    if not has_unlabeled:
        _require_absent(unlabeled_uncertainty, "unlabeled_uncertainty")
        return _result(loss_l, None, lam, thr_h, 0.0, frac_h, 0.0, return_parts)

    # unlabeled branch: low-uncertainty selection of the teacher's pseudo-label, both taken by
    # the engine from the teacher's logits in the pass over the student's
    zu = cast(torch.Tensor, student_unlabeled_logits)
    zt = cast(torch.Tensor, teacher_unlabeled_logits).detach()
    if opts is None:
        opts = parse_options(zu, None, None, ignore_index=None, **parse)
    u_u: Optional[torch.Tensor] = None
    if unlabeled_uncertainty is not None:
        u_u = _uncertainty_map(unlabeled_uncertainty, zt, "unlabeled_uncertainty", validate)
    if validate and zt.device.type == "cpu":  # elsewhere: with the branch's result
        V.check_finite(zt, "teacher_unlabeled_logits")
    opts_u = opts._replace(kind="labels", ignore_index=None)
    loss_u, thr_l, frac_l = _branch(
        zu, None, opts_u, spec, low, impl=impl, validate=validate, step=step,
        uncertainty=u_u, teacher=zt, report=return_parts,
    )  # fmt: skip
    if not has_labeled:
        return _result(None, loss_u, lam, 0.0, thr_l, 0.0, frac_l, return_parts)
    return _result(loss_l, loss_u, lam, thr_h, thr_l, frac_h, frac_l, return_parts)
