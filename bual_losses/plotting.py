r"""Figures for the error-detection diagnostics (optional ``plot`` extra).

Install with ``pip install 'bual-losses[plot]'`` (it only adds matplotlib).

Every function takes a report from
[`error_detection_report`][bual_losses.diagnostics.error_detection_report] or
[`ErrorDetectionAccumulator.compute`][bual_losses.diagnostics.ErrorDetectionAccumulator.compute]
(tensors or numpy arrays), or its JSON form from ``report.to_dict()`` (lists, ``None`` for
NaN), so figures can be redrawn from a saved report without the model. Each returns a
``matplotlib.figure.Figure``; pass ``ax=`` to draw into an existing axes instead (the function
then returns that axes' figure).

The figures are built with ``matplotlib.figure.Figure`` directly, not ``pyplot``: no global
state, no open-figure accumulation in long training runs, and any backend (Agg included) works.
Save them with ``fig.savefig(path)``; in Jupyter a returned figure displays as usual.

matplotlib is imported inside the functions, so ``import bual_losses`` never needs it; calling
a function without it raises an ``ImportError`` that names the ``plot`` extra.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from bual_losses._validation import require_choice, shape_str

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "plot_error_detection_report",
    "plot_error_overlay",
    "plot_error_rate_vs_threshold",
    "plot_reliability_diagram",
    "plot_retention_curve",
]

_REPORT_HELP = (
    "an error-detection report (from error_detection_report, "
    "ErrorDetectionAccumulator.compute or their .to_dict())"
)


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - exercised with a hidden matplotlib
        raise ImportError(
            "bual_losses.plotting needs matplotlib, an optional extra: "
            "pip install 'bual-losses[plot]' (or pip install matplotlib)."
        ) from error
    return Figure


def _new_axes(ax: Optional[Axes], figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    figure_class = _figure_class()
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    fig = figure_class(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _numeric(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().to(torch.float64).numpy()
    try:
        return np.asarray(value, dtype=np.float64)  # None (a NaN in JSON form) -> nan
    except (TypeError, ValueError):
        raise TypeError(
            f"`report[{name!r}]` must be numeric (tensor, array, list), got {type(value).__name__}."
        ) from None


def _field(report: Any, key: str, *, per_class: bool = False) -> np.ndarray:
    if not isinstance(report, Mapping):
        raise TypeError(f"`report` must be {_REPORT_HELP}, got {type(report).__name__}.")
    source: Any = report
    if per_class:
        source = report.get("per_class")
        if not isinstance(source, Mapping):
            raise ValueError(f"`report` must be {_REPORT_HELP} with a 'per_class' mapping.")
    if key not in source:
        where = "report['per_class']" if per_class else "report"
        raise ValueError(f"`report` must be {_REPORT_HELP}; {where} has no key {key!r}.")
    return _numeric(source[key], key)


def _class_names(class_names: Optional[Sequence[str]], count: int) -> list[str]:
    if class_names is None:
        return [f"class {c}" for c in range(count)]
    names = list(class_names)
    if len(names) != count:
        raise ValueError(
            f"`class_names` must have one name per class ({count}), got {len(names)}: {names!r}."
        )
    return [str(n) for n in names]


def _fmt(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.3f}"


# --------------------------------------------------------------------------------------------
# report figures


def plot_retention_curve(
    report: Mapping[str, Any],
    *,
    per_class: bool = False,
    class_names: Optional[Sequence[str]] = None,
    ax: Optional[Axes] = None,
) -> Figure:
    r"""Error-retention (sparsification) curve: share of errors caught by the top-``k`` voxels.

    $$ R(k) = \frac{\#\{\text{errors among the } kN \text{ most uncertain voxels}\}}{E} $$

    Drawn with the oracle ``R*(k) = min(kN / E, 1)`` (dashed) and random detection ``R(k) = k``
    (dotted); the legend gives the areas. A curve close to the oracle means the errors sit in
    the most uncertain voxels.

    Args:
        report: a report or its ``to_dict()`` form (keys ``retention_fractions``,
            ``retention_curve``, ``oracle_curve``, ``retention_auc``,
            ``oracle_retention_auc``; ``per_class`` for ``per_class=True``).
        per_class: add one curve per pseudo-label class.
        class_names: names for the classes (one per class).
        ax: draw into this axes instead of a new figure.

    Returns:
        The figure (one axes: x "fraction of voxels flagged", y "fraction of errors caught").

    Raises:
        ImportError: without matplotlib.
        TypeError, ValueError: ``report`` is not a report, or ``class_names`` has the wrong
            length.

    Examples:
        >>> import torch
        >>> from bual_losses.diagnostics import error_detection_report
        >>> from bual_losses.plotting import plot_retention_curve
        >>> g = torch.Generator().manual_seed(0)
        >>> logits = torch.randn(2, 3, 16, 16, generator=g)
        >>> labels = torch.randint(0, 3, (2, 16, 16), generator=g)
        >>> fig = plot_retention_curve(error_detection_report(logits, labels, from_logits=True))
        >>> fig.axes[0].get_xlabel()
        'fraction of voxels flagged (most uncertain first)'
    """
    k = _field(report, "retention_fractions")
    curve, oracle = _field(report, "retention_curve"), _field(report, "oracle_curve")
    area, oracle_area = _field(report, "retention_auc"), _field(report, "oracle_retention_auc")
    fig, axes = _new_axes(ax, (5.0, 4.5))
    axes.plot(k, curve, color="C0", lw=2, label=f"uncertainty (area {_fmt(float(area))})")
    axes.plot(k, oracle, "k--", lw=1, label=f"oracle (area {_fmt(float(oracle_area))})")
    axes.plot([0, 1], [0, 1], ":", color="gray", lw=1, label="random (area 0.500)")
    if per_class:
        curves = _field(report, "retention_curve", per_class=True)
        areas = _field(report, "retention_auc", per_class=True)
        names = _class_names(class_names, curves.shape[0])
        for c, name in enumerate(names):
            if np.isfinite(curves[c]).any():
                axes.plot(k, curves[c], lw=1, color=f"C{c + 1}", label=f"{name} ({_fmt(areas[c])})")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("fraction of voxels flagged (most uncertain first)")
    axes.set_ylabel("fraction of errors caught")
    axes.set_title("error retention")
    axes.legend(loc="lower right", fontsize="small")
    axes.grid(alpha=0.3)
    return fig


def plot_error_rate_vs_threshold(
    report: Mapping[str, Any],
    *,
    sweep: str = "threshold",
    per_class: bool = False,
    class_names: Optional[Sequence[str]] = None,
    ax: Optional[Axes] = None,
) -> Figure:
    r"""Pseudo-label error rate inside and outside the high-uncertainty region.

    $$
    \text{error\_rate\_high}(\tau) = \frac{\#\{\text{err}, u > \tau\}}{\#\{u > \tau\}}, \qquad
    \text{error\_rate\_low}(\tau) = \frac{\#\{\text{err}, u \le \tau\}}{\#\{u \le \tau\}}
    $$

    against the threshold ``tau`` (``sweep="threshold"``; the share of voxels above it is drawn
    dotted) or against the ratio ``r`` of voxels in the high region (``sweep="ratio"``). The
    overall error rate is a horizontal line. The wider the gap between the two curves, the
    better the low-uncertainty region filters wrong pseudo-labels.

    Args:
        report: a report or its ``to_dict()`` form.
        sweep: ``"threshold"`` (keys ``thresholds``, ``error_rate_high``, ``error_rate_low``,
            ``high_fraction``) or ``"ratio"`` (``ratios``, ``ratio_error_rate_high``,
            ``ratio_error_rate_low``).
        per_class: add the per-class curves (thin; solid high, dashed low).
        class_names: names for the classes.
        ax: draw into this axes instead of a new figure.

    Returns:
        The figure (one axes).

    Raises:
        ImportError: without matplotlib.
        TypeError, ValueError: a bad ``report``, ``sweep`` or ``class_names``.

    Examples:
        >>> import torch
        >>> from bual_losses.diagnostics import error_detection_report
        >>> from bual_losses.plotting import plot_error_rate_vs_threshold
        >>> g = torch.Generator().manual_seed(0)
        >>> logits = torch.randn(2, 3, 16, 16, generator=g)
        >>> labels = torch.randint(0, 3, (2, 16, 16), generator=g)
        >>> report = error_detection_report(logits, labels, from_logits=True)
        >>> plot_error_rate_vs_threshold(report, sweep="ratio").axes[0].get_xlabel()
        'ratio r of voxels in the high region'
    """
    require_choice(sweep, "sweep", ("threshold", "ratio"))
    if sweep == "threshold":
        x = np.atleast_1d(_field(report, "thresholds"))
        keys = ("error_rate_high", "error_rate_low")
        xlabel = "uncertainty threshold τ"
    else:
        x = np.atleast_1d(_field(report, "ratios"))
        keys = ("ratio_error_rate_high", "ratio_error_rate_low")
        xlabel = "ratio r of voxels in the high region"
    high, low = (np.atleast_1d(_field(report, key)) for key in keys)
    marker = "o" if x.size == 1 else None
    fig, axes = _new_axes(ax, (5.0, 4.5))
    axes.plot(x, high, color="C3", lw=2, marker=marker, label="high region (u > τ)")
    axes.plot(x, low, color="C2", lw=2, marker=marker, label="low region (u ≤ τ)")
    axes.axhline(float(_field(report, "error_rate")), color="gray", lw=1, label="overall")
    if sweep == "threshold":
        fraction = np.atleast_1d(_field(report, "high_fraction"))
        axes.plot(x, fraction, ":", color="k", lw=1, marker=marker, label="share of voxels high")
    if per_class:
        class_high = _field(report, keys[0], per_class=True).reshape(-1, x.size)
        class_low = _field(report, keys[1], per_class=True).reshape(-1, x.size)
        names = _class_names(class_names, class_high.shape[0])
        for c, name in enumerate(names):
            color = f"C{(c + 4) % 10}"
            axes.plot(x, class_high[c], color=color, lw=1, marker=marker, label=f"{name} high")
            axes.plot(x, class_low[c], "--", color=color, lw=1, marker=marker, label=f"{name} low")
    axes.set_ylim(0, 1.02)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("pseudo-label error rate")
    axes.set_title(f"error rate vs {sweep}")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    return fig


def plot_reliability_diagram(
    report: Mapping[str, Any],
    *,
    ax: Optional[Axes] = None,
) -> Figure:
    r"""Reliability diagram: accuracy against confidence per confidence bin, with the ECE.

    $$ \text{ECE} = \sum_m \frac{n_m}{N} \left|\text{acc}_m - \text{conf}_m\right| $$

    Bars show the accuracy of each bin at the bin's position, a marker its mean confidence
    (a perfectly calibrated model has both on the diagonal), and the bar shading the share of
    voxels in the bin. Empty bins are left out.

    Args:
        report: a report or its ``to_dict()`` form (keys ``reliability_edges``,
            ``reliability_accuracy``, ``reliability_confidence``, ``reliability_counts``,
            ``ece``).
        ax: draw into this axes instead of a new figure.

    Returns:
        The figure (one axes).

    Raises:
        ImportError: without matplotlib.
        TypeError, ValueError: ``report`` is not a report.

    Examples:
        >>> import torch
        >>> from bual_losses.diagnostics import error_detection_report
        >>> from bual_losses.plotting import plot_reliability_diagram
        >>> g = torch.Generator().manual_seed(0)
        >>> logits = torch.randn(2, 3, 16, 16, generator=g)
        >>> labels = torch.randint(0, 3, (2, 16, 16), generator=g)
        >>> fig = plot_reliability_diagram(error_detection_report(logits, labels, from_logits=True))
        >>> fig.axes[0].get_ylabel()
        'accuracy'
    """
    edges = _field(report, "reliability_edges")
    accuracy = _field(report, "reliability_accuracy")
    confidence = _field(report, "reliability_confidence")
    counts = _field(report, "reliability_counts")
    ece = float(_field(report, "ece"))
    fig, axes = _new_axes(ax, (5.0, 4.5))
    left, width = edges[:-1], np.diff(edges)
    filled = counts > 0
    share = counts / max(float(counts.sum()), 1.0)
    alpha = 0.35 + 0.65 * share / max(float(share.max()), 1e-12)
    for i in np.flatnonzero(filled):
        axes.bar(
            left[i], accuracy[i], width=width[i], align="edge", color="C0",
            alpha=float(alpha[i]), edgecolor="k", linewidth=0.5,
        )  # fmt: skip
    axes.plot(confidence[filled], accuracy[filled], "o", color="C1", ms=4, label="mean confidence")
    axes.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("confidence (max probability)")
    axes.set_ylabel("accuracy")
    axes.set_title(f"reliability (ECE {_fmt(ece)})")
    axes.legend(loc="upper left", fontsize="small")
    axes.grid(alpha=0.3)
    return fig


def plot_error_detection_report(
    report: Mapping[str, Any],
    *,
    per_class: bool = False,
    class_names: Optional[Sequence[str]] = None,
    figsize: tuple[float, float] = (15.0, 4.5),
) -> Figure:
    """The three report figures side by side: retention, error rate vs threshold, reliability.

    Args:
        report: a report or its ``to_dict()`` form.
        per_class: add the per-class curves to the first two panels.
        class_names: names for the classes.
        figsize: figure size in inches.

    Returns:
        The figure (three axes, in that order).

    Raises:
        ImportError: without matplotlib.
        TypeError, ValueError: as the three functions.

    Examples:
        >>> import torch
        >>> from bual_losses.diagnostics import error_detection_report
        >>> from bual_losses.plotting import plot_error_detection_report
        >>> g = torch.Generator().manual_seed(0)
        >>> logits = torch.randn(2, 3, 16, 16, generator=g)
        >>> labels = torch.randint(0, 3, (2, 16, 16), generator=g)
        >>> report = error_detection_report(logits, labels, from_logits=True)
        >>> fig = plot_error_detection_report(report)
        >>> [a.get_title() for a in fig.axes][:2]
        ['error retention', 'error rate vs threshold']
    """
    fig = _figure_class()(figsize=figsize, layout="constrained")
    axes = fig.subplots(1, 3)
    plot_retention_curve(report, per_class=per_class, class_names=class_names, ax=axes[0])
    plot_error_rate_vs_threshold(report, per_class=per_class, class_names=class_names, ax=axes[1])
    plot_reliability_diagram(report, ax=axes[2])
    return fig


# --------------------------------------------------------------------------------------------
# overlay


def _map2d(value: Any, name: str, *, rgb: bool = False) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().numpy()
    elif isinstance(value, np.ndarray):
        array = value
    else:
        raise TypeError(
            f"`{name}` must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}."
        )
    if array.ndim == 2 or (rgb and array.ndim == 3 and array.shape[-1] in (3, 4)):
        return array
    expected = "(H, W) or (H, W, 3)" if rgb else "(H, W)"
    raise ValueError(
        f"`{name}` must be one 2-D slice {expected} (index a slice of a 3-D volume first), "
        f"got {shape_str(array.shape)}."
    )


def plot_error_overlay(
    image: Any,
    label: Any,
    prediction: Any,
    uncertainty: Any,
    *,
    threshold: Optional[float] = None,
    ignore_index: Optional[int] = None,
    num_classes: Optional[int] = None,
    figsize: tuple[float, float] = (17.0, 3.8),
) -> Figure:
    r"""One slice in five panels: image, label, prediction, uncertainty, pseudo-label errors.

    The error panel shows the image with the wrong voxels ``prediction != label`` in colour.
    With a ``threshold`` the errors are split by region: **red** inside the high-uncertainty
    region ``u > tau`` (flagged by the uncertainty), **yellow** in the low region ``u <= tau``
    (wrong pseudo-labels the low-uncertainty selection would trust); the region's outline is
    drawn on the uncertainty panel.

    Args:
        image: ``(H, W)`` (grey) or ``(H, W, 3)`` (RGB) slice, tensor or array.
        label: ``(H, W)`` integer labels.
        prediction: ``(H, W)`` predicted classes (pseudo-labels).
        uncertainty: ``(H, W)`` uncertainty map.
        threshold: ``tau`` of the high region, or ``None``.
        ignore_index: label value of unannotated voxels (never errors; shown transparent).
        num_classes: fixes the label colour scale; default from the largest class present.
        figsize: figure size in inches.

    Returns:
        The figure: five image axes titled ``image``, ``label``, ``prediction``,
        ``uncertainty``, ``errors`` (plus the uncertainty colour bar).

    Raises:
        ImportError: without matplotlib.
        TypeError: an argument is not a tensor / array.
        ValueError: an argument is not one 2-D slice, or the shapes differ.

    Examples:
        >>> import numpy as np
        >>> from bual_losses.plotting import plot_error_overlay
        >>> label = np.zeros((8, 8), dtype=int)
        >>> label[2:6, 2:6] = 1
        >>> prediction = np.roll(label, 1, axis=1)
        >>> u = np.abs(np.gradient(label.astype(float))[1])
        >>> image = np.random.default_rng(0).random((8, 8))
        >>> fig = plot_error_overlay(image, label, prediction, u, threshold=0.25)
        >>> [a.get_title() for a in fig.axes][:4]
        ['image', 'label', 'prediction', 'uncertainty']
    """
    img = _map2d(image, "image", rgb=True)
    lab = _map2d(label, "label")
    pred = _map2d(prediction, "prediction")
    unc = _map2d(uncertainty, "uncertainty").astype(np.float64)
    shape = lab.shape
    for name, array in (("prediction", pred), ("uncertainty", unc), ("image", img)):
        if tuple(array.shape[:2]) != tuple(shape):
            raise ValueError(
                f"`{name}` must have the shape of `label` {shape_str(shape)}, "
                f"got {shape_str(array.shape)}."
            )
    valid = np.ones(shape, dtype=bool) if ignore_index is None else lab != ignore_index
    if num_classes is None:
        present = [int(pred.max()), int(lab[valid].max()) if valid.any() else 0]
        num_classes = max(max(present) + 1, 2)
    errors = (pred != lab) & valid

    fig = _figure_class()(figsize=figsize, layout="constrained")
    axes = fig.subplots(1, 5)
    grey = "gray" if img.ndim == 2 else None
    class_map = {"cmap": "tab10", "vmin": 0, "vmax": 9, "interpolation": "nearest"}
    if num_classes > 10:
        class_map = {"cmap": "nipy_spectral", "vmin": 0, "vmax": num_classes - 1}
    axes[0].imshow(img, cmap=grey)
    axes[0].set_title("image")
    axes[1].imshow(np.ma.masked_where(~valid, lab), **class_map)
    axes[1].set_title("label")
    axes[2].imshow(pred, **class_map)
    axes[2].set_title("prediction")
    shown = axes[3].imshow(unc, cmap="magma")
    fig.colorbar(shown, ax=axes[3], fraction=0.046, pad=0.04)
    axes[3].set_title("uncertainty")
    axes[4].imshow(img, cmap=grey)
    overlay = np.zeros((*shape, 4))
    rate = errors.sum() / max(int(valid.sum()), 1)
    if threshold is None:
        overlay[errors] = (1.0, 0.0, 0.0, 0.85)
        axes[4].set_title("errors")
        axes[4].set_xlabel(f"{100 * rate:.1f}% wrong", fontsize="small")
    else:
        high = unc > threshold
        overlay[errors & high] = (1.0, 0.0, 0.0, 0.85)
        overlay[errors & ~high] = (1.0, 0.9, 0.0, 0.85)
        if high.any() and (~high).any():
            axes[3].contour(high.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        caught = (errors & high).sum() / max(int(errors.sum()), 1)
        axes[4].set_title("errors")
        axes[4].set_xlabel(
            f"{100 * rate:.1f}% wrong, {100 * caught:.0f}% of them in u > {threshold:g} (red)\n"
            "yellow: wrong but trusted (u ≤ τ)",
            fontsize="small",
        )
    axes[4].imshow(overlay, interpolation="nearest")
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    return fig
