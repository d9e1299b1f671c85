r"""Ramps and threshold schedules: pure callables of the training step.

A [`Schedule`][bual_losses.schedules.Schedule] maps the step ``t`` to a value, like an optax
schedule. The step may be

* a Python number: the result is a Python ``float`` (cheap to log, no tensor created);
* a ``torch.Tensor`` (usually 0-d, e.g. a step counter living on the GPU): the result is a
  tensor on the same device computed with torch ops only, so the schedule neither synchronises
  with the host nor branches on data, and traces under ``torch.compile(fullgraph=True)``.
  Integer step tensors are promoted to the default float dtype.

All configuration is checked when the schedule is built; a bad value fails there, naming the
argument and the value, not at step 10 000 of a run.

The ramps reproduce the SSL4MIS / UA-MT ``ramps.py`` definitions (Yu et al., 2019; Luo,
SSL4MIS), which clip the step into ``[0, length]``. Where SSL4MIS *asserts* instead
(``linear_rampup`` for a negative step, ``cosine_rampdown`` outside ``[0, length]``), these
functions clip, so every step is valid. These defaults come from that literature; they are not
numbers from the bidirectional-uncertainty paper, whose exact hyperparameters are unknown.
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Real
from typing import Any, Callable, Literal, Optional, Union, overload

import torch

from bual_losses._validation import (
    real_number,
    require_choice,
    require_finite_number,
    require_nonnegative_number,
    require_positive_int,
)

__all__ = [
    "Numeric",
    "RatioSchedule",
    "RelativeThreshold",
    "Schedule",
    "as_schedule",
    "constant_schedule",
    "cosine_rampdown",
    "cosine_schedule",
    "linear_rampup",
    "linear_schedule",
    "rampup_schedule",
    "ratio_schedule",
    "relative_threshold",
    "sigmoid_rampup",
    "uamt_threshold_schedule",
]

Numeric = Union[int, float, torch.Tensor]
"""A step or a scheduled value: a Python number or a tensor."""

Schedule = Callable[[Numeric], Numeric]
"""The one schedule type: a callable of the step.

Python number in -> Python float out; tensor in -> tensor out on the same device.
"""

_RAMP_KINDS = ("sigmoid", "linear")
_BASES = ("normalized", "ln2", "lnC")


# --------------------------------------------------------------------------------------------
# step handling


def _float_step(step: torch.Tensor) -> torch.Tensor:
    # An integer step counter would make `step / length` integer division-free but the
    # clamp and exp would then run in int64; promote once, on the device, without a sync.
    return step if step.is_floating_point() else step.to(torch.get_default_dtype())


def _python_step(step: Any) -> float:
    # float() alone would accept the string "10"; numpy scalars and 0-d arrays are fine.
    if not isinstance(step, (str, bytes)):
        try:
            return float(step)
        except (TypeError, ValueError):
            pass
    raise TypeError(f"`step` must be a number or a torch.Tensor, got {type(step).__name__}.")


def _require_length(length: Any, name: str = "length") -> float:
    return require_nonnegative_number(length, name)


# --------------------------------------------------------------------------------------------
# ramps (unchecked cores; the public functions validate `length` first)


def _sigmoid_rampup(step: Numeric, length: float) -> Numeric:
    if isinstance(step, torch.Tensor):
        t = _float_step(step)
        if length == 0:
            return torch.ones_like(t)
        gap = 1.0 - t.clamp(0.0, length) / length
        return torch.exp(-5.0 * gap * gap)
    s = _python_step(step)
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(s, 0.0), length) / length
    return math.exp(-5.0 * phase * phase)


def _linear_rampup(step: Numeric, length: float) -> Numeric:
    if isinstance(step, torch.Tensor):
        t = _float_step(step)
        if length == 0:
            return torch.ones_like(t)
        return (t / length).clamp(0.0, 1.0)
    s = _python_step(step)
    if length == 0:
        return 1.0
    return min(max(s / length, 0.0), 1.0)


def _cosine_rampdown(step: Numeric, length: float) -> Numeric:
    if isinstance(step, torch.Tensor):
        t = _float_step(step)
        if length == 0:
            return torch.zeros_like(t)
        return 0.5 * (torch.cos(math.pi * t.clamp(0.0, length) / length) + 1.0)
    s = _python_step(step)
    if length == 0:
        return 0.0
    return 0.5 * (math.cos(math.pi * min(max(s, 0.0), length) / length) + 1.0)


@overload
def sigmoid_rampup(step: torch.Tensor, length: float) -> torch.Tensor: ...
@overload
def sigmoid_rampup(step: float, length: float) -> float: ...
def sigmoid_rampup(step: Numeric, length: float) -> Numeric:
    r"""Sigmoid-shaped ramp-up from ``exp(-5)`` to 1 (SSL4MIS / UA-MT, Laine & Aila 2017).

    $$
    r(t) = \begin{cases}
        \exp\!\left(-5\,\bigl(1 - \operatorname{clip}(t, 0, L) / L\bigr)^2\right) & L > 0 \\
        1 & L = 0
    \end{cases}
    $$

    Args:
        step: the training step ``t``, a Python number or a tensor of any shape.
        length: the ramp length ``L >= 0`` in steps.

    Returns:
        ``r(t)`` in ``[exp(-5), 1]``: a Python float for a number step, otherwise a tensor of
        the step's shape on its device.

    Raises:
        ValueError: if ``length`` is negative or not finite.

    Examples:
        >>> round(sigmoid_rampup(50, 100), 6)  # exp(-1.25)
        0.286505
        >>> sigmoid_rampup(torch.tensor([0.0, 100.0, 200.0]), 100)
        tensor([0.0067, 1.0000, 1.0000])
    """
    return _sigmoid_rampup(step, _require_length(length))


@overload
def linear_rampup(step: torch.Tensor, length: float) -> torch.Tensor: ...
@overload
def linear_rampup(step: float, length: float) -> float: ...
def linear_rampup(step: Numeric, length: float) -> Numeric:
    r"""Linear ramp-up from 0 to 1 (SSL4MIS ``linear_rampup``).

    $$
    r(t) = \begin{cases} \operatorname{clip}(t / L, 0, 1) & L > 0 \\ 1 & L = 0 \end{cases}
    $$

    SSL4MIS asserts ``t >= 0``; here a negative step clips to 0.

    Args:
        step: the training step ``t``, a Python number or a tensor of any shape.
        length: the ramp length ``L >= 0`` in steps.

    Returns:
        ``r(t)`` in ``[0, 1]``, a Python float or a tensor like ``step``.

    Raises:
        ValueError: if ``length`` is negative or not finite.

    Examples:
        >>> linear_rampup(25, 100)
        0.25
        >>> linear_rampup(torch.tensor([-5, 50, 500]), 100)
        tensor([0.0000, 0.5000, 1.0000])
    """
    return _linear_rampup(step, _require_length(length))


@overload
def cosine_rampdown(step: torch.Tensor, length: float) -> torch.Tensor: ...
@overload
def cosine_rampdown(step: float, length: float) -> float: ...
def cosine_rampdown(step: Numeric, length: float) -> Numeric:
    r"""Half-cosine ramp-down from 1 to 0 (SSL4MIS ``cosine_rampdown``).

    $$
    r(t) = \begin{cases}
        \tfrac12\bigl(\cos(\pi\,\operatorname{clip}(t, 0, L) / L) + 1\bigr) & L > 0 \\
        0 & L = 0
    \end{cases}
    $$

    SSL4MIS asserts ``0 <= t <= L`` and divides by zero for ``L = 0``; here the step is clipped
    and ``L = 0`` means the ramp-down is already over (``0``), mirroring the ramp-ups, which
    return their final value ``1`` for ``L = 0``.

    Args:
        step: the training step ``t``, a Python number or a tensor of any shape.
        length: the ramp length ``L >= 0`` in steps.

    Returns:
        ``r(t)`` in ``[0, 1]``, a Python float or a tensor like ``step``.

    Raises:
        ValueError: if ``length`` is negative or not finite.

    Examples:
        >>> cosine_rampdown(50, 100)
        0.5
        >>> cosine_rampdown(torch.tensor([0.0, 100.0, 150.0]), 100)
        tensor([1., 0., 0.])
    """
    return _cosine_rampdown(step, _require_length(length))


# --------------------------------------------------------------------------------------------
# schedule constructors


# The schedules are small frozen dataclasses, not closures: a module or a training config
# holding one can be pickled (checkpoints, DataLoader workers, multiprocessing), compared and
# printed. Their repr reads like the call that built them.


@dataclasses.dataclass(frozen=True, repr=False)
class _Constant:
    value: float

    def __call__(self, step: Numeric) -> Numeric:
        if isinstance(step, torch.Tensor):
            return torch.full_like(_float_step(step), self.value)
        return self.value

    def __repr__(self) -> str:
        return f"constant_schedule({self.value!r})"


_RAMPS: dict[str, Callable[[Numeric, float], Numeric]] = {
    "sigmoid": _sigmoid_rampup,
    "linear": _linear_rampup,
    "cosine": _cosine_rampdown,
}


@dataclasses.dataclass(frozen=True, repr=False)
class _Interpolation:
    """``v_0 + (v_1 - v_0) * ramp(t)``: ``linear_schedule``, and ``cosine_schedule`` written
    from its end value (``ramp`` = the cosine ramp-down, ``v_0`` the end value)."""

    start: float
    end: float
    length: float
    ramp: str

    def __call__(self, step: Numeric) -> Numeric:
        return self.start + (self.end - self.start) * _RAMPS[self.ramp](step, self.length)

    def __repr__(self) -> str:
        if self.ramp == "cosine":
            return f"cosine_schedule({self.end!r}, {self.start!r}, {self.length!r})"
        return f"linear_schedule({self.start!r}, {self.end!r}, {self.length!r})"


@dataclasses.dataclass(frozen=True, repr=False)
class _Rampup:
    peak: float
    length: float
    kind: str

    def __call__(self, step: Numeric) -> Numeric:
        return self.peak * _RAMPS[self.kind](step, self.length)

    def __repr__(self) -> str:
        return f"rampup_schedule({self.peak!r}, {self.length!r}, kind={self.kind!r})"


@dataclasses.dataclass(frozen=True, repr=False)
class _UAMTThreshold:
    length: float
    scale: float

    def __call__(self, step: Numeric) -> Numeric:
        return (0.75 + 0.25 * _sigmoid_rampup(step, self.length)) * self.scale

    def __repr__(self) -> str:
        return f"uamt_threshold_schedule({self.length!r}, base={self.scale!r})"


def _constant(value: float) -> Schedule:
    return _Constant(value)


def constant_schedule(value: float) -> Schedule:
    r"""A schedule that always returns ``value``.

    $$ s(t) = v $$

    Args:
        value: the finite constant ``v``.

    Returns:
        A [`Schedule`][bual_losses.schedules.Schedule]; for a tensor step it returns a tensor
        filled with ``v``, shaped and placed like the step.

    Raises:
        TypeError: if ``value`` is not a number.
        ValueError: if ``value`` is not finite.

    Examples:
        >>> schedule = constant_schedule(0.1)
        >>> schedule(7)
        0.1
        >>> schedule(torch.tensor(7))
        tensor(0.1000)
    """
    return _constant(require_finite_number(value, "value"))


def linear_schedule(init_value: float, end_value: float, transition_steps: float) -> Schedule:
    r"""Linear interpolation from ``init_value`` to ``end_value``, then constant.

    $$ s(t) = v_0 + (v_1 - v_0)\,\operatorname{clip}(t / T, 0, 1) $$

    Unlike optax (which keeps ``init_value`` when ``transition_steps <= 0``), ``T = 0`` gives
    ``end_value`` at every step, consistent with
    [`linear_rampup`][bual_losses.schedules.linear_rampup] returning 1 for ``L = 0``.

    Args:
        init_value: ``v_0``, the value at ``t <= 0``.
        end_value: ``v_1``, the value at ``t >= T``.
        transition_steps: ``T >= 0``.

    Returns:
        A [`Schedule`][bual_losses.schedules.Schedule].

    Raises:
        TypeError: if an argument is not a number.
        ValueError: if a value is not finite or ``transition_steps`` is negative.

    Examples:
        >>> schedule = linear_schedule(1.0, 0.0, transition_steps=10)
        >>> schedule(5), schedule(20)
        (0.5, 0.0)
    """
    v0 = require_finite_number(init_value, "init_value")
    v1 = require_finite_number(end_value, "end_value")
    return _Interpolation(v0, v1, _require_length(transition_steps, "transition_steps"), "linear")


def cosine_schedule(init_value: float, end_value: float, decay_steps: float) -> Schedule:
    r"""Half-cosine interpolation from ``init_value`` to ``end_value``, then constant.

    $$
    s(t) = v_1 + (v_0 - v_1)\,\tfrac12\bigl(\cos(\pi\,\operatorname{clip}(t, 0, T) / T) + 1\bigr)
    $$

    This is optax's ``cosine_decay_schedule`` with ``alpha = v_1 / v_0`` (exponent 1), written
    with the end value so that ``v_0 = 0`` works too. ``T = 0`` gives ``end_value`` throughout.

    Args:
        init_value: ``v_0``, the value at ``t <= 0``.
        end_value: ``v_1``, the value at ``t >= T``.
        decay_steps: ``T >= 0``.

    Returns:
        A [`Schedule`][bual_losses.schedules.Schedule].

    Raises:
        TypeError: if an argument is not a number.
        ValueError: if a value is not finite or ``decay_steps`` is negative.

    Examples:
        >>> schedule = cosine_schedule(1.0, 0.2, decay_steps=100)
        >>> schedule(0), round(schedule(50), 6), schedule(100)
        (1.0, 0.6, 0.2)
    """
    v0 = require_finite_number(init_value, "init_value")
    v1 = require_finite_number(end_value, "end_value")
    return _Interpolation(v1, v0, _require_length(decay_steps, "decay_steps"), "cosine")


def rampup_schedule(
    peak: float,
    length: float,
    *,
    kind: Literal["sigmoid", "linear"] = "sigmoid",
) -> Schedule:
    r"""The consistency-weight ramp ``lambda(t) = peak * ramp(t)`` of mean-teacher training.

    $$ \lambda(t) = \lambda_{\max}\; r(t; L) $$

    with ``r`` = [`sigmoid_rampup`][bual_losses.schedules.sigmoid_rampup] (the SSL4MIS / UA-MT
    default, where ``L`` is typically ``consistency_rampup`` epochs or iterations) or
    [`linear_rampup`][bual_losses.schedules.linear_rampup].

    Args:
        peak: ``lambda_max``, the weight after the ramp (SSL4MIS uses 0.1 for UA-MT).
        length: ``L >= 0``, the ramp length in the same unit as the step.
        kind: ``"sigmoid"`` or ``"linear"``.

    Returns:
        A [`Schedule`][bual_losses.schedules.Schedule].

    Raises:
        TypeError: if ``peak`` or ``length`` is not a number.
        ValueError: for a non-finite ``peak``, a negative ``length`` or an unknown ``kind``.

    Examples:
        >>> weight = rampup_schedule(0.1, 200, kind="linear")
        >>> weight(50)
        0.025
        >>> round(rampup_schedule(0.1, 200)(100), 5)  # 0.1 * exp(-1.25)
        0.02865
    """
    peak_value = require_finite_number(peak, "peak")
    ramp_length = _require_length(length)
    require_choice(kind, "kind", _RAMP_KINDS)
    return _Rampup(peak_value, ramp_length, kind)


def _entropy_base(base: Any, num_classes: Optional[int]) -> float:
    if num_classes is not None:
        # Checked for every base (so a typo never passes silently) but used only by "lnC".
        classes = require_positive_int(num_classes, "num_classes")
        if classes < 2:
            raise ValueError(
                "`num_classes` must be >= 2 (use 2 for binary logits with C == 1), "
                f"got {num_classes!r}."
            )
    if isinstance(base, str):
        require_choice(base, "base", _BASES)
        if base == "ln2":
            return math.log(2.0)
        if base == "lnC":
            if num_classes is None:
                raise ValueError(
                    "`base='lnC'` needs `num_classes` (the threshold scale is ln C), got None."
                )
            return math.log(num_classes)
        return 1.0
    if isinstance(base, bool) or not isinstance(base, (Real, torch.Tensor)):
        raise TypeError(
            f"`base` must be one of {_BASES} or a positive number, got {type(base).__name__}."
        )
    return require_nonnegative_number(base, "base", positive=True)


def uamt_threshold_schedule(
    total_steps: float,
    *,
    base: Union[Literal["normalized", "ln2", "lnC"], float] = "normalized",
    num_classes: Optional[int] = None,
) -> Schedule:
    r"""UA-MT's uncertainty threshold, rising from 75% to 100% of the maximum entropy.

    $$
    \tau(t) = \bigl(0.75 + 0.25\; r_{\text{sigmoid}}(t; T)\bigr)\; b
    $$

    UA-MT (Yu et al., MICCAI 2019; SSL4MIS ``train_uncertainty_aware_mean_teacher_3D.py``) uses
    ``T = max_iterations`` and ``b = ln 2``, the maximum entropy of its two-class left-atrium
    model, for a predictive entropy in nats. Choose ``b`` to match how the uncertainty is
    measured:

    * ``"normalized"`` (default): ``b = 1``, for entropy divided by ``ln C`` (in ``[0, 1]``);
    * ``"ln2"``: ``b = ln 2``, UA-MT's binary setting (entropy in nats);
    * ``"lnC"``: ``b = ln C`` with ``C = num_classes``, the multi-class generalisation;
    * a positive number: ``b`` itself (e.g. for mutual information or variance maps).

    Args:
        total_steps: ``T >= 0``, the ramp length (UA-MT: the total number of iterations).
        base: the scale ``b`` as above.
        num_classes: ``C >= 2``; required for ``base="lnC"``, ignored (but still checked)
            otherwise. Binary models with one logit channel have ``C = 2``.

    Returns:
        A [`Schedule`][bual_losses.schedules.Schedule] of the threshold.

    Raises:
        TypeError: if ``total_steps``, ``base`` or ``num_classes`` has the wrong type.
        ValueError: for a negative ``total_steps``, an unknown or non-positive ``base``,
            ``num_classes < 2``, or ``base="lnC"`` without ``num_classes``.

    Examples:
        >>> threshold = uamt_threshold_schedule(6000, base="ln2")
        >>> round(threshold(0), 6)  # (0.75 + 0.25 * exp(-5)) * ln 2
        0.521028
        >>> round(threshold(6000), 6)  # ln 2
        0.693147
        >>> uamt_threshold_schedule(6000)(torch.tensor(6000))
        tensor(1.)
    """
    return _UAMTThreshold(
        _require_length(total_steps, "total_steps"), _entropy_base(base, num_classes)
    )


# --------------------------------------------------------------------------------------------
# ratio schedules


@dataclasses.dataclass(frozen=True)
class RatioSchedule:
    r"""The fraction ``r(t)`` of voxels to call *high uncertainty*, as a schedule.

    The top-``r`` fraction of voxels by uncertainty (``round(r N)`` voxels, see
    [`ratio_threshold`][bual_losses.regions.ratio_threshold]) is the high-uncertainty region,
    counted per sample (``per_sample=True``, ``N`` = voxels of one sample) or over the whole
    batch (``N`` = all voxels). Region functions recognise this type and turn it into the exact
    threshold of the current uncertainty map.

    Calling the object evaluates the ratio at a step, like any
    [`Schedule`][bual_losses.schedules.Schedule].

    Attributes:
        ratio: a constant in ``[0, 1]`` (checked here) or a schedule giving it (a tensor ratio
            outside ``[0, 1]`` is clamped where it is used; a Python one raises there).
        per_sample: count the fraction per sample (``True``) or over the batch.

    Raises:
        TypeError: if ``ratio`` is neither a number nor callable, or ``per_sample`` is not bool.
        ValueError: if a constant ``ratio`` lies outside ``[0, 1]``.

    Examples:
        >>> top = RatioSchedule(0.2)
        >>> top(100), top.per_sample
        (0.2, True)
    """

    ratio: Union[float, Schedule]
    per_sample: bool = True

    def __post_init__(self) -> None:
        if not callable(self.ratio):
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (Real, torch.Tensor)):
                raise TypeError(
                    "`ratio` must be a number in [0, 1] or a Schedule, "
                    f"got {type(self.ratio).__name__}."
                )
            ratio = real_number(self.ratio, "ratio")
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"`ratio` must lie in [0, 1], got {ratio!r}.")
            # frozen dataclass: normalise an int, numpy or 0-d tensor ratio to float once.
            object.__setattr__(self, "ratio", float(ratio))
        if not isinstance(self.per_sample, bool):
            raise TypeError(f"`per_sample` must be a bool, got {type(self.per_sample).__name__}.")

    def __call__(self, step: Numeric) -> Numeric:
        if callable(self.ratio):
            return self.ratio(step)
        if isinstance(step, torch.Tensor):
            return torch.full_like(_float_step(step), self.ratio)
        return self.ratio


def ratio_schedule(ratio: Union[float, Schedule], *, per_sample: bool = True) -> RatioSchedule:
    r"""Select the top-``r(t)`` fraction of voxels by uncertainty as the high region.

    $$
    \mathcal{H}_t = \operatorname{top}_{k}(u), \qquad k = \operatorname{round}(r(t)\,N)
    $$

    A ratio gives regions of a known size whatever the scale of the uncertainty, which a fixed
    threshold does not (entropy shrinks as the model trains).

    Args:
        ratio: a constant in ``[0, 1]`` or a [`Schedule`][bual_losses.schedules.Schedule] of it.
        per_sample: ``N`` counts the voxels of each sample (``True``) or of the whole batch.

    Returns:
        A [`RatioSchedule`][bual_losses.schedules.RatioSchedule].

    Raises:
        TypeError: if ``ratio`` is neither a number nor a schedule.
        ValueError: if a constant ``ratio`` lies outside ``[0, 1]``.

    Examples:
        >>> ratio = ratio_schedule(linear_schedule(0.5, 0.1, 1000), per_sample=False)
        >>> ratio(500), ratio.per_sample
        (0.3, False)
    """
    return RatioSchedule(ratio, per_sample=per_sample)


@dataclasses.dataclass(frozen=True)
class RelativeThreshold:
    r"""A threshold relative to the map's own uncertainty: ``tau = f(t) * mean(u)``.

    The mean is taken per sample (``per_sample=True``, one threshold each) or over the whole
    batch. The region ``u > tau`` is then "more uncertain than this image's average" (for
    ``f = 1``): it follows the model as it grows confident, so it neither swallows every voxel
    early in training nor vanishes late, as a fixed fraction of the maximum entropy does. It is
    the stateless form of FreeMatch's self-adaptive threshold (Wang et al., ICLR 2023), which
    tracks the model's mean confidence. Only a constant map (every voxel equally uncertain) has
    an empty high region.

    Calling the object evaluates the factor at a step, like any
    [`Schedule`][bual_losses.schedules.Schedule].

    Attributes:
        factor: ``f >= 0``, a number (checked here) or a schedule giving it.
        per_sample: one mean per sample (``True``) or one over the batch (with ``sync_dist``:
            over the global batch).

    Raises:
        TypeError: if ``factor`` is neither a number nor callable, or ``per_sample`` is not bool.
        ValueError: if a constant ``factor`` is negative or not finite.

    Examples:
        >>> above_average = RelativeThreshold()
        >>> above_average(100), above_average.per_sample
        (1.0, True)
    """

    factor: Union[float, Schedule] = 1.0
    per_sample: bool = True

    def __post_init__(self) -> None:
        if not callable(self.factor):
            if isinstance(self.factor, bool) or not isinstance(self.factor, (Real, torch.Tensor)):
                raise TypeError(
                    "`factor` must be a number >= 0 or a Schedule, "
                    f"got {type(self.factor).__name__}."
                )
            object.__setattr__(self, "factor", require_nonnegative_number(self.factor, "factor"))
        if not isinstance(self.per_sample, bool):
            raise TypeError(f"`per_sample` must be a bool, got {type(self.per_sample).__name__}.")

    def __call__(self, step: Numeric) -> Numeric:
        if callable(self.factor):
            return self.factor(step)
        if isinstance(step, torch.Tensor):
            return torch.full_like(_float_step(step), self.factor)
        return self.factor


def relative_threshold(
    factor: Union[float, Schedule] = 1.0, *, per_sample: bool = True
) -> RelativeThreshold:
    r"""Threshold the uncertainty at a multiple of its own mean: the region adapts to the model.

    $$ \tau_t = f(t)\;\frac{1}{N}\sum_{x} u(x) $$

    over the voxels of each sample (``per_sample=True``) or of the batch. The default of
    [`bidirectional_loss`][bual_losses.bidirectional.bidirectional_loss] for both regions
    (``f = 1``): labeled voxels more uncertain than their image's average are emphasised,
    unlabeled voxels more uncertain than theirs are not trusted.

    Args:
        factor: ``f >= 0``: a number or a [`Schedule`][bual_losses.schedules.Schedule].
        per_sample: one threshold per sample (``True``) or one for the batch.

    Returns:
        A [`RelativeThreshold`][bual_losses.schedules.RelativeThreshold].

    Examples:
        >>> relative_threshold(1.5, per_sample=False)
        RelativeThreshold(factor=1.5, per_sample=False)
    """
    return RelativeThreshold(factor, per_sample=per_sample)


MAP_THRESHOLDS = (RatioSchedule, RelativeThreshold)
"""Threshold kinds resolved from the uncertainty map itself (callable, but not plain
schedules: region functions test for them before treating a callable as a Schedule)."""


def as_schedule(value: Union[float, Schedule], *, name: str = "value") -> Schedule:
    r"""Turn a number into a constant schedule; return a schedule unchanged.

    $$ s = \begin{cases} t \mapsto v & v \text{ a number} \\ v & v \text{ callable} \end{cases} $$

    The losses accept either form for their scheduled options and call this once, at
    construction.

    Args:
        value: a finite number or a [`Schedule`][bual_losses.schedules.Schedule].
        name: the argument name used in error messages.

    Returns:
        A [`Schedule`][bual_losses.schedules.Schedule].

    Raises:
        TypeError: if ``value`` is neither a number nor callable.
        ValueError: if a number is not finite.

    Examples:
        >>> as_schedule(0.5)(10)
        0.5
        >>> ramp = rampup_schedule(1.0, 10)
        >>> as_schedule(ramp) is ramp
        True
    """
    if callable(value):
        return value
    if isinstance(value, (Real, torch.Tensor)) and not isinstance(value, bool):
        return _constant(require_finite_number(value, name))
    raise TypeError(
        f"`{name}` must be a number or a Schedule (a callable of the step), "
        f"got {type(value).__name__}."
    )
