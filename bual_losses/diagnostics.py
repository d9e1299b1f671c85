r"""Pseudo-label error vs uncertainty: does the uncertainty map find the wrong pseudo-labels?

The bidirectional loss rests on one observation: **wrong pseudo-labels concentrate in the
high-uncertainty region**. This module measures that on your own model and data. Given
predictions (probabilities or logits) ``(B, C, *S)``, labels ``(B, *S)`` and optionally an
uncertainty map from any estimator (the normalised entropy of the prediction by default), it
treats the uncertainty as a detector of pseudo-label errors and reports:

* the pseudo-label **error rate inside and outside the high-uncertainty region**
  ``{u > tau}`` over a sweep of thresholds ``tau`` and of ratios ``r`` (the top ``r`` of the
  voxels);
* the **error-retention (sparsification) curve**: the share of all errors caught by flagging the
  top ``k`` most uncertain voxels, its area, and the oracle curve;
* **AUROC** and **average precision** of the uncertainty as an error detector;
* **expected calibration error** and the reliability-diagram bins;

all overall and per class.
[`ErrorDetectionAccumulator`][bual_losses.diagnostics.ErrorDetectionAccumulator] accumulates
histograms over any number of batches (``update`` / ``compute``; memory independent of the
data) and [`error_detection_report`][bual_losses.diagnostics.error_detection_report] is the
one-shot report, implemented as one ``update`` and one ``compute``. The figures live in
[`bual_losses.plotting`][] (optional ``plot`` extra).

**Definitions.** Per voxel ``x`` with class probabilities ``p(x)`` (``C == 1``: a sigmoid
output ``p``, read as the two classes ``[1 - p, p]``):

$$
\hat y(x) = \arg\max_c p_c(x), \qquad
\operatorname{conf}(x) = \max_c p_c(x), \qquad
\operatorname{err}(x) = [\,\hat y(x) \ne y(x)\,],
$$

ties in the argmax going to the lower class index (``C == 1``: ``p > 0.5`` is foreground).
Voxels whose label is ``ignore_index`` are left out of everything. With ``N`` voxels, ``E``
errors, the high region ``H_tau = {u > tau}`` (ties on the low side, as in
[`high_uncertainty_mask`][bual_losses.regions.high_uncertainty_mask]) and ``T_k`` the
``k N`` most uncertain voxels:

$$
\text{error\_rate\_high}(\tau) = \frac{\#\{\text{err} \in H_\tau\}}{|H_\tau|}, \quad
\text{error\_rate\_low}(\tau) = \frac{\#\{\text{err} \notin H_\tau\}}{N - |H_\tau|}, \quad
R(k) = \frac{\#\{\text{err} \in T_k\}}{E}, \quad
R^*(k) = \min\!\Big(\frac{k}{E/N}, 1\Big).
$$

``R`` is the retention curve, ``R*`` the oracle (every error flagged before any correct
voxel); a random detector gives ``R(k) = k`` (area 1/2) and the oracle area is
``1 - E / (2N)``.

**Per class** means per *pseudo-label* class: voxel ``x`` belongs to class ``c`` when
``y_hat(x) = c``. That is the partition a training loop sees on unlabeled data, where no true
label exists; the per-class error rate is then ``1 - precision`` of class ``c``, and every
curve of class ``c`` is computed within that class's own voxels (its ratios are ratios of its
voxels).

## Resolution and error bounds

The accumulator keeps, per pseudo-label class, integer counts of voxels and of errors in
``num_bins`` equal bins of width ``w = (hi - lo) / num_bins`` over ``value_range = (lo, hi)``
(uncertainty values outside the range are **clamped** into the first / last bin; the share of
such voxels is reported as ``out_of_range_fraction``). Counts are int64, so accumulation is
exact and independent of how the data is split into batches.

*   **Exact** (no binning error): ``num_voxels``, ``num_errors``, ``error_rate``; the
    threshold sweep ``high_fraction`` / ``error_rate_high`` / ``error_rate_low`` (each
    threshold is counted exactly, ``u > tau`` in the map's dtype); ECE and the reliability bins
    (their own ``calibration_bins`` bins of confidence, with confidences summed in fixed point
    with resolution ``2**-24``).

*   **Binned**: AUROC, average precision, the retention curve and its area and the ratio sweep
    are exact for the uncertainty *quantised to its bin*, with ties (voxels in one bin) counted
    as half in AUROC, as one threshold in AP (as scikit-learn does for tied scores) and spread
    uniformly within the bin along the retention curve (the expectation under random
    tie-breaking). With ``e_b`` errors, ``c_b`` correct voxels and ``n_b = e_b + c_b`` voxels
    in bin ``b`` (``C_tot = N - E``), their distance to the values on the raw scores is at most

    $$
    |\Delta\,\text{AUROC}| \le \frac{1}{2} \frac{\sum_b e_b c_b}{E\, C_\text{tot}}
        \le \frac{1}{2} \max_b \frac{c_b}{C_\text{tot}}
        \quad (\text{reported as } \texttt{auroc\_max\_error}), \qquad
    |\Delta R(k)| \le \max_b \frac{e_b}{E}, \qquad
    |\Delta\,\text{AUC}_R| \le \sum_b \frac{n_b}{N} \frac{e_b}{E},
    $$

    i.e. the mass of one bin: with the default 1000 bins and a map spread over ``[0, 1]`` these
    are far below the sampling noise of any real data set. The ratio sweep's error rates
    inherit the bound of ``R`` (times ``E / (r N)``), and ``ratio_thresholds`` is within one
    bin width ``w`` of a threshold that selects the top ``r``. All values are computed in
    float64 (float32 on MPS).

Nothing in ``update`` synchronises with the host (bin indices by arithmetic, histograms by
``scatter_add_`` into preallocated tensors, value checks asynchronous on accelerators);
``compute`` may synchronise. ``sync_dist`` sums the histograms over the ranks in ``compute``
(one collective), so every rank gets the report of the whole data set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any, Optional, Union, cast

import numpy as np
import torch

from bual_losses._arrays import ArrayLike, as_tensor
from bual_losses._validation import (
    check_finite,
    check_labels,
    check_range,
    require_floating,
    require_ignore_index,
    require_logits,
    require_positive_int,
    require_same_device,
    shape_str,
)
from bual_losses.distributed import SyncDist, all_reduce_sum, check_sync_dist
from bual_losses.pseudo import pseudo_labels
from bual_losses.uncertainty import entropy_map

__all__ = [
    "ErrorDetectionAccumulator",
    "ErrorDetectionReport",
    "error_detection_report",
]

Grid = Union[float, Sequence[float], torch.Tensor, np.ndarray, None]
"""Everything ``thresholds`` / ``ratios`` accept.

One number, a sequence or 1-D array, or ``None`` for the default grid.
"""

# Confidences are summed as integers in units of 2**-24 (float32 resolution near 1), so the
# calibration state is exact and independent of the batching, like the counts.
_CONF_SCALE = 2**24
_DEFAULT_GRID_POINTS = 21

_GROUP_KEYS = (
    "num_voxels",
    "num_errors",
    "error_rate",
    "out_of_range_fraction",
    "auroc",
    "auroc_max_error",
    "average_precision",
    "retention_curve",
    "oracle_curve",
    "retention_auc",
    "oracle_retention_auc",
    "high_fraction",
    "error_rate_high",
    "error_rate_low",
    "ratio_thresholds",
    "ratio_error_rate_high",
    "ratio_error_rate_low",
    "ece",
    "reliability_confidence",
    "reliability_accuracy",
    "reliability_counts",
)
"""Keys of per-group quantities: each has a ``per_class`` counterpart with a leading class dim."""


class ErrorDetectionReport(dict[str, Any]):
    r"""The report: a ``dict`` of tensors (numpy arrays for numpy inputs) with a JSON helper.

    Overall quantities are at the top level; ``report["per_class"]`` holds the same per-group
    keys with a leading class dim ``C'`` (``C' = max(C, 2)``, classes by pseudo-label). ``G``
    below is ``()`` at the top level and ``(C',)`` in ``per_class``; ``K`` is
    ``retention_points``, ``T`` the number of thresholds, ``R`` of ratios, ``M`` of
    calibration bins. A sweep given as one number (``thresholds=0.5``) drops its dim.
    Undefined values (no voxel, no error, an empty region) are NaN.

    Keys:
        num_voxels, num_errors: ``G`` int64 counts of (non-ignored) voxels and of errors.
        error_rate: ``G``, ``E / N``.
        out_of_range_fraction: ``G``, share of voxels whose uncertainty was clamped into
            ``value_range`` (non-zero means the binned metrics saw a distorted map).
        auroc: ``G``, area under the ROC curve of uncertainty as a detector of errors,
            ``P(u_err > u_correct)`` with ties counted half.
        auroc_max_error: ``G``, the bound on ``|auroc - auroc on the raw scores|`` (module
            docs).
        average_precision: ``G``, ``sum_n (recall_n - recall_{n-1}) precision_n`` over the
            bin thresholds, from the most uncertain down.
        retention_fractions: ``(K,)`` the grid ``k`` in ``[0, 1]``.
        retention_curve, oracle_curve: ``G + (K,)``, ``R(k)`` and ``R*(k)``.
        retention_auc, oracle_retention_auc: ``G``, their areas over ``k`` in ``[0, 1]``
            (the retention area is exact for the piecewise-linear binned curve, not a sum over
            the grid; random detection gives 0.5).
        thresholds: ``(T,)`` the sorted thresholds ``tau``.
        high_fraction, error_rate_high, error_rate_low: ``G + (T,)``, ``|H_tau| / N`` and the
            error rates inside and outside ``H_tau``.
        ratios: ``(R,)`` the sorted ratios ``r``.
        ratio_thresholds: ``G + (R,)`` an uncertainty value with about ``r N`` voxels above it.
        ratio_error_rate_high, ratio_error_rate_low: ``G + (R,)`` error rates inside and
            outside the top ``r`` of the voxels.
        ece: ``G``, ``sum_m (n_m / N) |acc_m - conf_m|``.
        reliability_edges: ``(M + 1,)`` confidence bin edges ``0 .. 1`` (bins ``[a, b)``, the
            last one closed).
        reliability_confidence, reliability_accuracy: ``G + (M,)`` mean confidence and
            accuracy per bin (NaN when empty).
        reliability_counts: ``G + (M,)`` int64 voxels per bin.
        per_class: ``dict`` of the per-group keys above, each with the leading dim ``(C',)``.

    Examples:
        >>> import torch
        >>> from bual_losses.diagnostics import error_detection_report
        >>> probs = torch.tensor([[[0.2, 0.9, 0.7, 0.4]]])  # C == 1: P(foreground)
        >>> report = error_detection_report(probs, torch.tensor([[0, 1, 0, 0]]), from_logits=False)
        >>> report.to_dict()["num_errors"], report.to_dict()["per_class"]["num_voxels"]
        (1, [2, 2])
    """

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values for JSON: floats, ints and nested lists; NaN becomes ``None``.

        Returns:
            A new ``dict`` with the same keys (``per_class`` as a nested ``dict``).

        Examples:
            >>> import json, torch
            >>> from bual_losses.diagnostics import error_detection_report
            >>> probs = torch.tensor([[[0.2, 0.9]]])  # C == 1: foreground probabilities
            >>> d = error_detection_report(probs, torch.tensor([[0, 1]]), from_logits=False)
            >>> d.to_dict()["error_rate"], d.to_dict()["auroc"]  # no error: AUROC undefined
            (0.0, None)
            >>> _ = json.dumps(d.to_dict(), allow_nan=False)
        """
        return {key: _plain(value) for key, value in self.items()}

    def __repr__(self) -> str:
        shown = ("num_voxels", "error_rate", "auroc", "average_precision", "retention_auc", "ece")
        parts = []
        for key in shown:
            value = _plain(self.get(key))
            parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
        return f"ErrorDetectionReport({', '.join(parts)}, ...)"


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return _plain(value.tolist()) if value.ndim else _plain(value.item())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return _plain(value.item())
    return value


# --------------------------------------------------------------------------------------------
# option validation (at construction, with the offending value in the message)


def _require_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}.")
    return value


def _require_value_range(value_range: Any) -> tuple[float, float]:
    if value_range is None:
        return 0.0, 1.0
    if (
        not isinstance(value_range, Sequence)
        or isinstance(value_range, str)
        or len(value_range) != 2
        or not all(isinstance(v, Real) and not isinstance(v, bool) for v in value_range)
    ):
        raise TypeError(f"`value_range` must be a pair of numbers (lo, hi), got {value_range!r}.")
    lo, hi = float(value_range[0]), float(value_range[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(
            f"`value_range` must be finite numbers with lo < hi, got ({lo!r}, {hi!r})."
        )
    return lo, hi


def _require_grid(
    values: Grid, name: str, default: torch.Tensor, *, unit: bool
) -> tuple[torch.Tensor, bool]:
    """Sorted float64 CPU grid and whether a single number was given."""
    if values is None:
        return default, False
    scalar = False
    if isinstance(values, Real) and not isinstance(values, bool):
        scalar = True
        grid = torch.tensor([float(values)], dtype=torch.float64)
    elif isinstance(values, (torch.Tensor, np.ndarray)):
        tensor = torch.as_tensor(values).detach().cpu()
        if tensor.ndim != 1 or tensor.is_complex() or tensor.dtype == torch.bool:
            raise TypeError(
                f"`{name}` must be a number or a 1-D sequence of numbers, got an array of "
                f"shape {shape_str(tensor.shape)} and dtype {tensor.dtype}."
            )
        grid = tensor.to(torch.float64)
    elif isinstance(values, Sequence) and not isinstance(values, str):
        if not all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
            raise TypeError(f"`{name}` must be a number or a sequence of numbers, got {values!r}.")
        grid = torch.tensor([float(v) for v in values], dtype=torch.float64)
    else:
        raise TypeError(
            f"`{name}` must be a number, a sequence of numbers or None, "
            f"got {type(values).__name__}."
        )
    if grid.numel() == 0:
        raise ValueError(f"`{name}` must hold at least one value, got none.")
    if not bool(torch.isfinite(grid).all()):
        raise ValueError(f"`{name}` must be finite, got {grid.tolist()}.")
    if unit and not bool(((grid >= 0) & (grid <= 1)).all()):
        raise ValueError(f"`{name}` must lie in [0, 1], got {grid.tolist()}.")
    return torch.sort(grid).values, scalar


# --------------------------------------------------------------------------------------------
# the accumulator


class ErrorDetectionAccumulator:
    r"""Accumulates the error-detection report over many batches in fixed memory.

    Per pseudo-label class the state is four int64 histograms: voxels and errors over
    ``num_bins`` uncertainty bins, over the ``T + 1`` gaps between the sorted thresholds, and
    over ``calibration_bins`` confidence bins, plus the fixed-point sum of the confidences per
    confidence bin. That is ``C' (2 num_bins + 2 (T + 1) + 3 M)`` integers whatever the amount
    of data (about 16 KiB per class with the defaults); the overall histograms are the sums
    over classes. Counts are exact, so the report does not depend on how the data was split
    into batches, and the binned metrics obey the bounds in the module docs (mass of one bin).

    $$
    \text{AUROC} = \frac{\sum_b e_b \left(\sum_{b' < b} c_{b'} + \tfrac12 c_b\right)}
                        {E\, C_\text{tot}}, \qquad
    \text{AP} = \sum_b \frac{e_b}{E}\,
                \frac{\sum_{b' \ge b} e_{b'}}{\sum_{b' \ge b} n_{b'}}, \qquad
    \text{ECE} = \sum_m \frac{n_m}{N} \left| \text{acc}_m - \text{conf}_m \right| .
    $$

    The state lives on the device of the first ``update``; later updates must use the same
    device and number of classes. ``update`` never synchronises with the host, so it can run
    inside a CUDA training step; ``compute`` does (it reads the histograms) and returns tensors
    on that device, or numpy arrays when the first ``update`` received numpy arrays.

    Args:
        from_logits: required, no default on purpose: ``True`` when the predictions are logits
            (softmax over dim 1, sigmoid for ``C == 1``), ``False`` for probabilities (for
            ``C == 1`` the foreground probability). A softmax of probabilities would give
            plausible but wrong numbers.
        ignore_index: label of voxels to leave out, or ``None``.
        num_bins: uncertainty bins; the resolution of the binned metrics (module docs).
        value_range: ``(lo, hi)`` of the uncertainty histogram; default ``(0, 1)``, the range
            of the default map (entropy normalised by ``ln C'``). Pass e.g. ``(0, math.log(C))``
            for entropies in nats or the range of your estimator: values outside are clamped
            (see ``out_of_range_fraction``).
        thresholds: the threshold sweep ``tau``: one number, a sequence, or ``None`` for 21
            evenly spaced values over ``value_range`` (ends included). Counted exactly.
        ratios: the ratio sweep ``r`` in ``[0, 1]``: one number, a sequence, or ``None`` for
            ``0, 0.05, ..., 1``.
        retention_points: ``K >= 2`` points of the retention grid ``k = 0, 1/(K-1), ..., 1``.
        calibration_bins: ``M`` equal confidence bins over ``[0, 1]`` for ECE (15 as usual).
        validate: check label range, finiteness and (``from_logits=False``) probability range
            in ``update``; asynchronous on accelerators, skipped under ``torch.compile``.
        sync_dist: ``True`` (the default process group) or a ``ProcessGroup`` sums the
            histograms over the ranks in ``compute`` (one all-reduce), so every rank gets the
            report of all ranks' data. Every rank must have called ``update`` at least once
            with the same number of classes. ``False`` (default): nothing is synchronised.

    Raises:
        TypeError, ValueError: for a bad option, naming it (at construction).

    Examples:
        >>> import torch
        >>> from bual_losses.diagnostics import ErrorDetectionAccumulator
        >>> g = torch.Generator().manual_seed(0)
        >>> acc = ErrorDetectionAccumulator(from_logits=True, thresholds=0.5)
        >>> for _ in range(3):  # e.g. a validation loop
        ...     logits = 3 * torch.randn(2, 4, 8, 8, generator=g)
        ...     labels = torch.randint(0, 4, (2, 8, 8), generator=g)
        ...     acc.update(logits, labels)
        >>> report = acc.compute()
        >>> int(report["num_voxels"]), report["per_class"]["auroc"].shape
        (384, torch.Size([4]))
        >>> bool(report["error_rate_high"] >= report["error_rate_low"])
        True
    """

    def __init__(
        self,
        *,
        from_logits: bool,
        ignore_index: Optional[int] = None,
        num_bins: int = 1000,
        value_range: Optional[tuple[float, float]] = None,
        thresholds: Grid = None,
        ratios: Grid = None,
        retention_points: int = 101,
        calibration_bins: int = 15,
        validate: bool = True,
        sync_dist: SyncDist = False,
    ) -> None:
        self.from_logits = _require_bool(from_logits, "from_logits")
        self.ignore_index = require_ignore_index(ignore_index, "labels")
        self.num_bins = require_positive_int(num_bins, "num_bins")
        self.value_range = _require_value_range(value_range)
        lo, hi = self.value_range
        default_thresholds = torch.linspace(lo, hi, _DEFAULT_GRID_POINTS, dtype=torch.float64)
        self._thresholds, self._scalar_threshold = _require_grid(
            thresholds, "thresholds", default_thresholds, unit=False
        )
        default_ratios = torch.linspace(0.0, 1.0, _DEFAULT_GRID_POINTS, dtype=torch.float64)
        self._ratios, self._scalar_ratio = _require_grid(
            ratios, "ratios", default_ratios, unit=True
        )
        self.retention_points = require_positive_int(retention_points, "retention_points")
        if self.retention_points < 2:
            raise ValueError(
                f"`retention_points` must be an int >= 2 (the grid includes 0 and 1), "
                f"got {retention_points!r}."
            )
        self.calibration_bins = require_positive_int(calibration_bins, "calibration_bins")
        self.validate = _require_bool(validate, "validate")
        check_sync_dist(sync_dist)
        self.sync_dist = sync_dist
        self.reset()

    # ---------------------------------------------------------------------------- state

    def reset(self) -> None:
        """Forget everything accumulated (the options stay)."""
        self.num_classes: Optional[int] = None
        self._numpy: bool = False
        self._device: Optional[torch.device] = None
        self._uncertainty_hist: Optional[torch.Tensor] = None  # (C', num_bins, 2)
        self._sweep_hist: Optional[torch.Tensor] = None  # (C', T + 1, 2)
        self._calibration_hist: Optional[torch.Tensor] = None  # (C', M, 2)
        self._confidence_sum: Optional[torch.Tensor] = None  # (C', M), units of 2**-24
        self._out_of_range: Optional[torch.Tensor] = None  # (C',)
        self._device_thresholds: Optional[torch.Tensor] = None  # (T,) on the state's device

    def _allocate(self, num_classes: int, device: torch.device) -> None:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=device)

        c = num_classes
        self._uncertainty_hist = zeros(c, self.num_bins, 2)
        self._sweep_hist = zeros(c, self._thresholds.numel() + 1, 2)
        self._calibration_hist = zeros(c, self.calibration_bins, 2)
        self._confidence_sum = zeros(c, self.calibration_bins)
        self._out_of_range = zeros(c)
        self._device_thresholds = self._thresholds.to(device)
        self.num_classes, self._device = c, device

    def _state(self) -> list[torch.Tensor]:
        tensors = [
            self._uncertainty_hist,
            self._sweep_hist,
            self._calibration_hist,
            self._confidence_sum,
            self._out_of_range,
        ]
        return [t for t in tensors if t is not None]

    # ---------------------------------------------------------------------------- update

    def update(
        self,
        probs_or_logits: ArrayLike,
        labels: ArrayLike,
        *,
        uncertainty: Optional[ArrayLike] = None,
    ) -> None:
        r"""Fold one batch into the histograms (no host synchronisation, no autograd).

        Args:
            probs_or_logits: ``(B, C, *S)`` floating predictions, as ``from_logits`` says;
                ``C == 1`` is a binary (sigmoid) model. Torch tensor or numpy array.
            labels: ``(B, *S)`` or ``(B, 1, *S)`` integer labels (bool or integral floats
                accepted) in ``[0, C')``, or ``ignore_index``.
            uncertainty: ``(B, *S)`` or ``(B, 1, *S)`` floating map from any estimator, in
                ``value_range``; default: ``entropy_map(probs_or_logits, normalize=True)``.

        Raises:
            TypeError: non-floating predictions or map, complex labels, or not an array.
            ValueError: shapes that do not match ``probs_or_logits``, a different device or
                number of classes than earlier updates, or (``validate``, on CPU) labels out of
                range, non-finite values, probabilities outside ``[0, 1]``.
        """
        x, was_numpy = as_tensor(probs_or_logits, "probs_or_logits")
        x = require_logits(x, "probs_or_logits")
        num_classes = max(x.shape[1], 2)
        y = self._other_array(labels, "labels", x)
        if y.is_complex():
            raise TypeError(f"`labels` must be integer, bool or float, got {y.dtype}.")
        y = self._voxel_view(y, "labels", x)
        u: Optional[torch.Tensor] = None
        if uncertainty is not None:
            u = require_floating(self._other_array(uncertainty, "uncertainty", x), "uncertainty")
            u = self._voxel_view(u, "uncertainty", x)

        if self.validate:  # before any state exists, so a failed first update leaves none
            check_finite(x, "probs_or_logits")
            if not self.from_logits:
                check_range(x, "probs_or_logits", 0.0, 1.0, "probabilities in [0, 1]")
            check_labels(y, num_classes, self.ignore_index, name="labels")
            if u is not None:
                check_finite(u, "uncertainty")

        if self._device is None:
            self._allocate(num_classes, x.device)
            self._numpy = was_numpy
        elif x.device != self._device:
            raise ValueError(
                f"`probs_or_logits` must be on the device of the earlier updates "
                f"({self._device}), got {x.device}."
            )
        elif num_classes != self.num_classes:
            raise ValueError(
                f"`probs_or_logits` must have the number of classes of the earlier updates "
                f"(C = {self.num_classes}{', binary' if self.num_classes == 2 else ''}), "
                f"got shape {shape_str(x.shape)}."
            )

        with torch.no_grad():
            self._accumulate(x.detach(), y.detach(), None if u is None else u.detach())

    def _other_array(self, value: Any, name: str, x: torch.Tensor) -> torch.Tensor:
        tensor, was_numpy = as_tensor(value, name)
        if was_numpy:
            return tensor.to(x.device)
        require_same_device(tensor, name, x, "probs_or_logits")
        return tensor

    @staticmethod
    def _voxel_view(t: torch.Tensor, name: str, x: torch.Tensor) -> torch.Tensor:
        b, _, *spatial = x.shape
        if tuple(t.shape) == (b, *spatial):
            return t
        if tuple(t.shape) == (b, 1, *spatial):
            return t[:, 0]
        raise ValueError(
            f"`{name}` must have shape (B, *S) = {shape_str((b, *spatial))} or (B, 1, *S) to "
            f"match `probs_or_logits` {shape_str(x.shape)}, got {shape_str(t.shape)}."
        )

    def _accumulate(self, x: torch.Tensor, y: torch.Tensor, u: Optional[torch.Tensor]) -> None:
        assert self._uncertainty_hist is not None and self._sweep_hist is not None
        assert self._calibration_hist is not None and self._confidence_sum is not None
        assert self._out_of_range is not None and self._device_thresholds is not None
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        xw = x.to(work)
        if u is None:  # from the upcast input: a half-precision map would be coarse
            u = cast(torch.Tensor, entropy_map(xw, from_logits=self.from_logits, normalize=True))
        if x.shape[1] == 1:
            p = torch.sigmoid(xw[:, 0]) if self.from_logits else xw[:, 0]
            # p > 0.5, decided on the logit when there is one (sigmoid rounds to 0.5).
            pseudo = ((xw[:, 0] > 0) if self.from_logits else (p > 0.5)).long()
            confidence = torch.maximum(p, 1 - p)
        else:
            probs = torch.softmax(xw, dim=1) if self.from_logits else xw
            # = probs.max(dim=1), whose CPU kernel along the strided class dim is slow
            confidence = probs.amax(dim=1)
            pseudo = cast(torch.Tensor, pseudo_labels(probs, dim=1))
        error = (pseudo != y.long()).long()
        if self.ignore_index is None:
            weight = torch.ones_like(error)
        else:
            weight = (y != self.ignore_index).long()

        # uncertainty bins: floor((u - lo) / w), clamped; NaN (validate=False) counts as hi
        lo, hi = self.value_range
        uw = torch.nan_to_num(u.to(work), nan=hi)
        outside = ((uw < lo) | (uw > hi)).long() * weight
        bins = ((uw - lo) * (self.num_bins / (hi - lo))).floor_().clamp_(0, self.num_bins - 1)
        index = (pseudo * self.num_bins + bins.long()) * 2 + error
        self._uncertainty_hist.view(-1).scatter_add_(0, index.reshape(-1), weight.reshape(-1))

        # threshold sweep: slot i holds the voxels with exactly i thresholds below them
        # a device copy made at allocation: a host-to-device copy here could block the host
        thresholds = self._device_thresholds.to(dtype=u.dtype)
        slots = torch.bucketize(u, thresholds)  # #{tau < u}, compared in the map's dtype
        index = (pseudo * (thresholds.numel() + 1) + slots) * 2 + error
        self._sweep_hist.view(-1).scatter_add_(0, index.reshape(-1), weight.reshape(-1))

        # calibration bins [a, b) over [0, 1], the last one closed
        m = self.calibration_bins
        confidence = torch.nan_to_num(confidence, nan=0.0).clamp_(0.0, 1.0)
        cbins = (confidence * m).floor_().clamp_(0, m - 1).long()
        group = pseudo * m + cbins
        index = group * 2 + error
        self._calibration_hist.view(-1).scatter_add_(0, index.reshape(-1), weight.reshape(-1))
        units = torch.round(confidence * _CONF_SCALE).long() * weight
        self._confidence_sum.view(-1).scatter_add_(0, group.reshape(-1), units.reshape(-1))
        self._out_of_range.scatter_add_(0, pseudo.reshape(-1), outside.reshape(-1))

    # ---------------------------------------------------------------------------- compute

    def compute(self) -> ErrorDetectionReport:
        """The report over everything accumulated since construction or ``reset``.

        Does not change the state (``update`` may continue afterwards). With ``sync_dist``
        the histograms are summed over the ranks first; every rank must call ``compute``.

        Returns:
            An [`ErrorDetectionReport`][bual_losses.diagnostics.ErrorDetectionReport]: tensors
            on the state's device (float64, float32 on MPS; counts int64), or numpy arrays
            when the first update got numpy.

        Raises:
            RuntimeError: before the first ``update``, or for ``sync_dist`` without an
                initialised process group.
        """
        if self._device is None:
            raise RuntimeError(
                "ErrorDetectionAccumulator.compute() needs at least one update(...) first "
                "(with sync_dist, on every rank)."
            )
        state = self._state()
        if self.sync_dist is not None and self.sync_dist is not False:
            flat = all_reduce_sum(torch.cat([t.reshape(-1) for t in state]), self.sync_dist)
            state = [
                part.reshape(t.shape)
                for part, t in zip(flat.split([t.numel() for t in state]), state)
            ]
        report = _report(self, *state)
        if self._numpy:
            return ErrorDetectionReport(_to_numpy(report))
        return report

    def __repr__(self) -> str:
        return (
            f"ErrorDetectionAccumulator(from_logits={self.from_logits}, "
            f"num_bins={self.num_bins}, value_range={self.value_range}, "
            f"num_classes={self.num_classes}, device={self._device})"
        )


def _to_numpy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _to_numpy(v) for key, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value


# --------------------------------------------------------------------------------------------
# metrics from the histograms (leading dim G: overall first, then the classes)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, NaN where ``den == 0``."""
    ok = den > 0
    return torch.where(
        ok, num / torch.where(ok, den, torch.ones_like(den)), num.new_tensor(math.nan)
    )


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Row-wise linear interpolation; ``xp`` non-decreasing, flat runs take their last point."""
    last = xp.shape[-1] - 1
    idx = torch.searchsorted(xp.contiguous(), x.contiguous(), right=True).clamp_(1, last)
    x0, x1 = xp.gather(-1, idx - 1), xp.gather(-1, idx)
    y0, y1 = fp.gather(-1, idx - 1), fp.gather(-1, idx)
    dx = x1 - x0
    t = torch.where(dx > 0, (x - x0) / torch.where(dx > 0, dx, torch.ones_like(dx)), 0.0)
    return y0 + t.clamp_(0.0, 1.0) * (y1 - y0)


def _with_overall(hist: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    h = hist.to(dtype)
    return torch.cat([h.sum(0, keepdim=True), h], dim=0)


def _report(
    acc: ErrorDetectionAccumulator,
    uncertainty_hist: torch.Tensor,
    sweep_hist: torch.Tensor,
    calibration_hist: torch.Tensor,
    confidence_sum: torch.Tensor,
    out_of_range: torch.Tensor,
) -> ErrorDetectionReport:
    device = uncertainty_hist.device
    f = torch.float32 if device.type == "mps" else torch.float64
    nan = torch.tensor(math.nan, dtype=f, device=device)
    out: dict[str, torch.Tensor] = {}

    # -- uncertainty histogram: AUROC, AP, retention, ratio sweep
    h = _with_overall(uncertainty_hist, f)  # (G, nb, 2)
    correct, errors = h[..., 0], h[..., 1]
    voxels = correct + errors
    n, e, c = voxels.sum(-1), errors.sum(-1), correct.sum(-1)
    counts = _with_overall(uncertainty_hist, torch.int64)
    out["num_voxels"] = counts.sum((-1, -2))
    out["num_errors"] = counts[..., 1].sum(-1)
    out["error_rate"] = _safe_div(e, n)
    out["out_of_range_fraction"] = _safe_div(_with_overall(out_of_range, f), n)

    pairs = (errors * (correct.cumsum(-1) - correct + 0.5 * correct)).sum(-1)
    out["auroc"] = _safe_div(pairs, e * c)
    out["auroc_max_error"] = _safe_div(0.5 * (errors * correct).sum(-1), e * c)

    # from the most uncertain bin down
    cum_e = torch.cat([torch.zeros_like(e)[:, None], errors.flip(-1).cumsum(-1)], dim=-1)
    cum_n = torch.cat([torch.zeros_like(n)[:, None], voxels.flip(-1).cumsum(-1)], dim=-1)
    precision = torch.where(cum_n[:, 1:] > 0, cum_e[:, 1:] / cum_n[:, 1:].clamp_min(1), 0.0)
    out["average_precision"] = _safe_div((errors.flip(-1) * precision).sum(-1), e)

    k = torch.linspace(0.0, 1.0, acc.retention_points, dtype=f, device=device)
    caught = _interp(k[None, :] * n[:, None], cum_n, cum_e)
    out["retention_curve"] = _safe_div(caught, e[:, None])
    oracle = (k[None, :] * _safe_div(n, e)[:, None]).clamp(max=1.0)
    out["oracle_curve"] = torch.where(e[:, None] > 0, oracle, nan)
    widths = cum_n.diff(dim=-1)
    area = (widths * (cum_e[:, 1:] + cum_e[:, :-1])).sum(-1) * 0.5
    out["retention_auc"] = torch.where(e > 0, _safe_div(area, n * e), nan)
    out["oracle_retention_auc"] = torch.where(e > 0, 1.0 - 0.5 * out["error_rate"], nan)

    lo, hi = acc.value_range
    ratios = acc._ratios.to(device=device, dtype=f)
    top = ratios[None, :] * n[:, None]
    edges = torch.linspace(hi, lo, acc.num_bins + 1, dtype=f, device=device)
    ratio_thresholds = _interp(top, cum_n, edges.expand(n.shape[0], -1))
    out["ratio_thresholds"] = torch.where(n[:, None] > 0, ratio_thresholds, nan)
    caught = _interp(top, cum_n, cum_e)
    out["ratio_error_rate_high"] = _safe_div(caught, top)
    out["ratio_error_rate_low"] = _safe_div(e[:, None] - caught, n[:, None] - top)

    # -- threshold sweep (exact): high = slots above t
    s = _with_overall(sweep_hist, f)
    s_n, s_e = s.sum(-1), s[..., 1]
    high_n = s_n.flip(-1).cumsum(-1).flip(-1)[:, 1:]
    high_e = s_e.flip(-1).cumsum(-1).flip(-1)[:, 1:]
    out["high_fraction"] = _safe_div(high_n, n[:, None])
    out["error_rate_high"] = _safe_div(high_e, high_n)
    out["error_rate_low"] = _safe_div(e[:, None] - high_e, n[:, None] - high_n)

    # -- calibration
    cal_counts = _with_overall(calibration_hist, torch.int64).sum(-1)
    cal_n = cal_counts.to(f)
    cal_correct = _with_overall(calibration_hist, f)[..., 0]
    conf_sum = _with_overall(confidence_sum, f) / _CONF_SCALE
    accuracy = _safe_div(cal_correct, cal_n)
    confidence = _safe_div(conf_sum, cal_n)
    gap = torch.where(cal_n > 0, (accuracy - confidence).abs() * cal_n, 0.0)
    out["ece"] = _safe_div(gap.sum(-1), cal_n.sum(-1))
    out["reliability_confidence"] = confidence
    out["reliability_accuracy"] = accuracy
    out["reliability_counts"] = cal_counts

    thresholds = acc._thresholds.to(device=device, dtype=f)
    ratios_out = ratios
    if acc._scalar_threshold:
        thresholds = thresholds[0]
        for key in ("high_fraction", "error_rate_high", "error_rate_low"):
            out[key] = out[key][:, 0]
    if acc._scalar_ratio:
        ratios_out = ratios[0]
        for key in ("ratio_thresholds", "ratio_error_rate_high", "ratio_error_rate_low"):
            out[key] = out[key][:, 0]

    report = ErrorDetectionReport()
    for key in _GROUP_KEYS:
        report[key] = out[key][0]
    report["retention_fractions"] = k
    report["thresholds"] = thresholds
    report["ratios"] = ratios_out
    report["reliability_edges"] = torch.linspace(
        0.0, 1.0, acc.calibration_bins + 1, dtype=f, device=device
    )
    report["per_class"] = {key: out[key][1:] for key in _GROUP_KEYS}
    return report


# --------------------------------------------------------------------------------------------
# one shot


def error_detection_report(
    probs_or_logits: ArrayLike,
    labels: ArrayLike,
    *,
    from_logits: bool,
    uncertainty: Optional[ArrayLike] = None,
    ignore_index: Optional[int] = None,
    num_bins: int = 1000,
    value_range: Optional[tuple[float, float]] = None,
    thresholds: Grid = None,
    ratios: Grid = None,
    retention_points: int = 101,
    calibration_bins: int = 15,
    validate: bool = True,
    sync_dist: SyncDist = False,
) -> ErrorDetectionReport:
    r"""How well does the uncertainty find the wrong pseudo-labels? One batch, one report.

    With pseudo-labels ``y_hat = argmax_c p_c``, errors ``err = [y_hat != y]``, the high region
    ``H_tau = {u > tau}`` and ``T_k`` the ``k N`` most uncertain voxels (module docs):

    $$
    \text{error\_rate\_high}(\tau) = \frac{\#\{\text{err} \in H_\tau\}}{|H_\tau|}, \quad
    R(k) = \frac{\#\{\text{err} \in T_k\}}{E}, \quad
    R^*(k) = \min\!\Big(\frac{k N}{E}, 1\Big), \quad
    \text{AUROC} = P(u_\text{err} > u_\text{correct}) .
    $$

    The same as one ``update`` and one ``compute`` of an
    [`ErrorDetectionAccumulator`][bual_losses.diagnostics.ErrorDetectionAccumulator] with these
    options, which documents them, the histogram resolution and the error bounds; for many
    batches use the accumulator.

    Args:
        probs_or_logits: ``(B, C, *S)`` floating predictions (``C == 1``: binary, sigmoid).
        labels: ``(B, *S)`` or ``(B, 1, *S)`` integer labels in ``[0, max(C, 2))``.
        from_logits: required: ``True`` for logits, ``False`` for probabilities.
        uncertainty: ``(B, *S)`` or ``(B, 1, *S)`` map from any estimator; default the
            normalised entropy of the prediction (in ``[0, 1]``).
        ignore_index: label of voxels to leave out.
        num_bins: uncertainty histogram bins over ``value_range``.
        value_range: ``(lo, hi)`` of the uncertainty, default ``(0, 1)``; values outside are
            clamped.
        thresholds: threshold sweep (one number gives 0-d sweep outputs); default 21 values
            over ``value_range``.
        ratios: ratio sweep in ``[0, 1]`` (one number gives 0-d outputs); default
            ``0, 0.05, ..., 1``.
        retention_points: points ``K >= 2`` of the retention grid over ``[0, 1]``.
        calibration_bins: confidence bins for ECE and the reliability diagram.
        validate: check labels, finiteness and the probability range.
        sync_dist: sum the histograms over the ranks (``True`` or a process group).

    Returns:
        An [`ErrorDetectionReport`][bual_losses.diagnostics.ErrorDetectionReport] (a ``dict``)
        with the keys listed there, among them ``auroc``, ``average_precision``, ``ece``,
        ``retention_curve``, ``retention_auc``, ``oracle_retention_auc``,
        ``error_rate_high`` and ``error_rate_low``; ``per_class`` holds them per pseudo-label
        class. Tensors on the input's device, numpy arrays for numpy inputs.

    Raises:
        TypeError, ValueError: as the accumulator's constructor and ``update``.

    Examples:
        >>> import torch
        >>> from bual_losses.diagnostics import error_detection_report
        >>> fg = torch.tensor([0.9, 0.6, 0.3, 0.1])  # P(class 1) at 4 voxels
        >>> probs = torch.stack([1 - fg, fg]).reshape(1, 2, 4)
        >>> labels = torch.tensor([[1, 0, 1, 0]])  # voxels 1 and 2 are wrong
        >>> report = error_detection_report(probs, labels, from_logits=False, thresholds=0.6)
        >>> float(report["auroc"]), float(report["average_precision"])  # entropy ranks them
        (1.0, 1.0)
        >>> float(report["retention_auc"]), float(report["oracle_retention_auc"])
        (0.75, 0.75)
        >>> float(report["error_rate_high"]), float(report["error_rate_low"])  # u > 0.6
        (1.0, 0.0)
        >>> round(float(report["ece"]), 4)  # (0.5 * 0.1 + 0.25 * 0.6 + 0.25 * 0.7)
        0.375
    """
    accumulator = ErrorDetectionAccumulator(
        from_logits=from_logits,
        ignore_index=ignore_index,
        num_bins=num_bins,
        value_range=value_range,
        thresholds=thresholds,
        ratios=ratios,
        retention_points=retention_points,
        calibration_bins=calibration_bins,
        validate=validate,
        sync_dist=sync_dist,
    )
    accumulator.update(probs_or_logits, labels, uncertainty=uncertainty)
    return accumulator.compute()
