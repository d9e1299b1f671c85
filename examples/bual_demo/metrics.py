"""Per-volume segmentation metrics: Dice, Jaccard, HD95, ASD (and ASSD) per class and per case.

The definitions are MedPy's (``medpy.metric.binary.dc, jc, hd95, asd, assd``), the ones
SSL4MIS and UA-MT report on ACDC and LA; MedPy itself is not needed. For boolean masks ``P``
(prediction) and ``R`` (reference) on one grid with voxel size ``spacing``:

* ``dice = 2 |P ∩ R| / (|P| + |R|)``, ``jaccard = |P ∩ R| / |P ∪ R|``;
* the **surface** of a mask is its voxels that touch the background under the
  connectivity-1 structuring element (4 neighbours in 2D, 6 in 3D; outside the array counts as
  background): ``∂M = M XOR erosion(M)``;
* the **directed surface distances** ``d(P → R)`` are, for every voxel of ``∂P``, the
  Euclidean distance (in the units of ``spacing``) to the nearest voxel of ``∂R``
  (``scipy.ndimage.distance_transform_edt(~∂R, sampling=spacing)`` read on ``∂P``);
* ``hd95 = percentile_95(d(P → R) ∪ d(R → P))``: the 95th percentile (NumPy's linear
  interpolation) of the two directed sets pooled, **not** the larger of the two directed
  percentiles (MONAI's ``compute_hausdorff_distance(percentile=95)``);
* ``asd = mean(d(P → R))``: one-directional, from the prediction's surface to the
  reference's, as MedPy's ``asd(result, reference)`` (MONAI's
  ``compute_average_surface_distance(symmetric=False)``);
* ``assd = (mean(d(P → R)) + mean(d(R → P))) / 2``: MedPy's symmetric version, the mean of
  the two directed means (MONAI's ``symmetric=True`` is instead the mean of the pooled set).

Empty masks (MedPy raises on them; SSL4MIS's ``calculate_metric_percase`` returns Dice 0 and
HD95 0 for a missed structure, which rewards the miss). Here:

* reference empty (the class is absent from the case): every metric is **n/a** (``nan`` from
  the binary functions, ``None`` from ``evaluate_case`` / ``evaluate``), whatever the
  prediction; it is left out of every mean, never scored 1.0;
* reference present, prediction empty (a missed structure): Dice 0, Jaccard 0, and HD95 /
  ASD / ASSD ``empty_value``, by default the diagonal of the array in the units of
  ``spacing`` (``sqrt(sum((n_i s_i)^2))``, no distance on the grid is larger), so a miss costs
  the most a distance can, instead of nothing.

Units: the units of ``spacing`` (mm in the trainer when the voxel size is known), voxels when
``spacing`` is None. The distance transforms run once per class and case, on the bounding box
of ``P ∪ R`` grown by one voxel (which gives the same surfaces and distances as the whole
array), so scoring a volume costs milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import numpy as np
from scipy import ndimage

#: The metrics ``evaluate_case`` returns per class, in this order.
METRICS = ("dice", "jaccard", "hd95", "asd", "assd")


def _masks(pred: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, reference = np.asarray(pred, bool), np.asarray(reference, bool)
    if pred.shape != reference.shape:
        raise ValueError(
            f"`pred` and `reference` must have the same shape, got {pred.shape} and "
            f"{reference.shape}."
        )
    return pred, reference


def _spacing(spacing: Optional[Sequence[float]], ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    out = tuple(float(s) for s in spacing)
    if len(out) != ndim or not all(math.isfinite(s) and s > 0 for s in out):
        raise ValueError(
            f"`spacing` must be {ndim} finite numbers > 0 (one per axis of the {ndim}D masks), "
            f"got {tuple(spacing)}."
        )
    return out


def diagonal(shape: Sequence[int], spacing: Optional[Sequence[float]] = None) -> float:
    """The diagonal of an array of ``shape`` in the units of ``spacing``: the default
    ``empty_value`` of the distances (a structure missed entirely)."""
    sp = _spacing(spacing, len(shape))
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, sp)))


def dice(pred: np.ndarray, reference: np.ndarray) -> float:
    """``2 |P ∩ R| / (|P| + |R|)`` of two boolean masks; ``nan`` (n/a) when ``reference`` is
    empty, 0 when only ``pred`` is."""
    p, r = _masks(pred, reference)
    if not r.any():
        return math.nan
    return float(2.0 * np.count_nonzero(p & r) / (np.count_nonzero(p) + np.count_nonzero(r)))


def jaccard(pred: np.ndarray, reference: np.ndarray) -> float:
    """``|P ∩ R| / |P ∪ R|`` of two boolean masks; ``nan`` (n/a) when ``reference`` is empty,
    0 when only ``pred`` is."""
    p, r = _masks(pred, reference)
    if not r.any():
        return math.nan
    return float(np.count_nonzero(p & r) / np.count_nonzero(p | r))


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    pred: np.ndarray, reference: np.ndarray, spacing: Optional[Sequence[float]] = None
) -> tuple[np.ndarray, np.ndarray]:
    """The directed surface distances ``(d(P → R), d(R → P))`` of two non-empty masks.

    ``d(P → R)`` holds, for every surface voxel of ``pred`` (in C order), the Euclidean
    distance in the units of ``spacing`` (voxels when None) to the nearest surface voxel of
    ``reference``; see the module's docstring for the surface. Raises ``ValueError`` when a
    mask is empty (no surface, no distance).

    Args:
        pred: boolean mask, any number of dimensions.
        reference: boolean mask of the same shape.
        spacing: the voxel size along each axis.

    Returns:
        Two float64 arrays, of lengths ``|∂P|`` and ``|∂R|``.
    """
    p, r = _masks(pred, reference)
    sp = _spacing(spacing, p.ndim)
    for name, m in (("pred", p), ("reference", r)):
        if not m.any():
            raise ValueError(f"`{name}` is empty: it has no surface to measure distances from.")
    # the bounding box of P | R grown by one voxel: every surface voxel and a background margin
    # around it (or the array's edge, background as well), so surfaces and distances are those
    # of the whole array
    nz = np.nonzero(p | r)
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in nz)
    sp_p, sp_r = _surface(p[box]), _surface(r[box])
    to_r = ndimage.distance_transform_edt(~sp_r, sampling=sp)
    to_p = ndimage.distance_transform_edt(~sp_p, sampling=sp)
    return to_r[sp_p].astype(np.float64), to_p[sp_r].astype(np.float64)


def surface_metrics(
    pred: np.ndarray,
    reference: np.ndarray,
    spacing: Optional[Sequence[float]] = None,
    *,
    empty_value: Optional[float] = None,
) -> dict[str, float]:
    """HD95, ASD and ASSD of two masks from one pair of distance transforms.

    Math:
        ``hd95 = percentile_95(d(P → R) ∪ d(R → P))``, ``asd = mean d(P → R)``,
        ``assd = (mean d(P → R) + mean d(R → P)) / 2``.

    Empty masks: ``reference`` empty -> ``nan`` (n/a) for all three; ``pred`` empty and
    ``reference`` not -> ``empty_value`` for all three (default: ``diagonal(shape, spacing)``).

    Returns:
        ``{"hd95": ..., "asd": ..., "assd": ...}`` in the units of ``spacing``.
    """
    p, r = _masks(pred, reference)
    sp = _spacing(spacing, p.ndim)
    if not r.any():
        return dict.fromkeys(("hd95", "asd", "assd"), math.nan)
    if not p.any():
        value = diagonal(p.shape, sp) if empty_value is None else float(empty_value)
        return dict.fromkeys(("hd95", "asd", "assd"), value)
    to_r, to_p = surface_distances(p, r, sp)
    return {
        "hd95": float(np.percentile(np.concatenate([to_r, to_p]), 95)),
        "asd": float(to_r.mean()),
        "assd": float((to_r.mean() + to_p.mean()) / 2),
    }


def hd95(
    pred: np.ndarray,
    reference: np.ndarray,
    spacing: Optional[Sequence[float]] = None,
    *,
    empty_value: Optional[float] = None,
) -> float:
    """MedPy's ``hd95``: the 95th percentile of both directed surface-distance sets pooled
    (see ``surface_metrics`` for the empty-mask rules)."""
    return surface_metrics(pred, reference, spacing, empty_value=empty_value)["hd95"]


def asd(
    pred: np.ndarray,
    reference: np.ndarray,
    spacing: Optional[Sequence[float]] = None,
    *,
    empty_value: Optional[float] = None,
) -> float:
    """MedPy's ``asd``: the mean distance from the surface of ``pred`` to the surface of
    ``reference`` (one direction; see ``surface_metrics`` for the empty-mask rules)."""
    return surface_metrics(pred, reference, spacing, empty_value=empty_value)["asd"]


def assd(
    pred: np.ndarray,
    reference: np.ndarray,
    spacing: Optional[Sequence[float]] = None,
    *,
    empty_value: Optional[float] = None,
) -> float:
    """MedPy's ``assd``: the mean of the two directed mean surface distances."""
    return surface_metrics(pred, reference, spacing, empty_value=empty_value)["assd"]


def evaluate_case(
    pred: np.ndarray,
    target: np.ndarray,
    num_classes: int,
    spacing: Optional[Sequence[float]] = None,
    ignore_index: Optional[int] = None,
) -> dict[str, list[Optional[float]]]:
    """Every metric of ``METRICS`` for classes ``1 .. num_classes - 1`` of one case.

    ``pred`` and ``target`` are the integer label maps of one whole case (a 3D volume
    ``(Z, H, W)``, or 2D), scored as one array: per volume, not per slice. Axes of length 1 are
    dropped first, with their spacing, so a case of one slice is scored as a 2D image (in 3D
    both faces of a one-slice array would be surface everywhere). A class absent from
    ``target`` is ``None`` (n/a) for every metric. Voxels whose target is ``ignore_index``
    count for neither mask.

    Returns:
        ``{metric: [value or None per foreground class]}``, distances in the units of
        ``spacing`` (voxels when None).
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(
            f"`pred` and `target` must have the same shape, got {pred.shape} and {target.shape}."
        )
    sp = _spacing(spacing, target.ndim)
    keep = [i for i, n in enumerate(target.shape) if n > 1] or [0]
    shape = tuple(target.shape[i] for i in keep)
    pred, target = pred.reshape(shape), target.reshape(shape)
    sp = tuple(sp[i] for i in keep)
    annotated = True if ignore_index is None else target != ignore_index
    out: dict[str, list[Optional[float]]] = {m: [] for m in METRICS}
    for c in range(1, num_classes):
        r = target == c
        if not r.any():
            for m in METRICS:
                out[m].append(None)
            continue
        p = (pred == c) & annotated
        values = {"dice": dice(p, r), "jaccard": jaccard(p, r), **surface_metrics(p, r, sp)}
        for m in METRICS:
            out[m].append(values[m])
    return out


def _mean(values: list[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def evaluate(
    cases: Sequence[tuple[str, np.ndarray, np.ndarray, Optional[Sequence[float]]]],
    num_classes: int,
    ignore_index: Optional[int] = None,
) -> dict[str, list]:
    """Per-case metrics (``evaluate_case``) and their means over cases, per class.

    Args:
        cases: ``(name, pred, target, spacing)`` per case: the label maps of one whole case
            and its voxel size (None: unknown, distances in voxels).
        num_classes: ``C``, background included; classes ``1 .. C - 1`` are scored.
        ignore_index: the target value of unannotated voxels, scored for no class.

    Returns:
        ``{metric: [mean over the cases that hold the class, or None per class], ...,
        "cases": [{"case": name, "spacing": [...] or None, metric: [...], ...}, ...]}``. A
        class absent from a case's target is ``None`` for that case and left out of the
        class's mean; absent from every case, the mean is ``None``.
    """
    per_case = []
    for name, pred, target, spacing in cases:
        scores = evaluate_case(pred, target, num_classes, spacing, ignore_index)
        per_case.append({"case": name, "spacing": None if spacing is None else
                         [float(s) for s in spacing], **scores})  # fmt: skip
    out: dict[str, list] = {
        m: [_mean([case[m][c] for case in per_case]) for c in range(num_classes - 1)]
        for m in METRICS
    }
    out["cases"] = per_case
    return out
