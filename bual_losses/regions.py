r"""High- and low-uncertainty regions: masks, soft weights and exact ratio thresholds.

An uncertainty map ``u`` has shape ``(B, *S)`` with any number of spatial dims (a ``(B, 1, *S)``
map works the same way: every non-batch element is a voxel). Given a threshold ``tau``:

$$
\mathcal{H} = \{\, x : u(x) > \tau \,\}, \qquad \mathcal{L} = \{\, x : u(x) \le \tau \,\}
$$

so the two regions partition the voxels by construction and a voxel *on* the threshold
(``u == tau``) is **low** uncertainty. In the bidirectional loss the high region of labeled
data is emphasised and the low region of unlabeled data is trusted.

The threshold may be a number, a 0-d tensor, one value per sample (shape ``(B,)``), a
[`Schedule`][bual_losses.schedules.Schedule] of the step, or a
[`RatioSchedule`][bual_losses.schedules.RatioSchedule] that picks the top fraction of voxels;
[`resolve_threshold`][bual_losses.regions.resolve_threshold] turns each into a tensor.

Under data parallelism, ``sync_dist=True`` (or a process group) makes ratio thresholds over the
batch (``per_sample=False``) and region fractions global: computed over the maps of all ranks,
as one process would on the concatenated batch (see [`bual_losses.distributed`][]).
Per-sample thresholds and fractions need no synchronisation.

Every function here is branch-free tensor code: no host synchronisation (value checks go
through ``bual_losses._validation`` and are skipped under ``torch.compile``), device and dtype
follow the uncertainty map (the threshold is compared in the map's dtype), and a NumPy array in
gives a NumPy array out.
"""

from __future__ import annotations

from numbers import Real
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

import torch

from bual_losses._arrays import ArrayLike, numpy_compatible
from bual_losses._validation import (
    check_finite,
    check_values,
    require_floating,
    require_ignore_index,
    require_nonnegative_number,
    require_same_device,
    require_tensor,
    shape_str,
)
from bual_losses.distributed import SyncDist, all_gather_variable, global_mean, resolve_group
from bual_losses.schedules import (
    MAP_THRESHOLDS,
    Numeric,
    RatioSchedule,
    RelativeThreshold,
    Schedule,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "Threshold",
    "UncertaintyWeight",
    "high_uncertainty_mask",
    "low_uncertainty_mask",
    "ratio_threshold",
    "region_fraction",
    "resolve_threshold",
    "soft_uncertainty_weight",
    "valid_mask",
]

Threshold = Union[float, torch.Tensor, Schedule, RatioSchedule, RelativeThreshold]
"""Everything a region function accepts as ``threshold``."""


# --------------------------------------------------------------------------------------------
# argument handling


def _require_uncertainty(uncertainty: Any) -> torch.Tensor:
    u = require_floating(uncertainty, "uncertainty")
    if u.ndim < 2:
        raise ValueError(
            "`uncertainty` must have shape (B, *S) or (B, 1, *S) with at least one spatial dim, "
            f"got {shape_str(u.shape)}."
        )
    return u


def _per_sample_shape(u: torch.Tensor) -> tuple[int, ...]:
    return (u.shape[0],) + (1,) * (u.ndim - 1)


def _threshold_from_tensor(u: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    if threshold.ndim == 0:
        # Accepted from any device, as PyTorch does for 0-d operands. A CPU tensor meeting a GPU
        # map costs a blocking copy, so scheduled steps belong on the map's device.
        return threshold.to(device=u.device, dtype=u.dtype)
    require_same_device(threshold, "threshold", u, "uncertainty")
    batch = u.shape[0]
    shape = tuple(threshold.shape)
    if shape == (batch,):
        return threshold.to(u.dtype).reshape(_per_sample_shape(u))
    # Already resolved: (B, 1, ..., 1) or (1, 1, ..., 1), so resolving is idempotent.
    if threshold.ndim == u.ndim and shape[0] in (1, batch) and all(s == 1 for s in shape[1:]):
        return threshold.to(u.dtype)
    raise ValueError(
        "`threshold` must be a number, a 0-d tensor, or one value per sample with shape (B,) "
        f"or (B, 1, ..., 1) = {shape_str(_per_sample_shape(u))} (B = {batch}) to match "
        f"`uncertainty` {shape_str(u.shape)}, got {shape_str(shape)}."
    )


def _resolve(
    u: torch.Tensor,
    threshold: Any,
    step: Optional[Numeric],
    group: Optional[ProcessGroup] = None,
) -> torch.Tensor:
    if isinstance(threshold, RatioSchedule):
        ratio = threshold(_require_step(step, "a RatioSchedule"))
        return _ratio_threshold(u, ratio, per_sample=threshold.per_sample, group=group)
    if isinstance(threshold, RelativeThreshold):
        factor = threshold(_require_step(step, "a RelativeThreshold"))
        return _relative_threshold(u, factor, per_sample=threshold.per_sample, group=group)
    if isinstance(threshold, torch.Tensor):
        return _threshold_from_tensor(u, threshold)
    if isinstance(threshold, Real) and not isinstance(threshold, bool):
        value = float(threshold)
        if value != value:
            raise ValueError("`threshold` must not be NaN (+-inf are allowed), got nan.")
        # A fill kernel, not a host-to-device copy.
        return torch.full((), value, dtype=u.dtype, device=u.device)
    if callable(threshold):
        value = threshold(_require_step(step, "a Schedule"))
        if callable(value) or isinstance(value, MAP_THRESHOLDS):
            raise TypeError(
                "`threshold` schedule must return a number or a tensor, "
                f"got {type(value).__name__}."
            )
        return _resolve(u, value, None)
    raise TypeError(
        "`threshold` must be a number, a tensor, a Schedule, a RatioSchedule or a "
        "RelativeThreshold, "
        f"got {type(threshold).__name__}."
    )


def _require_step(step: Optional[Numeric], what: str) -> Numeric:
    if step is None:
        raise ValueError(f"`step` is required when `threshold` is {what}, got None.")
    return step


def _relative_threshold(
    u: torch.Tensor, factor: Any, *, per_sample: bool, group: Optional[ProcessGroup] = None
) -> torch.Tensor:
    """``factor * mean(u)``, per sample as ``(B, 1, ..., 1)`` or over the (global) batch as 0-d,
    in the map's dtype; the mean accumulates in float32 at least."""
    acc = torch.promote_types(u.dtype, torch.float32)
    if per_sample:
        mean = u.mean(dim=tuple(range(1, u.ndim)), keepdim=True, dtype=acc)
    else:
        mean = global_mean(u.sum(dtype=acc), u.numel(), group)
    return (mean * factor).to(u.dtype)


def _ratio_dtype(device: torch.device) -> torch.dtype:
    # round(r * N) must match Python's double arithmetic for N up to millions of voxels;
    # float32 would misplace k by one near .5 boundaries. MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _ratio_threshold(
    u: torch.Tensor, ratio: Any, *, per_sample: bool, group: Optional[ProcessGroup] = None
) -> torch.Tensor:
    rows = u.shape[0] if per_sample else 1
    flat = u.reshape(rows, -1)
    n = flat.shape[1]
    dtype = _ratio_dtype(u.device)
    if isinstance(ratio, torch.Tensor):
        if ratio.ndim != 0:
            raise ValueError(
                f"`ratio` must be a number or a 0-d tensor, got shape {shape_str(ratio.shape)}."
            )
        # Out-of-range (or NaN) tensor ratios cannot raise without a host sync: clamp instead.
        r = torch.nan_to_num(ratio.to(device=u.device, dtype=dtype), nan=0.0).clamp(0.0, 1.0)
    elif isinstance(ratio, Real) and not isinstance(ratio, bool):
        if not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"`ratio` must lie in [0, 1], got {ratio!r}.")
        r = torch.full((), float(ratio), dtype=dtype, device=u.device)
    else:
        raise TypeError(f"`ratio` must be a number or a 0-d tensor, got {type(ratio).__name__}.")
    if group is not None and not per_sample:
        # Exact over the global batch: the maps of all ranks (sizes may differ), concatenated.
        flat = torch.cat(all_gather_variable(flat.reshape(-1), group)).reshape(1, -1)
        n = flat.shape[1]
    k = torch.round(r * n).to(torch.long)
    ordered = torch.sort(flat, dim=1, descending=True).values
    # Column k of the descending order padded with -inf is the largest value not selected:
    # k = 0 gives the maximum (nothing above it), k = N gives -inf (everything above it).
    padded = torch.cat([ordered, ordered.new_full((rows, 1), float("-inf"))], dim=1)
    thr = padded.gather(1, k.reshape(1, 1).expand(rows, 1))
    return thr.reshape(_per_sample_shape(u)) if per_sample else thr.reshape(())


def _check(u: torch.Tensor, thr: torch.Tensor) -> None:
    check_finite(u, "uncertainty")
    check_values(~torch.isnan(thr).any(), "`threshold` must not be NaN; it contains NaN.")


def _high(
    u: torch.Tensor,
    threshold: Any,
    step: Optional[Numeric],
    validate: bool,
    sync_dist: SyncDist = False,
) -> torch.Tensor:
    thr = _resolve(u, threshold, step, resolve_group(sync_dist))
    if validate:
        _check(u, thr)
    return u > thr


# --------------------------------------------------------------------------------------------
# public API


@numpy_compatible("uncertainty", "threshold")
def resolve_threshold(
    uncertainty: ArrayLike,
    threshold: Threshold,
    *,
    step: Optional[Numeric] = None,
    sync_dist: SyncDist = False,
) -> ArrayLike:
    r"""Turn any accepted ``threshold`` into a tensor that broadcasts against ``uncertainty``.

    $$
    \tau = \begin{cases}
        v & \text{number or 0-d tensor } v \\
        (v_b)_{b=1}^{B} \text{ as } (B, 1, \dots, 1) & \text{per-sample tensor } v \\
        s(t) & \text{Schedule } s \\
        \operatorname{ratio\_threshold}(u, r(t)) & \text{RatioSchedule } r
    \end{cases}
    $$

    The result has the uncertainty's dtype (comparisons happen in the map's precision) and
    device. A 0-d tensor threshold may live on another device (it is copied, which blocks for a
    CPU tensor meeting a GPU map); a per-sample one may not.

    Args:
        uncertainty: ``(B, *S)`` or ``(B, 1, *S)`` floating map.
        threshold: a number (``+-inf`` allowed, NaN not), a 0-d tensor, a ``(B,)`` tensor
            (one threshold per sample; ``(B, 1, ..., 1)`` is accepted too), a
            [`Schedule`][bual_losses.schedules.Schedule] or a
            [`RatioSchedule`][bual_losses.schedules.RatioSchedule].
        step: the training step, required for the two schedule kinds.
        sync_dist: ``False`` (default), ``True`` (the default process group) or a
            ``ProcessGroup``: a RatioSchedule with ``per_sample=False`` is then resolved over
            the maps of all ranks (see [`ratio_threshold`][bual_losses.regions.ratio_threshold]);
            every other threshold is unaffected.

    Returns:
        A 0-d tensor, or ``(B, 1, ..., 1)`` (``uncertainty.ndim`` dims) for per-sample
        thresholds and per-sample ratios.

    Raises:
        TypeError: for an unsupported ``uncertainty`` or ``threshold`` type.
        ValueError: for a NaN number, a tensor of the wrong shape, a missing ``step``, or a
            Python ratio outside ``[0, 1]``.
        RuntimeError: for ``sync_dist`` without an initialised process group.

    Examples:
        >>> u = torch.tensor([[0.1, 0.7], [0.4, 0.2]])
        >>> resolve_threshold(u, torch.tensor([0.5, 0.3]))
        tensor([[0.5000],
                [0.3000]])
        >>> from bual_losses.schedules import ratio_schedule
        >>> resolve_threshold(u, ratio_schedule(0.5), step=0)
        tensor([[0.1000],
                [0.2000]])
    """
    return _resolve(_require_uncertainty(uncertainty), threshold, step, resolve_group(sync_dist))


@numpy_compatible("uncertainty", "ratio")
def ratio_threshold(
    uncertainty: ArrayLike,
    ratio: Union[float, torch.Tensor],
    *,
    per_sample: bool = True,
    sync_dist: SyncDist = False,
) -> ArrayLike:
    r"""The exact threshold whose high region is the top-``ratio`` fraction of voxels.

    With the ``N`` values of a sample (or of the whole batch) sorted in descending order,
    ``u_(0) >= u_(1) >= ... >= u_(N-1)``, and padded with ``u_(N) = -inf``:

    $$
    k = \operatorname{round}(r\,N), \qquad \tau = u_{(k)}
    $$

    so ``u > tau`` selects the top ``k`` voxels: exactly ``k`` when ``u_(k-1) > u_(k)`` (no tie
    at the boundary), fewer when the boundary value is tied, because tied voxels all go to the
    low side (the selection is the largest set ``{u > t}`` with at most ``k`` voxels).
    ``k = 0`` gives ``tau = max u`` (nothing selected), ``k = N`` gives ``-inf`` (everything).

    ``round`` is ``torch.round``, half to even (``0.5 -> 0``, ``1.5 -> 2``), computed in
    float64 (float32 on MPS). The computation is a sort and a ``gather``, so a tensor ratio
    (e.g. from a schedule at a tensor step) causes no host synchronisation; such a ratio is
    clamped to ``[0, 1]`` (NaN counts as 0) because raising would need one.

    Args:
        uncertainty: ``(B, *S)`` or ``(B, 1, *S)`` floating map (expected finite).
        ratio: ``r`` in ``[0, 1]``: a Python number or a 0-d tensor.
        per_sample: ``N`` = voxels per sample, one threshold each (``True``), or all voxels of
            the batch, one threshold (``False``).
        sync_dist: with ``per_sample=False``, ``True`` (the default process group) or a
            ``ProcessGroup`` makes the batch the global one: the flattened maps of all ranks
            (their sizes may differ) are all-gathered and the threshold is computed exactly
            on their concatenation, identical on every rank. This costs one small collective
            and host synchronisation for the sizes, then ``R`` times the local map in memory.
            Per-sample thresholds need no synchronisation and ignore it.

    Returns:
        ``(B, 1, ..., 1)`` thresholds if ``per_sample`` else a 0-d tensor, in the map's dtype.

    Raises:
        TypeError: for a non-floating ``uncertainty`` or an unsupported ``ratio`` type.
        ValueError: for a Python ``ratio`` outside ``[0, 1]`` or a non-0-d tensor ratio.
        RuntimeError: for ``sync_dist`` without an initialised process group.

    Examples:
        >>> u = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
        >>> ratio_threshold(u, 0.5)  # top 2 = {0.9, 0.5}
        tensor([[0.3000]])
        >>> ratio_threshold(torch.tensor([[0.5, 0.5, 0.5, 0.1]]), 0.5)  # tie: nothing above 0.5
        tensor([[0.5000]])
    """
    u = _require_uncertainty(uncertainty)
    if not isinstance(per_sample, bool):
        raise TypeError(f"`per_sample` must be a bool, got {type(per_sample).__name__}.")
    return _ratio_threshold(u, ratio, per_sample=per_sample, group=resolve_group(sync_dist))


@numpy_compatible("uncertainty", "threshold")
def high_uncertainty_mask(
    uncertainty: ArrayLike,
    threshold: Threshold,
    *,
    step: Optional[Numeric] = None,
    validate: bool = True,
    sync_dist: SyncDist = False,
) -> ArrayLike:
    r"""Boolean mask of the high-uncertainty region, ``u > tau``.

    $$ M_{\mathcal{H}}(x) = [\,u(x) > \tau\,] $$

    Voxels exactly on the threshold are **not** high (they belong to
    [`low_uncertainty_mask`][bual_losses.regions.low_uncertainty_mask]).

    Args:
        uncertainty: ``(B, *S)`` or ``(B, 1, *S)`` floating map.
        threshold: anything [`resolve_threshold`][bual_losses.regions.resolve_threshold]
            accepts.
        step: the training step, required when ``threshold`` is a schedule.
        validate: check that ``uncertainty`` is finite and the threshold is not NaN (NaN
            voxels would otherwise fall silently into the low, trusted region). Asynchronous on
            accelerators, skipped under ``torch.compile``.
        sync_dist: resolve a batch RatioSchedule over all ranks (see
            [`resolve_threshold`][bual_losses.regions.resolve_threshold]).

    Returns:
        Bool tensor shaped like ``uncertainty``.

    Raises:
        TypeError, ValueError: as [`resolve_threshold`][bual_losses.regions.resolve_threshold];
            ``ValueError`` for NaN/Inf values when ``validate`` is on (on CPU).

    Examples:
        >>> u = torch.tensor([[0.1, 0.5, 0.9, 0.3]])
        >>> high_uncertainty_mask(u, 0.5)  # 0.5 itself is low
        tensor([[False, False,  True, False]])
        >>> from bual_losses.schedules import ratio_schedule
        >>> high_uncertainty_mask(u, ratio_schedule(0.5), step=0)
        tensor([[False,  True,  True, False]])
    """
    return _high(_require_uncertainty(uncertainty), threshold, step, validate, sync_dist)


@numpy_compatible("uncertainty", "threshold")
def low_uncertainty_mask(
    uncertainty: ArrayLike,
    threshold: Threshold,
    *,
    step: Optional[Numeric] = None,
    validate: bool = True,
    sync_dist: SyncDist = False,
) -> ArrayLike:
    r"""Boolean mask of the low-uncertainty region, ``u <= tau``: the complement of the high one.

    $$ M_{\mathcal{L}}(x) = [\,u(x) \le \tau\,] = 1 - M_{\mathcal{H}}(x) $$

    Computed as ``~high_uncertainty_mask(...)``, so high and low partition the voxels exactly,
    with ties (``u == tau``) on the low side.

    Args:
        uncertainty: ``(B, *S)`` or ``(B, 1, *S)`` floating map.
        threshold: anything [`resolve_threshold`][bual_losses.regions.resolve_threshold]
            accepts.
        step: the training step, required when ``threshold`` is a schedule.
        validate: check that ``uncertainty`` is finite and the threshold is not NaN.
        sync_dist: resolve a batch RatioSchedule over all ranks (see
            [`resolve_threshold`][bual_losses.regions.resolve_threshold]).

    Returns:
        Bool tensor shaped like ``uncertainty``.

    Raises:
        TypeError, ValueError: as
            [`high_uncertainty_mask`][bual_losses.regions.high_uncertainty_mask].

    Examples:
        >>> u = torch.tensor([[0.1, 0.5, 0.9, 0.3]])
        >>> low_uncertainty_mask(u, 0.5)
        tensor([[ True,  True, False,  True]])
    """
    return ~_high(_require_uncertainty(uncertainty), threshold, step, validate, sync_dist)


@numpy_compatible("uncertainty", "threshold")
def soft_uncertainty_weight(
    uncertainty: ArrayLike,
    threshold: Threshold,
    *,
    temperature: float,
    step: Optional[Numeric] = None,
    high: bool = True,
    validate: bool = True,
    sync_dist: SyncDist = False,
) -> ArrayLike:
    r"""Soft region membership: a sigmoid of the distance to the threshold.

    $$
    w_{\mathcal{H}}(x) = \sigma\!\left(\frac{u(x) - \tau}{T}\right), \qquad
    w_{\mathcal{L}}(x) = \sigma\!\left(\frac{\tau - u(x)}{T}\right) = 1 - w_{\mathcal{H}}(x)
    $$

    As ``T -> 0`` the weights tend to the hard masks away from the threshold; on it both are
    ``1/2``. With ``tau = -inf`` (ratio 1) every voxel has ``w_H = 1``.

    Args:
        uncertainty: ``(B, *S)`` or ``(B, 1, *S)`` floating map.
        threshold: anything [`resolve_threshold`][bual_losses.regions.resolve_threshold]
            accepts.
        temperature: ``T > 0``, in the units of the uncertainty.
        step: the training step, required when ``threshold`` is a schedule.
        high: return ``w_H`` (``True``) or ``w_L`` (``False``).
        validate: check that ``uncertainty`` is finite and the threshold is not NaN.
        sync_dist: resolve a batch RatioSchedule over all ranks (see
            [`resolve_threshold`][bual_losses.regions.resolve_threshold]).

    Returns:
        Weights in ``[0, 1]`` shaped like ``uncertainty``, in its dtype.

    Raises:
        TypeError: for a non-number ``temperature``, or as
            [`resolve_threshold`][bual_losses.regions.resolve_threshold].
        ValueError: for ``temperature <= 0`` or non-finite, or as
            [`resolve_threshold`][bual_losses.regions.resolve_threshold].

    Examples:
        >>> u = torch.tensor([[0.0, 0.5, 1.0]])
        >>> soft_uncertainty_weight(u, 0.5, temperature=0.1)
        tensor([[0.0067, 0.5000, 0.9933]])
        >>> soft_uncertainty_weight(u, 0.5, temperature=0.1, high=False)
        tensor([[0.9933, 0.5000, 0.0067]])
    """
    temp = require_nonnegative_number(temperature, "temperature", positive=True)
    if not isinstance(high, bool):
        raise TypeError(f"`high` must be a bool, got {type(high).__name__}.")
    u = _require_uncertainty(uncertainty)
    thr = _resolve(u, threshold, step, resolve_group(sync_dist))
    if validate:
        _check(u, thr)
    # Negating the difference (exact in IEEE arithmetic) keeps w_H + w_L == 1 up to the
    # rounding of the two sigmoids, and keeps tiny low weights accurate (unlike 1 - w_H).
    z = (u - thr) / temp
    return torch.sigmoid(z if high else -z)


@numpy_compatible("target")
def valid_mask(target: ArrayLike, *, ignore_index: Optional[int] = None) -> ArrayLike:
    r"""Voxels that carry a label: ``target != ignore_index``.

    $$ V(x) = [\,y(x) \ne \text{ignore\_index}\,] $$

    Args:
        target: label map of any shape, typically ``(B, *S)``.
        ignore_index: the label of unannotated voxels, or ``None`` (all voxels are valid).

    Returns:
        Bool tensor shaped like ``target``.

    Raises:
        TypeError: if ``target`` is not an array or ``ignore_index`` is not an int.

    Examples:
        >>> valid_mask(torch.tensor([[0, 255, 2]]), ignore_index=255)
        tensor([[ True, False,  True]])
        >>> valid_mask(torch.tensor([[0, 255, 2]]))
        tensor([[True, True, True]])
    """
    t = require_tensor(target, "target")
    index = require_ignore_index(ignore_index, "labels")
    if index is None:
        return torch.ones_like(t, dtype=torch.bool)
    return t != index


@numpy_compatible("mask")
def region_fraction(
    mask: ArrayLike, *, per_sample: bool = False, sync_dist: SyncDist = False
) -> ArrayLike:
    r"""Fraction of voxels in a region (mean of a bool mask or of soft weights), for logging.

    $$ f = \frac{1}{N}\sum_x M(x) $$

    over all voxels (``per_sample=False``) or over the voxels of each sample. Stays a tensor on
    the mask's device, so logging it costs no synchronisation until it is read.

    Args:
        mask: ``(B, *S)`` bool mask or soft weights.
        per_sample: one fraction per sample instead of one overall.
        sync_dist: ``True`` (the default process group) or a ``ProcessGroup`` makes the overall
            fraction global, over the voxels of all ranks (one all-reduce of a sum and a
            count, both in float64); per-sample fractions stay per rank.

    Returns:
        A 0-d tensor, or ``(B,)`` if ``per_sample``; float32 (float64 for float64 weights).

    Raises:
        TypeError: if ``mask`` is not an array.
        ValueError: if ``per_sample`` is requested for a 0-d mask.
        RuntimeError: for ``sync_dist`` without an initialised process group.

    Examples:
        >>> mask = torch.tensor([[True, False], [True, True]])
        >>> region_fraction(mask)
        tensor(0.7500)
        >>> region_fraction(mask, per_sample=True)
        tensor([0.5000, 1.0000])
    """
    m = require_tensor(mask, "mask")
    group = resolve_group(sync_dist)
    dtype = torch.promote_types(m.dtype, torch.float32) if m.is_floating_point() else torch.float32
    if per_sample:
        if m.ndim == 0:
            raise ValueError("`mask` must have shape (B, *S) for per_sample=True, got ().")
        return m.reshape(m.shape[0], -1).to(dtype).mean(dim=1)
    if group is not None:
        return global_mean(m.to(dtype).sum(), m.numel(), group)
    return m.to(dtype).mean()


class UncertaintyWeight(NamedTuple):
    r"""A region weight derived from the normalised entropy ``u`` of the logits themselves.

    ``w = base + scale * s`` with ``s = [u > threshold]`` (``temperature=None``) or
    ``sigmoid((u - threshold) / temperature)`` for ``side="high"``; for ``side="low"`` the
    complement ``[u <= threshold]`` or ``sigmoid((threshold - u) / temperature)`` (ties
    ``u == threshold`` go to the low side, as in [`bual_losses.regions`][]). The weight carries
    no gradient.

    Attributes:
        threshold: the threshold of ``u``: a number, a 0-d tensor or one value per sample,
            shape ``(B,)``.
        side: ``"high"`` (the region ``u > threshold`` gets the extra weight) or ``"low"``
            (``u <= threshold`` does).
        base: the weight outside the region (``s = 0``).
        scale: the weight added inside the region (``w = base + scale`` where ``s = 1``).
        temperature: ``None`` for the hard indicator, else the temperature of the sigmoid.
        relative: ``threshold`` is a factor of each sample's mean ``u`` (a per-sample
            [`RelativeThreshold`][bual_losses.schedules.RelativeThreshold]), made absolute by
            the engine from the map it computes.

    Examples:
        >>> import torch
        >>> from bual_losses import UncertaintyWeight
        >>> u, tau = torch.tensor([0.2, 0.5, 0.9]), torch.tensor(0.5)
        >>> UncertaintyWeight(tau, side="high", base=1.0, scale=1.0)(u, tau)  # 1 + [u > tau]
        tensor([1., 1., 2.])
        >>> UncertaintyWeight(tau, side="low", base=0.0, scale=1.0)(u, tau)  # [u <= tau]
        tensor([1., 1., 0.])
        >>> UncertaintyWeight(tau, temperature=0.1).indicator(u, tau)  # sigmoid((u - tau) / T)
        tensor([0.0474, 0.5000, 0.9820])
    """

    threshold: Union[float, torch.Tensor]
    side: str = "high"
    base: float = 1.0
    scale: float = 1.0
    temperature: Optional[float] = None
    relative: bool = False

    def absolute(self, u: torch.Tensor) -> UncertaintyWeight:
        """The same weight with an absolute threshold: a relative one times each sample's mean
        of the map ``u`` (B, *S), shape (B,)."""
        if not self.relative:
            return self
        mean = u.reshape(u.shape[0], -1).mean(dim=1)
        return self._replace(threshold=mean * self.threshold, relative=False)

    def indicator(self, u: torch.Tensor, threshold: Union[float, torch.Tensor]) -> torch.Tensor:
        """Region membership ``s`` in [0, 1]; ``threshold`` shaped to broadcast against ``u``."""
        if self.temperature is None:
            high = u > threshold
            return (high if self.side == "high" else ~high).to(u.dtype)
        z = (u - threshold) / self.temperature
        return torch.sigmoid(z if self.side == "high" else -z)

    def __call__(self, u: torch.Tensor, threshold: Union[float, torch.Tensor]) -> torch.Tensor:
        """The weight ``base + scale * s``."""
        return self.base + self.scale * self.indicator(u, threshold)
