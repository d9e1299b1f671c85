"""The one validation layer shared by every public entry point.

Two kinds of checks live here:

* **metadata checks** (type, dtype, shape, device, option values): always on, cost nothing,
  never touch tensor data;
* **value checks** (label range, finiteness, non-negative weights): cheap vectorised reductions
  switched off with ``validate=False``. On CPU they raise ``ValueError`` directly. On an
  accelerator they are queued with ``torch._assert_async`` so the hot path never synchronises
  with the host; a failure then surfaces as a device-side error at the next synchronisation.
  Under ``torch.compile`` and inside ``torch.func`` transforms value checks are skipped (they
  would break the graph / cannot branch on batched values).

Every message names the argument, what was expected and what arrived.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any, Literal, Optional, Union

import torch

TargetKind = Literal["labels", "probs"]

_REDUCTIONS = ("mean", "sum", "none")


def shape_str(shape: Sequence[int]) -> str:
    return str(tuple(int(s) for s in shape))


def require_tensor(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    return x


def require_floating(x: Any, name: str) -> torch.Tensor:
    x = require_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"`{name}` must have a floating dtype, got {x.dtype}.")
    return x


def require_same_device(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(
            f"`{name}` must be on the same device as `{ref_name}` ({ref.device}), got {x.device}."
        )


def require_choice(value: Any, name: str, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}.")


def real_number(value: Any, name: str) -> Union[int, float]:
    """``value`` as a Python number: ints and floats as they are, numpy scalars and 0-d real
    CPU tensors converted (an int stays an int).

    A 0-d tensor on an accelerator is refused rather than read: ``.item()`` would stall the
    device every call. Under ``torch.compile`` a number may be a symbol: it is returned as is.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"`{name}` must be a number or a 0-d real tensor, got a tensor of shape "
                f"{shape_str(value.shape)} and dtype {value.dtype}."
            )
        if value.device.type != "cpu":
            raise TypeError(
                f"`{name}` must be a Python number or a CPU 0-d tensor, got a tensor on "
                f"{value.device}: reading it would synchronise with the device at every call."
            )
        return value.item()
    if isinstance(value, Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")


def require_nonnegative_number(value: Any, name: str, *, positive: bool = False) -> float:
    value = real_number(value, name)
    if compiling():
        # torch.compile(dynamic=True) traces numbers as symbols: their range cannot be read
        # without specialising on them (eager calls check it)
        return value
    bad = (value <= 0) if positive else (value < 0)
    if bad or not math.isfinite(value):
        kind = "a finite number > 0" if positive else "a finite number >= 0"
        raise ValueError(f"`{name}` must be {kind}, got {value!r}.")
    return float(value)


def require_finite_number(value: Any, name: str) -> float:
    """A finite real number of either sign (schedule end points may be negative)."""
    value = real_number(value, name)
    if compiling():  # a symbol under dynamic shapes (see require_nonnegative_number)
        return value
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    return float(value)


def require_dim(dim: Any, x: torch.Tensor, name: str) -> int:
    """A valid dim of ``x`` (the tensor argument ``name``), as a non-negative index."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"`dim` must be an int, got {type(dim).__name__}.")
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(
            f"`dim` must be in [{-x.ndim}, {x.ndim - 1}] for `{name}` of shape "
            f"{shape_str(x.shape)}, got {dim}."
        )
    return dim % x.ndim


def require_positive_int(value: Any, name: str) -> int:
    # bool is an int subclass; `passes=True` is a bug, not 1. numpy integers are ints.
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
    return int(value)


def require_reduction(reduction: Any) -> str:
    require_choice(reduction, "reduction", _REDUCTIONS)
    return str(reduction)


def require_logits(logits: Any, name: str = "logits") -> torch.Tensor:
    logits = require_floating(logits, name)
    if logits.ndim < 3:
        raise ValueError(
            f"`{name}` must have shape (B, C, *S) with at least one spatial dim, "
            f"got {shape_str(logits.shape)}."
        )
    if logits.shape[1] < 1 or logits.numel() == 0:
        raise ValueError(f"`{name}` must be non-empty, got shape {shape_str(logits.shape)}.")
    return logits


def resolve_activation(num_classes: int, softmax: Optional[bool], sigmoid: Optional[bool]) -> str:
    """``C == 1`` is binary (sigmoid), ``C >= 2`` softmax; explicit flags must agree."""
    if sigmoid and softmax:
        raise ValueError("`softmax` and `sigmoid` are mutually exclusive, got both True.")
    if sigmoid:
        if num_classes != 1:
            raise ValueError(
                "`sigmoid=True` is for binary logits with C == 1 (treated as classes [1-p, p]); "
                f"got C = {num_classes}. Use softmax for C >= 2."
            )
        return "sigmoid"
    if softmax:
        if num_classes == 1:
            raise ValueError(
                "`softmax=True` needs C >= 2 classes; logits with C == 1 are binary: "
                "pass sigmoid=True (or leave both flags unset)."
            )
        return "softmax"
    if softmax is False and sigmoid is False:
        raise ValueError(
            "The losses take logits and need an activation: leave `softmax`/`sigmoid` unset "
            "or set one of them."
        )
    return "sigmoid" if num_classes == 1 else "softmax"


def classify_target(target: Any, logits: torch.Tensor, name: str = "target") -> TargetKind:
    """Decide whether ``target`` holds class labels or per-class probabilities.

    Accepted: labels ``(B, *S)`` or ``(B, 1, *S)`` (integer, bool or integral float values) and
    one-hot / soft targets ``(B, C, *S)`` (any numeric dtype, values in [0, 1]). For binary
    logits (``C == 1``) a floating ``(B, 1, *S)`` target is the foreground probability.
    """
    target = require_tensor(target, name)
    require_same_device(target, name, logits, "logits")
    b, c, *spatial = logits.shape
    labels_shape = (b, *spatial)
    if tuple(target.shape) == labels_shape:
        kind: TargetKind = "labels"
    elif (
        target.ndim == logits.ndim
        and tuple(target.shape[2:]) == tuple(spatial)
        and (target.shape[0] == b)
    ):
        if c == 1 and target.shape[1] == 1:
            # binary: a floating (B, 1, *S) map is a foreground probability, anything else labels
            kind = "probs" if target.is_floating_point() else "labels"
        elif target.shape[1] == c:
            kind = "probs"
        elif target.shape[1] == 1:
            kind = "labels"
        else:
            raise ValueError(
                f"`{name}` must have shape (B, *S) = {shape_str(labels_shape)}, "
                f"(B, 1, *S) or (B, C, *S) = {shape_str(logits.shape)} to match `logits` "
                f"{shape_str(logits.shape)}, got {shape_str(target.shape)}."
            )
    else:
        raise ValueError(
            f"`{name}` must have shape (B, *S) = {shape_str(labels_shape)}, (B, 1, *S) or "
            f"(B, C, *S) = {shape_str(logits.shape)} to match `logits` "
            f"{shape_str(logits.shape)}, got {shape_str(target.shape)}."
        )
    if kind == "labels" and target.is_complex():
        raise TypeError(f"`{name}` labels must be integer, bool or float, got {target.dtype}.")
    return kind


def labels_view(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Labels as ``(B, *S)`` (squeezing a channel dim of size 1)."""
    if target.ndim == logits.ndim:
        return target[:, 0]
    return target


def require_region_weight(weight: Any, logits: torch.Tensor, name: str = "region_weight") -> None:
    """``(B, *S)``, ``(B, 1, *S)``, or with B = 1 to broadcast over the batch."""
    weight = require_tensor(weight, name)
    require_same_device(weight, name, logits, "logits")
    if not (weight.is_floating_point() or weight.dtype == torch.bool):
        raise TypeError(f"`{name}` must be a floating or bool tensor, got {weight.dtype}.")
    b, _, *spatial = logits.shape
    ok_shapes = {(b, *spatial), (1, *spatial), (b, 1, *spatial), (1, 1, *spatial)}
    if tuple(weight.shape) not in ok_shapes:
        raise ValueError(
            f"`{name}` must have shape (B, *S) = {shape_str((b, *spatial))} or (B, 1, *S) "
            f"(B may be 1 to broadcast over the batch) to match `logits` "
            f"{shape_str(logits.shape)}, got {shape_str(weight.shape)}."
        )


def weight_view(weight: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Region weight as ``(B or 1, *S)``."""
    if weight.ndim == logits.ndim:
        return weight[:, 0]
    return weight


def _class_weight_tensor(class_weight: Any, expected: str) -> torch.Tensor:
    """A tensor of the given class weights: a tensor as it is, a sequence or an array (numpy,
    anything ``torch.as_tensor`` reads) converted; non-floating values get the default dtype."""
    if isinstance(class_weight, torch.Tensor):
        cw = class_weight
    elif isinstance(class_weight, (str, bytes, Mapping, Real)):
        cw = None  # a single number is not one weight per class
    else:
        try:
            cw = torch.as_tensor(class_weight)
        except (TypeError, ValueError, RuntimeError):
            cw = None
    if cw is None or cw.is_complex() or cw.dtype == torch.bool:
        raise TypeError(
            f"`class_weight` must be a sequence, array or 1-D tensor of {expected} real numbers, "
            f"got {type(class_weight).__name__}."
        )
    return cw if cw.is_floating_point() else cw.to(torch.get_default_dtype())


def require_class_weight(class_weight: Any, num_classes: int, logits: torch.Tensor) -> torch.Tensor:
    """One non-negative weight per class (C entries; 2 for binary logits with C == 1)."""
    expected = max(num_classes, 2)
    cw = _class_weight_tensor(class_weight, str(expected))
    if cw.ndim != 1 or cw.shape[0] != expected:
        raise ValueError(
            f"`class_weight` must have shape ({expected},) (one weight per class"
            f"{', background first, for binary logits' if num_classes == 1 else ''}), "
            f"got {shape_str(cw.shape)}."
        )
    cw = cw.to(device=logits.device)
    if cw.device.type == "cpu" and not compiling() and bool((cw < 0).any() | ~cw.isfinite().all()):
        raise ValueError(f"`class_weight` must be finite and >= 0, got {cw.tolist()}.")
    return cw


def class_weight_buffer(class_weight: Any) -> Optional[torch.Tensor]:
    """Construction-time check of a module's class weights (the class count is not known yet):
    1-D, finite, >= 0; a floating tensor keeps its dtype, anything else gets the default one."""
    if class_weight is None:
        return None
    cw = _class_weight_tensor(class_weight, "C")  # a float64 tensor stays float64
    if cw.ndim != 1 or bool((cw < 0).any()) or not bool(cw.isfinite().all()):
        raise ValueError(
            f"`class_weight` must be a 1-D sequence of finite weights >= 0, got {cw.tolist()}."
        )
    return cw


def require_ignore_index(ignore_index: Any, kind: TargetKind) -> Optional[int]:
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(
            f"`ignore_index` must be an int or None, got {type(ignore_index).__name__}."
        )
    if kind != "labels":
        raise ValueError(
            "`ignore_index` applies to label targets (B, *S); got a per-class probability target "
            "(B, C, *S). Zero the region weight instead."
        )
    return ignore_index


# --------------------------------------------------------------------------------------------
# value checks (validate=True)


def compiling() -> bool:
    """Whether torch.compile is tracing (value checks, which read data, are skipped then)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def check_values(condition: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition`` (a 0-d bool tensor) holds.

    CPU: checked at once. Accelerators: queued asynchronously, no host synchronisation. Under
    torch.compile and inside torch.func transforms (vmap cannot branch on a batched value) the
    check is skipped, as the module docs say.
    """
    if compiling() or torch._C._are_functorch_transforms_active():
        return
    if condition.device.type == "cpu":
        if not bool(condition):
            raise ValueError(message)
    else:
        torch._assert_async(condition, message)


def check_finite(x: torch.Tensor, name: str) -> None:
    """No NaN or Inf in ``x``, in one min/max pass without a full-size temporary.

    NaN propagates through ``aminmax`` and fails both comparisons; ``+-inf`` lies outside
    ``[-finfo.max, finfo.max]``. Integer and bool tensors are always finite.
    """
    if compiling() or x.numel() == 0:
        return
    if x.is_complex():
        x = torch.view_as_real(x.resolve_conj())
    if not x.is_floating_point():
        return
    largest = torch.finfo(x.dtype).max
    lo, hi = torch.aminmax(x)
    check_values(
        (lo >= -largest) & (hi <= largest), f"`{name}` must be finite; it contains NaN or Inf."
    )


def check_range(x: torch.Tensor, name: str, low: float, high: float, what: str) -> None:
    """``low <= x <= high`` everywhere (NaN fails), in one min/max pass without temporaries."""
    if x.dtype == torch.bool or x.numel() == 0 or compiling():
        return
    lo, hi = torch.aminmax(x)
    check_values((lo >= low) & (hi <= high), f"`{name}` must be {what}; found other values.")


def check_labels(
    labels: torch.Tensor, num_classes: int, ignore_index: Optional[int], name: str = "target"
) -> None:
    """Labels must be integral and in [0, C) (C = 2 for binary), except ``ignore_index``."""
    high = max(num_classes, 2)
    allowed = allowed_labels(num_classes, ignore_index)
    if ignore_index is not None:
        labels = torch.where(labels == ignore_index, torch.zeros_like(labels), labels)
    if labels.is_floating_point():
        check_values((labels == torch.round(labels)).all(), f"`{name}` labels must be {allowed}.")
    check_range(labels, name, 0, high - 1, f"labels: {allowed}")


def allowed_labels(num_classes: int, ignore_index: Optional[int]) -> str:
    """The label values a loss accepts, in words (C = 2 for binary logits)."""
    allowed = f"integers in [0, {max(num_classes, 2) - 1}]"
    return allowed if ignore_index is None else f"{allowed} or ignore_index={ignore_index}"


def check_probabilities(target: torch.Tensor, name: str = "target") -> None:
    check_range(target, name, 0.0, 1.0, "probabilities in [0, 1]")


def check_nonnegative(x: torch.Tensor, name: str) -> None:
    if x.dtype == torch.bool:
        return
    largest = torch.finfo(x.dtype).max if x.is_floating_point() else math.inf
    check_range(x, name, 0.0, largest, "finite and >= 0")
